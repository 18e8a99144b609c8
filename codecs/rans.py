"""Order-0 byte entropy coder: 4-way interleaved rANS (32-bit state, 16-bit renormalisation) in numba."""
from __future__ import annotations

import logging

import numba
import numpy as np

log = logging.getLogger(__name__)

SCALE_BITS = 12  # 4096-slot tables: fits L1 and costs < 0.001 bit/symbol in quantisation on our planes
RANS_L = 1 << 16
N_STATES = 4  # independent states let the CPU overlap the dependent multiply chains


@numba.njit(nogil=True, cache=True)
def histogram(data):
    # four sub-histograms avoid store-to-load stalls on runs of the same byte
    h = np.zeros((4, 256), np.int64)
    n = data.size
    i = 0
    while i + 4 <= n:
        h[0, data[i]] += 1
        h[1, data[i + 1]] += 1
        h[2, data[i + 2]] += 1
        h[3, data[i + 3]] += 1
        i += 4
    while i < n:
        h[0, data[i]] += 1
        i += 1
    return h[0] + h[1] + h[2] + h[3]


def normalize(counts: np.ndarray, total: int) -> np.ndarray:
    """Quantise counts to frequencies summing to 1<<SCALE_BITS, every present symbol >= 1."""
    target = 1 << SCALE_BITS
    freq = np.round(counts * (target / total)).astype(np.int64)
    freq[(counts > 0) & (freq == 0)] = 1
    diff = target - int(freq.sum())
    if diff > 0:
        freq[int(np.argmax(counts))] += diff
    elif diff < 0:
        for idx in np.argsort(-freq, kind="stable"):
            take = min(int(freq[idx]) - 1, -diff)
            freq[idx] -= take
            diff += take
            if diff == 0:
                break
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


