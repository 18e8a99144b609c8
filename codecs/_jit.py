"""numba.njit with an on-disk cache where one is possible, so that every new process loads compiled kernels.

numba looks for a cache directory next to the source (``__pycache__``), then in the user-wide cache
(``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba``; ``NUMBA_CACHE_DIR`` overrides both). numba keys a kernel's
entry on a hash of the one file that defines it, but a compiled kernel also holds every kernel it calls, and ours
call across files (tensor_fast.py runs rans32.py's table reader inside its fused decoders): a fix to rans32.py alone
left the old reader in every cached caller. So each kernel's key here is also a hash of every source file of this
package: any edit recompiles them all once. A copy of the package in another directory (or a read-only install)
reuses or rebuilds its own entries. When none of these places is writable numba refuses ``cache=True`` at import
time; the kernels are then compiled in memory at every process start (seconds) instead of failing the import.
Importing it also makes kernels loaded from the cache lighter (_jit_memory.py).
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import numba

from . import _jit_memory

log = logging.getLogger(__name__)

_jit_memory.install()

_warned = False


@functools.lru_cache(maxsize=None)
def package_stamp() -> bytes:
    """sha256 of this package's source files (names and contents): part of every kernel's cache key."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.digest()


def _key_on_package(dispatcher) -> None:
    """Make the dispatcher's cache index valid only for this package_stamp() (numba keeps the stamp it compares
    with the stored one in the index file object; an index with another stamp is a miss and is rewritten)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is None or not hasattr(cache_file, "_source_stamp"):
        # a numba whose cache internals moved: kernels still cache, keyed on their own file only
        log.warning("numba cache index not found on %r; cached kernels may outlive edits of the files they call",
                    dispatcher)
        return
    cache_file._source_stamp = (cache_file._source_stamp, package_stamp())


def cache_unavailable() -> bool:
    """Whether a kernel defined so far had to be compiled without the on-disk cache."""
    return _warned


def njit(**opts):
    """Decorator: ``numba.njit(cache=True, **opts)`` keyed on the whole package, or without the cache when no cache
    directory is writable."""

    def decorate(fn):
        global _warned
        try:
            dispatcher = numba.njit(cache=True, **opts)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if "cannot cache" not in str(exc):
                raise
            if not _warned:
                _warned = True
                log.warning("numba kernel cache unavailable (%s); kernels compile at every start. "
                            "Set NUMBA_CACHE_DIR to a writable directory to keep them.", exc)
            return numba.njit(**opts)(fn)
        _key_on_package(dispatcher)
        return dispatcher

    return decorate
