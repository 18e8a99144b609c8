"""Compiled decoding of chunks beyond one float class: a float class with raw generic bytes, and v2 blocks.

tensor_decode.py and blocks.py try these first and fall back to their Python parsers for anything else (which
also name the errors)."""
from __future__ import annotations

import numpy as np

from ._jit import njit
from . import fields
from .rans32e import varint_at
from .tensor_fast import _fused_vec, _single_class_plan, class_shape, stream_plan
from .tensor_format import FORMAT_VERSION, M_RANS32, M_RAW


@njit(nogil=True)
def decode_mixed(params, payload, raw_len, out, scratch):
    """A version-1 chunk of one float class of the vector methods and raw generic bytes (a .pt chunk across two
    storages: the zip header between them) into out: the class decodes into scratch, then the regions are laid
    out. 0, or -1 for any other chunk or a malformed one (the Python parser then decodes it and names the
    error). scratch: at least 2 * raw_len bytes."""
    n_p = params.size
    if n_p < 2 or params[0] != FORMAT_VERSION:
        return -1
    nreg, pos = varint_at(params, 1)
    if nreg < 2 or nreg > 64 or nreg > raw_len + 1:
        return -1
    lens_r = np.empty(nreg, np.int64)
    cls_r = np.empty(nreg, np.int64)
    cls = -1
    fb = 0
    gb = 0
    for r in range(nreg):
        length, pos = varint_at(params, pos)
        if length < 0 or pos >= n_p:
            return -1
        c = np.int64(params[pos])
        pos += 1
        lens_r[r] = length
        cls_r[r] = c
        if c == fields.CLASS_GENERIC:
            gb += length
            continue
        if cls < 0:
            cls = c
        elif c != cls:
            return -1
        fb += length
    width, ns = class_shape(cls)
    if width == 0 or width == 8:
        return -1
    if gb == 0 or fb + gb != raw_len or 2 * raw_len > scratch.size:
        return -1
    for r in range(nreg):  # every float region whole elements, as the Python parser demands
        if cls_r[r] != fields.CLASS_GENERIC and lens_r[r] % width:
            return -1
    # streams: the generic class's (raw) first, then the float class's (class_shape's count)
    if pos >= n_p or params[pos] != M_RAW:
        return -1
    glen, pos = varint_at(params, pos + 1)
    if glen != gb:
        return -1
    plan = np.empty((3, 8), np.int64)
    pos, total = stream_plan(params, pos, ns, plan)
    if pos != n_p or gb + total != payload.size:
        return -1
    for k in range(ns):
        if plan[0, k] == M_RANS32:  # method 5: the _fused_vec5 variant, left to the Python path
            return -1
    n = fb // width
    # the class decodes straight into out where the largest float region then lies in its place (the others are
    # moved, the generic bytes written last): one copy of the chunk less than decoding into scratch and laying
    # out every region
    big = -1
    gen = 0
    base = 0  # the generic bytes before the largest float region
    for r in range(nreg):
        if cls_r[r] == fields.CLASS_GENERIC:
            gen += lens_r[r]
        elif big < 0 or lens_r[r] > lens_r[big]:
            big = r
            base = gen
    # (class 8 decodes through one row of n symbols: three rows and the floats after them need 2.5x the class's
    # bytes, more than the scratch holds where the generic bytes are few, found by review)
    rows = 1 if cls == fields.CLASS_BF16J else ns
    planes = scratch[: rows * n].reshape(rows, n)
    if (out.ctypes.data + base) % width == 0:
        if _fused_vec(cls, payload[gb:], plan[0, :ns], plan[1, :ns], plan[2, :ns], planes,
                      out[base : base + fb]):
            return -1
        _lay_out_in_place(out, payload, lens_r, cls_r, nreg, big, base)
        return 0
    if rows * n + fb > scratch.size:
        return -1
    floats = scratch[rows * n : rows * n + fb]
    if _fused_vec(cls, payload[gb:], plan[0, :ns], plan[1, :ns], plan[2, :ns], planes, floats):
        return -1
    o = 0
    gi = 0
    fi = 0
    for r in range(nreg):
        length = lens_r[r]
        dst = out[o : o + length]
        if cls_r[r] == fields.CLASS_GENERIC:
            src = payload[gi : gi + length]
            gi += length
        else:
            src = floats[fi : fi + length]
            fi += length
        # over views from 0: LLVM sees no negative index and vectorises the copy (offset indexing ran ~1 ns/byte)
        for i in range(length):
            dst[i] = src[i]
        o += length
    return 0


