"""The inode table: each FUSE inode holds an O_PATH descriptor of its backing object.

Holding a descriptor rather than a path keeps every inode valid across renames of
it or of any directory above it, and lets every operation use the *at() calls
relative to a directory descriptor, so paths longer than PATH_MAX work.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ROOT_INODE = 1


@dataclass
class Inode:
    number: int
    fd: int  # O_PATH | O_NOFOLLOW descriptor of the backing object
    key: tuple[int, int]  # backing (st_dev, st_ino)
    mode: int
    lookups: int = 0
    opens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def proc_path(self) -> str:
        """A path that resolves to the object itself; for calls that take no descriptor."""
        return f"/proc/self/fd/{self.fd}"

    def backing_path(self) -> str | None:
        """The object's current path in the backing file system (renames included), None if gone."""
        try:
            return os.readlink(self.proc_path)
        except OSError:
            return None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


class InodeTable:
    """Maps FUSE inode numbers to backing objects, counting kernel lookups."""

    def __init__(self, root_fd: int):
        st = os.fstat(root_fd)
        root = Inode(ROOT_INODE, root_fd, (st.st_dev, st.st_ino), st.st_mode, lookups=1)
        self._by_number: dict[int, Inode] = {ROOT_INODE: root}
        self._by_key: dict[tuple[int, int], Inode] = {root.key: root}
        self._next_number = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_number)

    def get(self, number: int) -> Inode:
        try:
            return self._by_number[number]
        except KeyError:
            log.warning("request for unknown inode %d", number)
            raise OSError(errno.ESTALE, f"inode {number} is not known") from None

    def find(self, key: tuple[int, int]) -> Inode | None:
        return self._by_key.get(key)

    def lookup_child(self, parent: Inode, name: str) -> tuple[Inode, os.stat_result]:
        """Find or add the inode for parent/name and count one kernel lookup for it."""
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is None:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
            try:
                st2 = os.fstat(fd)
            except OSError:
                os.close(fd)
                raise
            if (st2.st_dev, st2.st_ino) != key:
                # Replaced between stat and open: use what we opened.
                os.close(fd)
                return self.lookup_child(parent, name)
            inode = Inode(self._next_number, fd, key, st.st_mode)
            self._next_number += 1
            self._by_number[inode.number] = inode
            self._by_key[key] = inode
        inode.mode = st.st_mode
        inode.lookups += 1
        return inode, st

    def rekey(self, inode: Inode, new_fd: int) -> None:
        """Point an inode at a new backing object (after a container was rewritten)."""
        st = os.fstat(new_fd)
        self._by_key.pop(inode.key, None)
        old_fd = inode.fd
        inode.fd = new_fd
        inode.key = (st.st_dev, st.st_ino)
        self._by_key[inode.key] = inode
        os.close(old_fd)

    def forget(self, number: int, count: int) -> None:
        inode = self._by_number.get(number)
        if inode is None or number == ROOT_INODE:
            return
        inode.lookups -= count
        self._drop_if_unused(inode)

    def release_open(self, inode: Inode) -> None:
        inode.opens -= 1
        self._drop_if_unused(inode)

    def _drop_if_unused(self, inode: Inode) -> None:
        if inode.lookups <= 0 and inode.opens <= 0:
            del self._by_number[inode.number]
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            os.close(inode.fd)

    def close_all(self) -> None:
        for inode in list(self._by_number.values()):
            if inode.number != ROOT_INODE:
                os.close(inode.fd)
        self._by_number = {k: v for k, v in self._by_number.items() if k == ROOT_INODE}
