"""Races around the background rewrite after close (deltas after close, compaction): metadata, releases, unmount, I/O tokens."""
from __future__ import annotations

import logging
import os
import stat

import pytest
import trio

from dccfs import compaction
from test_delta_mount import series  # noqa: F401 (series is a fixture)
from test_handles import create, run_with_handles
from test_redelta import checkpoints, keyframes_then_deltas, wait_for_pass, write  # noqa: F401


def backing_dir(tmp_path):
    backing = tmp_path / "backing"
    (backing / ".dccfs" / "tmp").mkdir(parents=True)
    return backing


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
