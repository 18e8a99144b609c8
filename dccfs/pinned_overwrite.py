"""Overwriting a pinned delta base: a fresh container takes its name, the pin keeps the old one.

A container that is the delta base of later files is hard-linked into BACKING/.dccfs/bases
(dccfs.delta), so it is never reset in place: its dependents read its records by offset.
Overwritten through the mount (O_TRUNC, truncate to 0), such a file used to keep every old
record and append the new ones, and a file copied over again and again while it is a base
(fairseq's checkpoint_last.pt, each new checkpoint a delta of it) grew by a whole
checkpoint each time (found by review: 0.54 of its size, then 1.08, 1.62, 2.16, 2.71).
Instead a new empty container is made in BACKING/.dccfs/tmp (on a worker thread) and
renamed over the file's path (on the FUSE thread, with no await between the check that the
path is still this file, the rename and the re-keying of the mount's inode: a rename of
its directory or a lookup in between went to the wrong file, found by review). The path
then holds the new file, the pin the old one, which is freed with its last dependent
(dccfs.pins). A crash before the rename leaves a temporary that the next mount removes;
after it, an empty file, which is what the truncate asked for. The directory is fsynced
by the file's next durable commit (fsync, close), before its records: otherwise data
written and fsynced into the new file could, after a power cut, vanish behind the old file
under the name. (Fsynced in the truncate itself, it left a window in which a reader saw
the old size and read zeros: found by review.) When anything fails, the caller keeps the
old file and appends, as before.
"""
from __future__ import annotations

import logging
import os
from functools import partial

import trio

from dccfs import compaction
from dccfs.container import Container
from dccfs.delta_bases import is_pinned_link
from dccfs.pin_records import STATE_DIR, header_name, torn_tail_may_go

log = logging.getLogger(__name__)


def _tmp_path(container: Container, backing_root: str) -> str:
    return os.path.join(backing_root, STATE_DIR, "tmp", f"{container.header.file_id.hex()}-overwrite.compact")


def only_pinned(container: Container, backing_root: str) -> bool:
    """Whether the only other link to container is its own delta base pin (not a user's hard link)."""
    st = os.fstat(container.fd)
    return st.st_nlink == 2 and is_pinned_link(container.header, backing_root, st)


def make_fresh(container: Container, backing_root: str) -> Container | None:
    """On a worker thread: a new empty container with the old one's owner, mode and
    attributes, fsynced, in the state directory; None (logged) when it cannot be made."""
    tmp = _tmp_path(container, backing_root)
    fd = None
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fresh = Container.create(fd, container.path, container.header.chunk_shift)
        compaction.copy_metadata(container.fd, fd)
        os.fsync(fd)
        return fresh
    except OSError as exc:
        if fd is not None:
            os.close(fd)
            os.unlink(tmp)
        log.warning("%s: overwritten while it is a delta base, and no new file could be made "
                    "(%s): the old records stay in it", container.path, exc)
        return None


def swap_fresh_in(container: Container, fresh: Container, backing_root: str) -> tuple[int, int] | None:
    """On the FUSE thread, with no await until the caller has re-keyed its inode: rename fresh
    over container's path if that path is still container's file and the pin still its only
    other link; returns an O_PATH descriptor of the new file and a descriptor of its directory
    (to fsync), or None (fresh discarded)."""
    tmp = _tmp_path(container, backing_root)
    opath = dir_fd = None
    try:
        # Opened first: nothing may fail after the rename, or the mount and the name would part.
        opath = os.open(f"/proc/self/fd/{fresh.fd}", os.O_PATH | os.O_CLOEXEC)
        path = os.readlink(f"/proc/self/fd/{container.fd}")
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st, here = os.fstat(container.fd), os.stat(path, follow_symlinks=False)
        if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino) or not only_pinned(container, backing_root):
            raise OSError(f"{path} is no longer this file, or it has another link")
        os.rename(tmp, path)
    except OSError as exc:
        log.info("%s: overwritten while it is a delta base; keeping the old file (%s)", container.path, exc)
        for fd in (opath, dir_fd):
            if fd is not None:
                os.close(fd)
        os.close(fresh.fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        return None
    log.info("%s: overwritten while it is a delta base: a new file takes its name, the base "
             "keeps the old one for its dependents", container.path)
    return opath, dir_fd



async def start_over(file) -> bool:
    """Give a ContainerFile being truncated to 0 a new container under its name when it is a
    pinned delta base; False when it is not one, or when that failed (it then appends)."""
    engine, root = file.engine, file.engine.backing_root
    if engine.pins is None or not only_pinned(file.container, root):
        return False
    fresh = await trio.to_thread.run_sync(make_fresh, file.container, root, limiter=engine.io_limiter)
    if fresh is None:
        return False
    # No await from here on: the name is checked, renamed and the inode re-keyed before any
    # other request (a rename of the directory, a lookup) can run.
    swapped = swap_fresh_in(file.container, fresh, root)
    if swapped is None:
        return False
    opath, dir_fd = swapped
    old, file.container = file.container, fresh
    fresh.base_store = engine.bases
    fresh.linked_tail_may_go = partial(torn_tail_may_go, root, header_name(fresh.header))
    file.on_new_container(opath)
    engine.pins.let_go(os.dup(old.fd))
    # Reads and background passes that started before may still use the old descriptor: it
    # is closed with the file (a number reused under them would read another file).
    file.retired_fds.append(old.fd)
    file.sync_directory_first(dir_fd)
    return True
