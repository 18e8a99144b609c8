"""The vector decoding loops of stream methods 5-7 as LLVM IR (lane states in registers across rounds), and the
IR helpers the other vector kernels share.

Why: a 16-lane step is one chain of dependent instructions (gather, multiply, compare, expand-load), so the
decoders are bound by its latency, not by throughput. The former rans32._round16 (one step per call) loaded and
stored the states from memory at every step (a store-forwarding delay on every chain), and rans32c._round16c read
its context bytes back from the output it had just written. Here one loop runs up to two streams at once (four
chains in flight) and keeps states, word positions and context symbols in registers; it writes the decoded
symbols, or for the usual chunk shapes the merged elements themselves (no plane pass). The callers finish each
stream with the checked scalar tails of rans32.py, rans32c.py and rans32e.py, exactly as before: same format,
same bytes, same streams refused.
"""
from __future__ import annotations

import logging

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import config as numba_config
from numba.extending import intrinsic

from .rans import RANS_L, SCALE_BITS

log = logging.getLogger(__name__)

LANES = 32  # states of methods 5-7
V = 16  # lanes per vector step
SLOTS = 1 << SCALE_BITS

# Whether the kernels may call AVX-512 intrinsics (the register expand below, rans32_enc's two-register permute).
# Elsewhere they take the portable IR, which LLVM lowers to what the CPU has: an x86 intrinsic the CPU lacks makes
# LLVM abort the whole process ("Do not know how to split the result of this operator"), which no try can catch.
# numba keys its cache on the CPU. NUMBA_CPU_NAME / NUMBA_CPU_FEATURES compile for another CPU than this one
# (portable caches): portable then.
AVX512_HOST = (not (numba_config.CPU_NAME or numba_config.CPU_FEATURES)
               and bool(llvm.get_host_cpu_features().get("avx512f", False)))
THRESHOLDS = 3  # method 7: at most 3 thresholds (4 buckets); unused ones are 256, which no byte reaches

_i1, _i8, _i16, _i32, _i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
_vt = ir.VectorType(_i32, V)
_v1 = ir.VectorType(_i1, V)
_v8 = ir.VectorType(_i8, V)
_v16 = ir.VectorType(_i16, V)


def gather_ptrs(builder, base, idx):
    """<16 x i32*> = base + idx (a vector GEP: LLVM then emits one vpgatherdd with 32-bit indices, where
    ptrtoint arithmetic gave two vpgatherqd on 64-bit addresses)."""
    gep = ir.GEPInstr(builder.block, base, [idx], False, "", source_etype=base.type.pointee)
    gep.type = ir.VectorType(base.type, V)
    builder._insert(gep)
    return gep


def _decl(module, name, ret, args):
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, ir.FunctionType(ret, args), name=name)


def _splat(c):
    return ir.Constant(_vt, [c] * V)


def _bcast(builder, val):
    vec = builder.insert_element(ir.Constant(_vt, ir.Undefined), val, ir.Constant(_i32, 0))
    return builder.shuffle_vector(vec, ir.Constant(_vt, ir.Undefined), ir.Constant(_vt, [0] * V))


