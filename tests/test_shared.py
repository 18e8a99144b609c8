"""Two mounts of one backing directory (--shared), as nodes sharing NFS or Lustre would."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.mount


def test_second_exclusive_mount_is_refused(make_mount, tmp_path):
    first = make_mount("one")
    (tmp_path / "two-mnt").mkdir()
    result = subprocess.run([sys.executable, "-m", "dccfs.cli", "mount", str(first.backing),
                             str(tmp_path / "two-mnt")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "already mounted by another dccfs daemon" in result.stderr


def test_close_to_open_consistency_and_serialised_writers(make_mount, tmp_path):
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    first = os.urandom(700_000)
    (a.mnt / "f").write_bytes(first)
    assert (b.mnt / "f").read_bytes() == first
    second = os.urandom(900_000)
    (a.mnt / "f").write_bytes(second)
    assert (b.mnt / "f").read_bytes() == second  # B re-reads at open

    a_content, b_content = b"A" * 600_000, b"B" * 500_000
    holder = open(a.mnt / "f", "r+b")
    holder.write(a_content)
    order = []

    def write_through_b():
        with open(b.mnt / "f", "r+b") as f:  # waits until A's writer closes
            order.append(("b-opened", time.monotonic()))
            f.write(b_content)
            f.truncate(len(b_content))
    thread = threading.Thread(target=write_through_b)
    thread.start()
    time.sleep(1.0)
    order.append(("a-closing", time.monotonic()))
    holder.close()
    thread.join(30)
    assert not thread.is_alive()
    assert [name for name, _ in order] == ["a-closing", "b-opened"]
    assert (a.mnt / "f").read_bytes() == b_content
    assert (b.mnt / "f").read_bytes() == b_content
    a.stop()
    b.stop()
    fsck = subprocess.run([sys.executable, "-m", "dccfs.cli", "fsck", "-q", str(a.backing)],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_daemon_pid_names_each_shared_mount_s_own_daemon(make_mount):
    """Every daemon of a --shared backing directory writes the same pid file, so `dccfs
    umount` of one mount waited for whichever daemon wrote it last (up to 120 s for the
    other node's, or not at all for a pid this host does not have). The pid now comes from
    the mount's own control socket."""
    from dccfs.umount import daemon_pid
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    assert daemon_pid(str(a.mnt)) == a.pid
    assert daemon_pid(str(b.mnt)) == b.pid


def test_umount_of_a_dead_shared_mount_waits_for_no_other_daemon(make_mount):
    """A --shared mount whose daemon was killed: its socket refuses, so nothing is waited for. The
    unmount fell back to the pid file, which named the other mount's daemon, and waited 120 s
    for it before it said the mount was "still flushing" (review J)."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    (b.backing / "x").write_bytes(b"x")  # b started last: the pid file is b's
    os.kill(a.pid, signal.SIGKILL)  # our own daemon
    a.proc.wait()
    a.proc = None
    result = subprocess.run([sys.executable, "-m", "dccfs.cli", "umount", str(a.mnt)], capture_output=True,
                            text=True, timeout=200)
    assert result.returncode == 0, result.stderr  # was 1 after 120 s: "daemon pid (b's) is still flushing"
    assert b.proc.poll() is None and (b.mnt / "x").read_bytes() == b"x"


def test_appends_to_a_plain_file_through_two_nodes_keep_both(make_mount):
    """O_APPEND writers of a plain file (one that was there before the mount) on two nodes, the
    second appending while the first still holds its descriptor: each append lands at the
    backing file's end. The daemon used to drop O_APPEND and write at the offset the kernel
    sent from its stale size, over the other node's line (found by review)."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    (a.backing / "log.txt").write_bytes(b"start\n")
    first = os.open(a.mnt / "log.txt", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(first, b"A1\n")
        second = os.open(b.mnt / "log.txt", os.O_WRONLY | os.O_APPEND)
        os.write(second, b"B1\n")
        os.close(second)
        os.write(first, b"A2\n")
    finally:
        os.close(first)
    assert (a.backing / "log.txt").read_bytes() == b"start\nA1\nB1\nA2\n"