@njit(nogil=True, inline="always")
def _copy(out, dst, src, length):
    """out[dst:dst + length] = out[src:src + length] for ranges that do not overlap."""
    a = out[dst : dst + length]
    b = out[src : src + length]
    for i in range(length):
        a[i] = b[i]


@njit(nogil=True)
def _move(out, dst, src, length):
    """memmove within out, in pieces no longer than the distance, so that each piece is a vectorised copy of
    ranges that do not overlap (a byte loop over overlapping ranges ran scalar)."""
    if dst < src:
        step = src - dst
        k = 0
        while k < length:
            m = min(step, length - k)
            _copy(out, dst + k, src + k, m)
            k += m
    elif dst > src:
        step = dst - src
        k = length
        while k > 0:
            m = min(step, k)
            k -= m
            _copy(out, dst + k, src + k, m)


@njit(nogil=True)
def _lay_out_in_place(out, payload, lens_r, cls_r, nreg, big, base):
    """The float class lies contiguous at out[base:], its region big already in place: move the float regions
    before it down (first to last) and those after it up (last to first), then write the generic bytes (the first
    gb of the payload). Each region's final place is the sum of the lengths before it; no move overwrites a region
    not yet moved."""
    final = np.empty(nreg + 1, np.int64)
    cur = np.empty(nreg, np.int64)
    gpos = np.empty(nreg, np.int64)
    final[0] = 0
    coff = 0
    gi = 0
    for r in range(nreg):
        final[r + 1] = final[r] + lens_r[r]
        if cls_r[r] == fields.CLASS_GENERIC:
            gpos[r] = gi
            gi += lens_r[r]
        else:
            cur[r] = base + coff
            coff += lens_r[r]
    for r in range(big):
        if cls_r[r] != fields.CLASS_GENERIC:
            _move(out, final[r], cur[r], lens_r[r])
    for r in range(nreg - 1, big, -1):
        if cls_r[r] != fields.CLASS_GENERIC:
            _move(out, final[r], cur[r], lens_r[r])
    for r in range(nreg):
        if cls_r[r] == fields.CLASS_GENERIC:
            a = out[final[r] : final[r] + lens_r[r]]
            b = payload[gpos[r] : gpos[r] + lens_r[r]]
            for i in range(lens_r[r]):
                a[i] = b[i]


@njit(nogil=True)
def decode_blocks(params, payload, table, out, scratch):
    """Decode the blocks of a version-2 chunk that are one float class of the vector methods (table rows: raw
    offset and length, params offset and length, payload offset and length) until the first one that is not, or
    does not decode; return its index (the caller decodes it and the rest in Python, and names any error), or the
    number of blocks. Per block this saves the Python parser's ~20 us: a 1 MiB chunk of five to eight blocks
    spent a third of its decoding time there."""
    plan = np.empty((3, 8), np.int64)
    for b in range(table.shape[0]):
        ro, rl, po, pl, yo, yl = table[b, 0], table[b, 1], table[b, 2], table[b, 3], table[b, 4], table[b, 5]
        cls = _single_class_plan(params[po : po + pl], rl, yl, plan)
        if cls <= 0:
            if decode_mixed(params[po : po + pl], payload[yo : yo + yl], rl, out[ro : ro + rl], scratch):
                return b
            continue
        width, ns = class_shape(cls)
        for k in range(ns):
            if plan[0, k] == M_RANS32:
                return b
        n = rl // width
        if ns * n > scratch.size:
            return b
        sc = scratch[: ns * n].reshape(ns, n)
        if _fused_vec(cls, payload[yo : yo + yl], plan[0, :ns], plan[1, :ns], plan[2, :ns], sc, out[ro : ro + rl]):
            return b
    return table.shape[0]
