"""Hostile chunk records, each crafted at one hole the decoders had: a clean error, never a hang, crash or huge allocation."""
from __future__ import annotations

import os
import subprocess
import sys

# a child that takes longer than this hangs (a real decode takes milliseconds; the child's start, numba's cache
# included, a few seconds)
CHILD_SECONDS = 120


def test_a_cached_kernel_is_rebuilt_when_a_kernel_it_calls_changes_in_another_file(tmp_path):
    """numba keys a cached kernel on its own source file, but the kernel holds the code of every kernel it calls
    (found when a fix to rans32.read_table did not reach the cached fused decoders of tensor_fast.py: they kept
    the old reader until the cache was cleared). codecs/_jit.py keys every kernel on the whole package."""
    import shutil

    import dccfs.codecs._jit as jit

    pkg = tmp_path / "kernels"
    pkg.mkdir()
    shutil.copy(jit.__file__, pkg / "_jit.py")
    (pkg / "__init__.py").write_text('"""A package of two kernels in two files."""\n')
    (pkg / "inner.py").write_text('"""The callee."""\nfrom ._jit import njit\n\n\n@njit()\ndef inner():\n    return 1\n')
    (pkg / "outer.py").write_text('"""The caller."""\nfrom ._jit import njit\nfrom .inner import inner\n\n\n'
                                  '@njit()\ndef outer():\n    return inner() * 10\n')
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # the cache next to the sources

    def outer() -> str:
        proc = subprocess.run([sys.executable, "-c", "from kernels.outer import outer; print(outer())"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=CHILD_SECONDS, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    assert outer() == "10"
    assert list((pkg / "__pycache__").glob("outer.outer-*.nbi")), "the caller was not cached"
    (pkg / "inner.py").write_text((pkg / "inner.py").read_text().replace("return 1", "return 2"))
    assert outer() == "20"
