"""Abstract byte-budgeted cache policy that every dccfs eviction policy implements."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Hashable, Iterable

log = logging.getLogger(__name__)

# How a chunk that was just written is inserted:
#   'hot'    - exactly like a read miss (the writer or a reader is likely to read it back soon)
#   'low'    - at the eviction end of the policy's probationary structure (a write-once stream,
#              e.g. a checkpoint nobody reloads, then costs at most one eviction slot)
#   'bypass' - not cached at all
WRITE_ADMIT_MODES = ("hot", "low", "bypass")


class Policy(ABC):
    """A cache replacement policy over keys with byte sizes; it stores no data, only metadata.

    The caller owns the data: on a miss it calls admit(), then drops the data of every key in
    the returned eviction list. Every operation is O(1) amortised.
    """

    name: str = "base"

    def __init__(self, capacity_bytes: int, *, write_admit: str = "hot", **params):
        if params:
            raise TypeError(f"{type(self).__name__}: unknown parameters {sorted(params)}")
        if write_admit not in WRITE_ADMIT_MODES:
            raise ValueError(f"write_admit must be one of {WRITE_ADMIT_MODES}, got {write_admit!r}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity = int(capacity_bytes)
        self.used = 0
        self.write_admit = write_admit

    # ---- queries -------------------------------------------------------------------------
    @abstractmethod
    def __contains__(self, key: Hashable) -> bool:
        """True if key is resident; never changes state."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of resident keys."""

    @abstractmethod
    def keys(self) -> Iterable[Hashable]:
        """Resident keys, roughly coldest first where the policy has an order."""

    def size_of(self, key: Hashable) -> int:
        """Bytes charged for a resident key (KeyError if absent)."""
        return self._sizes()[key]

    # ---- requests ------------------------------------------------------------------------
    @abstractmethod
    def access(self, key: Hashable) -> bool:
        """A request for key: record a hit and return True, or record the miss and return False."""

    def admit(self, key: Hashable, size: int, is_write: bool = False) -> tuple[bool, list]:
        """Insert key after a miss; returns (admitted, evicted_keys).

        Objects larger than the whole cache are refused. Re-admitting a resident key replaces
        its size (the chunk was rewritten), keeping it resident.
        """
        size = int(size)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if key in self:
            # A rewrite of a resident chunk: drop the old charge, then insert as new data.
            self.remove(key)
        if size > self.capacity:
            return False, []
        if is_write and self.write_admit == "bypass":
            return False, []
        low_priority = is_write and self.write_admit == "low"
        evicted = self._insert(key, size, low_priority)
        return key in self, evicted

    @abstractmethod
    def _insert(self, key: Hashable, size: int, low_priority: bool) -> list:
        """Insert a non-resident key that fits in capacity; evict as needed; return evictions."""

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """Forget key (the file was overwritten or deleted); no-op if absent."""

    def resize(self, capacity_bytes: int) -> list:
        """Change the byte budget; returns keys evicted to fit the new budget."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity = int(capacity_bytes)
        evicted: list = []
        while self.used > self.capacity:
            evicted.append(self._evict_one())
        self._after_resize()
        return evicted

    def shed(self, nbytes: int) -> list:
        """Evict the policy's own victims until at least nbytes are freed (or nothing is left);
        the budget stays. For memory pressure from outside the cache; returns the evicted keys."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        target = max(0, self.used - int(nbytes))
        evicted: list = []
        while self.used > target:
            evicted.append(self._evict_one())
        return evicted

    def _after_resize(self) -> None:
        """Hook for policies whose internal targets scale with capacity."""

    @abstractmethod
    def _evict_one(self) -> Hashable:
        """Evict one resident key chosen by the policy and return it."""

    @abstractmethod
    def _sizes(self) -> dict:
        """Mapping of resident key -> size, for size_of()."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self)} keys, {self.used}/{self.capacity} bytes>"
