"""Delta-base pins freed online: durable per-pin reference records, and the worker that drops pins nobody needs.

A DeltaWriter writes `.dccfs/refs/<pin>/<dependent>` (fsynced) before the first delta of
the dependent container naming the pin is committed (docs/delta.md). When the mount lets
go of a container for good (its last link and last descriptor gone, an overwrite that
gives it a new file id, a compaction swap that gives it a new generation), its records go,
and a pin whose refs directory is then empty, and that no live DeltaWriter holds, is
unlinked; when that was the last link of the pinned container, its own records go in turn
(chains). Pins without a refs directory (made before this existed) are never freed here:
only `dccfs fsck --repair` removes them. A pin left with no name of its base in the tree and
one dependent is offered to on_orphaned, which may store that dependent again without it
(dccfs/unpin.py). Knows nothing of FUSE.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import queue
import stat
import threading
from collections import Counter
from typing import Callable

from dccfs.delta_bases import every_record_base
from dccfs.format import HEADER_SIZE, FormatError, Header
from dccfs.inodes import InodeTable
from dccfs.pin_records import (BASES_DIR, REFS_DIR, header_name, read_base_end, read_record, read_records,
                               remove_record, write_record)

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


_registries: dict[str, "PinRegistry"] = {}
_registries_lock = threading.Lock()


def registry_for(backing_root: str) -> "PinRegistry | None":
    with _registries_lock:
        return _registries.get(os.path.abspath(backing_root))


class PinRegistry:
    """One mount's pin bookkeeping: which pins each container has records in (loaded from
    the refs directories, then kept current), pins held by live DeltaWriters, and a worker
    thread that removes records and frees pins off the FUSE thread."""

    def __init__(self, backing_root: str, pin_lock: threading.Lock):
        self.backing_root = os.path.abspath(backing_root)
        self.pin_lock = pin_lock
        # Whether a backing (st_dev, st_ino) is still an inode of the mount (open, or known
        # to the kernel); such a container is let go of by the table, not by a pin's removal.
        self.in_use: Callable[[tuple[int, int]], bool] = lambda key: True
        self.on_freed: Callable[[str], None] = lambda pin: None
        # (pin, its one dependent, the dependent's path when its deltas were written): the
        # base has no name left, so storing that dependent again without it frees the pin.
        self.on_orphaned: Callable[[str, str, str], None] = lambda pin, dependent, path: None
        self._lock = threading.Lock()
        self._pins_of: dict[str, set[str]] = {}  # dependent -> pins it has records in
        # dependent -> its path below the backing root when its record was written (a rename
        # since may hide it from on_orphaned's search: the pin then stays, docs/delta.md)
        self._path_of: dict[str, str] = {}
        self._held: Counter = Counter()
        # (pin, dependent) -> records written for it by this mount's writers and compactions: a
        # container closed with no delta naming such a pin does not need it (_drop_unneeded)
        self._noted: Counter = Counter()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Loaded before the mount serves anything: a compaction's carry_over must see them.
        self._queue.put(("pins", self._load()))
        with _registries_lock:
            _registries[self.backing_root] = self
        self._thread = threading.Thread(target=self._run, name="dccfs-pins", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------

    @property
    def has_records(self) -> bool:
        return bool(self._pins_of)

    def noted(self, pin: str, dependent: str, path: str | None = None) -> None:
        """A record was written (write_record) by this mount, for the file at path."""
        with self._lock:
            self._pins_of.setdefault(dependent, set()).add(pin)
            self._noted[(pin, dependent)] += 1
            if path is not None:
                self._path_of[dependent] = path

    def hold(self, pin: str) -> None:
        with self._lock:
            self._held[pin] += 1

    def release(self, pin: str) -> None:
        with self._lock:
            self._held[pin] -= 1
            if self._held[pin] <= 0:
                del self._held[pin]
        self._queue.put(("pins", {pin}))

    def offer_orphans(self) -> None:
        """Look at every pin with records again (at mount, once on_orphaned can act): a base
        whose last name went while the mount was down, or whose dependent's rewrite a stop
        or a kill interrupted."""
        self._queue.put(("all", None))  # listed by the worker, off the trio thread

    def closed(self, name: str, fd: int | None = None) -> None:
        """The mount closed the container named name, or swapped it in (a compaction's copy); fd
        (still open, duplicated when needed) is given when everything it holds is committed. A
        record this mount wrote for it goes when no delta record up to its last commit, live or
        dead, names that pin: a file whose put-off deltas were never stored (the pass
        after close found none smaller, had too few to run, or was stopped by an unmount), or a
        copy that carried the record over, kept the base pinned until fsck --repair. Then a pin
        the container needs whose base has no name left may be rewritten now (on_orphaned): it
        was open when that happened."""
        with self._lock:
            pins = set(self._pins_of.get(name, ()))
            written = {pin: self._noted[(pin, name)] for pin in pins if (pin, name) in self._noted}
        if written and fd is not None:
            self._queue.put(("closed", (name, os.dup(fd), written)))
        if pins:
            self._queue.put(("pins", pins))

    def destroyed(self, dependent: str) -> None:
        """The container named dependent no longer exists anywhere, and no container will
        have that name again (the old file id of a reset)."""
        self._queue.put(("gone", dependent))

    def forget_copy(self, name: str) -> None:
        """A rewritten copy was thrown away: its records go now, not from the queue, since
        the next copy of the same file has the same name and may be written at once."""
        pins = self._forget_dependent(name)
        if pins:
            self._queue.put(("pins", pins))

    def let_go(self, fd: int) -> None:
        """The mount no longer uses this backing object; takes ownership of fd (any kind of
        descriptor). It is destroyed when it has no link left and is not an inode again."""
        self._queue.put(("fd", fd))

    def carry_over(self, old: str, new: str) -> None:
        """A rewritten copy (compaction, delta after close) holds the records of old: give
        each of its pins a durable record for new before the copy replaces it."""
        with self._lock:
            pins = sorted(self._pins_of.get(old, ()))
            path = self._path_of.get(old)
        with self.pin_lock:
            for pin in pins:
                write_record(self.backing_root, pin, new, read_base_end(self.backing_root, pin, old), path)
                self.noted(pin, new, path)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is done (tests, unmount)."""
        done = threading.Event()
        self._queue.put(("drained", done))
        return done.wait(timeout)

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            candidates: set[str] = set()
            waiters = []
            for kind, value in batch:
                try:
                    if kind == "fd":
                        candidates |= self._check_let_go(value)
                    elif kind == "gone":
                        candidates |= self._forget_dependent(value)
                    elif kind == "closed":
                        candidates |= self._drop_unneeded(*value)
                    elif kind == "pins":
                        candidates |= value
                    elif kind == "all":
                        candidates |= set(read_records(self.backing_root))
                    elif kind == "drained":
                        waiters.append(value)
                except Exception:
                    log.exception("delta base pin bookkeeping failed for %s %r; a pin may stay "
                                  "until fsck --repair", kind, value)
            try:
                self._free_unused(candidates)
            except Exception:
                log.exception("freeing unused delta base pins failed; they stay until fsck --repair")
            for waiter in waiters:
                waiter.set()

    def _load(self) -> set[str]:
        """Read the records; pins left with an empty refs directory (a crash after their last
        record went) are candidates at once."""
        empty = set()
        with self._lock:
            for pin, dependents in read_records(self.backing_root).items():
                if not dependents:
                    empty.add(pin)
                for dependent in dependents:
                    self._pins_of.setdefault(dependent, set()).add(pin)
                    where = read_record(self.backing_root, pin, dependent)[1]
                    if where is not None:
                        self._path_of[dependent] = where
        return empty

    def _check_let_go(self, fd: int) -> set[str]:
        try:
            st = os.fstat(fd)
            # One link left may be the pin's alone: the base's last name went.
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1 or self.in_use((st.st_dev, st.st_ino)):
                return set()
            # Reopened through /proc: fd may be an O_PATH descriptor, and the file has no name.
            rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                head = os.pread(rfd, HEADER_SIZE, 0)
            finally:
                os.close(rfd)
        finally:
            os.close(fd)
        try:
            header = Header.unpack(head)
        except FormatError:
            return set()  # a plain file, or an empty one
        name = header_name(header)
        if st.st_nlink:
            try:
                pin = os.stat(os.path.join(self.backing_root, BASES_DIR, name))
            except OSError:
                return set()
            return {name} if (pin.st_dev, pin.st_ino) == (st.st_dev, st.st_ino) else set()
        return self._forget_dependent(name)

    def _drop_unneeded(self, name: str, fd: int, written: dict[str, int]) -> set[str]:
        """Remove the records this mount wrote for the container named name (read through fd, which
        this closes) for pins no delta record up to its last commit names; returns those pins. Under
        the pin lock, and only while no record was written for it since its close: a writer that
        pins for the same container again writes its record under that lock, before its first delta."""
        dropped = set()
        try:
            if header_name(Header.unpack(os.pread(fd, HEADER_SIZE, 0))) != name:
                return set()
            # Every record up to the last commit, not only the live ones: a container that is (or becomes) a
            # pinned base is read by offset, and a chunk overwritten since keeps its old record, which may be a
            # delta naming a pin the index no longer shows (found by review: EIO in the dependent after a
            # truncate of such a base).
            named = every_record_base(fd, name)
            with self.pin_lock:
                for pin, count in written.items():
                    with self._lock:
                        if pin in named or self._noted[(pin, name)] != count or pin not in self._pins_of.get(name, ()):
                            continue
                        self._pins_of[name].discard(pin)
                        del self._noted[(pin, name)]
                    remove_record(self.backing_root, pin, name)
                    dropped.add(pin)
        except (OSError, FormatError, ValueError) as exc:
            log.debug("container %s: records not all readable (%s); its pin records stay", name, exc)
            return dropped
        finally:
            os.close(fd)
        if dropped:
            log.info("container %s holds no delta of %s: its record there is removed", name,
                     " or ".join(sorted(dropped)))
        return dropped

    def _forget_dependent(self, dependent: str) -> set[str]:
        """Remove the records of a destroyed container; returns the pins they were in."""
        with self._lock:
            pins = self._pins_of.pop(dependent, set())
            self._path_of.pop(dependent, None)
            for pin in pins:
                self._noted.pop((pin, dependent), None)
        for pin in pins:
            remove_record(self.backing_root, pin, dependent)
        if pins:
            log.debug("container %s is gone; its records in %s removed", dependent, sorted(pins))
        return pins

    def _looks_unused(self, pin: str) -> bool:
        with self._lock:
            if self._held.get(pin):
                return False
        try:
            return not os.listdir(os.path.join(self.backing_root, REFS_DIR, pin))
        except (FileNotFoundError, NotADirectoryError):
            return False  # not ours to free (made before records existed), or already freed

    def _free_unused(self, candidates: set[str]) -> None:
        level = candidates
        while level:
            unused = sorted(p for p in level if self._looks_unused(p))
            for pin in sorted(level.difference(unused)):
                self._offer_orphan(pin)
            if not unused:
                return
            # What made these pins unused (an unlink, a rename over, a reset, the previous
            # level's pin removal) must be on disk before they go: after a power cut a
            # dependent that came back would name a pin that did not.
            root_fd = os.open(self.backing_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                syncfs(root_fd)
            finally:
                os.close(root_fd)
            level = set()
            for pin in unused:
                if self._unlink_if_unused(pin):
                    level |= self._forget_dependent(pin)  # its container is gone: a chain

    def _offer_orphan(self, pin: str) -> None:
        """Tell on_orphaned when only the pin is left of its base and one container needs it:
        one that is no base itself (rewriting a pinned one would keep both versions), that no
        writer holds, and whose path this mount knows."""
        try:
            st = os.stat(os.path.join(self.backing_root, BASES_DIR, pin))
            dependents = os.listdir(os.path.join(self.backing_root, REFS_DIR, pin))
        except OSError:
            return
        if st.st_nlink != 1 or len(dependents) != 1:
            return
        dependent = dependents[0]
        with self._lock:
            if self._held.get(pin) or self._held.get(dependent):
                return
            path = self._path_of.get(dependent)
        if path is None or os.path.lexists(os.path.join(self.backing_root, BASES_DIR, dependent)):
            return
        self.on_orphaned(pin, dependent, path)

    def _unlink_if_unused(self, pin: str) -> bool:
        """Unlink the pin if nothing needs it (checked again under the pin lock); returns
        whether its container is now destroyed (that was its last link, not an inode)."""
        pin_dir = os.path.join(self.backing_root, REFS_DIR, pin)
        pin_path = os.path.join(self.backing_root, BASES_DIR, pin)
        with self.pin_lock:
            with self._lock:
                if self._held.get(pin):
                    return False
            try:
                if os.listdir(pin_dir):
                    return False
            except (FileNotFoundError, NotADirectoryError):
                return False
            try:
                fd = os.open(pin_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                os.rmdir(pin_dir)
                return False
            try:
                os.unlink(pin_path)
                os.rmdir(pin_dir)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        log.info("freed delta base pin %s: no file needs it any more", pin)
        self.on_freed(pin)
        return st.st_nlink == 0 and not self.in_use((st.st_dev, st.st_ino))


class PinTrackingInodeTable(InodeTable):
    """The mount's inode table, telling the pin registry about each regular file it lets go
    of: the last step of an unlink, a rename over, or a close of an unlinked file."""

    def __init__(self, root_fd: int, registry: PinRegistry | None, invalidate=None):
        super().__init__(root_fd, invalidate)
        self.registry = registry
        if registry is not None:
            registry.in_use = lambda key: self.find(key) is not None

    def _drop_if_unused(self, inode) -> None:
        registry = self.registry
        # An inode that never held a descriptor still had its name when dropped, unless it went
        # outside this mount or keep_before_unlink could not open one: nothing to let go here
        # (fsck --repair frees a pin left that way).
        if (registry is None or not registry.has_records or inode.lookups > 0 or inode.opens > 0
                or not stat.S_ISREG(inode.mode) or inode.held_fd is None):
            super()._drop_if_unused(inode)
            return
        # Duplicated before the drop, checked after it by the registry's worker: a pin
        # removal that races with this drop then always sees one of the two gone.
        fd = os.dup(inode.fd)
        try:
            super()._drop_if_unused(inode)
        finally:
            registry.let_go(fd)
