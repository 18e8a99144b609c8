"""T0 ChunkCache stats: one count per read request, evictions on a live policy switch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from dccfs.cache import ChunkCache

KIB = 1024


async def _load(cache: ChunkCache, loading: dict, key, data: bytes, log: list) -> bytes:
    """The single-flight read path of ContainerFile.load_chunk, with the disk read stubbed."""
    got = cache.get(key)
    if got is not None:
        return got
    pending = loading.get(key)
    if pending is not None:
        await pending.wait()
        got = cache.get(key)
        if got is not None:
            return got
    done = loading[key] = trio.Event()
    try:
        log.append("load")
        await trio.sleep(0.01)  # the worker-thread read and decode
        cache.put(key, data)
        return data
    finally:
        del loading[key]
        done.set()


async def _prefetch(cache: ChunkCache, loading: dict, key, data: bytes,
                    started: trio.Event) -> None:
    """Read-ahead: no get() (it is not a request), the same single flight and put()."""
    done = loading[key] = trio.Event()
    started.set()
    try:
        await trio.sleep(0.01)
        cache.put(key, data)
    finally:
        del loading[key]
        done.set()


def test_reader_waiting_for_an_inflight_load_counts_one_miss():
    cache = ChunkCache("wtinylfu", 1 << 20)
    data = b"x" * (64 * KIB)
    loads: list = []
    results: list = []

    async def main():
        loading: dict = {}

        async def reader():
            results.append(await _load(cache, loading, "k", data, loads))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reader)
        results.append(await _load(cache, loading, "k", data, loads))  # a later plain hit

    trio.run(main)
    assert results == [data] * 4 and loads == ["load"]
    # Three requests waited for one read: three misses; the fourth request is the one hit.
    assert (cache.stats.misses, cache.stats.hits) == (3, 1)
    assert cache._missed == {}


def test_reader_waiting_for_a_prefetch_counts_one_miss():
    cache = ChunkCache("lru", 1 << 20)
    data = b"y" * (64 * KIB)
    loads: list = []

    async def main():
        loading: dict = {}
        started = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_prefetch, cache, loading, "k", data, started)
            await started.wait()  # the prefetch is in flight before the reader arrives
            assert await _load(cache, loading, "k", data, loads) == data

    trio.run(main)
    assert loads == [] and (cache.stats.misses, cache.stats.hits) == (1, 0)
    assert cache._missed == {}


def test_worker_thread_requests_count_as_usual():
    cache = ChunkCache("arc", 1 << 20)
    assert cache.get("k") is None
    cache.put("k", b"z" * KIB)
    assert cache.get("k") == b"z" * KIB
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)


@pytest.mark.parametrize("old,new", [("wtinylfu", "lru"), ("lru", "s3fifo"), ("arc", "sieve")])
def test_policy_switch_counts_dropped_chunks_as_evictions(old, new):
    cache = ChunkCache(old, 64 * 64 * KIB)
    for i in range(64):
        assert cache.get(i) is None
        cache.put(i, bytes(64 * KIB))
    assert cache.stats.evictions == 0 and len(cache._data) == 64
    cache.reconfigure(new, 16 * 64 * KIB)
    assert cache.policy_name == new
    assert len(cache._data) == len(list(cache._policy.keys())) <= 16
    assert cache.stats.evictions == 64 - len(cache._data)
    assert cache.stats.resident_bytes == cache.used == sum(map(len, cache._data.values()))


def test_resize_counts_only_chunks_it_drops():
    cache = ChunkCache("lru", 8 * KIB)
    for i in range(8):
        cache.put(i, bytes(KIB))
    cache.reconfigure(capacity_bytes=3 * KIB)
    assert cache.stats.evictions == 5 and len(cache._data) == 3


def test_forget_from_drops_one_containers_chunks_past_an_offset():
    cache = ChunkCache("wtinylfu", 64 * KIB)
    keys = [(b"a", 0, 64), (b"a", 1, 200), (b"a", 2, 300), (b"b", 0, 300)]
    for key in keys:
        cache.put(key, bytes(KIB), is_write=True)
    assert cache.forget_from(b"a", 200) == 2
    assert sorted(cache._data) == [(b"a", 0, 64), (b"b", 0, 300)]
    assert cache.used == 2 * KIB == cache.stats.resident_bytes
    cache.put((b"a", 1, 200), b"new" * 10, is_write=True)
    assert cache.get((b"a", 1, 200)) == b"new" * 10


def test_shed_drops_the_coldest_chunks_and_counts_them():
    cache = ChunkCache("lru", 8 * KIB)
    for i in range(8):
        cache.put(i, bytes(KIB))
    cache.get(0)  # the oldest, now the most recent
    assert cache.shed(2 * KIB + 1) == 3 * KIB
    assert sorted(cache._data) == [0, 4, 5, 6, 7] and cache.capacity == 8 * KIB
    assert cache.stats.evictions == 3 and cache.stats.resident_bytes == cache.used == 5 * KIB


@pytest.mark.mount
def test_live_policy_switch_reports_evictions(mounted):
    data = os.urandom(2 << 20)
    (mounted.mnt / "f").write_bytes(data)
    assert (mounted.mnt / "f").read_bytes() == data

    def stats():
        out = subprocess.run([sys.executable, "-m", "dccfs.cli", "stats", "--json", mounted.mnt],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)["stats"]["tiers"]["t0"]

    before = stats()
    assert before["resident_bytes"] >= len(data) // 2
    tuned = subprocess.run([sys.executable, "-m", "dccfs.cli", "tune", mounted.mnt,
                            "policy=lru", "t0_bytes=512KiB"], capture_output=True, text=True)
    assert tuned.returncode == 0, tuned.stderr
    after = stats()
    assert after["resident_bytes"] <= 512 * KIB
    dropped = (before["resident_bytes"] - after["resident_bytes"]) // (256 * KIB)
    assert after["evictions"] - before["evictions"] >= dropped > 0
