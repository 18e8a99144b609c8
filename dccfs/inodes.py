"""The inode table: each FUSE inode holds an O_PATH descriptor of its backing object.

Holding a descriptor rather than a path keeps every inode valid across renames of
it or of any directory above it, and lets every operation use the *at() calls
relative to a directory descriptor, so paths longer than PATH_MAX work.

The kernel keeps every inode it has looked up until it forgets it, which it does under
memory pressure, not descriptor pressure: a listing of a large tree (a directory listing
looks up every entry) ran the daemon out of descriptors, and then every request of every
user failed with EMFILE (found by review). Past half the descriptor limit the table asks
the kernel to drop the entries it looked up least recently (an entry invalidation; the
kernel then forgets the inodes that nothing holds open), so a tree of any size can be
walked with a bounded number of descriptors.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

ROOT_INODE = 1
# The rest of the descriptor limit is for open files' containers, delta bases, the control
# socket, logs and the FUSE device.
HELD_SHARE_OF_LIMIT = 0.5
MIN_HIGH_WATER = 256
LIMIT_CHECK_LOOKUPS = 1024


@dataclass
class Inode:
    number: int
    fd: int  # O_PATH | O_NOFOLLOW descriptor of the backing object
    key: tuple[int, int]  # backing (st_dev, st_ino)
    mode: int
    lookups: int = 0
    opens: int = 0
    extra: dict = field(default_factory=dict)
    # (parent inode number, name) of the kernel's latest lookup: the entry to invalidate
    entry: tuple[int, bytes] | None = None

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


def high_water_mark() -> int | None:
    """How many inodes to hold before asking the kernel to forget some; None: no limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(MIN_HIGH_WATER, int(soft * HELD_SHARE_OF_LIMIT))


class InodeTable:
    """Maps FUSE inode numbers to backing objects, counting kernel lookups.

    invalidate(parent number, name) asks the kernel to drop a directory entry without
    waiting (it must not block: the kernel may hold the directory's lock for the request
    being served)."""

    def __init__(self, root_fd: int, invalidate: Callable[[int, bytes], None] | None = None):
        st = os.fstat(root_fd)
        root = Inode(ROOT_INODE, root_fd, (st.st_dev, st.st_ino), st.st_mode, lookups=1)
        self._by_number: dict[int, Inode] = {ROOT_INODE: root}
        self._by_key: dict[tuple[int, int], Inode] = {root.key: root}
        self._next_number = ROOT_INODE + 1
        self.invalidate = invalidate
        self.high_water = high_water_mark()
        # Non-root inodes, least recently looked up first.
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._lookups = self._lookups_since_reclaim = 0
        self.reclaims = 0  # entries the kernel was asked to drop

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
        inode.entry = (parent.number, os.fsencode(name))
        self._recent[inode.number] = None
        self._recent.move_to_end(inode.number)
        self._lookups_since_reclaim += 1
        self._lookups += 1
        if self._lookups % LIMIT_CHECK_LOOKUPS == 0:
            self.high_water = high_water_mark()  # the limit may change under a running daemon (prlimit)
        if self.high_water is not None and len(self._by_number) > self.high_water:
            self._ask_kernel_to_forget()
        return inode, st

    def _ask_kernel_to_forget(self) -> None:
        """Ask the kernel to drop the entries of the least recently looked-up inodes that no
        handle holds open, down to half the high-water mark. The kernel's forgets arrive
        later (an entry of a directory being listed waits for the listing's lock); until an
        eighth of the mark's worth of lookups has come since the last round (some entries may
        be in use: a working directory, another hard link), no new round starts, so each
        lookup stays O(1) amortised. (Invalidating a directory's own entry instead would drop
        its children at once, but a directory being listed then keeps the entries its listing
        still adds under a name no invalidation reaches: tried, they were never forgotten.)"""
        low_water = self.high_water // 2
        if self.invalidate is None or self._lookups_since_reclaim < self.high_water // 8:
            return
        self._lookups_since_reclaim = 0
        wanted = len(self._by_number) - low_water
        asked = 0
        for _ in range(len(self._recent)):
            if asked >= wanted:
                break
            number = next(iter(self._recent))
            self._recent.move_to_end(number)
            inode = self._by_number[number]
            if inode.opens > 0 or inode.entry is None or inode.entry[0] not in self._by_number:
                continue
            self.invalidate(*inode.entry)
            asked += 1
        if self.reclaims == 0:
            log.info("holding %d inodes, past %d (half the descriptor limit): asking the kernel to "
                     "forget the least recently used", len(self._by_number), self.high_water)
        self.reclaims += asked

    def renamed(self, key: tuple[int, int], parent: int, name: bytes) -> None:
        """A rename through the mount gave the object at key this entry."""
        inode = self._by_key.get(key)
        if inode is not None and inode.number != ROOT_INODE:
            inode.entry = (parent, bytes(name))

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
            self._recent.pop(inode.number, None)
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            os.close(inode.fd)

    def close_all(self) -> None:
        for inode in list(self._by_number.values()):
            if inode.number != ROOT_INODE:
                os.close(inode.fd)
        self._by_number = {k: v for k, v in self._by_number.items() if k == ROOT_INODE}
        self._recent.clear()
