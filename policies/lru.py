"""Least-recently-used eviction over byte-sized keys."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Hashable, Iterable

from .base import Policy

log = logging.getLogger(__name__)


class LRU(Policy):
    """Classic LRU: an OrderedDict ordered coldest (front) to hottest (back)."""

    name = "lru"

    def __init__(self, capacity_bytes: int, **params):
        super().__init__(capacity_bytes, **params)
        self._entries: OrderedDict[Hashable, int] = OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterable:
        return list(self._entries)

    def _sizes(self) -> dict:
        return self._entries

    def access(self, key) -> bool:
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        return False

    def _insert(self, key, size: int, low_priority: bool) -> list:
        evicted = []
        # Make room first so that a low-priority insert at the cold end is not its own victim.
        while self.used + size > self.capacity:
            evicted.append(self._evict_one())
        self._entries[key] = size
        self.used += size
        if low_priority:
            self._entries.move_to_end(key, last=False)
        return evicted

    def _evict_one(self):
        key, size = self._entries.popitem(last=False)
        self.used -= size
        return key

    def remove(self, key) -> None:
        size = self._entries.pop(key, None)
        if size is not None:
            self.used -= size
