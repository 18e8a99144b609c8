"""Encoder kernels of the 32-lane rANS formats (stream methods 5 and 6, docs/codecs.md): scalar and vector (LLVM
IR), two streams at a time; method 5 streams.

The formats, their tables and the decoders are in rans32.py (method 6: rans32e.py); method-6 streams are put
together in rans32e_enc.py.
"""
from __future__ import annotations

import logging

from ._jit import njit
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .rans import RANS_L, SCALE_BITS, _enc_step
from .rans32 import LANES, TABLE_MAX, V, _decl, write_table
from .rans32_loop import AVX512_HOST

log = logging.getLogger(__name__)

_i1, _i8, _i16, _i32, _i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
_f64 = ir.DoubleType()
_f32 = ir.FloatType()


# ---------------------------------------------------------------- encoder


@njit(nogil=True)
def _encode(data, freq, cum, rcp, out, x0):
    """Encode data backwards from the lane states x0 (RANS_L, or RANS_L + tail payload for method 6)."""
    x = np.empty(LANES, np.int64)
    for j in range(LANES):
        x[j] = x0[j]
    pos = out.size
    for i in range(data.size - 1, -1, -1):
        s = data[i]
        j = i & (LANES - 1)
        x[j], pos = _enc_step(x[j], freq[s], cum[s], rcp[s], out, pos)
    for j in range(LANES - 1, -1, -1):
        out[pos - 1] = x[j] & 0xFFFF
        out[pos - 2] = x[j] >> 16
        pos -= 2
    return pos


def encode(data: np.ndarray, freq: np.ndarray) -> bytes:
    """Code uint8 data with freq (from rans.normalize, >= 2 symbols): table + little-endian u16 words."""
    cum = np.zeros(256, np.int64)
    np.cumsum(freq[:-1], out=cum[1:])
    out = np.empty(data.size + 2 * LANES + 8, np.uint16)
    rcp = 1.0 / np.maximum(freq, 1)
    pos = _encoder()(data, freq, cum, rcp, out, np.full(LANES, RANS_L, np.int64))
    tab = np.empty(TABLE_MAX, np.uint8)
    tlen = write_table(freq, tab)
    return tab[:tlen].tobytes() + out[pos:].astype("<u2").tobytes()


def _vgep(builder, ptr, idx, etype):
    """getelementptr with a vector of i32 indices (llvmlite's gep cannot type it): lets LLVM emit one
    dword-indexed gather for 16 lanes instead of two qword-indexed ones."""
    instr = ir.instructions.GEPInstr(builder.block, ptr, [idx], inbounds=True, name="", source_etype=etype)
    instr.type = ir.VectorType(ptr.type, V)
    builder._insert(instr)
    return instr


def _step_ir(builder, x_s, k, e, r, o_s, pos):
    """IR of one vector step from the table entries of the 16 symbols (e = freq | cum << 16, r = float32 1/freq)
    into states xs[16k+j]: renormalise (the words go below pos), x = (x // f << 12) + x % f + cum; new pos.
    Everything stays in 32-bit lanes, one vector register (64-bit lanes cost 30% more time), the quotient
    included: float32 x * r is within 3/16 of x / f (x < f << 20 after renormalisation, three roundings of
    2^-24), so its truncation is off by at most one either way, which one correction each way repairs (18%
    faster than the quotient in float64)."""
    mod = builder.module
    v32 = ir.VectorType(_i32, V)
    vf32 = ir.VectorType(_f32, V)
    v1 = ir.VectorType(_i1, V)
    v16 = ir.VectorType(_i16, V)

    def splat(c):
        return ir.Constant(v32, [c] * V)

    xptr = builder.bitcast(builder.gep(x_s.data, [builder.mul(k, ir.Constant(_i64, V))]), v32.as_pointer())
    x = builder.load(xptr, align=4)
    f = builder.and_(e, splat(0xFFFF))
    c = builder.lshr(e, splat(16))
    need = builder.icmp_unsigned(">=", x, builder.shl(f, splat(32 - SCALE_BITS)))
    cnt = builder.zext(builder.call(_decl(mod, "llvm.ctpop.i16", _i16, [_i16]), [builder.bitcast(need, _i16)]), _i64)
    pos = builder.sub(pos, cnt)
    cs = _decl(mod, "llvm.masked.compressstore.v16i16", ir.VoidType(), [v16, _i16.as_pointer(), v1])
    builder.call(cs, [builder.trunc(x, v16), builder.gep(o_s.data, [pos]), need])
    x = builder.select(need, builder.lshr(x, splat(16)), x)
    q = builder.fptoui(builder.fmul(builder.uitofp(x, vf32), r), v32)
    rem = builder.sub(x, builder.mul(q, f))  # in [-f, 2f): exact as a signed 32-bit value
    neg = builder.icmp_signed("<", rem, splat(0))
    q = builder.select(neg, builder.sub(q, splat(1)), q)
    rem = builder.select(neg, builder.add(rem, f), rem)
    adj = builder.icmp_unsigned(">=", rem, f)
    q = builder.select(adj, builder.add(q, splat(1)), q)
    rem = builder.select(adj, builder.sub(rem, f), rem)
    builder.store(builder.add(builder.add(builder.shl(q, splat(SCALE_BITS)), rem), c), xptr, align=4)
    return pos


