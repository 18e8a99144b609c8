"""Sequential read-ahead for one open file: detect a sequential reader, prefetch and advise."""
from __future__ import annotations

import trio

from dccfs.advice import record_runs, willneed

# The window counts stored chunks, so holes (chunks of zeros, stored as nothing) do not use it up:
# checkpoints have runs of them (optimizer state of embedding rows without gradient), and a window
# of 8 chunk numbers over such a run held one chunk to decode, so the decoders idled while the
# reader crossed the run and then waited for the chunks after it. A scan for stored chunks looks at
# most this many chunk numbers past the window.
MAX_HOLES_SKIPPED = 256
# The window is at most this fraction of T0 (1/8: 8 chunks of 1 MiB from a 64 MiB T0 on)
READAHEAD_SHARE_OF_T0 = 8


class ReadAhead:
    """Per-file state: where the next sequential read would start, how long the current
    sequential run is, and how far chunks have been prefetched."""

    def __init__(self):
        self.next_sequential = -1
        self.sequential_run = 0
        self.prefetched_to = -1

    def note(self, file, start: int, end: int, last_idx: int) -> None:
        """After a read of [start, end) ending in chunk last_idx, prefetch the next
        readahead_chunks stored chunks a sequential reader will want (from the third
        sequential read on); holes in between do not count."""
        if start == self.next_sequential:
            self.sequential_run += 1
        else:
            self.sequential_run = 0
            # A new run (a rewind, a seek) is prefetched afresh (found by review: a second pass
            # over the same descriptor got no read-ahead at all).
            self.prefetched_to = -1
        self.next_sequential = end
        engine = file.engine
        # A window larger than a small T0 can hold is evicted before the reader gets to it and
        # decoded twice; it also pushed the hot set out (found by review, T0 16 MiB, 8 chunks ahead).
        ahead = min(engine.config.cache.readahead_chunks,
                    engine.config.cache.t0_bytes // (READAHEAD_SHARE_OF_T0 * file.chunk_size))
        if self.sequential_run < 2 or ahead <= 0:
            return
        index = file.container.index
        limit = min(last_idx + 1 + ahead + MAX_HOLES_SKIPPED,
                    (file.size + file.chunk_size - 1) // file.chunk_size)
        wanted = []
        stored = 0
        idx = last_idx + 1
        while idx < limit and stored < ahead:
            loc = index.get(idx)
            if loc is not None and idx not in file.dirty:
                stored += 1
                if idx > self.prefetched_to and not engine.cache.peek((file.cache_id, idx, loc.offset)):
                    wanted.append((idx, loc))
            idx += 1
        stop = idx
        # The prefetches below pread records from several threads at once, out of order,
        # which defeats the backing file's own read-ahead; WILLNEED over the runs of
        # adjacent records lets the kernel read them in large sequential I/Os (a record
        # rewritten at the container's far end gets a run of its own).
        runs = record_runs([loc for _, loc in wanted])
        if runs:
            engine.start_background(advise_willneed, file, runs)
        for idx, _ in wanted:
            engine.stats.readahead_chunks += 1
            engine.start_background(file.load_chunk, idx, True)
        self.prefetched_to = max(self.prefetched_to, stop - 1)


async def advise_willneed(file, runs: list[tuple[int, int]]) -> None:
    await trio.to_thread.run_sync(willneed, file.container.fd, runs, file.path, limiter=file.engine.io_limiter)
