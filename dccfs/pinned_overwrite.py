"""Overwriting a pinned delta base: a fresh container takes its name, the pin keeps the old one.

A container that is the delta base of later files is hard-linked into BACKING/.dccfs/bases
(dccfs.delta), so it is never reset in place: its dependents read its records by offset.
Overwritten through the mount (O_TRUNC, truncate to 0), such a file used to keep every old
record and append the new ones, and a file copied over again and again while it is a base
(fairseq's checkpoint_last.pt, each new checkpoint a delta of it) grew by a whole
checkpoint each time (found by review: 0.54 of its size, then 1.08, 1.62, 2.16, 2.71).
Instead a new empty container is created in BACKING/.dccfs/tmp and renamed over the file's
path: the path holds the new file, the pin the old one, which is freed with its last
dependent (dccfs.pins). A crash before the rename leaves a temporary that the next mount
removes; after it, an empty file, which is what the truncate asked for.
"""
from __future__ import annotations

import logging
import os

from dccfs import compaction
from dccfs.container import Container
from dccfs.delta import PIN_LOCK
from dccfs.delta_bases import base_link_path

log = logging.getLogger(__name__)


def start_over_beside_pin(container: Container, backing_root: str) -> tuple[Container, int] | None:
    """A fresh empty container renamed over the path of container, when the only other link
    to it is its own delta base pin; returns it and an O_PATH descriptor of the new file, or
    None (a user's hard link, or no pin: the caller keeps the old file)."""
    header = container.header
    pin = base_link_path(backing_root, header.file_id, header.generation)
    # Under the pin lock: no pin can be made, and none freed, between the check and the rename.
    with PIN_LOCK:
        st = os.fstat(container.fd)
        if st.st_nlink != 2:
            return None
        try:
            pinned = os.stat(pin, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if (pinned.st_dev, pinned.st_ino) != (st.st_dev, st.st_ino):
            return None
        path = os.readlink(f"/proc/self/fd/{container.fd}")
        if path.endswith(" (deleted)") or not os.path.isabs(path):
            return None
        tmp = os.path.join(backing_root, ".dccfs", "tmp", f"{header.file_id.hex()}-overwrite.compact")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fresh = Container.create(fd, container.path, header.chunk_shift)
            compaction.copy_metadata(container.fd, fd)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        # Through the descriptor, not the path: a rename through the mount may come meanwhile.
        opath = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
    log.info("%s: overwritten while it is a delta base: a new file takes its name, the base "
             "keeps the old one for its dependents", container.path)
    return fresh, opath
