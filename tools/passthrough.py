"""A minimal pyfuse3 passthrough filesystem over O_PATH descriptors: the Python FUSE baseline for bench_fs.py."""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import signal
import stat
import sys

import pyfuse3
import trio

log = logging.getLogger("passthrough")

# Mirror dccfs (dccfs/fs.py, dccfs/daemon.py) wherever it changes what the kernel does,
# so that bench_fs.py compares the file data paths and nothing else:
TIMEOUT_S = 1.0            # entry_timeout / attr_timeout
BLKSIZE = 128 * 1024       # st_blksize: Python's io and stdio size their buffers from it
MIN_TASKS, MAX_TASKS = 4, 64
OPEN_FLAGS_DROPPED = os.O_CREAT | os.O_EXCL | os.O_NOCTTY

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_AT_FDCWD = -100


def _renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    if _libc.renameat2(old_dir, old, new_dir, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fuse_errors(fn):
    """Turn OSError into its errno; anything else is logged and answered with EIO."""
    @functools.wraps(fn)
    async def wrapper(*args):
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class Node:
    """One inode the kernel knows: an O_PATH descriptor to the backing object and a lookup count."""
    __slots__ = ("number", "fd", "key", "lookups")

    def __init__(self, number: int, fd: int, key: tuple[int, int]):
        self.number, self.fd, self.key, self.lookups = number, fd, key, 0

    @property
    def proc(self) -> str:
        return f"/proc/self/fd/{self.fd}"


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False  # as dccfs; --writeback-cache turns it on for experiments

    def __init__(self, backing: str, writeback_cache: bool = False):
        super().__init__()
        self.enable_writeback_cache = writeback_cache
        root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.stat(root_fd)
        root = Node(pyfuse3.ROOT_INODE, root_fd, (st.st_dev, st.st_ino))
        root.lookups = 1 << 62  # never forgotten
        self.nodes: dict[int, Node] = {root.number: root}
        self.by_key: dict[tuple[int, int], Node] = {root.key: root}
        self.next_number = pyfuse3.ROOT_INODE + 1
        self.dirs: dict[int, tuple[Node, list[bytes]]] = {}
        self.files: dict[int, int] = {}  # fh is the backing fd itself
        self.next_dir = 1

    # -- inode table ------------------------------------------------------------------

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.number
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT_S
        a.st_mode, a.st_nlink = st.st_mode, st.st_nlink
        a.st_uid, a.st_gid, a.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        a.st_size, a.st_blocks, a.st_blksize = st.st_size, st.st_blocks, BLKSIZE
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def _child(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """The node for parent/name, created if new; its lookup count is NOT raised."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        node = self.by_key.get(key)
        if node is not None:
            os.close(fd)
            return node, st
        node = Node(self.next_number, fd, key)
        self.next_number += 1
        self.nodes[node.number] = node
        self.by_key[key] = node
        return node, st

    def _node(self, number: int) -> Node:
        try:
            return self.nodes[number]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _entry(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        node, st = self._child(parent, name)
        node.lookups += 1
        return self._attrs(node, st)

    def _forget_one(self, number: int, count: int) -> None:
        node = self.nodes.get(number)
        if node is None or number == pyfuse3.ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self.nodes[number]
            self.by_key.pop(node.key, None)
            os.close(node.fd)

    def close_all(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        for node in self.nodes.values():
            os.close(node.fd)
        self.files.clear()
        self.nodes.clear()
        self.by_key.clear()

    def _chown_new(self, fd_or_path, ctx) -> None:
        # We run as root; give new objects to the caller, as a kernel filesystem would.
        os.chown(fd_or_path, ctx.uid, ctx.gid)

    # -- attributes -------------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        return self._entry(self._node(parent_inode), name)

    @fuse_errors
    async def forget(self, inode_list):
        for number, count in inode_list:
            self._forget_one(number, count)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        node = self._node(inode)
        return self._attrs(node, os.stat(node.fd))

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(self.files[fh], attr.st_size)
            else:
                os.truncate(node.proc, attr.st_size)
        if fields.update_mode:
            os.chmod(node.proc, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(node.proc, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(node.fd)
            os.utime(node.proc, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attrs(node, os.stat(node.fd))

    @fuse_errors
    async def statfs(self, ctx):
        st = os.statvfs(self.nodes[pyfuse3.ROOT_INODE].proc)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    # -- namespace --------------------------------------------------------------------

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._node(parent_inode)
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.fd)
        node, _ = self._child(parent, name)
        self._chown_new(node.proc, ctx)
        node.lookups += 1
        return self._attrs(node, os.stat(node.fd))

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(name, dir_fd=self._node(parent_inode).fd)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(name, dir_fd=self._node(parent_inode).fd)

    @fuse_errors
    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        old_dir, new_dir = self._node(parent_old), self._node(parent_new)
        if flags:
            _renameat2(old_dir.fd, name_old, new_dir.fd, name_new, flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=old_dir.fd, dst_dir_fd=new_dir.fd)

    # -- directories ------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        fd = os.open(node.proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        number = self.next_dir
        self.next_dir += 1
        self.dirs[number] = (node, [os.fsencode(n) for n in names])
        return number

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        node, names = self.dirs[fh]
        for position in range(start_id, len(names)):
            try:
                child, st = self._child(node, names[position])
            except FileNotFoundError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, names[position], self._attrs(child, st), position + 1):
                if child.lookups <= 0:
                    self._forget_one(child.number, 0)
                return
            child.lookups += 1

    @fuse_errors
    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    # -- files ------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        if self.enable_writeback_cache:
            # The kernel appends and fills partial pages itself, reading through any handle.
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    @fuse_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        fd = os.open(node.proc, (self._open_flags(flags) & ~OPEN_FLAGS_DROPPED) | os.O_CLOEXEC)
        self.files[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True, direct_io=False)  # as dccfs

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._node(parent_inode)
        fd = os.open(name, (self._open_flags(flags) & ~os.O_NOCTTY) | os.O_CREAT | os.O_CLOEXEC,
                     stat.S_IMODE(mode), dir_fd=parent.fd)
        try:
            self._chown_new(fd, ctx)
            node, st = self._child(parent, name)
        except BaseException:
            os.close(fd)
            raise
        node.lookups += 1
        self.files[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True, direct_io=False), self._attrs(node, st)

    @fuse_errors
    async def read(self, fh, off, size):
        return await trio.to_thread.run_sync(os.pread, self.files[fh], size, off)

    @fuse_errors
    async def write(self, fh, off, buf):
        return await trio.to_thread.run_sync(os.pwrite, self.files[fh], buf, off)

    @fuse_errors
    async def flush(self, fh):
        pass  # nothing is buffered here

    @fuse_errors
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, self.files[fh])

    @fuse_errors
    async def release(self, fh):
        fd = self.files.pop(fh, None)
        if fd is not None:
            os.close(fd)


def fuse_options(backing: str, extra: list[str]) -> set[str]:
    """The option set dccfs.daemon.fuse_options builds, with subtype=passthrough."""
    options = set(pyfuse3.default_options)
    options |= {"default_permissions", f"fsname={backing}", "subtype=passthrough"}
    options |= {o for o in extra if o not in ("debug", "nonempty")}
    if "debug" in extra:
        options.add("debug")  # libfuse's request trace on stderr
    return options


async def _run(ops: Passthrough) -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    pyfuse3.terminate()
                    return
        nursery.start_soon(stop_on_signal)
        await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (default: fork and detach after mounting)")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="extra FUSE options, e.g. debug or allow_other")
    parser.add_argument("--writeback-cache", action="store_true",
                        help="enable the FUSE writeback cache (dccfs does not; for experiments only)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    extra = [o.strip() for v in args.options for o in v.split(",") if o.strip()]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isdir(args.backing) or not os.path.isdir(args.mountpoint):
        log.error("backing %s and mountpoint %s must both be directories", args.backing, args.mountpoint)
        return 1
    backing = os.path.realpath(args.backing)
    os.umask(0)  # the kernel has already applied the caller's umask to every mode we get
    ops = Passthrough(backing, args.writeback_cache)
    pyfuse3.init(ops, os.path.realpath(args.mountpoint), fuse_options(backing, extra))
    if not args.foreground:
        # Mounted already, so a failure is visible to the caller; the child serves requests.
        if os.fork():
            os._exit(0)
        os.setsid()
    log.info("mounted %s on %s (pid %d)", backing, args.mountpoint, os.getpid())
    try:
        trio.run(_run, ops)
    finally:
        pyfuse3.close(unmount=True)
        ops.close_all()
    log.info("unmounted %s", args.mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
