"""The byte layout of a dccfs container: header, record headers and index payloads (pure, no I/O).

docs/format.md is the specification; this module is its only implementation.
Every integer is little-endian.
"""
from __future__ import annotations

import logging
import struct
import uuid
from dataclasses import dataclass

import xxhash

log = logging.getLogger(__name__)

# PNG-style magic: the high bit and the CR/LF/^Z bytes catch text-mode mangling.
MAGIC = b"\x89DCCFS\r\n"
FORMAT_VERSION = 2  # written by this version; 1 is read too (docs/format.md, "Compatibility")
READABLE_VERSIONS = (1, 2)
BLOCKS_SINCE_VERSION = 2  # block tables in the index and chunks of codec 3 (blocks)
HEADER_SIZE = 64
RECORD_HEADER_SIZE = 32
INDEX_ENTRY_SIZE = 24

# Chunk sizes are powers of two; 64 KiB keeps per-chunk tables worthwhile and
# 64 MiB bounds the memory one dirty chunk can pin.
MIN_CHUNK_SHIFT = 16
MAX_CHUNK_SHIFT = 26
DEFAULT_CHUNK_SHIFT = 18  # 256 KiB: see docs/format.md for the measurement behind it

REC_CHUNK = 1
REC_INDEX = 2
REC_TRAILER = 3
RECORD_TYPES = (REC_CHUNK, REC_INDEX, REC_TRAILER)

INDEX_DELTA = 0
INDEX_FULL = 1
# bit of an index kind: every entry carries its record's block table (version 2)
INDEX_BLOCKS = 2
MIN_BLOCK_SHIFT = 12
MAX_BLOCKS = 1 << (MAX_CHUNK_SHIFT - MIN_BLOCK_SHIFT)  # blocks of at least 4 KiB

_HEADER = struct.Struct("<8sHHB3x16sQI16x")  # ends at byte 60, then u32 checksum
_RECORD = struct.Struct("<BBHIQIQ")  # 28 bytes, then u32 checksum
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ENTRY = struct.Struct("<QQQ")
_BLOCK_TABLE = struct.Struct("<BBH")  # log2 block size, 0, block count; then the blocks' u32 starts


class FormatError(ValueError):
    """Bytes that are not a valid dccfs structure; the message says which and why."""


def checksum32(data: bytes | memoryview) -> int:
    return xxhash.xxh32_intdigest(data)


