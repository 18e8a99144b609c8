"""Open-file handles: attach a shared ContainerFile or a per-handle raw passthrough descriptor.

Knows nothing of FUSE: the frontend passes inodes and flags and gets handle numbers.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass
from functools import partial

import trio

from dccfs import compaction, redelta, shared
from dccfs.chunkfile import ContainerFile
from dccfs.container import Container, ContainerError, pread_exact, read_logical_size
from dccfs.container_records import verified_logical_size
from dccfs.engine import Engine
from dccfs.delta_bases import base_link_path
from dccfs.format import HEADER_SIZE, MAGIC, FormatError, Header, looks_like_container
from dccfs.handles_rewrite import BackgroundRewrites
from dccfs.inodes import Inode, InodeTable
from dccfs.pin_records import header_name, torn_tail_may_go

log = logging.getLogger(__name__)

_ACCESS = os.O_RDONLY | os.O_WRONLY | os.O_RDWR
# Background rewrites (compaction, deltas after close) run on threads of their own: a pass
# encodes for minutes, and must neither hold the I/O tokens that reads and commits wait
# for nor take every core from the writers.
REWRITE_THREADS = max(1, (os.cpu_count() or 2) // 2)


def _writable(flags: int) -> bool:
    return (flags & _ACCESS) in (os.O_WRONLY, os.O_RDWR)


class RawFile:
    """A backing file that is not a container: bytes pass through unchanged."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path

    async def read(self, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, length, offset)

    async def write(self, offset: int, data: bytes) -> int:
        return await trio.to_thread.run_sync(os.pwrite, self.fd, data, offset)

    async def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    async def commit(self, durable: bool) -> None:
        if durable:
            await trio.to_thread.run_sync(os.fsync, self.fd)


@dataclass
class Handle:
    number: int
    inode: Inode
    file: ContainerFile | RawFile
    flags: int

    @property
    def writable(self) -> bool:
        return _writable(self.flags)

    @property
    def appends(self) -> bool:
        return bool(self.flags & os.O_APPEND)


def is_container_head(head: bytes, path: str) -> bool:
    """Container or plain file; a damaged container header is an I/O error, since serving
    the container's raw bytes as a plain file would return bytes nobody wrote."""
    if looks_like_container(head):
        return True
    if head.startswith(MAGIC):
        log.error("%s: the container header is damaged; reads fail until dccfs fsck", path)
        raise OSError(errno.EIO, f"{path}: damaged container header")
    return False


def relpath_of(inode: Inode, backing_root: str) -> str:
    """The inode's current path below the backing root (the kernel tracks renames for us)."""
    try:
        full = os.readlink(inode.proc_path)
    except OSError:
        return f"<inode {inode.number}>"
    if full.startswith(backing_root):
        return full[len(backing_root):].lstrip("/") or "."
    return full


def _backing_path(inode: Inode) -> str:
    """The inode's backing path for messages (its /proc/self/fd name said nothing to an operator)."""
    try:
        return os.readlink(inode.proc_path)
    except OSError:
        return inode.proc_path


def _open_backing(inode: Inode, st: os.stat_result) -> int | None:
    """A read descriptor of the inode's backing file, or None if it cannot be opened or is
    no longer the file st describes: these reads run on worker threads, and a rewrite's
    rekey closes the inode's old descriptor, whose number another file may then take."""
    try:
        # O_NOATIME: reading our own header must not change the atime users see.
        fd = os.open(inode.proc_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
    except OSError:
        return None
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        return None
    return fd


def _known_nlink(inode: Inode, st: os.stat_result) -> int | None:
    """visible_nlink's answer where it needs no read of the backing file, else None."""
    if st.st_nlink < 2 or not stat.S_ISREG(st.st_mode):
        return st.st_nlink
    cached = inode.extra.get("nlink_sig")
    return cached[1] if cached and cached[0] == (st.st_nlink, st.st_ctime_ns) else None


def visible_nlink(inode: Inode, st: os.stat_result, backing_root: str) -> int:
    """st_nlink without the hidden link that pins a delta base in .dccfs/bases."""
    known = _known_nlink(inode, st)
    if known is not None:
        return known
    signature = (st.st_nlink, st.st_ctime_ns)
    nlink = st.st_nlink
    fd = _open_backing(inode, st)
    if fd is None:
        return nlink
    try:
        try:
            header = Header.unpack(pread_exact(fd, HEADER_SIZE, 0))
        finally:
            os.close(fd)
        pin = os.stat(base_link_path(backing_root, header.file_id, header.generation))
        if (pin.st_dev, pin.st_ino) == (st.st_dev, st.st_ino):
            nlink -= 1
    except (OSError, FormatError):
        pass
    inode.extra["nlink_sig"] = (signature, nlink)
    return nlink


def attrs_need_reading(inode: Inode, st: os.stat_result) -> bool:
    """Whether logical_size or visible_nlink would read the backing file for these stats."""
    return _known_size(inode, st) is None or _known_nlink(inode, st) is None


def _known_size(inode: Inode, st: os.stat_result) -> int | None:
    """logical_size's answer where it needs no read of the backing file (an open file, not a
    container, or cached for this size, mtime and ctime), else None."""
    file = inode.extra.get("file")
    if isinstance(file, ContainerFile):
        return file.size
    if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER_SIZE:
        return st.st_size
    cached = inode.extra.get("size_sig")
    return cached[1] if cached and cached[0] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns) else None


