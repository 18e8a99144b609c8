"""The pyfuse3 handlers of open files: open, create, read, write, flush, fsync, release, truncate."""
from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pyfuse3
import trio

from dccfs.chunkfile import ContainerFile
from dccfs.fs_errors import guarded
from dccfs.handles_plain import RawFile
from dccfs.inodes import Inode

log = logging.getLogger(__name__)

# At unmount, how long to wait for the pin registry's pending work (a syncfs, unlinks).
SHUTDOWN_PIN_WAIT_S = 30.0


class OpenFileHandlers:
    """The open-file half of DccfsOperations (fs.py), which inherits it ahead of pyfuse3.Operations.

    Uses the host's engine, inodes, handles and enable_writeback_cache, and its _attrs,
    _stat, _check_name and _finish_create for create."""

    async def _truncate(self, node: Inode, fh, size: int) -> None:
        if fh is not None:
            await self.handles.get(fh).file.truncate(size)
            return
        handle = await self.handles.open(node, os.O_WRONLY)
        try:
            await handle.file.truncate(size)
        finally:
            await self.handles.release(handle.number)
            self.inodes.release_open(node)

    def _file_info(self, handle, flags: int) -> pyfuse3.FileInfo:
        # keep_cache: every write goes through this daemon, so pages the kernel cached
        # from an earlier open are still right, except in --shared mode where another
        # node may have replaced the file.
        shared = self.engine.config.shared
        # direct_io for --shared appends to a plain file, which go to the backing file's own
        # end: through the page cache the kernel cut one write(2) at its page boundaries into
        # several WRITEs, and another node's append landed between them (found by review).
        # Direct, each write(2) up to max_write is one WRITE, so one append.
        direct = shared and bool(flags & os.O_APPEND) and isinstance(handle.file, RawFile)
        return pyfuse3.FileInfo(fh=handle.number, keep_cache=not shared, direct_io=direct)

    def _open_flags(self, flags: int) -> int:
        if self.enable_writeback_cache:
            # The kernel applies O_APPEND itself against its cached size, and reads pages
            # through any handle to fill partially written ones (write-only included).
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    @guarded
    async def open(self, inode, flags, ctx):
        node = self.inodes.get(inode)
        handle = await self.handles.open(node, self._open_flags(flags))
        return self._file_info(handle, flags)

    @guarded
    async def create(self, parent_inode, name, mode, flags, ctx):
        flags = self._open_flags(flags)
        self._check_name(parent_inode, name)
        parent = self.inodes.get(parent_inode)
        try:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC,
                         stat.S_IMODE(mode), dir_fd=parent.fd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            inode, st = self.inodes.lookup_child(parent, name)
            try:
                handle = await self.handles.open(inode, flags)
            except BaseException:
                self.inodes.forget(inode.number, 1)  # the kernel never learns of this entry
                raise
            return self._file_info(handle, flags), self._attrs(inode, self._stat(inode))
        try:
            inode = await self._finish_create(parent, name, ctx, stat.S_IMODE(mode))
        except BaseException:
            os.close(fd)
            _unlink_quietly(parent, name)
            raise
        try:
            handle = await self.handles.attach_container(inode, fd, flags, create=True)
        except BaseException as exc:
            # A failed create leaves nothing: no lookup the kernel would never forget (an
            # O_PATH descriptor per failed create, ENOSPC in a loop), no empty file. Unless
            # another --shared node holds the new file's lock (it is writing it), or wrote it first.
            elsewhere = inode.extra.pop("created_elsewhere", False)
            self.inodes.forget(inode.number, 1)
            if not elsewhere and not (isinstance(exc, OSError) and exc.errno == errno.EBUSY
                                      and self.engine.config.shared):
                _unlink_quietly(parent, name)
            raise
        inode.extra.pop("created_elsewhere", None)
        return self._file_info(handle, flags), self._attrs(inode, self._stat(inode))

    @guarded
    async def read(self, fh, off, size):
        started = time.perf_counter()
        data = await self.handles.get(fh).file.read(off, size)
        self.engine.stats.read_latency.observe(time.perf_counter() - started)
        return data

    @guarded
    async def write(self, fh, off, buf):
        started = time.perf_counter()
        handle = self.handles.get(fh)
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.appends and isinstance(handle.file, ContainerFile):
            off = handle.file.size
        written = await handle.file.write(off, buf)
        self.engine.stats.write_latency.observe(time.perf_counter() - started)
        return written

    @guarded
    async def flush(self, fh):
        handle = self.handles.get(fh)
        # Not a reader's close: it would report (and no longer the writer's) a writer's failure.
        if isinstance(handle.file, ContainerFile) and handle.writable:
            await handle.commit(self.engine.config.sync_on_close, if_changed=True)

    @guarded
    async def fsync(self, fh, datasync):
        await self.handles.get(fh).commit(True)

    @guarded
    async def release(self, fh):
        inode = self.handles.get(fh).inode
        try:
            handle = await self.handles.release(fh)
            file = handle.file
            if isinstance(file, ContainerFile) and file.handles == 0 \
                    and (file.lost_changes or file.lost_at_seq):
                self._drop_kernel_view(inode)
        finally:
            self.inodes.release_open(inode)

    def _drop_kernel_view(self, inode: Inode) -> None:
        """Make the kernel forget a file whose last commit failed, or that refused writes from the
        writeback cache. Its page cache still holds the failed writes, and with the writeback cache it trusts its own size over any getattr, so
        the cached inode has to go: FUSE evicts an inode as soon as nothing holds it, which after
        the last close is only its dentry."""
        try:
            path = os.readlink(inode.proc_path)
            parent_st = os.stat(os.path.dirname(path))
        except OSError as exc:
            log.warning("inode %d: cannot name it to drop the kernel's stale view: %s", inode.number, exc)
            return
        parent = self.inodes.find((parent_st.st_dev, parent_st.st_ino))
        if parent is not None:
            # (the async form: the kernel may be waiting on this thread for a lookup in that directory)
            pyfuse3.invalidate_entry_async(parent.number, os.fsencode(os.path.basename(path)),
                                           ignore_enoent=True)
        # Another name (a hard link) keeps the inode: at least its pages go, off this thread since
        # the kernel may write back through us while it invalidates.
        self.engine.start_background(self._invalidate_pages, inode.number)

    @staticmethod
    async def _invalidate_pages(number: int) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, number, False)
        except OSError:
            pass  # already evicted: nothing is cached

    async def shutdown(self) -> None:
        """Commit every open file durably (on unmount); background rewrites stop early."""
        self.engine.stopping.set()
        await self.handles.commit_all()
        if self.engine.pins is not None:
            await self.handles.copies_done(SHUTDOWN_PIN_WAIT_S)
            # Pins already let go of are freed now rather than left for fsck --repair.
            await trio.to_thread.run_sync(self.engine.pins.drain, SHUTDOWN_PIN_WAIT_S)


def _unlink_quietly(parent, name) -> None:
    try:
        os.unlink(name, dir_fd=parent.fd)
    except OSError as exc:
        log.warning("could not remove %r after its create failed: %s", name, exc)
