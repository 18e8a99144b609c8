"""Window TinyLFU: a small LRU window in front of an SLRU main cache guarded by a frequency filter."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

from .base import Policy
from .frequency import CountingBloomFilter, FrequencyCounter

log = logging.getLogger(__name__)


class WTinyLFU(Policy):
    """W-TinyLFU (Einziger et al. 2017), byte-budgeted, structured like libCacheSim's WTinyLFU.

    Misses enter the window LRU. When space is needed the window's LRU key is the candidate:
    it moves into the main SLRU if main has room, otherwise it replaces main's victim
    (probation LRU) only if its estimated frequency is strictly higher, else it is evicted.
    A hit in probation promotes to protected (protected_ratio of main); protected overflow
    demotes back to probation. The frequency counter is aged every sample_factor x (resident
    keys) main-cache hits, as in libCacheSim. Counting also follows libCacheSim: a miss, a
    main hit and leaving the window each count once; window hits do not. Counts are exact by
    default (memory bounded by aging), or a counting Bloom filter sized for sketch_entries
    keys. libCacheSim sizes its sketch and aging by cache *bytes*, which is why the two are
    compared in count mode (unit sizes).
    """

    name = "wtinylfu"

    def __init__(self, capacity_bytes: int, *, window_ratio: float = 0.01,
                 protected_ratio: float = 0.8, sample_factor: int = 32,
                 sketch_entries: int | None = None, **params):
        super().__init__(capacity_bytes, **params)
        self.window_ratio = window_ratio
        self.protected_ratio = protected_ratio
        self.sample_factor = sample_factor
        self._window: OrderedDict = OrderedDict()     # key -> size, LRU at front
        self._probation: OrderedDict = OrderedDict()
        self._protected: OrderedDict = OrderedDict()
        self._window_bytes = self._probation_bytes = self._protected_bytes = 0
        # Exact counts by default; sketch_entries=N uses a counting Bloom filter sized for N
        # keys, like libCacheSim (whose N is the main cache size in *bytes*).
        self._freq = (FrequencyCounter() if sketch_entries is None
                      else CountingBloomFilter(sketch_entries))
        self._main_hits = 0
        self._missed_key = None  # the key whose miss access() already counted
        self._after_resize()

    def _after_resize(self) -> None:
        self._main_target = self.capacity - int(self.capacity * self.window_ratio)
        self._protected_target = int(self._main_target * self.protected_ratio)

    def __contains__(self, key) -> bool:
        return key in self._window or key in self._probation or key in self._protected

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def keys(self) -> Iterable:
        return list(self._window) + list(self._probation) + list(self._protected)

    def _sizes(self) -> dict:
        return {**self._window, **self._probation, **self._protected}

    def size_of(self, key) -> int:
        for segment in (self._window, self._probation, self._protected):
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
            # Not counted: the key is counted when it leaves the window (libCacheSim's rule),
            # so a burst of hits inside the window does not buy admission to main.
            self._window.move_to_end(key)
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
        self._count(key)
        self._missed_key = key
        return False

    def _insert(self, key, size: int, low_priority: bool) -> list:
        if self._missed_key != key:
            self._count(key)  # admitted without access(), e.g. a write
        self._missed_key = None
        evicted = []
        while self.used + size > self.capacity:
            evicted.append(self._evict_one())
        self._window[key] = size
        self._window_bytes += size
        if low_priority:
            # The next eviction candidate: it must beat main's victim on frequency to stay.
            self._window.move_to_end(key, last=False)
        self.used += size
        return evicted

    def _main_victim(self):
        segment = self._probation if self._probation else self._protected
        return segment, next(iter(segment))

    def _evict_one(self):
        while self._window:
            candidate, size = next(iter(self._window.items()))
            main_bytes = self._probation_bytes + self._protected_bytes
            if main_bytes + size <= self._main_target:
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
        segment, victim = self._main_victim()
        self._drop(segment, victim)
        return victim

    def _leave_window(self, key, size: int) -> None:
        del self._window[key]
        self._window_bytes -= size
        # Counted on leaving the window, after the admission decision (as libCacheSim does):
        # this stands in for the window hits that access() did not count.
        self._count(key)

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
            self.used -= size
            return
        for segment in (self._probation, self._protected):
            if key in segment:
                self._drop(segment, key)
                return
