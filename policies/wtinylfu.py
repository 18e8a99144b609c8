"""Window TinyLFU: a small LRU window in front of an SLRU main cache guarded by a frequency filter."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

from .base import Policy
from .frequency import FrequencyCounter

log = logging.getLogger(__name__)


class WTinyLFU(Policy):
    """W-TinyLFU (Einziger et al. 2017), byte-budgeted, structured like libCacheSim's WTinyLFU.

    Misses enter the window LRU. When space is needed the window's LRU key is the candidate:
    it moves into the main SLRU if main has room, otherwise it replaces main's victim
    (probation LRU) only if its estimated frequency is strictly higher, else it is evicted.
    A hit in probation promotes to protected (protected_ratio of main); protected overflow
    demotes back to probation. The frequency counter is aged every sample_factor x (resident
    keys) increments, so it is sized by object count, not bytes (libCacheSim sizes its sketch
    by cache *bytes*, which is why it is compared in count mode).
    """

    name = "wtinylfu"

    def __init__(self, capacity_bytes: int, *, window_ratio: float = 0.01,
                 protected_ratio: float = 0.8, sample_factor: int = 10, **params):
        super().__init__(capacity_bytes, **params)
        self.window_ratio = window_ratio
        self.protected_ratio = protected_ratio
        self.sample_factor = sample_factor
        self._window: OrderedDict = OrderedDict()     # key -> size, LRU at front
        self._probation: OrderedDict = OrderedDict()
        self._protected: OrderedDict = OrderedDict()
        self._window_bytes = self._probation_bytes = self._protected_bytes = 0
        self._freq = FrequencyCounter(sample_size=sample_factor * 64)
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
        # Age relative to how many keys the cache holds, as Caffeine does (10 x maximum size).
        self._freq.sample_size = self.sample_factor * max(len(self), 64)
        self._freq.increment(key)

    def access(self, key) -> bool:
        self._count(key)
        if key in self._window:
            self._window.move_to_end(key)
            return True
        size = self._probation.pop(key, None)
        if size is not None:
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
            self._protected.move_to_end(key)
            return True
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
                self._window.popitem(last=False)
                self._window_bytes -= size
                self._probation[candidate] = size
                self._probation_bytes += size
                continue
            if not self._probation and not self._protected:
                break  # main cannot take it at all: evict from the window
            segment, victim = self._main_victim()
            if self._freq.estimate(candidate) > self._freq.estimate(victim):
                self._drop(segment, victim)
                self._window.popitem(last=False)
                self._window_bytes -= size
                self._probation[candidate] = size
                self._probation_bytes += size
                return victim
            break
        if self._window:
            candidate, size = self._window.popitem(last=False)
            self._window_bytes -= size
            self.used -= size
            return candidate
        segment, victim = self._main_victim()
        self._drop(segment, victim)
        return victim

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
