"""An operator's mistakes and a dead daemon: mount, umount and stats name path and reason, with a way back."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest


def dccfs(*args):
    return subprocess.run([sys.executable, "-m", "dccfs.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_a_mountpoint_inside_the_backing_directory_or_not_a_directory_is_refused(tmp_path):
    """A mountpoint inside its own backing directory mounted, and the first lookup of it
    through the mount hung the daemon for good (review F); a path that is a file got click's
    usage error (exit 2) instead of the mount's own message."""
    backing = tmp_path / "backing"
    (backing / "mnt").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        ((backing, backing / "mnt"), "lies inside the backing directory"),
        ((tmp_path / "afile", tmp_path / "empty"), "is not a directory"),
        ((backing, tmp_path / "afile"), "is not a directory"),
    ]
    for (back, mnt), message in cases:
        result = dccfs("mount", back, mnt)
        if os.path.ismount(mnt):  # mounted against expectations: lazily, it may hang already
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], timeout=30)
        assert result.returncode == 1, result
        assert message in result.stderr and str(mnt if "afile" not in str(back) else back) in result.stderr, \
            result.stderr
    result = dccfs("umount", tmp_path / "empty")
    assert result.returncode == 1 and "is not a dccfs mount" in result.stderr, result


def test_an_unknown_fuse_option_is_named(tmp_path):
    """libfuse's reason went to the daemon's /dev/null: only "fuse_session_new() failed" (review F). The
    daemon also started loading its codec kernels before the mount failed, and its exit waited for them
    before the reason reached the terminal: the kernels load only once the mount is up."""
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    log = tmp_path / "daemon.log"
    result = dccfs("mount", "-o", "bogus", "--log", log, tmp_path / "b", tmp_path / "m")
    if os.path.ismount(tmp_path / "m"):
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "m")], timeout=30)
    assert result.returncode == 1 and "unknown option" in result.stderr and "bogus" in result.stderr, result
    assert "warm-up" not in log.read_text(), log.read_text()


@pytest.mark.mount
def test_a_mount_whose_daemon_died_is_named_and_umount_clears_it(make_mount):
    """After kill -9 of the daemon (an OOM kill), `dccfs mount` said the mountpoint did not exist,
    `dccfs stats` the same, and `dccfs umount` failed with a traceback (ENOTCONN): only a
    fusermount3 by hand got the mountpoint back (review F)."""
    mount = make_mount("d")
    (mount.mnt / "kept").write_bytes(b"committed at close" * 1000)
    os.kill(mount.pid, signal.SIGKILL)  # our own daemon
    mount.proc.wait()
    mount.proc = None
    again = dccfs("mount", mount.backing, mount.mnt)
    assert again.returncode == 1 and "already a mount point" in again.stderr, again
    stats = dccfs("stats", mount.mnt)
    assert stats.returncode == 1 and "cannot reach the daemon" in stats.stderr, stats
    umount = dccfs("umount", mount.mnt)
    assert umount.returncode == 0, umount.stderr
    assert not os.path.ismount(mount.mnt)
    mount.start()
    assert (mount.mnt / "kept").read_bytes() == b"committed at close" * 1000


@pytest.mark.mount
def test_the_log_made_again_after_a_rotation_is_not_world_writable(make_mount, tmp_path):
    """The daemon runs with umask 0; the log file its handler made again after logrotate moved
    it (and a SIGHUP) was 0666 (review F)."""
    log = tmp_path / "daemon.log"
    mount = make_mount("l", "--log", str(log))
    os.rename(log, tmp_path / "daemon.log.1")
    os.kill(mount.pid, signal.SIGHUP)
    dccfs("stats", mount.mnt)  # a logged event after the signal
    (mount.mnt / "f").write_bytes(b"x")
    mount.stop()
    assert log.exists()
    assert stat.S_IMODE(log.stat().st_mode) == 0o644, oct(log.stat().st_mode)


@pytest.mark.mount
def test_stats_files_names_a_missing_or_outside_path(mounted, tmp_path):
    """`stats --files` of a path that does not exist printed an empty table with exit 0, and one
    outside the mount was named by its computed relative path (../..), not as typed (review F)."""
    (mounted.mnt / "d").mkdir()
    long_name = "checkpoint-" + "0123456789" * 9 + ".safetensors"  # a table cut to 80 columns cuts it
    (mounted.mnt / "d" / long_name).write_bytes(os.urandom(5000))
    missing = dccfs("stats", "--files", "nonexist", mounted.mnt)
    assert missing.returncode == 1 and "nonexist: no such file or directory" in missing.stderr, missing
    outside = dccfs("stats", "--files", str(tmp_path), mounted.mnt)
    assert outside.returncode == 1 and f"{tmp_path} is outside the mount" in outside.stderr, outside
    wide = dccfs("stats", "--files", "d", mounted.mnt)
    assert wide.returncode == 0 and f"d/{long_name}" in wide.stdout, wide.stdout