def logical_size(inode: Inode, st: os.stat_result) -> int:
    """st_size as the mount shows it: the container's logical size, or the raw size."""
    known = _known_size(inode, st)
    if known is not None:
        return known
    signature = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    fd = _open_backing(inode, st)
    if fd is None:
        return st.st_size
    try:
        path = _backing_path(inode)
        if not is_container_head(pread_exact(fd, HEADER_SIZE, 0), path):
            size = st.st_size
        else:
            # The size an open would read, index verified: the trailer alone may name an
            # index that does not verify, and the open then falls back to an earlier commit.
            size = verified_logical_size(fd, path)
            if size is None:
                try:
                    size = Container.open(fd, path).size
                except ContainerError:
                    size = read_logical_size(fd) or st.st_size  # unreadable: reads report it
    finally:
        os.close(fd)
    inode.extra["size_sig"] = (signature, size)
    return size


class HandleTable(BackgroundRewrites):
    def __init__(self, engine: Engine, backing_root: str, inodes: InodeTable):
        self.engine = engine
        self.backing_root = backing_root
        self.inodes = inodes
        self.tmp_dir = os.path.join(backing_root, ".dccfs", "tmp")
        self._handles: dict[int, Handle] = {}
        self._next = 1
        self.open_files: dict[int, ContainerFile] = {}
        self.rewrite_limiter = trio.CapacityLimiter(REWRITE_THREADS)
        # Files whose background rewrite task closes them when it ends: their last release
        # leaves the close to it instead of waiting for the rewrite (a pyfuse3 request
        # task held for minutes, and an unmount that waited for the whole pass).
        self._closed_in_background: set[ContainerFile] = set()
        self._unpinning: set[str] = set()  # dependents an unpinning rewrite is running for
        self._unpin_tried: set[str] = set()  # and those it gave up on, or could not find
        engine.dirty.on_pressure(self._relieve_dirty_pressure)
        if engine.pins is not None:
            engine.pins.on_orphaned = self.offer_unpin_rewrite

    def _relieve_dirty_pressure(self) -> None:
        """The dirty budget is full: encode every dirty chunk, full or not, of every file
        that can store; a file whose store failed retries at its fsync or close."""
        for file in self.open_files.values():
            if file.failure is None:
                file.schedule_all()

    def renamed(self, keys: list[tuple[int, int]], directory: bool) -> None:
        """Backing objects (dev, ino) were renamed: the open files among them, or every open
        file when a directory moved, log and report their new names (an atomic saver's
        `.tmpXXXX` name stayed in the logs of its background rewrites)."""
        if directory:
            numbers = list(self.open_files)
        else:
            numbers = [inode.number for inode in map(self.inodes.find, keys)
                       if inode is not None and inode.number in self.open_files]
        for number in numbers:
            self.open_files[number].renamed(relpath_of(self.inodes.get(number), self.backing_root))

    def open_inodes(self) -> set[int]:
        """The inodes of every open container, and of every plain file open for writing: what
        a shutdown must flush through the mount."""
        numbers = set(self.open_files)
        numbers.update(h.inode.number for h in self._handles.values()
                       if isinstance(h.file, RawFile) and h.writable)
        return numbers

    def get(self, number: int) -> Handle:
        try:
            return self._handles[number]
        except KeyError:
            raise OSError(errno.EBADF, f"file handle {number} is not open") from None

    def __len__(self) -> int:
        return len(self._handles)

    def _add(self, inode: Inode, file, flags: int) -> Handle:
        handle = Handle(self._next, inode, file, flags)
        self._next += 1
        self._handles[handle.number] = handle
        inode.opens += 1
        return handle

    async def open(self, inode: Inode, flags: int) -> Handle:
        file = inode.extra.get("file")
        if not isinstance(file, ContainerFile):
            # One first open at a time per inode: two concurrent ones each read the container
            # (an await) and attached a ContainerFile of their own, which then appended over
            # each other's records and committed indexes that disagreed (fsynced data lost).
            attaching = inode.extra.setdefault("attach_lock", trio.Lock())
            async with attaching:
                file = inode.extra.get("file")
                if not isinstance(file, ContainerFile):
                    return await self._open_unattached(inode, flags)
        return await self._open_attached(inode, file, flags)

    async def _open_attached(self, inode: Inode, file: ContainerFile, flags: int) -> Handle:
        if _writable(flags) and not _writable(fcntl.fcntl(file.container.fd, fcntl.F_GETFL)):
            # Opened read-only because the backing file could not be written: a writer
            # gets the backing error now, or the descriptor becomes writable if it can.
            fd = self._open_backing(inode, os.O_RDWR, read_only_ok=False)
            try:
                os.dup2(fd, file.container.fd, inheritable=False)
            finally:
                os.close(fd)
        if self.engine.config.shared:
            await self._shared_open(file, flags)
        file.handles += 1
        handle = self._add(inode, file, flags)
        if flags & os.O_TRUNC:
            await self._truncate_or_unopen(handle)
        return handle

    async def _open_unattached(self, inode: Inode, flags: int) -> Handle:
        fd = self._open_backing(inode, os.O_RDWR, read_only_ok=not _writable(flags))
        try:
            is_container = is_container_head(pread_exact(fd, HEADER_SIZE, 0),
                                             relpath_of(inode, self.backing_root))
            if not is_container and _writable(flags) and (flags & os.O_TRUNC or os.fstat(fd).st_size == 0):
                # Overwriting a plain file, or writing an empty one (made by mknod, or in the
                # backing directory): store the new content compressed.
                relpath = relpath_of(inode, self.backing_root)
                Container.create(fd, relpath, self.engine.config.chunk_shift_for(relpath))
                is_container = True
        except BaseException:
            os.close(fd)
            raise
        if not is_container:
            os.close(fd)
            # O_APPEND stays (it is only still set without the writeback cache): the backing
            # file's own end, not the kernel's idea of it, which another --shared node may have
            # moved (found by review: an append through one node overwrote the other's).
            raw_flags = (flags & _ACCESS) | (flags & os.O_TRUNC) | (flags & os.O_APPEND)
            raw_fd = self._open_backing(inode, raw_flags, read_only_ok=not _writable(flags))
            return self._add(inode, RawFile(raw_fd, relpath_of(inode, self.backing_root)), flags)
        handle = await self.attach_container(inode, fd, flags, create=False)
        if flags & os.O_TRUNC and handle.file.size:
            await self._truncate_or_unopen(handle)
        return handle

    async def _truncate_or_unopen(self, handle: Handle) -> None:
        """O_TRUNC; when it fails the open fails, and the kernel will never release it."""
        try:
            await handle.file.truncate(0)
        except OSError:
            await self.release(handle.number)
            self.inodes.release_open(handle.inode)
            raise

    async def attach_container(self, inode: Inode, fd: int, flags: int, create: bool) -> Handle:
        relpath = relpath_of(inode, self.backing_root)
        try:
            if self.engine.config.shared and (create or _writable(flags)):
                await shared.lock_for_writing(fd, relpath)
            if create:
                container = Container.create(fd, relpath, self.engine.config.chunk_shift_for(relpath))
            else:
                container = await trio.to_thread.run_sync(Container.open, fd, relpath)
        except BaseException:
            os.close(fd)
            raise
        if container.recovery.torn_tail:
            # Uncommitted records (a close whose commit failed) are cut before the next append,
            # and new records then take their offsets under the same cache id: chunks cached
            # from them would be served for the new ones (found by review: failed writes came
            # back after a later fsync).
            dropped = self.engine.cache.forget_from(container.cache_id, container.recovery.committed_end)
            if dropped:
                log.info("%s: dropped %d cached chunks of uncommitted records", relpath, dropped)
        container.linked_tail_may_go = partial(torn_tail_may_go, self.backing_root, header_name(container.header))
        file = ContainerFile(self.engine, container, self.engine.config.rule_for(relpath))
        file.on_new_container = partial(self.inodes.rekey, inode)
        file.write_locked = self.engine.config.shared and (create or _writable(flags))
        file.handles = 1
        inode.extra["file"] = file
        self.open_files[inode.number] = file
        return self._add(inode, file, flags)

    async def _shared_open(self, file: ContainerFile, flags: int) -> None:
        if _writable(flags) and not file.write_locked:
            await shared.lock_for_writing(file.container.fd, file.path)
            file.write_locked = True
        await shared.refresh(file, file.path)

    @staticmethod
    def _open_backing(inode: Inode, flags: int, read_only_ok: bool = True) -> int:
        flags |= os.O_CLOEXEC
        try:
            return os.open(inode.proc_path, flags)
        except OSError as exc:
            # A read-only backing store still serves reads, unless the caller must write.
            if read_only_ok and (flags & _ACCESS) == os.O_RDWR \
                    and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return os.open(inode.proc_path, (flags & ~_ACCESS) | os.O_RDONLY)
            raise

    async def release(self, number: int) -> Handle:
        handle = self._handles.pop(number)
        file = handle.file
        if isinstance(file, RawFile):
            os.close(file.fd)
            return handle
        file.handles -= 1
        if file.handles == 0 and file not in self._closed_in_background:
            await self._close_file(handle.inode, file)
        return handle

    async def _close_file(self, inode: Inode, file: ContainerFile, compact: bool = True) -> None:
        """Commit, then close. Handles may be opened again during any await here, so the
        close itself happens only after a final check with no await after it; one closer
        at a time per file, so the descriptor is closed exactly once. Compaction, when
        worth it, runs in the background after the kernel has its RELEASE reply."""
        async with file.release_lock:
            gave_up = False
            while not file.closed and file.handles == 0:
                if file.has_changes and not gave_up:
                    try:
                        await file.commit(self.engine.config.sync_on_close)
                    except OSError as exc:
                        # The handle is gone; the error also went to close()/fsync().
                        level = logging.WARNING if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                            else logging.ERROR
                        log.log(level, "%s: last commit failed, uncommitted changes are lost: %s",
                                file.path, exc)
                        gave_up = True
                        file.lost_changes = True
                    continue
                if compact and not self.engine.config.shared:
                    redelta_now = redelta.worth_redelta(file)
                    if redelta_now or compaction.worth_compacting(file.container):
                        inode.opens += 1  # keeps the inode's descriptor until the task ends
                        self._closed_in_background.add(file)
                        self.engine.start_background(self._compact_then_close, inode, file,
                                                     redelta_now)
                        return
                self._detach(inode, file)

    def _detach(self, inode: Inode, file: ContainerFile) -> None:
        """Forget and close a file with no handles; synchronous, so no open can slip in."""
        file.forget_dirty()
        file.close_delta_base()
        if inode.extra.get("file") is file:
            del inode.extra["file"]
        if self.open_files.get(inode.number) is file:
            del self.open_files[inode.number]
        file.closed = True
        if self.engine.pins is not None:
            container = file.container
            # After a failed last commit the file is not what was committed: its records stay (found by
            # review: with the index in memory, an ENOSPC at the close freed the pin the deltas needed).
            committed = not (file.lost_changes or file.content_changed)
            self.engine.pins.closed(header_name(container.header), container.fd if committed else None)
        os.close(file.container.fd)
        for fd in file.retired_fds:
            os.close(fd)
        file.close_unsynced_dir()

    async def commit_all(self) -> None:
        for file in list(self.open_files.values()):
            if file.has_changes:
                try:
                    await file.commit(True)
                except OSError as exc:
                    # One file that cannot be stored must not cost the others their commit.
                    level = logging.WARNING if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                        else logging.ERROR
                    log.log(level, "%s: commit at shutdown failed, uncommitted changes are lost: %s",
                            file.path, exc)
