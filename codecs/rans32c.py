"""Stream method 7 (rans32c): the 32-lane rANS of method 5 with one table per context bucket.

The context of symbol i is either the stream's own symbol i - 32 (the previous symbol of the same lane: an
exponent next to exponents of the same row) or the class's stream 0 at element i (a mantissa byte given its
exponent). Both are known to a lane before it decodes symbol i, so the vector decoder keeps its 16-lane steps:
it only adds the bucket (three vector compares) to the slot before the table gather.

This module is the format and the decoders; rans32c_enc.py is the encoder and rans32c_plan.py the chooser (both
re-exported here).
"""
from __future__ import annotations

import logging

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import njit
from .rans import RANS_L, SCALE_BITS
from .rans32 import LANES, SLOTS, V, _decl, gather_ptrs, build_lut, read_table
from .rans32_loop import loop1c, loop2c, loop2c_f32, loop4c_f32, loop4sc_f32
from .rans32e import _prepare_ext, _prepare_halves, finish_part, varint_at

log = logging.getLogger(__name__)

MAX_BUCKETS = 4
# context sources (docs/codecs.md, method 7); source 2 is source 0 in two parts (each half of the symbols coded on
# its own with the shared tables: a decoder runs both with the class's other stream in eight vector chains)
SRC_SELF, SRC_STREAM0, SRC_SELF2 = 0, 1, 2
FLUSH = 4 * LANES  # the 32 final states

_i1, _i8, _i16, _i32, _i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))


@intrinsic
def _round16c(typingctx, lut, words, p, xs, k, out, oi, ctx, ci, thr):
    """One 16-lane step (as rans32_loop._step) for symbols oi+j (j < 16) with table bucket(ctx[ci+j]) (thr: 3
    thresholds, 256 = unused); return the new word position. Only method-7 streams of source 1 (not written)
    still decode with it."""
    sig = types.int64(lut, words, types.int64, xs, types.int64, out, types.int64, ctx, types.int64, thr)

    def codegen(context, builder, signature, args):
        lut_a, words_a, p, xs_a, k, out_a, oi, ctx_a, ci, thr_a = args
        lut_s = context.make_array(signature.args[0])(context, builder, lut_a)
        w_s = context.make_array(signature.args[1])(context, builder, words_a)
        x_s = context.make_array(signature.args[3])(context, builder, xs_a)
        o_s = context.make_array(signature.args[5])(context, builder, out_a)
        c_s = context.make_array(signature.args[7])(context, builder, ctx_a)
        t_s = context.make_array(signature.args[9])(context, builder, thr_a)
        mod = builder.module
        vt = ir.VectorType(_i32, V)
        v64 = ir.VectorType(_i64, V)
        v1 = ir.VectorType(_i1, V)
        v8 = ir.VectorType(_i8, V)

        def splat(c, t=_i32):
            return ir.Constant(ir.VectorType(t, V), [c] * V)

        def bcast(val, t):
            vec = ir.VectorType(t, V)
            return builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), val,
                                                                 ir.Constant(_i32, 0)),
                                          ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(_i32, V), [0] * V))

        xptr = builder.bitcast(builder.gep(x_s.data, [builder.mul(k, ir.Constant(_i64, V))]), vt.as_pointer())
        x = builder.load(xptr, align=4)
        slot = builder.and_(x, splat(SLOTS - 1))
        cptr = builder.bitcast(builder.gep(c_s.data, [ci]), v8.as_pointer())
        cv = builder.zext(builder.load(cptr, align=1), vt)
        bucket = splat(0)
        for t in range(MAX_BUCKETS - 1):
            tv = bcast(builder.trunc(builder.load(builder.gep(t_s.data, [ir.Constant(_i64, t)])), _i32), _i32)
            bucket = builder.add(bucket, builder.zext(builder.icmp_unsigned(">=", cv, tv), vt))
        idx = builder.or_(builder.shl(bucket, splat(SCALE_BITS)), slot)
        pvt = ir.VectorType(_i32.as_pointer(), V)
        gather = _decl(mod, "llvm.masked.gather.v16i32.v16p0", vt, [pvt, v1, vt])
        e = builder.call(gather, [gather_ptrs(builder, lut_s.data, idx), ir.Constant(v1, [1] * V),
                                  ir.Constant(vt, ir.Undefined)])
        optr = builder.bitcast(builder.gep(o_s.data, [oi]), v8.as_pointer())
        builder.store(builder.trunc(e, v8), optr, align=1)
        f = builder.and_(builder.lshr(e, splat(8)), splat(SLOTS - 1))
        x = builder.sub(builder.add(builder.mul(f, builder.lshr(x, splat(SCALE_BITS))), slot), builder.lshr(e, splat(20)))
        need = builder.icmp_unsigned("<", x, splat(RANS_L))
        v16 = ir.VectorType(_i16, V)
        expand = _decl(mod, "llvm.masked.expandload.v16i16", v16, [_i16.as_pointer(), v1, v16])
        w = builder.call(expand, [builder.gep(w_s.data, [p]), need, ir.Constant(v16, [0] * V)])
        x = builder.select(need, builder.or_(builder.shl(x, splat(16)), builder.zext(w, vt)), x)
        builder.store(x, xptr, align=4)
        ctpop = _decl(mod, "llvm.ctpop.i16", _i16, [_i16])
        return builder.add(p, builder.zext(builder.call(ctpop, [builder.bitcast(need, _i16)]), _i64))

    return sig, codegen


