"""Window TinyLFU: a small LRU window in front of an SLRU main cache guarded by a frequency filter."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

from .base import Policy
from .frequency import CountingBloomFilter, FrequencyCounter

log = logging.getLogger(__name__)

WINDOW_COUNT_MODES = ("first_hit", "on_exit")

# The parameters under which this class is structured and counts exactly like libCacheSim
# 0.3.5's WTinyLFU; tests/test_policies_libcachesim.py compares with these. The defaults differ
# (docs/policies.md, "W-TinyLFU for dccfs", has the replay figures behind each change).
LIBCACHESIM_PARAMS = {"protected_ratio": 0.8, "window_count": "on_exit", "write_buffer_ratio": 0.0}


class WTinyLFU(Policy):
    """W-TinyLFU (Einziger et al. 2017), byte-budgeted, structured like libCacheSim's WTinyLFU.

    Misses enter the window LRU. When space is needed the window's LRU key is the candidate:
    it moves into the main SLRU if main has room, otherwise it replaces main's victim
    (probation LRU) only if its estimated frequency is strictly higher, else it is evicted.
    A hit in probation promotes to protected (protected_ratio of main); protected overflow
    demotes back to probation. The frequency counter is aged every sample_factor x (resident
    keys) main-cache hits, as in libCacheSim. Counts are exact by default (memory bounded by
    aging), or a counting Bloom filter sized for sketch_entries keys.

    Counting: a miss and a main hit count once. window_count='first_hit' (default) also counts
    the first hit of each stay in the window; 'on_exit' (libCacheSim's rule) instead counts
    every key once as it leaves the window, after the admission decision. With 'on_exit' a key
    hit many times in the window reaches main's gate with the count of a one-hit wonder, and
    every key that ever passed through the window carries an extra count, so a scan admitted
    while the cache was filling out-counts hot keys that arrive later.

    Written chunks (write_admit='hot') go to a FIFO write buffer of write_buffer_ratio of the
    capacity, outside the window. A read hits them there; a hit is counted but does not
    promote, so a checkpoint read back once (an eval job, a restart) is served from RAM
    without displacing the frequent set, and a write-once stream costs at most the buffer.
    Chunks leaving the buffer move to main while main has free room (a cold cache keeps what
    was just written), else they are dropped; one read again later enters the window as a
    miss, with the counts of its earlier hits. 0 turns the buffer off (written chunks enter
    the window like read misses).
    """

    name = "wtinylfu"

    def __init__(self, capacity_bytes: int, *, window_ratio: float = 0.01,
                 protected_ratio: float = 0.6, sample_factor: int = 32,
                 sketch_entries: int | None = None, window_count: str = "first_hit",
                 write_buffer_ratio: float = 0.03, **params):
        super().__init__(capacity_bytes, **params)
        if window_count not in WINDOW_COUNT_MODES:
            raise ValueError(f"window_count must be one of {WINDOW_COUNT_MODES}, got {window_count!r}")
        if not 0.0 <= write_buffer_ratio < 1.0:
            raise ValueError(f"write_buffer_ratio must be in [0, 1), got {write_buffer_ratio}")
        self.window_ratio = window_ratio
        self.protected_ratio = protected_ratio
        self.sample_factor = sample_factor
        self.window_count = window_count
        self.write_buffer_ratio = write_buffer_ratio
        self._writes: OrderedDict = OrderedDict()     # write buffer: key -> size, oldest first
        self._window: OrderedDict = OrderedDict()     # key -> size, LRU at front
        self._probation: OrderedDict = OrderedDict()
        self._protected: OrderedDict = OrderedDict()
        self._writes_bytes = self._window_bytes = self._probation_bytes = self._protected_bytes = 0
        self._window_hit: set = set()  # window keys already counted in this stay ('first_hit')
        # Exact counts by default; sketch_entries=N uses a counting Bloom filter sized for N
        # keys, like libCacheSim (whose N is the main cache size in *bytes*).
        self._freq = (FrequencyCounter() if sketch_entries is None
                      else CountingBloomFilter(sketch_entries))
        self._main_hits = 0
        self._missed_key = None  # the key whose miss access() already counted
        self._admitting_write = False
        self._after_resize()

    def _after_resize(self) -> None:
        self._main_target = self.capacity - int(self.capacity * self.window_ratio)
        self._protected_target = int(self._main_target * self.protected_ratio)
        self._writes_target = int(self.capacity * self.write_buffer_ratio)

    def __contains__(self, key) -> bool:
        return (key in self._window or key in self._probation or key in self._protected
                or key in self._writes)

    def __len__(self) -> int:
        return len(self._writes) + len(self._window) + len(self._probation) + len(self._protected)

    def keys(self) -> Iterable:
        return list(self._writes) + list(self._window) + list(self._probation) + list(self._protected)

    def _sizes(self) -> dict:
        return {**self._writes, **self._window, **self._probation, **self._protected}

    def size_of(self, key) -> int:
        for segment in (self._window, self._probation, self._protected, self._writes):
            if key in segment:
                return segment[key]
        raise KeyError(key)

    def _count(self, key) -> None:
        self._freq.increment(key)
        # Memory guard: a long scan adds keys without any main hit to trigger aging.
        if len(self._freq) > 2 * self._sample_limit():
            self._freq.age()

    def _sample_limit(self) -> int:
        return self.sample_factor * max(len(self), 64)

    def _count_main_hit(self, key) -> None:
        # Like libCacheSim: the aging clock ticks on main-cache hits only.
        self._count(key)
        self._main_hits += 1
        if self._main_hits >= self._sample_limit():
            self._main_hits = 0
            self._freq.age()

    def access(self, key) -> bool:
        if key in self._window:
            self._window.move_to_end(key)
            # Once per stay: a burst of hits inside the window does not buy admission to main.
            if self.window_count == "first_hit" and key not in self._window_hit:
                self._window_hit.add(key)
                self._count(key)
            return True
        size = self._probation.pop(key, None)
        if size is not None:
            self._count_main_hit(key)
            self._probation_bytes -= size
            self._protected[key] = size
            self._protected_bytes += size
            while self._protected_bytes > self._protected_target and len(self._protected) > 1:
                demoted, demoted_size = self._protected.popitem(last=False)
                self._protected_bytes -= demoted_size
                self._probation[demoted] = demoted_size
                self._probation_bytes += demoted_size
            return True
        if key in self._protected:
            self._count_main_hit(key)
            self._protected.move_to_end(key)
            return True
        if key in self._writes:
            self._count(key)  # no promotion: see the class docstring
            return True
        self._count(key)
        self._missed_key = key
        return False

    def admit(self, key, size: int, is_write: bool = False) -> tuple[bool, list]:
        self._admitting_write = is_write
        try:
            return super().admit(key, size, is_write)
        finally:
            self._admitting_write = False

    def _insert(self, key, size: int, low_priority: bool) -> list:
        if self._missed_key != key:
            self._count(key)  # admitted without access(), e.g. a write
        self._missed_key = None
        evicted = []
        if self._admitting_write and not low_priority and 0 < size <= self._writes_target:
            while self._writes_bytes + size > self._writes_target:
                evicted.extend(self._retire_write())
            while self.used + size > self.capacity:
                evicted.append(self._evict_one())
            self._writes[key] = size
            self._writes_bytes += size
            self.used += size
            return evicted
        while self.used + size > self.capacity:
            evicted.append(self._evict_one())
        self._window[key] = size
        self._window_bytes += size
        if low_priority:
            # The next eviction candidate: it must beat main's victim on frequency to stay.
            self._window.move_to_end(key, last=False)
        self.used += size
        return evicted

    def _retire_write(self) -> list:
        """The oldest written chunk leaves the buffer: into main while main is still filling
        (a cold cache keeps what was just written), else out of the cache."""
        key, size = next(iter(self._writes.items()))
        main_bytes = self._probation_bytes + self._protected_bytes
        if main_bytes + size > self._main_target - self._writes_bytes:
            return [self._evict_write()]
        del self._writes[key]
        self._writes_bytes -= size
        self._add_to_main(key, size)
        return []

    def _evict_write(self):
        key, size = self._writes.popitem(last=False)
        self._writes_bytes -= size
        self.used -= size
        return key

    def _main_victim(self):
        segment = self._probation if self._probation else self._protected
        return segment, next(iter(segment))

    def _evict_one(self):
        if self._writes_bytes > self._writes_target:
            return self._evict_write()  # the budget shrank (resize)
        # The write buffer's bytes come out of main's share; the window keeps its own.
        main_target = self._main_target - self._writes_bytes
        main_bytes = self._probation_bytes + self._protected_bytes
        if main_bytes > main_target and (self._probation or self._protected):
            segment, victim = self._main_victim()
            self._drop(segment, victim)
            return victim
        while self._window:
            candidate, size = next(iter(self._window.items()))
            main_bytes = self._probation_bytes + self._protected_bytes
            if main_bytes + size <= main_target:
                self._leave_window(candidate, size)
                self._add_to_main(candidate, size)
                continue
            if not self._probation and not self._protected:
                break  # main cannot take it at all: evict from the window
            segment, victim = self._main_victim()
            if self._freq.estimate(candidate) > self._freq.estimate(victim):
                self._drop(segment, victim)
                self._leave_window(candidate, size)
                self._add_to_main(candidate, size)
                return victim
            break
        if self._window:
            candidate, size = next(iter(self._window.items()))
            self._leave_window(candidate, size)
            self.used -= size
            return candidate
        if not self._probation and not self._protected:
            return self._evict_write()
        segment, victim = self._main_victim()
        self._drop(segment, victim)
        return victim

    def _leave_window(self, key, size: int) -> None:
        del self._window[key]
        self._window_bytes -= size
        if self.window_count == "on_exit":
            # After the admission decision, as libCacheSim does: this stands in for the
            # window hits that access() did not count.
            self._count(key)
        else:
            self._window_hit.discard(key)

    def _add_to_main(self, key, size: int) -> None:
        # Like libCacheSim's SLRU: the first segment with room takes it, so while main is
        # still filling (warm-up) keys land in protected instead of waiting for a second hit.
        if self._probation_bytes + size <= self._main_target - self._protected_target:
            self._probation[key] = size
            self._probation_bytes += size
        elif self._protected_bytes + size <= self._protected_target:
            self._protected[key] = size
            self._protected_bytes += size
        else:
            self._probation[key] = size
            self._probation_bytes += size

    def _drop(self, segment: OrderedDict, key) -> None:
        size = segment.pop(key)
        if segment is self._probation:
            self._probation_bytes -= size
        else:
            self._protected_bytes -= size
        self.used -= size

    def remove(self, key) -> None:
        size = self._window.pop(key, None)
        if size is not None:
            self._window_bytes -= size
            self._window_hit.discard(key)
            self.used -= size
            return
        size = self._writes.pop(key, None)
        if size is not None:
            self._writes_bytes -= size
            self.used -= size
            return
        for segment in (self._probation, self._protected):
            if key in segment:
                self._drop(segment, key)
                return
