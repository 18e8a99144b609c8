"""Test helper: start a real dccfs mount as a subprocess, remount it, kill it, always unmount it."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

MOUNT_WAIT_S = 30
UNMOUNT_WAIT_S = 60
# Lines the daemon may log in a healthy run are INFO/DEBUG; these mean a surprise.
SURPRISE_MARKERS = ("Traceback", " ERROR ", " CRITICAL ")


def is_mounted(path: str | Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def unmount(path: str | Path) -> None:
    """fusermount3 -u, then a lazy unmount as the fallback."""
    if not is_mounted(path):
        return
    if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Mount:
    """One dccfs daemon in the foreground, owned by the test that made it."""

    def __init__(self, backing: Path, mnt: Path, log_path: Path, args: tuple[str, ...] = ()):
        self.backing = backing
        self.mnt = mnt
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.expect_errors = False

    def start(self) -> "Mount":
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "dccfs.cli", "mount", "--foreground", *self.args,
               str(self.backing), str(self.mnt)]
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
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
            self.proc.wait(UNMOUNT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
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
        return [line for line in self.log_text().splitlines()
                if any(marker in line for marker in SURPRISE_MARKERS)]
