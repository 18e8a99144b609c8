"""Runs ContainerFiles of a real Engine on real files without a mount, and holds its worker threads back."""
from __future__ import annotations

import contextlib
import os

import trio
import trio.testing

from dccfs.chunkfile import ContainerFile
from dccfs.container import Container
from dccfs.engine import Engine

CHUNK = 1 << 20


def _files(tmp_path, engine, config):
    opened = []

    def open_file(name):
        fd = os.open(tmp_path / name, os.O_CREAT | os.O_RDWR, 0o644)
        file = ContainerFile(engine, Container.create(fd, name, 20), config.rule_for(name))
        opened.append(file)
        return file

    engine.dirty.on_pressure(lambda: [f.schedule_all() for f in opened if not f.store_failing])
    return open_file


def run_with_files(tmp_path, config, body) -> None:
    """trio.run body(engine, open_file) inside the nursery the engine's background tasks use."""
    async def main():
        engine = Engine(config, str(tmp_path))
        open_file = _files(tmp_path, engine, config)
        async with trio.open_nursery() as nursery:
            engine.nursery = nursery
            await body(engine, open_file)
            nursery.cancel_scope.cancel()

    trio.run(main)


@contextlib.contextmanager
def all_tokens_held(limiter):
    """Every token of limiter taken: work started in the block waits for a thread until it ends."""
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:
        limiter.acquire_on_behalf_of_nowait(holder)
    try:
        yield holders
    finally:
        for holder in holders:
            limiter.release_on_behalf_of(holder)


async def one_thread_at_a_time(limiter, holders: list) -> None:
    """Give back the tokens all_tokens_held took one by one, each once the thread that got the
    previous one is done: the queued thread jobs run alone, in the order they were queued."""
    while holders:
        limiter.release_on_behalf_of(holders.pop())
        while limiter.borrowed_tokens > len(holders):
            await trio.sleep(0.001)  # the thread has its token until it is done
        await trio.testing.wait_all_tasks_blocked()
