"""Offline Belady (MIN) upper bound for byte-budgeted caches with variable object sizes."""
from __future__ import annotations

import heapq
import logging
import math
from typing import Iterable

from .simulate import SimResult

log = logging.getLogger(__name__)


def next_access_indices(keys: list) -> list[float]:
    """For each request index, the index of the next request to the same key (inf if none)."""
    next_index: list[float] = [math.inf] * len(keys)
    last_seen: dict = {}
    for i in range(len(keys) - 1, -1, -1):
        key = keys[i]
        next_index[i] = last_seen.get(key, math.inf)
        last_seen[key] = i
    return next_index


def belady(trace: Iterable[tuple], capacity_bytes: int) -> SimResult:
    """Evict the resident object whose next request is farthest in the future, with bypass.

    With unit sizes this is Belady's MIN and optimal. With variable sizes the exact optimum is
    NP-hard; farthest-next-use with bypass is the usual approximation (libCacheSim's 'Belady'
    does the same) and is what dccfs reports as the upper bound. It is not a strict bound for
    byte hit ratio, but in practice no online policy comes close to it.
    """
    requests = [(r[0], int(r[1])) for r in trace]
    keys = [r[0] for r in requests]
    next_use = next_access_indices(keys)
    result = SimResult(policy="belady", capacity=int(capacity_bytes))
    resident: dict = {}          # key -> (size, next use index)
    farthest: list = []          # max-heap of (-next use, key); stale entries skipped lazily
    used = 0
    for i, (key, size) in enumerate(requests):
        nxt = next_use[i]
        entry = resident.get(key)
        if entry is not None:
            result.record(True, size)
            if nxt == math.inf:
                # Never requested again: dropping it now is free and makes room for others.
                del resident[key]
                used -= entry[0]
            else:
                resident[key] = (entry[0], nxt)
                heapq.heappush(farthest, (-nxt, i, key))
            continue
        result.record(False, size)
        if nxt == math.inf or size > capacity_bytes:
            continue
        resident[key] = (size, nxt)
        used += size
        heapq.heappush(farthest, (-nxt, i, key))
        while used > capacity_bytes:
            neg_next, _, victim = heapq.heappop(farthest)
            victim_entry = resident.get(victim)
            if victim_entry is None or victim_entry[1] != -neg_next:
                continue  # stale heap entry
            del resident[victim]
            used -= victim_entry[0]
    return result
