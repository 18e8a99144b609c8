"""Races around the background rewrite after close (deltas after close, compaction): metadata, releases, unmount, I/O tokens."""
from __future__ import annotations

import logging
import os
import stat
import threading
import time

import pytest
import trio

from dccfs import compaction
from mounting import unmount
from test_delta_mount import dccfs, series  # noqa: F401 (series is a fixture)
from test_handles import create, run_with_handles, stored
from test_redelta import (checkpoints, deltas_after_close, keyframes_then_deltas, wait_for_pass,  # noqa: F401
                          write)

# How long a request may take while a background rewrite is held up before the test calls it stuck.
PROMPT_S = 5


def backing_dir(tmp_path):
    backing = tmp_path / "backing"
    (backing / ".dccfs" / "tmp").mkdir(parents=True)
    return backing


class HeldRewrites:
    """write_compacted that waits in its worker thread until let go, as a long pass does."""

    def __init__(self, monkeypatch):
        self.real = compaction.write_compacted
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()
        monkeypatch.setattr(compaction, "write_compacted", self)

    def __call__(self, source, tmp_path, *rest):
        self.entered.release()
        self.gate.wait(60)
        return self.real(source, tmp_path, *rest)

    async def wait_entered(self, count: int = 1) -> None:
        for _ in range(count):
            assert await trio.to_thread.run_sync(self.entered.acquire, True, 30)


async def release_like_fuse(handles, inodes, handle):
    """What the FUSE release handler does."""
    try:
        await handles.release(handle.number)
    finally:
        inodes.release_open(handle.inode)


async def wait_until(predicate, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.mark.mount
def test_a_delta_pass_keeps_the_setuid_and_setgid_bits(make_mount, checkpoints, tmp_path):
    """The swapped-in copy got the original's mode, then its owner: a chown clears the
    set-user-ID and set-group-ID bits, root's included, so a pass (or a compaction)
    silently dropped them."""
    mount = make_mount("later-suid", *keyframes_then_deltas(tmp_path))
    write(mount.mnt / "step-10.safetensors", checkpoints[0])
    with open(mount.mnt / "step-20.safetensors", "wb") as f:
        f.write(checkpoints[1])
        os.fchmod(f.fileno(), 0o6755)
    assert wait_for_pass(mount) > 0
    assert stat.S_IMODE(os.stat(mount.backing / "step-20.safetensors").st_mode) == 0o6755
    mount.remount()
    path = mount.mnt / "step-20.safetensors"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o6755
    assert path.read_bytes() == checkpoints[1]


def test_a_chmod_or_setxattr_after_the_copy_survives_the_swap(tmp_path, caplog, monkeypatch):
    """The copy takes the original's mode and xattrs after its last record, then fsyncs,
    which for a large file takes a while; a chmod or setxattr the FUSE thread serves in
    between went to the original only, and the rename threw it away."""
    backing = backing_dir(tmp_path)
    real = compaction.write_compacted

    def copy_then_change_metadata(source, tmp_path_, *rest):
        size = real(source, tmp_path_, *rest)
        os.chmod(backing / "f.bin", 0o640)
        os.setxattr(backing / "f.bin", "user.note", b"set during the fsync")
        return size

    async def body(engine, inodes, handles):
        monkeypatch.setattr(compaction, "write_compacted", copy_then_change_metadata)
        inode, handle = await create(inodes, handles, "f.bin")
        for _ in range(12):  # rewrites leave dead records: the release compacts
            await handle.file.write(0, os.urandom(1 << 20))
            await handle.file.commit(durable=False)
        inode.opens += 1
        await handles.release(handle.number)
        await wait_until(lambda: engine.stats.compactions == 1)

    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)
    st = os.stat(backing / "f.bin")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert os.getxattr(backing / "f.bin", "user.note") == b"set during the fsync"


def test_a_release_during_a_background_rewrite_does_not_wait_for_it(tmp_path, caplog, monkeypatch):
    """A reader that opens and closes the file while its pass runs: the release waited for
    the whole pass (the pass holds the file's release lock), which ties up one of
    pyfuse3's request tasks per release, and keeps an unmount waiting for the pass."""
    backing = backing_dir(tmp_path)
    content = os.urandom(1000)
    released = trio.Event()

    async def body(engine, inodes, handles):
        held = HeldRewrites(monkeypatch)
        monkeypatch.setattr(compaction, "worth_compacting", lambda container: True)
        inode, handle = await create(inodes, handles, "f.bin")
        await handle.file.write(0, content)
        inode.opens += 1
        await handles.release(handle.number)
        await held.wait_entered()
        reader = await handles.open(inode, os.O_RDONLY)
        assert await reader.file.read(0, len(content)) == content
        with trio.move_on_after(PROMPT_S):
            await release_like_fuse(handles, inodes, reader)
            released.set()
        held.gate.set()
        await wait_until(lambda: handle.file.closed)

    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)
    assert released.is_set(), "the release waited for the background rewrite"
    with stored(backing, "f.bin") as container:
        assert container.read_chunk(0) == content


