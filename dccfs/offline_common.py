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
from dccfs.mount import LOCK_FILE, STATE_DIR

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
    """Whether parent/name is dccfs's own state directory, recognised by what dccfs keeps in
    it (tmp/, bases/, the mount lock). The mount reserves the name .dccfs only at its root:
    a directory of that name made through the mount deeper in the tree is user data."""
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


def find_backing_root(path: str) -> str | None:
    """The nearest directory at or above path that holds .dccfs/tmp, or None."""
    current = os.path.abspath(path)
    if not os.path.isdir(current):
        current = os.path.dirname(current)
    while True:
        if os.path.isdir(os.path.join(current, STATE_DIR, TMP_SUBDIR)):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def inside_state_dir(path: str, backing_root: str | None) -> bool:
    if backing_root is None:
        return False
    rel = os.path.relpath(os.path.abspath(path), backing_root)
    return rel.split(os.sep)[0] == STATE_DIR


@contextlib.contextmanager
def offline_lock(backing_root: str | None, required: bool) -> Iterator[bool]:
    """Hold the mount lock so no dccfs daemon mounts the backing dir meanwhile.

    Yields whether it is held. When a daemon holds it: OfflineError if required, else
    a warning and False (a report-only fsck can still run, with moving files).
    """
    if backing_root is None or not os.path.isdir(os.path.join(backing_root, STATE_DIR)):
        yield False  # never mounted: there is no daemon to exclude
        return
    lock_path = os.path.join(backing_root, STATE_DIR, LOCK_FILE)
    try:
        create = os.O_CREAT if required else 0
        fd = os.open(lock_path, os.O_RDWR | create | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if required and exc.errno not in (errno.EROFS, errno.EACCES):
            raise OfflineError(f"{lock_path}: cannot open the mount lock: {exc.strerror}") from exc
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = (f"{backing_root} is mounted by a dccfs daemon (it holds {lock_path}); "
                       "unmount it first")
            if required:
                raise OfflineError(message) from None
            log.warning("%s: results may change under a live mount", message)
            yield False
            return
        yield True
    finally:
        os.close(fd)


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