def _load_symbols(builder, d_s, i):
    sptr = builder.bitcast(builder.gep(d_s.data, [i]), ir.VectorType(_i8, V).as_pointer())
    return builder.zext(builder.load(sptr, align=1), ir.VectorType(_i32, V))


@intrinsic
def _enc16(typingctx, xs, k, data, i, ftab, rcp, out, pos):
    """Encode symbols data[i+j] into states xs[16k+j], j < 16 (one vector step, words pushed below pos); new pos.
    ftab[s] = freq | cum << 16 and rcp = _rcp32(freq) are gathered."""
    sig = types.int64(xs, types.int64, data, types.int64, ftab, rcp, out, types.int64)

    def codegen(context, builder, signature, args):
        x_s, d_s, t_s, r_s, o_s = (context.make_array(signature.args[n])(context, builder, args[n])
                                   for n in (0, 2, 4, 5, 6))
        k, i, pos = args[1], args[3], args[7]
        return gather_step_ir(builder, x_s, k, _load_symbols(builder, d_s, i), t_s, r_s, o_s, pos)

    return sig, codegen


def gather_step_ir(builder, x_s, k, sym, t_s, r_s, o_s, pos):
    """_step_ir with the table entries of the 16 symbols sym (i32 lanes) gathered from ftab and the float32 rcp."""
    mod = builder.module
    v32 = ir.VectorType(_i32, V)
    vf32 = ir.VectorType(_f32, V)
    v1 = ir.VectorType(_i1, V)
    allm = ir.Constant(v1, [1] * V)
    g32 = _decl(mod, "llvm.masked.gather.v16i32.v16p0", v32, [ir.VectorType(_i32.as_pointer(), V), v1, v32])
    e = builder.call(g32, [_vgep(builder, t_s.data, sym, _i32), allm, ir.Constant(v32, ir.Undefined)])
    gf = _decl(mod, "llvm.masked.gather.v16f32.v16p0", vf32, [ir.VectorType(_f32.as_pointer(), V), v1, vf32])
    r = builder.call(gf, [_vgep(builder, r_s.data, sym, _f32), allm, ir.Constant(vf32, ir.Undefined)])
    return _step_ir(builder, x_s, k, e, r, o_s, pos)


