"""The delta format's regions: kinds, transforms, scale-factor limits, and how a chunk is cut into regions."""
from __future__ import annotations

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
MIN_FLOAT_ELEMENTS = 16
C_MIN_EXP, C_MAX_EXP = 127 - 16, 127 + 16  # accepted f32 exponents of a scale factor


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
