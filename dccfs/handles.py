"""Open-file handles: attach a shared ContainerFile or a per-handle raw passthrough descriptor.

Knows nothing of FUSE: the frontend passes inodes and flags and gets handle numbers.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from functools import partial

import trio

from dccfs import compaction, redelta, shared
from dccfs.chunkfile import ContainerFile
from dccfs.container import Container, pread_exact
from dccfs.engine import Engine
from dccfs.format import HEADER_SIZE, MAGIC, looks_like_container
from dccfs.handle import Handle  # noqa: F401 (for the modules that import it from here)
from dccfs.handles_plain import PlainFiles, RawFile, writable
from dccfs.handles_rewrite import BackgroundRewrites
from dccfs.inodes import Inode, InodeTable
from dccfs.pin_records import header_name, torn_tail_may_go

log = logging.getLogger(__name__)

# Background rewrites (compaction, deltas after close) run on threads of their own: a pass
# encodes for minutes, and must neither hold the I/O tokens that reads and commits wait
# for nor take every core from the writers.
REWRITE_THREADS = max(1, (os.cpu_count() or 2) // 2)


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
    full = inode.backing_path()
    if full is None:
        return f"<inode {inode.number}>"
    if full.startswith(backing_root):
        return full[len(backing_root):].lstrip("/") or "."
    return full


class HandleTable(BackgroundRewrites, PlainFiles):
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
            if not file.store_failing:
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
        # (as the kernel's errseq: a failure no handle has reported yet goes to the next opener's too)
        handle = Handle(self._next, inode, file, flags, opened_seq=getattr(file, "error_seq", 0),
                        error_seq=getattr(file, "reported_seq", 0))
        self._next += 1
        self._handles[handle.number] = handle
        inode.opens += 1
        return handle

    async def open(self, inode: Inode, flags: int) -> Handle:
        while True:
            file = inode.extra.get("file")
            if isinstance(file, ContainerFile):
                return await self._open_attached(inode, file, flags)
            locked_fd = await self._lock_before_attaching(inode, flags)
            try:
                # One first open at a time per inode: two concurrent ones each read the container
                # (an await) and attached a ContainerFile of their own, which then appended over
                # each other's records and committed indexes that disagreed (fsynced data lost).
                attaching = inode.extra.setdefault("attach_lock", trio.Lock())
                async with attaching:
                    file = inode.extra.get("file")
                    if not isinstance(file, ContainerFile):
                        if locked_fd is None and self._needs_lock(inode, flags):
                            continue  # this node's writer closed meanwhile: wait as above, not in here
                        fd, locked_fd = locked_fd, None
                        return await self._open_unattached(inode, flags, fd)
                    if locked_fd is not None and not file.write_locked:
                        # Attached by a reader meanwhile: the container's descriptor takes over the lock.
                        os.dup2(locked_fd, file.container.fd, inheritable=False)
                        file.write_locked = True
            finally:
                if locked_fd is not None:
                    os.close(locked_fd)
            return await self._open_attached(inode, file, flags)

    def _needs_lock(self, inode: Inode, flags: int) -> bool:
        """--shared: whether this open writes a file whose lock this node does not hold yet."""
        if not (self.engine.config.shared and writable(flags)):
            return False
        file = inode.extra.get("file")
        return "raw_lock" not in inode.extra and not (isinstance(file, ContainerFile) and file.write_locked)

    async def _lock_before_attaching(self, inode: Inode, flags: int) -> int | None:
        """--shared: a writer's descriptor of the file, holding the lock, waited for outside the attach
        lock so that this node's other opens, readers too, do not wait behind another node's writer
        (found by review). None when no lock is needed, or once this node holds it on another descriptor."""
        if not self._needs_lock(inode, flags):
            return None
        fd = self._open_backing(inode, os.O_RDWR, read_only_ok=False)
        try:
            if await shared.lock_for_writing(fd, relpath_of(inode, self.backing_root),
                                             lambda: not self._needs_lock(inode, flags)):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    async def _open_attached(self, inode: Inode, file: ContainerFile, flags: int) -> Handle:
        if writable(flags) and not writable(fcntl.fcntl(file.container.fd, fcntl.F_GETFL)):
            # Opened read-only because the backing file could not be written: a writer
            # gets the backing error now, or the descriptor becomes writable if it can.
            fd = self._open_backing(inode, os.O_RDWR, read_only_ok=False)
            try:
                os.dup2(fd, file.container.fd, inheritable=False)
            finally:
                os.close(fd)
        # Counted before any await: a release meanwhile (of the file's last other handle) must not close
        # the container under this open, whose descriptor number another file may take next (found by
        # review: a --shared writer waiting for another node's lock then wrote into that other file).
        file.handles += 1
        try:
            if self.engine.config.shared:
                await self._shared_open(file, flags)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._drop_handle(inode, file)
            raise
        handle = self._add(inode, file, flags)
        if flags & os.O_TRUNC:
            await self._truncate_or_unopen(handle)
        return handle

    async def _open_unattached(self, inode: Inode, flags: int, fd: int | None = None) -> Handle:
        """The first open of a file on this node; fd: its descriptor, already holding the lock."""
        if fd is None:
            fd = self._open_backing(inode, os.O_RDWR, read_only_ok=not writable(flags))
        relpath = relpath_of(inode, self.backing_root)
        keeps_lock = False
        try:
            is_container = is_container_head(pread_exact(fd, HEADER_SIZE, 0), relpath)
            if not is_container and self.engine.config.shared and writable(flags) \
                    and "raw_lock" not in inode.extra:
                # A writer of a plain or empty file takes the lock before it decides: another node
                # may be making it a container meanwhile (found by review: a header and another
                # node's records mixed, or plain writes destroyed a container).
                await shared.lock_for_writing(fd, relpath)
                is_container = is_container_head(pread_exact(fd, HEADER_SIZE, 0), relpath)
                # Plain writers do not take turns (two nodes append to one log), except one that
                # finds the file empty or empties it: it keeps the lock while it writes, since an
                # empty file may be another node's create, whose header would go over its writes.
                keeps_lock = not is_container and (bool(flags & os.O_TRUNC) or os.fstat(fd).st_size == 0)
            if not is_container and self._converts(inode, fd, flags):
                # Overwriting a plain file, or writing an empty one (made by mknod, or in the
                # backing directory): store the new content compressed.
                Container.create(fd, relpath, self.engine.config.chunk_shift_for(relpath))
                is_container = True
            if keeps_lock:
                return self._raw_handle(inode, flags, relpath, lock_fd=fd)
        except BaseException:
            os.close(fd)
            raise
        if not is_container:
            os.close(fd)
            return self._raw_handle(inode, flags, relpath)
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
        existing = plain = False
        try:
            if self.engine.config.shared and (create or writable(flags)):
                await shared.lock_for_writing(fd, relpath)
                if create and os.fstat(fd).st_size:
                    # Another node opened the new file and wrote to it before this create held the
                    # lock: open what it made instead of starting the file over.
                    inode.extra["created_elsewhere"] = True  # not this create's to remove if it fails
                    plain = not is_container_head(pread_exact(fd, HEADER_SIZE, 0), relpath)
                    if plain and writable(flags) and flags & os.O_TRUNC:  # (as in _open_unattached)
                        return self._raw_handle(inode, flags, relpath, lock_fd=fd)
                    create, existing = False, True
            if not plain:
                if create:
                    container = Container.create(fd, relpath, self.engine.config.chunk_shift_for(relpath))
                else:
                    container = await trio.to_thread.run_sync(Container.open, fd, relpath)
        except BaseException:
            os.close(fd)
            raise
        if plain:
            os.close(fd)
            return self._raw_handle(inode, flags, relpath)
        self._prepare(container, relpath)
        file = ContainerFile(self.engine, container, self.engine.config.rule_for(relpath))
        file.on_new_container = partial(self.inodes.rekey, inode)
        file.write_locked = self.engine.config.shared and (create or writable(flags))
        file.handles = 1
        inode.extra["file"] = file
        self.open_files[inode.number] = file
        handle = self._add(inode, file, flags)
        if existing and flags & os.O_TRUNC and file.size:
            await self._truncate_or_unopen(handle)
        return handle

    def _prepare(self, container: Container, relpath: str, replaced: Container | None = None) -> None:
        """Ready a container read from disk (opened, or re-read after another node's commit, replacing
        `replaced`) for this mount's use."""
        cut_from = container.recovery.committed_end if container.recovery.torn_tail else None
        if replaced is not None and replaced.cache_id == container.cache_id:
            cut_from = replaced.end if cut_from is None else min(cut_from, replaced.end)
        if cut_from is not None:
            # Uncommitted records (a close whose commit failed) are cut before the next append,
            # and new records then take their offsets under the same cache id: chunks cached
            # from them would be served for the new ones (found by review: failed writes came
            # back after a later fsync). Past a re-read container's old end, another node's.
            dropped = self.engine.cache.forget_from(container.cache_id, cut_from)
            if dropped:
                log.info("%s: dropped %d cached chunks of uncommitted records", relpath, dropped)
        # (a re-read container without it kept a linked file's torn tail, and every write then failed:
        # found by review)
        container.linked_tail_may_go = partial(torn_tail_may_go, self.backing_root, header_name(container.header))
        container.ends_where_read = self.engine.config.shared

    async def _shared_open(self, file: ContainerFile, flags: int) -> None:
        if writable(flags) and not file.write_locked:
            await shared.lock_for_writing(file.container.fd, file.path)
            file.write_locked = True
        old, old_end = file.container, file.container.end
        fresh = await shared.reread(file, file.path)
        # (another local open may have written meanwhile: its records are newer than this read)
        if fresh is not None and file.container is old and old.end == old_end \
                and not (file.content_changed or file.inflight):
            self._prepare(fresh, file.path, replaced=old)
            file.replace_container(fresh)

    async def release(self, number: int) -> Handle:
        handle = self._handles.pop(number)
        file = handle.file
        if isinstance(file, RawFile):
            self._release_raw(handle.inode, file)
            return handle
        await self._drop_handle(handle.inode, file)
        return handle

    async def _drop_handle(self, inode: Inode, file: ContainerFile) -> None:
        file.handles -= 1
        if file.handles == 0 and file not in self._closed_in_background:
            await self._close_file(inode, file)

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
        if file.lost_changes:
            self._cut_uncommitted(file)
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

    def _cut_uncommitted(self, file: ContainerFile) -> None:
        """The records of a close that gave up on its commit go, as they would at the next write (found
        by review: they held their space, and fsck reported a torn tail after a clean unmount)."""
        container = file.container
        try:
            cut = container.cut_uncommitted()
        except OSError as exc:
            log.warning("%s: could not cut the records of the failed commit: %s", file.path, exc)
            return
        if cut:
            # New records will take those offsets under the same cache id.
            self.engine.cache.forget_from(container.cache_id, container.end)

    async def commit_all(self) -> None:
        for file in list(self.open_files.values()):
            # Under the release lock, like every closer: a background pass's own last close may be
            # committing this file, then close its descriptor under this commit (found by CI: EBADF).
            # Stopping is set, so a pass holding the lock ends at its next record.
            async with file.release_lock:
                if not file.has_changes or file.closed:
                    continue
                try:
                    await file.commit(True)
                except OSError as exc:
                    # One file that cannot be stored must not cost the others their commit.
                    level = logging.WARNING if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                        else logging.ERROR
                    log.log(level, "%s: commit at shutdown failed, uncommitted changes are lost: %s",
                            file.path, exc)
