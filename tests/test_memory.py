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
