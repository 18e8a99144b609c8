"""Linux *at() calls that the os module lacks: descriptor-relative chown, link and renameat2."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def _check(result: int, what: str, name: bytes | str = b"") -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", os.fsdecode(name) or None)


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the object an O_PATH descriptor refers to (a symlink itself, not its target)."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def link_fd(fd: int, new_dir_fd: int, new_name: bytes) -> None:
    """Hard-link the object behind an O_PATH descriptor as new_dir_fd/new_name."""
    _check(_libc.linkat(fd, b"", new_dir_fd, new_name, AT_EMPTY_PATH), "linkat", new_name)


def rename_at(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes, flags: int) -> None:
    _check(_libc.renameat2(old_dir_fd, old_name, new_dir_fd, new_name, flags), "renameat2", new_name)


def fsync_dir(path: str) -> None:
    """Make the directory's entries (a create, rename or unlink in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
