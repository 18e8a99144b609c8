"""The delta codec's per-element arithmetic: integer-only numba kernels (scaled prediction, inverse sub) and zigzag."""
from __future__ import annotations

import numpy as np

from ._jit import njit

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SINT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


@njit(nogil=True, inline="always")
def _scale_one(v, ebits, mbits, cm, ce, steps):
    """v * c, rounded to the element format, repeated `steps` times, in integer arithmetic only (docs/delta.md).

    One step is an IEEE-754 multiply (round to nearest, ties to even, subnormal results, overflow to infinity) of an
    element with E = ebits, M = mbits by the f32 c (normal, positive; cm its mantissa with the implicit bit, ce its
    biased exponent); inf and nan elements stay as they are. No floating point is used, so no FPU mode
    (flush-to-zero, rounding direction) can change a prediction.
    """
    emax = (np.int64(1) << ebits) - 1
    bias = (np.int64(1) << (ebits - 1)) - 1
    mmask = (np.int64(1) << mbits) - 1
    sbit = np.int64(1) << (ebits + mbits)
    for _ in range(steps):
        e = (v >> mbits) & emax
        if e == emax:
            return v
        sign = v & sbit
        if e == 0:
            m = v & mmask
            ex = 1 - bias
        else:
            m = (v & mmask) | (mmask + 1)
            ex = e - bias
        p = m * cm
        if p == 0:
            return sign
        if e != 0:  # normal: p in [2**(M+23), 2**(M+25))
            blen = mbits + 25 if p >> (mbits + 24) else mbits + 24
        else:
            blen = 0
            t = p
            while t:
                t >>= 1
                blen += 1
        er = ex - mbits + ce - 150 + blen - 1 + bias
        sh = blen - 1 - mbits
        if er <= 0:
            sh += 1 - er
            er = 0
        if sh > 62:
            q = np.int64(0)
        else:
            q = p >> sh
            if sh > 0:
                rem = p & ((np.int64(1) << sh) - 1)
                half = np.int64(1) << (sh - 1)
                if rem > half or (rem == half and (q & 1)):
                    q += 1
        if er == 0:
            r = q
        else:
            r = (er << mbits) + q - (mmask + 1)
        if r >= (emax << mbits):
            r = emax << mbits
        v = sign | r
    return v


@njit(nogil=True, inline="always")
def _scale_fast(v, ebits, mbits, cm, ce, steps):
    """_scale_one, bit for bit, with a branch-free step for the common case (a normal element whose product is
    normal, which also covers overflow to infinity); zeros, subnormals, inf and nan take _scale_one's step.

    For a normal element the product m * cm has 24 + M or 25 + M bits (top = which), so the shift is 23 + top and the
    biased result exponent is e + ce - 127 + top.
    """
    emax = (np.int64(1) << ebits) - 1
    hidden = np.int64(1) << mbits
    sbit = np.int64(1) << (ebits + mbits)
    for _ in range(steps):
        e = (v >> mbits) & emax
        top = ((v & (hidden - 1)) | hidden) * cm
        up = top >> (mbits + 24)
        er = e + ce - 127 + up
        if e == 0 or e == emax or er <= 0:
            v = _scale_one(v, ebits, mbits, cm, ce, 1)
            continue
        sh = 23 + up
        q = top >> sh
        rem = top & ((np.int64(1) << sh) - 1)
        half = np.int64(1) << (sh - 1)
        q += (rem > half) | ((rem == half) & ((q & 1) == 1))
        v = (v & sbit) | min((er << mbits) + q - hidden, emax << mbits)
    return v


@njit(nogil=True)
def _scale_pred(base, out, ebits, mbits, cbits, steps):
    """out[i] = _scale_one(base[i]): the scaled prediction of a whole region (encoder side)."""
    cm = np.int64((cbits & 0x7FFFFF) | 0x800000)
    ce = np.int64((cbits >> 23) & 0xFF)
    for i in range(base.size):
        out[i] = _scale_one(np.int64(base[i]), ebits, mbits, cm, ce, steps)


