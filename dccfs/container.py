"""One container file: open, recover, read verified chunks, append records and commit (no FUSE).

The commit protocol and its crash windows are described in docs/commit-protocol.md; the record
I/O and the search for the last commit that open() relies on are in dccfs/container_records.py.
Methods are synchronous and meant for worker threads; appends and commits are
serialised by an internal lock, reads may run concurrently with them.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time

from dccfs.codecs import (
    CODEC_BLOCKS, CodecError, EncodedChunk, codec_name, decode_blocks_checked, decode_chunk, read_blocks,
)
from dccfs.codecs.delta import CODEC_DELTA, decode_delta, delta_base_ref
from dccfs.format import (
    BLOCKS_SINCE_VERSION, HEADER_SIZE, INDEX_BLOCKS, INDEX_DELTA, INDEX_FULL, MAX_FILE_OFFSET, RECORD_HEADER_SIZE,
    REC_CHUNK, FormatError, Header, RecordHeader, checksum64, chunk_record_header, max_chunk_record_len, pack_index,
    trailer_record,
)
# Also re-exported: the rest of dccfs and the tests import these names from dccfs.container.
from dccfs.container_records import (  # noqa: F401
    MAX_DELTA_CHAIN, ChunkError, ChunkLoc, ContainerError, Recovery, last_commit, pread_exact, pwrite_all,
    pwritev_all, read_logical_size, record_blocks,
)

log = logging.getLogger(__name__)


def record_codec(record: bytes) -> str:
    """The codec name of a chunk record whose header decode_record accepted (for stats)."""
    sub = RecordHeader.unpack(record).sub
    return "delta" if sub == CODEC_DELTA else codec_name(sub)


class Container:
    """The in-memory view of one container: header, chunk index, logical size, append point."""

    def __init__(self, fd: int, path: str, header: Header, index: dict[int, ChunkLoc],
                 size: int, end: int, last_index: int, delta_chain: int, recovery: Recovery):
        self.fd = fd
        self.path = path
        self.header = header
        st = os.fstat(fd)
        self._backing_object = st.st_dev.to_bytes(8, "little") + st.st_ino.to_bytes(8, "little")
        self.index = index
        self.size = size
        self.committed_size = size
        self.end = end
        self.last_index = last_index
        self.delta_chain = delta_chain
        self.recovery = recovery
        self.pending: dict[int, ChunkLoc | None] = {}
        # Resolves the base chunks of delta records (dccfs.delta.BaseStore); found from
        # the file's path when not set, which is what the offline tools rely on.
        self.base_store = None
        # Given committed_end, whether a torn tail may be cut although other names link the file
        # (dccfs.pin_records.torn_tail_may_go, set by the mount); None: never.
        self.linked_tail_may_go = None
        # --shared: check before each append that the file still ends where this view does, i.e.
        # that no other node appended since it was read (a write then fails rather than go over
        # that node's records).
        self.ends_where_read = False
        self._lock = threading.Lock()

    @property
    def blocks_ok(self) -> bool:
        """Whether this container's version takes codec-3 records and their block tables (a version-1 file
        written to again stays readable by the dccfs that wrote it)."""
        return self.header.version >= BLOCKS_SINCE_VERSION

    @property
    def chunk_size(self) -> int:
        return self.header.chunk_size

    @property
    def cache_id(self) -> bytes:
        """Names this container's records in caches. Record offsets repeat after a compaction
        (a new generation) or a reset (a new file id), so both are part of the name. So is the
        backing file: a container copied offline (cp while unmounted) keeps its file id, and
        the copy's new records, at the same offsets as the original's, were served from the
        original's (found by review: another file's bytes, with no error)."""
        return self.header.file_id + self.header.generation.to_bytes(4, "little") + self._backing_object

    @property
    def stored_bytes(self) -> int:
        return self.end

    @property
    def live_bytes(self) -> int:
        return HEADER_SIZE + sum(loc.length for loc in self.index.values())

    @property
    def dirty(self) -> bool:
        return bool(self.pending) or self.size != self.committed_size

    # -- creation and opening -------------------------------------------------

    @classmethod
    def create(cls, fd: int, path: str, chunk_shift: int) -> "Container":
        """Write a fresh, committed, empty container into the (empty) file behind fd."""
        # A header alone is a valid empty file; the first commit writes a full index.
        header = Header.new(chunk_shift, time.time_ns())
        os.ftruncate(fd, 0)
        pwrite_all(fd, header.pack(), 0)
        rec = Recovery(HEADER_SIZE, HEADER_SIZE, False)
        return cls(fd, path, header, {}, 0, HEADER_SIZE, 0, 0, rec)

    @classmethod
    def open(cls, fd: int, path: str, damaged_ok: bool = False) -> "Container":
        """Read the header and the last commit; raise ContainerError if there is none usable,
        or if the commit the file ends with is damaged (recovery.damage), unless damaged_ok
        (fsck, cat): then the view is the last commit that verifies."""
        file_end = os.fstat(fd).st_size
        head = pread_exact(fd, HEADER_SIZE, 0)
        try:
            header = Header.unpack(head)
        except FormatError as exc:
            raise ContainerError(path, f"bad container header: {exc}") from exc
        found = last_commit(fd, path, file_end)
        rec = found.recovery
        if rec.damage is not None:
            log.warning("%s: %s; the last commit that verifies ends at offset %d", path, rec.damage,
                        rec.committed_end)
            if not damaged_ok:
                raise ContainerError(path, f"{rec.damage}: not bytes an interrupted write leaves, so reads fail "
                                           f"rather than show the earlier commit that ends at offset "
                                           f"{rec.committed_end}")
        if rec.torn_tail:
            log.info("%s: %d bytes past the last commit are ignored (an interrupted write)",
                     path, rec.torn_tail)
        return cls(fd, path, header, found.index, found.size, rec.committed_end, found.index_offset, found.chain,
                   rec)

    def snapshot(self) -> tuple[dict[int, ChunkLoc], int, int]:
        """(index, committed logical size, end) as of one instant, for copying."""
        with self._lock:
            return dict(self.index), self.committed_size, self.end

    # -- reading ---------------------------------------------------------------

    def read_chunk(self, chunk_index: int, loc: ChunkLoc | None = None,
                   chain_left: int | None = None, check_blocks: bool = False) -> bytes | None:
        """The verified raw bytes of one stored chunk, or None for a hole. chain_left bounds
        the delta records a read may walk below this one (None: as deep as the record says).
        check_blocks (fsck): also each block's own checksum and the index's block table, which
        only a small read uses."""
        if loc is None:
            loc = self.index.get(chunk_index)
            if loc is None:
                return None
        record = self.read_record(chunk_index, loc)
        if check_blocks:
            # first: a damaged block is then named, where the chunk's checksum only says the chunk is damaged
            self._check_blocks(chunk_index, loc, record)
        return self.decode_record(chunk_index, record, chain_left)

    def _check_blocks(self, chunk_index: int, loc: ChunkLoc, record: bytes) -> None:
        try:
            head = RecordHeader.unpack(record)
        except FormatError:
            return  # decode_record says what is wrong
        if (head.rtype != REC_CHUNK or head.a != chunk_index or len(record) != head.total_len
                or head.b > self.chunk_size):
            return
        params = bytes(record[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + head.params_len])
        payload = memoryview(record)[RECORD_HEADER_SIZE + head.params_len:]
        try:
            found = record_blocks(head.sub, params, payload, head.b)
            if loc.blocks and found != (loc.blocks, loc.block_shift):
                raise CodecError(f"blocks: the index's block table {loc.blocks[:4]}... is not the record's "
                                 f"{found[0][:4]}...")
            if head.sub == CODEC_BLOCKS:
                decode_blocks_checked(params, payload, head.b, chunk_index)
        except CodecError as exc:
            raise ChunkError(self.path, chunk_index, str(exc)) from exc

    def read_record(self, chunk_index: int, loc: ChunkLoc) -> bytes:
        """The stored record loc names, unverified (decode_record checks it)."""
        self.check_loc(chunk_index, loc)
        return pread_exact(self.fd, loc.length, loc.offset)

    def read_block(self, chunk_index: int, loc: ChunkLoc, block: int) -> bytes:
        """The verified raw bytes of block `block` of a codec-3 record, read alone (loc names its blocks); the
        chunk's last block may end before the grid does, and what follows it reads as zeros."""
        self.check_loc(chunk_index, loc)
        starts = loc.blocks
        last = block + 1 == len(starts)
        end = loc.length if last else starts[block + 1]
        data = pread_exact(self.fd, end - starts[block], loc.offset + starts[block])
        size = 1 << loc.block_shift
        try:
            return read_blocks.decode_block(data, None if last else size, decode_chunk, max_len=size, seed=chunk_index)
        except CodecError as exc:
            raise ChunkError(self.path, chunk_index, f"block {block}: {exc}") from exc

    def check_loc(self, chunk_index: int, loc: ChunkLoc) -> None:
        """ChunkError unless loc could name a chunk record of this container: a damaged index
        entry must not make one read ask for gigabytes (or overflow pread)."""
        if not (RECORD_HEADER_SIZE <= loc.length <= max_chunk_record_len(self.chunk_size)
                and HEADER_SIZE <= loc.offset <= MAX_FILE_OFFSET - loc.length):
            raise ChunkError(self.path, chunk_index,
                             f"index names a record of {loc.length} bytes at offset {loc.offset}")

    def decode_record(self, chunk_index: int, record: bytes, chain_left: int | None = None) -> bytes:
        try:
            head = RecordHeader.unpack(record)
        except FormatError as exc:
            raise ChunkError(self.path, chunk_index, f"record header: {exc}") from exc
        if head.rtype != REC_CHUNK or head.a != chunk_index or len(record) != head.total_len:
            raise ChunkError(self.path, chunk_index, "index points at a record of another chunk")
        if head.b > self.chunk_size:
            # checked before decoding: zstd, lz4 and the tensor codec allocate the raw length they are given
            raise ChunkError(self.path, chunk_index, f"raw length {head.b} is larger than the chunk size")
        body = memoryview(record)[RECORD_HEADER_SIZE:]
        params = bytes(body[:head.params_len])
        payload = body[head.params_len:]
        try:
            if head.sub == CODEC_DELTA:
                raw = self._decode_delta(chunk_index, params, payload, head.b, chain_left)
            else:
                raw = decode_chunk(head.sub, params, payload, head.b)
        except CodecError as exc:
            raise ChunkError(self.path, chunk_index, f"codec {head.sub}: {exc}") from exc
        if len(raw) != head.b or checksum64(raw) != head.c:
            raise ChunkError(self.path, chunk_index, "checksum mismatch: stored data is damaged")
        return raw

    def _decode_delta(self, chunk_index: int, params: bytes, payload, raw_len: int,
                      chain_left: int | None) -> bytes:
        from dccfs.delta_bases import BaseRef, store_for_path
        store = self.base_store or store_for_path(self.path)
        if store is None:
            raise ChunkError(self.path, chunk_index, "a delta chunk, but no backing directory "
                             "(.dccfs/bases) to find its base in")
        try:
            ref = BaseRef.unpack(delta_base_ref(params))
            if chain_left is not None and ref.depth > chain_left:
                # The base this chain came from said its chunk was shallower: damaged or
                # foreign records, never a longer walk.
                raise ValueError(f"delta chain of depth {ref.depth} where at most {chain_left} "
                                 "is allowed")
            base = store.read_base_chunk(ref)
        except (ValueError, OSError) as exc:
            raise ChunkError(self.path, chunk_index, f"delta base unavailable: {exc}") from exc
        return decode_delta(params, payload, raw_len, base)

    def holds(self, chunk_index: int, loc: ChunkLoc, cache_id: bytes) -> bool:
        """Whether loc is still where this chunk lives: not since reset (a new cache_id)
        or moved. Waits for a reset or append in progress."""
        with self._lock:
            return self.cache_id == cache_id and self.index.get(chunk_index) == loc

    # -- writing ---------------------------------------------------------------

    def append_chunk(self, chunk_index: int, encoded: EncodedChunk, raw_len: int,
                     raw_sum: int) -> ChunkLoc:
        """Append one chunk record; it becomes visible to readers of this object at once and
        durable at the next commit."""
        head = chunk_record_header(chunk_index, encoded.codec_id, len(encoded.params),
                                   len(encoded.payload), raw_len, raw_sum)
        parts = [head.pack(), encoded.params, encoded.payload]
        length = sum(len(p) for p in parts)
        blocks, shift = (), 0
        if self.blocks_ok:
            try:
                blocks, shift = record_blocks(encoded.codec_id, encoded.params, encoded.payload, raw_len)
            except CodecError as exc:  # a codec bug: the record still decodes whole, or says it is damaged
                log.error("%s: chunk %d: no block table: %s", self.path, chunk_index, exc)
        with self._lock:
            if self.end < HEADER_SIZE:
                self._write_header_locked()
            self._cut_torn_tail_locked()
            self._check_end_locked()
            loc = ChunkLoc(self.end, length, blocks, shift)
            self._append_or_undo(parts)
            self.end += length
            self.index[chunk_index] = loc
            self.pending[chunk_index] = loc
        return loc

    def drop_chunk(self, chunk_index: int) -> None:
        """Make a chunk a hole (all zeros, or cut off by truncate)."""
        with self._lock:
            if self.index.pop(chunk_index, None) is not None or chunk_index in self.pending:
                self.pending[chunk_index] = None

    def drop_chunks_from(self, first_index: int) -> None:
        with self._lock:
            for idx in [i for i in self.index if i >= first_index]:
                del self.index[idx]
                self.pending[idx] = None
            for idx in [i for i in self.pending if i >= first_index]:
                self.pending[idx] = None

    def commit(self, size: int, durable: bool) -> None:
        """Write an index and trailer covering everything appended so far.

        With durable=True the records are flushed before the index is written, and the
        index after, so a machine crash can never expose an index whose chunks are missing.
        """
        with self._lock:
            if self.end < HEADER_SIZE:
                self._write_header_locked()
            if not self.pending and size == self.committed_size:
                if durable:
                    os.fdatasync(self.fd)
                return
            self._cut_torn_tail_locked()
            self._check_end_locked()
            if durable:
                os.fdatasync(self.fd)
            full = self.delta_chain >= MAX_DELTA_CHAIN or self.last_index == 0
            if full:
                entries = {i: loc.entry() for i, loc in self.index.items()}
                kind, prev = INDEX_FULL, 0
            else:
                entries = {i: (loc.entry() if loc else (0, 0, (), 0)) for i, loc in self.pending.items()}
                kind, prev = INDEX_DELTA, self.last_index
            if any(entry[2] for entry in entries.values()):
                kind |= INDEX_BLOCKS
            index_offset = self.end
            blob = pack_index(kind, size, prev, entries) + trailer_record(size, index_offset)
            self._append_or_undo([blob])
            self.end += len(blob)
            self.last_index = index_offset
            self.delta_chain = 0 if full else self.delta_chain + 1
            self.pending.clear()
            self.size = self.committed_size = size
            self.recovery = Recovery(self.end, self.end, False)
            if durable:
                os.fdatasync(self.fd)

    def cut_uncommitted(self) -> bool:
        """Truncate the records appended since the last commit (a close gave up on committing them);
        in a file other names link only where a torn tail could go. True when cut."""
        with self._lock:
            committed = self.recovery.committed_end
            if self.end <= committed or not self._tail_may_go_locked(committed):
                return False
            os.ftruncate(self.fd, committed)
            self.end = committed
            for idx in list(self.pending):
                self.index.pop(idx, None)
            self.pending.clear()
            return True

    def _append_or_undo(self, parts: list[bytes | memoryview]) -> None:
        """Write at the end; on failure (ENOSPC) cut what was partly written, so the file
        still ends with its last trailer."""
        try:
            pwritev_all(self.fd, parts, self.end)
        except OSError:
            try:
                os.ftruncate(self.fd, self.end)
            except OSError:
                log.warning("%s: could not cut a partly written record", self.path)
            raise

    def reset(self) -> None:
        """Rewrite as a fresh empty container in place (truncate to zero). A crash leaves the
        file empty, which is the state the caller asked for; space from old records is freed."""
        with self._lock:
            header = Header.new(self.header.chunk_shift, time.time_ns())
            os.ftruncate(self.fd, 0)
            # The file is empty from here on, so the state says so even if writing the
            # header fails: appending at the old end would build a file without a header,
            # which a later open would take for a plain file of record bytes.
            self.header = header
            self.index = {}
            self.pending = {}
            self.size = self.committed_size = 0
            self.end = 0
            self.last_index = 0
            self.delta_chain = 0
            self.recovery = Recovery(0, 0, False)
            self._write_header_locked()

    def _write_header_locked(self) -> None:
        """(Re)write the header of a file left empty by reset; the next append or commit
        retries when that failed."""
        pwrite_all(self.fd, self.header.pack(), 0)
        self.end = HEADER_SIZE
        self.recovery = Recovery(HEADER_SIZE, HEADER_SIZE, False)

    def _check_end_locked(self) -> None:
        if self.ends_where_read:
            size = os.fstat(self.fd).st_size
            if size != self.end:
                raise OSError(errno.EIO, f"{self.path}: the file ends at offset {size}, not at {self.end} as "
                                         "when this mount read it: another node wrote it meanwhile; not written")

    def _tail_may_go_locked(self, committed_end: int) -> bool:
        """Whether the bytes past committed_end may be cut: not in a file other names link (a delta
        base's pin), unless linked_tail_may_go says its dependents read nothing there."""
        return os.fstat(self.fd).st_nlink <= 1 \
            or bool(self.linked_tail_may_go and self.linked_tail_may_go(committed_end))

    def _cut_torn_tail_locked(self) -> None:
        """Truncate bytes past the last commit before appending: a later scan stops at the
        first bad record, so garbage left in the middle would hide every commit after it."""
        torn = self.recovery.torn_tail
        if torn:
            if not self._tail_may_go_locked(self.recovery.committed_end):
                # A delta base pin links these bytes too, and past the last commit that verifies
                # may lie committed records (their index damaged) that dependents read by offset:
                # cutting destroyed those files (found by review). Writes fail instead, unless the
                # dependents' records say they read nothing past the commit (a killed writer's
                # records: found by review, they left a rewritten base unwritable for good).
                raise OSError(errno.EIO, f"{self.path}: {torn} bytes past the last commit that verifies, "
                              "in a file other names link (a delta base): not cut, so not written")
            log.info("%s: cutting %d uncommitted bytes left by an interrupted write", self.path, torn)
            os.ftruncate(self.fd, self.recovery.committed_end)
            self.end = self.recovery.committed_end
            self.recovery = Recovery(self.end, self.end, self.recovery.used_scan)
