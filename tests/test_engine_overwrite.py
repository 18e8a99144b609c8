"""An overwrite (truncate to 0) racing reads, prefetches and pins, without a mount: old or new state, never zeros."""
from __future__ import annotations

import logging
import os

import trio
import trio.testing

from dccfs.config import CacheConfig, Config
from dccfs.container import Container
from dccfs.delta_bases import base_link_path
from engine_harness import CHUNK, all_tokens_held, one_thread_at_a_time, run_with_files


async def _one_chunk_and_a_reader(open_file):
    """A committed one-chunk file, and a task that reads its first 4 KiB into the list returned."""
    f = open_file("over")
    await f.write(0, os.urandom(CHUNK))
    await f.commit(durable=False)
    got = []

    async def reader():
        got.append(await f.read(0, 4096))

    return f, reader, got


def test_a_read_racing_an_overwrite_is_not_reported_as_damage(tmp_path, caplog):
    """truncate(0) of a file (O_TRUNC) starts a fresh container in place. A read that had
    looked the chunk up before that and reads it after gets the old record's offset in a
    file that no longer holds it: that is the new content (zeros), not a damaged chunk.
    It used to fail with EIO and count and log a checksum error."""
    config = Config(cache=CacheConfig(t0_bytes=CHUNK // 2), delta=False)

    async def body(engine, open_file):
        f, reader, got = await _one_chunk_and_a_reader(open_file)
        with all_tokens_held(engine.io_limiter) as holders:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(f.load_chunk, 0, True)   # a prefetch, queued for a thread
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(reader)                  # waits for the prefetch
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(f.truncate, 0)           # queued for a thread next
                await trio.testing.wait_all_tasks_blocked()
                await one_thread_at_a_time(engine.io_limiter, holders)  # prefetch, reset, reader
        assert f.size == 0
        assert got and got[0] in (b"", bytes(4096)), got[0][:16]
        assert engine.stats.checksum_errors == 0

    with caplog.at_level(logging.CRITICAL):
        run_with_files(tmp_path, config, body)


def test_a_read_during_an_overwrite_waits_for_it_instead_of_reading_zeros(tmp_path):
    """truncate(0) resets the container on a worker thread, and the size becomes 0 after it. A
    read in between looked for the chunk in the emptied container, found none and answered
    zeros for the old size (review E). Reads now wait for the reset and find the file empty."""
    config = Config(cache=CacheConfig(t0_bytes=CHUNK // 2), delta=False)  # no chunk stays in T0

    async def body(engine, open_file):
        f, reader, got = await _one_chunk_and_a_reader(open_file)
        with all_tokens_held(engine.io_limiter) as holders:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(f.truncate, 0)  # its reset queued for a thread
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(reader)  # before the fix: its chunk load queued behind the reset
                await trio.testing.wait_all_tasks_blocked()
                await one_thread_at_a_time(engine.io_limiter, holders)
        assert f.size == 0
        assert got == [b""], got[0][:16]

    run_with_files(tmp_path, config, body)


def test_an_overwrite_never_resets_a_container_pinned_while_it_waited(tmp_path, caplog):
    """An overwrite (truncate to 0) resets a container in place only when nothing else links
    it. The link count used to be checked before waiting for an I/O thread, so a delta
    base pinned in that wait was reset anyway: the pin then held no records and the
    dependent read EIO. The check now runs with the reset, under the pin lock."""
    config = Config(delta=False)
    data = os.urandom(CHUNK + 4096)

    locs = {}
    pin = None

    async def body(engine, open_file):
        a = open_file("a")
        await a.write(0, data)
        await a.commit(durable=False)
        locs.update(a.container.index)
        async with trio.open_nursery() as nursery:
            with all_tokens_held(engine.io_limiter):
                nursery.start_soon(a.truncate, 0)
                await trio.testing.wait_all_tasks_blocked()  # the truncate waits for a thread
                nonlocal pin
                pin = base_link_path(str(tmp_path), a.container.header.file_id, a.container.header.generation)
                os.makedirs(os.path.dirname(pin), exist_ok=True)
                os.link(tmp_path / "a", pin)  # what pin_base does meanwhile
        assert a.size == 0
        await a.commit(durable=False)

    with caplog.at_level(logging.CRITICAL):
        run_with_files(tmp_path, config, body)
    fd = os.open(pin, os.O_RDONLY)
    try:
        pinned = Container.open(fd, "pin")
        # a delta names its base records by offset: they are all still there
        assert pinned.read_chunk(0, locs[0]) + pinned.read_chunk(1, locs[1]) == data
    finally:
        os.close(fd)
