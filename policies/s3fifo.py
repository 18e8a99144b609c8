"""S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, and a ghost FIFO."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

from .base import Policy

log = logging.getLogger(__name__)

# Frequencies are 2-bit counters, as in the S3-FIFO paper; main reinserts with freq-1.
_MAX_FREQ = 3


class S3FIFO(Policy):
    """S3-FIFO (Yang et al., SOSP 2023), byte-budgeted, with libCacheSim's default parameters.

    New keys enter the small FIFO (small_ratio of capacity). When evicted from it, keys that
    were hit at least move_to_main_threshold times move to the main FIFO; the rest leave only
    their key in a ghost FIFO (ghost_ratio of capacity, in bytes of the remembered objects).
    A miss that hits the ghost is inserted straight into main. Main evicts FIFO order but
    reinserts keys hit since their last pass (CLOCK-like). One-hit wonders such as a cold scan
    only ever occupy the small queue, which makes S3-FIFO scan resistant.

    Differences from libCacheSim 0.3.5: it refuses objects larger than the small queue (so with
    a tiny cache it caches nothing); here any object up to the capacity is admitted and the
    small queue may overshoot its target by that one object.
    """

    name = "s3fifo"

    def __init__(self, capacity_bytes: int, *, small_ratio: float = 0.1, ghost_ratio: float = 0.9,
                 move_to_main_threshold: int = 2, **params):
        super().__init__(capacity_bytes, **params)
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio}")
        self.small_ratio = small_ratio
        self.ghost_ratio = ghost_ratio
        self.move_to_main_threshold = move_to_main_threshold
        # key -> [size, freq]; front of each OrderedDict is the oldest (next to evict).
        self._small: OrderedDict = OrderedDict()
        self._main: OrderedDict = OrderedDict()
        self._ghost: OrderedDict = OrderedDict()  # key -> size
        self._small_bytes = self._main_bytes = self._ghost_bytes = 0
        self._ghost_hit_key = None
        # Until the first eviction, keys that do not fit the small queue fill main directly,
        # so a cold cache uses all of its capacity (libCacheSim does the same).
        self._has_evicted = False
        self._after_resize()

    def _after_resize(self) -> None:
        self._small_target = int(self.capacity * self.small_ratio)
        self._main_target = self.capacity - self._small_target
        self._ghost_target = int(self.capacity * self.ghost_ratio)
        self._trim_ghost()

    def __contains__(self, key) -> bool:
        return key in self._small or key in self._main

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def keys(self) -> Iterable:
        return list(self._small) + list(self._main)

    def size_of(self, key) -> int:
        entry = self._small.get(key) or self._main[key]
        return entry[0]

    def _sizes(self) -> dict:
        return {k: e[0] for d in (self._small, self._main) for k, e in d.items()}

    def access(self, key) -> bool:
        self._ghost_hit_key = None
        entry = self._small.get(key) or self._main.get(key)
        if entry is not None:
            if entry[1] < _MAX_FREQ:
                entry[1] += 1
            return True
        size = self._ghost.pop(key, None)
        if size is not None:
            self._ghost_bytes -= size
            self._ghost_hit_key = key
        return False

    def _insert(self, key, size: int, low_priority: bool) -> list:
        ghost_hit = self._ghost_hit_key == key
        self._ghost_hit_key = None
        if not ghost_hit:
            size_in_ghost = self._ghost.pop(key, None)  # admitted without access(), e.g. a write
            if size_in_ghost is not None:
                self._ghost_bytes -= size_in_ghost
        evicted = []
        while self.used + size > self.capacity:
            evicted.append(self._evict_one())
        warming_up = not self._has_evicted and self._small_bytes >= self._small_target
        if (ghost_hit or warming_up) and not low_priority:
            self._main[key] = [size, 0]
            self._main_bytes += size
        else:
            self._small[key] = [size, 0]
            self._small_bytes += size
            if low_priority:
                # At the eviction end of the small FIFO: leaves next unless it is re-read.
                self._small.move_to_end(key, last=False)
        self.used += size
        return evicted

    def _evict_one(self):
        self._has_evicted = True
        if self._main_bytes > self._main_target or not self._small:
            return self._evict_main()
        return self._evict_small()

    def _evict_small(self):
        while self._small:
            key, (size, freq) = self._small.popitem(last=False)
            self._small_bytes -= size
            if freq >= self.move_to_main_threshold:
                self._main[key] = [size, 0]
                self._main_bytes += size
                continue
            self.used -= size
            self._ghost[key] = size
            self._ghost_bytes += size
            self._trim_ghost()
            return key
        return self._evict_main()

    def _evict_main(self):
        # Terminates: each pass decrements freq, so within 3 laps some key reaches 0.
        while True:
            key, entry = self._main.popitem(last=False)
            if entry[1] >= 1:
                entry[1] = min(entry[1], _MAX_FREQ) - 1
                self._main[key] = entry
                continue
            self._main_bytes -= entry[0]
            self.used -= entry[0]
            return key

    def _trim_ghost(self) -> None:
        while self._ghost and self._ghost_bytes > self._ghost_target:
            _, size = self._ghost.popitem(last=False)
            self._ghost_bytes -= size

    def remove(self, key) -> None:
        entry = self._small.pop(key, None)
        if entry is not None:
            self._small_bytes -= entry[0]
            self.used -= entry[0]
        entry = self._main.pop(key, None)
        if entry is not None:
            self._main_bytes -= entry[0]
            self.used -= entry[0]
        size = self._ghost.pop(key, None)
        if size is not None:
            self._ghost_bytes -= size
