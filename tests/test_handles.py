"""The handle table without a mount: opens, releases, compaction swaps and the shutdown commit on real containers."""
from __future__ import annotations

import contextlib
import errno
import logging
import os

import pytest
import trio
import trio.testing

from dccfs.config import Config
from dccfs.container import Container
from dccfs.engine import Engine
from dccfs.handles import HandleTable
from dccfs.inodes import ROOT_INODE, InodeTable
from test_engine import CHUNK, _failing_append


def run_with_handles(backing, body) -> None:
    """Run body(engine, inodes, handles) in a trio loop whose nursery carries the engine's background tasks."""
    async def main():
        engine = Engine(Config(delta=False), str(backing))
        inodes = InodeTable(os.open(backing, os.O_PATH | os.O_DIRECTORY))
        handles = HandleTable(engine, str(backing), inodes)
        async with trio.open_nursery() as nursery:
            engine.nursery = nursery
            await body(engine, inodes, handles)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def create(inodes, handles, name):
    """A new container file in the backing root, opened read-write: (inode, handle)."""
    root = inodes.get(ROOT_INODE)
    fd = os.open(name, os.O_CREAT | os.O_RDWR, 0o644, dir_fd=root.fd)
    inode, _ = inodes.lookup_child(root, name)
    return inode, await handles.attach_container(inode, fd, os.O_RDWR, create=True)


@contextlib.contextmanager
def stored(backing, name):
    """The committed container as a fresh open sees it; its descriptor is closed afterwards."""
    fd = os.open(backing / name, os.O_RDONLY)
    try:
        yield Container.open(fd, name)
    finally:
        os.close(fd)


def test_an_open_right_after_a_compaction_swap_writes_to_the_new_container(tmp_path, caplog):
    """Compaction renames a compacted copy over the container. An open that the trio loop
    lets in between that swap and the closing of the old file object must get the new
    container: writes into the replaced (unlinked) one would be lost at unmount."""
    backing = tmp_path / "backing"
    (backing / ".dccfs" / "tmp").mkdir(parents=True)
    first, second = os.urandom(CHUNK), os.urandom(CHUNK)

    async def body(engine, inodes, handles):
        inode, handle = await create(inodes, handles, "f.bin")
        for _ in range(12):  # rewrites leave dead records: the release compacts
            await handle.file.write(0, os.urandom(CHUNK))
            await handle.file.commit(durable=False)
        await handle.file.write(0, first)
        close_file = handles._close_file
        raced = trio.Event()

        async def open_in_the_window(inode_, file_, compact=True):
            if not compact:  # called by the compaction task, after its swap
                again = await handles.open(inode_, os.O_RDWR)
                await again.file.write(0, second)
                await handles.release(again.number)
                raced.set()
            await close_file(inode_, file_, compact)

        handles._close_file = open_in_the_window
        inode.opens += 1
        await handles.release(handle.number)
        with trio.fail_after(30):
            await raced.wait()
        handles._close_file = close_file
        await trio.sleep(0.5)
        assert engine.stats.compactions == 1

    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)
    with stored(backing, "f.bin") as container:
        assert container.read_chunk(0) == second


def test_commit_all_commits_every_file_when_one_fails(tmp_path, caplog):
    """The unmount/SIGTERM commit of every open file: a file whose chunks cannot be stored
    must not keep the files after it from being committed. The first failure used to end
    commit_all, and the other files' writes were lost when the daemon stopped."""
    backing = tmp_path / "backing"
    backing.mkdir()
    good = os.urandom(CHUNK + 123)

    async def body(engine, inodes, handles):
        _, failing = await create(inodes, handles, "failing.bin")
        _, ok = await create(inodes, handles, "good.bin")
        failing.file.container.append_chunk = _failing_append([])
        await failing.file.write(0, os.urandom(100))
        await ok.file.write(0, good)
        await handles.commit_all()

    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)
    with stored(backing, "good.bin") as container:
        assert container.size == len(good)
        assert container.read_chunk(0) + container.read_chunk(1) == good


