"""Truncation and commits of an open container file: its size, its durable state, a re-read container."""
from __future__ import annotations

import os
import time

import trio

from dccfs import pinned_overwrite
from dccfs.container import Container
from dccfs.delta import PIN_LOCK
from dccfs.delta_bases import is_pinned_link
from dccfs.pin_records import header_name


class ChunkCommits:
    """Truncate, commit and what goes with them, for ContainerFile (a mixin: ContainerFile.__init__
    sets up the state: engine, container, size, dirty, coder, mtime_ns, _write_lock, ...)."""

    async def truncate(self, new_size: int) -> None:
        cs = self.chunk_size
        async with self._write_lock:
            await self._wait_idle()
            reset = False
            if new_size == 0 and not self.engine.config.shared:
                # Overwrite (O_TRUNC, truncate -s 0): start a fresh container so a file
                # saved again and again under one name does not grow with dead records.
                for idx in list(self.dirty):
                    self._drop_dirty(idx)
                emptied_from = self.cache_id
                # Reads wait: the records go on a worker thread before the size becomes 0, and a
                # read in between found no chunk and answered zeros (found by review E).
                self.resetting = trio.Event()
                try:
                    reset = await trio.to_thread.run_sync(self._reset_unless_linked,
                                                          limiter=self.engine.io_limiter)
                    if not reset:
                        reset = await pinned_overwrite.start_over(self)
                finally:
                    # A reset that failed after emptying the file (its header write) still
                    # left it empty (a new cache id): nothing older may be served.
                    self.cache_id = self.container.cache_id
                    if self.cache_id != emptied_from:
                        self.coder.reset()
                        self.size = 0
                    self.resetting.set()
                    self.resetting = None
            if not reset and new_size < self.size:
                first_gone = -(-new_size // cs)
                inner = new_size % cs
                buf = None
                if inner:
                    # First the chunk that is cut in two, which may wait for budget or
                    # fail: a failed truncate must leave the file as it was.
                    idx = new_size // cs
                    buf = self.dirty.get(idx)
                    if buf is None:
                        buf = await self._make_dirty(idx, truncating=True)
                    else:
                        buf = self._mutable(idx, buf)
                for gone in [i for i in self.dirty if i >= first_gone]:
                    self._drop_dirty(gone)
                self.container.drop_chunks_from(first_gone)
                if buf is not None:
                    del buf[inner:]
                    self.versions[idx] += 1
                if self.inflight:
                    # While this waited for budget, the pressure hook may have started
                    # encodes of chunks past the cut; their records land in the index
                    # when they finish, so drop those chunks again after them.
                    self.size = new_size
                    while self.inflight:
                        await self._wait_idle()
                    self.container.drop_chunks_from(first_gone)
            self.size = new_size
            self.mtime_ns = self.changed_ns = time.time_ns()

    def _reset_unless_linked(self) -> bool:
        """Reset the container in place unless it is a pinned delta base: then its records
        must stay, and the truncation is logged like any other. A user's hard links name the
        same file, so they all see it emptied, as on any file system (they used to keep every
        old record too: a linked file saved ten times stored ten copies, found by review).
        The check and the reset hold the pin lock, so no delta writer pins it in between."""
        with PIN_LOCK:
            st = os.fstat(self.container.fd)
            if st.st_nlink != 1 and is_pinned_link(self.container.header, self.engine.backing_root, st):
                return False
            gone = header_name(self.container.header)
            self.container.reset()
            if self.engine.pins is not None:
                # The old records are gone with the old file id: so are their references.
                self.engine.pins.destroyed(gone)
            return True

    async def commit(self, durable: bool) -> None:
        """Make everything written so far the file's committed state (durable if asked)."""
        async with self._write_lock:
            await self.flush_dirty()
            await trio.to_thread.run_sync(self._commit_sync, durable, limiter=self.engine.io_limiter)

    def sync_directory_first(self, dir_fd: int) -> None:
        """Have the next durable commit fsync dir_fd (then close it) before anything else."""
        self.close_unsynced_dir()
        self._unsynced_dir_fd = dir_fd

    def close_unsynced_dir(self) -> None:
        if self._unsynced_dir_fd is not None:
            os.close(self._unsynced_dir_fd)
            self._unsynced_dir_fd = None

    def _commit_sync(self, durable: bool) -> None:
        if durable and self._unsynced_dir_fd is not None:
            os.fsync(self._unsynced_dir_fd)  # an error fails the commit: fsync/close report it
            self.close_unsynced_dir()
        self.container.commit(self.size, durable)
        if self.mtime_ns is not None:
            st = os.fstat(self.container.fd)
            os.utime(self.container.fd, ns=(st.st_atime_ns, self.mtime_ns))
            self.mtime_ns = None

    def replace_container(self, container: Container) -> None:
        """Adopt a re-read container (another node committed); only when nothing is dirty."""
        assert not self.dirty and not self.inflight
        self.container = container
        container.base_store = self.engine.bases
        self.cache_id = container.cache_id
        self.size = container.size
        self.coder.reset()

    def close_delta_base(self) -> None:
        self.coder.close()

    def set_mtime(self, mtime_ns: int) -> None:
        """An explicit utimens: keep it across the next commit's writes."""
        self.mtime_ns = mtime_ns
