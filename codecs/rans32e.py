"""Decoders of stream method 6 (rans32e, docs/codecs.md): method 5 in one or two parts whose end states carry
each lane's last symbols. The encoder is in rans32_enc.py."""
from __future__ import annotations

import logging

import numpy as np

from ._jit import njit
from .rans import RANS_L, SCALE_BITS
from .rans32 import LANES, SLOTS, _run2, _tail, build_lut, read_table
from .rans32_loop import loop1, loop2_bf16, loop2_f16, loop2_f32, loop4_bf16, loop4_f32, loop4s_f32

log = logging.getLogger(__name__)


@njit(nogil=True, inline="always")
def varint_at(buf, pos):
    """(value, next position) of the varint at buf[pos], or (-1, pos) when truncated or longer than 5 bytes."""
    v = np.int64(0)
    shift = 0
    while True:
        if pos >= buf.size or shift > 28:
            return np.int64(-1), pos
        b = np.int64(buf[pos])
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos


@njit(nogil=True, inline="always")
def _prepare_ext(buf, lut):
    """Parse a method-6 header: (parts, k_a, k_b, words_a, xs_a, words_b, xs_b, status)."""
    xs_a = np.empty(LANES, np.uint32)
    xs_b = np.empty(LANES, np.uint32)
    empty = buf[:0].view(np.uint16)
    if buf.size < 3:
        return 0, 0, 0, empty, xs_a, empty, xs_b, -1
    parts = np.int64(buf[0])
    if parts != 1 and parts != 2:
        return 0, 0, 0, empty, xs_a, empty, xs_b, -1
    k_a = np.int64(buf[1])
    k_b = np.int64(buf[2]) if parts == 2 else np.int64(0)
    pos = 1 + parts
    freq = np.empty(256, np.int64)
    tlen = read_table(buf[pos:], freq)
    if tlen < 0:
        return 0, 0, 0, empty, xs_a, empty, xs_b, -1
    pos += tlen
    na = np.int64(-1)
    if parts == 2:
        na, pos = varint_at(buf, pos)
        if na < 0:
            return 0, 0, 0, empty, xs_a, empty, xs_b, -1
    rest = buf.size - pos
    if rest & 1:
        return 0, 0, 0, empty, xs_a, empty, xs_b, -1
    nw = rest >> 1
    if parts == 1:
        na = nw
    if na < 2 * LANES or (parts == 2 and nw - na < 2 * LANES) or na > nw:
        return 0, 0, 0, empty, xs_a, empty, xs_b, -1
    build_lut(freq, lut)
    words = buf[pos:].view(np.uint16)
    words_a = words[:na]
    words_b = words[na:]
    for j in range(LANES):
        xs_a[j] = (np.uint32(words_a[2 * j]) << 16) | np.uint32(words_a[2 * j + 1])
        if parts == 2:
            xs_b[j] = (np.uint32(words_b[2 * j]) << 16) | np.uint32(words_b[2 * j + 1])
    return parts, k_a, k_b, words_a, xs_a, words_b, xs_b, 0


@njit(nogil=True, inline="always")
def _state_symbols(lut, xs, out, start):
    """Decode out[start:] from the payload the end states carry (y = state - RANS_L); 0 if every y ends at 0."""
    y = np.empty(LANES, np.int64)
    for j in range(LANES):
        y[j] = np.int64(xs[j]) - RANS_L
    for i in range(start, out.size):
        j = i & (LANES - 1)
        v = y[j]
        e = np.int64(lut[v & (SLOTS - 1)])
        out[i] = e & 0xFF
        y[j] = ((e >> 8) & (SLOTS - 1)) * (v >> SCALE_BITS) + (e >> 20)
    for j in range(LANES):
        if y[j] != 0:
            return -1
    return 0


