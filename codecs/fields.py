"""Split float elements into entropy-friendly byte streams (exponent, sign+mantissa-top, mantissa bytes) and back."""
from __future__ import annotations

import logging
import threading

from ._jit import njit
import numpy as np

log = logging.getLogger(__name__)

# class id -> (element width, number of streams); ids are part of the on-disk format (docs/codecs.md)
CLASS_GENERIC = 0
CLASS_BF16 = 1  # streams: exponent(8) | sign<<7 + mantissa(7)
CLASS_F16 = 2  # streams: high byte (sign, exponent 5, mantissa top 2) | low mantissa byte
CLASS_F32 = 3  # streams: exponent(8) | sign<<7 + mantissa bits 22..16 | mantissa 15..8 | mantissa 7..0
CLASS_F64 = 4  # streams: bytes 7..0 (byte planes, most significant first)
# zero-masked variants (codecs/zeros.py): a run list of +0.0 elements, then the base class's streams over the
# nonzero elements only
CLASS_BF16Z = 5
CLASS_F16Z = 6
CLASS_F32Z = 7
CLASSES = {
    CLASS_GENERIC: (1, 1),
    CLASS_BF16: (2, 2),
    CLASS_F16: (2, 2),
    CLASS_F32: (4, 4),
    CLASS_F64: (8, 8),
    CLASS_BF16Z: (2, 3),
    CLASS_F16Z: (2, 3),
    CLASS_F32Z: (4, 5),
}
DTYPE_CLASS = {"bf16": CLASS_BF16, "f16": CLASS_F16, "f32": CLASS_F32, "f64": CLASS_F64}


@njit(nogil=True)
def _split_bf16(u, e, sm):
    for i in range(u.size):
        v = u[i]
        e[i] = (v >> 7) & 0xFF
        sm[i] = ((v >> 8) & 0x80) | (v & 0x7F)


@njit(nogil=True)
def _merge_bf16(e, sm, u):
    for i in range(u.size):
        s = np.uint16(sm[i])
        u[i] = (np.uint16(e[i]) << 7) | ((s & 0x80) << 8) | (s & 0x7F)


@njit(nogil=True)
def _split_f32(u, e, sm, m1, m0):
    for i in range(u.size):
        v = u[i]
        e[i] = (v >> 23) & 0xFF
        sm[i] = ((v >> 24) & 0x80) | ((v >> 16) & 0x7F)
        m1[i] = (v >> 8) & 0xFF
        m0[i] = v & 0xFF


@njit(nogil=True)
def _merge_f32(e, sm, m1, m0, u):
    for i in range(u.size):
        s = np.uint32(sm[i])
        u[i] = (
            (np.uint32(e[i]) << 23)
            | ((s & 0x80) << 24)
            | ((s & 0x7F) << 16)
            | (np.uint32(m1[i]) << 8)
            | np.uint32(m0[i])
        )


@njit(nogil=True)
def _split_f16(u, hi, lo):
    for i in range(u.size):
        hi[i] = u[i] >> 8
        lo[i] = u[i] & 0xFF


@njit(nogil=True)
def _merge_f16(hi, lo, u):
    for i in range(u.size):
        u[i] = (np.uint16(hi[i]) << 8) | np.uint16(lo[i])


@njit(nogil=True)
def _split_planes(b, width, planes):
    # planes[k] holds byte (width-1-k) of every element: most significant plane first
    n = b.size // width
    for i in range(n):
        for k in range(width):
            planes[k, i] = b[i * width + width - 1 - k]


@njit(nogil=True)
def _merge_planes(planes, width, b):
    n = b.size // width
    for i in range(n):
        for k in range(width):
            b[i * width + width - 1 - k] = planes[k, i]


JOINT_MIN = 1 << 15  # from this many elements on, one 65536-bin histogram of whole elements is the cheaper count


