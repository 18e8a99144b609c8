"""Encoders of the 32-lane rANS formats (stream methods 5 and 6, docs/codecs.md): scalar and vector (LLVM IR).

The formats, their tables and the decoders are in rans32.py.
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

log = logging.getLogger(__name__)

_i1, _i8, _i16, _i32, _i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
_f64 = ir.DoubleType()


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


@intrinsic
def _enc16(typingctx, xs, k, data, i, ftab, rcp, out, pos):
    """Encode symbols data[i+j] into states xs[16k+j], j < 16 (one vector step, words pushed below pos); new pos."""
    sig = types.int64(xs, types.int64, data, types.int64, ftab, rcp, out, types.int64)

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

        xptr = builder.bitcast(builder.gep(x_s.data, [builder.mul(k, ir.Constant(_i64, V))]), v32.as_pointer())
        x = builder.zext(builder.load(xptr, align=4), v64)
        sptr = builder.bitcast(builder.gep(d_s.data, [i]), ir.VectorType(_i8, V).as_pointer())
        sym = builder.zext(builder.load(sptr, align=1), v64)
        allm = ir.Constant(v1, [1] * V)
        # gathers: packed freq | cum << 16, and the float reciprocal of freq
        p32 = ir.VectorType(_i32.as_pointer(), V)
        tbase = builder.ptrtoint(t_s.data, _i64)
        rbase = builder.ptrtoint(r_s.data, _i64)

        def bcast(v):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(v64, ir.Undefined), v, ir.Constant(_i32, 0)),
                                          ir.Constant(v64, ir.Undefined), ir.Constant(ir.VectorType(_i32, V), [0] * V))
        taddr = builder.inttoptr(builder.add(bcast(tbase), builder.shl(sym, splat(2))), p32)
        g32 = _decl(mod, "llvm.masked.gather.v16i32.v16p0", v32, [p32, v1, v32])
        e = builder.zext(builder.call(g32, [taddr, allm, ir.Constant(v32, ir.Undefined)]), v64)
        pf = ir.VectorType(_f64.as_pointer(), V)
        raddr = builder.inttoptr(builder.add(bcast(rbase), builder.shl(sym, splat(3))), pf)
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


@njit(nogil=True, boundscheck=False)
def _encode_vec(data, freq, cum, rcp, out, x0):
    """_encode with the vector step for whole groups of 32 symbols (same output)."""
    x = np.empty(LANES, np.int64)
    for j in range(LANES):
        x[j] = x0[j]
    pos = out.size
    n = data.size
    full = n & ~(LANES - 1)
    for i in range(n - 1, full - 1, -1):  # the partial last group, symbol by symbol
        s = data[i]
        j = i & (LANES - 1)
        x[j], pos = _enc_step(x[j], freq[s], cum[s], rcp[s], out, pos)
    ftab = np.empty(256, np.uint32)
    for s in range(256):
        ftab[s] = np.uint32(freq[s] | (cum[s] << 16))
    xs = np.empty(LANES, np.uint32)
    for j in range(LANES):
        xs[j] = np.uint32(x[j])
    g = full
    while g > 0:
        g -= LANES
        pos = _enc16(xs, 1, data, g + V, ftab, rcp, out, pos)
        pos = _enc16(xs, 0, data, g, ftab, rcp, out, pos)
    for j in range(LANES - 1, -1, -1):
        out[pos - 1] = xs[j] & 0xFFFF
        out[pos - 2] = xs[j] >> 16
        pos -= 2
    return pos


_enc_vector: bool | None = None


def _encoder():
    """The vector encoder if its IR compiles and gives the scalar encoder's output on a probe, else the scalar one."""
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
            rcp = 1.0 / np.maximum(freq, 1)
            x0 = RANS_L + (np.arange(LANES, dtype=np.int64) * 40503)
            a = np.empty(data.size + 80, np.uint16)
            b = np.empty(data.size + 80, np.uint16)
            pa = _encode(data, freq, cum, rcp, a, x0)
            pb = _encode_vec(data, freq, cum, rcp, b, x0)
            ok = pa == pb and np.array_equal(a[pa:], b[pb:])
            if not ok:
                log.warning("rans32: vector encoder disagrees with the reference; using the scalar encoder")
        except Exception as exc:  # noqa: BLE001 - any LLVM/numba failure means: use the portable loop
            log.warning("rans32: vector encoder unavailable (%s); using the scalar encoder", exc)
        _enc_vector = ok
    return _encode_vec if _enc_vector else _encode


# ---------------------------------------------------------------- method 6: payload in the end states, 1 or 2 parts

KMAX = 16  # encoder cap on the symbols per lane carried in the end states (the format allows any K with 32K <= m)
_Y_LIMIT = (1 << 32) - RANS_L  # RANS_L + y must stay a valid 32-bit state


@njit(nogil=True)
def _tail_payload(data, freq, cum, kmax, y):
    """Code the last K symbols of every lane into y[lane] (rANS steps from 0, no renormalisation) for the largest
    K <= kmax that keeps every y < _Y_LIMIT; return K. Lane of symbol i is i mod 32, as in the main phase."""
    m = data.size
    kmax = min(kmax, m // LANES)
    trial = np.empty(LANES, np.int64)
    for j in range(LANES):
        y[j] = 0
    k = 0
    while k < kmax:
        base = m - LANES * (k + 1)
        for t in range(LANES):
            i = base + t
            j = i & (LANES - 1)
            s = data[i]
            f = freq[s]
            v = y[j]
            nv = ((v // f) << SCALE_BITS) + v % f + cum[s]
            if nv >= _Y_LIMIT:
                return k
            trial[j] = nv
        for j in range(LANES):
            y[j] = trial[j]
        k += 1
    return k


def encode_ext(data: np.ndarray, freq: np.ndarray, parts: int = 1) -> bytes:
    """Method 6 (docs/codecs.md): u8 parts, u8 K per part, table, [varint words of part A], words per part."""
    cum = np.zeros(256, np.int64)
    np.cumsum(freq[:-1], out=cum[1:])
    rcp = 1.0 / np.maximum(freq, 1)
    n = data.size
    h = n if parts == 1 else (n + 1) >> 1
    ks, blobs = [], []
    for part in ((data,) if parts == 1 else (data[:h], data[h:])):
        y = np.empty(LANES, np.int64)
        k = int(_tail_payload(part, freq, cum, KMAX, y))
        out = np.empty(part.size + 2 * LANES + 8, np.uint16)
        pos = _encoder()(part[: part.size - LANES * k], freq, cum, rcp, out, y + RANS_L)
        ks.append(k)
        blobs.append(out[pos:].astype("<u2").tobytes())
    tab = np.empty(TABLE_MAX, np.uint8)
    tlen = write_table(freq, tab)
    head = bytearray([parts, *ks])
    head += tab[:tlen].tobytes()
    if parts == 2:
        v = len(blobs[0]) // 2
        while v >= 0x80:
            head.append((v & 0x7F) | 0x80)
            v >>= 7
        head.append(v)
    return bytes(head) + b"".join(blobs)
