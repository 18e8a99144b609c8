"""Read-ahead: over a sparse checkpoint the window counts stored chunks, and a delta reader's base records are advised."""
from __future__ import annotations

import ctypes
import mmap
import os
import time

import numpy as np
import pytest
import trio
import trio.testing

from dccfs.chunkfile import ContainerFile
from dccfs.codecs import ChunkHints, Segment, encode_chunk
from dccfs.config import CacheConfig, Config
from dccfs.container import Container
from dccfs.delta import BaseStore, DeltaWriter
from dccfs.delta_bases import BASE_ADVISE_CHUNKS
from dccfs.engine import Engine
from dccfs.format import checksum64
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


# -- base records of a delta reader ---------------------------------------------------------------

# Chunks large enough that the advised window (BASE_ADVISE_CHUNKS records, ~7 MB) reaches well
# past what the kernel's own read-ahead fetches after one small read of a cold file.
BASE_SHIFT = 18
BASE_CHUNK = 1 << BASE_SHIFT
BASE_CHUNKS = 2 * BASE_ADVISE_CHUNKS + 8
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _write_container(root, rel: str, data: bytes) -> Container:
    """data as a container the way a mount writes it: deltas against the newest earlier sibling."""
    path = os.path.join(root, rel)
    container = Container.create(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), path, BASE_SHIFT)
    writer = DeltaWriter.for_file(str(root), rel, container.header.file_id, always=True)
    for idx in range(len(data) // BASE_CHUNK):
        raw = data[idx * BASE_CHUNK:(idx + 1) * BASE_CHUNK]
        hints = ChunkHints(segments=(Segment(0, BASE_CHUNK, "f32"),), effort=1)
        encoded = (writer.encode(idx, raw, hints) if writer else None) or encode_chunk(raw, hints)
        container.append_chunk(idx, encoded, BASE_CHUNK, checksum64(raw))
    container.commit(len(data), durable=True)
    if writer:
        writer.close()
    return container


def _resident_pages(fd: int) -> np.ndarray:
    """mincore over the whole file: which of its pages the page cache holds. Probing with
    reads would not do: a read that misses, even with RWF_NOWAIT, starts the kernel's own
    read-ahead."""
    size = os.fstat(fd).st_size
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = np.zeros((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE, np.uint8)
        assert libc.mincore(addr, size, vec.ctypes.data) == 0, os.strerror(ctypes.get_errno())
        return vec & 1
    finally:
        libc.munmap(addr, size)


def _in_page_cache(container: Container, idx: int) -> bool:
    loc = container.index[idx]
    pages = _resident_pages(container.fd)
    return bool(pages[loc.offset // mmap.PAGESIZE:(loc.offset + loc.length - 1) // mmap.PAGESIZE + 1].all())


def _base_and_delta(tmp_path) -> tuple[Container, Container]:
    (tmp_path / ".dccfs").mkdir()
    (tmp_path / "run").mkdir()
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.05, BASE_CHUNKS * BASE_CHUNK // 4).astype(np.float32)
    base = _write_container(tmp_path, "run/step-10.bin", x.tobytes())
    os.utime(base.path, ns=(10**18, 10**18))
    later = (x + rng.normal(0, 1e-4, x.size)).astype(np.float32)
    delta = _write_container(tmp_path, "run/step-20.bin", later.tobytes())
    _drop(base)
    return base, delta


def _drop(base: Container) -> None:
    """Drop the base's pages, as a cold mount finds them (written pages stay cached)."""
    os.posix_fadvise(base.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident_pages(base.fd).any():
        pytest.skip("this filesystem keeps pages through POSIX_FADV_DONTNEED (tmpfs?)")


def _wait_cached(base: Container, idx: int) -> None:
    deadline = time.monotonic() + 10
    while not _in_page_cache(base, idx):
        assert time.monotonic() < deadline, f"base record {idx} was not read ahead"
        time.sleep(0.01)


def test_a_sequential_delta_reader_gets_its_base_records_advised(tmp_path):
    """Reading a delta's chunks 0..2 in order asks the kernel for the base records ahead of
    the reader (the decode threads pread them out of order, which the kernel's own read-ahead
    does not follow), so the base record BASE_ADVISE_CHUNKS chunks on is soon in the page cache;
    one past the window is not (so it was this advice, not the kernel's own read-ahead)."""
    base, delta = _base_and_delta(tmp_path)
    delta.base_store = BaseStore(str(tmp_path))
    try:
        for idx in range(3):
            delta.read_chunk(idx)
        _wait_cached(base, BASE_ADVISE_CHUNKS)
        assert not _in_page_cache(base, BASE_ADVISE_CHUNKS + 8)
    finally:
        delta.base_store.close()


def test_a_delta_reader_that_starts_over_gets_the_advice_again(tmp_path):
    """A second pass over the dependent (after the pages were dropped) is advised again: the
    window restarts at a jump instead of waiting for the old high-water mark."""
    base, delta = _base_and_delta(tmp_path)
    delta.base_store = BaseStore(str(tmp_path))
    try:
        for idx in (0, 1, 2, BASE_CHUNKS - 3, BASE_CHUNKS - 2):
            delta.read_chunk(idx)
        _wait_cached(base, BASE_CHUNKS - 1)
        _drop(base)
        for idx in range(3):
            delta.read_chunk(idx)
        _wait_cached(base, BASE_ADVISE_CHUNKS)
    finally:
        delta.base_store.close()


def test_a_random_delta_reader_gets_no_base_advice(tmp_path):
    """Two reads far apart are a random reader: nothing between them is read ahead."""
    base, delta = _base_and_delta(tmp_path)
    delta.base_store = BaseStore(str(tmp_path))
    try:
        delta.read_chunk(BASE_CHUNKS - 1)
        delta.read_chunk(2)
        time.sleep(0.5)
        assert not _in_page_cache(base, BASE_ADVISE_CHUNKS)
    finally:
        delta.base_store.close()
