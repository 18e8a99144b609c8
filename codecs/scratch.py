"""Per-thread scratch memory for the encoders, reused from one chunk to the next.

Why: every chunk needs a few MiB of planes and coder output. Fresh buffers of that size come from mmap (or from a
heap top that glibc has just trimmed), and on the shared build machine their page faults cost 0.4-1 ms of system
time per MiB encoded, about as much as the rANS coding itself. The daemon tunes malloc (dccfs/memory.py), but a
plain process (benchmarks, tools) does not.

Contract: ``take`` hands out views of the arena only inside ``session()``; everything taken must be consumed (the
payload joined into its own bytes) before the outermost session of the thread ends, because the next session
reuses the memory. Outside a session ``take`` returns fresh arrays.
"""
from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

ALIGN = 64
KEEP_MAX = 64 << 20  # an arena that would grow beyond this is not kept (64 MiB chunks encode with fresh buffers)
_local = threading.local()


class _Arena:
    __slots__ = ("buf", "used", "want", "depth")

    def __init__(self) -> None:
        self.buf = np.empty(0, np.uint8)
        self.used = 0  # bytes handed out in this session
        self.want = 0  # bytes this session asked for (the size of the arena for the next one)
        self.depth = 0


def _arena() -> _Arena:
    a = getattr(_local, "arena", None)
    if a is None:
        a = _local.arena = _Arena()
    return a


@contextlib.contextmanager
def session():
    """Scope of one chunk's encoding: views from take() are valid until the outermost session ends."""
    a = _arena()
    a.depth += 1
    try:
        yield
    finally:
        a.depth -= 1
        if a.depth == 0:
            if a.want > a.buf.size and a.want <= KEEP_MAX:
                raw = np.empty(a.want + ALIGN, np.uint8)
                off = -raw.ctypes.data % ALIGN
                a.buf = raw[off : off + a.want]
            a.used = a.want = 0


def take(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of nbytes: arena memory (64-byte aligned) inside a session, else fresh."""
    a = _arena()
    if a.depth == 0:
        return np.empty(nbytes, np.uint8)
    start = -(-a.used // ALIGN) * ALIGN
    a.want = start + nbytes
    if a.want > a.buf.size:
        a.used = a.want
        return np.empty(nbytes, np.uint8)
    a.used = a.want
    return a.buf[start : start + nbytes]
