"""The offline tools find the backing directory and its lock however they are pointed at it (found by review V:
each case below ran without the lock under a live mount, or on dccfs's own state, and lost data)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys

from dccfs.cli import main
from offline_containers import CS, text, write_container


@contextlib.contextmanager
def held_lock(backing):
    """What a live mount holds."""
    fd = os.open(backing / ".dccfs" / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_fsck_repair_of_a_subdirectory_is_refused_under_a_live_mount(backing, runner):
    """It found no .dccfs in the subdirectory, took no lock, and cut a writer's uncommitted records."""
    (backing / "sub").mkdir()
    write_container(backing / "sub" / "f", text(1, 2 * CS))
    with open(backing / "sub" / "f", "ab") as f:
        f.write(b"records the mount has not committed yet")
    size = os.path.getsize(backing / "sub" / "f")
    with held_lock(backing):
        result = runner.invoke(main, ["fsck", "--repair", "-q", str(backing / "sub")])
    assert result.exit_code == 1 and "unmount it first" in result.stderr, result.output
    assert os.path.getsize(backing / "sub" / "f") == size


def test_pack_and_unpack_through_a_symlink_are_refused_under_a_live_mount(backing, runner, tmp_path):
    (backing / "sub").mkdir()
    (backing / "sub" / "plain").write_bytes(text(2, CS))
    write_container(backing / "sub" / "stored", text(3, CS))
    link = tmp_path / "link"
    link.symlink_to(backing / "sub")
    with held_lock(backing):
        for verb in ("pack", "unpack"):
            result = runner.invoke(main, [verb, "-q", f"{link}/"])
            assert result.exit_code == 1 and "unmount it first" in result.stderr, (verb, result.output)
    assert (backing / "sub" / "plain").read_bytes() == text(2, CS)


def test_unpack_through_a_symlink_into_the_state_directory_is_refused(backing, runner, tmp_path):
    """It turned a delta base's pin into a plain file; its dependents then read EIO."""
    bases = backing / ".dccfs" / "bases"
    bases.mkdir()
    write_container(bases / "0123-0", text(4, CS))
    before = (bases / "0123-0").read_bytes()
    link = tmp_path / "bases-link"
    link.symlink_to(bases)
    result = runner.invoke(main, ["unpack", "-q", f"{link}/"])
    assert result.exit_code == 1 and "dccfs's own state" in result.stderr, result.output
    assert (bases / "0123-0").read_bytes() == before


def test_a_user_directory_named_dccfs_with_tmp_in_it_does_not_hide_the_root_lock(backing, runner):
    """Made through the mount, sub/.dccfs/tmp passed for the backing root's state: the tools took its
    lock (none) instead of the root's."""
    user_state = backing / "sub" / ".dccfs" / "tmp"
    user_state.mkdir(parents=True)
    (backing / "sub" / "f").write_bytes(text(5, CS))
    with held_lock(backing):
        for args in (["pack", "-q", str(backing / "sub")], ["fsck", "--repair", "-q", str(backing / "sub")]):
            result = runner.invoke(main, args)
            assert result.exit_code == 1 and "unmount it first" in result.stderr, (args, result.output)
    assert (backing / "sub" / "f").read_bytes() == text(5, CS)


def test_a_backing_directory_inside_the_tree_is_locked_and_its_state_left_alone(tmp_path, runner):
    """pack of a parent converted the files of a live mount's backing directory nested in it; and with
    the parent a backing directory too, that directory's .dccfs was packed as user data."""
    parent = tmp_path / "parent"
    data = parent / "data"
    (data / ".dccfs" / "tmp").mkdir(parents=True)
    (data / ".dccfs" / "refs").mkdir()
    (data / ".dccfs" / "refs" / "record").write_bytes(b"a pin record")
    (data / "f").write_bytes(text(7, CS))
    (parent / "g").write_bytes(text(8, CS))
    with held_lock(data):
        result = runner.invoke(main, ["pack", "-q", str(parent)])
        assert result.exit_code == 1 and "unmount it first" in result.stderr, result.output
    assert (data / "f").read_bytes() == text(7, CS)
    (parent / ".dccfs" / "tmp").mkdir(parents=True)
    result = runner.invoke(main, ["pack", str(parent)])
    assert result.exit_code == 0 and "2 files converted" in result.output, result.output
    assert (data / ".dccfs" / "refs" / "record").read_bytes() == b"a pin record"


def test_pack_of_a_never_mounted_directory_holds_the_mount_lock(tmp_path, runner):
    """With no .dccfs yet pack took no lock, and a mount started meanwhile lost a writer's appends."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(text(6, CS))
    result = runner.invoke(main, ["pack", "-q", str(tree)])
    assert result.exit_code == 0, result.output
    assert (tree / ".dccfs" / "mount.lock").is_file()
    assert not [n for n in os.listdir(tree) if n.startswith(".dccfs-offline-")]
    (tmp_path / "mnt").mkdir()
    with held_lock(tree):  # what pack holds while it runs
        mount = subprocess.run([sys.executable, "-m", "dccfs.cli", "mount", str(tree), str(tmp_path / "mnt")],
                               capture_output=True, text=True, timeout=60)
    assert mount.returncode == 1 and "fsck --repair of it is running" in mount.stderr, mount


def test_cat_of_a_fifo_is_refused_instead_of_waiting(backing, runner):
    os.mkfifo(backing / "fifo")
    result = runner.invoke(main, ["cat", str(backing / "fifo")])
    assert result.exit_code == 1 and "not a regular file" in result.stderr, result.output
