"""Test helper: start a real dccfs mount as a subprocess, remount it, kill it, always unmount it; act on it as another uid."""
from __future__ import annotations

import errno
import logging
import os
import pickle
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from dccfs.mountinfo import read_mountinfo

log = logging.getLogger(__name__)

MOUNT_WAIT_S = 30
UNMOUNT_WAIT_S = 60
# Lines the daemon may log in a healthy run are INFO/DEBUG; these mean a surprise.
SURPRISE_MARKERS = ("Traceback", " ERROR ", " CRITICAL ")

A, B = 1001, 1002          # two unprivileged users, each with its own primary group


def is_mounted(path: str | Path) -> bool:
    # read_mountinfo undoes the kernel's escapes and takes any bytes: another mount's name that is
    # not UTF-8 (a reviewer's, running beside the suite) failed 38 tests here.
    target = os.path.realpath(path)
    return any(e.mountpoint == target for e in read_mountinfo())


def unmount(path: str | Path) -> None:
    """fusermount3 -u, then a lazy unmount as the fallback."""
    if not is_mounted(path):
        return
    if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Mount:
    """One dccfs daemon in the foreground, owned by the test that made it."""

    def __init__(self, backing: Path, mnt: Path, log_path: Path, args: tuple[str, ...] = (),
                 fd_limit: int | None = None, warm_up: bool = True):
        self.backing = backing
        self.mnt = mnt
        self.log_path = log_path
        self.args = args
        self.fd_limit = fd_limit  # the daemon's RLIMIT_NOFILE (soft and hard), if not inherited
        self.warm_up = warm_up
        self.proc: subprocess.Popen | None = None
        self.expect_errors = False
        # Exit statuses of the daemons stop() saw end: a daemon that crashed after a clean unmount
        # (SIGSEGV in LLVM, a warm-up thread still loading kernels) lost nothing, but is a bug.
        self.exit_codes: list[int] = []
        self.hung_exits = 0  # daemons killed because they had not exited UNMOUNT_WAIT_S after the unmount

    def start(self) -> "Mount":
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "dccfs.cli", "mount", "--foreground",
               *(() if self.warm_up else ("--no-warm-up",)), *self.args, str(self.backing), str(self.mnt)]
        logf = open(self.log_path, "ab")
        limit = self.fd_limit
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                     preexec_fn=None if limit is None else
                                     lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
        logf.close()
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"dccfs exited with {self.proc.returncode} before mounting:\n"
                                   f"{self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"dccfs did not mount within {MOUNT_WAIT_S}s:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Unmount and wait for the daemon to exit; kill it by PID only as a last resort."""
        unmount(self.mnt)
        if self.proc is None:
            return
        try:
            self.exit_codes.append(self.proc.wait(UNMOUNT_WAIT_S))
        except subprocess.TimeoutExpired:
            self.hung_exits += 1
            self.proc.kill()
            self.proc.wait()
            # A daemon that mounted only after the unmount above (a test stopped by its timeout while it
            # waited for the mount) leaves a dead mount behind once killed (found with make stress).
            unmount(self.mnt)
        self.proc = None

    def kill(self) -> None:
        """kill -9 the daemon (a crash), then clear the dead mount."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        unmount(self.mnt)

    def remount(self) -> "Mount":
        self.stop()
        return self.start()

    def surprises(self) -> list[str]:
        if self.expect_errors:
            return []
        return [f"a daemon exited with status {code}" for code in self.exit_codes if code != 0] + \
            [f"a daemon had not exited {UNMOUNT_WAIT_S} s after its unmount (killed)"] * self.hung_exits + \
            [line for line in self.log_text().splitlines() if any(marker in line for marker in SURPRISE_MARKERS)]


def as_user(cwd, uid, fn, gid=None, groups=(), umask=0o022):
    """Run fn() in a child as uid (gid defaults to uid) with cwd set; return its result or
    the errno (as ('errno', n)) it raised.

    The child first changes into cwd, a directory of the mount, as root (pytest's temporary
    directories are 0700, so other uids could not walk to the mount), then drops to the
    uid/gid and runs fn, which uses relative paths. It reports its result, or the errno it
    got, through a pipe."""
    gid = uid if gid is None else gid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
            try:
                out = ("ok", fn())
            except OSError as exc:
                out = ("errno", exc.errno)
            os.write(w, pickle.dumps(out))
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            try:
                os.write(w, pickle.dumps(("crash", repr(exc))))
            except BaseException:  # noqa: BLE001
                status = 1
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "crash":
        raise AssertionError(f"child crashed: {value}")
    return ("errno", value) if kind == "errno" else value


def err(name):
    return ("errno", getattr(errno, name))


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)
