"""Page-cache advice for container records: runs of nearby records, advised in slices the kernel reads whole."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Records this close together are advised as one run.
ADVISE_GAP = 64 << 10
# One WILLNEED call reads at most max(the device's largest I/O, the file's read-ahead window)
# and drops the rest without a word (force_page_cache_ra). Runs of records reach megabytes,
# which a disk with the default 128 KiB read-ahead cut to their first 128 KiB-1.25 MiB; a
# slice of 128 KiB is read whole on any device.
WILLNEED_SLICE = 128 << 10


def record_runs(locs) -> list[tuple[int, int]]:
    """(start, end) of the runs of records no more than ADVISE_GAP apart, by offset."""
    runs: list[list[int]] = []
    for loc in sorted(locs, key=lambda loc: loc.offset):
        if runs and loc.offset - runs[-1][1] <= ADVISE_GAP:
            runs[-1][1] = max(runs[-1][1], loc.offset + loc.length)
        else:
            runs.append([loc.offset, loc.offset + loc.length])
    return [(lo, hi) for lo, hi in runs]


def willneed(fd: int, runs, path: str) -> None:
    """Ask the kernel to read the (start, end) byte ranges of fd ahead, slice by slice. Advice
    only: a failure (a descriptor closed under it) is logged and ends it."""
    for lo, hi in runs:
        for start in range(lo, hi, WILLNEED_SLICE):
            try:
                os.posix_fadvise(fd, start, min(WILLNEED_SLICE, hi - start), os.POSIX_FADV_WILLNEED)
            except OSError as exc:
                log.debug("%s: read-ahead advice failed: %s", path, exc)
                return