@intrinsic
def _enc16p(typingctx, xs, k, data, i, lo, ftab, rcp, out, pos):
    """_enc16 for symbols in lo..lo+31, whose 32 table entries (ftab, rcp from lo) are picked by two-register
    permutes instead of gathers (bf16 exponents: 13% faster coding of both streams); gathered from those 32 entries
    where the CPU has no AVX-512."""
    sig = types.int64(xs, types.int64, data, types.int64, types.int64, ftab, rcp, out, types.int64)

    def codegen(context, builder, signature, args):
        x_s, d_s, t_s, r_s, o_s = (context.make_array(signature.args[n])(context, builder, args[n])
                                   for n in (0, 2, 5, 6, 7))
        k, i, lo, pos = args[1], args[3], args[4], args[8]
        mod = builder.module
        v32 = ir.VectorType(_i32, V)
        vf32 = ir.VectorType(_f32, V)
        lov = builder.insert_element(ir.Constant(v32, ir.Undefined), builder.trunc(lo, _i32), ir.Constant(_i32, 0))
        lov = builder.shuffle_vector(lov, ir.Constant(v32, ir.Undefined), ir.Constant(v32, [0] * V))
        idx = builder.sub(_load_symbols(builder, d_s, i), lov)
        if not AVX512_HOST:
            return gather_step_ir(builder, x_s, k, idx, t_s, r_s, o_s, pos)

        def halves(arr, t):
            return [builder.load(builder.bitcast(builder.gep(arr.data, [ir.Constant(_i64, h)]), t.as_pointer()), align=4)
                    for h in (0, V)]

        t0, t1 = halves(t_s, v32)
        r0, r1 = halves(r_s, vf32)
        e = builder.call(_decl(mod, "llvm.x86.avx512.vpermi2var.d.512", v32, [v32, v32, v32]), [t0, idx, t1])
        r = builder.call(_decl(mod, "llvm.x86.avx512.vpermi2var.ps.512", vf32, [vf32, v32, vf32]), [r0, idx, r1])
        return _step_ir(builder, x_s, k, e, r, o_s, pos)

    return sig, codegen


@njit(nogil=True, inline="always")
def _scalar_tail(data, freq, cum, x0, out, x, ftab):
    """Lane states from x0, the partial last group coded symbol by symbol, the vector table; (full, pos)."""
    rcp = 1.0 / np.maximum(freq, 1)
    st = np.empty(LANES, np.int64)
    for j in range(LANES):
        st[j] = x0[j]
    pos = out.size
    n = data.size
    full = n & ~(LANES - 1)
    for i in range(n - 1, full - 1, -1):
        s = data[i]
        j = i & (LANES - 1)
        st[j], pos = _enc_step(st[j], freq[s], cum[s], rcp[s], out, pos)
    for j in range(LANES):
        x[j] = np.uint32(st[j])
    for s in range(256):
        ftab[s] = np.uint32(freq[s] | (cum[s] << 16))
    return full, pos


@njit(nogil=True, inline="always")
def _flush(x, out, pos):
    for j in range(LANES - 1, -1, -1):
        out[pos - 1] = x[j] & 0xFFFF
        out[pos - 2] = x[j] >> 16
        pos -= 2
    return pos


@njit(nogil=True, inline="always")
def _narrow(freq, ftab, rcp, tp, rp):
    """The first symbol of freq if all its symbols lie in 32 consecutive values, with their entries in tp / rp
    (permute tables of _enc16p); else -1."""
    lo = 0
    while lo < 256 and freq[lo] == 0:
        lo += 1
    hi = 255
    while hi > lo and freq[hi] == 0:
        hi -= 1
    if hi - lo >= 32:
        return -1
    for t in range(32):
        s = min(lo + t, 255)
        tp[t] = ftab[s]
        rp[t] = rcp[s]
    return lo


