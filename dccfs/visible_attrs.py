"""The size and link count a file shows through the mount: a container's logical size, without a delta
base's hidden pin link; read from the backing file once per change and cached on the inode."""
from __future__ import annotations

import os
import stat

from dccfs.chunkfile import ContainerFile
from dccfs.container import Container, ContainerError, pread_exact, read_logical_size
from dccfs.container_records import verified_logical_size
from dccfs.delta_bases import base_link_path
from dccfs.format import HEADER_SIZE, FormatError, Header
from dccfs.handles import is_container_head
from dccfs.inodes import Inode


def _open_backing(inode: Inode, st: os.stat_result) -> int | None:
    """A read descriptor of the inode's backing file, or None if it cannot be opened or is
    no longer the file st describes: these reads run on worker threads, and a rewrite's
    rekey closes the inode's old descriptor, whose number another file may then take."""
    try:
        # O_NOATIME: reading our own header must not change the atime users see.
        fd = inode.open(os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
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
        # (for messages: the /proc/self/fd name said nothing to an operator)
        path = inode.backing_path() or f"<inode {inode.number}>"  # (proc_path would open a descriptor)
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
