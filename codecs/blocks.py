"""Tensor params version 2: a chunk cut into blocks (at tensor boundaries or on a grid), each with its own tables.

A 1 MiB chunk of a checkpoint often spans tensors with very different statistics (weights, exp_avg,
exp_avg_sq; dense and row-sparse embedding state). One order-0 table per stream for all of them cost
0.2% of the file against 256 KiB chunks; cutting the chunk where the estimated saving beats a block's
overhead makes a large chunk at least as good as small ones.
"""
from __future__ import annotations

import logging

import numpy as np

from ._jit import njit
from .api import CODEC_TENSOR, CodecError, EncodedChunk, Segment
from .varint import get_varint, put_varint
from . import chunk_fast, fields, rans, rans32, scratch, tensor_fast

log = logging.getLogger(__name__)

VERSION = 2
GRID = 64 << 10  # candidate cuts inside a tensor: every 64 KiB of the chunk
MIN_UNIT = 16 << 10  # no block shorter than this (runs of tiny tensors stay together)
# what one more block is charged in the plan beyond its params: what the sampled estimate misses (short blocks
# get the 4-state coder, no method 7, more tables) and the decoding time of short streams. On the corpus
# checkpoint 800 gave the best ratio (0.53523 vs 0.53543 at 96) with 45 instead of 76 cut chunks, decoding ~20%
# faster
BLOCK_PENALTY = 800
MAX_UNITS = 64
ZERO_CAPABLE = (fields.CLASS_BF16, fields.CLASS_F16, fields.CLASS_F32)
RAW_BITS = 7.9
# the plan counts every STEP-th element of float tensors (counts scaled back): its estimates pick cuts, they do
# not size streams, and full histograms took as long as the encoding itself
STEP = 16


@njit(nogil=True)
def _region_hist(u, start, width, mode, cuts, stats, kb, zs, ci):
    """Add every STEP-th element of a float region (elements u, first byte at chunk offset start) to the unit
    that holds it: plane histograms of nonzero elements in stats[unit + 1, kb + plane], zeros and zero runs in
    zs[unit + 1, ci] (mode 0 f32, 1 bf16, 2 f16)."""
    unit = 0
    prev_zero = False
    for i in range(0, u.size, STEP):
        p = start + i * width
        while cuts[unit + 1] <= p:
            unit += 1
            prev_zero = False
        v = np.int64(u[i])
        row = unit + 1
        if v == 0:
            zs[row, ci, 0] += STEP
            if not prev_zero:
                zs[row, ci, 1] += 1
            prev_zero = True
            continue
        prev_zero = False
        if mode == 0:
            stats[row, kb, (v >> 23) & 0xFF] += STEP
            stats[row, kb + 1, ((v >> 24) & 0x80) | ((v >> 16) & 0x7F)] += STEP
            stats[row, kb + 2, (v >> 8) & 0xFF] += STEP
            stats[row, kb + 3, v & 0xFF] += STEP
        elif mode == 1:
            stats[row, kb, (v >> 7) & 0xFF] += STEP
            stats[row, kb + 1, ((v >> 8) & 0x80) | (v & 0x7F)] += STEP
        else:
            stats[row, kb, v >> 8] += STEP
            stats[row, kb + 1, v & 0xFF] += STEP


_MODE = {fields.CLASS_F32: 0, fields.CLASS_BF16: 1, fields.CLASS_F16: 2}


