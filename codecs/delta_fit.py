"""The delta encoder's choices: each float region's scale factor, the forward transform and its estimated size."""
from __future__ import annotations

import struct

import numpy as np

from .api import ChunkHints, Segment
from .delta_kernels import UINT, _planes_u32, _scale_pred, _zigzag
from .delta_regions import C_MAX_EXP, C_MIN_EXP, K_BYTES, KIND_DTYPE, KIND_FLOAT, KIND_WIDTH, T_XOR

SCALE_SAMPLE = 8192  # elements sampled to fit a region's scale factor
# Decoding costs one emulated multiply per element per step. Searching steps up to 100
# found AdamW's exact per-step decay (step30 vs step20: 0.2829 of the size) but halved
# delta decode speed; one step keeps 0.2949 at twice the speed (2026-11-29, 1 MiB chunks,
# every third chunk of the step30/step20 safetensors pair). The format still allows any
# step count, so files written with more steps decode as before.
STEP_CANDIDATES = (1,)
FIT_SAMPLE = 64  # normal elements on which exact (c, steps) candidates are compared


def _segments_for(raw: bytes, base: bytes, hints: ChunkHints) -> tuple:
    if hints.segments:
        return hints.segments
    from . import probe

    segs = probe.probe_segments(raw)
    if not segs and base:
        x = np.frombuffer(raw, np.uint8) ^ np.frombuffer(base, np.uint8)
        segs = probe.probe_segments(x.tobytes())
    return segs


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