# ---------------------------------------------------------------- header (format: docs/codecs.md, method 7)


@njit(nogil=True)
def _prepare(buf, lut, blut, thr):
    """Parse source, thresholds, tables and initial states: (source, words, xs, words_b, xs_b, status) with the
    words and states of part B for source 2 (else empty); fills lut[buckets * 4096], blut[256] (context -> bucket)
    and thr[3] (256 = unused)."""
    xs = np.empty(LANES, np.uint32)
    xs_b = np.empty(LANES, np.uint32)
    words = buf[:0].view(np.uint16)
    if buf.size < 3:
        return 0, words, xs, words, xs_b, -1
    src = np.int64(buf[0])
    nt = np.int64(buf[1])
    if src > SRC_SELF2 or nt < 1 or nt >= MAX_BUCKETS or buf.size < 2 + nt:
        return 0, words, xs, words, xs_b, -1
    for t in range(MAX_BUCKETS - 1):
        thr[t] = 256
    prev = 0
    for t in range(nt):
        v = np.int64(buf[2 + t])
        if v <= prev:
            return 0, words, xs, words, xs_b, -1
        thr[t] = v
        prev = v
    for c in range(256):
        b = 0
        for t in range(nt):
            if c >= thr[t]:
                b += 1
        blut[c] = b
    pos = 2 + nt
    freq = np.empty(256, np.int64)
    for b in range(nt + 1):
        tlen = read_table(buf[pos:], freq)
        if tlen < 0:
            return 0, words, xs, words, xs_b, -1
        build_lut(freq, lut[b * SLOTS : (b + 1) * SLOTS], False)
        pos += tlen
    na = np.int64(-1)
    if src == SRC_SELF2:  # varint: the words of part A
        na, pos = varint_at(buf, pos)
        if na < 0:
            return 0, words, xs, words, xs_b, -1
    if (buf.size - pos) & 1 or buf.size - pos < 4 * LANES:
        return 0, words, xs, words, xs_b, -1
    all_words = buf[pos:].view(np.uint16)
    if na < 0:
        na = all_words.size
    elif na < 2 * LANES or all_words.size - na < 2 * LANES:
        return 0, words, xs, words, xs_b, -1
    words = all_words[:na]
    words_b = all_words[na:]
    for j in range(LANES):
        xs[j] = (np.uint32(words[2 * j]) << 16) | np.uint32(words[2 * j + 1])
        if src == SRC_SELF2:
            xs_b[j] = (np.uint32(words_b[2 * j]) << 16) | np.uint32(words_b[2 * j + 1])
    return src, words, xs, words_b, xs_b, 0


@njit(nogil=True, inline="always")
def _tail(words, lut, blut, xs, out, oi, ctx, ci, i, n, p):
    """Scalar decoding of symbols i..n-1 (written at out[oi + i], context ctx[ci + i]) with bounds checks, then
    the end checks (every word consumed, every state back at RANS_L); 0 or -1."""
    nw = words.size
    while i < n:
        j = i & (LANES - 1)
        x = np.int64(xs[j])
        e = np.int64(lut[(np.int64(blut[ctx[ci + i]]) << SCALE_BITS) | (x & (SLOTS - 1))])
        out[oi + i] = e & 0xFF
        x = ((e >> 8) & (SLOTS - 1)) * (x >> SCALE_BITS) + (x & (SLOTS - 1)) - (e >> 20)
        if x < RANS_L:
            if p >= nw:
                return -1
            x = (x << 16) | np.int64(words[p])
            p += 1
        xs[j] = np.uint32(x)
        i += 1
    if p != nw:
        return -1
    for j in range(LANES):
        if xs[j] != RANS_L:
            return -1
    return 0


