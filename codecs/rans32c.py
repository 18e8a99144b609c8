"""Stream method 7 (rans32c): the 32-lane rANS of method 5 with one table per context bucket.

The context of symbol i is either the stream's own symbol i - 32 (the previous symbol of the same lane: an
exponent next to exponents of the same row) or the class's stream 0 at element i (a mantissa byte given its
exponent). Both are known to a lane before it decodes symbol i, so the vector decoder keeps its 16-lane steps:
it only adds the bucket (three vector compares) to the slot before the table gather.
"""
from __future__ import annotations

import logging

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import njit
from .rans import RANS_L, SCALE_BITS, _enc_step, normalize
from .rans32 import (LANES, SLOTS, TABLE_MAX, V, _decl, _prepare_ext, _round16, _state_symbols, _tail as _tail6,
                     build_lut, read_table, write_table)

log = logging.getLogger(__name__)

MAX_BUCKETS = 4
SRC_SELF, SRC_STREAM0 = 0, 1  # context sources (docs/codecs.md, method 7)
FLUSH = 4 * LANES  # the 32 final states

_i1, _i8, _i16, _i32, _i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
_f64 = ir.DoubleType()


@intrinsic
def _round16c(typingctx, lut, words, p, xs, k, out, oi, ctx, ci, thr):
    """As rans32._round16 for symbols oi+j (j < 16) with table bucket(ctx[ci+j]) (thr: 3 thresholds, 256 =
    unused); return the new word position."""
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
        base = builder.ptrtoint(lut_s.data, _i64)
        addrs = builder.add(builder.shl(builder.zext(idx, v64), splat(2, _i64)), bcast(base, _i64))
        pvt = ir.VectorType(_i32.as_pointer(), V)
        gather = _decl(mod, "llvm.masked.gather.v16i32.v16p0", vt, [pvt, v1, vt])
        e = builder.call(gather, [builder.inttoptr(addrs, pvt), ir.Constant(v1, [1] * V), ir.Constant(vt, ir.Undefined)])
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
    """Parse source, thresholds, tables and initial states: (source, words, xs, status); fills lut[buckets * 4096],
    blut[256] (context -> bucket) and thr[3] (256 = unused)."""
    xs = np.empty(LANES, np.uint32)
    words = buf[:0].view(np.uint16)
    if buf.size < 3:
        return 0, words, xs, -1
    src = np.int64(buf[0])
    nt = np.int64(buf[1])
    if src > SRC_STREAM0 or nt < 1 or nt >= MAX_BUCKETS or buf.size < 2 + nt:
        return 0, words, xs, -1
    for t in range(MAX_BUCKETS - 1):
        thr[t] = 256
    prev = 0
    for t in range(nt):
        v = np.int64(buf[2 + t])
        if v <= prev:
            return 0, words, xs, -1
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
            return 0, words, xs, -1
        build_lut(freq, lut[b * SLOTS : (b + 1) * SLOTS])
        pos += tlen
    if (buf.size - pos) & 1 or buf.size - pos < 4 * LANES:
        return 0, words, xs, -1
    words = buf[pos:].view(np.uint16)
    for j in range(LANES):
        xs[j] = (np.uint32(words[2 * j]) << 16) | np.uint32(words[2 * j + 1])
    return src, words, xs, 0


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
    src, words, xs, st = _prepare(buf, lut, blut, thr)
    n = out.size
    if st:
        return -1
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
    # own context: the first 32 symbols see context 0, every later one the symbol 32 before it in out
    zero = np.zeros(LANES, np.uint8)
    if LANES <= n and p + LANES <= nw:
        p = _round16c(lut, words, p, xs, 0, out, 0, zero, 0, thr)
        p = _round16c(lut, words, p, xs, 1, out, V, zero, V, thr)
        i = LANES
        while i + LANES <= n and p + LANES <= nw:
            p = _round16c(lut, words, p, xs, 0, out, i, out, i - LANES, thr)
            p = _round16c(lut, words, p, xs, 1, out, i + V, out, i + V - LANES, thr)
            i += LANES
    return _tail_self(words, lut, blut, xs, out, i, n, p)


