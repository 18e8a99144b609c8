"""Split float elements into entropy-friendly byte streams (exponent, sign+mantissa-top, mantissa bytes) and back."""
from __future__ import annotations

import logging

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
# bf16 with the exponent and top two mantissa bits as one symbol (codecs/joint.py): streams base exponent (one raw
# byte) | symbols | the six other bits of every element, packed (raw)
CLASS_BF16J = 8
# f32 with its top half coded as class 8 codes a bf16 element: streams base exponent | symbols | packed six bits |
# mantissa bits 15..0 (raw, little-endian uint16 per element)
CLASS_F32J = 9
CLASSES = {
    CLASS_GENERIC: (1, 1),
    CLASS_BF16: (2, 2),
    CLASS_F16: (2, 2),
    CLASS_F32: (4, 4),
    CLASS_F64: (8, 8),
    CLASS_BF16Z: (2, 3),
    CLASS_F16Z: (2, 3),
    CLASS_F32Z: (4, 5),
    CLASS_BF16J: (2, 3),
    CLASS_F32J: (4, 4),
}
JOINT_CLASSES = (CLASS_BF16J, CLASS_F32J)
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
