"""Kernels loaded from numba's cache without the LLVM module numba keeps beside each one for linking.

numba stores a cached kernel as its object code plus the bitcode of its whole IR, and on loading parses that
bitcode into an LLVM module (``CPUCodeLibrary._shared_module``) that it needs only to link the kernel into a
kernel compiled later. Parsed, those modules are most of a process's kernel memory: the daemon's 73 kernels hold
84 MiB of them against 5.7 MiB of bitcode (tools/bench_daemon_process.py, 2-core EPYC). After a load, the bitcode
bytes are kept instead and parsed again only when a compile links against the kernel. A numba whose internals
differ is left as it is, with one log line.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_installed = False


def install() -> bool:
    """Patch numba's CPU code library once; False (and numba unchanged) where its internals are not the ones
    expected."""
    global _installed
    if _installed:
        return True
    try:
        from llvmlite import binding as llvm
        from numba.core.codegen import CPUCodeLibrary
    except ImportError as exc:
        log.info("numba's code library not found (%s); loaded kernels keep their linking modules", exc)
        return False
    unserialize = CPUCodeLibrary.__dict__.get("_unserialize")
    module_for_linking = CPUCodeLibrary.__dict__.get("_get_module_for_linking")
    if not isinstance(unserialize, classmethod) or not callable(module_for_linking):
        log.info("numba %s's code library has no _unserialize / _get_module_for_linking; loaded kernels keep "
                 "their linking modules", _numba_version())
        return False
    load = unserialize.__func__

    def _unserialize(cls, codegen, state):
        library = load(cls, codegen, state)
        bitcode = _linking_bitcode(state)
        # Only a kernel loaded from object code has its linking module parsed from bitcode that we can keep;
        # numba has already read the module's symbols into the JIT by now.
        if bitcode is not None and getattr(library, "_shared_module", None) is not None:
            library._dccfs_linking_bitcode = bitcode
            library._shared_module = None
        return library

    def _get_module_for_linking(self):
        bitcode = getattr(self, "_dccfs_linking_bitcode", None)
        if bitcode is not None and self._shared_module is None:
            # linked once, likely linked again: numba's own behaviour from here on
            self._shared_module = llvm.parse_bitcode(bitcode)
            self._dccfs_linking_bitcode = None
        return module_for_linking(self)

    CPUCodeLibrary._unserialize = classmethod(_unserialize)
    CPUCodeLibrary._get_module_for_linking = _get_module_for_linking
    _installed = True
    return True


def _linking_bitcode(state) -> bytes | None:
    """The linking bitcode of a library numba serialised as ``(name, "object", (object code, bitcode))``; None for
    any other kind or shape (a numba that changed its cache payload keeps its parsed module)."""
    if not (isinstance(state, tuple) and len(state) == 3 and state[1] == "object"):
        return None
    data = state[2]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], bytes):
        return data[1]
    return None


def _numba_version() -> str:
    import numba
    return numba.__version__
