"""The pyfuse3 frontend: translates kernel requests into backing *at() calls (open files: fs_files.py).

The handlers of open files are OpenFileHandlers' (fs_files.py), which DccfsOperations
inherits. Every handler goes through `guarded` (fs_errors.py), so an unexpected exception
is logged with its traceback and answered with EIO; the mount never dies on a request.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import trio

from dccfs import syscalls
from dccfs.chunkfile import ContainerFile
from dccfs.engine import Engine
from dccfs.fs_errors import guarded
from dccfs.fs_files import OpenFileHandlers
from dccfs.handles import HandleTable
from dccfs.inodes import ROOT_INODE, Inode
from dccfs.pins import PinTrackingInodeTable
from dccfs.visible_attrs import attrs_need_reading, logical_size, visible_nlink

log = logging.getLogger(__name__)

# POSIX ACLs: the kernel enforces them only for a filesystem that asks for FUSE_POSIX_ACL at
# INIT, which pyfuse3 3.5 does not. Stored on the backing file they would be shown by getfacl
# and ignored by every access check (found by review: a deny entry did not deny), so they are
# refused as unsupported, which is what cp -a, rsync -A and setfacl expect from such a filesystem.
POSIX_ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")


def _invalidate_entry(parent: int, name: bytes) -> None:
    """Ask the kernel to drop an entry, from a queue of pyfuse3's own thread: an entry of the
    directory being listed waits for the listing's lock."""
    pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)


def _refuse_posix_acl(name: bytes) -> None:
    if name in POSIX_ACL_XATTRS:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

STATE_DIR = b".dccfs"

# All changes pass through this daemon, so the kernel may cache names and attributes;
# one second bounds staleness of names, modes and owners when someone edits the backing
# directory directly. Not of a regular file's size and mtime while the writeback cache is
# on: the kernel keeps its own for as long as it caches the inode (writeback_cache =
# false restores the bound). --shared sets both timeouts to 0 and never uses writeback.
DEFAULT_TIMEOUT_S = 1.0


