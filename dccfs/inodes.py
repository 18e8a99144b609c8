"""The inode table: each FUSE inode names its backing object, and holds an O_PATH descriptor of it once an operation needs one."""
from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

# Why descriptors, and why only some: a descriptor rather than a path keeps an inode valid
# across renames of it or of any directory above it, and lets every operation use the *at()
# calls relative to a directory descriptor, so paths longer than PATH_MAX work. But the kernel
# keeps every inode it has looked up until it forgets it, which it does under memory pressure,
# not descriptor pressure, and a directory listing looks up every entry: a listing of a large
# tree ran the daemon out of descriptors, and then every request of every user failed with
# EMFILE (found by review). So an inode first holds only its entry (parent inode, name) and the
# backing object's (st_dev, st_ino); a stat goes through the parent's descriptor, checked
# against that key, and the descriptor is opened when an operation needs the object itself
# (an open, a link, xattrs, use as a parent). A listing then costs no descriptor per entry.
# Past half the descriptor limit the table still asks the kernel to drop the entries it
# looked up least recently (the kernel then forgets the inodes nothing holds open), and past
# MAX_INODES as well, which bounds the table's memory.

ROOT_INODE = 1
# The rest of the descriptor limit is for open files' containers, delta bases, the control
# socket, logs and the FUSE device.
HELD_SHARE_OF_LIMIT = 0.5
MIN_HIGH_WATER = 256
LIMIT_CHECK_LOOKUPS = 1024
# Inodes the table holds before it asks the kernel to forget some, descriptors or not: each costs the
# daemon about 0.6 KiB (tracemalloc of 20,000 lookups: the Inode, its entry, the table's maps), so 40 MiB.
MAX_INODES = 65536


