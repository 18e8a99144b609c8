"""Codec 3 (blocks): a chunk cut on a fixed grid into blocks that decode and verify alone, for small reads."""
from __future__ import annotations

import logging
import struct

import xxhash

from .api import CODEC_BLOCKS, ChunkHints, CodecError, EncodedChunk, Segment
from .layout import ELEMENT_WIDTH
from . import scratch
from .varint import get_varint, put_varint

log = logging.getLogger(__name__)

VERSION = 1
MIN_BLOCK_SHIFT = 12
MAX_BLOCK_SHIFT = 25
# codec u8, reserved u8 (0), params length u16, payload length u32, raw length u32, xxh3-64 of the raw bytes seeded
# with the chunk's index (hints.block_seed): a block read alone, without its record's header, cannot pass for a block
# of another chunk (found by review: an index entry naming another chunk's record gave that chunk's bytes)
BLOCK_HEADER = struct.Struct("<BBHIIQ")
BLOCK_HEADER_SIZE = BLOCK_HEADER.size


def piece_segments(segments: tuple[Segment, ...], a: int, b: int) -> tuple[Segment, ...]:
    """The segments of chunk bytes [a, b) in the piece's coordinates, each starting on an element boundary (as a
    layout's hints do for a chunk)."""
    out = []
    for s in segments:
        end = min(s.start + s.length, b)
        if s.start >= a:
            first = s.start
        else:
            first = a + (s.start - a) % ELEMENT_WIDTH.get(s.dtype, 1)
        if end > first:
            out.append(Segment(first - a, end - first, s.dtype))
    return tuple(out)