@njit(nogil=True, boundscheck=False)
def _encode_pair(da, fa, ca, xa0, oa, db, fb, cb, xb0, ob):
    """Encode two streams (data, freq, cum, initial states, out: words end at out.size) in one loop,
    four independent vector chains; (first word of a, first word of b). Either may be empty (then it writes only
    its 32 states). Stream a's tables are permuted instead of gathered when its alphabet spans <= 32 values
    (callers put such a stream first)."""
    xa = np.empty(LANES, np.uint32)
    xb = np.empty(LANES, np.uint32)
    ta = np.empty(256, np.uint32)
    tb = np.empty(256, np.uint32)
    ra = _rcp32(fa)
    rb = _rcp32(fb)
    ga, pa = _scalar_tail(da, fa, ca, xa0, oa, xa, ta)
    gb, pb = _scalar_tail(db, fb, cb, xb0, ob, xb, tb)
    tp = np.empty(32, np.uint32)
    rp = np.empty(32, np.float32)
    lo = _narrow(fa, ta, ra, tp, rp) if ga > 0 else -1
    if lo >= 0:
        while ga > 0 and gb > 0:
            ga -= LANES
            gb -= LANES
            pa = _enc16p(xa, 1, da, ga + V, lo, tp, rp, oa, pa)
            pb = _enc16(xb, 1, db, gb + V, tb, rb, ob, pb)
            pa = _enc16p(xa, 0, da, ga, lo, tp, rp, oa, pa)
            pb = _enc16(xb, 0, db, gb, tb, rb, ob, pb)
        while ga > 0:
            ga -= LANES
            pa = _enc16p(xa, 1, da, ga + V, lo, tp, rp, oa, pa)
            pa = _enc16p(xa, 0, da, ga, lo, tp, rp, oa, pa)
    while ga > 0 and gb > 0:
        ga -= LANES
        gb -= LANES
        pa = _enc16(xa, 1, da, ga + V, ta, ra, oa, pa)
        pb = _enc16(xb, 1, db, gb + V, tb, rb, ob, pb)
        pa = _enc16(xa, 0, da, ga, ta, ra, oa, pa)
        pb = _enc16(xb, 0, db, gb, tb, rb, ob, pb)
    while ga > 0:
        ga -= LANES
        pa = _enc16(xa, 1, da, ga + V, ta, ra, oa, pa)
        pa = _enc16(xa, 0, da, ga, ta, ra, oa, pa)
    while gb > 0:
        gb -= LANES
        pb = _enc16(xb, 1, db, gb + V, tb, rb, ob, pb)
        pb = _enc16(xb, 0, db, gb, tb, rb, ob, pb)
    return _flush(xa, oa, pa), _flush(xb, ob, pb)


@njit(nogil=True)
def _encode_pair_scalar(da, fa, ca, xa0, oa, db, fb, cb, xb0, ob):
    """_encode_pair without the vector step (same output)."""
    ra64 = 1.0 / np.maximum(fa, 1)
    rb64 = 1.0 / np.maximum(fb, 1)
    return _encode(da, fa, ca, ra64, oa, xa0), _encode(db, fb, cb, rb64, ob, xb0)


@njit(nogil=True, boundscheck=False)
def _encode_vec(data, freq, cum, rcp, out, x0):
    """_encode with the vector step for whole groups of 32 symbols (same output; rcp is unused)."""
    pa, _ = _encode_pair(data, freq, cum, x0, out, data[:0], freq, cum, x0, np.empty(2 * LANES, np.uint16))
    return pa


@njit(nogil=True)
def _rcp32(freq):
    """float32 reciprocals of freq (nearest) for the vector step's quotient."""
    r = np.empty(freq.size, np.float32)
    for s in range(freq.size):
        r[s] = np.float32(1.0 / max(freq[s], 1))
    return r


_enc_vector: bool | None = None


def vector_ok() -> bool:
    """Whether the vector encoder compiles and gives the scalar encoder's output on a probe (once per process)."""
    global _enc_vector
    if _enc_vector is None:
        ok = False
        try:
            data = (np.arange(1000) * 7 % 13).astype(np.uint8)
            freq = np.zeros(256, np.int64)
            freq[:13] = 315
            freq[0] += 1
            cum = np.zeros(256, np.int64)
            np.cumsum(freq[:-1], out=cum[1:])
            x0 = RANS_L + (np.arange(LANES, dtype=np.int64) * 40503)
            a, b, c, d = (np.empty(data.size + 80, np.uint16) for _ in range(4))
            got = _encode_pair(data, freq, cum, x0, a, data[:777], freq, cum, x0, b)
            want = _encode_pair_scalar(data, freq, cum, x0, c, data[:777], freq, cum, x0, d)
            ok = got == want and np.array_equal(a[got[0]:], c[want[0]:]) and np.array_equal(b[got[1]:], d[want[1]:])
            if not ok:
                log.warning("rans32: vector encoder disagrees with the reference; using the scalar encoder")
        except Exception as exc:  # noqa: BLE001 - any LLVM/numba failure means: use the portable loop
            log.warning("rans32: vector encoder unavailable (%s); using the scalar encoder", exc)
        _enc_vector = ok
    return _enc_vector


def _encoder():
    """The single-stream encoder (method 5): vector if vector_ok(), else scalar."""
    return _encode_vec if vector_ok() else _encode
