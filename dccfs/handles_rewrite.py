"""Background rewrites of a closed file (compaction, deltas after close, unpinning): copy, checks, swap-in."""
from __future__ import annotations

import errno
import logging
import os
import stat

import trio

from dccfs import compaction, redelta, unpin
from dccfs.chunkfile import ContainerFile
from dccfs.inodes import ROOT_INODE, Inode
from dccfs.pin_records import header_name

log = logging.getLogger(__name__)


class BackgroundRewrites:
    """HandleTable's part that rewrites closed files in the background. The table provides
    engine, inodes, tmp_dir, rewrite_limiter, _closed_in_background, _close_file and _detach."""

    async def _compact_then_close(self, inode: Inode, file: ContainerFile, redelta_now: bool) -> None:
        try:
            while True:
                async with file.release_lock:
                    if file.closed or file.handles:
                        return  # reopened: its next release decides again
                    copied = (file.container.cache_id, file.container.end)
                    if not file.content_changed:
                        await self._compact(inode, file, redelta.Rewriter(file) if redelta_now else None)
                if file.closed or file.handles or copied == (file.container.cache_id, file.container.end):
                    break
                # Overwritten and closed again while the pass ran (each checkpoint copied over
                # checkpoint_last.pt): that close left the rest to this task, and the new
                # content's put-off deltas need their own pass (it stayed keyframes: last.ckpt
                # at 0.49 of its size instead of 0.0004).
                async with file.release_lock:
                    if file.closed or file.handles:
                        return
                    if file.has_changes:
                        try:
                            await file.commit(self.engine.config.sync_on_close)
                        except OSError:
                            break  # _close_file retries it and reports
                redelta_now = redelta.worth_redelta(file)
                if not redelta_now:
                    break  # a compaction alone waits for the next close
            await self._close_file(inode, file, compact=False)
        finally:
            # No await from here on: a release that still finds the file in the set is
            # one this task's _close_file loop has seen.
            self._closed_in_background.discard(file)
            self.inodes.release_open(inode)

    def offer_unpin_rewrite(self, pin: str, dependent: str, hint: str) -> None:
        """The pin registry's on_orphaned (its thread): only the pin is left of a base, and
        the container named dependent alone needs it."""
        # (The task checks _unpinning: a rewrite ending now would drop the offer of its own close.)
        if self.engine.config.delta_unpin_rewrite and dependent not in self._unpin_tried:
            self.engine.start_background_from_thread(self._unpin_rewrite, pin, dependent, hint)

    async def _unpin_rewrite(self, pin: str, dependent: str, hint: str) -> None:
        """Store the dependent's delta chunks again, as deltas of a newer base or keyframes, so
        that the registry frees the pin (dccfs/unpin.py). A file open or changed meanwhile is
        left as it is."""
        if dependent in self._unpinning or dependent in self._unpin_tried:
            return
        self._unpinning.add(dependent)
        try:
            found = await trio.to_thread.run_sync(unpin.find_dependent, self.backing_root, dependent,
                                                  hint, limiter=self.engine.io_limiter)
            if found is None:
                self._unpin_tried.add(dependent)
                log.info("delta base pin %s has no name left, but its dependent %s is no longer at "
                         "%s (or beside it): the pin stays until that file goes", pin, dependent, hint)
                return
            relpath, superseded = found
            if superseded:
                # Generations only grow, by a rename over the file (swap_in): the old one is gone.
                log.info("%s holds a later generation of %s: its records are stale (a stop or kill "
                         "came right after its rewrite), and go", relpath, dependent)
                self.engine.pins.destroyed(dependent)
                return
            inode = await self._open_for_unpin(relpath, dependent)
            if inode is None:
                return
            file = inode.extra["file"]
            busy = frozenset(self.inodes.get(number).key for number in self.open_files)
            rewriter = unpin.UnpinRewriter(file, pin, relpath, busy)
            try:
                try:
                    await trio.to_thread.run_sync(rewriter.prepare, limiter=self.rewrite_limiter)
                except OSError as exc:
                    self._unpin_tried.add(dependent)
                    log.warning("%s: not stored again without its deleted base: %s", relpath, exc)
                else:
                    async with file.release_lock:
                        if not (file.closed or file.handles or file.content_changed):
                            await self._compact(inode, file, rewriter)
                    if rewriter.gave_up:
                        # Once per container and mount: a pass that gave up (the copy would grow
                        # more than it frees, a chunk unreadable) is not tried again at each
                        # close; one a reopen or a change stopped is, after the last close.
                        self._unpin_tried.add(dependent)
                await self._close_file(inode, file, compact=False)
            finally:
                rewriter.close()
                self._closed_in_background.discard(file)
                self.inodes.release_open(inode)
        finally:
            self._unpinning.discard(dependent)

    async def _open_for_unpin(self, relpath: str, dependent: str) -> Inode | None:
        """The inode of relpath with its container attached and left to this task (its open
        counted, no handle), as after a last release; None when it is open, not the container
        named dependent, or cannot be opened."""
        looked = []
        try:
            parent = self.inodes.get(ROOT_INODE)
            for part in filter(None, relpath.split("/")):
                parent, _ = self.inodes.lookup_child(parent, part)
                looked.append(parent)
            inode = parent
            if not stat.S_ISREG(inode.mode) or "file" in inode.extra:
                return None  # open: its own last close decides what happens to it
            # Read-only: a writable open would start an empty plain file put here meanwhile
            # as a container. The swap-in renames a copy; it never writes to this descriptor.
            handle = await self.open(inode, os.O_RDONLY)
        except OSError as exc:
            log.info("%s: not stored again without its deleted base: %s", relpath, exc)
            return None
        finally:
            for looked_up in looked:
                self.inodes.forget(looked_up.number, 1)
        file = handle.file
        del self._handles[handle.number]
        if not isinstance(file, ContainerFile) or header_name(file.container.header) != dependent:
            if isinstance(file, ContainerFile):
                file.handles -= 1
                await self._close_file(inode, file, compact=False)
            else:
                os.close(file.fd)
            self.inodes.release_open(inode)
            return None
        file.handles -= 1
        self._closed_in_background.add(file)
        return inode

    async def copies_done(self, timeout: float) -> None:
        """Wait (at unmount, after stopping) until the files whose background rewrite closes them
        are closed: an abandoned copy's pin records go with it, the file's delta writer lets its
        base go at that close, and the pins they held are freed only if that comes before the
        registry's last drain (found by a test that failed at times: a copy's record that a stop
        abandoned was left for fsck --repair)."""
        with trio.move_on_after(timeout):
            while self._closed_in_background:
                await trio.sleep(0.02)

    async def _compact(self, inode: Inode, file: ContainerFile,
                       rewriter: compaction.RecordRewriter | None = None) -> None:
        """Compaction, which also re-encodes chunks when given a rewriter (put-off deltas,
        redelta.Rewriter; a deleted base's dependent, unpin.UnpinRewriter). The file's pin
        records are carried over to the copy before the swap when the rewriter keeps them
        (docs/delta.md). Its callers' files are in _closed_in_background while it runs."""
        container = file.container
        pins = self.engine.pins
        copy_name = header_name(container.header.next_generation())
        tmp_path = os.path.join(self.tmp_dir, f"{container.header.file_id.hex()}-{inode.number}.compact")
        before = container.end
        copied = (container.cache_id, before)
        try:
            await trio.to_thread.run_sync(compaction.write_compacted, container, tmp_path, rewriter,
                                          self.engine.stopping, limiter=self.rewrite_limiter)
            # (A keyframe rewrite goes in even with no delta left: its copy names no pin.)
            if rewriter is not None and not rewriter.replaced and rewriter.carries_pin_records \
                    and not compaction.worth_compacting(container):
                raise OSError(errno.ESTALE, "no chunk was re-encoded: the copy would change nothing")
            if rewriter is not None and not rewriter.pays():
                raise OSError(errno.ESTALE, f"the copy would grow by {rewriter.bytes_after - rewriter.bytes_before} "
                                            "bytes, more than it frees")
            if pins is not None and (rewriter is None or rewriter.carries_pin_records):
                await trio.to_thread.run_sync(pins.carry_over, header_name(container.header), copy_name,
                                              limiter=self.engine.io_limiter)
        except OSError as exc:
            if exc.errno in (errno.ESTALE, errno.ECANCELED):
                log.info("%s: background rewrite stopped, file left as it was: %s", container.path,
                         exc.strerror)
            elif file.handles or file.container is not container or (container.cache_id, container.end) != copied:
                # Reopened and overwritten under the copy (O_TRUNC resets the file in place): the
                # read that failed was of records that are gone, not of damaged ones.
                # (its message only: an "[Errno 5]" alarmed a reviewer in a line that reports no damage)
                log.info("%s: background rewrite stopped, the file changed under it: %s", container.path,
                         exc.strerror or exc)
            else:
                what = "compaction" if rewriter is None else f"background rewrite ({rewriter.what})"
                log.warning("%s: %s failed, file left as it was: %s", container.path, what, exc)
            self._abandon_copy(tmp_path, rewriter, copy_name)
            return
        if file.handles or file.content_changed or file.closed or file.container is not container \
                or (container.cache_id, container.end) != copied:
            # Reopened meanwhile, and maybe overwritten (a reset: a new file id) and released
            # again, possibly ending at the same offset: the copy is stale. A pinned base
            # overwritten meanwhile has a new container under its name and left this one as it
            # was; swap_in's checks see the new file, and its size may equal this one's end
            # (found by review G).
            self._abandon_copy(tmp_path, rewriter, copy_name)
            return
        # Kept across the swap, so the pin registry can tell when the replaced file is gone.
        replaced_fd = os.dup(container.fd) if pins is not None else None
        # A pending explicit mtime waits for a commit that the swapped-in file will not have.
        new_fd = compaction.swap_in(tmp_path, container.fd, inode.proc_path, inode.key, before,
                                    file.mtime_ns)
        if new_fd is None:  # refused before the rename, the copy removed
            if replaced_fd is not None:
                os.close(replaced_fd)
            self._abandon_copy(None, rewriter, copy_name)
            return
        self.inodes.rekey(inode, new_fd)
        # The file object still holds the replaced container. Closing it here, before
        # any await, makes the next open read the compacted one; an open that came
        # between this and a later close would write into the replaced, unlinked
        # container and lose those writes at unmount.
        self._detach(inode, file)
        if replaced_fd is not None:
            pins.let_go(replaced_fd)  # after the rekey: no longer an inode of the mount
            # The copy holds the records carried over: those of pins none of its deltas name go (found by
            # review: a compaction with no delta left kept the base pinned under the copy's name).
            pins.closed(copy_name, new_fd)
        self.engine.stats.compactions += 1
        if rewriter is not None:
            rewriter.done(self.engine.stats)
        log.info("%s: compacted %d -> %d bytes", container.path, before,
                 os.fstat(new_fd).st_size)

    def _abandon_copy(self, tmp_path: str | None, rewriter, copy_name: str) -> None:
        """Remove a copy that will not be swapped in, and its pin records (only once it is
        certainly not the file: an unexpected error leaves them, a leak fsck repairs)."""
        if tmp_path is not None:
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass  # write_compacted removes its own on failure
        if self.engine.pins is not None:
            if rewriter is not None:
                rewriter.abandoned(copy_name)
            self.engine.pins.forget_copy(copy_name)
