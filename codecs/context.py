"""Class 8 (f32ctx): f32 field streams split by context bucket, so that each bucket gets its own order-0 table.

The exponent of an element is coded in the sub-stream of the bucket of the previous element's exponent, and its
sign+mantissa-top, mantissa-middle and mantissa-low bytes in the sub-streams of the bucket of its own exponent.
Every sub-stream is an ordinary stream (raw, const, rans, rans32e), decoded on its own without context; only the
merge walks the elements in order. On AdamW checkpoints this is an order-1 model of the exponent (neighbours in a
row share a scale) and of the mantissa given the exponent, at the price of a few more tables.
"""
from __future__ import annotations

import logging

import numpy as np

from ._jit import njit
from .api import CodecError
from . import rans, rans32
from .varint import get_varint, put_varint

log = logging.getLogger(__name__)

BUCKETS = 4  # sub-streams per field; a class has 1 + 4 * BUCKETS streams (docs/codecs.md)
N_STREAMS = 1 + 4 * BUCKETS
MIN_ELEMENTS = 16384  # shorter classes cannot pay for the extra tables
STREAM_COST = 3  # params bytes of one more (possibly empty) stream
USE_EXPONENT_CONTEXT = False
# the merge costs ~1.7 ns per element (1 MiB f32 decodes ~30% slower); any threshold up to 0.4% gave back the
# checkpoint target (the gain is spread thin over most chunks), so none is applied
MIN_GAIN = 0.0


@njit(nogil=True)
def _joint(u, je, js, j1, j0):
    """Joint counts: je[previous exponent, exponent]; js/j1/j0[exponent, byte] for the three other fields."""
    prev = 0
    for i in range(u.size):
        v = u[i]
        e = (v >> 23) & 0xFF
        je[prev, e] += 1
        js[e, ((v >> 24) & 0x80) | ((v >> 16) & 0x7F)] += 1
        j1[e, (v >> 8) & 0xFF] += 1
        j0[e, v & 0xFF] += 1
        prev = e


def _cost(h: np.ndarray) -> np.ndarray:
    """Estimated bytes of streams with histograms h[..., 256] (as blocks._plane_cost, vectorised)."""
    n = h.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = np.where(h > 0, h * np.log2(np.maximum(n, 1)[..., None] / np.maximum(h, 1)), 0.0).sum(-1)
    nsym = (h > 0).sum(-1)
    est = np.minimum(bits / 8 + 4 + 1.1 * nsym + np.where(n >= 60000, 48, 12), n)
    return np.where(nsym <= 1, np.minimum(n, 1), est) + STREAM_COST


def _choose(joints: list[np.ndarray]) -> tuple[list[int], float]:
    """Greedy thresholds (up to BUCKETS - 1 context values) minimising the summed cost of the joint tables'
    sub-streams; bucket of context c = number of thresholds <= c."""
    used = np.nonzero(sum(j.sum(1) for j in joints))[0]
    # only the contexts that occur (a few dozen exponents): row r of pref sums contexts used[:r]
    pref = [np.concatenate([np.zeros((1, 256), np.int64), np.cumsum(j[used], 0)]) for j in joints]
    cands = np.arange(1, used.size)
    last = used.size
    cuts: list[int] = []
    cur = float(sum(_cost(p[last] - p[0]) for p in pref))
    for _ in range(BUCKETS - 1):
        cands = np.array([c for c in cands if c not in cuts], np.int64)
        if cands.size == 0:
            break
        edges = np.array([0, *cuts, last])
        hi = edges[np.searchsorted(edges, cands, side="right")]
        lo = edges[np.searchsorted(edges, cands, side="right") - 1]
        # a cut at c replaces the bucket [lo, hi) around it by [lo, c) and [c, hi): all candidates at once
        delta = np.zeros(cands.size)
        for p in pref:
            delta += _cost(p[cands] - p[lo]) + _cost(p[hi] - p[cands]) - _cost(p[hi] - p[lo])
        k = int(np.argmin(delta))
        if delta[k] >= 0:
            break
        cuts = sorted(cuts + [int(cands[k])])
        cur += float(delta[k])
    return [int(used[c]) for c in cuts], cur


