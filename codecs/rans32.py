"""32-lane interleaved rANS (stream methods 5 and 6): the bit-packed frequency table and the decoders.

The format is the 4-state coder of rans.py widened to 32 states, so that a decoder can run 16 states per SIMD
instruction. The vector decoding loops are LLVM IR in rans32_loop.py (masked gather for the slot table, masked
expand-load for the renormalisation words, one popcount to advance); on CPUs without AVX-512 LLVM lowers the same
IR to scalar code, and if the IR cannot be compiled at all a plain numba loop decodes the same format. The
encoders are in rans32_enc.py.
"""
from __future__ import annotations

import logging

from ._jit import njit
import numpy as np

from .rans import RANS_L, SCALE_BITS
from .rans32_loop import LANES, SLOTS, V, _decl, gather_ptrs, loop1, loop2  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

RICE_ESCAPE = 16  # unary quotients of 16 or more are sent as 16 ones + the value in SCALE_BITS bits
TABLE_MAX = 2 + 32 + 256 * 4  # generous bound on the table size in bytes


# ---------------------------------------------------------------- table (format: docs/codecs.md, "rans32")


@njit(nogil=True)
def _bitlen(v):
    n = 0
    while v:
        n += 1
        v >>= 1
    return n


@njit(nogil=True)
def write_table(freq, out):
    """Write the table for freq[256] into out (>= TABLE_MAX bytes); return its length."""
    lo = 0
    while freq[lo] == 0:
        lo += 1
    hi = 255
    while freq[hi] == 0:
        hi -= 1
    out[0] = lo
    out[1] = hi
    pos = 2
    nb = (hi - lo + 8) >> 3
    for b in range(nb):
        out[pos + b] = 0
    for s in range(lo, hi + 1):
        if freq[s]:
            out[pos + ((s - lo) >> 3)] |= 1 << ((s - lo) & 7)
    pos += nb
    acc = np.int64(0)
    nacc = 0
    prev = 16
    for s in range(lo, hi + 1):
        if freq[s] == 0:
            continue
        v = np.int64(freq[s] - 1)
        k = max(_bitlen(prev) - 1, 0)
        q = v >> k
        if q < RICE_ESCAPE:
            acc |= ((np.int64(1) << q) - 1) << nacc
            nacc += q + 1
            acc |= (v & ((np.int64(1) << k) - 1)) << nacc
            nacc += k
        else:
            acc |= np.int64(0xFFFF) << nacc
            nacc += 16
            acc |= v << nacc
            nacc += SCALE_BITS
        prev = v
        while nacc >= 8:
            out[pos] = acc & 0xFF
            pos += 1
            acc >>= 8
            nacc -= 8
    if nacc:
        out[pos] = acc & 0xFF
        pos += 1
    return pos


@njit(nogil=True)
def read_table(buf, freq):
    """Fill freq[256] from buf; return the table length in bytes, or -1 if it is malformed."""
    n = buf.size
    if n < 3:
        return -1
    lo = np.int64(buf[0])
    hi = np.int64(buf[1])
    if hi < lo:
        return -1
    pos = 2
    nb = (hi - lo + 8) >> 3
    if pos + nb > n:
        return -1
    bitpos = (pos + nb) * 8
    endbit = n * 8
    prev = 16
    total = 0
    for s in range(256):
        freq[s] = 0
    for s in range(lo, hi + 1):
        if not (buf[pos + ((s - lo) >> 3)] >> ((s - lo) & 7)) & 1:
            continue
        k = max(_bitlen(prev) - 1, 0)
        q = 0
        while q < RICE_ESCAPE:
            if bitpos >= endbit:
                return -1
            bit = (buf[bitpos >> 3] >> (bitpos & 7)) & 1
            bitpos += 1
            if bit == 0:
                break
            q += 1
        nbits = k if q < RICE_ESCAPE else SCALE_BITS
        if bitpos + nbits > endbit:
            return -1
        r = 0
        for b in range(nbits):
            r |= np.int64((buf[(bitpos + b) >> 3] >> ((bitpos + b) & 7)) & 1) << b
        bitpos += nbits
        v = (q << k) | r if q < RICE_ESCAPE else r
        if v >= SLOTS - 1:
            # refused at once, not after the loop: k follows prev, so absurd values let it grow to 62 bits,
            # where v wraps negative and _bitlen(prev) never ends (a hostile table hung the decoder)
            return -1
        freq[s] = v + 1
        total += v + 1
        prev = v
    if total != SLOTS or (lo == hi):
        return -1
    for s in range(lo, hi + 1):
        if freq[s] >= SLOTS:
            return -1
    return (bitpos + 7) >> 3


