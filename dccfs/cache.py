"""The T0 chunk cache: decompressed chunks in RAM under a byte budget and a pluggable policy.

Keys are (file id, chunk index, record offset): a chunk rewritten to a new record
gets a new key, so a stale entry can never be served; it just ages out.
"""
from __future__ import annotations

import logging
import threading
from typing import Hashable

from dccfs.policies import make_policy
from dccfs.stats import TierStats

log = logging.getLogger(__name__)


class ChunkCache:
    """Holds chunk data for the keys that its policy keeps resident."""

    def __init__(self, policy_name: str, capacity_bytes: int, write_admit: str = "hot",
                 stats: TierStats | None = None):
        self.stats = stats or TierStats("t0")
        self._write_admit = write_admit
        self._policy = make_policy(policy_name, capacity_bytes, write_admit=write_admit)
        self._data: dict[Hashable, bytes] = {}
        # Worker threads insert read-ahead chunks, so policy and data change under one lock.
        self._lock = threading.Lock()

    @property
    def policy_name(self) -> str:
        return self._policy.name

    @property
    def capacity(self) -> int:
        return self._policy.capacity

    @property
    def used(self) -> int:
        return self._policy.used

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            if self._policy.access(key):
                self.stats.hits += 1
                return self._data[key]
            self.stats.misses += 1
            return None

    def peek(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def put(self, key: Hashable, data: bytes, is_write: bool = False) -> None:
        with self._lock:
            if key in self._data:
                return
            admitted, evicted = self._policy.admit(key, len(data), is_write=is_write)
            for old in evicted:
                if self._data.pop(old, None) is not None:
                    self.stats.evictions += 1
            if admitted:
                self._data[key] = data
                self.stats.admissions += 1
            else:
                self.stats.refused += 1
            self.stats.resident_bytes = self._policy.used

    def reconfigure(self, policy_name: str | None = None, capacity_bytes: int | None = None,
                    write_admit: str | None = None) -> None:
        """Switch policy or budget on a live mount, migrating resident chunks (coldest first)."""
        with self._lock:
            name = policy_name or self._policy.name
            capacity = self._policy.capacity if capacity_bytes is None else capacity_bytes
            self._write_admit = write_admit or self._write_admit
            if name == self._policy.name and write_admit is None:
                for old in self._policy.resize(capacity):
                    self._data.pop(old, None)
                    self.stats.evictions += 1
            else:
                new_policy = make_policy(name, capacity, write_admit=self._write_admit)
                for key in list(self._policy.keys()):
                    data = self._data.get(key)
                    if data is None:
                        continue
                    admitted, evicted = new_policy.admit(key, len(data))
                    for old in evicted:
                        self._data.pop(old, None)
                    if not admitted:
                        self._data.pop(key, None)
                self._policy = new_policy
            self.stats.resident_bytes = self._policy.used
            log.info("cache now %s with %d bytes", self._policy.name, self._policy.capacity)
