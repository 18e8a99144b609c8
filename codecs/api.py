"""Public codec contract: dataclasses, codec ids and the encode/decode dispatch."""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Codec ids are part of the on-disk format (docs/codecs.md): never renumber.
CODEC_STORE = 0
CODEC_ZSTD = 1
CODEC_LZ4 = 2
CODEC_BLOCKS = 3
CODEC_TENSOR = 16

_NAMES = {CODEC_STORE: "store", CODEC_ZSTD: "zstd", CODEC_LZ4: "lz4", CODEC_BLOCKS: "blocks", CODEC_TENSOR: "tensor"}
MAX_PARAMS = 65535


class CodecError(ValueError):
    """Malformed payload or params; the message says what is wrong."""


@dataclass(frozen=True)
class Segment:
    """A run of elements of one dtype inside a chunk (start is the element phase)."""

    start: int
    length: int
    dtype: str


@dataclass(frozen=True)
class ChunkHints:
    """What the caller knows about a chunk: its tensor segments, any forced codec, and the size of the blocks a
    small read should decode alone (0: the chunk is one piece; codecs/read_blocks.py)."""

    segments: tuple[Segment, ...] = ()
    codec: str | None = None
    level: int | None = None
    effort: int = 1
    block_size: int = 0
    block_seed: int = 0  # the chunk's index: each block's checksum is seeded with it


@dataclass(frozen=True)
class EncodedChunk:
    codec_id: int
    params: bytes
    payload: bytes


def codec_name(codec_id: int) -> str:
    try:
        return _NAMES[codec_id]
    except KeyError:
        raise CodecError(f"unknown codec id {codec_id}") from None


def _store(raw: bytes) -> EncodedChunk:
    return EncodedChunk(CODEC_STORE, b"", raw)


def encode_chunk(raw: bytes | memoryview, hints: ChunkHints | None = None) -> EncodedChunk:
    """Encode one chunk with the forced codec or the cheapest one found; STORE unless strictly smaller."""
    return _encode(bytes(raw), hints or ChunkHints())


def _encode(raw: bytes | memoryview, hints: ChunkHints) -> EncodedChunk:
    """encode_chunk of bytes, or of a view of bytes (a block of a chunk: no copy of it)."""
    from . import blocks, generic, probe, read_blocks

    if not raw:
        return _store(b"")
    forced = (hints.codec or "auto").lower()
    if forced == "store":
        return _store(bytes(raw))
    if hints.block_size and len(raw) > hints.block_size:
        best = read_blocks.encode(raw, hints, _encode_block)
    elif forced == "zstd":
        best = EncodedChunk(CODEC_ZSTD, b"", generic.zstd_compress(raw, hints.level or 3))
    elif forced == "lz4":
        best = EncodedChunk(CODEC_LZ4, b"", generic.lz4_compress(raw))
    elif forced in ("auto", "tensor"):
        segments = hints.segments or probe.probe_segments(raw)
        best = blocks.encode(raw, segments, hints.effort, hints.level, force=forced == "tensor")
    else:
        raise CodecError(f"unknown codec name {hints.codec!r}")
    if best is None or len(best.params) + len(best.payload) >= len(raw) or len(best.params) > MAX_PARAMS:
        return _store(bytes(raw))
    return best


def _encode_block(raw: memoryview, hints: ChunkHints) -> tuple[int, bytes, list]:
    """(codec id, params, payload parts) of one block of a chunk (read_blocks.encode), inside the caller's scratch
    session: a block of tensors goes straight to the tensor coder's parts, since the Python around a whole
    encode_chunk, repeated per block, held the GIL long enough that two writers' encoders no longer ran at once."""
    from . import fields, tensor

    if hints.segments and (hints.codec or "auto").lower() in ("auto", "tensor"):
        regions = tensor.plan_regions(len(raw), hints.segments)
        if any(cls != fields.CLASS_GENERIC for _, cls in regions):
            params, blobs = tensor.encode_parts(raw, regions, hints.effort, hints.level)
            if len(params) + sum(len(b) for b in blobs) < len(raw) and len(params) <= MAX_PARAMS:
                return CODEC_TENSOR, params, blobs
            return CODEC_STORE, b"", [raw]
    encoded = _encode(raw, hints)
    return encoded.codec_id, encoded.params, [encoded.payload]


def decode_blocks_checked(params: bytes, payload: bytes | memoryview, raw_len: int, seed: int) -> bytes:
    """A codec-3 chunk decoded with every block's own checksum (seeded with the chunk's index) checked (fsck; a
    read checks the chunk's)."""
    from . import read_blocks

    return read_blocks.decode(params, payload, raw_len, _decode_into, verify=True, seed=seed)


def _decode_into(codec_id: int, params: bytes, payload: memoryview, raw_len: int, out) -> None:
    """decode_chunk into out (a uint8 array of raw_len bytes): a version-1 tensor block without a copy."""
    from . import tensor

    if codec_id == CODEC_TENSOR and params[:1] == bytes([tensor.FORMAT_VERSION]):
        try:
            tensor.decode_into(params, payload, raw_len, out)
        except CodecError:
            raise
        except Exception as exc:  # as decode_chunk: any failure on a damaged payload is a codec error
            raise CodecError(f"tensor: {exc}") from exc
        return
    import numpy as np

    out[:] = np.frombuffer(decode_chunk(codec_id, params, payload, raw_len), np.uint8)


def decode_chunk(codec_id: int, params: bytes, payload: bytes | memoryview, raw_len: int) -> bytes:
    """Decode one chunk; raises CodecError on anything malformed, never returns the wrong length."""
    from . import generic, read_blocks, tensor

    if raw_len < 0:
        raise CodecError(f"negative raw_len {raw_len}")
    try:
        if codec_id == CODEC_STORE:
            out = bytes(payload)
        elif codec_id == CODEC_ZSTD:
            out = generic.zstd_decompress(payload, raw_len)
        elif codec_id == CODEC_LZ4:
            out = generic.lz4_decompress(payload, raw_len)
        elif codec_id == CODEC_TENSOR:
            out = tensor.decode(bytes(params), payload, raw_len)
        elif codec_id == CODEC_BLOCKS:
            out = read_blocks.decode(params, payload, raw_len, _decode_into)
        else:
            raise CodecError(f"unknown codec id {codec_id}")
    except CodecError:
        raise
    except Exception as exc:  # any library failure on a damaged payload is a codec error
        raise CodecError(f"{codec_name(codec_id) if codec_id in _NAMES else codec_id}: {exc}") from exc
    if len(out) != raw_len:
        raise CodecError(f"decoded {len(out)} bytes, expected {raw_len}")
    return out
