"""The heap trimmer: freed chunk buffers that glibc keeps resident go back to the kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys

TRIMMER_CHILD = r"""
import json
from dccfs.memory import HeapTrimmer, resident_bytes, tune_malloc
from dccfs.stats import MountStats

tune_malloc()
stats = MountStats()
trimmer = HeapTrimmer(lambda: 0, stats)
trimmer.check()  # the floor: interpreter and libraries
big, pins = [], []
for i in range(300):
    big.append(bytes([i & 255]) * (1 << 20))
    pins.append(bytes(4096))  # above each buffer, so freeing it leaves a hole, not a heap top
before_free = resident_bytes()
del big
freed = resident_bytes()
trimmer.check()
print(json.dumps({"before_free": before_free, "freed": freed, "after": resident_bytes(),
                  "trims": stats.heap_trims, "given_back": stats.heap_trimmed_bytes}))
"""


def test_the_heap_trimmer_gives_freed_chunk_buffers_back():
    """300 MiB of 1 MiB buffers freed between live allocations stay resident under the
    daemon's malloc tuning until the trimmer's check gives them back."""
    out = subprocess.run([sys.executable, "-c", TRIMMER_CHILD], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["freed"] > got["before_free"] - (64 << 20), got  # glibc kept the holes resident
    assert got["trims"] == 1 and got["given_back"] > 200 << 20, got
    assert got["after"] < got["freed"] - (200 << 20), got


CEILING_CHILD = r"""
import json
from dccfs.memory import HeapTrimmer, resident_bytes, tune_malloc
from dccfs.stats import MountStats

tune_malloc()
stats = MountStats()
held = [bytes([i & 255]) * (1 << 20) for i in range(64)]  # 64 MiB of "T0 chunks"
asked = []


def shed(nbytes):
    asked.append(nbytes)
    gone = 0
    while held and gone < nbytes:
        gone += len(held.pop())
    return gone


# No budget and no allowance: the ceiling is 0, so everything the cache holds must go.
trimmer = HeapTrimmer(lambda: sum(map(len, held)), stats, budget_bytes=lambda: 0, shed=shed,
                      overhead_limit=0)
rss = resident_bytes()
trimmer.check()
trimmer.check()  # still above the ceiling with nothing left to give: not asked again
# A ceiling above RSS asks for nothing.
calm = HeapTrimmer(lambda: 0, MountStats(), budget_bytes=lambda: 1 << 40, shed=shed)
calm.check()
print(json.dumps({"rss": rss, "asked": asked, "left": len(held), "shed": stats.t0_shed_bytes,
                  "after": resident_bytes()}))
"""


def test_the_trimmer_makes_t0_shed_when_rss_is_above_the_ceiling():
    """Above budgets + allowance even after a trim, the cache is asked for the excess, and what
    it drops is trimmed away; with nothing left to give it is not asked again until RSS grows,
    and under the ceiling it is not asked at all."""
    out = subprocess.run([sys.executable, "-c", CEILING_CHILD], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert len(got["asked"]) == 1 and got["asked"][0] > 64 << 20, got
    assert got["left"] == 0 and got["shed"] == 64 << 20, got
    assert got["after"] < got["rss"] - (48 << 20), got


RELEASE_CHILD = r"""
import json
import numpy as np
from dccfs.codecs import ChunkHints, Segment, decode_chunk, encode_chunk
from dccfs.engine import warm_up_codecs
from dccfs.memory import COMPILER_LIBRARIES, release_compiler_pages


def compiler_pages():
    # (private, shared) clean resident bytes of the compiler library's read-only mappings
    private = shared = 0
    path = perms = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):
                perms, path = fields[1], (fields[5] if len(fields) > 5 else "")
            elif path.endswith(COMPILER_LIBRARIES) and "w" not in perms:
                if fields[0] == "Private_Clean:":
                    private += int(fields[1]) << 10
                elif fields[0] == "Shared_Clean:":
                    shared += int(fields[1]) << 10
    return private, shared


