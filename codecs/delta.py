"""Checkpoint delta codec (id 32): code a chunk against the same chunk of an earlier, similar file.

The new chunk is transformed against its base chunk (XOR, or integer subtraction per element with an optional
per-region multiplicative prediction, zigzag-mapped), and the transformed bytes are coded by the ordinary keyframe
coder (``encode_chunk`` / ``decode_chunk``: tensor field streams + rANS). docs/delta.md has the on-disk format.

Pure functions, no shared mutable state: safe to call from many threads (the numba kernels release the GIL).
"""
from __future__ import annotations

import logging
import struct

import numpy as np

from ._jit import njit
from .api import ChunkHints, CodecError, EncodedChunk, Segment, decode_chunk, encode_chunk

log = logging.getLogger(__name__)

CODEC_DELTA = 32
FORMAT_VERSION = 1
MAX_BASE_REF = 64

# transforms (on-disk format)
T_XOR = 0
T_SUB = 1

# region kinds (on-disk format; the same numbers as the tensor codec's classes)
K_BYTES, K_BF16, K_F16, K_F32, K_F64 = 0, 1, 2, 3, 4
KIND_WIDTH = {K_BYTES: 1, K_BF16: 2, K_F16: 2, K_F32: 4, K_F64: 8}
DTYPE_KIND = {"bf16": K_BF16, "f16": K_F16, "f32": K_F32, "f64": K_F64}
KIND_DTYPE = {v: k for k, v in DTYPE_KIND.items()}
# (exponent bits, mantissa bits) of the kinds the scaled prediction supports
KIND_FLOAT = {K_BF16: (8, 7), K_F16: (5, 10), K_F32: (8, 23)}
F_SCALED = 0x80  # region flag: a u32 scale factor follows the kind byte
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SINT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
MIN_FLOAT_ELEMENTS = 16
SCALE_SAMPLE = 8192  # elements sampled to fit a region's scale factor
C_MIN_EXP, C_MAX_EXP = 127 - 16, 127 + 16  # accepted f32 exponents of a scale factor


# ---------------------------------------------------------------------------------------------- varints / params


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if pos >= len(buf) or shift > 56:
            raise CodecError("delta params: truncated varint")
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos


def delta_base_ref(params: bytes) -> bytes:
    """The base_ref stored in params (read before the base chunk is fetched)."""
    params = bytes(params)
    if len(params) < 2 or params[0] != FORMAT_VERSION:
        raise CodecError("delta params: unknown format version")
    n = params[1]
    if n > MAX_BASE_REF or 2 + n > len(params):
        raise CodecError("delta params: bad base_ref length")
    return params[2 : 2 + n]


# ---------------------------------------------------------------------------------------------- kernels


@njit(nogil=True)
def _scale_pred(base, out, ebits, mbits, cm, ce):
    """out = base * c per element on float bit patterns, in integer arithmetic only (no FPU flags can change it).

    c = cm * 2**(ce - 23) with cm in [2**23, 2**24). Zero, subnormal, inf and nan elements predict themselves;
    results that underflow become signed zero, results that overflow keep the base. Rounding: half up.
    """
    emax = (1 << ebits) - 1
    mmask = (1 << mbits) - 1
    sbit = np.int64(1) << (ebits + mbits)
    top = np.int64(1) << (mbits + 24)
    full = np.int64(1) << (mbits + 1)
    for i in range(base.size):
        v = np.int64(base[i])
        e = (v >> mbits) & emax
        if e == 0 or e == emax:
            out[i] = base[i]
            continue
        p = ((v & mmask) | (mmask + 1)) * cm
        if p >= top:
            mant = (p + (1 << 23)) >> 24
            e2 = e + ce + 1
        else:
            mant = (p + (1 << 22)) >> 23
            e2 = e + ce
        if mant == full:
            mant >>= 1
            e2 += 1
        if e2 <= 0:
            r = v & sbit
        elif e2 >= emax:
            r = v
        else:
            r = (v & sbit) | (e2 << mbits) | (mant & mmask)
        out[i] = r


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