def _stats(arr: np.ndarray, segments, cuts: list[int]):
    """(S prefix sums [U+1, K, 256], Z prefix sums [U+1, C, 2], key_cls [K], classes [C]) of the chunk's streams
    per unit between cuts."""
    from .tensor import plan_regions

    regions = plan_regions(arr.size, segments)
    classes = sorted({cls for _, cls in regions})
    kb, nkeys = {}, 0
    for cls in classes:
        kb[cls] = nkeys
        nkeys += fields.CLASSES[cls][1]
    units = len(cuts) - 1
    stats = np.zeros((units + 1, nkeys, 256), np.int64)
    zs = np.zeros((units + 1, len(classes), 2), np.int64)
    cut_arr = np.array(cuts, np.int64)
    pos = 0
    for length, cls in regions:
        if cls in _MODE:
            width = fields.CLASSES[cls][0]
            view = arr[pos : pos + length].view("<u4" if width == 4 else "<u2")
            _region_hist(view, pos, width, _MODE[cls], cut_arr, stats, kb[cls], zs, classes.index(cls))
        else:  # generic bytes and f64: split the part of the region in each unit (small, rare)
            for u in range(units):
                a, b = max(cuts[u], pos), min(cuts[u + 1], pos + length)
                if a >= b:
                    continue
                width = fields.CLASSES[cls][0]
                a = pos + -(-(a - pos) // width) * width
                b = pos + (b - pos) // width * width
                if a >= b:
                    continue
                for k, plane in enumerate(fields.split(cls, np.ascontiguousarray(arr[a:b]))):
                    stats[u + 1, kb[cls] + k] += rans.histogram(plane)
        pos += length
    key_cls = np.array([classes.index(cls) for cls in classes for _ in range(fields.CLASSES[cls][1])], np.int64)
    _prefix_sums(stats.reshape(units + 1, -1))
    _prefix_sums(zs.reshape(units + 1, -1))
    return stats, zs, key_cls, classes


@njit(nogil=True)
def _xlogx_table(n):
    """c * log2(c) for c = STEP * m, m < n, computed as _plane_cost computes it (the counts of float regions are
    multiples of STEP): the log2 calls were most of the plan's time for f16 chunks (~180 symbols)."""
    xl = np.zeros(n)
    for m in range(1, n):
        c = np.int64(m) * STEP
        xl[m] = c * np.log2(c)
    return xl


_XL: list = []


def _xl() -> np.ndarray:
    if not _XL:
        _XL.append(_xlogx_table(4096))  # 32 KiB: stays in L1; larger counts take the log2
    return _XL[0]


@njit(nogil=True)
def _prefix_sums(a):
    """np.cumsum(a, 0, out=a) for a 2-D array (numpy's took ~20 us per call here)."""
    for r in range(1, a.shape[0]):
        for c in range(a.shape[1]):
            a[r, c] += a[r - 1, c]


@njit(nogil=True, inline="always")
def _plane_cost(S, i, j, k, extra0, syms, nsyms, xl):
    """Estimated coded bytes of stream k over units [i, j) (prefix sums S), with extra0 more zero symbols:
    entropy + table + flush, or raw / const, as tensor._plan_plane decides. syms[k, :nsyms[k]]: the symbols
    present in the chunk, and 0 (the others count nothing in any block). xl: _xlogx_table."""
    n = 0
    nsym = 0
    acc = 0.0
    for t in range(nsyms[k]):
        s = syms[k, t]
        c = S[j, k, s] - S[i, k, s] + (extra0 if s == 0 else 0)
        if c:
            nsym += 1
            n += c
            m = c >> 4
            acc += xl[m] if (c & (STEP - 1)) == 0 and m < xl.size else c * np.log2(c)
    if nsym <= 1:
        return 1.0 if extra0 or nsym else 0.0
    bits = n * np.log2(n) - acc
    est = bits / 8 + 4 + 1.1 * nsym + (48 if n >= 16384 else 12)  # tensor_streams.RANS32_MIN (a compiled constant here)
    return min(est, float(n))


@njit(nogil=True)
def _dp(S, Z, key_cls, zero_ok, raw_cnt, penalty, back, xl):
    """Cheapest cut of units [0, U) into blocks (prefix sums S[U+1, K, 256] per stream, Z[U+1, C, 2] zeros and
    zero runs per class, raw_cnt[C] streams per class left out of S as raw); back[j] = start of the last block
    ending at j. Returns the estimated bytes."""
    units = S.shape[0] - 1
    ncls = Z.shape[1]
    syms = np.zeros((key_cls.size, 256), np.int64)
    nsyms = np.zeros(key_cls.size, np.int64)
    for k in range(key_cls.size):
        for s in range(256):
            if s == 0 or S[units, k, s]:
                syms[k, nsyms[k]] = s
                nsyms[k] += 1
    best = np.zeros(units + 1)
    for j in range(1, units + 1):
        best[j] = np.inf
        for i in range(j):
            total = best[i] + penalty
            for c in range(ncls):
                z = Z[j, c, 0] - Z[i, c, 0]
                masked = 0.0
                plain = 0.0
                nnz = -1
                for k in range(key_cls.size):
                    if key_cls[k] != c:
                        continue
                    if nnz < 0:
                        nnz = 0
                        for s in range(256):
                            nnz += S[j, k, s] - S[i, k, s]
                    masked += _plane_cost(S, i, j, k, 0, syms, nsyms, xl)
                    if z and zero_ok[c]:
                        plain += _plane_cost(S, i, j, k, z, syms, nsyms, xl)
                if nnz < 0:
                    continue
                masked += raw_cnt[c] * nnz
                if z and zero_ok[c]:
                    plain += raw_cnt[c] * (nnz + z)
                    masked = min(plain, masked + 3.0 * (Z[j, c, 1] - Z[i, c, 1]) + 4)
                total += masked + 8
            if total < best[j]:
                best[j] = total
                back[j] = i
    return best[units]


@njit(nogil=True)
def _raw_streams(total, key_cls, keep, raw_cnt):
    """keep[k] = False and raw_cnt[class] += 1 for each stream k but a class's first whose histogram total[k]
    has more than RAW_BITS bits per symbol; returns whether any was (in numpy: ~25 us per plan)."""
    dropped = False
    for k in range(key_cls.size):
        if k == 0 or key_cls[k - 1] != key_cls[k]:
            continue
        n = 0
        for s in range(256):
            n += total[k, s]
        bits = 0.0
        for s in range(256):
            if total[k, s]:
                bits += total[k, s] * np.log2(n / total[k, s])
        if bits > RAW_BITS * n:
            keep[k] = False
            raw_cnt[key_cls[k]] += 1
            dropped = True
    return dropped


def _cuts(raw_len: int, segments: tuple[Segment, ...]) -> list[int]:
    """Candidate block boundaries: tensor starts and ends, and the grid snapped to the element of its tensor."""
    cand = {0, raw_len}
    floats = []
    for seg in segments:
        cls = fields.DTYPE_CLASS.get(seg.dtype)
        for b in (seg.start, seg.start + seg.length):
            if 0 < b < raw_len:
                cand.add(b)
        if cls is not None:
            floats.append((seg.start, seg.start + seg.length, fields.CLASSES[cls][0]))
    for g in range(GRID, raw_len, GRID):
        for start, end, width in floats:
            if start < g < end:
                g = start + (g - start) // width * width
                break
        cand.add(g)
    kept = [0]
    for c in sorted(cand):
        if c - kept[-1] >= MIN_UNIT and raw_len - c >= MIN_UNIT:
            kept.append(c)
    kept.append(raw_len)
    return kept


def _shift(segments: tuple[Segment, ...], a: int, b: int) -> tuple[Segment, ...]:
    """The segments overlapping [a, b), in block coordinates (a start before 0 keeps the element phase)."""
    return tuple(Segment(s.start - a, s.length, s.dtype) for s in segments if s.start < b and s.start + s.length > a)


def plan(raw: bytes, segments: tuple[Segment, ...]) -> list[int]:
    """Block boundaries [0, ..., len(raw)] that minimise the estimated size (a single block when cuts do not pay)."""
    if len(raw) < 2 * MIN_UNIT or not segments:
        return [0, len(raw)]
    if len(segments) == 1 and segments[0].start <= 0 and segments[0].start + segments[0].length >= len(raw):
        # inside one tensor: cuts gained 0.0001-0.0005 of the checkpoint and fp32 files for ~0.5 ms per MiB
        return [0, len(raw)]
    cuts = _cuts(len(raw), segments)
    units = len(cuts) - 1
    if units < 2 or units > MAX_UNITS:
        return [0, len(raw)]
    S, Z, key_cls, classes = _stats(np.frombuffer(raw, np.uint8), segments, cuts)
    # streams with ~8 bits per byte over the whole chunk (mantissa bytes) are raw in any block: their cost is
    # linear in the element count, so the plan counts them (raw_cnt) instead of estimating them per block
    keep = np.ones(key_cls.size, bool)
    raw_cnt = np.zeros(len(classes), np.int64)
    if _raw_streams(S[-1], key_cls, keep, raw_cnt):
        S, key_cls = np.ascontiguousarray(S[:, keep]), key_cls[keep]
    zero_ok = np.array([c in ZERO_CAPABLE for c in classes])
    back = np.zeros(units + 1, np.int64)
    _dp(S, Z, key_cls, zero_ok, raw_cnt, float(BLOCK_PENALTY), back, _xl())
    out = [units]
    while out[-1]:
        out.append(int(back[out[-1]]))
    return [cuts[u] for u in reversed(out)]


def encode(raw: bytes, segments: tuple[Segment, ...], effort: int, level: int | None,
           force: bool = False) -> EncodedChunk | None:
    """Version 2 when the plan cuts the chunk, else the version-1 encoding (tensor.encode)."""
    from . import tensor

    # effort 0 (the encoders are the writer's bottleneck): no block planning, one table set
    bounds = plan(raw, segments) if effort > 0 else [0, len(raw)]
    if len(bounds) <= 2:
        return tensor.encode(raw, segments, effort, level, force)
    with scratch.session():  # the blocks' streams may be views of scratch memory until joined
        return _encode_blocks(raw, segments, bounds, effort, level)


def _encode_blocks(raw: bytes, segments: tuple[Segment, ...], bounds: list[int], effort: int, level: int | None
                   ) -> EncodedChunk:
    from . import tensor

    parts = []
    for a, b in zip(bounds, bounds[1:]):
        view = memoryview(raw)[a:b]
        p, blobs = tensor.encode_parts(view, tensor.plan_regions(b - a, _shift(segments, a, b)), effort, level)
        parts.append((b - a, p, blobs))
    params = bytearray([VERSION])
    put_varint(params, len(parts))
    for length, p, blobs in parts:
        put_varint(params, length)
        put_varint(params, len(p))
        put_varint(params, sum(len(x) for x in blobs))
    for _, p, _ in parts:
        params += p
    return EncodedChunk(CODEC_TENSOR, bytes(params), b"".join(x for _, _, blobs in parts for x in blobs))


def decode(params: bytes, payload: bytes | memoryview, raw_len: int) -> bytes:
    from . import tensor

    nblocks, pos = get_varint(params, 1, "tensor v2", 35)
    if nblocks < 2 or nblocks > raw_len:
        raise CodecError(f"tensor v2 params: {nblocks} blocks for {raw_len} bytes")
    sizes = []
    for _ in range(nblocks):
        length, pos = get_varint(params, pos, "tensor v2", 35)
        plen, pos = get_varint(params, pos, "tensor v2", 35)
        blen, pos = get_varint(params, pos, "tensor v2", 35)
        sizes.append((length, plen, blen))
    if sum(s[0] for s in sizes) != raw_len or pos + sum(s[1] for s in sizes) != len(params) \
            or sum(s[2] for s in sizes) != len(payload):
        raise CodecError("tensor v2 params: blocks do not cover the chunk, params or payload")
    payload = memoryview(payload)
    result, out = tensor.new_bytes(raw_len)
    first = 0
    if rans32.vector_ok():
        # the usual blocks (one float class each) decode in one compiled loop
        table = np.empty((nblocks, 6), np.int64)
        opos, ppos, qpos = 0, pos, 0
        for b, (length, plen, blen) in enumerate(sizes):
            table[b] = opos, length, ppos, plen, qpos, blen
            opos, ppos, qpos = opos + length, ppos + plen, qpos + blen
        first = chunk_fast.decode_blocks(np.frombuffer(params, np.uint8), np.frombuffer(payload, np.uint8), table,
                                          out, tensor_fast.scratch_for(2 * max(s[0] for s in sizes)))
    opos = sum(s[0] for s in sizes[:first])
    ppos = sum(s[2] for s in sizes[:first])
    pos += sum(s[1] for s in sizes[:first])
    for length, plen, blen in sizes[first:]:
        p = params[pos : pos + plen]
        if not p or p[0] != tensor.FORMAT_VERSION:
            raise CodecError("tensor v2: a block must be a version-1 encoding")
        tensor.decode_into(p, payload[ppos : ppos + blen], length, out[opos : opos + length])
        pos += plen
        ppos += blen
        opos += length
    return tensor.finish_bytes(result, out)