@njit(nogil=True, boundscheck=False)
def decode_pair_into(buf_c, out_c, buf_e, out_e):
    """A method-7 stream of source 0 and a single-part method-6 stream in one loop (four vector chains, as two
    method-6 streams decode); 0, -1 if malformed, -2 if the pair does not qualify (the caller decodes each)."""
    lut_c = np.empty(MAX_BUCKETS * SLOTS, np.uint32)
    blut = np.empty(256, np.uint8)
    thr = np.empty(MAX_BUCKETS - 1, np.int64)
    src, words_c, xs_c, st_c = _prepare(buf_c, lut_c, blut, thr)
    lut_e = np.empty(SLOTS, np.uint32)
    parts, k_e, _, words_e, xs_e, _, _, st_e = _prepare_ext(buf_e, lut_e)
    if st_c or st_e or parts != 1 or src != SRC_SELF:
        return -2
    n_c = out_c.size
    m_e = out_e.size - LANES * k_e
    if m_e < 0:
        return -1
    oe = out_e[:m_e]
    nwc = words_c.size
    nwe = words_e.size
    pc = pe = 2 * LANES
    zero = np.zeros(LANES, np.uint8)
    i = 0
    n = min(n_c, m_e)
    if LANES <= n and pc + LANES <= nwc and pe + LANES <= nwe:
        pc = _round16c(lut_c, words_c, pc, xs_c, 0, out_c, 0, zero, 0, thr)
        pe = _round16(lut_e, words_e, pe, xs_e, 0, oe, 0)
        pc = _round16c(lut_c, words_c, pc, xs_c, 1, out_c, V, zero, V, thr)
        pe = _round16(lut_e, words_e, pe, xs_e, 1, oe, V)
        i = LANES
        while i + LANES <= n and pc + LANES <= nwc and pe + LANES <= nwe:
            pc = _round16c(lut_c, words_c, pc, xs_c, 0, out_c, i, out_c, i - LANES, thr)
            pe = _round16(lut_e, words_e, pe, xs_e, 0, oe, i)
            pc = _round16c(lut_c, words_c, pc, xs_c, 1, out_c, i + V, out_c, i + V - LANES, thr)
            pe = _round16(lut_e, words_e, pe, xs_e, 1, oe, i + V)
            i += LANES
    # each finishes on its own: vector steps while words remain, then the checked scalar tail
    ic = i
    if ic >= LANES:
        while ic + LANES <= n_c and pc + LANES <= nwc:
            pc = _round16c(lut_c, words_c, pc, xs_c, 0, out_c, ic, out_c, ic - LANES, thr)
            pc = _round16c(lut_c, words_c, pc, xs_c, 1, out_c, ic + V, out_c, ic + V - LANES, thr)
            ic += LANES
    ie = i
    while ie + LANES <= m_e and pe + LANES <= nwe:
        pe = _round16(lut_e, words_e, pe, xs_e, 0, oe, ie)
        pe = _round16(lut_e, words_e, pe, xs_e, 1, oe, ie + V)
        ie += LANES
    if _tail_self(words_c, lut_c, blut, xs_c, out_c, ic, n_c, pc):
        return -1
    if _tail6(words_e, lut_e, xs_e, oe, ie, pe, False) or _state_symbols(lut_e, xs_e, out_e, m_e):
        return -1
    return 0


@njit(nogil=True, boundscheck=False)
def decode_into_scalar(buf, stream0, out):
    """decode_into without the vector step (where the IR does not compile)."""
    lut = np.empty(MAX_BUCKETS * SLOTS, np.uint32)
    blut = np.empty(256, np.uint8)
    thr = np.empty(MAX_BUCKETS - 1, np.int64)
    src, words, xs, st = _prepare(buf, lut, blut, thr)
    n = out.size
    if st:
        return -1
    if src == SRC_STREAM0:
        if stream0.size < n:
            return -1
        return _tail(words, lut, blut, xs, out, 0, stream0, 0, 0, n, 2 * LANES)
    return _tail_self(words, lut, blut, xs, out, 0, n, 2 * LANES)


# ---------------------------------------------------------------- encoder