def _unplanes_u32(w: np.ndarray) -> np.ndarray:
    return (((w >> np.uint32(23)) & np.uint32(0xFF)) << np.uint32(24)) | ((w >> np.uint32(31)) << np.uint32(23)) | (
        w & np.uint32(0x7FFFFF))


# ---------------------------------------------------------------------------------------------- regions


def plan_regions(raw_len: int, segments) -> list[tuple[int, int]]:
    """Cover [0, raw_len) with (length, kind) regions: whole elements of known float dtypes, bytes elsewhere."""
    regions: list[tuple[int, int]] = []

    def add(length: int, kind: int) -> None:
        if length <= 0:
            return
        if regions and regions[-1][1] == kind == K_BYTES:
            regions[-1] = (regions[-1][0] + length, kind)
        else:
            regions.append((length, kind))

    pos = 0
    for seg in sorted(segments, key=lambda s: s.start):
        start, end = max(seg.start, pos), min(seg.start + seg.length, raw_len)
        if end <= start:
            continue
        kind = DTYPE_KIND.get(seg.dtype, K_BYTES)
        width = KIND_WIDTH[kind]
        first = seg.start + -(-(start - seg.start) // width) * width
        n_el = (end - first) // width if end > first else 0
        if kind == K_BYTES or n_el < MIN_FLOAT_ELEMENTS:
            add(end - pos, K_BYTES)
        else:
            add(first - pos, K_BYTES)
            add(n_el * width, kind)
            add(end - (first + n_el * width), K_BYTES)
        pos = end
    add(raw_len - pos, K_BYTES)
    return regions


def _segments_for(raw: bytes, base: bytes, hints: ChunkHints) -> tuple:
    if hints.segments:
        return hints.segments
    from . import probe

    segs = probe.probe_segments(raw)
    if not segs and base:
        x = np.frombuffer(raw, np.uint8) ^ np.frombuffer(base, np.uint8)
        segs = probe.probe_segments(x.tobytes())
    return segs


# ---------------------------------------------------------------------------------------------- transforms


def _fit_scale(new: np.ndarray, base: np.ndarray, kind: int) -> int | None:
    """f32 bit pattern of the median ratio new/base over a sample of normal base elements, or None."""
    ebits, mbits = KIND_FLOAT[kind]
    step = max(1, base.size // SCALE_SAMPLE)
    b, n = base[::step].astype(np.int64), new[::step].astype(np.int64)
    emax = (1 << ebits) - 1
    eb, en = (b >> mbits) & emax, (n >> mbits) & emax
    ok = (eb > 0) & (eb < emax) & (en > 0) & (en < emax)
    if ok.sum() < 16:
        return None
    sign = np.int64(1) << (ebits + mbits)
    def val(x, e):
        m = (x & ((1 << mbits) - 1)) / float(1 << mbits) + 1.0
        return np.where(x & sign, -1.0, 1.0) * np.ldexp(m, (e - (emax >> 1)).astype(np.int32))
    r = val(n[ok], en[ok]) / val(b[ok], eb[ok])
    r = r[r > 0]
    if r.size < 16:
        return None
    c = float(np.median(r))
    bits = struct.unpack("<I", struct.pack("<f", c))[0]
    e = bits >> 23
    if not C_MIN_EXP <= e <= C_MAX_EXP or bits == 0x3F800000:
        return None
    return bits


def _predict(base: np.ndarray, kind: int, cbits: int) -> np.ndarray:
    ebits, mbits = KIND_FLOAT[kind]
    out = np.empty_like(base)
    _scale_pred(base, out, ebits, mbits, (cbits & 0x7FFFFF) | 0x800000, (cbits >> 23) - 127)
    return out


def _order0_bits(planes) -> float:
    bits = 0.0
    for p in planes:
        if p.size == 0:
            continue
        c = np.bincount(p, minlength=256)
        c = c[c > 0].astype(np.float64)
        bits += float(-(c * np.log2(c / p.size)).sum())
    return bits


def _byte_planes(z: np.ndarray, width: int):
    b = np.ascontiguousarray(z).view(np.uint8).reshape(-1, width)
    return [b[:, k] for k in range(width)]


def _sub_region(new: np.ndarray, base: np.ndarray, kind: int, width: int, allow_scale: bool):
    """(zigzag residual, scale bits or None) for one float region; the scale is kept if it lowers order-0."""
    u = UINT[width]
    n, b = new.view(u), base.view(u)
    z = _zigzag(n - b, width)
    if not allow_scale or kind not in KIND_FLOAT:
        return z, None
    cbits = _fit_scale(n, b, kind)
    if cbits is None:
        return z, None
    zs = _zigzag(n - _predict(b, kind, cbits), width)
    step = max(1, z.size // 16384)
    if _order0_bits(_byte_planes(zs[::step], width)) + 32 < _order0_bits(_byte_planes(z[::step], width)):
        return zs, cbits
    return z, None


def _transform(raw: bytes, base: bytes, regions, transform: int, allow_scale: bool = True):
    """(transformed bytes, inner segments, region descriptors [(length, kind, cbits|None)])."""
    new = np.frombuffer(raw, np.uint8)
    old = np.frombuffer(base, np.uint8)
    out = np.empty_like(new)
    segs, desc = [], []
    pos = 0
    for length, kind in regions:
        width = KIND_WIDTH[kind]
        n, b, o = new[pos : pos + length], old[pos : pos + length], out[pos : pos + length]
        cbits = None
        if transform == T_XOR:
            np.bitwise_xor(n, b, out=o)
            if kind != K_BYTES:
                segs.append(Segment(pos, length, KIND_DTYPE[kind]))
        elif kind == K_BYTES:
            o[:] = _zigzag(n - b, 1)
        else:
            z, cbits = _sub_region(n, b, kind, width, allow_scale)
            if width == 4:
                z = _planes_u32(z)
            o.view(UINT[width])[:] = z
            segs.append(Segment(pos, length, {2: "f16", 4: "f32", 8: "f64"}[width]))
        desc.append((length, kind, cbits))
        pos += length
    return out.tobytes(), tuple(segs), desc


def _untransform(data: bytes, base: bytes, desc, transform: int) -> bytes:
    t = np.frombuffer(data, np.uint8)
    old = np.frombuffer(base, np.uint8)
    out = np.empty_like(t)
    pos = 0
    for length, kind, cbits in desc:
        width = KIND_WIDTH[kind]
        z, b, o = t[pos : pos + length], old[pos : pos + length], out[pos : pos + length]
        if transform == T_XOR:
            np.bitwise_xor(z, b, out=o)
        elif kind == K_BYTES:
            o[:] = b + _unzigzag(z, 1)
        else:
            u = UINT[width]
            zz = z.view(u)
            if width == 4:
                zz = _unplanes_u32(zz)
            bb = b.view(u)
            if cbits is not None:
                bb = _predict(bb, kind, cbits)
            o.view(u)[:] = bb + _unzigzag(zz, width)
        pos += length
    return out.tobytes()


def _estimate(data: bytes, segs) -> float:
    """Rough order-0 size in bytes of transformed data split the way the inner coder will split it."""
    arr = np.frombuffer(data, np.uint8)
    step = 4 if arr.size > 65536 else 1
    bits = 0.0
    covered = np.zeros(0)
    pos = 0
    for s in segs:
        if s.start > pos:
            bits += _order0_bits([arr[pos : s.start : step]]) * step
        width = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}[s.dtype]
        region = arr[s.start : s.start + s.length].reshape(-1, width)[::step]
        bits += _order0_bits([region[:, k] for k in range(width)]) * step
        pos = s.start + s.length
    if pos < arr.size:
        bits += _order0_bits([arr[pos::step]]) * step
    del covered
    return bits / 8


# ---------------------------------------------------------------------------------------------- public API


def _params(base_ref: bytes, transform: int, desc, inner: EncodedChunk) -> bytes:
    out = bytearray([FORMAT_VERSION, len(base_ref)])
    out += base_ref
    out.append(transform)
    _put_varint(out, len(desc))
    for length, kind, cbits in desc:
        _put_varint(out, length)
        if cbits is None:
            out.append(kind)
        else:
            out.append(kind | F_SCALED)
            out += struct.pack("<I", cbits)
    out.append(inner.codec_id)
    out += inner.params
    return bytes(out)


def encode_delta(raw: bytes, base: bytes, hints: ChunkHints | None, base_ref: bytes) -> EncodedChunk | None:
    """Delta-encode raw against base; None when that is not smaller than the keyframe encode_chunk(raw, hints)."""
    raw, base_ref = bytes(raw), bytes(base_ref)
    if len(base_ref) > MAX_BASE_REF:
        raise ValueError(f"base_ref is {len(base_ref)} bytes, at most {MAX_BASE_REF}")
    hints = hints or ChunkHints()
    if not raw:
        return None
    base = bytes(base[: len(raw)]).ljust(len(raw), b"\0")
    regions = plan_regions(len(raw), _segments_for(raw, base, hints))
    keyframe = encode_chunk(raw, hints)
    key_size = len(keyframe.params) + len(keyframe.payload)
    cands = []
    for transform in (T_SUB, T_XOR):
        data, segs, desc = _transform(raw, base, regions, transform)
        cands.append((_estimate(data, segs), transform, data, segs, desc))
    cands.sort(key=lambda c: c[0])
    _, transform, data, segs, desc = cands[0]
    inner = encode_chunk(data, ChunkHints(segments=segs, level=hints.level, effort=hints.effort))
    enc = EncodedChunk(CODEC_DELTA, _params(base_ref, transform, desc, inner), inner.payload)
    if len(enc.params) + len(enc.payload) >= key_size or len(enc.params) > 65535:
        return None
    return enc


def _parse(params: bytes, raw_len: int):
    ref = delta_base_ref(params)
    pos = 2 + len(ref)
    if pos >= len(params):
        raise CodecError("delta params: truncated")
    transform = params[pos]
    if transform not in (T_XOR, T_SUB):
        raise CodecError(f"delta params: unknown transform {transform}")
    n, pos = _get_varint(params, pos + 1)
    if n > raw_len + 1:
        raise CodecError("delta params: more regions than bytes")
    desc, total = [], 0
    for _ in range(n):
        length, pos = _get_varint(params, pos)
        if pos >= len(params):
            raise CodecError("delta params: truncated region list")
        kind, flags = params[pos] & 0x7F, params[pos] & F_SCALED
        pos += 1
        if kind not in KIND_WIDTH or length % KIND_WIDTH[kind] or length == 0:
            raise CodecError(f"delta params: bad region kind {kind} / length {length}")
        cbits = None
        if flags:
            if kind not in KIND_FLOAT or transform != T_SUB or pos + 4 > len(params):
                raise CodecError("delta params: bad scaled region")
            (cbits,) = struct.unpack_from("<I", params, pos)
            pos += 4
            if cbits >> 31 or not C_MIN_EXP <= cbits >> 23 <= C_MAX_EXP:
                raise CodecError("delta params: scale factor out of range")
        desc.append((length, kind, cbits))
        total += length
    if total != raw_len:
        raise CodecError("delta params: regions do not cover the chunk")
    if pos >= len(params):
        raise CodecError("delta params: missing inner codec")
    return transform, desc, params[pos], params[pos + 1 :]


def decode_delta(params: bytes, payload: bytes | memoryview, raw_len: int, base: bytes) -> bytes:
    """Rebuild the chunk from params + payload and the base chunk's raw bytes; CodecError on damage."""
    params = bytes(params)
    if raw_len < 0:
        raise CodecError(f"negative raw_len {raw_len}")
    transform, desc, inner_id, inner_params = _parse(params, raw_len)
    data = decode_chunk(inner_id, inner_params, payload, raw_len)
    base = bytes(base[:raw_len]).ljust(raw_len, b"\0")
    try:
        out = _untransform(data, base, desc, transform)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"delta: {exc}") from exc
    if len(out) != raw_len:
        raise CodecError(f"delta decoded {len(out)} bytes, expected {raw_len}")
    return out
