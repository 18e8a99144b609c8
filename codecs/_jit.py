"""numba.njit with an on-disk cache where one is possible, so that every new process loads compiled kernels.

numba looks for a cache directory next to the source (``__pycache__``), then in the user-wide cache
(``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba``; ``NUMBA_CACHE_DIR`` overrides both). The cache key is a hash of
the source file's contents, so a copy of the package in another directory (or a read-only install) reuses or
rebuilds its own entries. When none of these places is writable numba refuses ``cache=True`` at import time; the
kernels are then compiled in memory at every process start (seconds) instead of failing the import.
"""
from __future__ import annotations

import logging

import numba

log = logging.getLogger(__name__)

_warned = False


def njit(**opts):
    """Decorator: ``numba.njit(cache=True, **opts)``, or without the cache when no cache directory is writable."""

    def decorate(fn):
        global _warned
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if "cannot cache" not in str(exc):
                raise
            if not _warned:
                _warned = True
                log.warning("numba kernel cache unavailable (%s); kernels compile at every start. "
                            "Set NUMBA_CACHE_DIR to a writable directory to keep them.", exc)
            return numba.njit(**opts)(fn)

    return decorate