@njit(nogil=True, inline="always")
def _tail_self(words, lut, blut, xs, out, i, n, p):
    """_tail for source 0: the context of symbol i is out[i - 32] (0 for the first 32 symbols)."""
    nw = words.size
    while i < n:
        j = i & (LANES - 1)
        x = np.int64(xs[j])
        c = out[i - LANES] if i >= LANES else 0
        e = np.int64(lut[(np.int64(blut[c]) << SCALE_BITS) | (x & (SLOTS - 1))])
        out[i] = e & 0xFF
        x = ((e >> 8) & (SLOTS - 1)) * (x >> SCALE_BITS) + (x & (SLOTS - 1)) - (e >> 20)
        if x < RANS_L:
            if p >= nw:
                return -1
            x = (x << 16) | np.int64(words[p])
            p += 1
        xs[j] = np.uint32(x)
        i += 1
    if p != nw:
        return -1
    for j in range(LANES):
        if xs[j] != RANS_L:
            return -1
    return 0


@njit(nogil=True, boundscheck=False)
def decode_into(buf, stream0, out):
    """Decode a method-7 stream into out (uint8, length = symbols); stream0 is the class's decoded stream 0
    (used by source 1 only, length >= out). 0 or -1."""
    lut = np.empty(MAX_BUCKETS * SLOTS, np.uint32)
    blut = np.empty(256, np.uint8)
    thr = np.empty(MAX_BUCKETS - 1, np.int64)
    src, words, xs, words_b, xs_b, st = _prepare(buf, lut, blut, thr)
    n = out.size
    if st:
        return -1
    if src == SRC_SELF2:
        h = (n + 1) >> 1
        if _decode_self(lut, blut, thr, words, xs, out[:h]):
            return -1
        return _decode_self(lut, blut, thr, words_b, xs_b, out[h:])
    nw = words.size
    p = 2 * LANES
    i = 0
    if src == SRC_STREAM0:
        if stream0.size < n:
            return -1
        while i + LANES <= n and p + LANES <= nw:
            p = _round16c(lut, words, p, xs, 0, out, i, stream0, i, thr)
            p = _round16c(lut, words, p, xs, 1, out, i + V, stream0, i + V, thr)
            i += LANES
        return _tail(words, lut, blut, xs, out, 0, stream0, 0, i, n, p)
    return _decode_self(lut, blut, thr, words, xs, out)


@njit(nogil=True, inline="always")
def _decode_self(lut, blut, thr, words, xs, out):
    """A source-0 coder (or one part of source 2) into out: the first 32 symbols see context 0, every later one
    the symbol 32 before it in out. 0 or -1."""
    n = out.size
    st = np.empty(3, np.int64)
    st[0], st[1], st[2] = 0, n, 2 * LANES
    i = loop1c(lut, words, xs, out, thr, np.zeros(LANES, np.uint8), st)
    return _tail_self(words, lut, blut, xs, out, i, n, st[2])


