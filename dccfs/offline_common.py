"""Shared pieces of the offline tools: errors, backing-dir walking, locking, temp names, progress."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dccfs.container import ChunkError, Container, pread_exact
from dccfs.format import HEADER_SIZE, MAGIC, looks_like_container
from dccfs.mount import LOCK_FILE, PID_FILE, STATE_DIR, MountError, state_dir

log = logging.getLogger(__name__)

TMP_SUBDIR = "tmp"
# Temp files of pack/unpack; the pid tells a live run's temp from one left by a killed run.
TEMP_PREFIX = ".dccfs-offline-"
TEMP_NAME = re.compile(r"^\.dccfs-offline-(\d+)-[A-Za-z0-9_]+\.tmp$")
COPY_BLOCK = 1 << 20


class OfflineError(Exception):
    """An offline operation that cannot proceed; the message names the path and the reason."""


@dataclass(frozen=True)
class FoundFile:
    path: str
    st: os.stat_result


def file_kind(fd: int) -> str:
    """'container', 'damaged-header' (starts with the magic but the header is invalid) or 'plain'.

    The mount reads both of the last two as plain files; fsck calls the second out.
    """
    head = pread_exact(fd, HEADER_SIZE, 0)
    if looks_like_container(head):
        return "container"
    if head.startswith(MAGIC):
        return "damaged-header"
    return "plain"


def chunk_byte_range(container: Container, chunk_index: int) -> tuple[int, int]:
    """The logical bytes [start, end) that one chunk holds, clipped to the logical size."""
    start = chunk_index * container.chunk_size
    return start, max(start, min(start + container.chunk_size, container.size))


def describe_range(start: int, end: int) -> str:
    return f"bytes {start}-{end - 1}" if end > start else f"bytes from {start}"


def chunk_count(container: Container) -> int:
    return -(-container.size // container.chunk_size)


def decoded_chunks(container: Container) -> Iterator[tuple[int, bytes | None, int]]:
    """(logical offset, verified raw bytes or None for a hole, logical length) for every chunk
    up to the logical size, in order; one chunk in memory at a time.

    Raw bytes are clipped to the logical length; a short chunk is followed by zeros.
    Raises OfflineError naming the file, the chunk and its byte range on damage.
    """
    for idx in range(chunk_count(container)):
        start, end = chunk_byte_range(container, idx)
        try:
            raw = container.read_chunk(idx)
        except ChunkError as exc:
            raise OfflineError(f"{container.path}: chunk {idx} ({describe_range(start, end)}) "
                               f"is damaged: {exc.reason}") from exc
        if raw is not None:
            raw = raw[:end - start]
        yield start, raw, end - start


def is_stale_temp(name: str) -> bool:
    """A temp file of ours whose process is gone (a run killed before it could remove it)."""
    m = TEMP_NAME.match(name)
    if not m:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_state_dir(parent: str, name: str) -> bool:
    """Whether parent/name is dccfs's state directory, recognised by what dccfs keeps in it (tmp/,
    bases/, the mount lock), wherever it is: the root's, or a backing directory's nested in the tree.
    The mount reserves the name .dccfs only at its root, so a user's directory of that name holding
    such entries deeper in the tree is taken for state too, and left alone: skipped, never changed."""
    if name != STATE_DIR:
        return False
    path = os.path.join(parent, name)
    return any(os.path.exists(os.path.join(path, entry)) for entry in (TMP_SUBDIR, "bases", LOCK_FILE))


def walk_files(root: str) -> Iterator[FoundFile]:
    """Every regular file under root (or root itself), skipping .dccfs state directories and
    temp files of pack/unpack. Symlinks are never followed."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISREG(st.st_mode) and not TEMP_NAME.match(os.path.basename(root)):
            yield FoundFile(root, st)
        return

    def report(exc: OSError) -> None:
        log.warning("%s: cannot list: %s", exc.filename, exc.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=report):
        dirnames[:] = sorted(d for d in dirnames if not is_state_dir(dirpath, d))
        for name in sorted(filenames):
            if TEMP_NAME.match(name):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield FoundFile(path, st)


def find_temps(root: str) -> Iterator[str]:
    """Temp files of pack/unpack under root (outside .dccfs)."""
    if not os.path.isdir(root):
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_state_dir(dirpath, d)]
        for name in filenames:
            if TEMP_NAME.match(name):
                yield os.path.join(dirpath, name)


def _directories_up(path: str) -> Iterator[str]:
    """path's directory (path itself if one) and every directory above it, symlinks resolved (found by
    review: a path through a symlink found no backing root, and the tools ran without its lock)."""
    current = os.path.realpath(path)
    if not os.path.isdir(current):
        current = os.path.dirname(current)
    while True:
        yield current
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def find_backing_root(path: str) -> str | None:
    """The nearest directory at or above path whose .dccfs holds tmp/, or None."""
    return next((d for d in _directories_up(path) if os.path.isdir(os.path.join(d, STATE_DIR, TMP_SUBDIR))), None)


