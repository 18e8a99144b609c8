"""SIEVE eviction: a FIFO queue with visited bits and a hand that sweeps from old to new."""
from __future__ import annotations

import logging
from typing import Iterable

from .base import Policy

log = logging.getLogger(__name__)

# Node layout (a list, to keep per-key overhead small): [newer, older, size, visited]
_NEWER, _OLDER, _SIZE, _VISITED = range(4)


class Sieve(Policy):
    """SIEVE (Zhang et al., NSDI 2024), byte-budgeted, same semantics as libCacheSim's Sieve.

    Inserts at the head (newest); a hit only sets the visited bit. The hand starts at the tail
    (oldest) and walks toward the head, clearing visited bits and evicting the first unvisited
    key; it resumes where it stopped, wrapping to the tail. The queue is a doubly linked list
    kept in a dict so that every operation is O(1) amortised.
    """

    name = "sieve"

    def __init__(self, capacity_bytes: int, **params):
        super().__init__(capacity_bytes, **params)
        self._nodes: dict = {}
        self._head = None  # newest key
        self._tail = None  # oldest key
        self._hand = None  # next key the hand examines; None = start from the tail

    def __contains__(self, key) -> bool:
        return key in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def keys(self) -> Iterable:
        out, key = [], self._tail
        while key is not None:
            out.append(key)
            key = self._nodes[key][_NEWER]
        return out

    def _sizes(self) -> dict:
        return {k: n[_SIZE] for k, n in self._nodes.items()}

    def size_of(self, key) -> int:
        return self._nodes[key][_SIZE]

    def access(self, key) -> bool:
        node = self._nodes.get(key)
        if node is None:
            return False
        node[_VISITED] = True
        return True

    def _insert(self, key, size: int, low_priority: bool) -> list:
        evicted = []
        while self.used + size > self.capacity:
            evicted.append(self._evict_one())
        if low_priority:
            self._link_at_hand(key, size)
        else:
            node = [None, self._head, size, False]
            if self._head is not None:
                self._nodes[self._head][_NEWER] = key
            else:
                self._tail = key
            self._head = key
            self._nodes[key] = node
        self.used += size
        return evicted

    def _link_at_hand(self, key, size: int) -> None:
        """Place key where the hand looks next, so it is the next eviction unless re-read."""
        at = self._hand if self._hand is not None else self._tail
        if at is None:  # empty queue
            self._nodes[key] = [None, None, size, False]
            self._head = self._tail = key
            return
        at_node = self._nodes[at]
        older = at_node[_OLDER]
        self._nodes[key] = [at, older, size, False]
        at_node[_OLDER] = key
        if older is None:
            self._tail = key
        else:
            self._nodes[older][_NEWER] = key
        self._hand = key

    def _evict_one(self):
        nodes = self._nodes
        key = self._hand if self._hand is not None else self._tail
        while nodes[key][_VISITED]:
            nodes[key][_VISITED] = False
            newer = nodes[key][_NEWER]
            key = newer if newer is not None else self._tail
        self._hand = nodes[key][_NEWER]
        size = self._unlink(key)
        self.used -= size
        return key

    def _unlink(self, key) -> int:
        newer, older, size, _ = self._nodes.pop(key)
        if newer is None:
            self._head = older
        else:
            self._nodes[newer][_OLDER] = older
        if older is None:
            self._tail = newer
        else:
            self._nodes[older][_NEWER] = newer
        return size

    def remove(self, key) -> None:
        if key not in self._nodes:
            return
        if self._hand == key:
            self._hand = self._nodes[key][_NEWER]
        self.used -= self._unlink(key)
