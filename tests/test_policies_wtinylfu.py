"""W-TinyLFU specifics: the write buffer, window counting modes, invariants under writes."""
import random

import pytest

from dccfs.policies import make_policy, simulate
from dccfs.policies.wtinylfu import LIBCACHESIM_PARAMS

KIB = 1024


def test_written_chunk_is_served_from_the_write_buffer_without_promotion():
    policy = make_policy("wtinylfu", 1000 * KIB)  # write buffer: 30 KiB
    for i in range(3):
        assert policy.admit(("ckpt", i), 10 * KIB, is_write=True) == (True, [])
    for _ in range(2):
        assert all(policy.access(("ckpt", i)) for i in range(3))
    # Still in the buffer: a read-back does not move a checkpoint into the window or main.
    assert set(policy._writes) == {("ckpt", i) for i in range(3)} and not policy._window
    _, evicted = policy.admit(("ckpt", 3), 10 * KIB, is_write=True)
    # FIFO: the oldest write leaves first; main still has room, so it moves there.
    assert evicted == [] and ("ckpt", 0) in policy._probation
    assert policy._writes_bytes == 30 * KIB and policy.used == 40 * KIB


def test_cold_cache_keeps_written_chunks_beyond_the_buffer():
    policy = make_policy("wtinylfu", 1000 * KIB)
    for i in range(50):  # 500 KiB written into an empty cache with a 30 KiB write buffer
        policy.admit(("new", i), 10 * KIB, is_write=True)
    assert all(policy.access(("new", i)) for i in range(50))
    assert len(policy._writes) == 3 and policy.used == 500 * KIB


def test_write_once_stream_cannot_flush_the_frequent_set():
    capacity = 400 * KIB  # write buffer: three 4 KiB chunks
    policy = make_policy("wtinylfu", capacity)
    hot = [("hot", i) for i in range(20)]
    for _ in range(5):
        for key in hot:
            if not policy.access(key):
                policy.admit(key, 4 * KIB)
    assert all(key in policy for key in hot)
    for i in range(1000):  # a checkpoint nobody reads back
        policy.access(("ckpt", i))
        _, evicted = policy.admit(("ckpt", i), 4 * KIB, is_write=True)
        if i > 200:  # once the cache is full, the oldest write leaves the cache
            assert evicted == [("ckpt", i - 3)]
    assert all(key in policy for key in hot)
    assert policy._writes_bytes <= int(capacity * policy.write_buffer_ratio)


def test_write_buffer_off_and_large_writes_enter_the_window():
    policy = make_policy("wtinylfu", 100 * KIB, write_buffer_ratio=0.0)
    policy.admit("w", KIB, is_write=True)
    assert "w" in policy._window
    policy = make_policy("wtinylfu", 100 * KIB)  # 3 KiB buffer: a 4 KiB chunk cannot use it
    policy.admit("big", 4 * KIB, is_write=True)
    assert "big" in policy._window and not policy._writes


def _warm_main_with_one_pass_keys(policy, n: int) -> None:
    for i in range(n):
        policy.access(("scan", i))
        policy.admit(("scan", i), KIB)


@pytest.mark.parametrize("mode,admitted", [("first_hit", True), ("on_exit", False)])
def test_window_hits_count_towards_admission(mode, admitted):
    # Main fills with one-pass keys while the cache warms up; a key then hit in the window
    # must out-count them. libCacheSim's rule ('on_exit') gives every key that passed the
    # window one extra count, so the scan keys tie with it and it is refused.
    policy = make_policy("wtinylfu", 100 * KIB, window_ratio=0.02, window_count=mode)
    _warm_main_with_one_pass_keys(policy, 120)
    assert not policy.access("hot")
    policy.admit("hot", KIB)
    policy.access("hot")
    policy.access("hot")
    for i in range(200, 203):  # push "hot" out of the 2 KiB window
        policy.access(("new", i))
        policy.admit(("new", i), KIB)
    assert ("hot" in policy) == admitted


def test_bad_params_rejected():
    with pytest.raises(ValueError):
        make_policy("wtinylfu", 100, window_count="sometimes")
    with pytest.raises(ValueError):
        make_policy("wtinylfu", 100, write_buffer_ratio=1.5)


@pytest.mark.parametrize("params", [{}, LIBCACHESIM_PARAMS, {"write_admit": "low"}])
def test_invariants_under_reads_writes_removes_and_resizes(params):
    rng = random.Random(5)
    policy = make_policy("wtinylfu", 256 * KIB, **params)
    resident: set = set()
    for step in range(5000):
        key = rng.randrange(300)
        size = rng.choice([KIB, 4 * KIB, 16 * KIB, 3 * KIB + 17])
        roll = rng.random()
        if roll < 0.05:
            policy.remove(key)
            resident.discard(key)
        elif roll < 0.06:
            resident.difference_update(policy.resize(rng.choice([64, 128, 256]) * KIB))
        elif roll < 0.3 or not policy.access(key):
            admitted, evicted = policy.admit(key, size, is_write=roll < 0.3)
            resident.difference_update(evicted)
            resident.discard(key)
            if admitted:
                resident.add(key)
        assert policy.used <= policy.capacity, step
        assert set(policy.keys()) == resident and len(policy) == len(resident)
        assert policy.used == sum(policy.size_of(k) for k in resident)
        assert policy._writes_bytes == sum(policy._writes.values())
        assert policy._window_hit <= set(policy._window)


def test_simulate_with_writes_counts_write_buffer_hits():
    trace = [("c", 10, True), ("c", 10, False), ("c", 10, False), ("r", 20, False)]
    result = simulate(make_policy("wtinylfu", 1000), trace)
    assert (result.hits, result.misses) == (2, 2)