def test_an_o_trunc_open_that_fails_leaves_no_handle_behind(tmp_path, caplog):
    """An open whose O_TRUNC fails (the reset of the container raises) is an open the kernel
    never sees succeed, so it never releases it: the handle must not stay registered. It
    used to, and kept the file open (its descriptor, no commit at its close) for good."""
    backing = tmp_path / "backing"
    backing.mkdir()

    def failing_reset():
        raise OSError(errno.EIO, "injected disk error")

    async def body(engine, inodes, handles):
        inode, first = await create(inodes, handles, "f.bin")
        await first.file.write(0, os.urandom(1000))
        await first.file.commit(durable=False)
        first.file.container.reset = failing_reset
        with pytest.raises(OSError):
            await handles.open(inode, os.O_RDWR | os.O_TRUNC)
        assert len(handles) == 1 and first.file.handles == 1 and inode.opens == 1
        await handles.release(first.number)
        assert first.file.closed

    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)


async def release_while_compacting(handles, inode, handle, monkeypatch, during_copy) -> None:
    """Release the file, which starts its compaction, and run during_copy in the trio loop once
    the compacted copy is written, before the swap; then give the pass time to end."""
    from dccfs import compaction
    real_write_compacted = compaction.write_compacted

    def write_then(source, tmp, *rest):
        size = real_write_compacted(source, tmp, *rest)
        trio.from_thread.run(during_copy)
        return size

    monkeypatch.setattr(compaction, "write_compacted", write_then)
    inode.opens += 1
    await handles.release(handle.number)
    await trio.sleep(1)
    monkeypatch.setattr(compaction, "write_compacted", real_write_compacted)


async def reopen_and_release(engine, handles, inode, flags: int, change) -> None:
    """A request meanwhile: open, change(handle), release (the release waits for the lock the
    compacting task holds)."""
    again = await handles.open(inode, flags)
    await change(again)
    inode.opens += 1
    engine.nursery.start_soon(handles.release, again.number)
    await trio.testing.wait_all_tasks_blocked()


async def save(handle, last):
    """Twelve incompressible rewrites, then last: every record and index the same size each time."""
    for _ in range(12):
        await handle.file.write(0, os.urandom(CHUNK))
        await handle.file.commit(durable=False)
    await handle.file.write(0, last)
    await handle.file.commit(durable=False)


def test_a_compaction_never_swaps_over_a_file_rewritten_to_the_same_size(tmp_path, caplog, monkeypatch):
    """While a released file is being compacted, it is reopened with O_TRUNC, rewritten by
    the same sequence of writes (so it ends at the same offset) and released again. The
    swap used to check only the backing file's size and identity, and renamed the stale
    compacted copy over the new content."""
    backing = tmp_path / "backing"
    (backing / ".dccfs" / "tmp").mkdir(parents=True)
    final = os.urandom(CHUNK)

    async def body(engine, inodes, handles):
        inode, handle = await create(inodes, handles, "f.bin")
        await save(handle, os.urandom(CHUNK))

        async def rewrite():  # runs in the compacting task, which holds the release lock
            await reopen_and_release(engine, handles, inode, os.O_RDWR | os.O_TRUNC,
                                     lambda again: save(again, final))

        await release_while_compacting(handles, inode, handle, monkeypatch, rewrite)

    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)
    with stored(backing, "f.bin") as container:
        assert container.read_chunk(0) == final


def test_a_compaction_never_swaps_over_a_pinned_base_overwritten_to_the_same_size(tmp_path, caplog, monkeypatch):
    """The same, for a file that is a delta base: its O_TRUNC gives the name a new container
    and leaves the old one to its pin, so the compacting task's own container looks unchanged,
    the swap's checks see the new file (one link, the re-keyed inode), and the same writes give
    it the same size: the stale copy was renamed over the new content (review G)."""
    from dccfs.delta_bases import base_link_path
    from dccfs.pin_records import header_name, write_record

    backing = tmp_path / "backing"
    (backing / ".dccfs" / "tmp").mkdir(parents=True)
    (backing / ".dccfs" / "bases").mkdir()
    final = os.urandom(CHUNK)

    async def body(engine, inodes, handles):
        inode, handle = await create(inodes, handles, "f.bin")
        await save(handle, os.urandom(CHUNK))
        header = handle.file.container.header
        # what a delta writer does when a later file takes this one as its base
        pins.append(base_link_path(str(backing), header.file_id, header.generation))
        os.link(backing / "f.bin", pins[0])
        write_record(str(backing), header_name(header), "0" * 32 + "-0")

        async def rewrite():
            await reopen_and_release(engine, handles, inode, os.O_RDWR | os.O_TRUNC,
                                     lambda again: save(again, final))

        await release_while_compacting(handles, inode, handle, monkeypatch, rewrite)

    pins = []
    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)
    assert os.stat(pins[0]).st_ino != os.stat(backing / "f.bin").st_ino  # the name has a new file
    with stored(backing, "f.bin") as container:
        assert container.read_chunk(0) == final


