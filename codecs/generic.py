"""Generic byte codecs (zstd, lz4) with thread-local contexts and a cheap incompressibility test."""
from __future__ import annotations

import logging
import threading

import lz4.block
import numpy as np
import zstandard

log = logging.getLogger(__name__)

_local = threading.local()  # zstd contexts are not thread-safe: one per thread and level
SAMPLE_BYTES = 16384
INCOMPRESSIBLE_BITS = 7.85  # order-0 bits/byte above which zstd practically never wins


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "zc", None)
    if cache is None:
        cache = _local.zc = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "zd", None)
    if dec is None:
        dec = _local.zd = zstandard.ZstdDecompressor()
    return dec


def zstd_compress(raw: bytes, level: int = 3) -> bytes:
    return _compressor(max(-7, min(22, int(level)))).compress(raw)


def zstd_decompress(payload: bytes | memoryview, raw_len: int) -> bytes:
    from .api import CodecError

    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd frame header: {exc}") from exc
    if params.content_size != raw_len:
        raise CodecError(f"zstd frame says {params.content_size} bytes, expected {raw_len}")
    try:
        out = _decompressor().decompress(payload, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd: {exc}") from exc
    if len(out) != raw_len:
        raise CodecError(f"zstd decoded {len(out)} bytes, expected {raw_len}")
    return out


def lz4_compress(raw: bytes) -> bytes:
    return lz4.block.compress(raw, store_size=False)


def lz4_decompress(payload: bytes | memoryview, raw_len: int) -> bytes:
    from .api import CodecError

    if raw_len == 0:
        if len(payload):
            raise CodecError("lz4 payload for an empty chunk")
        return b""
    try:
        out = lz4.block.decompress(payload, uncompressed_size=raw_len)
    except lz4.block.LZ4BlockError as exc:
        raise CodecError(f"lz4: {exc}") from exc
    if len(out) != raw_len:
        raise CodecError(f"lz4 decoded {len(out)} bytes, expected {raw_len}")
    return out


def order0_bits(arr: np.ndarray) -> float:
    """Order-0 entropy in bits per byte of a uint8 array (0.0 when empty)."""
    if arr.size == 0:
        return 0.0
    counts = np.bincount(arr, minlength=256)
    counts = counts[counts > 0].astype(np.float64)
    p = counts / arr.size
    return float(-(p * np.log2(p)).sum())


def sample(raw: bytes, nbytes: int = SAMPLE_BYTES, pieces: int = 16) -> np.ndarray:
    """Evenly spaced slices of raw, so a sample sees the whole chunk without reading it all."""
    arr = np.frombuffer(raw, np.uint8)
    if arr.size <= nbytes:
        return arr
    piece = nbytes // pieces
    starts = np.linspace(0, arr.size - piece, pieces).astype(np.int64)
    return np.concatenate([arr[s : s + piece] for s in starts])


def looks_incompressible(raw: bytes) -> bool:
    return order0_bits(sample(raw)) > INCOMPRESSIBLE_BITS


def encode_generic(raw: bytes, effort: int, level: int | None) -> tuple[int, bytes] | None:
    """Best generic (codec_id, payload) for raw, or None when it should be stored."""
    from .api import CODEC_LZ4, CODEC_ZSTD

    if looks_incompressible(raw) and effort < 2:
        return None
    if effort <= 0 and level is None:
        return CODEC_LZ4, lz4_compress(raw)
    # level 6 beats whole-file zstd-3 on text even in 256 KiB chunks; 3 loses ~1.5% there
    lvl = level if level is not None else (6 if effort == 1 else 15)
    return CODEC_ZSTD, zstd_compress(raw, lvl)