@dataclass(eq=False)
class Inode:
    number: int
    key: tuple[int, int]  # backing (st_dev, st_ino)
    mode: int
    lookups: int = 0
    opens: int = 0
    extra: dict = field(default_factory=dict)
    # (parent inode number, name) of the kernel's latest lookup: the entry to invalidate, and
    # the name the descriptor is opened by
    entry: tuple[int, bytes] | None = None
    held_fd: int | None = None  # O_PATH | O_NOFOLLOW descriptor, once an operation needed one
    table: "InodeTable | None" = field(default=None, repr=False)

    @property
    def fd(self) -> int:
        """The O_PATH descriptor of the backing object, opened by the inode's entry on first use."""
        held = self.held_fd
        return held if held is not None else self.table.hold(self)

    def open(self, flags: int) -> int:
        """A new descriptor of the backing object opened with flags (the caller closes it); an
        inode that holds no descriptor opens by its entry and still holds none."""
        return self.table.open_object(self, flags)

    @property
    def proc_path(self) -> str:
        """A path that resolves to the object itself; for calls that take no descriptor."""
        return f"/proc/self/fd/{self.fd}"

    def backing_path(self) -> str | None:
        """The object's current path in the backing file system (renames included), None if gone."""
        if self.held_fd is None and self.table is not None:
            return self.table.path_by_entry(self)
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
    """How many descriptors to hold before asking the kernel to forget some; None: no limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(MIN_HIGH_WATER, int(soft * HELD_SHARE_OF_LIMIT))


def _stale(inode: Inode, why: str) -> OSError:
    # ESTALE, not ENOENT: for a call by path the VFS then looks the path up again (once,
    # LOOKUP_REVAL), and that lookup gives the inode its current entry. (A call on a user's
    # descriptor gets the ESTALE.)
    return OSError(errno.ESTALE, f"inode {inode.number}: {why}")


def _check_key(inode: Inode, st: os.stat_result, name: bytes) -> None:
    """ESTALE unless st, found by the inode's name, is the inode's own object."""
    if (st.st_dev, st.st_ino) != inode.key:
        raise _stale(inode, f"its name {os.fsdecode(name)!r} is another object now")


class InodeTable:
    """Maps FUSE inode numbers to backing objects, counting kernel lookups.

    invalidate(parent number, name) asks the kernel to drop a directory entry without
    waiting (it must not block: the kernel may hold the directory's lock for the request
    being served). Descriptors are opened on worker threads too, so opening and closing
    them is under one lock."""

    def __init__(self, root_fd: int, invalidate: Callable[[int, bytes], None] | None = None):
        st = os.fstat(root_fd)
        root = Inode(ROOT_INODE, (st.st_dev, st.st_ino), st.st_mode, lookups=1, held_fd=root_fd, table=self)
        self._by_number: dict[int, Inode] = {ROOT_INODE: root}
        self._by_key: dict[tuple[int, int], Inode] = {root.key: root}
        self._next_number = ROOT_INODE + 1
        self.invalidate = invalidate
        self.high_water = high_water_mark()
        self.held = 0  # descriptors held by non-root inodes
        self._fd_lock = threading.RLock()  # (re-entered: a parent's descriptor opens within a child's)
        # Non-root inodes, least recently looked up first; and those of them that hold a descriptor.
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._recent_held: OrderedDict[int, None] = OrderedDict()
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

    def lookup_child(self, parent: Inode, name: str | bytes) -> tuple[Inode, os.stat_result]:
        """Find or add the inode for parent/name and count one kernel lookup for it."""
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is None:
            inode = Inode(self._next_number, key, st.st_mode, table=self)
            self._next_number += 1
            self._by_number[inode.number] = inode
            self._by_key[key] = inode
        inode.mode = st.st_mode
        inode.lookups += 1
        inode.entry = (parent.number, os.fsencode(name))
        self._recent[inode.number] = None
        self._recent.move_to_end(inode.number)
        if inode.held_fd is not None:
            with self._fd_lock:
                if inode.number in self._recent_held:
                    self._recent_held.move_to_end(inode.number)
        self._lookups_since_reclaim += 1
        self._lookups += 1
        if self._lookups % LIMIT_CHECK_LOOKUPS == 0:
            self.high_water = high_water_mark()  # the limit may change under a running daemon (prlimit)
        if (self.high_water is not None and self.held > self.high_water) or len(self._by_number) > MAX_INODES:
            self._ask_kernel_to_forget()
        return inode, st

    def stat(self, inode: Inode) -> os.stat_result:
        """The backing object's stat, without opening a descriptor for an inode that has none."""
        if inode.held_fd is not None:
            return os.stat(inode.held_fd)
        parent, name = self._entry_of(inode)
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise _stale(inode, f"its name {os.fsdecode(name)!r} is gone") from None
        _check_key(inode, st, name)
        return st

    def open_object(self, inode: Inode, flags: int) -> int:
        """A new descriptor of the backing object (the caller closes it), opened with flags,
        without holding one for an inode that has none. Raises ESTALE if the inode's name
        now holds another object."""
        if inode.held_fd is not None:
            return os.open(inode.proc_path, flags)
        parent, name = self._entry_of(inode)
        # O_NONBLOCK: the name may hold a FIFO by now (another --shared node), whose open would
        # wait for a writer; the key check below then refuses it.
        nonblock = 0 if flags & (os.O_PATH | os.O_NONBLOCK) else os.O_NONBLOCK
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | nonblock, dir_fd=parent.fd)
        except (FileNotFoundError, NotADirectoryError):
            raise _stale(inode, f"its name {os.fsdecode(name)!r} is gone") from None
        try:
            _check_key(inode, os.fstat(fd), name)
            if nonblock:
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _entry_of(self, inode: Inode) -> tuple[Inode, bytes]:
        parent = self._by_number.get(inode.entry[0]) if inode.entry else None
        if parent is None:
            raise _stale(inode, "no known name")
        return parent, inode.entry[1]

    def path_by_entry(self, inode: Inode) -> str | None:
        """The backing path of an inode that holds no descriptor: its parent's, and its name."""
        try:
            parent, name = self._entry_of(inode)
        except OSError:
            return None
        where = parent.backing_path()
        return os.path.join(where, os.fsdecode(name)) if where is not None else None

    def hold(self, inode: Inode) -> int:
        """Open the inode's O_PATH descriptor by its entry (Inode.fd, on first use)."""
        with self._fd_lock:
            if inode.held_fd is not None:
                return inode.held_fd
            if self._by_number.get(inode.number) is not inode:
                raise _stale(inode, "forgotten")  # a worker thread's late use: open nothing
            fd = self.open_object(inode, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            inode.held_fd = fd
            self.held += 1
            self._recent_held[inode.number] = None
            return fd

    def keep_before_unlink(self, parent: Inode, name: bytes) -> None:
        """Before an unlink, rmdir or rename over parent/name: open the descriptor of the object it
        names if its inode has none and the name is its entry. The inode then keeps working after
        the name goes: through another name (a hard link, a delta base's pin), as a removed working
        directory, and for the pin registry, which gets the object when the inode is dropped (a
        deleted delta file lets its base's pin go; found by the suite and by review)."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return  # the unlink or rename reports it
        inode = self._by_key.get((st.st_dev, st.st_ino))
        if inode is not None and inode.held_fd is None and inode.entry == (parent.number, bytes(name)):
            try:
                self.hold(inode)
            except OSError as exc:
                log.debug("inode %d: no descriptor before its name goes: %s", inode.number, exc)

    def _ask_kernel_to_forget(self) -> None:
        """Ask the kernel to drop the entries of the least recently looked-up inodes that no
        handle holds open, down to half of each mark. The kernel's forgets arrive
        later (an entry of a directory being listed waits for the listing's lock); until an
        eighth of the mark's worth of lookups has come since the last round (some entries may
        be in use: a working directory, another hard link), no new round starts, so each
        lookup stays O(1) amortised. (Invalidating a directory's own entry instead would drop
        its children at once, but a directory being listed then keeps the entries its listing
        still adds under a name no invalidation reaches: tried, they were never forgotten.)"""
        if self.high_water is not None and self.held > self.high_water:
            mark, count, order = self.high_water, self.held, self._recent_held
        else:
            mark, count, order = MAX_INODES, len(self._by_number), self._recent
        if self.invalidate is None or self._lookups_since_reclaim < mark // 8:
            return
        self._lookups_since_reclaim = 0
        wanted = count - mark // 2
        asked = 0
        with self._fd_lock:  # (worker threads add to _recent_held)
            for _ in range(len(order)):
                if asked >= wanted:
                    break
                number = next(iter(order))
                order.move_to_end(number)
                inode = self._by_number[number]
                if inode.opens > 0 or inode.entry is None or inode.entry[0] not in self._by_number:
                    continue
                self.invalidate(*inode.entry)
                asked += 1
        if self.reclaims == 0:
            log.info("holding %d descriptors for %d inodes, past %d (half the descriptor limit) or %d inodes: "
                     "asking the kernel to forget the least recently used", self.held, len(self._by_number),
                     self.high_water or 0, MAX_INODES)
        self.reclaims += asked

    def renamed(self, key: tuple[int, int], parent: int, name: bytes) -> None:
        """A rename through the mount gave the object at key this entry."""
        inode = self._by_key.get(key)
        if inode is not None and inode.number != ROOT_INODE:
            inode.entry = (parent, bytes(name))

    def rekey(self, inode: Inode, new_fd: int) -> None:
        """Point an inode at a new backing object (after a container was rewritten)."""
        st = os.fstat(new_fd)
        with self._fd_lock:
            self._by_key.pop(inode.key, None)
            old_fd, inode.held_fd = inode.held_fd, new_fd
            inode.key = (st.st_dev, st.st_ino)
            self._by_key[inode.key] = inode
            if old_fd is None:
                self.held += 1
                self._recent_held[inode.number] = None
            else:
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
            with self._fd_lock:
                del self._by_number[inode.number]
                self._recent.pop(inode.number, None)
                self._recent_held.pop(inode.number, None)
                if self._by_key.get(inode.key) is inode:
                    del self._by_key[inode.key]
                if inode.held_fd is not None:
                    os.close(inode.held_fd)
                    inode.held_fd = None  # a late inode.fd on a worker thread gets ESTALE, not a reused number
                    self.held -= 1

    def close_all(self) -> None:
        with self._fd_lock:
            for inode in list(self._by_number.values()):
                if inode.number != ROOT_INODE and inode.held_fd is not None:
                    os.close(inode.held_fd)
            self._by_number = {k: v for k, v in self._by_number.items() if k == ROOT_INODE}
            self._recent.clear()
            self._recent_held.clear()
            self.held = 0
