"""The read path of an open container file: dirty bytes, then T0, then a verified single-flight disk read."""
from __future__ import annotations

import logging
import time

import trio

from dccfs.container import ChunkError, ChunkLoc, record_codec

log = logging.getLogger(__name__)

# _read_verified's answer for a record that is gone because the file was overwritten
# (truncated to zero) after the chunk was looked up, or for a block that failed its checks:
# look it up again, or read the whole chunk.
_GONE = object()
# a read of at most this fraction of a block, not following the previous one, decodes that block alone
SMALL_READ_SHARE = 2


class ChunkReader:
    """Reads of a ContainerFile, which inherits them (a mixin: ContainerFile.__init__ sets up the state).

    Uses the file's engine, container, cache_id, chunk_size, size, dirty, closed, path and
    readahead, and owns _loading: the trio.Event of each chunk being read from disk, so
    concurrent loads of one chunk make one read (single flight, docs/cache.md)."""

    async def read(self, offset: int, length: int) -> bytes:
        if self.resetting is not None:
            await self.resetting.wait()
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        pieces: dict[int, bytes | bytearray | None] = {}
        missing = []
        for idx in range(first, last + 1):
            buf = self.dirty.get(idx)
            if buf is not None:
                pieces[idx] = buf
            else:
                missing.append(idx)
        if len(missing) == 1 and first == last:
            piece = await self._small_read(first, offset - first * cs, end - first * cs)
            if piece is not None:
                self.readahead.note(self, offset, end, last)
                return piece
            pieces[first] = await self.load_chunk(first)
        elif len(missing) == 1:
            pieces[missing[0]] = await self.load_chunk(missing[0])
        elif missing:
            async def load_into(i):
                pieces[i] = await self.load_chunk(i)
            async with trio.open_nursery() as nursery:
                for idx in missing:
                    nursery.start_soon(load_into, idx)
        self.readahead.note(self, offset, end, last)
        if first == last:
            data = pieces[first]
            lo = offset - first * cs
            hi = end - first * cs
            if lo == 0 and isinstance(data, bytes) and hi >= len(data):
                piece = data  # the whole chunk, as cached: no copy
            else:
                piece = bytes(memoryview(data)[lo:hi]) if data else b""
            # A stored chunk may end before the logical size (zeros follow).
            return piece + bytes(end - offset - len(piece)) if len(piece) < end - offset else piece
        out = bytearray(end - offset)
        for idx in range(first, last + 1):
            data = pieces[idx]
            if not data:
                continue
            chunk_start = idx * cs
            lo = max(offset, chunk_start) - chunk_start
            hi = min(end - chunk_start, len(data))
            if hi > lo:
                dst = chunk_start + lo - offset
                out[dst:dst + hi - lo] = memoryview(data)[lo:hi]
        return bytes(out)

    async def _small_read(self, idx: int, lo: int, hi: int) -> bytes | None:
        """Chunk bytes [lo, hi) from the one block that holds them, when the read is small, does not follow
        the last one and the chunk is neither in T0 nor being loaded; None: read the chunk (load_chunk)."""
        loc = self.container.index.get(idx)
        if loc is None or not loc.blocks or lo == self.readahead.next_sequential - idx * self.chunk_size:
            return None
        size = 1 << loc.block_shift
        block = lo >> loc.block_shift
        if hi - lo > size // SMALL_READ_SHARE or (hi - 1) >> loc.block_shift != block or block >= len(loc.blocks):
            return None
        key = (self.cache_id, idx, loc.offset)
        if key in self._loading or not self.engine.cache.miss_unloaded(key):
            return None
        self.engine.record_access(key, min(self.chunk_size, max(0, self.size - idx * self.chunk_size)), False)
        data = await trio.to_thread.run_sync(self._read_verified, idx, loc, False, key[0], block,
                                             limiter=self.engine.io_limiter)
        if data is _GONE:
            return None
        lo -= block * size
        hi -= block * size
        # the chunk's last block may end early: zeros follow, as after a short chunk
        piece = bytes(memoryview(data)[lo:hi])
        return piece + bytes(hi - lo - len(piece)) if len(piece) < hi - lo else piece

    async def load_chunk(self, idx: int, prefetch: bool = False) -> bytes | None:
        """The raw bytes of a stored chunk via the cache; None for a hole."""
        loc = self.container.index.get(idx)
        if loc is None:
            return None
        key = (self.cache_id, idx, loc.offset)
        cache = self.engine.cache
        if not prefetch:
            # The chunk's decoded size, what T0 charges and a write records (its stored record's
            # length made a replay weigh reads and writes of one chunk differently)
            self.engine.record_access(key, min(self.chunk_size, max(0, self.size - idx * self.chunk_size)), False)
        data = cache.get(key) if not prefetch else None
        if data is not None:
            return data
        pending = self._loading.get(key)
        if prefetch and pending is not None:
            # Being loaded already: a prefetch has nothing to add, and its get() after the wait
            # would count as a reference, which made every chunk of a scan look reused (the
            # hot set lost to it once a rewind restarted the read-ahead window)
            return None
        while pending is not None:
            await pending.wait()
            data = cache.get(key)
            if data is not None:
                return data
            # Not kept by T0: another waiter may have started the next load already.
            pending = self._loading.get(key)
        if prefetch and self.closed:
            return None
        done = self._loading[key] = trio.Event()
        try:
            data = await trio.to_thread.run_sync(self._read_verified, idx, loc, prefetch,
                                                 key[0], limiter=self.engine.io_limiter)
            if prefetch and self.closed:
                # Closed while this waited for its thread: the descriptor number may have
                # been another container's by the time of the read; never cache that.
                return None
            if data is not _GONE:
                if data is not None:
                    cache.put(key, data)
                return data
        finally:
            del self._loading[key]
            done.set()
        return await self.load_chunk(idx, prefetch)

    def _read_verified(self, idx: int, loc: ChunkLoc, prefetch: bool = False,
                       cache_id: bytes | None = None, block: int | None = None):
        """The chunk's verified raw bytes, or those of one of its blocks."""
        stats = self.engine.stats
        container = self.container
        try:
            if block is not None:
                started = time.thread_time()
                data = container.read_block(idx, loc, block)
                stats.block_reads += 1
                stats.count_codec("decode", "blocks (one)", len(data), 0, time.thread_time() - started)
                return data
            record = container.read_record(idx, loc)
            # The worker's CPU time for the decode alone (the read from disk is in the read
            # latency; waits for the GIL or a core are not the codec's), so the decode MB/s in
            # `dccfs stats` is the codec's single-thread speed.
            started = time.thread_time()
            data = container.decode_record(idx, record)
            seconds = time.thread_time() - started
        except (ChunkError, OSError) as exc:
            if prefetch and self.closed:
                # The file closed under a prefetch: its descriptor is gone or already
                # reused by another file, so this failure says nothing about the data.
                log.debug("%s: prefetch of chunk %d after close: %s", self.path, idx, exc)
                return None
            if cache_id is not None and not container.holds(idx, loc, cache_id):
                log.debug("%s: chunk %d was overwritten while it was read: %s", self.path, idx, exc)
                return _GONE
            if isinstance(exc, ChunkError):
                stats.checksum_errors += 1
                if block is not None:
                    # The whole chunk has its own checksum (and its record header says which chunk it is):
                    # a damaged block header or table must not fail a read whose bytes are intact, and a
                    # read must fail the same whatever its size (found by review).
                    log.error("%s; reading the whole chunk instead", exc)
                    return _GONE
                log.error("%s", exc)
            raise
        stats.disk.hits += 1  # served by T2, the containers on disk
        stats.count_codec("decode", record_codec(record), len(data), loc.length, seconds)
        return data