def table_bytes(freq: np.ndarray) -> int:
    buf = np.empty(TABLE_MAX, np.uint8)
    return int(write_table(freq, buf))


# ---------------------------------------------------------------- decoder


@njit(nogil=True)
def build_lut(freq, lut, offsets=True):
    # slot -> symbol | freq << 8 | (slot - cum) << 20: one load serves a symbol, and the next state is
    # freq * (x >> 12) + (e >> 20) (storing the offset rather than cum saves the vector loop an add per step).
    # offsets=False stores cum instead (method 7's bucket tables: next state freq * (x >> 12) + slot - cum);
    # with offsets its vector loop ran 2x slower on this Xeon, not understood.
    pos = 0
    for s in range(256):
        f = freq[s]
        c = pos
        for k in range(f):
            lut[pos] = np.uint32(s | (f << 8) | ((k if offsets else c) << 20))
            pos += 1


@njit(nogil=True, inline="always")
def _prepare(buf, lut):
    """Read the table and the initial states; return (words, xs, status)."""
    freq = np.empty(256, np.int64)
    tlen = read_table(buf, freq)
    xs = np.empty(LANES, np.uint32)
    words = buf[:0].view(np.uint16)
    if tlen < 0 or (buf.size - tlen) & 1 or buf.size - tlen < 4 * LANES:
        return words, xs, -1
    build_lut(freq, lut)
    words = buf[tlen:].view(np.uint16)
    for j in range(LANES):
        xs[j] = (np.uint32(words[2 * j]) << 16) | np.uint32(words[2 * j + 1])
    return words, xs, 0


@njit(nogil=True, inline="always")
def _tail(words, lut, xs, out, i, p, closed=True):
    """Scalar decoding of out[i:] with bounds checks, then the end-of-stream checks (every word consumed and,
    if closed, every state back at RANS_L); 0 or -1."""
    n = out.size
    nw = words.size
    while i < n:
        j = i & (LANES - 1)
        x = np.int64(xs[j])
        e = np.int64(lut[x & (SLOTS - 1)])
        out[i] = e & 0xFF
        x = ((e >> 8) & (SLOTS - 1)) * (x >> SCALE_BITS) + (e >> 20)
        if x < RANS_L:
            if p >= nw:
                return -1
            x = (x << 16) | np.int64(words[p])
            p += 1
        xs[j] = np.uint32(x)
        i += 1
    if p != nw:
        return -1
    if closed:
        for j in range(LANES):
            if xs[j] != RANS_L:
                return -1
    return 0


@njit(nogil=True, boundscheck=False)
def decode_into(buf, out):
    """Decode a method-5 stream (uint8 array) into out (uint8, its length is the symbol count); 0 or -1."""
    lut = np.empty(SLOTS, np.uint32)
    words, xs, st = _prepare(buf, lut)
    if st:
        return -1
    # each vector step consumes at most 16 words, so 32 more words must exist for a round of two steps
    st = np.empty(3, np.int64)
    st[0], st[1], st[2] = 0, out.size, 2 * LANES
    i = loop1(lut, words, xs, out, st)
    return _tail(words, lut, xs, out, i, st[2])