@njit(nogil=True, boundscheck=False)
def _decode_parts(lut_a, words_a, xs_a, out_a, k_a, lut_b, words_b, xs_b, out_b, k_b):
    """Decode two prepared method-6 parts in one loop (part B may be empty: out_b.size == k_b == 0); 0 or -1.
    The one kernel behind decode_ext_into and decode_ext_pair_into (less code to compile on a cold start)."""
    m_a = out_a.size - LANES * k_a
    m_b = out_b.size - LANES * k_b
    if m_a < 0 or m_b < 0:
        return -1
    if _run2(lut_a, words_a, xs_a, out_a[:m_a], lut_b, words_b, xs_b, out_b[:m_b], False):
        return -1
    if _state_symbols(lut_a, xs_a, out_a, m_a) or _state_symbols(lut_b, xs_b, out_b, m_b):
        return -1
    return 0


@njit(nogil=True, boundscheck=False)
def decode_ext_into(buf, out):
    """Decode a method-6 stream (uint8 array) into out (its length is the symbol count); 0 or -1."""
    lut = np.empty(SLOTS, np.uint32)
    parts, k_a, k_b, words_a, xs_a, words_b, xs_b, st = _prepare_ext(buf, lut)
    if st:
        return -1
    n = out.size
    if parts == 1:
        # part B empty: its "stream" is the 32 states of part A again, all of which _run2 leaves unread
        for j in range(LANES):
            xs_b[j] = RANS_L
        # (k_b is 0 here; a variable, not the literal, so that both calls share one compiled specialisation)
        return _decode_parts(lut, words_a, xs_a, out, k_a, lut, words_a[: 2 * LANES], xs_b, out[n:], k_b)
    h = (n + 1) >> 1
    return _decode_parts(lut, words_a, xs_a, out[:h], k_a, lut, words_b, xs_b, out[h:], k_b)


@njit(nogil=True, boundscheck=False)
def decode_ext_pair_into(buf_a, out_a, buf_b, out_b):
    """Two single-part method-6 streams in one loop (four vector chains); 0 or -1 (also for a two-part stream:
    the caller decodes those with decode_ext_into)."""
    lut_a = np.empty(SLOTS, np.uint32)
    lut_b = np.empty(SLOTS, np.uint32)
    parts_a, k_a, _, words_a, xs_a, _, _, st_a = _prepare_ext(buf_a, lut_a)
    parts_b, k_b, _, words_b, xs_b, _, _, st_b = _prepare_ext(buf_b, lut_b)
    if st_a or st_b or parts_a != 1 or parts_b != 1:
        return -1
    return _decode_parts(lut_a, words_a, xs_a, out_a, k_a, lut_b, words_b, xs_b, out_b, k_b)


@njit(nogil=True, inline="always")
def _prepare_pair(buf_a, buf_b, lut_a, lut_b):
    """Both single-part method-6 headers: (words_a, xs_a, k_a, words_b, xs_b, k_b, ok)."""
    parts_a, k_a, _, words_a, xs_a, _, _, st_a = _prepare_ext(buf_a, lut_a)
    parts_b, k_b, _, words_b, xs_b, _, _, st_b = _prepare_ext(buf_b, lut_b)
    return words_a, xs_a, k_a, words_b, xs_b, k_b, st_a == 0 and st_b == 0 and parts_a == 1 and parts_b == 1


@njit(nogil=True, inline="always")
def finish_part(lut, words, xs, out, m, start, p):
    """A method-6 part from symbol start on (word position p) into out, after a merged loop left it: vector rounds
    while words remain, the checked tail, the state symbols (out[m:]); 0 or -1."""
    s1 = np.empty(3, np.int64)
    s1[0], s1[1], s1[2] = start, m, p
    i = loop1(lut, words, xs, out, s1)
    if _tail(words, lut, xs, out[:m], i, s1[2], False) or _state_symbols(lut, xs, out, m):
        return -1
    return 0