def _step(builder, s, x, p, ctx, i, store=True):
    """One 16-lane step of stream s (dict of its arrays) with states x at word position p; the symbols go to
    out[i:i+16] if store. Returns (new states, new position, the symbols as i32 lanes)."""
    mod = builder.module
    slot = builder.and_(x, _splat(SLOTS - 1))
    idx = slot
    if ctx is not None:
        bucket = _splat(0)
        for thr in s["thr"]:
            bucket = builder.add(bucket, builder.zext(builder.icmp_unsigned(">=", ctx, thr), _vt))
        idx = builder.or_(builder.shl(bucket, _splat(SCALE_BITS)), slot)
    gather = _decl(mod, "llvm.masked.gather.v16i32.v16p0", _vt, [ir.VectorType(_i32.as_pointer(), V), _v1, _vt])
    e = builder.call(gather, [gather_ptrs(builder, s["lut"], idx), ir.Constant(_v1, [1] * V),
                              ir.Constant(_vt, ir.Undefined)])
    if store:
        optr = builder.bitcast(builder.gep(s["out"], [i]), _v8.as_pointer())
        builder.store(builder.trunc(e, _v8), optr, align=1)
    f = builder.and_(builder.lshr(e, _splat(8)), _splat(SLOTS - 1))
    q = builder.mul(f, builder.lshr(x, _splat(SCALE_BITS)))
    if ctx is None:  # rans32.build_lut: the table holds slot - cum
        x = builder.add(q, builder.lshr(e, _splat(20)))
    else:  # method 7 (rans32.build_lut(..., offsets=False)): the table holds cum
        x = builder.sub(builder.add(q, slot), builder.lshr(e, _splat(20)))
    need = builder.icmp_unsigned("<", x, _splat(RANS_L))
    if AVX512_HOST:
        # the next 16 words are loaded and widened before the mask is known (the round bound leaves 32 words);
        # only the register expand (a few cycles) waits for it, where the expand-load from memory took ~10
        ahead = builder.load(builder.bitcast(builder.gep(s["words"], [p]), _v16.as_pointer()), align=2)
        expand = _decl(mod, "llvm.x86.avx512.mask.expand.v16i32", _vt, [_vt, _vt, _v1])
        w = builder.call(expand, [builder.zext(ahead, _vt), _splat(0), need])
    else:
        expand = _decl(mod, "llvm.masked.expandload.v16i16", _v16, [_i16.as_pointer(), _v1, _v16])
        w = builder.zext(builder.call(expand, [builder.gep(s["words"], [p]), need, ir.Constant(_v16, [0] * V)]), _vt)
    # shift under the mask while the words load, then one or (the lanes not renormalised got zero words):
    # LLVM turned the select of (x << 16) | w into a word permute that sat on every chain with a longer latency
    x = builder.or_(builder.select(need, builder.shl(x, _splat(16)), x), w)
    ctpop = _decl(mod, "llvm.ctpop.i16", _i16, [_i16])
    p = builder.add(p, builder.zext(builder.call(ctpop, [builder.bitcast(need, _i16)]), _i64))
    return x, p, builder.and_(e, _splat(0xFF))


def _store_bf16(builder, u16, i, exp, sm):
    """u16[i:i+16] = the bf16 elements of exponents exp and sign|mantissa bytes sm (i32 lanes; fields.py)."""
    u = builder.or_(builder.shl(exp, _splat(7)),
                    builder.or_(builder.shl(builder.and_(sm, _splat(0x80)), _splat(8)), builder.and_(sm, _splat(0x7F))))
    optr = builder.bitcast(builder.gep(u16, [i]), _v16.as_pointer())
    builder.store(builder.trunc(u, _v16), optr, align=2)


def _store_f32(builder, u32, i, exp, sm, m1, m0):
    """u32[i:i+16] = the f32 elements of exponents exp, sign|mantissa-top bytes sm (i32 lanes) and the mantissa
    bytes m1[i:i+16], m0[i:i+16] (raw planes; fields.py)."""
    def plane(ptr):
        return builder.zext(builder.load(builder.bitcast(builder.gep(ptr, [i]), _v8.as_pointer()), align=1), _vt)

    u = builder.or_(builder.shl(exp, _splat(23)), builder.shl(builder.and_(sm, _splat(0x80)), _splat(24)))
    u = builder.or_(u, builder.shl(builder.and_(sm, _splat(0x7F)), _splat(16)))
    u = builder.or_(u, builder.or_(builder.shl(plane(m1), _splat(8)), plane(m0)))
    builder.store(u, builder.bitcast(builder.gep(u32, [i]), _vt.as_pointer()), align=4)


def _store_f32_coded(builder, u32, i, exp, sm, m1, m0):
    """u32[i:i+16] = the f32 elements of four decoded fields (i32 lanes: exponents, sign|mantissa-top bytes, the
    two mantissa bytes)."""
    u = builder.or_(builder.shl(exp, _splat(23)), builder.shl(builder.and_(sm, _splat(0x80)), _splat(24)))
    u = builder.or_(u, builder.shl(builder.and_(sm, _splat(0x7F)), _splat(16)))
    u = builder.or_(u, builder.or_(builder.shl(m1, _splat(8)), m0))
    builder.store(u, builder.bitcast(builder.gep(u32, [i]), _vt.as_pointer()), align=4)


def _store_f16(builder, u16, i, hi, lo):
    """u16[i:i+16] = the f16 elements of high bytes hi (i32 lanes) and the raw low bytes lo[i:i+16]."""
    low = builder.zext(builder.load(builder.bitcast(builder.gep(lo, [i]), _v8.as_pointer()), align=1), _vt)
    u = builder.or_(builder.shl(hi, _splat(8)), low)
    builder.store(builder.trunc(u, _v16), builder.bitcast(builder.gep(u16, [i]), _v16.as_pointer()), align=2)


