"""Checkpoint delta codec (id 32): code a chunk against the same chunk of an earlier, similar file.

The new chunk is transformed against its base chunk (XOR, or integer subtraction per element with an optional
per-region multiplicative prediction, zigzag-mapped), and the transformed bytes are coded by the ordinary keyframe
coder (``encode_chunk`` / ``decode_chunk``: tensor field streams + rANS). docs/delta.md has the on-disk format.

Pure functions, no shared mutable state: safe to call from many threads (the numba kernels release the GIL).
"""
from __future__ import annotations

import logging
import struct
import threading

import numpy as np

from .varint import get_varint, put_varint
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
    put_varint(out, v)


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    return get_varint(buf, pos, "delta", 56)


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
        # the argument types of real calls: read-only views of bytes, a writable output, each
        # aligned or not (a region can start at any offset)
        for skip in (0, 1):
            ro = np.frombuffer(bytes(n + skip), np.uint8)[skip:].view(u)
            out = np.empty(n + skip, np.uint8)[skip:].view(u)
            _unsub(ro, ro, out, bits, perm, True, ebits, mbits, 0x3F7FFFF8, 1)


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


# Decoding costs one emulated multiply per element per step. Searching steps up to 100
# found AdamW's exact per-step decay (step30 vs step20: 0.2829 of the size) but halved
# delta decode speed; one step keeps 0.2949 at twice the speed (2026-11-29, 1 MiB chunks,
# every third chunk of the step30/step20 safetensors pair). The format still allows any
# step count, so files written with more steps decode as before.
STEP_CANDIDATES = (1,)
FIT_SAMPLE = 64  # normal elements on which exact (c, steps) candidates are compared


def _f32_bits(x: float) -> int:
    """f32 bit pattern of x, or 0 (rejected as a scale) when x is not a finite float in (2**-30, 2**30)."""
    if not 2.0**-30 < x < 2.0**30:  # also false for nan
        return 0
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _fit_scale(new: np.ndarray, base: np.ndarray, kind: int) -> tuple[int, int] | None:
    """(f32 bits of c, steps) predicting new from base, or None.

    c**steps is the median ratio new/base over a sample of normal elements. steps > 1 is kept when iterating the
    multiply reproduces more elements exactly (AdamW decays state and weights by one constant factor per step, and
    rows without gradient are exactly base * beta**steps with per-step rounding).
    """
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
    ratio = float(np.median(r))
    cands = []
    for steps in STEP_CANDIDATES:
        c0 = _f32_bits(ratio ** (1.0 / steps))
        for dc in ((0,) if steps == 1 else (-2, -1, 0, 1, 2)):
            c = c0 + dc
            if C_MIN_EXP <= c >> 23 <= C_MAX_EXP and not (c == 0x3F800000 and steps == 1):
                cands.append((c, steps))
    if not cands:
        return None
    u = UINT[KIND_WIDTH[kind]]
    nb, nn = base[::step][ok], new[::step][ok]
    if nb.size > FIT_SAMPLE:
        pick = np.linspace(0, nb.size - 1, FIT_SAMPLE).astype(np.int64)
        nb, nn = nb[pick], nn[pick]
    nb, nn = np.ascontiguousarray(nb, u), np.ascontiguousarray(nn, u)
    out = np.empty_like(nb)
    best, best_hits = cands[0], -1
    for c, steps in cands:
        _scale_pred(nb, out, ebits, mbits, c, steps)
        hits = int(np.count_nonzero(out == nn))
        if hits > best_hits:
            best, best_hits = (c, steps), hits
    if best_hits < max(3, nb.size // 16):
        c = _f32_bits(ratio)  # no exact reproduction: one multiply by the median ratio
        if not C_MIN_EXP <= c >> 23 <= C_MAX_EXP or c == 0x3F800000:
            return None
        return c, 1
    return best


def _predict(base: np.ndarray, kind: int, scale: tuple[int, int]) -> np.ndarray:
    ebits, mbits = KIND_FLOAT[kind]
    out = np.empty_like(base)
    _scale_pred(np.ascontiguousarray(base), out, ebits, mbits, scale[0], scale[1])
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
    scale = _fit_scale(n, b, kind)
    if scale is None:
        return z, None
    zs = _zigzag(n - _predict(b, kind, scale), width)
    step = max(1, z.size // 16384)
    if _order0_bits(_byte_planes(zs[::step], width)) + 32 < _order0_bits(_byte_planes(z[::step], width)):
        return zs, scale
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


_local = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A per-thread output buffer: a fresh 1 MiB array per chunk costs its page faults every time."""
    buf = getattr(_local, "out", None)
    if buf is None or buf.size < n:
        buf = _local.out = np.empty(max(n, 1 << 20), np.uint8)
    return buf[:n]


def _untransform(data: bytes, base, desc, transform: int) -> bytes:
    t = np.frombuffer(data, np.uint8)
    old = np.frombuffer(base, np.uint8)
    out = _scratch(t.size)
    pos = 0
    for length, kind, cbits in desc:
        width = KIND_WIDTH[kind]
        z, b, o = t[pos : pos + length], old[pos : pos + length], out[pos : pos + length]
        if transform == T_XOR:
            np.bitwise_xor(z, b, out=o)
        elif kind == K_BYTES:
            o[:] = b + _unzigzag(z, 1)
        elif width in (2, 4):
            u = UINT[width]
            ebits, mbits = KIND_FLOAT.get(kind, (8, 23))
            c, steps = cbits if cbits is not None else (0x3F800000, 0)
            _unsub(z.view(u), b.view(u), o.view(u), 8 * width, width == 4, cbits is not None, ebits, mbits, c,
                   steps)
        else:
            u = UINT[width]
            o.view(u)[:] = b.view(u) + _unzigzag(z.view(u), width)
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
            out += struct.pack("<IB", *cbits)
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
            if kind not in KIND_FLOAT or transform != T_SUB or pos + 5 > len(params):
                raise CodecError("delta params: bad scaled region")
            cbits = struct.unpack_from("<IB", params, pos)
            pos += 5
            if cbits[0] >> 31 or not C_MIN_EXP <= cbits[0] >> 23 <= C_MAX_EXP or cbits[1] == 0:
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
    base = memoryview(base)[:raw_len] if len(base) >= raw_len else bytes(base).ljust(raw_len, b"\0")
    try:
        out = _untransform(data, base, desc, transform)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"delta: {exc}") from exc
    if len(out) != raw_len:
        raise CodecError(f"delta decoded {len(out)} bytes, expected {raw_len}")
    return out
