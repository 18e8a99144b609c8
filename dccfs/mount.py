"""Mounting and unmounting: precise preflight checks, daemonising, the trio main loop, clean stop."""
from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import resource
import shutil
import signal
import sys
from dataclasses import dataclass

from dccfs.config import Config
from dccfs.mountinfo import find_mount
from dccfs.own_files import STATE_DIR, is_within, own_file_problem  # noqa: F401 (STATE_DIR: for others)

log = logging.getLogger(__name__)

PID_FILE = "daemon.pid"
LOCK_FILE = "mount.lock"
DEFAULT_LOG = "dccfs.log"
# Options dccfs sets itself; -o may add allow_other and others.
BASE_FUSE_OPTIONS = ("default_permissions",)


class MountError(Exception):
    """A mount or unmount that cannot proceed; the message says why and what to do."""


@dataclass
class MountRequest:
    backing: str
    mountpoint: str
    config: Config
    fuse_options: tuple[str, ...] = ()
    foreground: bool = False
    log_file: str | None = None
    debug: bool = False
    metrics: str | None = None
    trace: str | None = None


def preflight(req: MountRequest) -> None:
    if not os.path.isdir(req.backing):
        what = "does not exist" if not os.path.exists(req.backing) else "is not a directory"
        raise MountError(f"backing directory {req.backing} {what}")
    # Before any stat of the mountpoint: a mount whose daemon died answers ENOTCONN, and one
    # whose daemon hangs blocks the stat.
    if find_mount(req.mountpoint) is not None:
        raise MountError(f"{req.mountpoint} is already a mount point; unmount it first "
                         f"(dccfs umount {req.mountpoint}; a mount whose daemon died too)")
    try:
        if not os.path.isdir(req.mountpoint) and os.path.lexists(req.mountpoint):
            raise MountError(f"mountpoint {req.mountpoint} is not a directory")
        os.stat(req.mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {req.mountpoint} does not exist; create it with mkdir -p") from None
    except OSError as exc:
        raise MountError(f"mountpoint {req.mountpoint}: {exc.strerror}") from None
    if os.path.realpath(req.mountpoint) == os.path.realpath(req.backing):
        raise MountError("the mountpoint and the backing directory must differ")
    if is_within(req.mountpoint, req.backing):
        # The mount would show itself inside itself: a lookup of the mountpoint through the
        # mount waits for the daemon, which waits for that same lookup (found by review F).
        raise MountError(f"mountpoint {req.mountpoint} lies inside the backing directory {req.backing}; "
                         "use a mountpoint outside it")
    if is_within(req.backing, req.mountpoint):
        raise MountError(f"backing directory {req.backing} lies inside the mountpoint {req.mountpoint}; "
                         "the mount would hide it")
    if os.path.ismount(req.mountpoint):
        raise MountError(f"{req.mountpoint} is already a mount point; unmount it first "
                         f"(dccfs umount {req.mountpoint})")
    if os.listdir(req.mountpoint) and "nonempty" not in req.fuse_options:
        raise MountError(f"mountpoint {req.mountpoint} is not empty; its files would be hidden "
                         "(use an empty directory)")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) "
                         "or give the container --device /dev/fuse")
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is not installed (apt-get install fuse3)")
    if req.metrics:
        from dccfs.metrics import check_address
        try:
            check_address(req.metrics)
        except ValueError as exc:
            raise MountError(str(exc)) from None


def state_dir(backing: str) -> str:
    """BACKING/.dccfs, made (with its tmp/) if missing."""
    path = os.path.join(backing, STATE_DIR)
    try:
        os.makedirs(os.path.join(path, "tmp"), mode=0o700, exist_ok=True)
    except OSError as exc:
        raise MountError(f"cannot create the state directory {path}: {exc.strerror} (the "
                         "backing directory must be writable: dccfs stores every file there "
                         "and keeps its lock, log and temporary files under .dccfs)") from exc
    return path