@pytest.mark.mount
def test_a_plain_umount_of_a_stopped_daemon_fails_at_once_and_keeps_the_mount(make_mount):
    """A plain `dccfs umount` (and stats) of a daemon that no longer answers used to stat the
    mountpoint and hang with it, beyond Ctrl-C. Now each says so within its wait, names --lazy, and
    unmounts nothing; once the daemon resumes, a plain umount commits and ends it."""
    from dccfs.mountinfo import read_mountinfo

    mount = make_mount("p")
    (mount.mnt / "f").write_bytes(b"kept")
    link = mount.mnt.parent / "link-to-mnt"
    link.symlink_to(mount.mnt)  # a realpath of it lstats the mount's root (review J)
    time.sleep(1.5)  # past the kernel's attribute cache of the mount's root: a stat now asks the daemon
    os.kill(mount.pid, signal.SIGSTOP)  # our own daemon
    try:
        clients = [subprocess.Popen([sys.executable, "-m", "dccfs.cli", cmd, path],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for cmd, path in (("umount", str(mount.mnt)), ("stats", str(mount.mnt)), ("stats", str(link)))]
        try:
            results = [(c.communicate(timeout=60), c.returncode) for c in clients]
        finally:
            for c in clients:
                if c.poll() is None:
                    c.kill()  # hung in the kernel: SIGKILL still ends it
                    c.wait()
        still_mounted = any(e.mountpoint == str(mount.mnt) for e in read_mountinfo())
    finally:
        os.kill(mount.pid, signal.SIGCONT)
    (_, umount_err), umount_rc = results[0]
    assert umount_rc == 1 and "has not answered" in umount_err and "nothing was unmounted" in umount_err \
        and f"dccfs umount --lazy {mount.mnt}" in umount_err, umount_err
    for (_, stats_err), stats_rc in results[1:]:
        assert stats_rc == 1 and "has not answered" in stats_err, stats_err
    assert still_mounted
    assert (mount.mnt / "f").read_bytes() == b"kept"
    done = dccfs("umount", str(mount.mnt))
    assert done.returncode == 0, done.stderr
    mount.proc.wait(60)
    mount.proc = None


@pytest.mark.mount
def test_stats_and_umount_of_a_bind_mount_of_a_dccfs_mount(make_mount):
    """A bind mount of a dccfs mount (a container's volume) has its own path, which names no control
    socket: stats said the daemon may have died, and umount of the bind waited 120 s for the daemon,
    which goes on serving the original path (review J)."""
    from dccfs.mountinfo import read_mountinfo

    mount = make_mount("b")
    (mount.mnt / "f").write_bytes(b"kept")
    binds = [mount.mnt.parent / "b-bind", mount.mnt.parent / "b-bind2"]
    try:
        binds[0].mkdir()
        subprocess.run(["mount", "--bind", str(mount.mnt), str(binds[0])], check=True)
        stats = dccfs("stats", "--json", binds[0])
        assert stats.returncode == 0, stats.stderr
        done = dccfs("umount", binds[0])
        assert done.returncode == 0, done.stderr  # was 1 after 120 s: "still flushing"
        assert mount.proc.poll() is None and (mount.mnt / "f").read_bytes() == b"kept"
        # The original path goes first: the daemon serves the bind on, and its socket's device
        # name still leads to it (the name of the original path is gone).
        binds[1].mkdir()
        subprocess.run(["mount", "--bind", str(mount.mnt), str(binds[1])], check=True)
        done = dccfs("umount", mount.mnt)
        assert done.returncode == 0, done.stderr
        (binds[1] / "g").write_bytes(b"through the bind")
        stats = dccfs("stats", "--json", binds[1])
        assert stats.returncode == 0, stats.stderr  # was "cannot reach the daemon"
        done = dccfs("umount", binds[1])  # the last path: the daemon commits and exits
        assert done.returncode == 0, done.stderr
        mount.proc.wait(60)
        mount.proc = None
    finally:
        for bind in binds:
            if any(e.mountpoint == str(bind) for e in read_mountinfo()):
                subprocess.run(["umount", "-l", str(bind)])
    mount.start()
    assert (mount.mnt / "f").read_bytes() == b"kept" and (mount.mnt / "g").read_bytes() == b"through the bind"


@pytest.mark.mount
def test_a_lazy_umount_detaches_a_mount_whose_daemon_hangs(make_mount):
    """`dccfs umount --lazy` is the way out of a daemon that no longer answers (stopped here with
    SIGSTOP): it used to stat the mountpoint first (realpath, then the control socket's owner)
    and hung with the daemon. Once detached it says that the daemon is stopped; it waited 120 s
    for it before (review K)."""
    from dccfs.mountinfo import read_mountinfo

    mount = make_mount("h")
    (mount.mnt / "f").write_bytes(b"kept")
    time.sleep(1.5)  # past the kernel's attribute cache of the mount's root: a stat now asks the daemon
    os.kill(mount.pid, signal.SIGSTOP)  # our own daemon
    umount = subprocess.Popen([sys.executable, "-m", "dccfs.cli", "umount", "--lazy", str(mount.mnt)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = umount.communicate(timeout=60)
        detached = not any(e.mountpoint == str(mount.mnt) for e in read_mountinfo())
    finally:
        if umount.poll() is None:
            umount.kill()
            umount.wait()
        os.kill(mount.pid, signal.SIGCONT)  # it sees the unmount and exits
    assert detached, "the lazy umount did not detach the mount of a stopped daemon"
    assert umount.returncode == 1 and f"daemon pid {mount.pid} is stopped" in stderr \
        and f"kill -CONT {mount.pid}" in stderr, stderr
    mount.proc.wait(60)
    mount.proc = None
    mount.start()
    assert (mount.mnt / "f").read_bytes() == b"kept"


def test_a_late_release_reply_is_logged_at_info():
    """pyfuse3's ERROR for a RELEASE or RELEASEDIR reply the kernel no longer waits for (an unmount
    right after a close) is kept at INFO: nothing is lost, and a RELEASEDIR's failed the suite once."""
    import logging

    from dccfs.mount import LateReleaseReplyFilter
    late = LateReleaseReplyFilter()
    for op, level in (("release", "INFO"), ("releasedir", "INFO"), ("read", "ERROR")):
        record = logging.LogRecord("pyfuse3", logging.ERROR, __file__, 0, "fuse_%s(): fuse_reply_* failed with %s",
                                   (op, "No such file or directory"), None)
        assert late.filter(record)
        assert record.levelname == level, op