def _emit_loop(context, builder, signature, args, with_ctx, merge=None):
    """Codegen of the loops below. args: per stream lut, words, xs, out (+ thr, ctx0 where with_ctx[s]), then
    the merge target (merge "bf16": a uint16 output; "f32": a uint32 output and the raw planes m1, m0; "f32x4": a
    uint32 output of four decoded streams; "f16": per stream a uint16 output and its raw low bytes; or an object with
    targets, extra_state and store(builder, targets, i, symbols, extras)), then state = [i, n, p of each stream,
    the merge's extra values]; runs rounds of 32
    symbols per stream while i + 32 <= n and every stream has 32 words left, writes back states, positions and i;
    returns i. With bf16 / f32 the two streams are a class's first two (exponents, sign|mantissa bytes), with f16
    the two parts of an f16 class's high bytes; they are merged into the output instead of stored."""
    streams = []
    pos = 0
    for has_ctx in with_ctx:
        n_args = 6 if has_ctx else 4
        arrs = [context.make_array(t)(context, builder, a)
                for t, a in zip(signature.args[pos : pos + n_args], args[pos : pos + n_args])]
        s = {"lut": arrs[0].data, "words": arrs[1].data, "nw": arrs[1].nitems, "xs": arrs[2].data, "out": arrs[3].data}
        if has_ctx:
            s["thr"] = [_bcast(builder, builder.trunc(builder.load(builder.gep(arrs[4].data, [ir.Constant(_i64, t)])),
                                                      _i32)) for t in range(THRESHOLDS)]
            s["ctx0"] = arrs[5].data
        streams.append(s)
        pos += n_args
    targets = []
    custom = hasattr(merge, "store")  # a merge of another module (joint_loop): its targets, extra state, store
    for _ in range(merge.targets if custom else
                   {None: 0, "bf16": 1, "bf16x2": 2, "f32": 3, "f32x2": 6, "f32x4": 1, "f16": 4}[merge]):
        targets.append(context.make_array(signature.args[pos])(context, builder, args[pos]).data)
        pos += 1
    state = context.make_array(signature.args[pos])(context, builder, args[pos]).data

    def state_at(k):
        return builder.gep(state, [ir.Constant(_i64, k)])

    extras = [builder.load(state_at(2 + len(streams) + k)) for k in range(merge.extra_state if custom else 0)]

    i0 = builder.load(state_at(0))
    n = builder.load(state_at(1))
    init = []  # per stream: p, x0, x1, ctx0, ctx1
    for si, s in enumerate(streams):
        p = builder.load(state_at(2 + si))
        xs = [builder.load(builder.bitcast(builder.gep(s["xs"], [ir.Constant(_i64, V * k)]), _vt.as_pointer()), align=4)
              for k in range(2)]
        ctx = [None, None]
        if "thr" in s:
            ctx = [builder.zext(builder.load(builder.bitcast(builder.gep(s["ctx0"], [ir.Constant(_i64, V * k)]),
                                                             _v8.as_pointer()), align=1), _vt) for k in range(2)]
        init.append([p, *xs, *ctx])
    entry = builder.block
    header = builder.append_basic_block("rans_loop_header")
    body = builder.append_basic_block("rans_loop_body")
    done = builder.append_basic_block("rans_loop_done")
    builder.branch(header)

    builder.position_at_end(header)
    i_phi = builder.phi(_i64)
    i_phi.add_incoming(i0, entry)
    phis = []
    for vals in init:
        row = []
        for v in vals:
            if v is None:
                row.append(None)
                continue
            ph = builder.phi(v.type)
            ph.add_incoming(v, entry)
            row.append(ph)
        phis.append(row)
    lanes = ir.Constant(_i64, LANES)
    ok = builder.icmp_signed("<=", builder.add(i_phi, lanes), n)
    for s, row in zip(streams, phis):
        ok = builder.and_(ok, builder.icmp_signed("<=", builder.add(row[0], lanes), s["nw"]))
    builder.cbranch(ok, body, done)

    builder.position_at_end(body)
    new = [list(row) for row in phis]
    for k in range(2):  # lanes 0-15 of every stream, then lanes 16-31: the chains interleave
        ik = builder.add(i_phi, ir.Constant(_i64, V * k))
        syms = []
        for s, row in zip(streams, new):
            x, p, sym = _step(builder, s, row[1 + k], row[0], row[3 + k], ik, merge is None)
            row[0], row[1 + k] = p, x
            syms.append(sym)
            if row[3 + k] is not None:
                row[3 + k] = sym  # the context of the symbol 32 later in this lane
        if merge == "bf16":
            _store_bf16(builder, targets[0], ik, *syms)
        elif merge == "bf16x2":
            _store_bf16(builder, targets[0], ik, syms[0], syms[1])
            _store_bf16(builder, targets[1], ik, syms[2], syms[3])
        elif merge == "f32":
            _store_f32(builder, targets[0], ik, *syms, targets[1], targets[2])
        elif merge == "f32x2":
            _store_f32(builder, targets[0], ik, syms[0], syms[1], targets[1], targets[2])
            _store_f32(builder, targets[3], ik, syms[2], syms[3], targets[4], targets[5])
        elif merge == "f32x4":
            _store_f32_coded(builder, targets[0], ik, *syms)
        elif merge == "f16":
            for si, sym in enumerate(syms):
                _store_f16(builder, targets[2 * si], ik, sym, targets[2 * si + 1])
        elif custom:
            merge.store(builder, targets, ik, syms, extras)
    i_next = builder.add(i_phi, lanes)
    builder.branch(header)
    i_phi.add_incoming(i_next, body)
    for row_phi, row_new in zip(phis, new):
        for ph, v in zip(row_phi, row_new):
            if ph is not None:
                ph.add_incoming(v, body)

    builder.position_at_end(done)
    builder.store(i_phi, state_at(0))
    for si, (s, row) in enumerate(zip(streams, phis)):
        builder.store(row[0], state_at(2 + si))
        for k in range(2):
            builder.store(row[1 + k], builder.bitcast(builder.gep(s["xs"], [ir.Constant(_i64, V * k)]),
                                                      _vt.as_pointer()), align=4)
    return i_phi


