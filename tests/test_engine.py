"""Engine and ContainerFile without a mount: a failing codec or store costs ratio or an error, never a hang."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from dccfs.chunkcoder import ChunkCoder
from dccfs.chunkfile import ContainerFile
from dccfs.codecs import ChunkHints, decode_chunk
from dccfs.config import CacheConfig, Config, Rule
from dccfs.container import ChunkLoc, Container
from dccfs.engine import Engine
from dccfs.advice import ADVISE_GAP, WILLNEED_SLICE, device_slice, record_runs
from engine_harness import CHUNK, all_tokens_held, run_with_files


def test_a_codec_error_falls_back_to_zstd(tmp_path, caplog):
    engine = Engine(Config(), str(tmp_path))
    raw = bytes(range(256)) * 4096
    with caplog.at_level(logging.ERROR, logger="dccfs.engine"):
        encoded, _ = engine.encode(raw, ChunkHints(codec="no-such-codec"))
    assert decode_chunk(encoded.codec_id, encoded.params, encoded.payload, len(raw)) == raw
    assert len(encoded.payload) < len(raw)
    assert engine.stats.codec_failures == 1
    assert engine.stats.snapshot()["errors"]["codec"] == 1
    assert "storing it with zstd instead" in caplog.text


def _failing_append(calls):
    def append(*args):
        calls.append(args[0])
        raise OSError(errno.EIO, "injected disk error")
    return append


def test_a_failing_file_neither_starves_nor_spins_other_writers(tmp_path, caplog):
    """File A's chunks cannot be stored (injected EIO on its container appends). They stop
    holding the shared dirty budget, so healthy file B still writes, and A's writer gets
    the error instead of adding unstorable chunks."""
    config = Config(cache=CacheConfig(dirty_bytes=4 << 20), delta=False)

    async def body(engine, open_file):
        a, b = open_file("a"), open_file("b")
        calls = []
        a.container.append_chunk = _failing_append(calls)
        errors = []
        for i in range(6):
            try:
                await a.write(i * CHUNK, os.urandom(CHUNK))
            except OSError as exc:
                errors.append(exc.errno)
            await a._wait_idle()
        assert errors and set(errors) == {errno.EIO}, errors
        with trio.fail_after(10):
            for i in range(6):
                await b.write(i * CHUNK, os.urandom(CHUNK))
            await b.commit(durable=False)
        attempts = len(calls)
        await trio.sleep(0.2)
        assert len(calls) == attempts, "A's failing chunks are retried in a loop"
        assert engine.dirty.used <= config.cache.dirty_bytes

    with caplog.at_level(logging.CRITICAL):
        run_with_files(tmp_path, config, body)


def test_a_failed_truncate_leaves_the_file_as_it_was(tmp_path, caplog):
    config = Config(cache=CacheConfig(dirty_bytes=4 << 20), delta=False)

    async def body(engine, open_file):
        a = open_file("a")
        data = [os.urandom(CHUNK) for _ in range(3)]
        for i, block in enumerate(data):
            await a.write(i * CHUNK, block)
        await a.commit(durable=False)
        load = a.load_chunk

        async def failing_load(idx, prefetch=False):
            if idx == 1:
                raise OSError(errno.EIO, "injected read error")
            return await load(idx, prefetch)

        a.load_chunk = failing_load  # cutting chunk 1 in two needs its bytes
        with pytest.raises(OSError) as raised:
            await a.truncate(CHUNK + CHUNK // 2)
        assert raised.value.errno == errno.EIO
        del a.load_chunk
        assert a.size == 3 * CHUNK
        assert await a.read(0, 3 * CHUNK) == b"".join(data)

    with caplog.at_level(logging.CRITICAL):
        run_with_files(tmp_path, config, body)


def test_a_shrink_cuts_a_chunk_while_another_cannot_be_stored(tmp_path, caplog):
    """Chunk 0 cannot be stored; a truncate that cuts chunk 1 in two still works: it is not a
    write that the earlier failure refuses (found by review: ENOSPC on a shrink)."""
    config = Config(cache=CacheConfig(dirty_bytes=4 << 20), delta=False)

    async def body(engine, open_file):
        a = open_file("a")
        data = [os.urandom(CHUNK) for _ in range(3)]
        store = a.container.append_chunk
        fail = _failing_append([])
        a.container.append_chunk = lambda idx, *rest: fail(idx) if idx == 0 else store(idx, *rest)
        for i, block in enumerate(data):
            await a.write(i * CHUNK, block)
        await a._wait_idle()
        assert a.store_failing and set(a.dirty) == {0}
        await a.truncate(CHUNK + CHUNK // 2)
        assert a.size == CHUNK + CHUNK // 2
        assert await a.read(0, 3 * CHUNK) == data[0] + data[1][:CHUNK // 2]
        with pytest.raises(OSError):  # a new chunk is still refused
            await a.write(5 * CHUNK, b"x")

    with caplog.at_level(logging.CRITICAL):
        run_with_files(tmp_path, config, body)


def test_a_delta_encoder_error_stores_a_keyframe(tmp_path, caplog):
    class BrokenDelta:
        def encode(self, idx, raw, hints):
            raise IndexError("injected delta bug")

    config = Config()
    engine = Engine(config, str(tmp_path))
    coder = ChunkCoder(engine, config.rule_for("step.safetensors"), "step.safetensors", CHUNK)
    coder._delta = BrokenDelta()
    raw = bytes(range(256)) * 4096
    with caplog.at_level(logging.ERROR, logger="dccfs.chunkcoder"):
        encoded, _ = coder.encode(0, raw, ChunkHints())
    assert decode_chunk(encoded.codec_id, encoded.params, encoded.payload, len(raw)) == raw
    assert engine.stats.codec_failures == 1
    assert "storing a keyframe" in caplog.text


def test_willneed_runs_join_adjacent_records_only():
    locs = [ChunkLoc(100, 50), ChunkLoc(0, 100), ChunkLoc(150 + ADVISE_GAP, 10), ChunkLoc(10 << 30, 7)]
    assert record_runs(locs) == [(0, 160 + ADVISE_GAP), (10 << 30, (10 << 30) + 7)]
    assert record_runs([]) == []


def test_willneed_slices_follow_the_device(tmp_path):
    """One WILLNEED call reads at most max(read_ahead_kb, max_sectors_kb) of the device; /proc
    has no block device, so it gets the kernel's default window."""
    assert device_slice(os.stat("/proc").st_dev) == WILLNEED_SLICE
    dev = os.stat(tmp_path).st_dev
    queue = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue"
    if os.path.isdir(queue):
        kib = max(int(Path(queue, name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
        assert device_slice(dev) == max(kib << 10, WILLNEED_SLICE)


def test_a_prefetch_after_close_is_quiet(tmp_path, caplog):
    """Read-ahead tasks are not awaited at close; one that runs after it must neither log
    nor count an error (the descriptor is closed, or reused by another file: the test reuses it
    for a directory, which also fails the demand read below deterministically)."""
    config = Config(delta=False)

    async def body(engine, open_file):
        file = open_file("a")
        await file.write(0, os.urandom(CHUNK))
        await file.commit(durable=False)
        file.closed = True
        # the descriptor now names another file (a directory: reads fail). Closing it instead let another thread
        # take the number for a regular file now and then, and the demand read below then read that file
        dir_fd = os.open(tmp_path, os.O_RDONLY)
        os.dup2(dir_fd, file.container.fd)
        os.close(dir_fd)
        assert await file.load_chunk(0, prefetch=True) is None
        # a prefetch that passed that check before the close fails in its read
        loc = file.container.index[0]
        assert file._read_verified(0, loc, prefetch=True) is None
        file.closed = False
        with pytest.raises(OSError):  # a demand read (or an open file) still fails loudly
            file._read_verified(0, loc, prefetch=True)
        assert engine.stats.checksum_errors == 0

    with caplog.at_level(logging.WARNING):
        run_with_files(tmp_path, config, body)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_partial_chunks_are_copied_for_encoding_only_once_a_core_is_free(tmp_path):
    """A partly written dirty chunk is snapshot (a copy outside the dirty budget) only when
    an encoder token is free. Chunks written again while every token was taken are
    therefore encoded once, with their newest bytes; snapshots taken before the wait made
    a burst of such chunks double the dirty budget in RSS, then encoded them twice."""
    config = Config(cache=CacheConfig(dirty_bytes=64 << 20), delta=False)
    first, second = os.urandom(CHUNK - 4096), os.urandom(CHUNK - 4096)

    async def body(engine, open_file):
        f = open_file("partial")
        for i in range(16):
            await f.write(i * CHUNK, first)
        with all_tokens_held(engine.cpu_limiter):
            f.schedule_all()
            await trio.testing.wait_all_tasks_blocked()
            for i in range(16):
                await f.write(i * CHUNK, second)
        with trio.fail_after(60):
            await f.flush_dirty()
        assert sum(row.chunks for row in engine.stats.encode.values()) == 16
        for i in range(16):
            assert await f.read(i * CHUNK, len(second)) == second

    run_with_files(tmp_path, config, body)


def test_concurrent_reads_of_a_chunk_the_cache_refuses_all_succeed(tmp_path, caplog):
    """Single flight when T0 does not keep the chunk (too big, or refused by the policy):
    readers that waited for one load each load again, and every one gets the bytes.
    Two waiters used to both register their own load under the same key; the first to
    finish removed the other's entry, and the second failed with KeyError (EIO)."""
    config = Config(cache=CacheConfig(t0_bytes=CHUNK // 2), delta=False)
    data = os.urandom(CHUNK)

    async def body(engine, open_file):
        f = open_file("refused")
        await f.write(0, data)
        await f.commit(durable=False)
        results = []

        async def reader():
            results.append(await f.read(0, CHUNK))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(reader)
        assert results == [data] * 4
        assert not f._loading

    with caplog.at_level(logging.CRITICAL):
        run_with_files(tmp_path, config, body)


def test_a_truncate_that_waits_for_budget_does_not_bring_cut_chunks_back(tmp_path, caplog):
    """A shrinking truncate that waits for dirty budget (for the chunk it cuts) lets the
    budget's pressure hook start encodes of this file's dirty chunks. A chunk past the new
    size whose encode was still running when the truncate dropped it must stay dropped:
    its record used to land in the index afterwards, so growing the file again showed
    the old bytes instead of zeros, also after a commit and a reopen."""
    config = Config(cache=CacheConfig(dirty_bytes=2 * CHUNK), delta=False,
                    rules=(Rule("slow*", codec="zstd", level=19),))
    words = [os.urandom(6).hex().encode() for _ in range(4096)]
    old = b" ".join(words[i % 4096] for i in range(CHUNK // 8))[:CHUNK - 1]

    async def body(engine, open_file):
        f = open_file("slow.bin")
        await f.write(3 * CHUNK, old)              # chunk 3: partly written, dirty
        await f.write(2 * CHUNK + 5, bytes(100))   # chunk 2: dirty zeros; the budget is full
        assert engine.dirty.used == 2 * CHUNK and not f.inflight
        # Cutting chunk 0 (a hole) needs budget: the pressure hook starts the encodes of
        # chunks 2 and 3; chunk 2 (zeros) gives its budget back at once, chunk 3 is slow.
        await f.truncate(CHUNK // 2)
        assert set(f.dirty) == {0}
        with trio.fail_after(120):
            await f._wait_idle()
        await f.truncate(4 * CHUNK)
        assert await f.read(3 * CHUNK, CHUNK) == bytes(CHUNK)
        await f.commit(durable=False)
        reopened = Container.open(f.container.fd, "slow.bin")
        assert reopened.size == 4 * CHUNK
        assert reopened.read_chunk(3) is None

    with caplog.at_level(logging.CRITICAL):
        run_with_files(tmp_path, config, body)


def test_a_prefetch_that_reads_after_close_caches_nothing(tmp_path, caplog):
    """A read-ahead task that passed its closed check but got its I/O thread only after the
    file was closed reads whatever now has that descriptor number. Another container with
    the same layout verifies there, and its chunk used to be cached under the closed file's
    name: reopening the first file then read the other file's bytes."""
    config = Config(cache=CacheConfig(write_admit="bypass"), delta=False)
    ours, theirs = os.urandom(CHUNK), os.urandom(CHUNK)

    async def body(engine, open_file):
        a, b = open_file("a"), open_file("b")
        for f, data in ((a, ours), (b, theirs)):  # same layout: records at the same offsets
            await f.write(0, data)
            await f.commit(durable=False)
        assert a.container.index == b.container.index
        loc = a.container.index[0]
        assert not engine.cache.peek((a.cache_id, 0, loc.offset))
        async with trio.open_nursery() as nursery:
            with all_tokens_held(engine.io_limiter):
                nursery.start_soon(a.load_chunk, 0, True)
                await trio.testing.wait_all_tasks_blocked()  # waiting for an I/O thread
                a.closed = True
                # a's descriptor number now names b, as after close and a reuse of the number
                # (dup2 rather than close + open: another thread may take a freed number first)
                other = os.open(tmp_path / "b", os.O_RDONLY)
                os.dup2(other, a.container.fd)
                os.close(other)
                fd = a.container.fd
        os.close(fd)
        fd = os.open(tmp_path / "a", os.O_RDWR)
        again = ContainerFile(engine, Container.open(fd, "a"), config.rule_for("a"))
        assert again.cache_id == a.cache_id and again.container.index[0] == loc
        try:
            assert await again.read(0, CHUNK) == ours
        finally:
            os.close(fd)

    with caplog.at_level(logging.CRITICAL):
        run_with_files(tmp_path, config, body)
