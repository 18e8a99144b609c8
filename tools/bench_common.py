"""Shared helpers for the filesystem benchmarks: owned FUSE daemons, page-cache drops, du, machine facts."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dccfs.mountinfo import read_mountinfo as mountinfo  # a MountEntry per mount

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
MB = 10**6
MOUNT_WAIT_S = 30
UNMOUNT_WAIT_S = 180  # dccfs commits every open file before it exits


def is_mounted(path: str | Path) -> bool:
    target = os.path.realpath(path)
    return any(m[0] == target for m in mountinfo())


def fs_of(path: str | Path) -> tuple[str, str, str]:
    """(mountpoint, fstype, source) of the filesystem holding path (longest mountpoint prefix)."""
    target = os.path.realpath(path)
    best = ("/", "?", "?")
    for entry in mountinfo():
        mnt, fstype, source = entry.mountpoint, entry.fstype, entry.source
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, fstype, source)
    return best


def fusermount_unmount(path: str | Path, tries: int = 10) -> None:
    """fusermount3 -u (retried while busy), then a lazy unmount as the last resort."""
    for _ in range(tries):
        if not is_mounted(path):
            return
        result = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, text=True)
        if result.returncode == 0:
            return
        log.debug("fusermount3 -u %s: %s", path, result.stderr.strip())
        time.sleep(0.3)
    if is_mounted(path):
        log.warning("lazy-unmounting %s", path)
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def read_vmhwm(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process in bytes, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Daemon:
    """One foreground FUSE daemon that this process started and owns, tracked by PID."""

    def __init__(self, name: str, cmd: list[str], mnt: Path, log_path: Path):
        self.name, self.cmd, self.mnt, self.log_path = name, cmd, mnt, log_path
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0  # max VmHWM over every process this object has started
        self.after_mount = None  # optional callable(mnt), e.g. to set read_ahead_kb

    def start(self) -> "Daemon":
        self.mnt.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is already mounted")
        with open(self.log_path, "ab") as logf:
            # A new session: Ctrl-C in the terminal reaches the benchmark only, which then
            # unmounts in order instead of racing the daemons' own signal handlers.
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=str(REPO))
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"{self.name} exited with {code} before mounting; log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not mount within {MOUNT_WAIT_S}s; log:\n{self.log_tail()}")
            time.sleep(0.02)
        if self.after_mount is not None:
            self.after_mount(self.mnt)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def sample_rss(self) -> None:
        if self.proc is not None:
            self.peak_rss = max(self.peak_rss, read_vmhwm(self.proc.pid) or 0)

    def stop(self) -> None:
        """Record the peak RSS, unmount, wait for exit; SIGTERM then SIGKILL our own PID if it hangs."""
        self.sample_rss()
        fusermount_unmount(self.mnt)
        if self.proc is None:
            return
        try:
            self.proc.wait(UNMOUNT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not exit after unmount; sending SIGTERM", self.name, self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode not in (0, None):
            log.warning("%s exited with %s; log tail:\n%s", self.name, self.proc.returncode, self.log_tail())
        self.proc = None

    def remount(self) -> "Daemon":
        self.stop()
        return self.start()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def drop_caches() -> bool:
    """sync, then drop the page cache, dentries and inodes; False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def set_read_ahead_kb(mnt: str | Path, kb: int) -> int:
    """Set the read-ahead window of the FUSE mount's bdi (root only); returns the value read back."""
    st = os.stat(mnt)
    path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    with open(path, "w") as f:
        f.write(f"{kb}\n")
    with open(path) as f:
        return int(f.read())


def du(path: str | Path, skip: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """(allocated bytes = sum st_blocks*512, apparent bytes = sum st_size, regular files) under path."""
    blocks = apparent = files = 0
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            blocks += st.st_blocks * 512
            apparent += st.st_size
            files += 1
    return blocks, apparent, files


def wait_until_settled(backing: Path, size_of, settled_s: float = 3, timeout_s: float = 600) -> float:
    """Seconds until no pass after close runs in the dccfs mount of backing: no temporary copy in
    .dccfs/tmp, and size_of() unchanged for settled_s (a pass may or may not start)."""
    started = time.perf_counter()
    last, since = None, time.perf_counter()
    while time.perf_counter() - since < settled_s:
        busy = any(n.endswith(".compact") for n in os.listdir(Path(backing) / ".dccfs" / "tmp"))
        size = size_of()
        if busy or size != last:
            last, since = size, time.perf_counter()
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"{backing} did not settle within {timeout_s} s")
        time.sleep(0.1)
    return since - started


def machine_facts(path: str | Path) -> dict:
    facts: dict = {"nproc": os.cpu_count(), "kernel": os.uname().release, "python": sys.version.split()[0]}
    try:
        with open("/proc/meminfo") as f:
            facts["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    mnt, fstype, source = fs_of(path)
    facts.update(bench_fs_mount=mnt, bench_fs_type=fstype, bench_fs_source=source)
    dev = os.path.basename(source)
    rot = Path(f"/sys/block/{dev}/queue/rotational")
    if rot.exists():
        facts["bench_disk_rotational"] = rot.read_text().strip()
    usage = shutil.disk_usage(path)
    facts["bench_fs_free_gib"] = round(usage.free / 2**30, 1)
    for tool, args in (("fusermount3", ["-V"]),):
        try:
            facts[tool] = subprocess.run([tool, *args], capture_output=True, text=True).stdout.strip()
        except OSError:
            facts[tool] = None
    try:
        import pyfuse3
        facts["pyfuse3"] = pyfuse3.__version__
    except ImportError:
        pass
    return facts


def tree_state() -> str:
    """The commit the dccfs daemon ran from and how many files under dccfs/, codecs/ and
    policies/ differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=str(REPO)).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dccfs", "codecs", "policies"],
                               capture_output=True, text=True, cwd=str(REPO)).stdout.splitlines()
    except OSError:
        return "?"
    return f"{head} + {len(dirty)} uncommitted files under dccfs/ codecs/ policies/" if dirty else head