@pytest.mark.parametrize("grow", [True, False])
def test_a_truncate_during_a_compaction_is_committed(tmp_path, caplog, monkeypatch, grow):
    """A truncate by path (open, truncate, release) while a released file is being compacted,
    changing only the size: growing it, or cutting a hole at its end. The copy used to be
    swapped in with the old size, and the new one was lost (found by review)."""
    backing = tmp_path / "backing"
    (backing / ".dccfs" / "tmp").mkdir(parents=True)
    data = os.urandom(4 * CHUNK)
    old_size = 4 * CHUNK if grow else 6 * CHUNK  # 6: two chunks of hole at the end
    new_size = old_size + 12345 if grow else 4 * CHUNK

    async def body(engine, inodes, handles):
        inode, handle = await create(inodes, handles, "g.bin")
        for _ in range(2):  # every chunk twice: as many dead bytes as live ones
            await handle.file.write(0, data)
            await handle.file.commit(durable=False)
        await handle.file.truncate(old_size)
        await handle.file.commit(durable=False)

        async def truncate_by_path():  # what fs_files does for a truncate without a descriptor
            await reopen_and_release(engine, handles, inode, os.O_RDWR, lambda again: again.file.truncate(new_size))

        await release_while_compacting(handles, inode, handle, monkeypatch, truncate_by_path)

    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)
    with stored(backing, "g.bin") as container:
        assert container.size == new_size
        assert b"".join(container.read_chunk(i) for i in range(4)) == data


def test_chunks_written_in_two_pieces_read_store_and_reopen_right(tmp_path):
    """The kernel's writeback sends max_write requests at any phase, so most chunks arrive as a
    head (kept as a view of its request) and then a rest that completes them. Every way a head can
    be used before its rest comes: read, fsync, an overwrite inside it, a write past it, a truncate
    inside it, a whole-chunk write over it."""
    backing = tmp_path / "backing"
    (backing / ".dccfs" / "tmp").mkdir(parents=True)
    model = bytearray()

    async def body(engine, inodes, handles):
        inode, handle = await create(inodes, handles, "f.bin")
        f = handle.file
        cs, half = f.chunk_size, f.chunk_size // 2

        async def write(off, n):
            data = os.urandom(n)
            assert await f.write(off, data) == n
            model.extend(bytes(max(0, off + n - len(model))))
            model[off:off + n] = data

        async def check():
            assert f.size == len(model)
            assert await f.read(0, len(model) + cs) == bytes(model)

        await write(0, cs + half)  # chunk 1: a head
        assert isinstance(f.dirty[1], memoryview)
        await check()
        await write(cs + half, half)  # its rest: one join
        assert 1 not in f.dirty or isinstance(f.dirty[1], bytes)
        await write(2 * cs - half, cs)  # chunk 2: a head, stored short by the fsync
        await f.commit(True)
        await write(2 * cs + half, half)  # its rest, over the stored head
        await check()
        await write(3 * cs - 10, 110)  # chunk 3: a head, then an overwrite inside it
        await write(3 * cs + 50, 20)
        await check()
        await write(4 * cs - 1, 1 + half)  # chunk 4: a head, then a write past its end
        await write(4 * cs + half + 10, 10)
        await check()
        await write(5 * cs - 1, 1 + half)  # chunk 5: a head, then a whole-chunk write over it
        await write(5 * cs, cs)
        await check()
        await write(6 * cs - 1, 1 + half)  # chunk 6: a head, then a truncate inside it
        await f.truncate(6 * cs + 100)
        del model[6 * cs + 100:]
        await check()
        await write(6 * cs + 100, cs - 100)
        await check()
        await f.commit(True)
        await handles.release(handle.number)
        inodes.release_open(inode)

    run_with_handles(backing, body)
    with stored(backing, "f.bin") as container:
        assert container.size == len(model)
        cs = container.chunk_size
        got = b"".join((container.read_chunk(i) or b"").ljust(cs, b"\0") for i in range(-(-len(model) // cs)))
        assert got[:len(model)] == bytes(model)