def test_background_rewrites_leave_the_io_threads_to_reads_and_commits(tmp_path, caplog, monkeypatch):
    """Each pass held one of the 16 I/O tokens that chunk reads and commits use, for its
    whole CPU-bound duration: a checkpoint of 16 shards left to the pass after close
    stalled every cache-missing read and every fsync or close on the mount."""
    backing = backing_dir(tmp_path)
    committed = trio.Event()

    async def body(engine, inodes, handles):
        held = HeldRewrites(monkeypatch)
        monkeypatch.setattr(compaction, "worth_compacting", lambda container: True)
        shards = []
        for n in range(16):
            inode, handle = await create(inodes, handles, f"shard-{n}.bin")
            await handle.file.write(0, os.urandom(1000))
            inode.opens += 1
            await handles.release(handle.number)
            shards.append(handle.file)
        await held.wait_entered()
        await trio.sleep(0.2)  # lets every pass that can start take its thread
        _, other = await create(inodes, handles, "other.bin")
        await other.file.write(0, b"saved while the shards are rewritten")
        with trio.move_on_after(PROMPT_S):
            await other.file.commit(durable=True)
            committed.set()
        held.gate.set()
        await wait_until(lambda: all(shard.closed for shard in shards), 60)
        await handles.release(other.number)

    with caplog.at_level(logging.CRITICAL):
        run_with_handles(backing, body)
    assert committed.is_set(), "a commit waited for the background rewrites"
    with stored(backing, "other.bin") as container:
        assert container.read_chunk(0) == b"saved while the shards are rewritten"


@pytest.fixture(scope="module")
def large_checkpoints(series):
    """The two checkpoints of the series, sixteen times over (about 110 MB each), so that a
    pass after close takes seconds."""
    from safetensors.torch import save
    return tuple(save({f"copy{n}.{name}": tensor.clone() for n in range(16)
                       for name, tensor in tensors.items()})
                 for tensors in series)


@pytest.mark.mount
def test_an_unmount_after_a_read_during_the_pass_stops_the_pass(make_mount, large_checkpoints, tmp_path):
    """A file read (opened and closed) while its pass runs, then the mount is unmounted:
    the daemon must stop the pass at its next record, not run it to the end first."""
    mount = make_mount("later-read-umount", *keyframes_then_deltas(tmp_path))
    write(mount.mnt / "step-10.safetensors", large_checkpoints[0])
    target = mount.mnt / "step-20.safetensors"
    write(target, large_checkpoints[1])
    tmp_dir = mount.backing / ".dccfs" / "tmp"
    deadline = time.monotonic() + 60
    while not any(n.endswith(".compact") for n in os.listdir(tmp_dir)):
        assert time.monotonic() < deadline, "the pass did not start"
        time.sleep(0.005)
    with open(target, "rb") as f:
        assert f.read(8) == large_checkpoints[1][:8]
    unmount(mount.mnt)
    mount.proc.wait(120)
    log_text = mount.log_text()
    assert "stored as deltas after close" not in log_text, "the unmount waited for the whole pass"
    assert "the mount is stopping" in log_text
    mount.start()
    for n, data in zip((10, 20), large_checkpoints):
        assert (mount.mnt / f"step-{n}.safetensors").read_bytes() == data
    mount.stop()
    result = dccfs("fsck", "-q", mount.backing)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.mount
def test_an_atomic_save_over_its_base_still_gets_its_deltas_after_close(make_mount, checkpoints, tmp_path):
    """An atomic saver writes a temporary file, whose base is the file it is about to
    replace, then renames it over that file right after the close. The pass pinned the
    base only when its first delta was ready, by which time the rename had unlinked it:
    the pin failed and the new checkpoint stayed keyframes."""
    mount = make_mount("later-atomic", *keyframes_then_deltas(tmp_path))
    final = mount.mnt / "latest.safetensors"
    write(final, checkpoints[0])
    temporary = mount.mnt / ".tmpk3j4h5"  # a saver's temporary name: the checkpoint chunk size
    write(temporary, checkpoints[1])
    os.rename(temporary, final)
    deadline = time.monotonic() + 120
    while deltas_after_close(mount) == 0 and "cannot be pinned" not in mount.log_text():
        assert time.monotonic() < deadline, "the pass did not end"
        time.sleep(0.1)
    assert deltas_after_close(mount) > 0, mount.log_text()[-2000:]
    assert final.read_bytes() == checkpoints[1]
    mount.remount()
    assert final.read_bytes() == checkpoints[1]
    mount.stop()
    result = dccfs("fsck", "-q", mount.backing)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.mount
def test_a_rename_right_after_close_keeps_the_pass(make_mount, checkpoints, tmp_path):
    """A rename makes the kernel (writeback cache) send the file's times back in a SETATTR,
    which the daemon keeps as an explicit mtime: the pass took that for a change to the
    file and threw its copy away, so a checkpoint renamed after its save (as many
    trainers do) never got its deltas."""
    mount = make_mount("later-rename", *keyframes_then_deltas(tmp_path))
    write(mount.mnt / "step-10.safetensors", checkpoints[0])
    write(mount.mnt / "step-20.safetensors", checkpoints[1])
    os.rename(mount.mnt / "step-20.safetensors", mount.mnt / "step-21.safetensors")
    mtime = os.stat(mount.mnt / "step-21.safetensors").st_mtime_ns
    deadline = time.monotonic() + 120
    while deltas_after_close(mount) == 0 and not any(
            n.endswith(".compact") for n in os.listdir(mount.backing / ".dccfs" / "tmp")):
        assert time.monotonic() < deadline, "the pass did not start"
        time.sleep(0.01)
    while any(n.endswith(".compact") for n in os.listdir(mount.backing / ".dccfs" / "tmp")):
        assert time.monotonic() < deadline, "the pass did not end"
        time.sleep(0.05)
    time.sleep(0.5)  # the swap and its stats follow the copy
    assert deltas_after_close(mount) > 0
    mount.remount()
    path = mount.mnt / "step-21.safetensors"
    assert path.read_bytes() == checkpoints[1]
    assert os.stat(path).st_mtime_ns == mtime
