"""How bench_cache drives dccfs: which source tree the daemon runs, stats and tune, and guards against a hung mount."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_common import REPO, Daemon

log = logging.getLogger(__name__)

MOUNT_GUARD_S = 90  # a daemon that has not answered FUSE INIT by then is hung, not slow

# Where the daemon and the CLI import dccfs from: None = this checkout (python -m dccfs.cli), or a
# directory holding a `git archive` of one revision (--dccfs-rev), put first on sys.path.
DCCFS_SRC: Path | None = None
_BOOT = "import sys; sys.path.insert(0, {src!r}); sys.argv[0] = 'dccfs'; from dccfs.cli import main; main()"


def use_dccfs_from(src: Path | None) -> None:
    """Run the daemon and the CLI from src (a `git archive` made by export_rev), or from this checkout if None."""
    global DCCFS_SRC
    DCCFS_SRC = src


def dccfs_cmd(*args: str) -> list[str]:
    if DCCFS_SRC is None:
        return [sys.executable, "-m", "dccfs.cli", *args]
    return [sys.executable, "-c", _BOOT.format(src=str(DCCFS_SRC)), *args]


def export_rev(rev: str, dest: Path) -> Path:
    """`git archive REV` of the package directories into dest, laid out as an importable `dccfs`."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True,
                         cwd=str(REPO), check=True).stdout.strip()
    out = dest / sha[:12]
    if not (out / "dccfs" / "cli.py").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha, "dccfs", "codecs", "policies"], capture_output=True,
                                 cwd=str(REPO), check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        # pyproject maps dccfs.codecs -> codecs/ and dccfs.policies -> policies/.
        (out / "dccfs" / "codecs").symlink_to("../codecs")
        (out / "dccfs" / "policies").symlink_to("../policies")
    return out


def dccfs_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(dccfs_cmd(*args), capture_output=True, text=True, cwd=str(REPO), timeout=timeout)


def stats(mnt: Path) -> dict:
    """`dccfs stats --json MNT`, reduced to the counters this benchmark uses."""
    result = dccfs_cli("stats", "--json", str(mnt))
    if result.returncode != 0:
        raise RuntimeError(f"dccfs stats failed: {result.stderr.strip()}")
    reply = json.loads(result.stdout)
    t0, t2 = reply["stats"]["tiers"]["t0"], reply["stats"]["tiers"]["t2"]
    return {"t0_hits": t0["hits"], "t0_misses": t0["misses"], "t0_resident": t0["resident_bytes"],
            "t0_admissions": t0["admissions"], "t0_refused": t0["refused"], "t0_evictions": t0["evictions"],
            "decodes": t2["misses"], "readahead": reply["stats"].get("readahead_chunks", 0),
            "policy": reply["cache"]["policy"], "t0_bytes": reply["cache"]["t0_bytes"]}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if isinstance(after[k], int) and k in before
            and k not in ("t0_resident", "t0_bytes")}


def settled_stats(mnt: Path, tries: int = 6) -> dict:
    """Stats once background read-ahead has stopped decoding (two snapshots with equal decode counts)."""
    prev = stats(mnt)
    for _ in range(tries):
        time.sleep(0.1)
        cur = stats(mnt)
        if cur["decodes"] == prev["decodes"] and cur["t0_admissions"] == prev["t0_admissions"]:
            return cur
        prev = cur
    return prev


def tune(mnt: Path, **settings) -> dict:
    result = dccfs_cli("tune", str(mnt), *[f"{k}={v}" for k, v in settings.items()])
    if result.returncode != 0:
        raise RuntimeError(f"dccfs tune {settings} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


class Watchdog(threading.Thread):
    """Kills the daemon this tool started (by PID) if the run outlives its deadline, so that a hung mount
    turns into ENOTCONN errors and the `finally` clean-up runs instead of blocking forever."""

    def __init__(self, daemon: Daemon, seconds: float):
        super().__init__(daemon=True)
        self.target, self.seconds, self.stopped = daemon, seconds, threading.Event()
        self.fired = False

    def run(self) -> None:
        if self.stopped.wait(self.seconds):
            return
        proc = self.target.proc
        if proc is not None and proc.poll() is None:
            self.fired = True
            log.error("deadline of %.0f s passed: killing dccfs pid %d (hung?)", self.seconds, proc.pid)
            proc.kill()

    def cancel(self) -> None:
        self.stopped.set()


def guarded_start(daemon: Daemon, remount: bool = False) -> None:
    """daemon.start()/remount(), killing our daemon if the mount does not come up (answer INIT) in time."""
    def kill():
        proc = daemon.proc
        if proc is not None and proc.poll() is None:
            log.error("dccfs pid %d did not answer on its mount within %d s; killing it", proc.pid, MOUNT_GUARD_S)
            proc.kill()
    timer = threading.Timer(MOUNT_GUARD_S, kill)
    timer.daemon = True
    timer.start()
    try:
        daemon.remount() if remount else daemon.start()
        os.stat(daemon.mnt)  # the mount answers
    finally:
        timer.cancel()