warm_up_codecs()
before = compiler_pages()
given_back = release_compiler_pages()
after = compiler_pages()
raw = np.random.default_rng(3).standard_normal(1 << 16).astype(np.float32).tobytes()
enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),)))
ok = decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
print(json.dumps({"before": before, "after": after, "given_back": given_back, "ok": ok}))
"""


def test_compiler_pages_are_released_after_warm_up_and_kernels_still_run():
    """The LLVM library pages that loading the kernels touched leave RSS (those no other
    process shares: this test's own process maps the library too), and the loaded kernels
    keep working without them."""
    out = subprocess.run([sys.executable, "-c", RELEASE_CHILD], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["ok"], got
    private_after, _ = got["after"]
    assert sum(got["before"]) > 8 << 20, got  # warm-up touched the library
    assert private_after < 2 << 20, got
    assert got["given_back"] >= 0, got


SHARED_CHILD = r"""
import json, mmap, sys
from dccfs.memory import HeapTrimmer, resident_bytes, unshared_bytes
from dccfs.stats import MountStats

with open(sys.argv[1], "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
touched = sum(mapped[i] for i in range(0, len(mapped), 4096))  # every page resident
rss, own = resident_bytes(), unshared_bytes()
asked = []
trimmer = HeapTrimmer(lambda: 0, MountStats(), budget_bytes=lambda: 0,
                      shed=lambda nbytes: asked.append(nbytes) or 0, overhead_limit=rss - (48 << 20))
trimmer.check()
print(json.dumps({"rss": rss, "own": own, "asked": asked}))
"""


def test_pages_another_process_maps_too_do_not_make_t0_shed(tmp_path):
    """A library (here a file) mapped by other processes too is in each one's RSS, yet costs this
    one nothing: with a few mounts on a machine their shared kernel libraries kept a small T0
    empty (found by review). The ceiling holds what only this process maps."""
    import mmap
    path = tmp_path / "library"
    path.write_bytes(os.urandom(96 << 20))

    def run_child() -> dict:
        out = subprocess.run([sys.executable, "-c", SHARED_CHILD, str(path)], capture_output=True, text=True,
                             timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    alone = run_child()  # the file's pages are the child's own: over the ceiling, T0 is asked
    assert alone["asked"], alone
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        sum(mapped[i] for i in range(0, len(mapped), 4096))
        shared = run_child()
    assert shared["own"] < shared["rss"] - (64 << 20), shared
    assert shared["asked"] == [], shared


LINKING_CHILD = r"""
import json
import numba
from kernels.inner import inner

assert inner(1) == 2
library = inner.overloads[inner.signatures[0]].library


@numba.njit
def outer(x):
    return inner(x) * 10


dropped, kept = library._shared_module is None, len(getattr(library, "_dccfs_linking_bitcode", None) or b"")
print(json.dumps({"dropped": dropped, "kept": kept, "outer": outer(1),
                  "parsed_after_linking": library._shared_module is not None}))
"""


def test_a_kernel_loaded_from_the_cache_holds_no_linking_module_yet_links_into_a_new_kernel(tmp_path):
    """A kernel loaded from numba's cache keeps its linking IR as bitcode, not as a parsed LLVM module
    (codecs/_jit_memory.py: most of the daemon's kernel memory); a kernel compiled later that calls it still
    links and runs. First run compiles and caches the callee, the second loads it."""
    import shutil
    from pathlib import Path

    import dccfs.codecs._jit as jit

    pkg = tmp_path / "kernels"
    pkg.mkdir()
    for name in ("_jit.py", "_jit_memory.py"):
        shutil.copy(Path(jit.__file__).with_name(name), pkg / name)
    (pkg / "__init__.py").write_text('"""One cached kernel."""\n')
    (pkg / "inner.py").write_text('"""The callee."""\nfrom ._jit import njit\n\n\n@njit()\ndef inner(x):\n'
                                  '    return x + 1\n')
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # the cache next to the sources
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", LINKING_CHILD], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout))
    compiled, loaded = runs
    assert compiled["outer"] == loaded["outer"] == 20, runs
    assert compiled["kept"] == 0, runs  # compiled here, not loaded: nothing to keep
    assert loaded["dropped"] and loaded["kept"] > 0, runs
    assert loaded["parsed_after_linking"], runs