@numba.njit(nogil=True, cache=True)
def _encode(data, freq, cum, out):
    # encode backwards so the decoder runs forwards; words are pushed from the end of out
    n = data.size
    pos = out.size
    x0 = np.uint64(RANS_L)
    x1 = np.uint64(RANS_L)
    x2 = np.uint64(RANS_L)
    x3 = np.uint64(RANS_L)
    i = n - 1
    while i >= 0:
        s = data[i]
        f = np.uint64(freq[s])
        xmax = f << np.uint64(32 - SCALE_BITS)
        j = i & 3
        if j == 0:
            x = x0
        elif j == 1:
            x = x1
        elif j == 2:
            x = x2
        else:
            x = x3
        if x >= xmax:
            pos -= 1
            out[pos] = np.uint16(x & np.uint64(0xFFFF))
            x >>= np.uint64(16)
        x = ((x // f) << np.uint64(SCALE_BITS)) + (x % f) + np.uint64(cum[s])
        if j == 0:
            x0 = x
        elif j == 1:
            x1 = x
        elif j == 2:
            x2 = x
        else:
            x3 = x
        i -= 1
    for x in (x3, x2, x1, x0):
        pos -= 1
        out[pos] = np.uint16(x & np.uint64(0xFFFF))
        pos -= 1
        out[pos] = np.uint16(x >> np.uint64(16))
    return pos


@numba.njit(nogil=True, cache=True)
def _decode(words, lut, out):
    """Return 0 on success, -1 on a malformed stream (overrun or states not back at their start)."""
    n = out.size
    nw = words.size
    if nw < 8:
        return -1
    x0 = (np.uint32(words[0]) << np.uint32(16)) | np.uint32(words[1])
    x1 = (np.uint32(words[2]) << np.uint32(16)) | np.uint32(words[3])
    x2 = (np.uint32(words[4]) << np.uint32(16)) | np.uint32(words[5])
    x3 = (np.uint32(words[6]) << np.uint32(16)) | np.uint32(words[7])
    p = 8
    mask = np.uint32((1 << SCALE_BITS) - 1)
    i = 0
    nmain = n & ~3
    while i < nmain:
        e = lut[x0 & mask]
        out[i] = np.uint8(e & np.uint32(0xFF))
        x0 = ((e >> np.uint32(8)) & np.uint32(0xFFF)) * (x0 >> np.uint32(SCALE_BITS)) + (x0 & mask) - (e >> np.uint32(20))
        e = lut[x1 & mask]
        out[i + 1] = np.uint8(e & np.uint32(0xFF))
        x1 = ((e >> np.uint32(8)) & np.uint32(0xFFF)) * (x1 >> np.uint32(SCALE_BITS)) + (x1 & mask) - (e >> np.uint32(20))
        e = lut[x2 & mask]
        out[i + 2] = np.uint8(e & np.uint32(0xFF))
        x2 = ((e >> np.uint32(8)) & np.uint32(0xFFF)) * (x2 >> np.uint32(SCALE_BITS)) + (x2 & mask) - (e >> np.uint32(20))
        e = lut[x3 & mask]
        out[i + 3] = np.uint8(e & np.uint32(0xFF))
        x3 = ((e >> np.uint32(8)) & np.uint32(0xFFF)) * (x3 >> np.uint32(SCALE_BITS)) + (x3 & mask) - (e >> np.uint32(20))
        if p + 4 > nw:
            # near the end: renormalise one state at a time with bounds checks
            for k in range(4):
                if k == 0:
                    x = x0
                elif k == 1:
                    x = x1
                elif k == 2:
                    x = x2
                else:
                    x = x3
                if x < RANS_L:
                    if p >= nw:
                        return -1
                    x = (x << np.uint32(16)) | np.uint32(words[p])
                    p += 1
                if k == 0:
                    x0 = x
                elif k == 1:
                    x1 = x
                elif k == 2:
                    x2 = x
                else:
                    x3 = x
        else:
            if x0 < RANS_L:
                x0 = (x0 << np.uint32(16)) | np.uint32(words[p])
                p += 1
            if x1 < RANS_L:
                x1 = (x1 << np.uint32(16)) | np.uint32(words[p])
                p += 1
            if x2 < RANS_L:
                x2 = (x2 << np.uint32(16)) | np.uint32(words[p])
                p += 1
            if x3 < RANS_L:
                x3 = (x3 << np.uint32(16)) | np.uint32(words[p])
                p += 1
        i += 4
    while i < n:
        j = i & 3
        if j == 0:
            x = x0
        elif j == 1:
            x = x1
        else:
            x = x2
        e = lut[x & mask]
        out[i] = np.uint8(e & np.uint32(0xFF))
        x = ((e >> np.uint32(8)) & np.uint32(0xFFF)) * (x >> np.uint32(SCALE_BITS)) + (x & mask) - (e >> np.uint32(20))
        if x < RANS_L:
            if p >= nw:
                return -1
            x = (x << np.uint32(16)) | np.uint32(words[p])
            p += 1
        if j == 0:
            x0 = x
        elif j == 1:
            x1 = x
        else:
            x2 = x
        i += 1
    if p != nw or x0 != RANS_L or x1 != RANS_L or x2 != RANS_L or x3 != RANS_L:
        return -1
    return 0


def encode(data: np.ndarray, freq: np.ndarray) -> bytes:
    """rANS-code uint8 data with a table from normalize(); returns table + words (little-endian u16)."""
    cum = np.zeros(256, np.int64)
    np.cumsum(freq[:-1], out=cum[1:])
    out = np.empty(data.size + 16, np.uint16)  # one word per symbol at most, plus the 4 final states
    pos = _encode(data, freq, cum, out)
    return write_table(freq) + out[pos:].astype("<u2").tobytes()


def build_lut(freq: np.ndarray) -> np.ndarray:
    """Decode table: slot -> symbol | freq << 8 | (cum - ... ) packed so one load serves a symbol."""
    syms = np.repeat(np.arange(256, dtype=np.uint32), freq)
    cum = np.zeros(256, np.int64)
    np.cumsum(freq[:-1], out=cum[1:])
    slots = np.arange(1 << SCALE_BITS, dtype=np.uint32)
    # x' = f * (x >> S) + slot - cum: store cum (12 bits, max 4095) in the top bits
    return syms | (freq[syms].astype(np.uint32) << 8) | (cum[syms].astype(np.uint32) << 20) + 0 * slots


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