@njit(nogil=True, boundscheck=False)
def decode_into_scalar(buf, out):
    """Reference decoder of the same format without the vector step (used when the IR cannot be compiled)."""
    lut = np.empty(SLOTS, np.uint32)
    words, xs, st = _prepare(buf, lut)
    if st:
        return -1
    return _tail(words, lut, xs, out, 0, 2 * LANES)


_vector: bool | None = None  # None: not probed yet


def vector_ok() -> bool:
    """Whether the vector decoders compile here and agree with the scalar ones (probed once per process on a small
    method-6 stream, with the kernels that decoding needs anyway, so the probe compiles nothing extra)."""
    global _vector
    if _vector is not None:
        return _vector
    probe = (np.arange(3000) * 7 % 13).astype(np.uint8)
    freq = np.zeros(256, np.int64)
    freq[:13] = 315
    freq[0] += 1
    from .rans32e_enc import encode_ext
    from .rans32e import decode_ext_into

    buf = np.frombuffer(encode_ext(probe, freq, 2), np.uint8)
    ok = False
    try:
        out = np.empty(probe.size, np.uint8)
        ok = decode_ext_into(buf, out) == 0 and np.array_equal(out, probe)
        if not ok:
            log.warning("rans32: vector decoder disagrees with the reference; using the scalar decoder")
    except Exception as exc:  # noqa: BLE001 - any LLVM/numba failure means: use the portable loop
        log.warning("rans32: vector decoder unavailable (%s); using the scalar decoder", exc)
    _vector = ok
    return ok


def decode(buf: np.ndarray, out: np.ndarray, ext: bool = False) -> None:
    """Decode a method-5 (method 6 if ext) stream (uint8 array) into out; raises ValueError when it is malformed."""
    from .rans32e import decode_ext_into, decode_ext_into_scalar

    vec = vector_ok()
    if ext:
        fn = decode_ext_into if vec else decode_ext_into_scalar
    else:
        fn = decode_into if vec else decode_into_scalar
    if fn(buf, out) != 0:
        raise ValueError("rans32 stream is malformed")


@njit(nogil=True, inline="always")
def _run2(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, closed=True):
    """Decode two prepared streams in one loop (four independent vector chains), then finish each; 0 or -1."""
    st = np.empty(4, np.int64)
    st[0], st[1], st[2], st[3] = 0, min(out_a.size, out_b.size), 2 * LANES, 2 * LANES
    i = loop2(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, st)
    # finish each stream on its own (vector rounds while words remain, then the checked tail)
    sa = np.empty(3, np.int64)
    sa[0], sa[1], sa[2] = i, out_a.size, st[2]
    ia = loop1(lut_a, words_a, xs_a, out_a, sa)
    sb = np.empty(3, np.int64)
    sb[0], sb[1], sb[2] = i, out_b.size, st[3]
    ib = loop1(lut_b, words_b, xs_b, out_b, sb)
    if _tail(words_a, lut_a, xs_a, out_a, ia, sa[2], closed) or _tail(words_b, lut_b, xs_b, out_b, ib, sb[2], closed):
        return -1
    return 0


@njit(nogil=True, boundscheck=False)
def decode2_into(buf_a, out_a, buf_b, out_b):
    """Decode two method-5 streams in one loop (four independent vector chains); 0 or -1."""
    lut_a = np.empty(SLOTS, np.uint32)
    lut_b = np.empty(SLOTS, np.uint32)
    words_a, xs_a, st_a = _prepare(buf_a, lut_a)
    words_b, xs_b, st_b = _prepare(buf_b, lut_b)
    if st_a or st_b:
        return -1
    return _run2(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b)


@njit(nogil=True)
def decode2_into_scalar(buf_a, out_a, buf_b, out_b):
    if decode_into_scalar(buf_a, out_a) or decode_into_scalar(buf_b, out_b):
        return -1
    return 0
