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
from .rans32 import LANES, SLOTS, TABLE_MAX, V, _decl, build_lut, read_table, write_table

log = logging.getLogger(__name__)

MAX_BUCKETS = 4
SRC_SELF, SRC_STREAM0 = 0, 1  # context sources (docs/codecs.md, method 7)
FLUSH = 4 * LANES  # the 32 final states

_i1, _i8, _i16, _i32, _i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))


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


@njit(nogil=True)
def _encode(data, bucket, freq, cum, rcp, out):
    """Encode data backwards, symbol i with the tables of bucket[i]; return the first word's position."""
    x = np.full(LANES, RANS_L, np.int64)
    pos = out.size
    for i in range(data.size - 1, -1, -1):
        s = data[i]
        b = bucket[i]
        j = i & (LANES - 1)
        x[j], pos = _enc_step(x[j], freq[b, s], cum[b, s], rcp[b, s], out, pos)
    for j in range(LANES - 1, -1, -1):
        out[pos - 1] = x[j] & 0xFFFF
        out[pos - 2] = x[j] >> 16
        pos -= 2
    return pos


@njit(nogil=True)
def joint_counts(data, ctx, lag, counts):
    """counts[context, symbol]: context = ctx[i] (lag 0) or data[i - lag] (0 before the start)."""
    for i in range(data.size):
        if lag:
            c = data[i - lag] if i >= lag else 0
        else:
            c = ctx[i]
        counts[c, data[i]] += 1


@njit(nogil=True)
def _buckets(data, ctx, lag, blut, out):
    for i in range(data.size):
        if lag:
            c = data[i - lag] if i >= lag else 0
        else:
            c = ctx[i]
        out[i] = blut[c]


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


def encode(data: np.ndarray, source: int, ctx: np.ndarray | None, thresholds: list[int],
           freqs: list[np.ndarray]) -> bytes:
    """Method-7 stream of data with len(thresholds) + 1 bucket tables freqs (context: own symbol 32 earlier for
    source 0, ctx[i] for source 1)."""
    nb = len(thresholds) + 1
    blut = np.zeros(256, np.uint8)
    for t in thresholds:
        blut[t:] += 1
    bucket = np.empty(data.size, np.uint8)
    _buckets(data, ctx if ctx is not None else data, LANES if source == SRC_SELF else 0, blut, bucket)
    freq = np.stack(freqs).astype(np.int64)
    cum = np.zeros((nb, 256), np.int64)
    np.cumsum(freq[:, :-1], axis=1, out=cum[:, 1:])
    rcp = 1.0 / np.maximum(freq, 1)
    out = np.empty(data.size + 2 * LANES + 8, np.uint16)
    pos = _encode(data, bucket, freq, cum, rcp, out)
    head = bytearray([source, len(thresholds), *thresholds])
    tab = np.empty(TABLE_MAX, np.uint8)
    for f in freqs:
        head += tab[: write_table(f, tab)].tobytes()
    return bytes(head) + out[pos:].astype("<u2").tobytes()


# ---------------------------------------------------------------- chooser (not part of the format)

MIN_SYMBOLS = 16384  # shorter streams cannot pay for the extra tables and the 32-state flush


def _cost(h: np.ndarray) -> np.ndarray:
    """Rough bytes of streams with histograms h[..., 256] (entropy + table) to compare bucketings."""
    n = h.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = np.where(h > 0, h * np.log2(np.maximum(n, 1)[..., None] / np.maximum(h, 1)), 0.0).sum(-1)
    return bits / 8 + 4 + 1.1 * (h > 0).sum(-1)


def _choose(joint: np.ndarray) -> list[int]:
    """Greedy thresholds (up to MAX_BUCKETS - 1 context values) that lower the summed _cost of the buckets."""
    used = np.nonzero(joint.sum(1))[0]
    if used.size < 2:
        return []
    pref = np.concatenate([np.zeros((1, 256), np.int64), np.cumsum(joint[used], 0)])
    last = used.size
    cuts: list[int] = []
    cands = np.arange(1, last)
    for _ in range(MAX_BUCKETS - 1):
        cands = np.array([c for c in cands if c not in cuts], np.int64)
        if cands.size == 0:
            break
        edges = np.array([0, *cuts, last])
        at = np.searchsorted(edges, cands, side="right")
        lo, hi = edges[at - 1], edges[at]
        # a cut at c replaces the bucket [lo, hi) around it by [lo, c) and [c, hi): all candidates at once
        delta = _cost(pref[cands] - pref[lo]) + _cost(pref[hi] - pref[cands]) - _cost(pref[hi] - pref[lo])
        k = int(np.argmin(delta))
        if delta[k] >= 0:
            break
        cuts = sorted(cuts + [int(cands[k])])
    return [int(used[c]) for c in cuts]


def plan(data: np.ndarray, source: int, ctx: np.ndarray | None):
    """(thresholds, bucket tables, estimated bytes) of method 7 for data, or None when no bucketing helps."""
    if data.size < MIN_SYMBOLS:
        return None
    joint = np.zeros((256, 256), np.int64)
    joint_counts(data, ctx if ctx is not None else data, LANES if source == SRC_SELF else 0, joint)
    thresholds = _choose(joint)
    if not thresholds:
        return None
    edges = [0, *thresholds, 256]
    size = 2.0 + len(thresholds) + FLUSH
    freqs = []
    for a, b in zip(edges, edges[1:]):
        counts = joint[a:b].sum(0)
        freq = bucket_freqs(counts)
        present = counts > 0
        size += float((counts[present] * (SCALE_BITS - np.log2(freq[present]))).sum()) / 8 + table_bytes(freq)
        freqs.append(freq)
    return thresholds, freqs, size
