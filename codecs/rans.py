"""Order-0 byte entropy coder: 4-way interleaved rANS (32-bit state, 16-bit renormalisation) in numba."""
from __future__ import annotations

import logging

from ._jit import njit
import numpy as np

log = logging.getLogger(__name__)

SCALE_BITS = 12  # 4096-slot tables: fits L1 and costs < 0.001 bit/symbol in quantisation on our planes
RANS_L = 1 << 16
N_STATES = 4  # independent states let the CPU overlap the dependent multiply chains


@njit(nogil=True, boundscheck=False)
def histogram(data):
    """Byte counts of a contiguous uint8 array (int64[256])."""
    # eight bytes per load, four sub-histograms (runs of one byte value would stall on a single counter)
    h = np.zeros(1024, np.uint32)
    n = data.size
    n8 = n >> 3
    w = data[: n8 << 3].view(np.uint64)
    for k in range(n8):
        v = w[k]
        h[v & 0xFF] += 1
        h[256 + ((v >> 8) & 0xFF)] += 1
        h[512 + ((v >> 16) & 0xFF)] += 1
        h[768 + ((v >> 24) & 0xFF)] += 1
        h[(v >> 32) & 0xFF] += 1
        h[256 + ((v >> 40) & 0xFF)] += 1
        h[512 + ((v >> 48) & 0xFF)] += 1
        h[768 + (v >> 56)] += 1
    for i in range(n8 << 3, n):
        h[data[i]] += 1
    out = np.empty(256, np.int64)
    for s in range(256):
        out[s] = np.int64(h[s]) + h[256 + s] + h[512 + s] + h[768 + s]
    return out


@njit(nogil=True, inline="always")
def _slot_gain(c, f):
    return c * np.log2((f + 1) / f)


@njit(nogil=True, inline="always")
def _slot_loss(c, f):
    return c * np.log2(f / (f - 1)) if f > 1 else 1e300


@njit(nogil=True)
def _normalize(counts, total, freq):
    """Quantise counts to freq summing to 1 << SCALE_BITS (every present symbol >= 1) with the least coded size:
    proportional rounding, then single-slot moves while one lowers sum(count * -log2(freq)) (greedy exchange)."""
    target = 1 << SCALE_BITS
    scale = target / total
    fsum = 0
    gain = np.full(256, -1.0)  # bits saved by one more slot
    loss = np.full(256, 1e300)  # bits lost by one slot less
    for s in range(256):
        f = np.int64(0)
        if counts[s]:
            f = max(np.int64(1), np.int64(counts[s] * scale + 0.5))
            gain[s] = _slot_gain(counts[s], f)
            loss[s] = _slot_loss(counts[s], f)
        freq[s] = f
        fsum += f
    for _ in range(8 * target):
        g = 0
        r = 0
        for s in range(1, 256):  # (plain loops: np.argmax/argmin add ~0.3 s to the first compile)
            if gain[s] > gain[g]:
                g = s
            if loss[s] < loss[r]:
                r = s
        if fsum < target:
            freq[g] += 1
            fsum += 1
        elif fsum > target:
            if loss[r] >= 1e300:
                return -1
            freq[r] -= 1
            fsum -= 1
        elif g != r and loss[r] < 1e300 and gain[g] > loss[r] + 1e-9:
            freq[g] += 1
            freq[r] -= 1
        else:
            return 0
        for s in (g, r):
            if counts[s]:
                gain[s] = _slot_gain(counts[s], freq[s])
                loss[s] = _slot_loss(counts[s], freq[s])
    return 0


def normalize(counts: np.ndarray, total: int) -> np.ndarray:
    """Quantise counts to frequencies summing to 1<<SCALE_BITS, every present symbol >= 1."""
    freq = np.empty(256, np.int64)
    if _normalize(np.ascontiguousarray(counts, np.int64), total, freq) != 0:
        raise ValueError("more than 4096 distinct symbols")
    return freq


def estimate_bytes(counts: np.ndarray, freq: np.ndarray) -> float:
    present = counts > 0
    bits = float((counts[present] * (SCALE_BITS - np.log2(freq[present]))).sum())
    return bits / 8 + 8 + table_bytes(freq)


def table_bytes(freq: np.ndarray) -> int:
    present = freq > 0
    return 33 + int(present.sum()) + int((freq[present] > 128).sum())