def take_mount_lock(backing: str, shared: bool) -> int:
    """One exclusive daemon per backing directory, unless every mount of it says --shared."""
    path = os.path.join(state_dir(backing), LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MountError(f"cannot open the mount lock {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"{backing} is already mounted by another dccfs daemon (mount it with "
                         "--shared on every node to share it), or a pack, unpack or fsck --repair of it "
                         f"is running: {path} is held") from None
    return fd


class LateReleaseReplyFilter(logging.Filter):
    """pyfuse3 logs an ERROR when it cannot answer a RELEASE or RELEASEDIR because the
    kernel already tore the connection down (an unmount right after a close; a
    RELEASEDIR so failed the suite once, 2026-12-07). Nothing is lost: a file was
    committed at its FLUSH, and a directory handle holds nothing. Keep the line, at INFO."""

    LATE = ("fuse_release(): fuse_reply_", "fuse_releasedir(): fuse_reply_")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pyfuse3" and record.getMessage().startswith(self.LATE):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class RefusedInvalidationFilter(logging.Filter):
    """pyfuse3 logs an ERROR with a traceback for each entry invalidation the kernel refuses,
    as it does (EINVAL) for those still queued when the unmount starts: dccfs.inodes queues
    hundreds at once when it gives descriptors back. An invalidation only lets the kernel
    forget an entry sooner; nothing waits on it. The first is kept at INFO, the rest dropped."""

    PREFIX = "Failed to submit invalidate_entry"

    def __init__(self):
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "pyfuse3" or not record.getMessage().startswith(self.PREFIX):
            return True
        self.seen += 1
        if self.seen > 1:
            return False
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = f"{record.getMessage()} ({record.exc_info[1] if record.exc_info else ''}; " \
                                  "later refusals are not logged)", None
        record.exc_info = record.exc_text = None
        return True


class LogFileHandler(logging.handlers.WatchedFileHandler):
    """Reopens the log after logrotate moves it (SIGHUP also reopens), making it 0644 whatever
    the umask: the daemon runs with umask 0 (the kernel applies the caller's umask to the files
    made through the mount), and a log made again after a rotation was world-writable (found
    by review F)."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def setup_logging(log_file: str | None, debug: bool) -> logging.Handler:
    level = logging.DEBUG if debug else logging.INFO
    if log_file:
        handler: logging.Handler = LogFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(LateReleaseReplyFilter())
    handler.addFilter(RefusedInvalidationFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return handler


def raise_fd_limit() -> None:
    """As high as this process may: every inode the kernel knows holds one O_PATH descriptor
    (dccfs.inodes asks the kernel to forget some past half the limit, but one directory
    listing takes hundreds at once). Root may go past the hard limit, up to fs.nr_open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = hard
    if hard != resource.RLIM_INFINITY and hard < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            return
        except (ValueError, OSError):
            pass  # not privileged
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def daemonize(ready_fd_holder: list) -> None:
    """Fork twice; the original process waits on a pipe for 'mounted' or an error message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        os.waitpid(pid, 0)
        if message.startswith("ok"):
            os._exit(0)
        sys.stderr.write(f"dccfs: {message or 'the daemon exited before mounting; see its log'}\n")
        os._exit(1)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    ready_fd_holder.append(write_end)


def tell_parent(holder: list, message: str) -> None:
    if holder:
        fd = holder.pop()
        os.write(fd, message.encode())
        os.close(fd)


def run_mount(req: MountRequest) -> int:
    preflight(req)
    backing = os.path.realpath(req.backing)
    mountpoint = os.path.realpath(req.mountpoint)
    lock_fd = take_mount_lock(backing, req.config.shared)
    # The daemon works from /: paths the user gave relative to their directory are
    # resolved now, before it forks (the fsname, which `dccfs umount` reads, included).
    req.backing = backing
    log_file = os.path.abspath(req.log_file) if req.log_file else None
    if req.trace:
        req.trace = os.path.abspath(req.trace)
    if not req.foreground and log_file is None:
        log_file = os.path.join(state_dir(backing), DEFAULT_LOG)
    for what, path in (("log file", log_file), ("trace file", req.trace)):
        problem = path and own_file_problem(what, path, backing, mountpoint, state_ok=what == "log file")
        if problem:
            os.close(lock_fd)
            raise MountError(problem)
    for what, path in (("log file", log_file), ("trace file", req.trace)):
        # Checked here, where the error still reaches the terminal: a daemon has no log yet.
        # (O_NONBLOCK: a FIFO without a reader fails instead of blocking the mount command)
        try:
            if path is not None:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC,
                                 0o644))
        except OSError as exc:
            os.close(lock_fd)
            raise MountError(f"cannot write the {what} {path}: {exc.strerror}") from exc
    holder: list = []
    if not req.foreground:
        daemonize(holder)
    handler = setup_logging(log_file, req.debug)
    try:
        from dccfs.daemon import serve
        if not req.config.shared:
            from dccfs.compaction import clean_stale_temporaries
            clean_stale_temporaries(os.path.join(state_dir(backing), "tmp"))
        os.umask(0)  # the kernel already applied the caller's umask to every mode we get
        raise_fd_limit()
        pid_fd = os.open(os.path.join(state_dir(backing), PID_FILE),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.fchmod(pid_fd, 0o644)  # one an earlier version left writable by everyone
        with os.fdopen(pid_fd, "w") as f:
            f.write(f"{os.getpid()}\n")

        def on_mounted():
            log.info("mounted %s on %s (pid %d)", backing, mountpoint, os.getpid())
            tell_parent(holder, "ok")

        def reopen_log(*_):
            if isinstance(handler, logging.FileHandler):
                handler.close()  # the next record reopens the file
        signal.signal(signal.SIGHUP, reopen_log)
        serve(backing, mountpoint, req, on_mounted)
    except MountError as exc:
        log.error("%s", exc)
        tell_parent(holder, str(exc))
        return 1
    except Exception as exc:
        log.exception("mount failed")
        tell_parent(holder, f"mount failed: {exc}")
        return 1
    finally:
        os.close(lock_fd)
    log.info("unmounted %s", mountpoint)
    return 0