def encode(raw: bytes | memoryview, hints: ChunkHints, encode_block) -> EncodedChunk:
    """Every hints.block_size bytes of raw encoded on their own by encode_block(view, hints), which returns
    (codec id, params, payload parts) (api._encode_block)."""
    size = hints.block_size
    shift = size.bit_length() - 1
    if size != 1 << shift or not MIN_BLOCK_SHIFT <= shift <= MAX_BLOCK_SHIFT:
        raise CodecError(f"block size {size} is not a power of two between 4 KiB and 32 MiB")
    params = bytearray([VERSION, shift])
    put_varint(params, (len(raw) + size - 1) // size)
    parts = []
    view = memoryview(raw)
    with scratch.session():  # the blocks' streams may be views of scratch memory until joined
        for a in range(0, len(raw), size):
            piece = view[a:a + size]
            piece_hints = ChunkHints(piece_segments(hints.segments, a, a + len(piece)), hints.codec, hints.level,
                                     hints.effort)
            codec, piece_params, payload = encode_block(piece, piece_hints)
            parts += (BLOCK_HEADER.pack(codec, 0, len(piece_params), sum(len(p) for p in payload), len(piece),
                                        xxhash.xxh3_64_intdigest(piece, hints.block_seed)), piece_params, *payload)
        return EncodedChunk(CODEC_BLOCKS, bytes(params), b"".join(parts))


def _grid(params: bytes, raw_len: int) -> tuple[int, int]:
    """(block size, block count) from params, checked against raw_len."""
    if len(params) < 3 or params[0] != VERSION:
        raise CodecError(f"blocks params: version {params[0] if params else None}, expected {VERSION}")
    shift = params[1]
    if not MIN_BLOCK_SHIFT <= shift <= MAX_BLOCK_SHIFT:
        raise CodecError(f"blocks params: block shift {shift} out of range")
    count, pos = get_varint(params, 2, "blocks", 35)
    size = 1 << shift
    if pos != len(params) or count != (raw_len + size - 1) // size or count < 1:
        raise CodecError(f"blocks params: {count} blocks of {size} bytes for {raw_len} bytes")
    return size, count


def block_starts(params: bytes, payload: bytes | memoryview, raw_len: int) -> list[int]:
    """Where each block starts in payload (its header); the last block ends at the payload's end."""
    _, count = _grid(params, raw_len)
    starts = []
    pos = 0
    for _ in range(count):
        if pos + BLOCK_HEADER_SIZE > len(payload):
            raise CodecError(f"blocks: block {len(starts)} starts past the payload's end")
        _, _, plen, qlen, _, _ = BLOCK_HEADER.unpack_from(payload, pos)
        starts.append(pos)
        pos += BLOCK_HEADER_SIZE + plen + qlen
    if pos != len(payload):
        raise CodecError(f"blocks: the blocks cover {pos} of {len(payload)} payload bytes")
    return starts


def _checked_header(block: bytes | memoryview, raw_len: int | None, max_len: int) -> tuple[int, int, int]:
    """(codec, params length, digest) of a block whose header agrees with its size and raw length."""
    if len(block) < BLOCK_HEADER_SIZE:
        raise CodecError(f"blocks: a block of {len(block)} bytes is shorter than its header")
    codec, reserved, plen, qlen, length, digest = BLOCK_HEADER.unpack_from(block, 0)
    if reserved:
        raise CodecError(f"blocks: block header's reserved byte is {reserved}, not 0")
    if BLOCK_HEADER_SIZE + plen + qlen != len(block):
        raise CodecError(f"blocks: block header says {BLOCK_HEADER_SIZE + plen + qlen} bytes, the block has "
                         f"{len(block)}")
    if length != raw_len if raw_len is not None else not 0 < length <= max_len:
        raise CodecError(f"blocks: block header says {length} raw bytes, expected "
                         f"{raw_len if raw_len is not None else f'1 to {max_len}'}")
    if codec == CODEC_BLOCKS:
        raise CodecError("blocks: a block may not hold blocks")
    return codec, plen, digest


def decode_block(block: bytes | memoryview, raw_len: int | None, decode_piece, max_len: int = 0, seed: int = 0
                 ) -> bytes:
    """One block (header, params, payload) to its raw bytes, checked against its own checksum. raw_len None (a
    chunk's last block, read alone) takes the header's, up to max_len."""
    codec, plen, digest = _checked_header(block, raw_len, max_len)
    length = BLOCK_HEADER.unpack_from(block, 0)[4]
    body = memoryview(block)[BLOCK_HEADER_SIZE:]
    out = decode_piece(codec, bytes(body[:plen]), body[plen:], length)
    if xxhash.xxh3_64_intdigest(out, seed) != digest:
        raise CodecError("blocks: block checksum mismatch")
    return out


def block_shift(params: bytes, raw_len: int) -> int:
    """log2 of the block size of a codec-3 chunk."""
    size, _ = _grid(params, raw_len)
    return size.bit_length() - 1


def decode(params: bytes, payload: bytes | memoryview, raw_len: int, decode_piece_into, verify: bool = False,
           seed: int = 0) -> bytes:
    """The whole chunk, every block decoded in turn by decode_piece_into(codec, params, payload, raw_len, out)
    straight into one bytes object; the blocks' checksums are left to the caller's check of the chunk's (the
    container's record checksum covers every byte) unless verify (fsck)."""
    from .tensor_decode import finish_bytes, new_bytes

    starts = block_starts(params, payload, raw_len)
    size, _ = _grid(params, raw_len)
    ends = starts[1:] + [len(payload)]
    view = memoryview(payload)
    result, out = new_bytes(raw_len)
    for k, (s, e) in enumerate(zip(starts, ends)):
        length = min(size, raw_len - k * size)
        codec, plen, digest = _checked_header(view[s:e], length, length)
        target = out[k * size:k * size + length]
        body = view[s + BLOCK_HEADER_SIZE:e]
        try:
            decode_piece_into(codec, bytes(body[:plen]), body[plen:], length, target)
        except CodecError as exc:
            raise CodecError(f"blocks: block {k}: {exc}") from exc
        if verify and xxhash.xxh3_64_intdigest(target, seed) != digest:
            raise CodecError(f"blocks: block {k} checksum mismatch")
    return finish_bytes(result, out)