def write_table(freq: np.ndarray) -> bytes:
    """Table layout: u8 scale bits, 32-byte presence bitmap (LSB first), varint(freq-1) per present symbol."""
    present = freq > 0
    out = bytearray([SCALE_BITS])
    out += np.packbits(present, bitorder="little").tobytes()
    for f in freq[present]:
        v = int(f) - 1
        if v < 128:
            out.append(v)
        else:
            out += bytes(((v & 0x7F) | 0x80, v >> 7))
    return bytes(out)


def read_table(buf: bytes) -> tuple[np.ndarray, int]:
    """Return (freq[256], bytes consumed); raises ValueError on a malformed table."""
    if len(buf) < 33 or buf[0] != SCALE_BITS:
        raise ValueError("rans table header")
    present = np.unpackbits(np.frombuffer(buf, np.uint8, 32, 1), bitorder="little").astype(bool)
    freq = np.zeros(256, np.int64)
    pos = 33
    for sym in np.flatnonzero(present):
        if pos >= len(buf):
            raise ValueError("rans table truncated")
        v = buf[pos]
        pos += 1
        if v & 0x80:
            if pos >= len(buf):
                raise ValueError("rans table truncated")
            v = (v & 0x7F) | (buf[pos] << 7)
            pos += 1
        freq[sym] = v + 1
    if int(freq.sum()) != 1 << SCALE_BITS:
        raise ValueError("rans frequencies do not sum to the scale")
    return freq, pos


@njit(nogil=True, inline="always")
def _enc_step(x, f, c, rcp, out, pos):
    # branch-free renormalisation (the branch is unpredictable): always store, advance only if needed;
    # x < 2**32 so at most one 16-bit word leaves per symbol
    need = np.int64(x >= (f << (32 - SCALE_BITS)))
    out[pos - 1] = x & 0xFFFF
    pos -= need
    x >>= need << 4
    # x // f through a float reciprocal (exact after one correction step; integer division is slow)
    q = np.int64(x * rcp)
    r = x - q * f
    adj = np.int64(r >= f)
    q += adj
    r -= f * adj
    return (q << SCALE_BITS) + r + c, pos


@njit(nogil=True)
def _encode(data, freq, cum, rcp, out):
    # encode backwards so the decoder runs forwards; words are pushed from the end of out.
    # int64 throughout: numba turns mixed signed/unsigned 64-bit arithmetic into float.
    n = data.size
    pos = out.size
    x0 = x1 = x2 = x3 = RANS_L
    i = n - 1
    while i >= 0 and (i & 3) != 3:  # tail symbols that do not fill a group of 4
        s = data[i]
        j = i & 3
        if j == 0:
            x0, pos = _enc_step(x0, freq[s], cum[s], rcp[s], out, pos)
        elif j == 1:
            x1, pos = _enc_step(x1, freq[s], cum[s], rcp[s], out, pos)
        else:
            x2, pos = _enc_step(x2, freq[s], cum[s], rcp[s], out, pos)
        i -= 1
    while i >= 3:
        s = data[i]
        x3, pos = _enc_step(x3, freq[s], cum[s], rcp[s], out, pos)
        s = data[i - 1]
        x2, pos = _enc_step(x2, freq[s], cum[s], rcp[s], out, pos)
        s = data[i - 2]
        x1, pos = _enc_step(x1, freq[s], cum[s], rcp[s], out, pos)
        s = data[i - 3]
        x0, pos = _enc_step(x0, freq[s], cum[s], rcp[s], out, pos)
        i -= 4
    for x in (x3, x2, x1, x0):
        pos -= 1
        out[pos] = x & 0xFFFF
        pos -= 1
        out[pos] = x >> 16
    return pos


@njit(nogil=True, inline="always")
def _dec_step(x, lut, out, i):
    e = np.int64(lut[x & 0xFFF])
    out[i] = e & 0xFF
    return ((e >> 8) & 0xFFF) * (x >> SCALE_BITS) + (x & 0xFFF) - (e >> 20)


@njit(nogil=True, inline="always")
def _renorm(x, words, p):
    # branch-free: the caller guarantees words[p] exists
    need = np.int64(x < RANS_L)
    return (x << (need << 4)) | (np.int64(words[p]) & -need), p + need