@njit(nogil=True, boundscheck=False)
def decode_ext_pair_bf16(buf_a, out_a, buf_b, out_b, u16):
    """decode_ext_pair_into for the two streams of a bf16 class (exponents, sign|mantissa bytes): the rounds both
    decode together are merged straight into the elements u16, skipping the planes; returns how many leading
    elements were (the rest is left in out_a / out_b for the caller to merge), or -1 (also for two-part streams)."""
    lut_a = np.empty(SLOTS, np.uint32)
    lut_b = np.empty(SLOTS, np.uint32)
    words_a, xs_a, k_a, words_b, xs_b, k_b, ok = _prepare_pair(buf_a, buf_b, lut_a, lut_b)
    m_a = out_a.size - LANES * k_a
    m_b = out_b.size - LANES * k_b
    if not ok or m_a < 0 or m_b < 0:
        return -1
    st = np.empty(4, np.int64)
    st[0], st[1], st[2], st[3] = 0, min(m_a, m_b, u16.size), 2 * LANES, 2 * LANES
    merged = loop2_bf16(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16, st)
    if finish_part(lut_a, words_a, xs_a, out_a, m_a, merged, st[2]) or \
            finish_part(lut_b, words_b, xs_b, out_b, m_b, merged, st[3]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False)
def decode_ext_pair_f32(buf_a, out_a, buf_b, out_b, m1, m0, u32):
    """decode_ext_pair_bf16 for an f32 class's exponents and sign|mantissa-top bytes whose mantissa planes m1, m0
    are raw: the shared rounds write the elements u32; returns how many leading elements, or -1."""
    lut_a = np.empty(SLOTS, np.uint32)
    lut_b = np.empty(SLOTS, np.uint32)
    words_a, xs_a, k_a, words_b, xs_b, k_b, ok = _prepare_pair(buf_a, buf_b, lut_a, lut_b)
    m_a = out_a.size - LANES * k_a
    m_b = out_b.size - LANES * k_b
    if not ok or m_a < 0 or m_b < 0:
        return -1
    st = np.empty(4, np.int64)
    st[0], st[1], st[2], st[3] = 0, min(m_a, m_b, u32.size, m1.size, m0.size), 2 * LANES, 2 * LANES
    merged = loop2_f32(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u32, m1, m0, st)
    if finish_part(lut_a, words_a, xs_a, out_a, m_a, merged, st[2]) or \
            finish_part(lut_b, words_b, xs_b, out_b, m_b, merged, st[3]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False)
def decode_ext_four_f32(buf_a, out_a, buf_b, out_b, buf_c, out_c, buf_d, out_d, u32):
    """decode_ext_pair_f32 for an f32 class whose four streams are all single-part method 6 (the mantissa planes
    coded too): eight chains, the shared rounds write the elements u32; returns how many leading elements, or -1
    (the two pairs then decode as before: 376 us per 1 MiB chunk of the corpus .pt, one-off timing)."""
    lut_a = np.empty(SLOTS, np.uint32)
    lut_b = np.empty(SLOTS, np.uint32)
    lut_c = np.empty(SLOTS, np.uint32)
    lut_d = np.empty(SLOTS, np.uint32)
    words_a, xs_a, k_a, words_b, xs_b, k_b, ok_ab = _prepare_pair(buf_a, buf_b, lut_a, lut_b)
    words_c, xs_c, k_c, words_d, xs_d, k_d, ok_cd = _prepare_pair(buf_c, buf_d, lut_c, lut_d)
    n = u32.size
    m_a, m_b, m_c, m_d = n - LANES * k_a, n - LANES * k_b, n - LANES * k_c, n - LANES * k_d
    if not (ok_ab and ok_cd) or min(m_a, m_b, m_c, m_d) < 0 \
            or out_a.size != n or out_b.size != n or out_c.size != n or out_d.size != n:
        return -1
    st = np.empty(6, np.int64)
    st[0], st[1] = 0, min(m_a, m_b, m_c, m_d)
    st[2] = st[3] = st[4] = st[5] = 2 * LANES
    merged = loop4s_f32(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b,
                        lut_c, words_c, xs_c, out_c, lut_d, words_d, xs_d, out_d, u32, st)
    if finish_part(lut_a, words_a, xs_a, out_a, m_a, merged, st[2]) \
            or finish_part(lut_b, words_b, xs_b, out_b, m_b, merged, st[3]) \
            or finish_part(lut_c, words_c, xs_c, out_c, m_c, merged, st[4]) \
            or finish_part(lut_d, words_d, xs_d, out_d, m_d, merged, st[5]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False)
