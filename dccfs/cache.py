"""The T0 chunk cache: decompressed chunks in RAM under a byte budget and a pluggable policy.

Keys are (file id, chunk index, record offset): a chunk rewritten to a new record
gets a new key, so a stale entry can never be served; it just ages out.
"""
from __future__ import annotations

import logging
import threading
from typing import Hashable

import trio

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
        # key -> trio tasks whose miss on key is counted and not yet served. A reader that
        # waited for another task's in-flight load gets the chunk with a second get(); that
        # get belongs to the request already counted as a miss, so it is not counted again.
        self._missed: dict[Hashable, set] = {}

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
        """The chunk's data or None; each read request counts once, as a hit or a miss.

        A request that missed, waited for another task's load of the same chunk and then
        calls get() again stays a miss (it waited for a disk read and a decode): the second
        call touches neither the stats nor the policy, which saw the request as a miss.
        """
        task = _current_task()
        with self._lock:
            waiters = self._missed.get(key)
            if task is not None and waiters is not None and task in waiters:
                data = self._data.get(key)
                if data is not None:
                    self._forget_miss(key, task)
                return data
            if self._policy.access(key):
                self.stats.hits += 1
                return self._data[key]
            self.stats.misses += 1
            if task is not None:
                if len(self._missed) >= _MAX_PENDING_MISSES:
                    # Only a load that failed or was cancelled leaves an entry behind.
                    self._missed.clear()
                self._missed.setdefault(key, set()).add(task)
            return None

    def _forget_miss(self, key: Hashable, task) -> None:
        waiters = self._missed.get(key)
        if waiters is not None:
            waiters.discard(task)
            if not waiters:
                del self._missed[key]

    def miss_unloaded(self, key: Hashable) -> bool:
        """For a read that a miss serves without loading the chunk (one block of it): False when the chunk is
        resident (get() serves it), else the request counts as a miss, for the stats and the policy."""
        with self._lock:
            if key in self._data:
                return False
            self._policy.access(key)
            self.stats.misses += 1
            return True

    def peek(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def put(self, key: Hashable, data: bytes, is_write: bool = False) -> None:
        task = _current_task()
        with self._lock:
            if task is not None:
                self._forget_miss(key, task)  # the loader's own miss is now served
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

    def forget_from(self, cache_id: bytes, offset: int) -> int:
        """Drop the chunks of one container whose records start at or past offset (records
        that will be cut and whose offsets new records will take); returns how many."""
        with self._lock:
            stale = [key for key in self._data if key[0] == cache_id and key[2] >= offset]
            for key in stale:
                self._policy.remove(key)
                del self._data[key]
            self.stats.resident_bytes = self._policy.used
            return len(stale)

    def shed(self, nbytes: int) -> int:
        """Drop the policy's coldest chunks until nbytes are freed, budget unchanged (the daemon's
        memory is over its ceiling: dccfs.memory.HeapTrimmer); returns the bytes dropped."""
        with self._lock:
            before = self._policy.used
            for old in self._policy.shed(nbytes):
                if self._data.pop(old, None) is not None:
                    self.stats.evictions += 1
            self.stats.resident_bytes = self._policy.used
            return before - self._policy.used

    def reconfigure(self, policy_name: str | None = None, capacity_bytes: int | None = None,
                    write_admit: str | None = None) -> None:
        """Switch policy or budget on a live mount, migrating resident chunks (coldest first)."""
        with self._lock:
            name = policy_name or self._policy.name
            capacity = self._policy.capacity if capacity_bytes is None else capacity_bytes
            self._write_admit = write_admit or self._write_admit
            if name == self._policy.name and write_admit is None:
                for old in self._policy.resize(capacity):
                    if self._data.pop(old, None) is not None:
                        self.stats.evictions += 1
            else:
                new_policy = make_policy(name, capacity, write_admit=self._write_admit)
                for key in list(self._policy.keys()):
                    data = self._data.get(key)
                    if data is None:
                        continue
                    admitted, evicted = new_policy.admit(key, len(data))
                    # Chunks the new policy does not keep are evictions like any other.
                    for old in evicted:
                        if self._data.pop(old, None) is not None:
                            self.stats.evictions += 1
                    if not admitted:
                        self._data.pop(key, None)
                        self.stats.evictions += 1
                self._policy = new_policy
            self.stats.resident_bytes = self._policy.used
            log.info("cache now %s with %d bytes", self._policy.name, self._policy.capacity)


# Entries outlive their request only when a load failed or was cancelled; past this many
# keys they are dropped (a dropped entry can at worst count one later hit as a plain hit).
_MAX_PENDING_MISSES = 4096


def _current_task():
    """The trio task making the call, or None in a worker thread or outside trio."""
    try:
        return trio.lowlevel.current_task()
    except RuntimeError:
        return None
