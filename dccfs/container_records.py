"""The record layer under Container: positional I/O, damage errors, the last commit (trailer or scan), its index."""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from dccfs.codecs import CODEC_BLOCKS, read_blocks
from dccfs.format import (
    HEADER_SIZE, INDEX_FULL, RECORD_HEADER_SIZE, REC_INDEX, REC_TRAILER, FormatError, RecordHeader,
    parse_index_body, verify_index_payload,
)

log = logging.getLogger(__name__)

# A delta index lists only the chunks changed since the previous commit, so fsync
# costs what is dirty; opening walks the chain, so it is bounded by a full index
# every so often.
MAX_DELTA_CHAIN = 16


class ChunkError(OSError):
    """A chunk that cannot be returned: bad checksum, bad record, or a codec failure."""

    def __init__(self, path: str, chunk_index: int, reason: str):
        super().__init__(errno.EIO, f"{path}: chunk {chunk_index}: {reason}")
        self.path = path
        self.chunk_index = chunk_index
        self.reason = reason


class ContainerError(OSError):
    """A container whose structure cannot be read at all."""

    def __init__(self, path: str, reason: str):
        super().__init__(errno.EIO, f"{path}: {reason}")
        self.path = path
        self.reason = reason


class IndexDamage(ContainerError):
    """An index record of the chain that does not verify, at offset."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(path, reason)
        self.offset = offset


@dataclass(frozen=True)
class ChunkLoc:
    offset: int  # of the record header in the container
    length: int  # the whole record: header, params, payload
    # where each block of a codec-3 record starts, from the record's start (the next one's start, or the
    # record's end, ends it); () for a record that is one piece
    blocks: tuple[int, ...] = ()
    block_shift: int = 0  # log2 of the block size, with blocks

    def entry(self) -> tuple[int, int, tuple[int, ...], int]:
        """This location as format.pack_index takes it."""
        return self.offset, self.length, self.blocks, self.block_shift


@dataclass
class Recovery:
    """What open() found: the commit it used and the bytes past it that no commit covers."""
    committed_end: int
    file_end: int
    used_scan: bool
    # Why the commit the file ends with does not verify, when that is damage and not an
    # interrupted commit (damage_behind_trailer); None for a clean or torn end.
    damage: str | None = None

    @property
    def torn_tail(self) -> int:
        return self.file_end - self.committed_end


def record_blocks(codec_id: int, params: bytes, payload: bytes | memoryview, raw_len: int
                  ) -> tuple[tuple[int, ...], int]:
    """(where each block of a chunk record starts, from the record's start; log2 of the block size); ((), 0)
    unless it is a codec-3 record."""
    if codec_id != CODEC_BLOCKS:
        return (), 0
    base = RECORD_HEADER_SIZE + len(params)
    starts = tuple(base + start for start in read_blocks.block_starts(params, payload, raw_len))
    return starts, read_blocks.block_shift(params, raw_len)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def pwritev_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """Write the parts back to back at offset in as few syscalls as the kernel allows:
    joining a record's header, params and payload first cost a copy of the payload."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def read_record_header(fd: int, offset: int) -> RecordHeader | None:
    try:
        return RecordHeader.unpack(pread_exact(fd, RECORD_HEADER_SIZE, offset))
    except FormatError:
        return None


def commit_from_trailer(fd: int, file_end: int) -> tuple[int, int] | None:
    """The fast path: the file ends with a trailer naming a valid index."""
    if file_end < HEADER_SIZE + RECORD_HEADER_SIZE:
        return None
    trailer = read_record_header(fd, file_end - RECORD_HEADER_SIZE)
    if trailer is None or trailer.rtype != REC_TRAILER:
        return None
    index_offset = trailer.c
    if not HEADER_SIZE <= index_offset < file_end - RECORD_HEADER_SIZE:
        return None
    head = read_record_header(fd, index_offset)
    if head is None or head.rtype != REC_INDEX or head.a != trailer.a:
        return None
    if index_offset + head.total_len != file_end - RECORD_HEADER_SIZE:
        return None
    return index_offset, file_end


def damage_behind_trailer(fd: int, file_end: int, scan_stop: int, index_offset: int | None = None) -> str | None:
    """Why the file's last commit does not verify although a valid trailer closes it, unless
    that is what a power loss leaves (then None, and the open falls back to the commit before).

    The index and the trailer go to the disk in one write: a power loss before its fdatasync
    can keep the trailer's page and lose a page of the index, which then reads as zeros (a
    block never written). A valid index record never holds a 512-byte disk sector of zeros
    (each entry has a nonzero chunk number, offset or length), nor a header whose part in a
    sector is all zeros. So a failed index showing such a sector is a crash, which the last
    verified commit answers (invariant 5); one without (a flipped bit) is damage, which must
    fail reads rather than show an older version of the file (found by review: the file read
    as empty, or as an earlier commit, with no error).
    scan_stop: where the recovery scan stopped. Damage is called so only when the scan stopped
    on the failed index itself: when a crash left chunk records with no index after them, the
    file's last 32 bytes are the end of a chunk's data, which may hold a valid trailer record
    (a container stored through the mount as a file's content), naming anything (found by
    review: that crash was taken for damage, and the file stayed unreadable).
    index_offset: the index record that failed; default the one the trailer names."""
    if file_end < HEADER_SIZE + RECORD_HEADER_SIZE:
        return None
    trailer = read_record_header(fd, file_end - RECORD_HEADER_SIZE)
    if trailer is None or trailer.rtype != REC_TRAILER:
        return None
    start = trailer.c if index_offset is None else index_offset
    limit = file_end - RECORD_HEADER_SIZE
    if not HEADER_SIZE <= start < limit or scan_stop != start:
        return None
    head = read_record_header(fd, start)
    end = min(start + head.total_len, limit) if head is not None else min(start + RECORD_HEADER_SIZE, limit)
    record = pread_exact(fd, end - start, start)
    sector = start - start % 512
    while sector < end:
        piece = record[max(sector, start) - start:min(sector + 512, end) - start]
        if not any(piece):
            return None
        sector += 512
    return (f"the index record at offset {start} does not verify, and a valid trailer at offset {limit} "
            "closes the commit")


def commit_from_scan(fd: int, path: str, file_end: int) -> tuple[int, int, int]:
    """Walk the records from the start and keep the last index whose payload verifies.
    Returns (that index's offset, the committed end, the offset where the walk stopped)."""
    offset = HEADER_SIZE
    last_index, committed_end = 0, HEADER_SIZE
    while offset + RECORD_HEADER_SIZE <= file_end:
        head = read_record_header(fd, offset)
        if head is None or offset + head.total_len > file_end:
            break
        if head.rtype == REC_INDEX:
            payload = pread_exact(fd, head.payload_len, offset + RECORD_HEADER_SIZE)
            try:
                verify_index_payload(head, payload)
            except FormatError:
                break
            last_index, committed_end = offset, offset + head.total_len
        elif head.rtype == REC_TRAILER and head.c == last_index:
            committed_end = offset + head.total_len
        offset += head.total_len
    if file_end > HEADER_SIZE:  # a bare header is simply an empty file
        log.warning("%s: no trailer at the end; recovered the commit at offset %d by scanning",
                    path, last_index)
    return last_index, committed_end, offset


def _index_chain(fd: int, path: str, offset: int):
    """Yield (header, verified entry bytes) of the index records from the one at offset back
    to the full index; ContainerError on the first that is damaged."""
    file_end = os.fstat(fd).st_size
    walked = 0
    while True:
        head = read_record_header(fd, offset)
        # a back pointer may name any record: its payload length (u32) is read only if the file holds it
        if head is None or head.rtype != REC_INDEX or offset + head.total_len > file_end:
            raise IndexDamage(path, offset, f"index record at offset {offset} is damaged")
        payload = pread_exact(fd, head.payload_len, offset + RECORD_HEADER_SIZE)
        try:
            body = verify_index_payload(head, payload)
        except FormatError as exc:
            raise IndexDamage(path, offset, f"index at offset {offset}: {exc}") from exc
        yield head, body
        walked += 1
        if head.sub & INDEX_FULL:
            return
        if not HEADER_SIZE <= head.c < offset or walked > 4 * MAX_DELTA_CHAIN:
            raise IndexDamage(path, offset, f"index at offset {offset} has a bad back pointer")
        offset = head.c


def verified_logical_size(fd: int, path: str) -> int | None:
    """The logical size of the commit the trailer names once its whole index chain verifies
    (checksums only, no index built: a stat of a closed file), or None when an open would
    have to fall back or scan."""
    found = commit_from_trailer(fd, os.fstat(fd).st_size)
    if found is None:
        return None
    try:
        chain = list(_index_chain(fd, path, found[0]))
    except ContainerError:
        return None
    return chain[0][0].a


def load_index_chain(fd: int, path: str, offset: int):
    """Apply a full index and the deltas after it; return (index, size, delta chain length)."""
    chain = [(head, parse_index_body(head, body)) for head, body in _index_chain(fd, path, offset)]
    size = chain[0][0].a
    index: dict[int, ChunkLoc] = {}
    for _, entries in reversed(chain):
        for idx, (rec_off, rec_len, blocks, shift) in entries.items():
            if rec_off == 0:
                index.pop(idx, None)
            else:
                index[idx] = ChunkLoc(rec_off, rec_len, blocks, shift)
    return index, size, len(chain) - 1


def read_logical_size(fd: int) -> int | None:
    """The logical size in O(1) reads from the trailer, or None when the tail needs a scan."""
    file_end = os.fstat(fd).st_size
    if file_end < HEADER_SIZE + RECORD_HEADER_SIZE:
        return 0 if file_end >= HEADER_SIZE else None
    trailer = read_record_header(fd, file_end - RECORD_HEADER_SIZE)
    if trailer is None or trailer.rtype != REC_TRAILER:
        return None
    return trailer.a


@dataclass
class LastCommit:
    """The commit an open of a container uses, and what it found past it."""
    index_offset: int  # 0: none (an empty file)
    index: dict[int, ChunkLoc]
    size: int
    chain: int  # delta indexes after the full one
    recovery: Recovery


def last_commit(fd: int, path: str, file_end: int) -> LastCommit:
    """The trailer's commit, else the last one the recovery scan finds that verifies;
    recovery.damage says when what follows it is damage rather than a crash's leftovers.
    ContainerError when the file holds a commit but none verifies."""
    found = commit_from_trailer(fd, file_end)
    used_scan = found is None
    damage = None
    if found is None:
        index_offset, committed_end, scan_stop = commit_from_scan(fd, path, file_end)
        damage = damage_behind_trailer(fd, file_end, scan_stop)
    else:
        index_offset, committed_end = found
    try:
        index, size, chain = load_index_chain(fd, path, index_offset) if index_offset else ({}, 0, 0)
    except IndexDamage as exc:
        if used_scan:
            raise
        # The trailer reached the disk but part of its index did not (a machine crash without
        # ordering): the scan finds the last index that verifies. With none left, the file is
        # damaged, not empty. Damage that no crash leaves is named (the open refuses it).
        used_scan = True
        index_offset, committed_end, scan_stop = commit_from_scan(fd, path, file_end)
        damage = damage_behind_trailer(fd, file_end, scan_stop, exc.offset)
        if index_offset == 0 and damage is None:
            raise
        index, size, chain = load_index_chain(fd, path, index_offset) if index_offset else ({}, 0, 0)
    if index_offset == 0:
        committed_end = HEADER_SIZE  # created but killed before its first index: an empty file
    return LastCommit(index_offset, index, size, chain, Recovery(committed_end, file_end, used_scan, damage))