def decode_ext_f16(buf, out, lo, u16):
    """A two-part method-6 stream of an f16 class's high bytes whose low bytes lo are raw: the rounds both parts
    decode together write the elements u16 (of part A from 0, of part B from h = ceil(n/2)). Returns how many
    leading elements of each part were (the rest is in out), or -1 (also for one-part streams)."""
    lut = np.empty(SLOTS, np.uint32)
    parts, k_a, k_b, words_a, xs_a, words_b, xs_b, st = _prepare_ext(buf, lut)
    n = out.size
    h = (n + 1) >> 1
    if st or parts != 2 or lo.size != n or u16.size != n:
        return -1
    out_a, out_b = out[:h], out[h:]
    m_a = h - LANES * k_a
    m_b = (n - h) - LANES * k_b
    if m_a < 0 or m_b < 0:
        return -1
    s2 = np.empty(4, np.int64)
    s2[0], s2[1], s2[2], s2[3] = 0, min(m_a, m_b), 2 * LANES, 2 * LANES
    merged = loop2_f16(lut, words_a, xs_a, out_a, lut, words_b, xs_b, out_b, u16[:h], lo[:h], u16[h:], lo[h:], s2)
    if finish_part(lut, words_a, xs_a, out_a, m_a, merged, s2[2]) or \
            finish_part(lut, words_b, xs_b, out_b, m_b, merged, s2[3]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False)
def decode_ext_into_scalar(buf, out):
    """decode_ext_into without the vector step (used when its IR cannot be compiled)."""
    lut = np.empty(SLOTS, np.uint32)
    parts, k_a, k_b, words_a, xs_a, words_b, xs_b, st = _prepare_ext(buf, lut)
    if st:
        return -1
    n = out.size
    h = n if parts == 1 else (n + 1) >> 1
    out_a = out[:h]
    out_b = out[h:]
    m_a = h - LANES * k_a
    m_b = (n - h) - LANES * k_b
    if m_a < 0 or m_b < 0:
        return -1
    if _tail(words_a, lut, xs_a, out_a[:m_a], 0, 2 * LANES, False) or _state_symbols(lut, xs_a, out_a, m_a):
        return -1
    if parts == 2:
        if _tail(words_b, lut, xs_b, out_b[:m_b], 0, 2 * LANES, False) or _state_symbols(lut, xs_b, out_b, m_b):
            return -1
    return 0


@njit(nogil=True, inline="always")
def _prepare_halves(buf, lut, n):
    """A two-part method-6 header of a stream of n symbols: (words, xs, m of part A, of part B, ok), m = the
    symbols a part codes before those its end states carry."""
    parts, k0, k1, w0, x0, w1, x1, st = _prepare_ext(buf, lut)
    h = (n + 1) >> 1
    m0, m1 = h - LANES * k0, (n - h) - LANES * k1
    return w0, x0, m0, w1, x1, m1, st == 0 and parts == 2 and min(m0, m1) >= 0


@njit(nogil=True, inline="always")
def _prepare_quad(buf_a, buf_b, lut_a, lut_b, n):
    """Both two-part method-6 headers of streams of n symbols: (words, xs, m of parts A0, B0, A1, B1, the loop
    state [0, shared rounds' bound, word positions], h = ceil(n/2), ok)."""
    wa0, xa0, ma0, wa1, xa1, ma1, ok_a = _prepare_halves(buf_a, lut_a, n)
    wb0, xb0, mb0, wb1, xb1, mb1, ok_b = _prepare_halves(buf_b, lut_b, n)
    st = np.empty(6, np.int64)
    st[0], st[1] = 0, min(ma0, ma1, mb0, mb1)
    st[2] = st[3] = st[4] = st[5] = 2 * LANES
    return wa0, xa0, ma0, wb0, xb0, mb0, wa1, xa1, ma1, wb1, xb1, mb1, st, (n + 1) >> 1, ok_a and ok_b


