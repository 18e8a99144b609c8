"""Keeps the daemon's resident memory close to what its budgets account for: malloc tuning, heap trimming, and the memory the budgets must fit in."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

import trio

log = logging.getLogger(__name__)

# glibc serves allocations above a dynamic threshold (128 KiB at first) with fresh mmaps
# and trims freed heap tops: a 1 MiB chunk buffer then costs 256 page faults and zeroing,
# two or three times per chunk. With these settings the daemon's system time for one
# torch.save of mpnet_fp32 was 0.7 s instead of 1.3-1.6 s (two A/B runs, noisy machine;
# docs/performance.md). Mapping every buffer ≥ 256 KiB instead kept RSS at what the budgets
# account for but tripled the daemon's system time for the bench_fs writes (3.4 s -> 11.7 s,
# one-off A/B in docs/performance.md).
MALLOC_TUNING = {
    -3: 16 << 20,   # M_MMAP_THRESHOLD: chunk-sized buffers come from the heap
    -1: 64 << 20,   # M_TRIM_THRESHOLD: keep up to 64 MiB of freed heap top mapped
    -8: 4,          # M_ARENA_MAX: a few arenas; more only multiplies retained memory
}

# A heap keeps the pages of freed chunk buffers resident: the T0 cache and the write path
# free 1 MiB buffers in other threads' arenas and at other addresses than the next
# allocations use, so RSS rose 250-300 MB past the budgets while T0 filled. malloc_trim
# hands those pages back; it runs when the untracked part of RSS has grown by TRIM_GROWTH,
# checked every TRIM_CHECK_S. Checked every second, a writer on tmpfs (400 MB/s of chunks
# admitted to T0 and evicted again) left 300-360 MiB of freed heap between checks, and
# `tools/bench_fs.py --workdir /dev/shm/bfs --allow-tmpfs` peaked at 1,546-1,619 MB against
# budgets of 1,342 MB; every 0.25 s it left 140-160 MiB, for the same daemon CPU
# (docs/cache.md, "Memory").
TRIM_CHECK_S = 0.25
TRIM_GROWTH = 16 << 20
# unshared_bytes walks every mapping (about 7 ms with 600 of them), so it is read again only after
# this long, or once RSS has moved by TRIM_GROWTH; in between RSS's changes are taken as its own.
UNSHARED_READ_S = 5.0
# What the daemon may hold beyond its budgets (T0 + dirty): the interpreter and the loaded
# kernels (about 111 MiB on a 2-core EPYC, docs/cache.md), the buffers in flight, and freed heap between
# two checks. When RSS is above the budgets plus this after a trim, T0 gives back its
# coldest chunks (HeapTrimmer.check) rather than let the process grow past what its
# configuration promises; issue 5's limit is the budgets + 200 MB (190.7 MiB).
OVERHEAD_LIMIT = 168 << 20

_PAGE = os.sysconf("SC_PAGE_SIZE")

# numba loads the codec kernels through LLVM: warming them up touches about 70 MB of
# libllvmlite.so, which the kernels never run again once loaded. MADV_PAGEOUT (Linux 5.4)
# reclaims those clean file pages without changing what the mapping reads (a later
# compile faults them back in from the file); pages another process shares are left alone.
MADV_PAGEOUT = 21
COMPILER_LIBRARIES = ("libllvmlite.so",)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def tune_malloc() -> None:
    """Apply MALLOC_TUNING through mallopt; a libc without it (musl) keeps its defaults."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        log.info("mallopt unavailable; malloc defaults kept")
        return
    for param, value in MALLOC_TUNING.items():
        if mallopt(param, value) != 1:
            log.info("mallopt(%d, %d) refused", param, value)


def release_compiler_pages() -> int:
    """Ask the kernel to reclaim the read-only pages of the compiler's library; returns
    the bytes of RSS given back (0 where madvise or /proc is not there)."""
    madvise = getattr(_LIBC, "madvise", None)
    before = resident_bytes()
    if madvise is None or before is None:
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read().splitlines()
    except OSError:
        return 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "w" in fields[1] or not fields[5].endswith(COMPILER_LIBRARIES):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(start, end - start, MADV_PAGEOUT) != 0:
            log.debug("madvise(MADV_PAGEOUT) refused for a mapping of %s", fields[5])
    return max(0, before - (resident_bytes() or before))


def _cgroup_limit_files() -> list[str]:
    """The memory limit files of this process's cgroup and of every cgroup above it (a limit on a
    parent, a systemd slice, binds too): v2 memory.max, v1 memory.limit_in_bytes."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            top, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            top, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [part for part in path.split("/") if part]
        # (inside a cgroup namespace the path may not exist below top: the top is then this cgroup)
        files += [os.path.join(top, *parts[:depth], name) for depth in range(len(parts), -1, -1)]
    return files


def memory_limit() -> tuple[int, str] | None:
    """The most memory this process can have, and what sets it: the machine's RAM, or a smaller
    cgroup limit; None where neither can be read."""
    limits = []
    try:
        limits.append((os.sysconf("SC_PHYS_PAGES") * _PAGE, "this machine's memory"))
    except (ValueError, OSError):
        pass
    for path in _cgroup_limit_files():
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue  # not there ("max" has no file at the root) or not readable
        if text.isdigit():  # ("max", and v1's near-2**63 "unlimited", never win below)
            limits.append((int(text), f"the memory limit of this process's cgroup ({path})"))
    return min(limits, default=None)


def resident_bytes() -> int | None:
    """This process's resident set size, or None where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def unshared_bytes() -> int | None:
    """The resident pages no other process maps (Private_Clean + Private_Dirty of smaps_rollup),
    or None where the kernel has no smaps_rollup. Library pages that other processes map too (the
    codec kernels' libraries, when several mounts run) are counted by each one's RSS, yet cost
    nothing more for this one; reading this walks every mapping, so it is read only past the ceiling."""
    try:
        with open("/proc/self/smaps_rollup", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines()[1:] if b":" in line)
        return sum(int(fields[name].split()[0]) for name in (b"Private_Clean", b"Private_Dirty")) << 10
    except (OSError, ValueError, KeyError, IndexError):
        return None


