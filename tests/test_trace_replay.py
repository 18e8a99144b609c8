"""tools/replay_trace.py: the table, and the default policy's margin over libCacheSim."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dccfs.trace import write_csv

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.fixture
def small_trace(tmp_path):
    rng = np.random.default_rng(3)
    ids = rng.zipf(1.3, size=4000) % 500
    sizes = np.where(ids % 7 == 0, 1000, 4096)
    writes = np.zeros(len(ids), dtype=bool)
    writes[:100] = True
    path = tmp_path / "small.csv"
    write_csv(path, np.arange(len(ids)) / 1000, ids, sizes, writes)
    return path


def test_replay_prints_table_and_default_margin(small_trace):
    pytest.importorskip("libcachesim")
    out = subprocess.run([sys.executable, str(TOOLS / "replay_trace.py"), str(small_trace),
                          "--sizes", "5%,50%", "--policies", "wtinylfu,lru",
                          "--libcachesim", "LRU,S3FIFO"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("small.csv: 4000 requests")
    rows = {line.split()[0] for line in lines[2:] if line and not line.startswith("(")}
    assert {"wtinylfu", "lru", "lcs:LRU", "lcs:S3FIFO", "belady"} <= rows
    margin = next(line for line in lines if line.startswith("wtinylfu vs best libCacheSim"))
    assert "5%: " in margin and "50%: " in margin and " pp vs " in margin


def test_margin_reports_share_of_gap_to_belady():
    sys.path.insert(0, str(TOOLS))
    try:
        from replay_trace import format_margins
    finally:
        sys.path.remove(str(TOOLS))
    table = {"wtinylfu": [(0.30, 0.3), (0.50, 0.5)], "lcs:ARC": [(0.20, 0.2), (0.55, 0.5)],
             "belady": [(0.40, 0.4), (0.60, 0.6)]}
    text = format_margins(["t", "1%", "25%"], table, "wtinylfu")
    assert text == ("wtinylfu vs best libCacheSim: 1%: +10.00 pp vs ARC (50 % of gap); "
                    "25%: -5.00 pp vs ARC")
    assert format_margins(["t", "1%"], {"lru": [(0.1, 0.1)], "belady": [(0.2, 0.2)]}, "lru") == ""
