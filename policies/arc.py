"""Adaptive Replacement Cache (ARC) over byte-sized objects, following libCacheSim's ARC."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

from .base import Policy

log = logging.getLogger(__name__)


class ARC(Policy):
    """ARC (Megiddo & Modha 2003) with byte-sized lists.

    T1 holds objects seen once recently, T2 objects seen at least twice; B1/B2 are ghost lists
    of keys (with sizes) evicted from T1/T2. A ghost hit in B1 grows the T1 target p, a ghost
    hit in B2 shrinks it. Every OrderedDict is ordered LRU (front) to MRU (back).

    adapt_by_size=False reproduces libCacheSim (p moves by max(ratio, 1) *bytes* per ghost
    hit, i.e. it barely adapts when objects are KiB-sized); True moves p by the ghost object's
    size times the ratio, which is the page-count ARC rule translated to bytes.
    """

    name = "arc"

    def __init__(self, capacity_bytes: int, *, adapt_by_size: bool = False, **params):
        super().__init__(capacity_bytes, **params)
        self.adapt_by_size = adapt_by_size
        self._t1: OrderedDict = OrderedDict()
        self._t2: OrderedDict = OrderedDict()
        self._b1: OrderedDict = OrderedDict()
        self._b2: OrderedDict = OrderedDict()
        self._t1_bytes = self._t2_bytes = self._b1_bytes = self._b2_bytes = 0
        self.p = 0.0  # target bytes for T1
        # Set by access() on a ghost hit and consumed by the admit() that follows it, the
        # way libCacheSim remembers "the current request hit a ghost".
        self._ghost_hit_key = None
        self._ghost_hit_in_b2 = False

    def __contains__(self, key) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def keys(self) -> Iterable:
        return list(self._t1) + list(self._t2)

    def size_of(self, key) -> int:
        return self._t1[key] if key in self._t1 else self._t2[key]

    def _sizes(self) -> dict:
        return {**self._t1, **self._t2}

    def access(self, key) -> bool:
        self._ghost_hit_key = None
        size = self._t1.pop(key, None)
        if size is not None:
            self._t1_bytes -= size
            self._t2[key] = size
            self._t2_bytes += size
            return True
        if key in self._t2:
            self._t2.move_to_end(key)
            return True
        if key in self._b1:
            ghost_size = self._b1[key]
            ratio = max(self._b2_bytes / self._b1_bytes, 1.0) if self._b1_bytes else 1.0
            step = ratio * ghost_size if self.adapt_by_size else ratio
            self.p = min(self.p + step, self.capacity)
            self._b1_bytes -= self._b1.pop(key)
            self._ghost_hit_key, self._ghost_hit_in_b2 = key, False
        elif key in self._b2:
            ghost_size = self._b2[key]
            ratio = max(self._b1_bytes / self._b2_bytes, 1.0) if self._b2_bytes else 1.0
            step = ratio * ghost_size if self.adapt_by_size else ratio
            self.p = max(self.p - step, 0.0)
            self._b2_bytes -= self._b2.pop(key)
            self._ghost_hit_key, self._ghost_hit_in_b2 = key, True
        return False

    def _insert(self, key, size: int, low_priority: bool) -> list:
        ghost_hit = self._ghost_hit_key == key
        if not ghost_hit:
            # Admitted without a preceding access() (e.g. a write): a stale ghost of the old
            # contents must not linger next to the resident key.
            self._forget_ghost(key)
        evicted = []
        while self.used + size > self.capacity:
            if ghost_hit:
                evicted.append(self._replace())
            else:
                evicted.append(self._evict_for_new(size))
        if ghost_hit:
            # Seen before (recently evicted): it is frequent, so it goes straight to T2.
            self._t2[key] = size
            self._t2_bytes += size
            self._ghost_hit_key = None
        else:
            self._t1[key] = size
            self._t1_bytes += size
            if low_priority:
                self._t1.move_to_end(key, last=False)
        self.used += size
        return evicted

    def _evict_for_new(self, incoming: int):
        """Case IV of the paper (a miss in all four lists), with libCacheSim's byte tests."""
        if self._t1_bytes + self._b1_bytes + incoming > self.capacity:
            if self._b1_bytes > 0:
                self._drop_ghost(self._b1, is_b1=True)
                return self._replace()
            # T1 alone fills the cache: evict its LRU without remembering it.
            key, size = self._t1.popitem(last=False)
            self._t1_bytes -= size
            self.used -= size
            return key
        total = self._t1_bytes + self._b1_bytes + self._t2_bytes + self._b2_bytes
        if total >= 2 * self.capacity and self._b2_bytes > 0:
            self._drop_ghost(self._b2, is_b1=False)
        return self._replace()

    def _drop_ghost(self, ghosts: OrderedDict, is_b1: bool) -> None:
        _, size = ghosts.popitem(last=False)
        if is_b1:
            self._b1_bytes -= size
        else:
            self._b2_bytes -= size

    def _replace(self):
        """REPLACE from the paper: evict T1's LRU into B1 if T1 exceeds p, else T2's into B2."""
        from_t1 = self._t1_bytes > 0 and (
            self._t1_bytes > self.p or (self._t1_bytes == self.p and self._ghost_hit_in_b2)
        )
        if from_t1 or not self._t2:
            key, size = self._t1.popitem(last=False)
            self._t1_bytes -= size
            self._b1[key] = size
            self._b1_bytes += size
        else:
            key, size = self._t2.popitem(last=False)
            self._t2_bytes -= size
            self._b2[key] = size
            self._b2_bytes += size
        self.used -= size
        return key

    def _trim_ghosts(self) -> None:
        # After a shrink, restore the paper's invariants |T1|+|B1| <= c and total <= 2c (in
        # bytes) so ghost memory stays proportional to the new budget.
        while self._b1 and self._t1_bytes + self._b1_bytes > self.capacity:
            self._drop_ghost(self._b1, is_b1=True)
        while self._b2 and (self._t1_bytes + self._b1_bytes + self._t2_bytes
                            + self._b2_bytes > 2 * self.capacity):
            self._drop_ghost(self._b2, is_b1=False)

    def _evict_one(self):
        self._ghost_hit_key = None
        return self._replace()

    def _after_resize(self) -> None:
        self.p = min(self.p, self.capacity)
        self._trim_ghosts()

    def remove(self, key) -> None:
        for lst, attr in ((self._t1, "_t1_bytes"), (self._t2, "_t2_bytes")):
            size = lst.pop(key, None)
            if size is not None:
                setattr(self, attr, getattr(self, attr) - size)
                self.used -= size
        self._forget_ghost(key)

    def _forget_ghost(self, key) -> None:
        for lst, attr in ((self._b1, "_b1_bytes"), (self._b2, "_b2_bytes")):
            size = lst.pop(key, None)
            if size is not None:
                setattr(self, attr, getattr(self, attr) - size)
