"""Aging frequency counter used by TinyLFU-style admission filters."""
from __future__ import annotations

import logging
from typing import Hashable

log = logging.getLogger(__name__)


class FrequencyCounter:
    """Per-key access counts that are halved every `sample_size` increments.

    TinyLFU normally uses a count-min sketch to bound memory. Here the counts live in a dict
    and aging drops keys whose count halves to zero, so the dict holds at most `sample_size`
    keys: exact counts with bounded memory, and aging is O(sample_size) once per sample_size
    increments, i.e. O(1) amortised. Counts saturate at max_count (4-bit like Caffeine).
    """

    def __init__(self, sample_size: int, max_count: int = 15):
        self.sample_size = max(1, int(sample_size))
        self.max_count = max_count
        self._counts: dict[Hashable, int] = {}
        self._increments = 0

    def increment(self, key: Hashable) -> None:
        count = self._counts.get(key, 0)
        if count < self.max_count:
            self._counts[key] = count + 1
        self._increments += 1
        if self._increments >= self.sample_size:
            self.age()

    def estimate(self, key: Hashable) -> int:
        return self._counts.get(key, 0)

    def age(self) -> None:
        """Halve every count so that old popularity fades (the TinyLFU 'reset')."""
        self._counts = {k: c >> 1 for k, c in self._counts.items() if c > 1}
        self._increments = 0

    def forget(self, key: Hashable) -> None:
        self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)