@njit(nogil=True, inline="always")
def _finish_quad(lut_a, lut_b, wa0, xa0, oa0, ma0, wb0, xb0, ob0, mb0, wa1, xa1, oa1, ma1, wb1, xb1, ob1, mb1,
                 merged, st):
    """finish_part for the four parts after the shared rounds: merged, or -1."""
    if finish_part(lut_a, wa0, xa0, oa0, ma0, merged, st[2]) or finish_part(lut_b, wb0, xb0, ob0, mb0, merged, st[3]) \
            or finish_part(lut_a, wa1, xa1, oa1, ma1, merged, st[4]) \
            or finish_part(lut_b, wb1, xb1, ob1, mb1, merged, st[5]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False)
def decode_ext_quad_bf16(buf_a, out_a, buf_b, out_b, u16):
    """decode_ext_pair_bf16 for two two-part streams (eight chains): the rounds all four parts decode together are
    merged into u16 (of the parts A from 0, of the parts B from h = ceil(n/2)). Returns how many leading elements
    of each half were (the rest is left in out_a / out_b for the caller to merge), or -1 (also for one-part
    streams)."""
    lut_a = np.empty(SLOTS, np.uint32)
    lut_b = np.empty(SLOTS, np.uint32)
    n = out_a.size
    wa0, xa0, ma0, wb0, xb0, mb0, wa1, xa1, ma1, wb1, xb1, mb1, st, h, ok = _prepare_quad(buf_a, buf_b, lut_a,
                                                                                          lut_b, n)
    if not ok or out_b.size != n or u16.size != n:
        return -1
    oa0, oa1, ob0, ob1 = out_a[:h], out_a[h:], out_b[:h], out_b[h:]
    merged = loop4_bf16(lut_a, wa0, xa0, oa0, lut_b, wb0, xb0, ob0, lut_a, wa1, xa1, oa1, lut_b, wb1, xb1, ob1,
                        u16[:h], u16[h:], st)
    return _finish_quad(lut_a, lut_b, wa0, xa0, oa0, ma0, wb0, xb0, ob0, mb0, wa1, xa1, oa1, ma1, wb1, xb1, ob1, mb1,
                        merged, st)


@njit(nogil=True, boundscheck=False)
def decode_ext_quad_f32(buf_a, out_a, buf_b, out_b, m1, m0, u32):
    """decode_ext_quad_bf16 for an f32 class's exponents and sign|mantissa-top bytes, each in two parts, whose
    mantissa planes m1, m0 are raw: returns how many leading elements of each half were written, or -1."""
    lut_a = np.empty(SLOTS, np.uint32)
    lut_b = np.empty(SLOTS, np.uint32)
    n = out_a.size
    wa0, xa0, ma0, wb0, xb0, mb0, wa1, xa1, ma1, wb1, xb1, mb1, st, h, ok = _prepare_quad(buf_a, buf_b, lut_a,
                                                                                          lut_b, n)
    if not ok or out_b.size != n or u32.size != n or m1.size != n or m0.size != n:
        return -1
    oa0, oa1, ob0, ob1 = out_a[:h], out_a[h:], out_b[:h], out_b[h:]
    merged = loop4_f32(lut_a, wa0, xa0, oa0, lut_b, wb0, xb0, ob0, lut_a, wa1, xa1, oa1, lut_b, wb1, xb1, ob1,
                       u32[:h], m1[:h], m0[:h], u32[h:], m1[h:], m0[h:], st)
    return _finish_quad(lut_a, lut_b, wa0, xa0, oa0, ma0, wb0, xb0, ob0, mb0, wa1, xa1, oa1, ma1, wb1, xb1, ob1, mb1,
                        merged, st)