@njit(nogil=True, boundscheck=False)
def _count16(u, mode, joint, counts):
    """Histograms of both streams of 2-byte elements u (mode 1 bf16, 2 f16) into counts[0] / counts[1], those of
    every 8th element into counts[2] / counts[3] (tensor._plan_plane's raw test), and +0.0 elements, all / every
    16th, into counts[4, 0] / counts[4, 1] (zeros.zeros_if_worth). Large inputs count whole elements in joint
    (65536 uint32 bins, all zero on entry and left so: _joint) and fold: one increment per element instead of one
    per stream byte."""
    n = u.size
    if n < JOINT_MIN:
        for i in range(n):
            v = np.int64(u[i])
            if mode == 1:
                x = (v >> 7) & 0xFF
                y = ((v >> 8) & 0x80) | (v & 0x7F)
            else:
                x = v >> 8
                y = v & 0xFF
            counts[0, x] += 1
            counts[1, y] += 1
            counts[4, 0] += v == 0
            if (i & 7) == 0:
                counts[2, x] += 1
                counts[3, y] += 1
                if (i & 15) == 0 and v == 0:
                    counts[4, 1] += 1
        return
    n8 = n & ~7
    for i in range(0, n8, 8):
        v = np.int64(u[i])
        if mode == 1:
            counts[2, (v >> 7) & 0xFF] += 1
            counts[3, ((v >> 8) & 0x80) | (v & 0x7F)] += 1
        else:
            counts[2, v >> 8] += 1
            counts[3, v & 0xFF] += 1
        if (i & 15) == 0 and v == 0:
            counts[4, 1] += 1
        joint[v] += 1
        for k in range(1, 8):
            joint[u[i + k]] += 1
    for i in range(n8, n):  # i % 8 != 0 here: no sample
        joint[u[i]] += 1
    counts[4, 0] = joint[0]
    # fold: the sums of runs of bins first (contiguous, vectorised), then the other stream from the non-empty
    # runs only (a chunk uses ~25 of the 256 bf16 exponents)
    runs = np.zeros(512, np.int64)
    rl = 128 if mode == 1 else 256
    for r in range(65536 // rl):
        t = np.int64(0)
        for m in range(rl):
            t += joint[r * rl + m]
        runs[r] = t
    for r in range(65536 // rl):
        if runs[r] == 0:
            continue
        if mode == 1:  # run r = sign << 8 | exponent, bins = mantissa
            counts[0, r & 0xFF] += runs[r]
            hi = (r >> 8) << 7
            for m in range(128):
                counts[1, hi | m] += joint[r * 128 + m]
        else:  # run r = high byte, bins = low byte
            counts[0, r] += runs[r]
            for m in range(256):
                counts[1, m] += joint[r * 256 + m]
        joint[r * rl : (r + 1) * rl] = 0  # left clean for the next call


_local = threading.local()


def _joint() -> np.ndarray:
    """This thread's 65536 bins for _count16, all zero between calls (clearing them for every chunk cost more
    than counting a bf16 exponent plane)."""
    j = getattr(_local, "joint", None)
    if j is None:
        j = _local.joint = np.zeros(1 << 16, np.uint32)
    return j


def split_count(cls: int, data: np.ndarray, out: np.ndarray | None = None):
    """(streams, counts) of a 2-byte float class (bf16, f16): the streams as split() gives them (into out, 2 * n
    bytes, when given) and counts as _count16 fills them."""
    n = data.size // 2
    u = data.view("<u2")
    if out is None:
        out = np.empty(2 * n, np.uint8)
    a, b = out[:n], out[n : 2 * n]
    counts = np.zeros((5, 256), np.int64)
    # count first, split second: the coder then reads streams that are still in the cache (the other order cost
    # ~10% of the encoding time of a 1 MiB chunk)
    _count16(u, 1 if cls == CLASS_BF16 else 2, _joint(), counts)
    if cls == CLASS_BF16:
        _split_bf16(u, a, b)
    else:
        _split_f16(u, a, b)
    return [a, b], counts


def split(cls: int, data: np.ndarray) -> list[np.ndarray]:
    """Split a uint8 array of whole elements into the class's streams (uint8 arrays)."""
    width, nstreams = CLASSES[cls]
    n = data.size // width
    if cls == CLASS_BF16:
        e, sm = np.empty(n, np.uint8), np.empty(n, np.uint8)
        _split_bf16(data.view("<u2"), e, sm)
        return [e, sm]
    if cls == CLASS_F32:
        out = [np.empty(n, np.uint8) for _ in range(4)]
        _split_f32(data.view("<u4"), *out)
        return out
    if cls == CLASS_F16:
        hi, lo = np.empty(n, np.uint8), np.empty(n, np.uint8)
        _split_f16(data.view("<u2"), hi, lo)
        return [hi, lo]
    if cls == CLASS_GENERIC:
        return [data]
    planes = np.empty((width, n), np.uint8)
    _split_planes(data, width, planes)
    return list(planes)


def merge(cls: int, streams: list[np.ndarray], nbytes: int) -> np.ndarray:
    """Inverse of split: rebuild nbytes of elements from the decoded streams."""
    width, _ = CLASSES[cls]
    n = nbytes // width
    if cls == CLASS_GENERIC:
        return streams[0]
    if cls == CLASS_BF16:
        u = np.empty(n, "<u2")
        _merge_bf16(streams[0], streams[1], u)
        return u.view(np.uint8)
    if cls == CLASS_F32:
        u = np.empty(n, "<u4")
        _merge_f32(*streams, u)
        return u.view(np.uint8)
    if cls == CLASS_F16:
        u = np.empty(n, "<u2")
        _merge_f16(streams[0], streams[1], u)
        return u.view(np.uint8)
    out = np.empty(nbytes, np.uint8)
    _merge_planes(np.stack(streams), width, out)
    return out
