"""Aging frequency counter used by TinyLFU-style admission filters."""
from __future__ import annotations

import logging
import math
from typing import Hashable

log = logging.getLogger(__name__)


class FrequencyCounter:
    """Per-key event counts, halved by age() so that old popularity fades.

    TinyLFU normally uses a count-min sketch to bound memory. Here the counts live in a dict
    and age() drops keys whose count halves to zero; the owner calls age() every N events,
    which bounds the dict to about N keys and makes aging O(1) amortised. Exact counts keep
    admission decisions deterministic (and comparable with libCacheSim's near-exact CBF).
    Counts saturate at max_count.
    """

    def __init__(self, max_count: int = 255):
        self.max_count = max_count
        self._counts: dict[Hashable, int] = {}

    def increment(self, key: Hashable) -> None:
        count = self._counts.get(key, 0)
        if count < self.max_count:
            self._counts[key] = count + 1

    def estimate(self, key: Hashable) -> int:
        return self._counts.get(key, 0)

    def age(self) -> None:
        """Halve every count (the TinyLFU 'reset')."""
        self._counts = {k: c >> 1 for k, c in self._counts.items() if c > 1}

    def __len__(self) -> int:
        return len(self._counts)


class CountingBloomFilter:
    """Counting Bloom filter frequency estimate with the same sizing as libCacheSim's
    minimalIncrementCBF (bits per entry from the error rate, k = ln2 * bpe hashes).

    Fixed memory, but it over-estimates once many more keys than `entries` pass through; it
    exists so W-TinyLFU can be compared with libCacheSim sketch-for-sketch. Python's hash()
    of the key is used, so str keys give different (equally valid) noise per process.
    """

    def __init__(self, entries: int, error: float = 0.001):
        bits_per_entry = -math.log(error) / (math.log(2) ** 2)
        self.hashes = max(1, math.ceil(math.log(2) * bits_per_entry))
        self.size = max(2 * self.hashes, math.ceil(bits_per_entry * max(1, entries)))
        self._counters = [0] * self.size

    def _slots(self, key: Hashable) -> list[int]:
        first = hash((key, 0x9E37)) & 0xFFFFFFFF
        step = hash((key, 0x7F4A)) & 0xFFFFFFFF
        return [((first + i * step) & 0xFFFFFFFF) % self.size for i in range(self.hashes)]

    def increment(self, key: Hashable) -> None:
        counters = self._counters
        for slot in self._slots(key):
            counters[slot] += 1

    def estimate(self, key: Hashable) -> int:
        counters = self._counters
        return min(counters[slot] for slot in self._slots(key))

    def age(self) -> None:
        self._counters = [c >> 1 for c in self._counters]

    def __len__(self) -> int:
        return 0  # fixed size: never needs the memory-guard aging
