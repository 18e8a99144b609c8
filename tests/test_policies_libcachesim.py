"""Byte hit ratios of dccfs.policies agree with libCacheSim 0.3.5 within 1 percentage point.

Exceptions (each is a libCacheSim sizing quirk, not a policy difference):
- W-TinyLFU is compared in count mode (every size = 1): libCacheSim sizes its counting Bloom
  filter and its aging period by cache *bytes*, which is meaningless with byte sizes. It is
  compared with our sketch_entries option (a counting Bloom filter of the same size). With our
  exact counter the gap is larger at some sizes (1.3 pp at 10 % of the cloudPhysics working
  set) because libCacheSim's filter over-estimates once ~10x more keys than entries pass
  through; that comparison is checked at 2 pp. Both use LIBCACHESIM_PARAMS (libCacheSim's
  protected share and window counting rule): dccfs's defaults differ on purpose
  (docs/policies.md); the test traces have no writes, so the write buffer never matters here.
- S3-FIFO: libCacheSim caches nothing larger than its small queue (10 % of the cache); every
  size tested here keeps the largest object below that, so the quirk never triggers.
- LIRS (not implemented here) never caches objects above 1 % of the cache; not compared.
"""
from pathlib import Path

import numpy as np
import pytest

from dccfs.policies import belady, make_policy, simulate
from dccfs.policies.wtinylfu import LIBCACHESIM_PARAMS
from dccfs.trace import read_oracle_general, write_oracle_general

lcs = pytest.importorskip("libcachesim")

DATA = Path(__file__).parent / "data"
# 113,872 requests shipped in libCacheSim's repository (data/cloudPhysicsIO.oracleGeneral.bin).
CLOUDPHYSICS = DATA / "cloudPhysicsIO.oracleGeneral.bin"
LCS_CLASSES = {"lru": "LRU", "arc": "ARC", "s3fifo": "S3FIFO", "sieve": "Sieve",
               "wtinylfu": "WTinyLFU"}
TOLERANCE = 0.01


def _synthetic_trace(path: Path) -> None:
    """Zipf(0.9) over 5,000 objects with sizes 4 KiB..256 KiB, plus a one-pass scan."""
    rng = np.random.default_rng(7)
    n_objects, n_requests = 5000, 60_000
    ranks = rng.zipf(1.9, size=n_requests * 2)
    ids = ranks[ranks <= n_objects][:n_requests].astype(np.uint64)
    scan = np.arange(100_000, 104_000, dtype=np.uint64)
    ids = np.concatenate([ids[:30_000], scan, ids[30_000:]])
    sizes_by_object = rng.integers(1, 65, size=200_000) * 4096
    write_oracle_general(path, np.arange(len(ids)) // 100, ids, sizes_by_object[ids % 200_000])


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    synthetic = tmp_path_factory.mktemp("traces") / "synthetic.oracleGeneral.bin"
    _synthetic_trace(synthetic)
    return {"cloudphysics": CLOUDPHYSICS, "synthetic": synthetic}


def _working_set(records) -> int:
    _, first = np.unique(records["obj_id"], return_index=True)
    return int(records["size"][first].astype(np.int64).sum())


def _libcachesim_byte_hit(path, class_name: str, capacity: int) -> float:
    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    _, byte_miss = getattr(lcs, class_name)(capacity).process_trace(reader)
    return 1.0 - byte_miss


@pytest.mark.parametrize("fraction", [0.01, 0.1])
@pytest.mark.parametrize("trace_name", ["cloudphysics", "synthetic"])
@pytest.mark.parametrize("name", ["lru", "arc", "s3fifo", "sieve"])
def test_byte_hit_ratio_matches_libcachesim(traces, name, trace_name, fraction):
    records = read_oracle_general(traces[trace_name])
    capacity = int(_working_set(records) * fraction)
    ours = simulate(make_policy(name, capacity),
                    zip(records["obj_id"].tolist(), records["size"].tolist()))
    theirs = _libcachesim_byte_hit(traces[trace_name], LCS_CLASSES[name], capacity)
    assert ours.byte_hit_ratio == pytest.approx(theirs, abs=TOLERANCE)


@pytest.mark.parametrize("fraction", [0.01, 0.1])
@pytest.mark.parametrize("trace_name", ["cloudphysics", "synthetic"])
def test_belady_matches_libcachesim(traces, trace_name, fraction):
    records = read_oracle_general(traces[trace_name])
    capacity = int(_working_set(records) * fraction)
    ours = belady(zip(records["obj_id"].tolist(), records["size"].tolist()), capacity)
    theirs = _libcachesim_byte_hit(traces[trace_name], "Belady", capacity)
    assert ours.byte_hit_ratio == pytest.approx(theirs, abs=TOLERANCE)


@pytest.mark.parametrize("sketch,tolerance", [("cbf", TOLERANCE), ("exact", 0.02)])
@pytest.mark.parametrize("fraction", [0.05, 0.1])
@pytest.mark.parametrize("trace_name", ["cloudphysics", "synthetic"])
def test_wtinylfu_count_mode_matches_libcachesim(traces, tmp_path, trace_name, fraction,
                                                 sketch, tolerance):
    records = read_oracle_general(traces[trace_name])
    records["size"] = 1
    unit_path = tmp_path / "unit.oracleGeneral.bin"
    records.tofile(unit_path)
    capacity = int(len(np.unique(records["obj_id"])) * fraction)
    params = dict(LIBCACHESIM_PARAMS)
    if sketch == "cbf":
        # libCacheSim's filter holds main-cache-size entries (window is 1 % of the cache).
        params["sketch_entries"] = capacity - int(capacity * 0.01)
    ours = simulate(make_policy("wtinylfu", capacity, **params),
                    zip(records["obj_id"].tolist(), [1] * len(records)))
    theirs = _libcachesim_byte_hit(unit_path, "WTinyLFU", capacity)
    assert ours.byte_hit_ratio == pytest.approx(theirs, abs=tolerance)