@intrinsic
def _enc16c(typingctx, xs, k, idx, i, ftab, rcp, out, pos):
    """rans32._enc16 with 16-bit symbols idx = bucket << 8 | symbol indexing tables of all buckets; new pos."""
    sig = types.int64(xs, types.int64, idx, types.int64, ftab, rcp, out, types.int64)

    def codegen(context, builder, signature, args):
        xs_a, k, data_a, i, ftab_a, rcp_a, out_a, pos = args
        x_s = context.make_array(signature.args[0])(context, builder, xs_a)
        d_s = context.make_array(signature.args[2])(context, builder, data_a)
        t_s = context.make_array(signature.args[4])(context, builder, ftab_a)
        r_s = context.make_array(signature.args[5])(context, builder, rcp_a)
        o_s = context.make_array(signature.args[6])(context, builder, out_a)
        mod = builder.module
        v32 = ir.VectorType(_i32, V)
        v64 = ir.VectorType(_i64, V)
        vf = ir.VectorType(_f64, V)
        v1 = ir.VectorType(_i1, V)
        v16 = ir.VectorType(_i16, V)

        def splat(c, t=_i64):
            return ir.Constant(ir.VectorType(t, V), [c] * V)

        def bcast(v):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(v64, ir.Undefined), v, ir.Constant(_i32, 0)),
                                          ir.Constant(v64, ir.Undefined), ir.Constant(ir.VectorType(_i32, V), [0] * V))

        xptr = builder.bitcast(builder.gep(x_s.data, [builder.mul(k, ir.Constant(_i64, V))]), v32.as_pointer())
        x = builder.zext(builder.load(xptr, align=4), v64)
        sptr = builder.bitcast(builder.gep(d_s.data, [i]), v16.as_pointer())
        sym = builder.zext(builder.load(sptr, align=2), v64)
        allm = ir.Constant(v1, [1] * V)
        p32 = ir.VectorType(_i32.as_pointer(), V)
        taddr = builder.inttoptr(builder.add(bcast(builder.ptrtoint(t_s.data, _i64)), builder.shl(sym, splat(2))), p32)
        g32 = _decl(mod, "llvm.masked.gather.v16i32.v16p0", v32, [p32, v1, v32])
        e = builder.zext(builder.call(g32, [taddr, allm, ir.Constant(v32, ir.Undefined)]), v64)
        pf = ir.VectorType(_f64.as_pointer(), V)
        raddr = builder.inttoptr(builder.add(bcast(builder.ptrtoint(r_s.data, _i64)), builder.shl(sym, splat(3))), pf)
        gf = _decl(mod, "llvm.masked.gather.v16f64.v16p0", vf, [pf, v1, vf])
        r = builder.call(gf, [raddr, allm, ir.Constant(vf, ir.Undefined)])
        f = builder.and_(e, splat(0xFFFF))
        c = builder.lshr(e, splat(16))
        need = builder.icmp_unsigned(">=", x, builder.shl(f, splat(32 - SCALE_BITS)))
        cnt = builder.zext(builder.call(_decl(mod, "llvm.ctpop.i16", _i16, [_i16]), [builder.bitcast(need, _i16)]), _i64)
        pos = builder.sub(pos, cnt)
        cs = _decl(mod, "llvm.masked.compressstore.v16i16", ir.VoidType(), [v16, _i16.as_pointer(), v1])
        builder.call(cs, [builder.trunc(x, v16), builder.gep(o_s.data, [pos]), need])
        x = builder.select(need, builder.lshr(x, splat(16)), x)
        q = builder.fptoui(builder.fmul(builder.uitofp(x, vf), r), v64)
        rem = builder.sub(x, builder.mul(q, f))
        adj = builder.icmp_unsigned(">=", rem, f)
        q = builder.select(adj, builder.add(q, splat(1)), q)
        rem = builder.select(adj, builder.sub(rem, f), rem)
        xn = builder.add(builder.add(builder.shl(q, splat(SCALE_BITS)), rem), c)
        builder.store(builder.trunc(xn, v32), xptr, align=4)
        return pos

    return sig, codegen


@njit(nogil=True)
def _encode(idx, freq, cum, rcp, out):
    """Encode symbols idx (bucket << 8 | symbol) backwards with the flat tables; return the first word's position."""
    x = np.full(LANES, RANS_L, np.int64)
    pos = out.size
    for i in range(idx.size - 1, -1, -1):
        s = idx[i]
        j = i & (LANES - 1)
        x[j], pos = _enc_step(x[j], freq[s], cum[s], rcp[s], out, pos)
    for j in range(LANES - 1, -1, -1):
        out[pos - 1] = x[j] & 0xFFFF
        out[pos - 2] = x[j] >> 16
        pos -= 2
    return pos


@njit(nogil=True, boundscheck=False)
def _encode_vec(idx, freq, cum, rcp, out):
    """_encode with the vector step for whole groups of 32 symbols (same output)."""
    x = np.full(LANES, RANS_L, np.int64)
    pos = out.size
    n = idx.size
    full = n & ~(LANES - 1)
    for i in range(n - 1, full - 1, -1):
        s = idx[i]
        j = i & (LANES - 1)
        x[j], pos = _enc_step(x[j], freq[s], cum[s], rcp[s], out, pos)
    ftab = np.empty(freq.size, np.uint32)
    for s in range(freq.size):
        ftab[s] = np.uint32(freq[s] | (cum[s] << 16))
    xs = np.empty(LANES, np.uint32)
    for j in range(LANES):
        xs[j] = np.uint32(x[j])
    g = full
    while g > 0:
        g -= LANES
        pos = _enc16c(xs, 1, idx, g + V, ftab, rcp, out, pos)
        pos = _enc16c(xs, 0, idx, g, ftab, rcp, out, pos)
    for j in range(LANES - 1, -1, -1):
        out[pos - 1] = xs[j] & 0xFFFF
        out[pos - 2] = xs[j] >> 16
        pos -= 2
    return pos


