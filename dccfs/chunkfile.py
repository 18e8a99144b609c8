"""An open container file: dirty chunks in RAM, pipelined encoding, truncate and commits.

One ContainerFile exists per inode while any handle is open, so every handle sees
the same bytes. Its reads (verified, cached, single flight) are ChunkReader's, in
chunkread.py, its truncations and commits ChunkCommits', in chunkcommit.py. All methods run on the trio thread; codec and disk work go to
worker threads. Invariants (docs/cache.md):
- at most one encode of a chunk is in flight, so records of one chunk are appended
  in the order their data was written;
- a dirty chunk shadows the container; it leaves the dirty set only when the
  record of exactly its current version has been appended;
- truncate and commit wait until no encode is in flight.
"""
from __future__ import annotations

import errno
import logging
import os
import time

import trio

from dccfs.codecs import ChunkHints
from dccfs.config import Rule
from dccfs.container import ChunkLoc, Container
from dccfs.chunkcoder import ChunkCoder
from dccfs.chunkcommit import ChunkCommits
from dccfs.chunkread import ChunkReader
from dccfs.engine import Engine
from dccfs.pin_records import header_name
from dccfs.readahead import ReadAhead

log = logging.getLogger(__name__)


def is_all_zero(data: bytes) -> bool:
    """Cheap for data (the ends are checked first), memcmp-fast for zeros."""
    if not data:
        return True
    if data[0] or data[-1] or data[len(data) // 2]:
        return False
    return data == bytes(len(data))


class ContainerFile(ChunkReader, ChunkCommits):
    def __init__(self, engine: Engine, container: Container, rule: Rule):
        self.engine = engine
        self.container = container
        self.rule = rule
        self.cache_id = container.cache_id
        container.base_store = engine.bases
        self.chunk_size = container.chunk_size
        self.size = container.size
        # A chunk written whole in one request is kept as the request's own bytes (no copy); the
        # head of a chunk, until its rest comes, as a memoryview of the request that brought it;
        # one assembled otherwise is a bytearray. _mutable() converts on demand.
        self.dirty: dict[int, bytes | bytearray | memoryview] = {}
        self.versions: dict[int, int] = {}
        # Dirty chunks whose store failed: they no longer hold dirty budget, so one file's
        # failing store cannot starve every other writer. While any is left, no new dirty chunk
        # is taken (found by review: a writer retrying on a full disk grew the daemon unbounded).
        self._unbudgeted: set[int] = set()
        self.inflight: set[int] = set()
        self.mtime_ns: int | None = None
        self.changed_ns = 0  # last change to data or size, for st_ctime
        self.handles = 0
        self.write_locked = False
        self.closed = False
        # The last close gave up on a commit: the kernel's cached pages and size are not what is stored.
        self.lost_changes = False
        self.release_lock = trio.Lock()
        self.failure: OSError | None = None  # the last store that failed
        # Counts stores that failed and writes refused (errseq, as the kernel's): each writable
        # handle's next fsync or close reports those since its open or its last report (Handle).
        self.error_seq = 0
        self.reported_seq = 0  # the error_seq that some handle has reported up to
        # error_seq at the last write refused from the kernel's writeback cache: those bytes are lost
        # (the kernel's pages and size show them until the last close), so every fsync and close of a
        # handle open then fails (Handle).
        self.lost_at_seq = 0
        self._store_failures_logged = False  # one warning per run of failing stores (a full disk)
        self._busy = 0
        self._idle = trio.Event()
        self._idle.set()
        self._write_lock = trio.Lock()
        self._loading: dict[tuple, trio.Event] = {}  # ChunkReader's single flight
        self.resetting: trio.Event | None = None  # set while a truncate to 0 starts the file over
        self.coder = ChunkCoder(engine, rule, container.path, container.chunk_size)
        # Points the file's inode at a new backing file (an O_PATH descriptor); set by HandleTable.
        self.on_new_container = os.close
        self.retired_fds: list[int] = []  # containers replaced under the open file
        # The directory a new container was renamed into (dccfs.pinned_overwrite): fsynced
        # by the next durable commit, before the records it makes durable.
        self._unsynced_dir_fd: int | None = None
        self.readahead = ReadAhead()

    @property
    def path(self) -> str:
        return self.container.path

    def renamed(self, relpath: str) -> None:
        """The file's new name, for its messages (the container's and the coder's)."""
        self.container.path = relpath
        self.coder.renamed(relpath)

    @property
    def content_changed(self) -> bool:
        """Writes or a size not committed yet: what a background rewrite must not swap away. A
        truncate that removes no stored chunk (or grows the file) changes only self.size, which
        the container learns at the next commit (found by review: such a truncate by path was
        swapped away); an explicit mtime alone (the kernel sends the times back after a rename,
        with the writeback cache) is no change to the content."""
        return bool(self.dirty) or self.container.dirty or self.size != self.container.committed_size

    @property
    def has_changes(self) -> bool:
        return self.content_changed or self.mtime_ns is not None

    # -- writes ------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        cs = self.chunk_size
        end = offset + len(data)
        view = memoryview(data)
        async with self._write_lock:
            pos = offset
            while pos < end:
                idx, inner = divmod(pos, cs)
                n = min(cs - inner, end - pos)
                buf = self.dirty.get(idx)
                if inner == 0 and n == cs:
                    # A whole chunk: keep the request's bytes (copied only if sliced).
                    if buf is None:
                        await self._reserve_dirty()
                    self.dirty[idx] = data if n == len(data) and isinstance(data, bytes) \
                        else bytes(view[pos - offset:pos - offset + n])
                    self.versions[idx] = self.versions.get(idx, -1) + 1
                elif buf is None and inner == 0 and isinstance(data, bytes) and idx not in self.container.index:
                    # The start of a chunk nothing is stored for, ending this request: the kernel's
                    # writeback sends max_write requests at any phase, so nine chunks in ten of a
                    # torch.save arrive in two pieces. This one is kept as a view of the request
                    # until the rest completes the chunk (one join, and no copy for the encoder).
                    await self._reserve_dirty()
                    self.dirty[idx] = view[pos - offset:pos - offset + n]
                    self.versions[idx] = 0
                elif isinstance(buf, memoryview) and inner == len(buf) and inner + n == cs:
                    self.dirty[idx] = b"".join((buf, view[pos - offset:pos - offset + n]))
                    self.versions[idx] += 1
                else:
                    if buf is None:
                        buf = await self._make_dirty(idx)
                    else:
                        buf = self._mutable(idx, buf)
                    if len(buf) < inner:
                        buf.extend(bytes(inner - len(buf)))
                    buf[inner:inner + n] = view[pos - offset:pos - offset + n]
                    self.versions[idx] += 1
                if end > self.size:
                    self.size = end
                if inner + n == cs:
                    self.schedule_flush(idx)
                pos += n
            self.size = max(self.size, end)
            self.mtime_ns = self.changed_ns = time.time_ns()
        return len(data)

    @property
    def store_failing(self) -> bool:
        """Chunks whose store failed are waiting for a retry (fsync, close, the next new chunk)."""
        return bool(self._unbudgeted)

    def failure_error(self) -> OSError:
        return OSError(self.failure.errno, f"{self.path}: {self.failure.strerror}")

    def _raise_failure(self) -> None:
        if self._unbudgeted and self.failure is not None:
            raise self.failure_error()

    async def _reserve_dirty(self, truncating: bool = False) -> None:
        """Dirty budget for one more chunk. Refused while chunks whose store failed are still unstored
        (retried first: the disk may have room again), except to cut a chunk in a shrink, which
        should not fail for an earlier write's sake (found by review)."""
        try:
            if self._unbudgeted and not truncating:
                for idx in list(self._unbudgeted):
                    self.schedule_flush(idx)
                await self._wait_idle()
                self._raise_failure()
            await self.engine.dirty.reserve(self.chunk_size, check=None if truncating else self._raise_failure)
        except OSError:
            if truncating:
                raise
            if self.engine.config.writeback_cache and not self.engine.config.shared:
                # The kernel acknowledged these bytes to the writer long ago: they are lost, and
                # only the writer's fsync or close can still say so (found by review: a close
                # returned 0 for a file missing its last megabytes).
                self.error_seq += 1
                self.lost_at_seq = self.error_seq
            else:
                self.reported_seq = self.error_seq  # to the writer, by its write()
            raise

    async def _make_dirty(self, idx: int, truncating: bool = False) -> bytearray:
        """A dirty bytearray for a chunk written in part: its stored bytes, or empty."""
        await self._reserve_dirty(truncating)
        try:
            existing = await self.load_chunk(idx)
        except BaseException:
            self.engine.dirty.release(self.chunk_size)
            raise
        buf = bytearray(existing) if existing else bytearray()
        self.dirty[idx] = buf
        self.versions[idx] = 0
        return buf

    def _mutable(self, idx: int, buf: bytes | bytearray | memoryview) -> bytearray:
        """The dirty chunk as a bytearray, converting a whole-chunk write's bytes (or a head's view) once."""
        if isinstance(buf, bytearray):
            return buf
        buf = self.dirty[idx] = bytearray(buf)
        return buf

    def _drop_dirty(self, idx: int) -> None:
        if self.dirty.pop(idx, None) is not None:
            del self.versions[idx]
            if idx in self._unbudgeted:
                self._unbudgeted.discard(idx)
            else:
                self.engine.dirty.release(self.chunk_size)

    def _unbudget(self, idx: int) -> None:
        if idx in self.dirty and idx not in self._unbudgeted:
            self._unbudgeted.add(idx)
            self.engine.dirty.release(self.chunk_size)

    def forget_dirty(self) -> None:
        """Drop dirty chunks that can no longer be stored (closing after a failed commit)."""
        for idx in list(self.dirty):
            self._drop_dirty(idx)

    def schedule_flush(self, idx: int) -> None:
        """Start encoding a dirty chunk in the background unless one encode of it is running."""
        if idx in self.inflight or idx not in self.dirty:
            return
        self.coder.observe(self.dirty, self.size, self.container.header.file_id)
        self.inflight.add(idx)
        self._busy += 1
        if self._busy == 1:
            self._idle = trio.Event()
        self.engine.start_background(self._flush_chunk, idx)

    def schedule_all(self) -> None:
        for idx in list(self.dirty):
            self.schedule_flush(idx)

    async def _flush_chunk(self, idx: int) -> None:
        try:
            await self.coder.base_chosen()
            # The snapshot of a partly written chunk is a copy outside the dirty budget, so
            # it is taken only once a core is free: taken before the wait, a burst of
            # unaligned writes doubled the budget (peak RSS +300 MB while saving mpnet_fp32).
            async with self.engine.cpu_limiter:
                buf = self.dirty.get(idx)
                if buf is None:
                    return
                version = self.versions[idx]
                limit = max(0, min(len(buf), self.size - idx * self.chunk_size))
                # bytes are immutable, so a whole-chunk write is encoded without a copy.
                raw = buf if isinstance(buf, bytes) and limit == len(buf) else bytes(memoryview(buf)[:limit])
                if is_all_zero(raw):
                    # All zeros: a hole costs nothing on disk.
                    self.container.drop_chunk(idx)
                else:
                    # Hints on this thread, in the order chunks fill: a torch zip storage is
                    # learnt from its header in one chunk before the next chunk asks for it.
                    hints = self.coder.hints_for(idx, raw, blocks=self.container.blocks_ok)
                    # One worker-thread hop per chunk: encode, then append under the
                    # container's own lock (the append is a page-cache copy).
                    loc = await trio.to_thread.run_sync(
                        self._encode_and_append, idx, raw, hints, limiter=self.engine.held_cpu_limiter)
                    key = (self.cache_id, idx, loc.offset)
                    self.engine.cache.put(key, raw, is_write=True)
                    self.engine.record_access(key, len(raw), True)
                    self._store_failures_logged = False
            if self.versions.get(idx) == version:
                self._drop_dirty(idx)
        except Exception as exc:
            # Kept dirty but out of the dirty budget (_unbudget), so other writers go on;
            # reported to this file's writer by its next write that needs a chunk and by
            # the next flush_dirty (fsync, close), which also retries it.
            if isinstance(exc, OSError):
                # A full disk fails every chunk of every retry: say it once, until a store succeeds.
                level = logging.DEBUG if self._store_failures_logged else logging.WARNING
                log.log(level, "%s: storing chunk %d failed: %s", self.path, idx, exc)
                self._store_failures_logged = True
            else:
                log.exception("%s: storing chunk %d failed", self.path, idx)
                exc = OSError(errno.EIO, f"storing chunk {idx} failed: {exc}")
            self.failure = exc
            self.error_seq += 1
            self._unbudget(idx)
        finally:
            self.inflight.discard(idx)
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()

    def _encode_and_append(self, idx: int, raw: bytes, hints: ChunkHints) -> ChunkLoc:
        delta = self.coder.delta
        if delta is not None:
            # The pin's record names the container the delta goes into; no reset runs
            # while an encode is in flight, so every encode of this moment agrees.
            delta.dependent_key = header_name(self.container.header)
        encoded, raw_sum = self.coder.encode(idx, raw, hints)
        return self.container.append_chunk(idx, encoded, len(raw), raw_sum)

    async def _wait_idle(self) -> None:
        await self._idle.wait()

    async def flush_dirty(self) -> None:
        """Encode and append every dirty chunk (records only; the next commit makes them
        durable). Raises while a chunk cannot be stored (ENOSPC, EIO); earlier failures are
        for each handle to report (error_seq)."""
        while self.dirty:
            self.schedule_all()
            await self._wait_idle()
            if self._unbudgeted:
                raise self.failure_error()