class HeapTrimmer:
    """Keeps RSS under the budgets plus OVERHEAD_LIMIT: trims the heap whenever RSS minus the
    budgeted bytes (T0 resident, dirty) has grown, and makes T0 shed chunks when trimming
    alone does not bring RSS under that ceiling.

    The untracked part is the interpreter, the codec kernels, buffers in flight and freed
    heap pages; only the last can be given back, so after each trim the remainder becomes
    the new floor, and the floor follows the untracked part down when it shrinks by itself.
    """

    def __init__(self, tracked_bytes, stats, budget_bytes=None, shed=None,
                 overhead_limit: int = OVERHEAD_LIMIT) -> None:
        self._tracked_bytes = tracked_bytes
        self._stats = stats
        self._budget_bytes = budget_bytes
        self._shed = shed
        self._overhead_limit = overhead_limit
        self._floor: int | None = None
        self._trim = getattr(_LIBC, "malloc_trim", None)
        self._warned = False
        self._stuck_at: int | None = None  # RSS after a hold that could not reach the ceiling
        self._unshared: tuple[float, int, int] | None = None  # (when, RSS then, unshared then)

    def check(self) -> None:
        rss = resident_bytes()
        if rss is None or self._trim is None:
            return
        untracked = rss - self._tracked_bytes()
        if self._floor is None or untracked < self._floor:
            self._floor = untracked
        elif untracked - self._floor >= TRIM_GROWTH:
            rss = self._trim_now(rss)
        if self._budget_bytes is not None and self._shed is not None:
            self._hold_ceiling(rss)

    def _trim_now(self, rss: int) -> int:
        self._trim(0)
        after = resident_bytes() or rss
        self._floor = after - self._tracked_bytes()
        self._stats.heap_trims += 1
        self._stats.heap_trimmed_bytes += max(0, rss - after)
        log.debug("malloc_trim gave back %d bytes (untracked now %d)", rss - after, self._floor)
        return after

    def _hold_ceiling(self, rss: int) -> None:
        """Above the ceiling: the compiler's pages (a kernel compiled since the warm-up may
        have touched them again), then the heap, then T0's coldest chunks."""
        ceiling = self._budget_bytes() + self._overhead_limit
        # RSS is an upper bound of what is this process's own: pages that other processes map
        # too cost nothing more for this one (found by review: with a few mounts on a machine,
        # their shared kernel libraries kept a small T0 empty).
        if rss <= ceiling or (rss := self._own_bytes(rss)) <= ceiling:
            self._stuck_at = None
            return
        if self._stuck_at is not None and rss < self._stuck_at + TRIM_GROWTH:
            return  # nothing more to give back since the last try (e.g. T0 is empty)
        release_compiler_pages()
        rss = self._own_bytes(self._trim_now(resident_bytes() or rss))
        excess = rss - ceiling
        if excess <= 0:
            return
        shed = self._shed(excess)
        if shed:
            rss = self._own_bytes(self._trim_now(resident_bytes() or rss))
            self._stats.t0_shed_bytes += shed
            log.debug("T0 gave back %d bytes to keep RSS under %d (now %d)", shed, ceiling, rss)
        self._stuck_at = rss if rss > ceiling else None
        if rss > ceiling and not self._warned:
            self._warned = True
            log.warning("resident memory %d MiB is above the budgets + %d MiB even with T0 emptied "
                        "as far as it goes: the rest is not chunk data", rss >> 20,
                        self._overhead_limit >> 20)

    def _own_bytes(self, rss: int) -> int:
        """What of RSS no other process maps (unshared_bytes), read at most every UNSHARED_READ_S."""
        now = time.monotonic()
        if self._unshared is not None:
            when, rss_then, unshared = self._unshared
            if now - when < UNSHARED_READ_S and abs(rss - rss_then) < TRIM_GROWTH:
                return max(0, unshared + rss - rss_then)
        unshared = unshared_bytes()
        if unshared is None:
            return rss
        self._unshared = (now, rss, unshared)
        return unshared

    async def run(self, limiter: trio.CapacityLimiter) -> None:
        if self._trim is None or resident_bytes() is None:
            log.info("malloc_trim or /proc/self/statm unavailable; the heap is not trimmed")
            return
        while True:
            await trio.sleep(TRIM_CHECK_S)
            await trio.to_thread.run_sync(self.check, limiter=limiter)