@njit(nogil=True, boundscheck=False)
def decode_pair_into(buf_c, out_c, buf_e, out_e, m1, m0, u32):
    """A method-7 stream of source 0 and a single-part method-6 stream in one loop (four vector chains, as two
    method-6 streams decode). If u32 is not empty the two are an f32 class's first streams, with raw mantissa
    planes m1, m0: the rounds they decode together are merged straight into the elements u32. Returns how many
    leading elements were merged (0 without u32; the rest is in out_c / out_e), -1 if malformed, -2 if the pair
    does not qualify (the caller decodes each)."""
    lut_c = np.empty(MAX_BUCKETS * SLOTS, np.uint32)
    blut = np.empty(256, np.uint8)
    thr = np.empty(MAX_BUCKETS - 1, np.int64)
    src, words_c, xs_c, _, _, st_c = _prepare(buf_c, lut_c, blut, thr)
    lut_e = np.empty(SLOTS, np.uint32)
    parts, k_e, _, words_e, xs_e, _, _, st_e = _prepare_ext(buf_e, lut_e)
    if st_c or st_e or parts != 1 or src != SRC_SELF:
        return -2
    n_c = out_c.size
    m_e = out_e.size - LANES * k_e
    if m_e < 0:
        return -1
    st = np.empty(4, np.int64)
    st[0], st[1], st[2], st[3] = 0, min(n_c, m_e), 2 * LANES, 2 * LANES
    zero = np.zeros(LANES, np.uint8)
    if u32.size:
        st[1] = min(st[1], u32.size, m1.size, m0.size)
        i = loop2c_f32(lut_c, words_c, xs_c, out_c, thr, zero, lut_e, words_e, xs_e, out_e, u32, m1, m0, st)
        merged = i
    else:
        i = loop2c(lut_c, words_c, xs_c, out_c, thr, zero, lut_e, words_e, xs_e, out_e, st)
        merged = 0
    # each finishes on its own: vector rounds while words remain, then the checked scalar tail
    if _finish_self(lut_c, blut, thr, words_c, xs_c, out_c, u32, merged, i, st[2]):
        return -1
    if finish_part(lut_e, words_e, xs_e, out_e, m_e, i, st[3]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False)
def decode_four_f32(buf_c, out_c, buf_b, out_b, buf_1, out_1, buf_0, out_0, u32):
    """decode_pair_into for an f32 class whose exponents are a method-7 stream of source 0 and whose three other
    streams are single-part method 6 (the mantissa planes coded too): eight chains, the shared rounds write the
    elements u32. Returns how many leading elements (the rest is in the out arrays), -1 if malformed, -2 if the
    streams do not have that shape (0.45 ms per 1 MiB chunk of the corpus checkpoint when decoded in pairs)."""
    lut_c = np.empty(MAX_BUCKETS * SLOTS, np.uint32)
    blut = np.empty(256, np.uint8)
    thr = np.empty(MAX_BUCKETS - 1, np.int64)
    src, words_c, xs_c, _, _, st_c = _prepare(buf_c, lut_c, blut, thr)
    lut_b = np.empty(SLOTS, np.uint32)
    lut_1 = np.empty(SLOTS, np.uint32)
    lut_0 = np.empty(SLOTS, np.uint32)
    parts_b, k_b, _, words_b, xs_b, _, _, st_b = _prepare_ext(buf_b, lut_b)
    parts_1, k_1, _, words_1, xs_1, _, _, st_1 = _prepare_ext(buf_1, lut_1)
    parts_0, k_0, _, words_0, xs_0, _, _, st_0 = _prepare_ext(buf_0, lut_0)
    if st_c or st_b or st_1 or st_0 or src != SRC_SELF or parts_b != 1 or parts_1 != 1 or parts_0 != 1:
        return -2
    n = u32.size
    m_b, m_1, m_0 = n - LANES * k_b, n - LANES * k_1, n - LANES * k_0
    if min(m_b, m_1, m_0) < 0 or out_c.size != n or out_b.size != n or out_1.size != n or out_0.size != n:
        return -1
    st = np.empty(6, np.int64)
    st[0], st[1] = 0, min(n, m_b, m_1, m_0)
    st[2] = st[3] = st[4] = st[5] = 2 * LANES
    zero = np.zeros(LANES, np.uint8)
    i = loop4sc_f32(lut_c, words_c, xs_c, out_c, thr, zero, lut_b, words_b, xs_b, out_b,
                    lut_1, words_1, xs_1, out_1, lut_0, words_0, xs_0, out_0, u32, st)
    if _finish_self(lut_c, blut, thr, words_c, xs_c, out_c, u32, i, i, st[2]) \
            or finish_part(lut_b, words_b, xs_b, out_b, m_b, i, st[3]) \
            or finish_part(lut_1, words_1, xs_1, out_1, m_1, i, st[4]) \
            or finish_part(lut_0, words_0, xs_0, out_0, m_0, i, st[5]):
        return -1
    return i