# Top-level intrinsics rather than ones built by a factory: each is one fixed shape of the loop.


@intrinsic
def loop1(typingctx, lut, words, xs, out, state):
    """One stream of methods 5/6 (see _emit_loop)."""
    return types.int64(lut, words, xs, out, state), lambda c, b, sig, a: _emit_loop(c, b, sig, a, (False,))


@intrinsic
def loop2(typingctx, lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, state):
    """Two streams of methods 5/6 in one loop (four chains)."""
    sig = types.int64(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False, False))


@intrinsic
def loop1c(typingctx, lut, words, xs, out, thr, ctx0, state):
    """One method-7 stream of source 0: the context of symbol i is symbol i - 32 (ctx0 holds those of the first
    round, out[i-32:i] or zeros at i = 0)."""
    return (types.int64(lut, words, xs, out, thr, ctx0, state),
            lambda c, b, sig, a: _emit_loop(c, b, sig, a, (True,)))


@intrinsic
def loop2c(typingctx, lut_c, words_c, xs_c, out_c, thr, ctx0, lut_e, words_e, xs_e, out_e, state):
    """A method-7 stream of source 0 and a method-5/6 stream in one loop."""
    sig = types.int64(lut_c, words_c, xs_c, out_c, thr, ctx0, lut_e, words_e, xs_e, out_e, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (True, False))


@intrinsic
def loop2_bf16(typingctx, lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16, state):
    """loop2 over a bf16 class's two streams, writing the merged elements to u16 (out_a, out_b are not written)."""
    sig = types.int64(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False, False), "bf16")


@intrinsic
def loop4_bf16(typingctx, lut_a0, words_a0, xs_a0, out_a0, lut_b0, words_b0, xs_b0, out_b0,
               lut_a1, words_a1, xs_a1, out_a1, lut_b1, words_b1, xs_b1, out_b1, u16_0, u16_1, state):
    """A bf16 class's two streams (a: exponents, b: sign|mantissa bytes), each in two parts, in one loop (eight
    chains): the parts 0 (first half of the elements) are merged into u16_0, the parts 1 into u16_1."""
    sig = types.int64(lut_a0, words_a0, xs_a0, out_a0, lut_b0, words_b0, xs_b0, out_b0,
                      lut_a1, words_a1, xs_a1, out_a1, lut_b1, words_b1, xs_b1, out_b1, u16_0, u16_1, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False,) * 4, "bf16x2")


