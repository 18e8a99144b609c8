"""The daemon's process apart from any mount: its memory after the imports and the kernel warm-ups, and its exit with and without gc.freeze."""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, tree_state  # noqa: E402

log = logging.getLogger("bench_daemon_process")

# Run in a fresh interpreter: each step's resident and anonymous memory, the last one what numba's own loader
# would hold on top; with "trace", what tracemalloc saw of the warm-ups instead (Python and numpy objects; the rest
# of the growth is native, LLVM's for the kernels).
MEMORY_CHILD = r"""
import ctypes, gc, json, sys, tracemalloc

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(line.split()[1]) << 10
    return out

steps = [("interpreter", status())]
import dccfs.daemon
steps.append(("the imports", status()))
from dccfs.codecs.delta import warm_up as warm_up_delta
from dccfs.engine import warm_up_codecs
from dccfs.memory import release_compiler_pages
if sys.argv[1] == "trace":
    tracemalloc.start()
warm_up_codecs()
warm_up_delta()
traced = tracemalloc.get_traced_memory()[0]
if sys.argv[1] == "trace":
    print(json.dumps({"traced": traced}))
    sys.exit(0)
steps.append(("both warm-ups", status()))
ctypes.CDLL("libc.so.6").malloc_trim(0)
steps.append(("malloc_trim", status()))
release_compiler_pages()
steps.append(("compiler pages released", status()))
# What numba itself would hold: every kernel loaded from its cache with its linking module parsed
# (codecs/_jit_memory.py keeps only the bitcode). Counted, then parsed as numba's loader parses it.
from llvmlite import binding as llvm
from numba.core.codegen import CPUCodeLibrary
kept = [o for o in gc.get_objects()
        if issubclass(type(o), CPUCodeLibrary) and getattr(o, "_dccfs_linking_bitcode", None) is not None]
for library in kept:
    library._shared_module = llvm.parse_bitcode(library._dccfs_linking_bitcode)
steps.append((f"+ {len(kept)} linking modules", status()))
print(json.dumps({"steps": steps}))
"""

# Import the daemon, encode one chunk (numba loads its first kernel), then exit; with "freeze" as dccfs.cli does.
EXIT_CHILD = r"""
import atexit, gc, os, sys, time
import dccfs.daemon
from dccfs.codecs import ChunkHints, encode_chunk
encode_chunk(os.urandom(1000), ChunkHints())
if sys.argv[1] == "freeze":
    atexit.register(gc.freeze)
print(time.time(), flush=True)
"""


def exit_seconds(mode: str) -> float:
    """From the child's last statement to its exit status reaching this process."""
    proc = subprocess.Popen([sys.executable, "-c", EXIT_CHILD, mode], stdout=subprocess.PIPE, text=True,
                            cwd=str(REPO))
    last = float(proc.stdout.readline())
    proc.wait()
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"the exit probe ({mode}) failed with status {proc.returncode}")
    return ended - last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="exits timed per mode, the modes interleaved")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("tree: %s", tree_state())
    memory = {}
    for mode in ("steps", "trace"):
        run = subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode], capture_output=True, text=True,
                             cwd=str(REPO))
        if run.returncode != 0:
            raise SystemExit(f"the memory probe ({mode}) failed:\n{run.stderr[-2000:]}")
        memory.update(json.loads(run.stdout.splitlines()[-1]))
    log.info("%-28s %10s %10s", "after", "RSS MiB", "anon MiB")
    for step, values in memory["steps"]:
        log.info("%-28s %10.0f %10.0f", step, values["VmRSS"] / 2**20, values["RssAnon"] / 2**20)
    log.info("after both warm-ups, tracemalloc (another process) sees %.0f MiB of Python and numpy objects",
             memory["traced"] / 2**20)
    exits: dict[str, list[float]] = {"plain": [], "freeze": []}
    for _ in range(args.rounds):
        for mode in exits:
            exits[mode].append(exit_seconds(mode))
    for mode, seconds in exits.items():
        log.info("exit %-7s median %.3f s (min %.3f, max %.3f, %d runs)", mode, statistics.median(seconds),
                 min(seconds), max(seconds), len(seconds))


if __name__ == "__main__":
    main()
