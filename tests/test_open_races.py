"""A closed file opened by several writers at the same moment keeps every fsynced write."""
from __future__ import annotations

import os
import threading

import pytest

pytestmark = pytest.mark.mount

CHUNK = 256 << 10  # what a mount gives a file of this name
ROUNDS = 6


def _write_each_chunk_at_once(path, chunks: list[bytes]) -> list[BaseException]:
    """One thread per chunk: open, write that chunk, fsync, close, all starting together."""
    start = threading.Barrier(len(chunks))
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            start.wait()
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, chunks[i], i * CHUNK)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_first_opens_of_a_closed_file_keep_every_write(make_mount, writers):
    """The first opens of a closed file attach it once: two that raced used to attach a
    container each, which then wrote over each other's records (half the rounds lost an
    fsynced chunk, through the mount and after a remount)."""
    mount = make_mount()
    expected = {}
    for r in range(ROUNDS):
        path = mount.mnt / f"f{r}.txt"
        path.write_bytes(os.urandom(writers * CHUNK))  # written and closed: nothing attached
        chunks = [os.urandom(CHUNK) for _ in range(writers)]
        assert _write_each_chunk_at_once(path, chunks) == []
        expected[path.name] = b"".join(chunks)
        assert path.read_bytes() == expected[path.name], f"round {r}"
    mount.remount()
    for name, data in expected.items():
        assert (mount.mnt / name).read_bytes() == data, name