class DccfsOperations(OpenFileHandlers, pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, backing_root: str, root_fd: int, engine: Engine):
        super().__init__()
        self.backing_root = backing_root
        self.engine = engine
        # Tells the pin registry when a container is let go of for good (docs/delta.md).
        self.inodes = PinTrackingInodeTable(root_fd, engine.pins, _invalidate_entry)
        self.handles = HandleTable(engine, backing_root, self.inodes)
        self.timeout = 0.0 if engine.config.shared else DEFAULT_TIMEOUT_S
        # The kernel's writeback cache turns 64 KiB splice writes (cp) and unaligned 1 MiB
        # writes (torch.save) into aligned 1 MiB WRITEs, which halved the daemon's CPU per
        # byte written (docs/performance.md). It trusts its own size and mtime, so not
        # with --shared, where another node changes files behind the kernel's back.
        self.enable_writeback_cache = engine.config.writeback_cache and not engine.config.shared
        self._dirs: dict[int, list] = {}  # handle -> [inode, names, whether a readdir served it]
        self._next_dir = 1
        self.fuse_ready = trio.Event()  # set once the kernel's INIT has been answered

    def init(self) -> None:
        # Called while INIT is handled; libfuse sends the reply before the loop's next
        # checkpoint, so a task woken by this event runs after the reply.
        self.fuse_ready.set()

    # -- attributes ----------------------------------------------------------------

    def _attrs(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.number
        entry.generation = 0
        entry.entry_timeout = self.timeout
        entry.attr_timeout = self.timeout
        entry.st_mode = st.st_mode
        entry.st_nlink = visible_nlink(inode, st, self.backing_root)
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = logical_size(inode, st) if stat.S_ISREG(st.st_mode) else st.st_size
        # Stored bytes, so du shows the saving and du --apparent-size the logical size.
        entry.st_blocks = st.st_blocks
        entry.st_blksize = 128 * 1024
        entry.st_atime_ns = st.st_atime_ns
        mtime, ctime = st.st_mtime_ns, st.st_ctime_ns
        file = inode.extra.get("file")
        if isinstance(file, ContainerFile) and file.mtime_ns is not None:
            # Uncommitted writes changed the file now; the backing file changes at commit.
            mtime = file.mtime_ns
            ctime = max(ctime, file.changed_ns)
        entry.st_mtime_ns = mtime
        entry.st_ctime_ns = ctime
        return entry

    async def _attrs_read(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """_attrs, reading the container's size (and a pinned base's hidden link) on a worker
        thread when no answer is cached: a cold container's verified size costs a header, a
        trailer and an index read (~1 ms each file), which on the trio thread held up every
        other request, e.g. a training job's writes while someone runs ls -l or du."""
        if attrs_need_reading(inode, st):
            await trio.to_thread.run_sync(self._read_attrs, inode, st)
        return self._attrs(inode, st)

    def _read_attrs(self, inode: Inode, st: os.stat_result) -> None:
        logical_size(inode, st)  # both cache their answer in inode.extra
        visible_nlink(inode, st, self.backing_root)

    def _stat(self, inode: Inode) -> os.stat_result:
        return self.inodes.stat(inode)

    def _check_name(self, parent: int, name: bytes) -> None:
        if parent == ROOT_INODE and name == STATE_DIR:
            raise OSError(errno.EPERM, "the name .dccfs is reserved for dccfs state")

    async def _entry(self, parent: Inode, name: bytes) -> pyfuse3.EntryAttributes:
        inode, st = self.inodes.lookup_child(parent, name)
        try:
            return await self._attrs_read(inode, st)
        except BaseException:
            self.inodes.forget(inode.number, 1)  # the kernel never got this reference
            raise

    def _unverified_attrs(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """The backing file's own attributes, not to be cached by the kernel: a directory
        listing shows an entry whose container cannot be read (a damaged header), and a stat
        of it then asks again and gets the error."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.number
        entry.entry_timeout = entry.attr_timeout = 0
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blocks",
                      "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(entry, field, getattr(st, field))
        entry.st_blksize = 128 * 1024
        return entry

    @guarded
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.inodes.get(parent_inode)
        if parent_inode == ROOT_INODE and name == STATE_DIR:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name == b".":
            parent.lookups += 1
            return self._attrs(parent, self._stat(parent))
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)  # the kernel resolves .. itself
        return await self._entry(parent, name)

    @guarded
    async def forget(self, inode_list):
        for number, count in inode_list:
            self.inodes.forget(number, count)

    @guarded
    async def getattr(self, inode, ctx=None):
        node = self.inodes.get(inode)
        return await self._attrs_read(node, self._stat(node))

    @guarded
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.inodes.get(inode)
        if fields.update_size:
            await self._truncate(node, fh, attr.st_size)
        if fields.update_mode and not node.is_symlink:
            os.chmod(node.proc_path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            syscalls.chown_fd(node.fd, attr.st_uid if fields.update_uid else -1,
                              attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = self._stat(node)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(node.proc_path, ns=(atime, mtime))
            file = node.extra.get("file")
            if isinstance(file, ContainerFile) and fields.update_mtime:
                file.set_mtime(mtime)
        return self._attrs(node, self._stat(node))

    # -- namespace -----------------------------------------------------------------

    def _owner(self, parent: Inode, ctx) -> tuple[int, int]:
        """uid and gid for a new object: the caller's, or the directory's group when setgid."""
        pst = self._stat(parent)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
        return ctx.uid, gid

    async def _finish_create(self, parent: Inode, name: bytes, ctx, mode: int | None):
        inode, st = self.inodes.lookup_child(parent, name)
        try:
            uid, gid = self._owner(parent, ctx)
            syscalls.chown_fd(inode.fd, uid, gid)
            if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(inode.proc_path, mode)  # chown cleared them; the caller asked for them
        except BaseException:
            self.inodes.forget(inode.number, 1)  # the failed request returns no entry
            raise
        return inode

    @guarded
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._check_name(parent_inode, name)
        parent = self.inodes.get(parent_inode)
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.fd)
        inode = await self._finish_create(parent, name, ctx, None)
        return self._attrs(inode, self._stat(inode))

    @guarded
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._check_name(parent_inode, name)
        parent = self.inodes.get(parent_inode)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        inode = await self._finish_create(parent, name, ctx, stat.S_IMODE(mode))
        return self._attrs(inode, self._stat(inode))

    @guarded
    async def symlink(self, parent_inode, name, target, ctx):
        self._check_name(parent_inode, name)
        parent = self.inodes.get(parent_inode)
        os.symlink(target, name, dir_fd=parent.fd)
        inode = await self._finish_create(parent, name, ctx, None)
        return self._attrs(inode, self._stat(inode))

    @guarded
    async def readlink(self, inode, ctx):
        return os.readlink(b"", dir_fd=self.inodes.get(inode).fd)

    @guarded
    async def unlink(self, parent_inode, name, ctx):
        self._check_name(parent_inode, name)
        parent = self.inodes.get(parent_inode)
        self.inodes.keep_before_unlink(parent, name)
        os.unlink(name, dir_fd=parent.fd)

    @guarded
    async def rmdir(self, parent_inode, name, ctx):
        self._check_name(parent_inode, name)
        parent = self.inodes.get(parent_inode)
        self.inodes.keep_before_unlink(parent, name)  # (if it is a working directory, it goes on answering)
        os.rmdir(name, dir_fd=parent.fd)

    @guarded
    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        self._check_name(parent_old, name_old)
        self._check_name(parent_new, name_new)
        old_dir = self.inodes.get(parent_old)
        new_dir = self.inodes.get(parent_new)
        moved = [os.stat(name_old, dir_fd=old_dir.fd, follow_symlinks=False)]
        if flags & syscalls.RENAME_EXCHANGE:
            moved.append(os.stat(name_new, dir_fd=new_dir.fd, follow_symlinks=False))
        else:
            self.inodes.keep_before_unlink(new_dir, name_new)  # the name it replaces, if any
        if flags:
            syscalls.rename_at(old_dir.fd, name_old, new_dir.fd, name_new, flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=old_dir.fd, dst_dir_fd=new_dir.fd)
        self.inodes.renamed((moved[0].st_dev, moved[0].st_ino), parent_new, name_new)
        if len(moved) > 1:
            self.inodes.renamed((moved[1].st_dev, moved[1].st_ino), parent_old, name_old)
        self.handles.renamed([(st.st_dev, st.st_ino) for st in moved],
                             any(stat.S_ISDIR(st.st_mode) for st in moved))

    @guarded
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._check_name(new_parent_inode, new_name)
        node = self.inodes.get(inode)
        new_parent = self.inodes.get(new_parent_inode)
        syscalls.link_fd(node.fd, new_parent.fd, new_name)
        return await self._entry(new_parent, new_name)

    # -- directories ---------------------------------------------------------------

    @staticmethod
    def _list(node: Inode) -> list[bytes]:
        dir_fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        try:
            names = sorted(os.listdir(dir_fd))
        finally:
            os.close(dir_fd)
        names = [os.fsencode(n) for n in names]
        if node.number == ROOT_INODE:
            names = [n for n in names if n != STATE_DIR]
        return names

    @guarded
    async def opendir(self, inode, ctx):
        node = self.inodes.get(inode)
        names = self._list(node)
        number = self._next_dir
        self._next_dir += 1
        self._dirs[number] = [node, names, False]
        return number

    @guarded
    async def readdir(self, fh, start_id, token):
        listing = self._dirs[fh]
        node, names, served = listing
        if start_id == 0 and served:
            # rewinddir: POSIX wants the directory as it is now, not as at opendir (found by
            # review: a remove-then-rewind loop saw an empty directory and stopped early).
            names = listing[1] = self._list(node)
        listing[2] = True
        for position in range(start_id, len(names)):
            name = names[position]
            try:
                inode, st = self.inodes.lookup_child(node, name)
            except FileNotFoundError:
                continue  # removed since opendir
            # lookup_child took a lookup reference: the inode stays while the attributes are read
            try:
                attrs = await self._attrs_read(inode, st)
            except OSError:
                attrs = self._unverified_attrs(inode, st)  # the error was logged where it arose
            except BaseException:  # cancelled (unmount): the kernel never gets this reference
                self.inodes.forget(inode.number, 1)
                raise
            if not pyfuse3.readdir_reply(token, name, attrs, position + 1):
                self.inodes.forget(inode.number, 1)
                break

    @guarded
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @guarded
    async def fsyncdir(self, fh, datasync):
        node = self._dirs[fh][0]
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    # -- extended attributes and the rest ----------------------------------------------

    @guarded
    async def setxattr(self, inode, name, value, ctx):
        _refuse_posix_acl(name)
        os.setxattr(self.inodes.get(inode).proc_path, name, value)

    @guarded
    async def getxattr(self, inode, name, ctx):
        _refuse_posix_acl(name)
        try:
            return os.getxattr(self.inodes.get(inode).proc_path, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @guarded
    async def listxattr(self, inode, ctx):
        names = (os.fsencode(n) for n in os.listxattr(self.inodes.get(inode).proc_path))
        return [n for n in names if n not in POSIX_ACL_XATTRS]

    @guarded
    async def removexattr(self, inode, name, ctx):
        _refuse_posix_acl(name)
        try:
            os.removexattr(self.inodes.get(inode).proc_path, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @guarded
    async def statfs(self, ctx):
        st = os.statvfs(self.inodes.get(ROOT_INODE).proc_path)
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, attr, getattr(st, attr))
        return out

    @guarded
    async def access(self, inode, mode, ctx):
        return True  # default_permissions: the kernel has already checked the mode bits
