"""Pure cache-replacement policies (no I/O) behind one byte-budgeted interface, plus a simulator."""
from __future__ import annotations

import logging

from .base import WRITE_ADMIT_MODES, Policy
from .belady import belady
from .arc import ARC
from .lru import LRU
from .s3fifo import S3FIFO
from .sieve import Sieve
from .simulate import SimResult, simulate
from .wtinylfu import WTinyLFU

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Policy]] = {
    "lru": LRU,
    "arc": ARC,
    "s3fifo": S3FIFO,
    "sieve": Sieve,
    "wtinylfu": WTinyLFU,
}

POLICY_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def make_policy(name: str, capacity_bytes: int, **params) -> Policy:
    """Build a policy by name; params are passed to its constructor (e.g. write_admit='low')."""
    try:
        policy_class = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(POLICY_NAMES)}") from None
    return policy_class(capacity_bytes, **params)


__all__ = [
    "Policy", "SimResult", "simulate", "belady", "make_policy", "POLICY_NAMES",
    "WRITE_ADMIT_MODES", "LRU", "ARC", "S3FIFO", "Sieve", "WTinyLFU",
]