_enc_vector: bool | None = None


def _encoder():
    """The vector encoder if it compiles and matches the scalar one on a probe, else the scalar encoder."""
    global _enc_vector
    if _enc_vector is None:
        ok = False
        try:
            idx = ((np.arange(1000) * 7 % 13) | ((np.arange(1000) % 3) << 8)).astype(np.uint16)
            freq = np.zeros(768, np.int64)
            for b in range(3):
                freq[b * 256 : b * 256 + 13] = 315
                freq[b * 256] += 1
            cum = np.zeros(768, np.int64)
            for b in range(3):
                cum[b * 256 + 1 : b * 256 + 256] = np.cumsum(freq[b * 256 : b * 256 + 255])
            rcp = 1.0 / np.maximum(freq, 1)
            a = np.empty(idx.size + 80, np.uint16)
            b2 = np.empty(idx.size + 80, np.uint16)
            pa = _encode(idx, freq, cum, rcp, a)
            pb = _encode_vec(idx, freq, cum, rcp, b2)
            ok = pa == pb and np.array_equal(a[pa:], b2[pb:])
            if not ok:
                log.warning("rans32c: vector encoder disagrees with the reference; using the scalar encoder")
        except Exception as exc:  # noqa: BLE001 - any LLVM/numba failure means: use the portable loop
            log.warning("rans32c: vector encoder unavailable (%s); using the scalar encoder", exc)
        _enc_vector = ok
    return _encode_vec if _enc_vector else _encode


@njit(nogil=True, boundscheck=False)
def bucket_symbols(data, ctx, lag, blut, idx, counts):
    """idx[i] = bucket(context of i) << 8 | data[i] (context: data[i - lag] if lag, 0 before the start, else
    ctx[i]); counts[bucket * 256 + symbol] += 1. Four sub-counters: runs of one value would stall on one."""
    sub = np.zeros((4, counts.size), np.uint32)
    n = data.size
    head = min(lag, n)
    for i in range(head):
        v = (np.int64(blut[0]) << 8) | np.int64(data[i])
        idx[i] = v
        sub[i & 3, v] += 1
    src = data[: max(n - lag, 0)] if lag else ctx
    body = data[head:]
    out = idx[head:]
    n4 = body.size & ~3
    for i in range(0, n4, 4):
        v0 = (np.int64(blut[src[i]]) << 8) | np.int64(body[i])
        v1 = (np.int64(blut[src[i + 1]]) << 8) | np.int64(body[i + 1])
        v2 = (np.int64(blut[src[i + 2]]) << 8) | np.int64(body[i + 2])
        v3 = (np.int64(blut[src[i + 3]]) << 8) | np.int64(body[i + 3])
        out[i] = v0
        out[i + 1] = v1
        out[i + 2] = v2
        out[i + 3] = v3
        sub[0, v0] += 1
        sub[1, v1] += 1
        sub[2, v2] += 1
        sub[3, v3] += 1
    for i in range(n4, body.size):
        v = (np.int64(blut[src[i]]) << 8) | np.int64(body[i])
        out[i] = v
        sub[0, v] += 1
    for v in range(counts.size):
        counts[v] = np.int64(sub[0, v]) + sub[1, v] + sub[2, v] + sub[3, v]


@njit(nogil=True)
def joint_counts(data, ctx, lag, counts):
    """counts[context, symbol]: context = ctx[i] (lag 0) or data[i - lag] (0 before the start)."""
    for i in range(data.size):
        if lag:
            c = data[i - lag] if i >= lag else 0
        else:
            c = ctx[i]
        counts[c, data[i]] += 1


def bucket_freqs(counts: np.ndarray) -> np.ndarray:
    """A valid table for one bucket's counts: normalised, or a two-symbol stand-in for 0 or 1 symbols."""
    present = np.nonzero(counts)[0]
    if present.size >= 2:
        return normalize(counts, int(counts.sum()))
    freq = np.zeros(256, np.int64)
    s = int(present[0]) if present.size else 0
    freq[s] = SLOTS - 1
    freq[s + 1 if s < 255 else s - 1] = 1
    return freq


def table_bytes(freq: np.ndarray) -> int:
    buf = np.empty(TABLE_MAX, np.uint8)
    return int(write_table(freq, buf))


