"""Page-cache advice for container records: runs of nearby records, advised in slices the kernel reads whole."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Records this close together are advised as one run.
ADVISE_GAP = 64 << 10
# One WILLNEED call reads at most max(the device's largest I/O, the file's read-ahead window)
# and drops the rest without a word (force_page_cache_ra). Runs of records reach megabytes,
# which a disk with the default 128 KiB read-ahead cut to their first 128 KiB-1.25 MiB. So
# the advice goes out in slices of that size, read from sysfs per device (a disk that takes
# 8 MiB keeps its few large I/Os); 128 KiB, the kernel's default window, where sysfs does not
# say.
WILLNEED_SLICE = 128 << 10
_slice_of_device: dict[int, int] = {}


def record_runs(locs) -> list[tuple[int, int]]:
    """(start, end) of the runs of records no more than ADVISE_GAP apart, by offset."""
    runs: list[list[int]] = []
    for loc in sorted(locs, key=lambda loc: loc.offset):
        if runs and loc.offset - runs[-1][1] <= ADVISE_GAP:
            runs[-1][1] = max(runs[-1][1], loc.offset + loc.length)
        else:
            runs.append([loc.offset, loc.offset + loc.length])
    return [(lo, hi) for lo, hi in runs]


def device_slice(dev: int) -> int:
    """The most one WILLNEED call reads on block device dev: max(its largest I/O, its read-ahead
    window), at least WILLNEED_SLICE; WILLNEED_SLICE for a file system with no block device
    of its own in sysfs (tmpfs, network, btrfs's anonymous devices)."""
    size = _slice_of_device.get(dev)
    if size is None:
        size = WILLNEED_SLICE
        node = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        for queue in (os.path.join(node, "queue"), os.path.join(node, "..", "queue")):  # a partition's is its disk's
            try:
                kib = max(int(Path(queue, name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
            except (OSError, ValueError):
                continue
            size = max(kib << 10, WILLNEED_SLICE)
            break
        _slice_of_device[dev] = size
    return size


def willneed(fd: int, runs, path: str) -> None:
    """Ask the kernel to read the (start, end) byte ranges of fd ahead, in slices it reads whole.
    Advice only: a failure (a descriptor closed under it) is logged and ends it."""
    try:
        step = device_slice(os.fstat(fd).st_dev)
        for lo, hi in runs:
            for start in range(lo, hi, step):
                os.posix_fadvise(fd, start, min(step, hi - start), os.POSIX_FADV_WILLNEED)
    except OSError as exc:
        log.debug("%s: read-ahead advice failed: %s", path, exc)
