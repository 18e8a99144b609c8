"""Trace-driven simulation of a Policy, producing object and byte hit ratios."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Hashable, Iterable

from .base import Policy

log = logging.getLogger(__name__)


@dataclass
class SimResult:
    """Counters of one simulation run; ratios are 0.0 for an empty trace."""

    policy: str
    capacity: int
    hits: int = 0
    misses: int = 0
    bytes_hit: int = 0
    bytes_missed: int = 0

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def object_hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        total = self.bytes_hit + self.bytes_missed
        return self.bytes_hit / total if total else 0.0

    # The object ratio is what most papers call "hit ratio".
    hit_ratio = object_hit_ratio

    def record(self, hit: bool, size: int) -> None:
        if hit:
            self.hits += 1
            self.bytes_hit += size
        else:
            self.misses += 1
            self.bytes_missed += size


def simulate(policy: Policy, trace: Iterable[tuple]) -> SimResult:
    """Replay (key, size) or (key, size, is_write) requests: access(), and admit() on a miss.

    Writes count as requests like reads (libCacheSim's oracleGeneral traces carry no op, so
    this keeps the two simulators comparable); a write miss is admitted with is_write=True so
    the policy's write_admit mode applies.
    """
    result = SimResult(policy=policy.name, capacity=policy.capacity)
    access = policy.access
    admit = policy.admit
    record = result.record
    for request in trace:
        key: Hashable = request[0]
        size = int(request[1])
        is_write = bool(request[2]) if len(request) > 2 else False
        hit = access(key)
        record(hit, size)
        if not hit:
            admit(key, size, is_write=is_write)
    return result