def plan(u: np.ndarray) -> tuple[list[int], list[int], float]:
    """(exponent thresholds, mantissa thresholds, estimated bytes) for the f32 elements u."""
    je = np.zeros((256, 256), np.int64)
    js, j1, j0 = (np.zeros((256, 256), np.int64) for _ in range(3))
    _joint(u, je, js, j1, j0)
    # the exponent stays one stream (no thresholds): a context from the previous element makes the merge a
    # serial chain (~10 ns per element, 5x slower decoding), for 0.25% of a checkpoint; the format keeps it
    if USE_EXPONENT_CONTEXT:
        te, ce = _choose([je])
    else:
        te, ce = [], float(_cost(je.sum(0))) + (BUCKETS - 1) * STREAM_COST
    tm, cm = _choose([js, j1, j0])
    return te, tm, ce + cm + 2 * BUCKETS * 3 + 8


def _lut(thresholds: list[int]) -> np.ndarray:
    lut = np.zeros(256, np.int64)
    for t in thresholds:
        lut[t:] += 1
    return lut


@njit(nogil=True)
def _partition(u, lut_e, lut_m, ne, nm, planes):
    """Scatter the fields into planes[4, n], each field grouped by bucket in element order (bucket offsets from
    the counts ne, nm)."""
    pe = np.zeros(lut_e.size, np.int64)
    pm = np.zeros(lut_m.size, np.int64)
    for b in range(1, pe.size):
        pe[b] = pe[b - 1] + ne[b - 1]
    for b in range(1, pm.size):
        pm[b] = pm[b - 1] + nm[b - 1]
    prev = 0
    for i in range(u.size):
        v = u[i]
        e = (v >> 23) & 0xFF
        b = lut_e[prev]
        planes[0, pe[b]] = e
        pe[b] += 1
        c = lut_m[e]
        k = pm[c]
        planes[1, k] = ((v >> 24) & 0x80) | ((v >> 16) & 0x7F)
        planes[2, k] = (v >> 8) & 0xFF
        planes[3, k] = v & 0xFF
        pm[c] = k + 1
        prev = e


@njit(nogil=True)
def _counts(u, lut_e, lut_m, ne, nm):
    prev = 0
    for i in range(u.size):
        e = (u[i] >> 23) & 0xFF
        ne[lut_e[prev]] += 1
        nm[lut_m[e]] += 1
        prev = e


def split(u: np.ndarray, te: list[int], tm: list[int]) -> tuple[bytes, list[np.ndarray]]:
    """(header, 4 * BUCKETS sub-streams: exponent by bucket, then sign+mantissa-top, m1, m0 by bucket)."""
    lut_e, lut_m = _lut(te), _lut(tm)
    ne = np.zeros(BUCKETS, np.int64)
    nm = np.zeros(BUCKETS, np.int64)
    _counts(u, lut_e, lut_m, ne, nm)
    planes = np.empty((4, u.size), np.uint8)
    _partition(u, lut_e, lut_m, ne, nm, planes)
    head = bytearray([len(te), *te, len(tm), *tm])
    for c in (*ne[:-1], *nm[:-1]):
        put_varint(head, int(c))
    subs = []
    for f, counts in ((0, ne), (1, nm), (2, nm), (3, nm)):
        pos = 0
        for c in counts:
            subs.append(planes[f, pos : pos + c])
            pos += c
    return bytes(head), subs