@njit(nogil=True, inline="always")
def _finish_self(lut, blut, thr, words, xs, out, u32, merged, i, p):
    """A source-0 coder (or part) from symbol i on (word position p) after a shared loop; merged: how many of the
    elements u32 the loop wrote instead of out. 0 or -1."""
    if merged >= LANES:
        # the next symbols' contexts: the last round's exponents, which the merged loop left in the elements only
        for j in range(i - LANES, i):
            out[j] = (u32[j] >> 23) & 0xFF
    sc = np.empty(3, np.int64)
    sc[0], sc[1], sc[2] = i, out.size, p
    ic = loop1c(lut, words, xs, out, thr, out[i - LANES : i] if i >= LANES else np.zeros(LANES, np.uint8), sc)
    return _tail_self(words, lut, blut, xs, out, ic, out.size, sc[2])


@njit(nogil=True, boundscheck=False)
def decode_quad_f32(buf_c, out_c, buf_e, out_e, m1, m0, u32):
    """decode_pair_into for a two-part method-7 exponent stream (source 2) and a two-part method-6 sign|mantissa
    stream of an f32 class with raw mantissa planes m1, m0 (eight vector chains): the rounds all four parts decode
    together are merged into u32 (parts A from element 0, parts B from h = ceil(n/2)). Returns how many leading
    elements of each half were (the rest is left in out_c / out_e), -1 if malformed, -2 if the streams do not have
    that shape (the caller decodes each)."""
    lut_c = np.empty(MAX_BUCKETS * SLOTS, np.uint32)
    blut = np.empty(256, np.uint8)
    thr = np.empty(MAX_BUCKETS - 1, np.int64)
    src, wc0, xc0, wc1, xc1, st_c = _prepare(buf_c, lut_c, blut, thr)
    lut_e = np.empty(SLOTS, np.uint32)
    n = out_c.size
    if st_c or src != SRC_SELF2:
        return -2
    we0, xe0, me0, we1, xe1, me1, ok = _prepare_halves(buf_e, lut_e, n)
    if not ok:
        return -2
    if out_e.size != n or u32.size != n or m1.size != n or m0.size != n:
        return -1
    h = (n + 1) >> 1
    oc0, oc1, oe0, oe1 = out_c[:h], out_c[h:], out_e[:h], out_e[h:]
    st = np.empty(6, np.int64)
    st[0], st[1] = 0, min(n - h, me0, me1)
    st[2] = st[3] = st[4] = st[5] = 2 * LANES
    zero = np.zeros(LANES, np.uint8)
    i = loop4c_f32(lut_c, wc0, xc0, oc0, thr, zero, lut_e, we0, xe0, oe0, lut_c, wc1, xc1, oc1, thr, zero, lut_e,
                   we1, xe1, oe1, u32[:h], m1[:h], m0[:h], u32[h:], m1[h:], m0[h:], st)
    if _finish_self(lut_c, blut, thr, wc0, xc0, oc0, u32[:h], i, i, st[2]) \
            or _finish_self(lut_c, blut, thr, wc1, xc1, oc1, u32[h:], i, i, st[4]) \
            or finish_part(lut_e, we0, xe0, oe0, me0, i, st[3]) or finish_part(lut_e, we1, xe1, oe1, me1, i, st[5]):
        return -1
    return i


@njit(nogil=True, boundscheck=False)
def decode_into_scalar(buf, stream0, out):
    """decode_into without the vector step (where the IR does not compile)."""
    lut = np.empty(MAX_BUCKETS * SLOTS, np.uint32)
    blut = np.empty(256, np.uint8)
    thr = np.empty(MAX_BUCKETS - 1, np.int64)
    src, words, xs, words_b, xs_b, st = _prepare(buf, lut, blut, thr)
    n = out.size
    if st:
        return -1
    if src == SRC_STREAM0:
        if stream0.size < n:
            return -1
        return _tail(words, lut, blut, xs, out, 0, stream0, 0, 0, n, 2 * LANES)
    if src == SRC_SELF2:
        h = (n + 1) >> 1
        if _tail_self(words, lut, blut, xs, out[:h], 0, h, 2 * LANES):
            return -1
        return _tail_self(words_b, lut, blut, xs_b, out[h:], 0, n - h, 2 * LANES)
    return _tail_self(words, lut, blut, xs, out, 0, n, 2 * LANES)


from .rans32c_enc import encode, encode_pieces  # noqa: E402,F401
from .rans32c_plan import (bucket_freqs, bucket_symbols, every_32nd_pays, joint_counts, plan,  # noqa: E402,F401
                           sampled_thresholds, table_bytes)