def checksum64(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Header:
    version: int
    chunk_shift: int
    file_id: bytes  # 16 bytes, stable across renames: names this file as a delta base
    created_ns: int
    generation: int = 0  # bumped by each compaction: record offsets repeat across generations

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_shift

    @classmethod
    def new(cls, chunk_shift: int, created_ns: int) -> "Header":
        if not MIN_CHUNK_SHIFT <= chunk_shift <= MAX_CHUNK_SHIFT:
            raise FormatError(
                f"chunk size 2**{chunk_shift} is outside 2**{MIN_CHUNK_SHIFT}..2**{MAX_CHUNK_SHIFT}")
        return cls(FORMAT_VERSION, chunk_shift, uuid.uuid4().bytes, created_ns, 0)

    def next_generation(self) -> "Header":
        return Header(self.version, self.chunk_shift, self.file_id, self.created_ns,
                      (self.generation + 1) & 0xFFFFFFFF)

    def pack(self) -> bytes:
        body = _HEADER.pack(MAGIC, self.version, HEADER_SIZE, self.chunk_shift,
                            self.file_id, self.created_ns, self.generation)
        return body + _U32.pack(checksum32(body))

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        if len(data) < HEADER_SIZE:
            raise FormatError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
        body = data[:HEADER_SIZE - 4]
        magic, version, header_size, shift, file_id, created, generation = _HEADER.unpack(body)
        if magic != MAGIC:
            raise FormatError("bad magic: not a dccfs container")
        (stored_sum,) = _U32.unpack_from(data, HEADER_SIZE - 4)
        if stored_sum != checksum32(body):
            raise FormatError("header checksum mismatch")
        if version not in READABLE_VERSIONS:
            raise FormatError(f"container format version {version} is not supported "
                              f"(this dccfs reads versions {', '.join(map(str, READABLE_VERSIONS))})")
        if header_size != HEADER_SIZE:
            raise FormatError(f"header size {header_size} is not {HEADER_SIZE}")
        if not MIN_CHUNK_SHIFT <= shift <= MAX_CHUNK_SHIFT:
            raise FormatError(f"chunk shift {shift} out of range")
        return cls(version, shift, file_id, created, generation)


def looks_like_container(first_bytes: bytes) -> bool:
    """True when the bytes start with a valid container header (magic and checksum)."""
    try:
        Header.unpack(first_bytes)
    except (FormatError, struct.error):
        return False
    return True


@dataclass(frozen=True)
class RecordHeader:
    """One 32-byte record header. Field meaning depends on the record type:

    chunk:   sub=codec id, params_len, payload_len, a=chunk index, b=raw length, c=xxh3-64 of raw
    index:   sub=INDEX_DELTA/INDEX_FULL, payload_len, a=logical size, b=entry count, c=previous index offset
    trailer: a=logical size, b=0, c=offset of the index it closes
    """
    rtype: int
    sub: int
    params_len: int
    payload_len: int
    a: int
    b: int
    c: int

    @property
    def body_len(self) -> int:
        return self.params_len + self.payload_len

    @property
    def total_len(self) -> int:
        return RECORD_HEADER_SIZE + self.params_len + self.payload_len

    def pack(self) -> bytes:
        body = _RECORD.pack(self.rtype, self.sub, self.params_len, self.payload_len,
                            self.a, self.b, self.c)
        return body + _U32.pack(checksum32(body))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "RecordHeader":
        if len(data) < RECORD_HEADER_SIZE:
            raise FormatError(f"record header is {len(data)} bytes, expected {RECORD_HEADER_SIZE}")
        body = bytes(data[:RECORD_HEADER_SIZE - 4])
        (stored_sum,) = _U32.unpack_from(data, RECORD_HEADER_SIZE - 4)
        if stored_sum != checksum32(body):
            raise FormatError("record header checksum mismatch")
        rec = cls(*_RECORD.unpack(body))
        if rec.rtype not in RECORD_TYPES:
            raise FormatError(f"unknown record type {rec.rtype}")
        return rec


# The largest file offset the OS takes (off_t): pread raises OverflowError past it, not OSError.
MAX_FILE_OFFSET = (1 << 63) - 1


def max_chunk_record_len(chunk_size: int) -> int:
    """The longest chunk record of a container: header, params (a u16 length) and a payload no longer than a chunk
    (a codec that cannot shrink a chunk stores it raw)."""
    return RECORD_HEADER_SIZE + 0xFFFF + chunk_size


def chunk_record_header(chunk_index: int, codec_id: int, params_len: int, payload_len: int,
                        raw_len: int, raw_sum: int) -> RecordHeader:
    return RecordHeader(REC_CHUNK, codec_id, params_len, payload_len, chunk_index, raw_len, raw_sum)


def trailer_record(logical_size: int, index_offset: int) -> bytes:
    return RecordHeader(REC_TRAILER, 0, 0, 0, logical_size, 0, index_offset).pack()


def pack_index(kind: int, logical_size: int, prev_offset: int,
               entries: dict[int, tuple]) -> bytes:
    """An index record: header, then one entry per chunk, then xxh3-64 of the entries.

    An entry is (chunk index, record offset, record length) as u64s; with INDEX_BLOCKS in kind it is followed by the
    log2 of the block size (u8), a zero byte, the block count (u16) and the offset of each block from the record's
    start (u32 each), so a small read fetches one block. entries maps chunk index -> (offset, length) or
    (offset, length, block starts, log2 block size).
    A record offset of 0 means the chunk is a hole (never written, truncated away, or all zeros).
    """
    parts = []
    for idx in sorted(entries):
        offset, length, *rest = entries[idx]
        parts.append(_ENTRY.pack(idx, offset, length))
        if kind & INDEX_BLOCKS:
            starts, shift = rest if rest and rest[0] else ((), 0)
            parts.append(_BLOCK_TABLE.pack(shift, 0, len(starts)) + struct.pack(f"<{len(starts)}I", *starts))
        elif rest and rest[0]:
            raise FormatError(f"chunk {idx}: block table in an index of kind {kind}")
    payload = b"".join(parts)
    payload += _U64.pack(checksum64(payload))
    head = RecordHeader(REC_INDEX, kind, 0, len(payload), logical_size, len(entries), prev_offset)
    return head.pack() + payload


def verify_index_payload(head: RecordHeader, payload: bytes) -> bytes:
    """The index entries' bytes once their length, checksum and (with block tables) structure hold; FormatError
    if not."""
    if head.sub & ~(INDEX_FULL | INDEX_BLOCKS):
        raise FormatError(f"unknown index kind {head.sub}")
    blocks = head.sub & INDEX_BLOCKS
    # (with block tables the entries' length is known only by walking them: parse_index_body below)
    expected = len(payload) if blocks else head.b * INDEX_ENTRY_SIZE + 8
    if len(payload) != expected or head.payload_len != expected or expected < 8:
        raise FormatError(f"index payload is {len(payload)} bytes, expected {expected} (header: {head.payload_len})")
    body = payload[:-8]
    (stored_sum,) = _U64.unpack_from(payload, len(payload) - 8)
    if stored_sum != checksum64(body):
        raise FormatError("index checksum mismatch")
    if blocks:
        parse_index_body(head, body)
    return body


def parse_index_body(head: RecordHeader, body: bytes) -> dict[int, tuple[int, int, tuple[int, ...], int]]:
    """chunk index -> (record offset, record length, block starts, log2 block size) of a verified index body (no
    blocks: (), 0)."""
    if not head.sub & INDEX_BLOCKS:
        flat = struct.unpack(f"<{3 * head.b}Q", body)
        return {flat[i]: (flat[i + 1], flat[i + 2], (), 0) for i in range(0, len(flat), 3)}
    out = {}
    pos = 0
    for _ in range(head.b):
        if pos + INDEX_ENTRY_SIZE + 4 > len(body):
            raise FormatError(f"index entries end at byte {len(body)}, inside entry {len(out)}")
        idx, offset, length = _ENTRY.unpack_from(body, pos)
        shift, reserved, count = _BLOCK_TABLE.unpack_from(body, pos + INDEX_ENTRY_SIZE)
        pos += INDEX_ENTRY_SIZE + _BLOCK_TABLE.size
        if count > MAX_BLOCKS or pos + 4 * count > len(body):
            raise FormatError(f"chunk {idx}: a table of {count} blocks does not fit the index")
        if reserved or (count and not MIN_BLOCK_SHIFT <= shift < MAX_CHUNK_SHIFT) or (not count and shift):
            raise FormatError(f"chunk {idx}: block table of {count} blocks of 2**{shift} bytes")
        starts = struct.unpack_from(f"<{count}I", body, pos)
        pos += 4 * count
        if starts and not (RECORD_HEADER_SIZE <= starts[0] and starts[-1] < length
                           and all(a < b for a, b in zip(starts, starts[1:]))):
            raise FormatError(f"chunk {idx}: block starts {starts[:4]}... do not lie in its {length}-byte record")
        out[idx] = (offset, length, starts, shift)
    if pos != len(body):
        raise FormatError(f"index entries end at byte {pos} of {len(body)}")
    return out