@intrinsic
def loop2_f32(typingctx, lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u32, m1, m0, state):
    """loop2 over an f32 class's first two streams whose mantissa planes m1, m0 are raw, writing the elements."""
    sig = types.int64(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u32, m1, m0, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False, False), "f32")


@intrinsic
def loop4_f32(typingctx, lut_a0, words_a0, xs_a0, out_a0, lut_b0, words_b0, xs_b0, out_b0,
              lut_a1, words_a1, xs_a1, out_a1, lut_b1, words_b1, xs_b1, out_b1, u32_0, m1_0, m0_0, u32_1, m1_1, m0_1,
              state):
    """loop4_bf16 for an f32 class's first two streams in two parts each, with raw mantissa planes: the parts 0
    write u32_0 from m1_0 / m0_0, the parts 1 u32_1 from m1_1 / m0_1."""
    sig = types.int64(lut_a0, words_a0, xs_a0, out_a0, lut_b0, words_b0, xs_b0, out_b0,
                      lut_a1, words_a1, xs_a1, out_a1, lut_b1, words_b1, xs_b1, out_b1,
                      u32_0, m1_0, m0_0, u32_1, m1_1, m0_1, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False,) * 4, "f32x2")


@intrinsic
def loop4s_f32(typingctx, lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b,
               lut_c, words_c, xs_c, out_c, lut_d, words_d, xs_d, out_d, u32, state):
    """All four streams of an f32 class, each one method-6 part (mantissa planes coded too: weights whose low
    bytes carry little information), in one loop (eight chains) that writes the elements to u32."""
    sig = types.int64(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b,
                      lut_c, words_c, xs_c, out_c, lut_d, words_d, xs_d, out_d, u32, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False,) * 4, "f32x4")


@intrinsic
def loop4sc_f32(typingctx, lut_c, words_c, xs_c, out_c, thr, ctx0, lut_b, words_b, xs_b, out_b,
                lut_1, words_1, xs_1, out_1, lut_0, words_0, xs_0, out_0, u32, state):
    """loop4s_f32 with the exponents a method-7 stream of source 0 (checkpoint weights whose mantissa bytes are
    coded too)."""
    sig = types.int64(lut_c, words_c, xs_c, out_c, thr, ctx0, lut_b, words_b, xs_b, out_b,
                      lut_1, words_1, xs_1, out_1, lut_0, words_0, xs_0, out_0, u32, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (True, False, False, False), "f32x4")


@intrinsic
def loop2c_f32(typingctx, lut_c, words_c, xs_c, out_c, thr, ctx0, lut_e, words_e, xs_e, out_e, u32, m1, m0, state):
    """loop2c over an f32 class's method-7 exponents and method-6 sign|mantissa bytes, writing the elements."""
    sig = types.int64(lut_c, words_c, xs_c, out_c, thr, ctx0, lut_e, words_e, xs_e, out_e, u32, m1, m0, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (True, False), "f32")


@intrinsic
def loop2_f16(typingctx, lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16_a, lo_a, u16_b, lo_b, state):
    """loop2 over the two parts of an f16 class's high bytes, writing each part's elements u16_a / u16_b from its
    raw low bytes lo_a / lo_b."""
    sig = types.int64(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16_a, lo_a, u16_b, lo_b, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False, False), "f16")



@intrinsic
def loop4c_f32(typingctx, lut_c0, words_c0, xs_c0, out_c0, thr_0, ctx0_0, lut_e0, words_e0, xs_e0, out_e0,
               lut_c1, words_c1, xs_c1, out_c1, thr_1, ctx0_1, lut_e1, words_e1, xs_e1, out_e1,
               u32_0, m1_0, m0_0, u32_1, m1_1, m0_1, state):
    """loop2c_f32 for a two-part method-7 exponent stream (source 2) and a two-part method-6 sign|mantissa stream
    (eight chains): the parts 0 write u32_0 from m1_0 / m0_0, the parts 1 u32_1 from m1_1 / m0_1 (the parts of a
    stream share its tables: callers pass them twice)."""
    sig = types.int64(lut_c0, words_c0, xs_c0, out_c0, thr_0, ctx0_0, lut_e0, words_e0, xs_e0, out_e0,
                      lut_c1, words_c1, xs_c1, out_c1, thr_1, ctx0_1, lut_e1, words_e1, xs_e1, out_e1,
                      u32_0, m1_0, m0_0, u32_1, m1_1, m0_1, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (True, False, True, False), "f32x2")
