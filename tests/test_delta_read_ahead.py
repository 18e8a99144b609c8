"""Read-ahead over a sparse checkpoint (dccfs/readahead.py): the window counts stored chunks, not holes."""
from __future__ import annotations

import os

import trio
import trio.testing

from dccfs.chunkfile import ContainerFile
from dccfs.config import CacheConfig, Config
from dccfs.container import Container
from dccfs.engine import Engine
from dccfs.readahead import MAX_HOLES_SKIPPED

SHIFT = 16
CHUNK = 1 << SHIFT
AHEAD = 4


def _run(tmp_path, body) -> None:
    config = Config(cache=CacheConfig(readahead_chunks=AHEAD), delta=False)

    async def main():
        engine = Engine(config, str(tmp_path))
        fd = os.open(tmp_path / "ckpt", os.O_CREAT | os.O_RDWR, 0o644)
        file = ContainerFile(engine, Container.create(fd, "ckpt", SHIFT), config.rule_for("ckpt"))
        async with trio.open_nursery() as nursery:
            engine.nursery = nursery
            await body(engine, file)
            nursery.cancel_scope.cancel()
        os.close(fd)

    trio.run(main)


async def _store(file, chunks: list[int]) -> dict[int, bytes]:
    data = {idx: os.urandom(CHUNK) for idx in chunks}
    for idx, raw in data.items():
        await file.write(idx * CHUNK, raw)
    await file.commit(durable=False)
    return data


def _cached(engine, file) -> set[int]:
    return {idx for idx, loc in file.container.index.items()
            if engine.cache.peek((file.cache_id, idx, loc.offset))}


def test_read_ahead_reaches_past_a_run_of_holes(tmp_path):
    """Chunks 3..22 were never written (holes): after three sequential reads of chunks 0..2,
    the next AHEAD stored chunks (23..26) are prefetched, not just the holes 3..6."""
    async def body(engine, file):
        data = await _store(file, [0, 1, 2, *range(23, 32)])
        engine.cache.reconfigure(capacity_bytes=0)  # drop what the writes left in T0
        engine.cache.reconfigure(capacity_bytes=64 * CHUNK)
        for idx in range(3):
            assert await file.read(idx * CHUNK, CHUNK) == data[idx]
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(30):
            while not {23, 24, 25, 26} <= _cached(engine, file):
                await trio.sleep(0.01)
        assert _cached(engine, file) == {0, 1, 2, 23, 24, 25, 26}
        assert engine.stats.readahead_chunks == AHEAD
        for idx in range(3, 23):  # holes read as zeros, and prefetch nothing new
            assert await file.read(idx * CHUNK, CHUNK) == bytes(CHUNK)
        assert engine.stats.readahead_chunks == AHEAD
        assert await file.read(23 * CHUNK, CHUNK) == data[23]
        assert engine.stats.readahead_chunks == AHEAD + 1  # the window moved by one stored chunk

    _run(tmp_path, body)


def test_read_ahead_scans_a_bounded_distance_for_stored_chunks(tmp_path):
    """A hole run longer than MAX_HOLES_SKIPPED past the window is not crossed in one scan."""
    far = 3 + AHEAD + MAX_HOLES_SKIPPED + 10

    async def body(engine, file):
        data = await _store(file, [0, 1, 2, far])
        engine.cache.reconfigure(capacity_bytes=0)
        engine.cache.reconfigure(capacity_bytes=64 * CHUNK)
        for idx in range(3):
            assert await file.read(idx * CHUNK, CHUNK) == data[idx]
        await trio.testing.wait_all_tasks_blocked()
        assert engine.stats.readahead_chunks == 0
        assert await file.read(far * CHUNK, CHUNK) == data[far]

    _run(tmp_path, body)