def parse_header(head: bytes, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(exponent LUT, mantissa LUT, exponent bucket counts, mantissa bucket counts) of a header for n elements."""
    pos = 0
    luts = []
    for _ in range(2):
        if pos >= len(head) or head[pos] >= BUCKETS or pos + 1 + head[pos] > len(head):
            raise CodecError("f32ctx header: bad threshold count")
        t = list(head[pos + 1 : pos + 1 + head[pos]])
        if any(b <= a for a, b in zip(t, t[1:])) or (t and t[0] == 0):
            raise CodecError("f32ctx header: thresholds must increase from 1")
        luts.append(_lut(t))
        pos += 1 + len(t)
    counts = []
    for _ in range(2):
        c = []
        for _ in range(BUCKETS - 1):
            v, pos = get_varint(head, pos, "f32ctx", 35)
            c.append(v)
        if sum(c) > n:
            raise CodecError("f32ctx header: bucket counts exceed the elements")
        c.append(n - sum(c))
        counts.append(np.array(c, np.int64))
    if pos != len(head):
        raise CodecError("f32ctx header has trailing bytes")
    return luts[0], luts[1], counts[0], counts[1]


@njit(nogil=True)
def merge(planes, lut_e, lut_m, ne, nm, out):
    """Inverse of _partition into out (uint32); 0, or -1 when the streams do not match the buckets they feed."""
    n = out.size
    single = True
    for c in range(256):
        if lut_e[c]:
            single = False
    if single:
        # one exponent stream (what the encoder writes): the exponents are planes[0] in element order
        ex = planes[0]
    else:
        # the serial chain of an exponent context (format allows it, the encoder does not write it)
        ex = np.empty(n, np.uint8)
        pe = np.zeros(ne.size, np.int64)
        end_e = np.zeros(ne.size, np.int64)
        for b in range(ne.size):
            pe[b] = 0 if b == 0 else end_e[b - 1]
            end_e[b] = pe[b] + ne[b]
        prev = 0
        for i in range(n):
            b = lut_e[prev]
            k = pe[b]
            if k >= end_e[b]:
                return -1
            ex[i] = planes[0, k]
            pe[b] = k + 1
            prev = ex[i]
        for b in range(ne.size):
            if pe[b] != end_e[b]:
                return -1
    pm = np.zeros(nm.size, np.int64)
    end_m = np.zeros(nm.size, np.int64)
    for b in range(nm.size):
        pm[b] = 0 if b == 0 else end_m[b - 1]
        end_m[b] = pm[b] + nm[b]
    # mantissa bytes of an element sit in the sub-stream of its own exponent's bucket: no chain between elements
    bucket = np.empty(n, np.uint8)
    for i in range(n):
        bucket[i] = lut_m[ex[i]]
    sm, m1, m0 = planes[1], planes[2], planes[3]
    for i in range(n):
        c = bucket[i]
        k = pm[c]
        if k >= end_m[c]:
            return -1
        pm[c] = k + 1
        s = np.uint32(sm[k])
        out[i] = (np.uint32(ex[i]) << 23) | ((s & 0x80) << 24) | ((s & 0x7F) << 16) | (np.uint32(m1[k]) << 8) | \
            np.uint32(m0[k])
    for b in range(nm.size):
        if pm[b] != end_m[b]:
            return -1
    return 0


@njit(nogil=True, inline="always")
def _sub(payload, meths, offs, lens, dst, starts, sizes, k, vec):
    m = meths[k]
    blob = payload[offs[k] : offs[k] + lens[k]]
    d = dst[starts[k] : starts[k] + sizes[k]]
    if sizes[k] == 0:
        return 0 if lens[k] == 0 else -1
    if m == 0:
        if lens[k] != sizes[k]:
            return -1
        for i in range(d.size):
            d[i] = blob[i]
    elif m == 3:
        if lens[k] != 1:
            return -1
        for i in range(d.size):
            d[i] = blob[0]
    elif m == 2:
        return rans.decode_into(blob, d)
    elif m == 6:
        if vec:
            return rans32.decode_ext_into(blob, d)
        return rans32.decode_ext_into_scalar(blob, d)
    else:
        return -1
    return 0


@njit(nogil=True)
def decode_subs(payload, meths, offs, lens, dst, starts, sizes, vec):
    """Decode the sub-streams (methods 0, 2, 3, 6) into dst[starts[k]:starts[k]+sizes[k]]; 0 or -(k+1)."""
    for k in range(meths.size):
        if _sub(payload, meths, offs, lens, dst, starts, sizes, k, vec) != 0:
            return -(k + 1)
    return 0
