"""Sequential read-ahead for one open file: detect a sequential reader, prefetch and advise."""
from __future__ import annotations

import logging
import os

import trio

log = logging.getLogger(__name__)

# Records this close together are advised as one run.
ADVISE_GAP = 64 << 10
# The window counts stored chunks, so holes (chunks of zeros, stored as nothing) do not use it up:
# checkpoints have runs of them (optimizer state of embedding rows without gradient), and a window
# of 8 chunk numbers over such a run held one chunk to decode, so the decoders idled while the
# reader crossed the run and then waited for the chunks after it. A scan for stored chunks looks at
# most this many chunk numbers past the window.
MAX_HOLES_SKIPPED = 256


def record_runs(locs) -> list[tuple[int, int]]:
    """(start, end) of the runs of records no more than ADVISE_GAP apart, by offset."""
    runs: list[list[int]] = []
    for loc in sorted(locs, key=lambda loc: loc.offset):
        if runs and loc.offset - runs[-1][1] <= ADVISE_GAP:
            runs[-1][1] = max(runs[-1][1], loc.offset + loc.length)
        else:
            runs.append([loc.offset, loc.offset + loc.length])
    return [(lo, hi) for lo, hi in runs]


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
        self.next_sequential = end
        engine = file.engine
        ahead = engine.config.cache.readahead_chunks
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
        for lo, hi in record_runs([loc for _, loc in wanted]):
            engine.start_background(advise_willneed, file, lo, hi - lo)
        for idx, _ in wanted:
            engine.stats.readahead_chunks += 1
            engine.start_background(file.load_chunk, idx, True)
        self.prefetched_to = max(self.prefetched_to, stop - 1)


async def advise_willneed(file, offset: int, length: int) -> None:
    try:
        await trio.to_thread.run_sync(os.posix_fadvise, file.container.fd, offset, length,
                                      os.POSIX_FADV_WILLNEED, limiter=file.engine.io_limiter)
    except OSError as exc:  # advice only: a closed or odd descriptor changes nothing
        log.debug("%s: read-ahead advice failed: %s", file.path, exc)