@njit(nogil=True)
def _unsub(t, base, out, bits, perm, scaled, ebits, mbits, cbits, steps):
    """Inverse of the sub transform for one 16- or 32-bit region, in one pass without temporaries:
    out = p + unzigzag(z), z = T (with the f32 plane permutation undone when perm), p = base or its scaled
    prediction. Arithmetic in int64, masked to the element width."""
    mask = (np.int64(1) << bits) - 1
    cm = np.int64((cbits & 0x7FFFFF) | 0x800000)
    ce = np.int64((cbits >> 23) & 0xFF)
    emax = (np.int64(1) << ebits) - 1
    hidden = np.int64(1) << mbits
    sbit = np.int64(1) << (ebits + mbits)
    inf = emax << mbits
    slow = False
    for i in range(t.size):
        w = np.int64(t[i])
        if perm:
            z = (((w >> 23) & 0xFF) << 24) | ((w >> 31) << 23) | (w & 0x7FFFFF)
        else:
            z = w
        d = (z >> 1) ^ -(z & 1)
        v = np.int64(base[i])
        if not scaled:
            p = v
        elif steps != 1:
            p = _scale_fast(v, ebits, mbits, cm, ce, steps)
        else:
            # _scale_fast's common case without its branch, so that this loop vectorises. Zeros,
            # inf and nan predict themselves (selected here: all-zero optimizer rows are common);
            # subnormal elements and subnormal products are redone below.
            e = (v >> mbits) & emax
            prod = ((v & (hidden - 1)) | hidden) * cm
            up = prod >> (mbits + 24)
            er = e + ce - 127 + up
            same = (e == emax) | ((v & (sbit - 1)) == 0)
            slow |= (e != emax) & ((v & (sbit - 1)) != 0) & ((e == 0) | (er <= 0))
            sh = 23 + up
            q = prod >> sh
            rem = prod & ((np.int64(1) << sh) - 1)
            half = np.int64(1) << (sh - 1)
            q += (rem > half) | ((rem == half) & ((q & 1) == 1))
            p = v if same else (v & sbit) | min((er << mbits) + q - hidden, inf)
        out[i] = (p + d) & mask
    if slow:
        for i in range(t.size):
            v = np.int64(base[i])
            e = (v >> mbits) & emax
            er = e + ce - 127 + ((((v & (hidden - 1)) | hidden) * cm) >> (mbits + 24))
            if e != emax and (v & (sbit - 1)) != 0 and (e == 0 or er <= 0):
                w = np.int64(t[i])
                if perm:
                    z = (((w >> 23) & 0xFF) << 24) | ((w >> 31) << 23) | (w & 0x7FFFFF)
                else:
                    z = w
                out[i] = (_scale_one(v, ebits, mbits, cm, ce, 1) + ((z >> 1) ^ -(z & 1))) & mask


def warm_up() -> None:
    """Load (or compile) the decode kernels for the common region types, so the first delta read does not
    pay for it (about 0.1 s from numba's cache, seconds without)."""
    for u, bits, perm, (ebits, mbits) in ((np.uint32, 32, True, (8, 23)), (np.uint16, 16, False, (8, 7))):
        n = 64 * np.dtype(u).itemsize
        # the argument types of real calls: the residual in a writable scratch buffer (or a read-only
        # view of bytes when another codec decoded it), the base a read-only view of bytes, a
        # writable output, each aligned or not (a region can start at any offset)
        for skip in (0, 1):
            ro = np.frombuffer(bytes(n + skip), np.uint8)[skip:].view(u)
            out = np.empty(n + skip, np.uint8)[skip:].view(u)
            for residual in (np.zeros(n + skip, np.uint8)[skip:].view(u), ro):
                _unsub(residual, ro, out, bits, perm, True, ebits, mbits, 0x3F7FFFF8, 1)


def _zigzag(d: np.ndarray, width: int) -> np.ndarray:
    s = d.view(SINT[width])
    return ((d << UINT[width](1)) ^ (s >> (8 * width - 1)).view(UINT[width])).astype(UINT[width], copy=False)


def _unzigzag(z: np.ndarray, width: int) -> np.ndarray:
    u = UINT[width]
    return (z >> u(1)) ^ (-(z & u(1)).view(SINT[width])).view(u)


def _planes_u32(v: np.ndarray) -> np.ndarray:
    """Bit permutation that makes the tensor codec's f32 field split produce the 4 byte planes of v."""
    one = np.uint32(1)
    return ((v >> np.uint32(24)) << np.uint32(23)) | (((v >> np.uint32(23)) & one) << np.uint32(31)) | (v & np.uint32(0x7FFFFF))