def state_roots(path: str) -> list[str]:
    """Every directory whose .dccfs is state (is_state_dir) at or above path, and below it: the
    backing directories a run on path may touch. Each one's mount lock is taken (offline_lock), so
    that a user's .dccfs/tmp nearer than the backing root, or a backing directory nested inside the
    tree, cannot hide a live mount's lock (found by review: pack and fsck --repair then ran under it)."""
    above = list(_directories_up(path))
    roots = [d for d in above if is_state_dir(d, STATE_DIR)]
    top = above[0]
    if os.path.isdir(path):
        for dirpath, dirnames, _ in os.walk(top):
            for name in list(dirnames):
                if is_state_dir(dirpath, name):
                    dirnames.remove(name)
                    if dirpath != top:
                        roots.append(dirpath)
    return roots


def inside_state_dir(path: str) -> bool:
    """Whether path (symlinks resolved) lies in a state directory (is_state_dir), at any depth."""
    real = os.path.realpath(path)
    return any(os.path.basename(d) == STATE_DIR and is_state_dir(os.path.dirname(d), STATE_DIR)
               for d in [real, *_directories_up(real)] if os.path.dirname(d) != d)


@contextlib.contextmanager
def offline_lock(path: str, required: bool) -> Iterator[bool]:
    """Hold the mount lock of every backing directory a run on path may touch (state_roots), so that
    no dccfs daemon serves one meanwhile. A directory in none, which the run changes (required), is
    made a backing directory first, so that a mount started meanwhile waits (found by review: one
    mounted while pack replaced its files).

    Yields whether every lock is held. When a daemon holds one: OfflineError if required, else a
    warning and False (a report-only fsck can still run, with moving files).
    """
    roots = state_roots(path)
    if not roots and required and os.path.isdir(path):
        roots = [_make_state(os.path.realpath(path))]
    with contextlib.ExitStack() as held:
        every = True
        for root in roots:
            every = _lock_one(root, required, held) and every
        yield every


def _make_state(root: str) -> str:
    """root/.dccfs for an offline run; given to root's owner when made by root (found by review: the
    owner's own mount and pack then failed on the lock)."""
    try:
        path = state_dir(root)
        lock = os.path.join(path, LOCK_FILE)
        os.close(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        owner = os.stat(root)
        if os.geteuid() == 0 and owner.st_uid != 0:
            for made in (path, os.path.join(path, TMP_SUBDIR), lock):
                os.chown(made, owner.st_uid, owner.st_gid)
    except (MountError, OSError) as exc:
        raise OfflineError(str(exc)) from None
    return root


def _lock_one(root: str, required: bool, held: contextlib.ExitStack) -> bool:
    lock_path = os.path.join(root, STATE_DIR, LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | (os.O_CREAT if required else 0) | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.EROFS or not required:
            return False  # nothing there can change, or a report-only run
        raise OfflineError(f"{lock_path}: cannot open the mount lock: {exc.strerror} (run as the owner "
                           "of the backing directory, or as root)") from exc
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        message = _lock_holder(root, lock_path)
        if required:
            raise OfflineError(message) from None
        log.warning("%s: results may change under a live mount", message)
        return False
    return True


def _lock_holder(backing_root: str, lock_path: str) -> str:
    """Who holds the mount lock, as far as the pid file of the last mount can tell."""
    try:
        with open(os.path.join(backing_root, STATE_DIR, PID_FILE)) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            mounted = any(b"mount" in part for part in f.read().split(b"\0"))
    except (OSError, ValueError, IndexError):
        mounted = False
    if mounted:
        return f"{backing_root} is mounted by a dccfs daemon (it holds {lock_path}); unmount it first"
    return (f"{backing_root} is locked ({lock_path}) by a dccfs mount, or by another pack, unpack or "
            "fsck --repair of it: wait for it to end, or unmount it first")


@contextlib.contextmanager
def byte_progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar over bytes on a terminal; yields advance(n). A no-op off a TTY."""
    if not (enabled and sys.stdout.isatty()):
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def copy_plain(fd: int, out) -> None:
    """Stream a plain file's bytes to a binary stream."""
    offset = 0
    while True:
        block = os.pread(fd, COPY_BLOCK, offset)
        if not block:
            return
        out.write(block)
        offset += len(block)


def ratio(logical: int, stored: int) -> str:
    """stored / logical, the convention of every other dccfs figure (lower is better)."""
    return f"{stored / logical:.3f}" if logical else "-"
