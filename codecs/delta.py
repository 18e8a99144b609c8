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
from .api import CODEC_TENSOR, ChunkHints, CodecError, EncodedChunk, Segment, decode_chunk, encode_chunk  # noqa: F401
from .tensor_decode import decode_into as tensor_decode_into, finish_bytes, new_bytes
from .tensor_format import FORMAT_VERSION as TENSOR_V1
# Re-exported so that callers keep importing the codec's names from here. encode_delta calls
# _transform through this module's global, which tools/bench_delta.py --no-scale replaces.
from .delta_kernels import SINT, UINT, _scale_pred, _unsub, _unzigzag, _zigzag, warm_up  # noqa: F401
from .delta_regions import (  # noqa: F401
    C_MAX_EXP, C_MIN_EXP, DTYPE_KIND, K_BF16, K_BYTES, K_F16, K_F32, K_F64, KIND_DTYPE, KIND_FLOAT, KIND_WIDTH,
    MIN_FLOAT_ELEMENTS, T_SUB, T_XOR, plan_regions,
)
from .delta_fit import _estimate, _segments_for, _transform

log = logging.getLogger(__name__)

CODEC_DELTA = 32
FORMAT_VERSION = 1
MAX_BASE_REF = 64
F_SCALED = 0x80  # region flag: a u32 scale factor follows the kind byte


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


# ---------------------------------------------------------------------------------------------- decoding


_local = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A per-thread buffer for the decoded residual: a fresh 1 MiB array per chunk costs its page faults every
    time."""
    buf = getattr(_local, "residual", None)
    if buf is None or buf.size < n:
        buf = _local.residual = np.empty(max(n, 1 << 20), np.uint8)
    return buf[:n]


def _decode_residual(inner_id: int, inner_params: bytes, payload, raw_len: int) -> np.ndarray:
    """The transformed chunk T: a one-layer tensor encoding (what encode_delta writes) decodes straight into this
    thread's scratch buffer, without a bytes copy; other codecs through decode_chunk."""
    if inner_id != CODEC_TENSOR or not inner_params or inner_params[0] != TENSOR_V1:
        return np.frombuffer(decode_chunk(inner_id, inner_params, payload, raw_len), np.uint8)
    out = _scratch(raw_len)
    try:
        tensor_decode_into(inner_params, payload, raw_len, out)
    except CodecError:
        raise
    except Exception as exc:  # as decode_chunk: any failure on a damaged payload is a codec error
        raise CodecError(f"tensor: {exc}") from exc
    return out


def _untransform(data, base, desc, transform: int) -> bytes:
    """The chunk's raw bytes from T (any buffer) and the base, region by region."""
    t = np.frombuffer(data, np.uint8)
    old = np.frombuffer(base, np.uint8)
    raw, out = new_bytes(t.size)
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
    return finish_bytes(raw, out)


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
    data = _decode_residual(inner_id, inner_params, payload, raw_len)
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
