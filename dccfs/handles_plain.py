"""Plain backing files (not containers): their raw handles, when a writable open makes one a container,
and the --shared lock a node's writers of one share."""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import trio

from dccfs.inodes import Inode

if TYPE_CHECKING:
    from dccfs.handle import Handle

ACCESS = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


def writable(flags: int) -> bool:
    return (flags & ACCESS) in (os.O_WRONLY, os.O_RDWR)


class RawFile:
    """A backing file that is not a container: bytes pass through unchanged."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path
        self.shares_node_lock = False  # a --shared writer: holds its inode's "raw_lock" (HandleTable)

    async def read(self, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, length, offset)

    async def write(self, offset: int, data: bytes) -> int:
        return await trio.to_thread.run_sync(os.pwrite, self.fd, data, offset)

    async def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    async def commit(self, durable: bool) -> None:
        if durable:
            await trio.to_thread.run_sync(os.fsync, self.fd)


class PlainFiles:
    """HandleTable's plain files (a mixin: uses its engine, _handles and _add)."""

    def _raw_handle(self, inode: Inode, flags: int, relpath: str, lock_fd: int | None = None) -> Handle:
        """A handle on a plain file. lock_fd (--shared: a descriptor that holds the lock) becomes the
        node's lock on the file, which its local writers share until the last one closes."""
        # O_APPEND stays (it is only still set without the writeback cache): the backing
        # file's own end, not the kernel's idea of it, which another --shared node may have
        # moved (found by review: an append through one node overwrote the other's).
        raw_flags = (flags & ACCESS) | (flags & os.O_TRUNC) | (flags & os.O_APPEND)
        raw = RawFile(self._open_backing(inode, raw_flags, read_only_ok=not writable(flags)), relpath)
        if lock_fd is not None:
            inode.extra["raw_lock"] = [lock_fd, 0]
        if "raw_lock" in inode.extra and writable(flags):
            inode.extra["raw_lock"][1] += 1
            raw.shares_node_lock = True
        return self._add(inode, raw, flags)

    def _release_raw(self, inode: Inode, raw: RawFile) -> None:
        os.close(raw.fd)
        lock = inode.extra.get("raw_lock")
        if raw.shares_node_lock and lock is not None:
            lock[1] -= 1
            if lock[1] == 0:
                del inode.extra["raw_lock"]
                os.close(lock[0])  # releases the node's lock

    def _converts(self, inode: Inode, fd: int, flags: int) -> bool:
        """Whether a writable open of this plain file stores it as a container from now on: when it
        truncates it, or it is empty, and no handle of this mount has it open as plain bytes (their
        writes would land in the container's records, their reads return them: found by review).
        Never with --shared: another node may hold the file open, unseen, empty or not (found by review:
        a log emptied on one node and appended to lost the other node's appends)."""
        if self.engine.config.shared or not writable(flags) \
                or any(h.inode is inode for h in self._handles.values()):
            return False
        return bool(flags & os.O_TRUNC) or os.fstat(fd).st_size == 0

    @staticmethod
    def _open_backing(inode: Inode, flags: int, read_only_ok: bool = True) -> int:
        flags |= os.O_CLOEXEC
        try:
            return os.open(inode.proc_path, flags)
        except OSError as exc:
            # A read-only backing store still serves reads, unless the caller must write.
            if read_only_ok and (flags & ACCESS) == os.O_RDWR \
                    and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return os.open(inode.proc_path, (flags & ~ACCESS) | os.O_RDONLY)
            raise
