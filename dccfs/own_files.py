"""Where a mount may write its own log and trace files: never over what it stores, nor into itself."""
from __future__ import annotations

import os
import stat

from dccfs.format import HEADER_SIZE, looks_like_container

STATE_DIR = ".dccfs"


def own_file_problem(what: str, path: str, backing: str, mountpoint: str, state_ok: bool = False) -> str | None:
    """Why path cannot be this mount's log or trace file, or None. Inside the mountpoint its writes
    would wait on the daemon itself; inside the backing directory (also through a bind mount of it),
    or over any container, it would write over a stored file or dccfs's own state (found by review: a
    trace there emptied a container, which read back as zeros). state_ok: the log may go under
    BACKING/.dccfs, where it goes by default."""
    if is_within(path, mountpoint):
        return (f"the {what} {path} is inside the mountpoint {mountpoint}: it would be hidden under the "
                "mount, and its writes would wait on the daemon itself")
    if state_ok and is_within(path, os.path.join(backing, STATE_DIR)):
        return None
    if is_within(path, backing) or _below_by_inode(path, backing):
        return (f"the {what} {path} is inside the backing directory {backing}: it would write over "
                "the mount's stored files or dccfs's own state")
    if _is_container(path):
        return f"the {what} {path} is a dccfs container (a file some mount stores): it would be written over"
    return None


def is_within(path: str, directory: str) -> bool:
    """Whether path is directory or lies below it, symlinks resolved."""
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return real == top or real.startswith(top + os.sep)


def _below_by_inode(path: str, directory: str) -> bool:
    """Whether a directory above path is directory itself, compared by device and inode: a bind mount
    of it, or of a directory above it, passes is_within (found by review)."""
    try:
        top = os.stat(directory)
    except OSError:
        return False
    current = os.path.dirname(os.path.realpath(path))
    while True:
        try:
            st = os.stat(current)
            if (st.st_dev, st.st_ino) == (top.st_dev, top.st_ino):
                return True
        except OSError:
            pass  # not there (yet): the open will say so
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def _is_container(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and looks_like_container(os.pread(fd, HEADER_SIZE, 0))
    except OSError:
        return False
    finally:
        os.close(fd)