@njit(nogil=True)
def _decode(words, lut, out):
    """Return 0 on success, -1 on a malformed stream (overrun or states not back at their start)."""
    n = out.size
    nw = words.size
    if nw < 8:
        return -1
    x0 = (np.int64(words[0]) << 16) | np.int64(words[1])
    x1 = (np.int64(words[2]) << 16) | np.int64(words[3])
    x2 = (np.int64(words[4]) << 16) | np.int64(words[5])
    x3 = (np.int64(words[6]) << 16) | np.int64(words[7])
    p = 8
    i = 0
    nmain = n & ~3
    # fast loop while 4 more words surely exist; each symbol consumes at most one word
    while i < nmain and p + 4 <= nw:
        x0 = _dec_step(x0, lut, out, i)
        x1 = _dec_step(x1, lut, out, i + 1)
        x2 = _dec_step(x2, lut, out, i + 2)
        x3 = _dec_step(x3, lut, out, i + 3)
        x0, p = _renorm(x0, words, p)
        x1, p = _renorm(x1, words, p)
        x2, p = _renorm(x2, words, p)
        x3, p = _renorm(x3, words, p)
        i += 4
    while i < n:  # checked loop for the end of the stream
        j = i & 3
        x = x0 if j == 0 else (x1 if j == 1 else (x2 if j == 2 else x3))
        x = _dec_step(x, lut, out, i)
        if x < RANS_L:
            if p >= nw:
                return -1
            x = (x << 16) | np.int64(words[p])
            p += 1
        if j == 0:
            x0 = x
        elif j == 1:
            x1 = x
        elif j == 2:
            x2 = x
        else:
            x3 = x
        i += 1
    if p != nw or x0 != RANS_L or x1 != RANS_L or x2 != RANS_L or x3 != RANS_L:
        return -1
    return 0


def encode(data: np.ndarray, freq: np.ndarray) -> bytes:
    """rANS-code uint8 data with a table from normalize(); returns table + words (little-endian u16)."""
    cum = np.zeros(256, np.int64)
    np.cumsum(freq[:-1], out=cum[1:])
    out = np.empty(data.size + 16, np.uint16)  # one word per symbol at most, plus the 4 final states
    rcp = 1.0 / np.maximum(freq, 1)
    pos = _encode(data, freq, cum, rcp, out)
    return write_table(freq) + out[pos:].astype("<u2").tobytes()


def build_lut(freq: np.ndarray) -> np.ndarray:
    """Decode table: slot -> symbol | freq << 8 | (cum - ... ) packed so one load serves a symbol."""
    syms = np.repeat(np.arange(256, dtype=np.uint32), freq)
    cum = np.zeros(256, np.int64)
    np.cumsum(freq[:-1], out=cum[1:])
    # x' = f * (x >> S) + slot - cum: store cum (12 bits, max 4095) in the top bits
    return syms | (freq[syms].astype(np.uint32) << 8) | (cum[syms].astype(np.uint32) << 20)


def decode(buf: bytes | memoryview, n: int) -> np.ndarray:
    freq, pos = read_table(bytes(buf[: 33 + 512]))
    if freq.max() >= 1 << SCALE_BITS:
        raise ValueError("single-symbol rans table")
    body = memoryview(buf)[pos:]
    if len(body) % 2:
        raise ValueError("rans body has an odd length")
    words = np.frombuffer(body, "<u2")
    out = np.empty(n, np.uint8)
    if _decode(words, build_lut(freq), out) != 0:
        raise ValueError("rans stream is malformed")
    return out


@njit(nogil=True)
def read_table_nb(buf, freq):
    """numba twin of read_table: fill freq[256], return the table length or -1 if malformed."""
    n = buf.size
    if n < 33 or buf[0] != SCALE_BITS:
        return -1
    pos = 33
    total = 0
    for s in range(256):
        freq[s] = 0
        if (buf[1 + (s >> 3)] >> (s & 7)) & 1:
            if pos >= n:
                return -1
            v = np.int64(buf[pos])
            pos += 1
            if v & 0x80:
                if pos >= n:
                    return -1
                v = (v & 0x7F) | (np.int64(buf[pos]) << 7)
                pos += 1
            freq[s] = v + 1
            total += v + 1
    if total != 1 << SCALE_BITS:
        return -1
    for s in range(256):
        if freq[s] >= 1 << SCALE_BITS:
            return -1
    return pos


@njit(nogil=True)
def decode_into(buf, out):
    """Decode a method-2 stream (uint8 array) into out without leaving numba; 0 or -1."""
    freq = np.empty(256, np.int64)
    pos = read_table_nb(buf, freq)
    if pos < 0 or (buf.size - pos) & 1:
        return -1
    lut = np.empty(1 << SCALE_BITS, np.uint32)
    k = 0
    for s in range(256):
        f = freq[s]
        c = k
        for _ in range(f):
            lut[k] = np.uint32(s | (f << 8) | (c << 20))
            k += 1
    return _decode(buf[pos:].view(np.uint16), lut, out)