def _blut(thresholds: list[int]) -> np.ndarray:
    blut = np.zeros(256, np.uint8)
    for t in thresholds:
        blut[t:] += 1
    return blut


def encode(data: np.ndarray, source: int, ctx: np.ndarray | None, thresholds: list[int],
           freqs: list[np.ndarray], idx: np.ndarray | None = None) -> bytes:
    """Method-7 stream of data with len(thresholds) + 1 bucket tables freqs (context: own symbol 32 earlier for
    source 0, ctx[i] for source 1); idx from bucket_symbols if the caller has it."""
    nb = len(thresholds) + 1
    if idx is None:
        idx = np.empty(data.size, np.uint16)
        bucket_symbols(data, ctx if ctx is not None else data, LANES if source == SRC_SELF else 0, _blut(thresholds),
                       idx, np.zeros(nb * 256, np.int64))
    freq = np.concatenate(freqs).astype(np.int64)
    cum = np.zeros(nb * 256, np.int64)
    for b in range(nb):
        cum[b * 256 + 1 : (b + 1) * 256] = np.cumsum(freq[b * 256 : (b + 1) * 256 - 1])
    rcp = 1.0 / np.maximum(freq, 1)
    out = np.empty(data.size + 2 * LANES + 8, np.uint16)
    pos = _encoder()(idx, freq, cum, rcp, out)
    head = bytearray([source, len(thresholds), *thresholds])
    tab = np.empty(TABLE_MAX, np.uint8)
    for f in freqs:
        head += tab[: write_table(f, tab)].tobytes()
    return bytes(head) + out[pos:].astype("<u2").tobytes()


# ---------------------------------------------------------------- chooser (not part of the format)

MIN_SYMBOLS = 16384  # shorter streams cannot pay for the extra tables and the 32-state flush


SAMPLE_STEP = 16
SAMPLE_MIN_GAIN = 64  # bytes per bucket (its table and what the sample misses) the sample must promise


@njit(nogil=True)
def _sample_counts(data, ctx, lag, blut, step, counts):
    for i in range(0, data.size, step):
        if lag:
            c = data[i - lag] if i >= lag else 0
        else:
            c = ctx[i]
        counts[(np.int64(blut[c]) << 8) | np.int64(data[i])] += 1


def _entropy_bits(c: np.ndarray) -> float:
    c = c[c > 0]
    n = c.sum()
    return float((c * np.log2(n / c)).sum()) if n else 0.0


def _quantiles(hist: np.ndarray) -> list[int]:
    """Thresholds splitting the contexts' mass into quarters (within 0.0001 of a greedy search on the corpus
    checkpoint, at a fraction of its cost)."""
    cs = np.cumsum(hist)
    if cs[-1] == 0:
        return []
    th = {int(np.searchsorted(cs, cs[-1] * q, side="right")) for q in (0.25, 0.5, 0.75)}
    return sorted(t for t in th if 0 < t < 256)


def plan(data: np.ndarray, source: int, ctx: np.ndarray | None):
    """(thresholds, bucket tables, estimated bytes, idx) of method 7 for data, or None when it cannot pay."""
    if data.size < MIN_SYMBOLS:
        return None
    src = data if source == SRC_SELF else ctx
    from .rans import histogram

    thresholds = _quantiles(histogram(np.ascontiguousarray(src[::16])))
    if not thresholds:
        return None
    nb = len(thresholds) + 1
    blut = _blut(thresholds)
    lag = LANES if source == SRC_SELF else 0
    # a 1-in-16 sample first (lag 32 keeps its contexts): most weight planes gain too little to pay for the
    # extra tables and flush, and the full pass below costs about as much as coding the plane
    sample = np.zeros(nb * 256, np.int64)
    _sample_counts(data, src, lag, blut, SAMPLE_STEP, sample)
    per = sample.reshape(nb, 256)
    gain = _entropy_bits(per.sum(0)) - sum(_entropy_bits(row) for row in per)
    if gain * SAMPLE_STEP / 8 < SAMPLE_MIN_GAIN * nb + FLUSH:
        return None
    idx = np.empty(data.size, np.uint16)
    counts = np.zeros(nb * 256, np.int64)
    bucket_symbols(data, src, lag, blut, idx, counts)
    size = 2.0 + len(thresholds) + FLUSH
    freqs = []
    for b in range(nb):
        c = counts[b * 256 : (b + 1) * 256]
        freq = bucket_freqs(c)
        present = c > 0
        size += float((c[present] * (SCALE_BITS - np.log2(freq[present]))).sum()) / 8 + table_bytes(freq)
        freqs.append(freq)
    return thresholds, freqs, size, idx
