"""A full backing filesystem: each writer's handle hears of its own lost or unstored writes, and a full disk
costs later writers nothing once there is room again.

The backing directory lives on a 40 MiB tmpfs (test_fullness.small_backing), filled from outside the mount.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from test_fullness import last_close_fails, small_backing  # noqa: F401 (a fixture)

pytestmark = pytest.mark.mount

MIB = 1 << 20


def small_chunks(tmp_path, writeback: bool):
    config = tmp_path / f"small-chunks-{writeback}.toml"
    config.write_text(f'chunk_size = "64KiB"\ndelta = false\nwriteback_cache = {str(writeback).lower()}\n'
                      '[cache]\ndirty_bytes = "4MiB"\nt0_bytes = "8MiB"\n')
    return "-c", str(config)


def fsck(backing) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dccfs.cli", "fsck", str(backing)],
                          capture_output=True, text=True, timeout=120)


def test_lost_writeback_writes_fail_every_fsync_and_the_close_of_their_writer(small_backing, make_mount,
                                                                              tmp_path):
    """With the writeback cache, the kernel acknowledges writes the daemon may later have no room
    for. A reader's close must not take the writer's error (found by review: two readers' closes used
    up the kernel's and the daemon's error, then the writer's close returned 0 for a file missing
    2 MiB), and a retried fsync must not succeed once room is freed: those bytes are gone."""
    mount = make_mount("lostwb", *small_chunks(tmp_path, writeback=True), backing=small_backing)
    mount.expect_errors = True  # the failed stores are logged
    filler = small_backing / "filler"
    filler.write_bytes(os.urandom(16 * MIB))
    data = os.urandom(30 * MIB)
    fd = os.open(mount.mnt / "w", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, len(data), MIB):
            os.write(fd, data[offset:offset + MIB])  # the writeback cache takes them all
        for _ in range(2):  # a monitor opens and closes the file: its close writes the pages back
            reader = os.open(mount.mnt / "w", os.O_RDONLY)
            os.read(reader, 4096)
            try:
                os.close(reader)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC  # the kernel's own report, to whoever closes first
        filler.unlink()
        for _ in range(2):
            with pytest.raises(OSError) as syncing:
                os.fsync(fd)
            assert syncing.value.errno == errno.ENOSPC
    finally:
        with pytest.raises(OSError) as closing:
            os.close(fd)
    assert closing.value.errno == errno.ENOSPC
    mount.remount()
    stored = (mount.mnt / "w").read_bytes()
    assert len(stored) < len(data)
    mount.stop()
    checked = fsck(small_backing)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_after_a_failed_store_a_new_writer_of_the_emptied_file_succeeds(small_backing, make_mount, tmp_path):
    """A's chunks could not be stored and A still has the file open; room is freed. B empties the file
    (O_TRUNC) and writes: that works, since the unstored chunks went with the truncation (found by
    review: B's write got A's ENOSPC with 23 MiB free)."""
    mount = make_mount("newwriter", *small_chunks(tmp_path, writeback=False), backing=small_backing)
    mount.expect_errors = True  # the failed stores are logged
    filler = small_backing / "filler"
    free = os.statvfs(small_backing).f_bavail * os.statvfs(small_backing).f_frsize
    filler.write_bytes(bytes(max(0, free - 8 * MIB)))
    path = mount.mnt / "f"
    a = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with pytest.raises(OSError) as writing:
            for offset in range(0, 40 * MIB, MIB):
                os.pwrite(a, os.urandom(MIB), offset)
        assert writing.value.errno == errno.ENOSPC
        filler.unlink()
        fresh = os.urandom(MIB)
        b = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(b, fresh)
        finally:
            os.close(b)
    finally:
        try:
            os.close(a)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC  # A's own failure, once
    assert path.read_bytes() == fresh
    mount.remount()
    assert path.read_bytes() == fresh


def test_a_failed_last_close_leaves_no_torn_tail(small_backing, make_mount, tmp_path):
    """The records a last close could not commit are cut at once (found by review: they kept their
    space, and fsck reported a torn tail after a clean unmount)."""
    mount = make_mount("notorn", *small_chunks(tmp_path, writeback=True), backing=small_backing)
    mount.expect_errors = True  # the failed stores and commit are logged
    committed = os.urandom(MIB)
    (mount.mnt / "f").write_bytes(committed)
    free = os.statvfs(small_backing).f_bavail * os.statvfs(small_backing).f_frsize
    filler = small_backing / "filler"
    filler.write_bytes(bytes(max(0, free - 4 * MIB)))
    fd = os.open(mount.mnt / "f", os.O_WRONLY)
    try:
        for offset in range(MIB, 12 * MIB, MIB):
            os.pwrite(fd, os.urandom(MIB), offset)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        last_close_fails(fd, mount)
    mount.stop()
    checked = fsck(small_backing)
    assert checked.returncode == 0 and "TORN" not in checked.stdout, checked.stdout + checked.stderr
    mount.start()
    assert (mount.mnt / "f").read_bytes() == committed
