"""POSIX semantics through a real mount with -o allow_other, as root and as other uids.

Operations as another uid run in a forked child that first changes into a directory of
the mount as root (pytest's temporary directories are 0700, so other uids could not walk
to the mount), then drops to the uid/gid and runs the operation with relative paths.
The child reports its result, or the errno it got, through a pipe.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import pickle
import stat
import time

import pytest

pytestmark = pytest.mark.mount

A, B = 1001, 1002          # two unprivileged users, each with its own primary group
GX = 1003                  # an extra group A is a supplementary member of in some tests

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def renameat2(old, new, flags):
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def utimensat(path, atime, mtime):
    """atime/mtime: (sec, nsec) tuples, or UTIME_NOW / UTIME_OMIT."""
    def ts(v):
        return _Timespec(0, v) if isinstance(v, int) else _Timespec(*v)
    times = (_Timespec * 2)(ts(atime), ts(mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def as_user(cwd, uid, fn, gid=None, groups=(), umask=0o022):
    """Run fn() in a child as uid (gid defaults to uid) with cwd set; return its result or
    the errno (as ('errno', n)) it raised."""
    gid = uid if gid is None else gid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
            try:
                out = ("ok", fn())
            except OSError as exc:
                out = ("errno", exc.errno)
            os.write(w, pickle.dumps(out))
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            try:
                os.write(w, pickle.dumps(("crash", repr(exc))))
            except BaseException:  # noqa: BLE001
                status = 1
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "crash":
        raise AssertionError(f"child crashed: {value}")
    return ("errno", value) if kind == "errno" else value


def err(name):
    return ("errno", getattr(errno, name))


@pytest.fixture
def pm(make_mount):
    """A mount with allow_other and a world-writable sticky scratch directory /pub."""
    mount = make_mount("p", "-o", "allow_other")
    os.chmod(mount.mnt, 0o755)
    pub = mount.mnt / "pub"
    pub.mkdir()
    os.chmod(pub, 0o1777)
    return mount


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- creation: owner, group, mode, umask ---------------------------------------------------

def test_create_owner_mode_and_umask_applied_once(pm):
    pub = pm.mnt / "pub"

    def make():
        fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir("d", 0o777)
        os.mkfifo("p", 0o666)
        os.symlink("f", "l")
        return True

    assert as_user(pub, A, make, umask=0o027) is True
    for name, kind, mode in (("f", stat.S_ISREG, 0o640), ("d", stat.S_ISDIR, 0o750),
                             ("p", stat.S_ISFIFO, 0o640)):
        st = os.lstat(pub / name)
        assert kind(st.st_mode), name
        assert stat.S_IMODE(st.st_mode) == mode, (name, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (A, A), name
        # the backing object carries the same owner and mode
        bst = os.lstat(pm.backing / "pub" / name)
        assert (bst.st_uid, bst.st_gid, stat.S_IMODE(bst.st_mode)) == (A, A, mode)
    st = os.lstat(pub / "l")
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (A, A)
    assert os.readlink(pub / "l") == "f"

    # umask 0: nothing is masked, so the daemon does not apply a umask of its own
    def make0():
        os.close(os.open("f0", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir("d0", 0o777)
        os.mkfifo("p0", 0o666)
        return True

    assert as_user(pub, B, make0, umask=0) is True
    assert mode_of(pub / "f0") == 0o666
    assert mode_of(pub / "d0") == 0o777
    assert mode_of(pub / "p0") == 0o666
    assert os.stat(pub / "f0").st_uid == B


def test_setgid_directory_gives_group_and_inherits(pm):
    d = pm.mnt / "shared"
    d.mkdir()
    os.chown(d, A, GX)
    os.chmod(d, 0o2777)

    def make():
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644))
        os.mkdir("sub", 0o755)
        return True

    assert as_user(d, B, make) is True
    assert os.stat(d / "f").st_gid == GX
    assert os.stat(d / "f").st_uid == B
    st = os.stat(d / "sub")
    assert st.st_gid == GX and st.st_mode & stat.S_ISGID


def test_setgid_on_create_cleared_for_non_member(pm):
    d = pm.mnt / "shared"
    d.mkdir()
    os.chown(d, A, GX)
    os.chmod(d, 0o2777)

    def make():
        os.close(os.open("g", os.O_CREAT | os.O_WRONLY, 0o2755))
        return True

    assert as_user(d, B, make, umask=0) is True  # B is not in GX
    st = os.stat(d / "g")
    assert st.st_gid == GX
    assert not st.st_mode & stat.S_ISGID, oct(st.st_mode)


# -- chmod / chown rules ------------------------------------------------------------------------

def test_chmod_chown_rules(pm):
    pub = pm.mnt / "pub"
    f = pub / "f"
    f.write_bytes(b"x")
    os.chown(f, A, A)
    os.chmod(f, 0o644)
    assert as_user(pub, A, lambda: os.chmod("f", 0o600)) is None
    assert mode_of(f) == 0o600
    assert as_user(pub, B, lambda: os.chmod("f", 0o666)) == err("EPERM")
    assert as_user(pub, B, lambda: os.chown("f", B, B)) == err("EPERM")
    assert as_user(pub, A, lambda: os.chown("f", B, -1)) == err("EPERM")        # give away
    assert as_user(pub, A, lambda: os.chown("f", -1, B)) == err("EPERM")        # not a member
    assert as_user(pub, A, lambda: os.chown("f", -1, GX), groups=[GX]) is None  # member
    assert os.stat(f).st_gid == GX
    assert as_user(pub, A, lambda: os.chown("f", A, -1)) is None                # no-op to self
    # chmod g+s by the owner who is not in the file's group: the bit is silently dropped
    os.chown(f, A, B)
    assert as_user(pub, A, lambda: os.chmod("f", 0o2755)) is None
    assert mode_of(f) == 0o755
    os.chmod(f, 0o644)
    os.chown(f, B, B)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (B, B)
    assert (pm.backing / "pub" / "f").stat().st_uid == B


def test_write_by_non_owner_clears_setuid_setgid(pm):
    pub = pm.mnt / "pub"
    f = pub / "suid"
    f.write_bytes(b"#!/bin/sh\n")
    os.chown(f, A, A)
    os.chmod(f, 0o6777)
    assert mode_of(f) == 0o6777

    def write():
        fd = os.open("suid", os.O_WRONLY | os.O_APPEND)
        try:
            return os.write(fd, b"echo hi\n")
        finally:
            os.close(fd)

    assert as_user(pub, B, write) == 8
    assert mode_of(f) & (stat.S_ISUID | stat.S_ISGID) == 0, oct(mode_of(f))
    assert f.read_bytes() == b"#!/bin/sh\necho hi\n"


def test_truncate_by_non_owner_clears_setuid(pm):
    pub = pm.mnt / "pub"
    f = pub / "suid"
    f.write_bytes(b"abcdef")
    os.chown(f, A, A)
    os.chmod(f, 0o4777)
    assert as_user(pub, B, lambda: os.truncate("suid", 2)) is None
    assert not mode_of(f) & stat.S_ISUID
    assert f.read_bytes() == b"ab"


def test_chown_clears_setuid(pm):
    pub = pm.mnt / "pub"
    f = pub / "suid"
    f.write_bytes(b"x")
    os.chown(f, A, A)
    os.chmod(f, 0o4755)
    os.chown(f, B, B)  # even root's chown clears setuid on Linux
    assert mode_of(f) & stat.S_ISUID == 0, oct(mode_of(f))
    os.chown(f, A, A)
    os.chmod(f, 0o4755)
    assert as_user(pub, A, lambda: os.chown("suid", -1, GX), groups=[GX]) is None
    assert mode_of(f) & stat.S_ISUID == 0, oct(mode_of(f))
    # directories keep their setgid bit across chown
    d = pub / "d"
    d.mkdir()
    os.chmod(d, 0o2775)
    os.chown(d, A, A)
    assert mode_of(d) & stat.S_ISGID


# -- errors -----------------------------------------------------------------------------------

def test_eacces_and_eperm(pm):
    pub = pm.mnt / "pub"
    priv = pub / "priv"
    priv.mkdir(mode=0o755)
    os.chown(priv, A, A)
    (priv / "secret").write_bytes(b"s")
    os.chown(priv / "secret", A, A)
    os.chmod(priv / "secret", 0o600)
    assert as_user(priv, B, lambda: os.open("new", os.O_CREAT | os.O_WRONLY, 0o644)) == err("EACCES")
    assert as_user(priv, B, lambda: os.open("secret", os.O_RDONLY)) == err("EACCES")
    assert as_user(priv, B, lambda: os.unlink("secret")) == err("EACCES")
    assert as_user(priv, B, lambda: os.mkdir("x")) == err("EACCES")
    assert as_user(priv, A, lambda: len(open("secret", "rb").read())) == 1
    os.chmod(priv, 0o700)
    assert as_user(pub, B, lambda: os.listdir("priv")) == err("EACCES")
    assert as_user(pub, B, lambda: os.stat("priv/secret")) == err("EACCES")
    # sticky /pub: B may not remove or rename A's entries
    (pub / "afile").write_bytes(b"a")
    os.chown(pub / "afile", A, A)
    assert as_user(pub, B, lambda: os.unlink("afile")) == err("EPERM")
    assert as_user(pub, B, lambda: os.rename("afile", "bfile")) == err("EPERM")
    assert as_user(pub, A, lambda: os.rename("afile", "afile2")) is None
    assert as_user(pub, B, lambda: os.utime("afile2", ns=(1, 1))) == err("EPERM")
    assert as_user(pub, B, lambda: os.utime("afile2")) == err("EACCES")  # 0644: not writable
    # the reserved state directory name
    with pytest.raises(OSError) as exc:
        (pm.mnt / ".dccfs").mkdir()
    assert exc.value.errno == errno.EPERM


def test_namespace_errors(pm):
    m = pm.mnt
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(b"")
    (m / "file").write_bytes(b"")

    def expect(code, fn, *args, **kw):
        with pytest.raises(OSError) as exc:
            fn(*args, **kw)
        assert exc.value.errno == code, (fn, args, exc.value)

    expect(errno.ENOTEMPTY, os.rmdir, m / "d")
    expect(errno.EISDIR, os.open, m / "d", os.O_WRONLY)
    expect(errno.EISDIR, os.unlink, m / "d")
    expect(errno.ENOTDIR, os.rmdir, m / "file")
    expect(errno.ENOTDIR, os.mkdir, m / "file" / "x")
    expect(errno.ENOTDIR, os.open, m / "file", os.O_RDONLY | os.O_DIRECTORY)
    expect(errno.ENOTDIR, os.listdir, m / "file")
    expect(errno.EEXIST, os.mkdir, m / "d")
    expect(errno.EEXIST, os.open, m / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect(errno.EEXIST, os.link, m / "file", m / "d" / "f")
    expect(errno.EEXIST, os.symlink, "x", m / "file")
    expect(errno.EEXIST, os.mkfifo, m / "file")
    expect(errno.ENAMETOOLONG, os.open, m / ("n" * 256), os.O_CREAT | os.O_WRONLY)
    expect(errno.ENAMETOOLONG, os.mkdir, m / ("n" * 256))
    os.symlink("loop2", m / "loop1")
    os.symlink("loop1", m / "loop2")
    expect(errno.ELOOP, os.open, m / "loop1", os.O_RDONLY)
    expect(errno.ELOOP, os.stat, m / "loop1")
    os.symlink("file", m / "tofile")
    expect(errno.ELOOP, os.open, m / "tofile", os.O_RDONLY | os.O_NOFOLLOW)
    expect(errno.ENOENT, os.stat, m / "missing")
    expect(errno.ENOENT, os.rename, m / "missing", m / "x")


# -- long names and long paths ------------------------------------------------------------------

def test_name_of_255_bytes(pm):
    m = pm.mnt
    name = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(os.fsencode(name)) == 255
    (m / name).write_bytes(b"long")
    assert (m / name).read_bytes() == b"long"
    assert name in os.listdir(m)
    other = "y" * 255
    os.rename(m / name, m / other)
    os.mkdir(m / ("d" * 255))
    os.symlink(other, m / ("s" * 255))
    assert (m / ("s" * 255)).read_bytes() == b"long"
    pm.remount()
    assert (m / other).read_bytes() == b"long"
    assert sorted(os.listdir(m)) == sorted(["pub", other, "d" * 255, "s" * 255])


def test_paths_longer_than_path_max(pm):
    depth, seg = 24, "p" * 200  # ~4.8 KB below the mount, more in the backing directory
    payload = os.urandom(300_000)
    fds = [os.open(pm.mnt, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            os.mkdir(seg, dir_fd=fds[-1])
            fds.append(os.open(seg, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        fd = os.open("deep.bin", os.O_CREAT | os.O_RDWR, 0o644, dir_fd=fds[-1])
        os.write(fd, payload)
        os.close(fd)
        os.symlink("deep.bin", "deep.lnk", dir_fd=fds[-1])
        os.link("deep.bin", "deep.hard", src_dir_fd=fds[-1], dst_dir_fd=fds[-1])
        os.rename("deep.hard", "deep.hard2", src_dir_fd=fds[-1], dst_dir_fd=fds[-1])
        os.chmod("deep.bin", 0o600, dir_fd=fds[-1])
        assert stat.S_IMODE(os.stat("deep.bin", dir_fd=fds[-1]).st_mode) == 0o600
    finally:
        for fd in fds:
            os.close(fd)
    full = "/".join([str(pm.mnt)] + [seg] * depth + ["deep.bin"])
    assert len(full) > 4096 and len(str(pm.backing) + full[len(str(pm.mnt)):]) > len(full)
    with pytest.raises(OSError) as exc:
        os.stat(full)
    assert exc.value.errno == errno.ENAMETOOLONG
    pm.remount()

    def walk_down():
        fd = os.open(pm.mnt, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(depth):
            nxt = os.open(seg, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd

    fd = walk_down()
    try:
        for name in ("deep.bin", "deep.lnk", "deep.hard2"):
            f = os.open(name, os.O_RDONLY, dir_fd=fd)
            try:
                got = b"".join(iter(lambda: os.read(f, 1 << 20), b""))
            finally:
                os.close(f)
            assert got == payload, name
        assert os.stat("deep.bin", dir_fd=fd).st_nlink == 2
        assert sorted(os.listdir(fd)) == ["deep.bin", "deep.hard2", "deep.lnk"]
        os.unlink("deep.hard2", dir_fd=fd)
        os.unlink("deep.lnk", dir_fd=fd)
        os.unlink("deep.bin", dir_fd=fd)
    finally:
        os.close(fd)


# -- rename matrix --------------------------------------------------------------------------------

def test_rename_matrix(pm):
    m = pm.mnt
    (m / "a").write_bytes(b"A")
    (m / "b").write_bytes(b"B")
    os.rename(m / "a", m / "b")  # file over file
    assert (m / "b").read_bytes() == b"A" and not (m / "a").exists()

    (m / "d1").mkdir()
    (m / "d1" / "x").write_bytes(b"X")
    (m / "empty").mkdir()
    os.rename(m / "d1", m / "empty")  # dir over empty dir
    assert (m / "empty" / "x").read_bytes() == b"X" and not (m / "d1").exists()

    (m / "full").mkdir()
    (m / "full" / "y").write_bytes(b"Y")
    with pytest.raises(OSError) as exc:
        os.rename(m / "empty", m / "full")  # dir over non-empty dir
    assert exc.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(OSError) as exc:
        os.rename(m / "empty", m / "empty" / "inner")  # into itself
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        os.rename(m / "empty", m / "b")  # dir over file
    assert exc.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as exc:
        os.rename(m / "b", m / "full")  # file over dir
    assert exc.value.errno == errno.EISDIR

    os.rename(m / "empty" / "x", m / "full" / "x")  # across directories
    assert (m / "full" / "x").read_bytes() == b"X"
    assert os.listdir(m / "empty") == []

    # with an open file, on both sides
    fd = os.open(m / "full" / "x", os.O_RDWR)
    victim = os.open(m / "b", os.O_RDONLY)
    os.rename(m / "full" / "x", m / "b")
    os.pwrite(fd, b"Z", 1)
    os.fsync(fd)
    assert os.pread(victim, 10, 0) == b"A"  # the replaced file stays readable while open
    os.close(victim)
    os.close(fd)
    assert (m / "b").read_bytes() == b"XZ"

    # with hard links
    os.link(m / "b", m / "b2")
    os.rename(m / "b", m / "b2")  # same inode: POSIX says do nothing
    assert (m / "b").exists() and (m / "b2").exists()
    os.rename(m / "b2", m / "full" / "moved")
    assert os.stat(m / "b").st_nlink == 2
    assert os.stat(m / "b").st_ino == os.stat(m / "full" / "moved").st_ino
    (m / "c").write_bytes(b"C")
    os.rename(m / "c", m / "b")  # over one name of a linked file
    assert (m / "b").read_bytes() == b"C"
    assert (m / "full" / "moved").read_bytes() == b"XZ"
    assert os.stat(m / "full" / "moved").st_nlink == 1
    pm.remount()
    assert (m / "b").read_bytes() == b"C"
    assert (m / "full" / "moved").read_bytes() == b"XZ"
    assert sorted(os.listdir(m / "full")) == ["moved", "y"]


def test_renameat2_noreplace_and_exchange(pm):
    m = pm.mnt
    (m / "a").write_bytes(b"A" * 1000)
    (m / "b").write_bytes(b"B" * 2000)
    with pytest.raises(OSError) as exc:
        renameat2(m / "a", m / "b", RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    renameat2(m / "a", m / "c", RENAME_NOREPLACE)
    assert (m / "c").read_bytes() == b"A" * 1000
    renameat2(m / "b", m / "c", RENAME_EXCHANGE)
    assert (m / "c").read_bytes() == b"B" * 2000
    assert (m / "b").read_bytes() == b"A" * 1000
    assert (m / "c").stat().st_size == 2000 and (m / "b").stat().st_size == 1000
    (m / "dir").mkdir()
    (m / "dir" / "inside").write_bytes(b"i")
    renameat2(m / "dir", m / "b", RENAME_EXCHANGE)  # file <-> dir
    assert (m / "b" / "inside").read_bytes() == b"i"
    assert (m / "dir").read_bytes() == b"A" * 1000
    with pytest.raises(OSError) as exc:
        renameat2(m / "nope", m / "c", RENAME_EXCHANGE)
    assert exc.value.errno == errno.ENOENT
    pm.remount()
    assert (m / "b" / "inside").read_bytes() == b"i"
    assert (m / "dir").read_bytes() == b"A" * 1000
    assert (m / "c").read_bytes() == b"B" * 2000


# -- timestamps ----------------------------------------------------------------------------------

def _old_times(f):
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    st = os.stat(f)
    assert st.st_mtime_ns == 1_000_000_000
    time.sleep(0.01)
    return st


def test_write_and_truncate_update_mtime(pm):
    f = pm.mnt / "t"
    f.write_bytes(b"x" * 100)
    before = _old_times(f)
    with open(f, "r+b") as fh:
        fh.write(b"y")
        fh.flush()
        assert os.fstat(fh.fileno()).st_mtime_ns > before.st_mtime_ns, "not updated while open"
    assert os.stat(f).st_mtime_ns > before.st_mtime_ns
    before = _old_times(f)
    os.truncate(f, 10)
    assert os.stat(f).st_mtime_ns > before.st_mtime_ns
    before = _old_times(f)
    with open(f, "r+b") as fh:
        os.ftruncate(fh.fileno(), 50)
        assert os.fstat(fh.fileno()).st_mtime_ns > before.st_mtime_ns
    st = os.stat(f)
    assert st.st_mtime_ns > before.st_mtime_ns and st.st_size == 50
    pm.remount()
    assert os.stat(f).st_mtime_ns > before.st_mtime_ns


def test_write_updates_ctime(pm):
    f = pm.mnt / "t"
    f.write_bytes(b"x" * 100)
    before = os.stat(f)
    time.sleep(0.01)
    with open(f, "r+b") as fh:
        fh.write(b"y")
        fh.flush()
        assert os.fstat(fh.fileno()).st_ctime_ns > before.st_ctime_ns, "ctime unchanged while open"
    assert os.stat(f).st_ctime_ns > before.st_ctime_ns, "ctime unchanged right after close"


def test_ftruncate_updates_ctime(pm):
    f = pm.mnt / "t"
    f.write_bytes(b"x" * 100)
    before = os.stat(f)
    time.sleep(0.01)
    with open(f, "r+b") as fh:
        os.ftruncate(fh.fileno(), 50)
        assert os.fstat(fh.fileno()).st_ctime_ns > before.st_ctime_ns, "unchanged while open"
    assert os.stat(f).st_ctime_ns > before.st_ctime_ns, "ctime unchanged right after close"


def test_truncate_by_path_updates_ctime(pm):
    f = pm.mnt / "t"
    f.write_bytes(b"x" * 100)
    before = os.stat(f)
    time.sleep(0.01)
    os.truncate(f, 10)
    assert os.stat(f).st_ctime_ns > before.st_ctime_ns


def test_utime_explicit_ns_survives_close_and_remount(pm):
    f = pm.mnt / "u"
    f.write_bytes(b"data" * 1000)
    os.utime(f, ns=(1_234_567_890_123_456_789, 1_111_111_111_987_654_321))
    st = os.stat(f)
    assert st.st_atime_ns == 1_234_567_890_123_456_789
    assert st.st_mtime_ns == 1_111_111_111_987_654_321
    # set while open and written: the explicit mtime wins over the commit on close
    with open(f, "r+b") as fh:
        fh.write(b"z")
        fh.flush()
        os.utime(f, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    assert os.stat(f).st_mtime_ns == 2_000_000_000_000_000_000
    pm.remount()
    assert os.stat(f).st_mtime_ns == 2_000_000_000_000_000_000
    d = pm.mnt / "dir"
    d.mkdir()
    os.utime(d, ns=(5, 7_000_000_001))
    assert os.stat(d).st_mtime_ns == 7_000_000_001


def test_utimensat_now_and_omit(pm):
    f = pm.mnt / "n"
    f.write_bytes(b"n")
    utimensat(f, (100, 5), (200, 6))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (100_000_000_005, 200_000_000_006)
    utimensat(f, UTIME_OMIT, (300, 0))
    assert os.stat(f).st_mtime_ns == 300_000_000_000
    before = time.time_ns()
    utimensat(f, UTIME_NOW, UTIME_OMIT)
    st = os.stat(f)
    assert st.st_atime_ns >= before - 2_000_000_000 and st.st_mtime_ns == 300_000_000_000
    utimensat(f, UTIME_OMIT, UTIME_NOW)
    assert os.stat(f).st_mtime_ns >= before - 2_000_000_000
    # UTIME_NOW needs only write permission, explicit times need ownership
    os.chmod(f, 0o666)
    os.chown(f, A, A)
    assert as_user(pm.mnt, B, lambda: utimensat("n", UTIME_NOW, UTIME_NOW)) is None
    assert as_user(pm.mnt, B, lambda: utimensat("n", (1, 0), (1, 0))) == err("EPERM")
    assert as_user(pm.mnt, A, lambda: utimensat("n", (1, 0), (2, 0))) is None
    assert os.stat(f).st_mtime_ns == 2_000_000_000


def test_explicit_atime_is_kept(pm):
    f = pm.mnt / "n"
    f.write_bytes(b"n")
    utimensat(f, (100, 5), (200, 6))
    utimensat(f, UTIME_OMIT, (300, 0))
    assert os.stat(f).st_atime_ns == 100_000_000_005
    time.sleep(1.2)  # past the attribute cache
    assert os.stat(f).st_atime_ns == 100_000_000_005


# -- truncate, open flags ------------------------------------------------------------------------

def test_truncate_and_ftruncate(pm):
    f = pm.mnt / "tr"
    data = os.urandom(700_000)
    f.write_bytes(data)
    os.truncate(f, 500_000)
    assert f.read_bytes() == data[:500_000]
    os.truncate(f, 900_000)
    assert f.read_bytes() == data[:500_000] + bytes(400_000)
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"Q" * 10, 899_995)  # straddles the old end
        os.ftruncate(fd, 3)
        assert os.pread(fd, 100, 0) == data[:3]
        assert os.fstat(fd).st_size == 3
        os.ftruncate(fd, 0)
        assert os.pread(fd, 100, 0) == b""
        os.pwrite(fd, b"end", 262_144 * 2 + 7)
        assert os.fstat(fd).st_size == 262_144 * 2 + 10
    finally:
        os.close(fd)
    pm.remount()
    assert f.read_bytes() == bytes(262_144 * 2 + 7) + b"end"
    ro = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.ftruncate(ro, 0)
        assert exc.value.errno in (errno.EINVAL, errno.EBADF)
    finally:
        os.close(ro)
    assert as_user(pm.mnt, B, lambda: os.truncate("tr", 0)) == err("EACCES")


def test_o_append_o_trunc_o_excl(pm):
    f = pm.mnt / "ap"
    f.write_bytes(b"start")
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    other = os.open(f, os.O_WRONLY)
    try:
        os.write(fd, b"-one")
        os.pwrite(other, b"XXXXXXXXXXXXXX", 0)  # extends the file through another handle
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"-two")  # O_APPEND writes at the end regardless of the offset
    finally:
        os.close(fd)
        os.close(other)
    assert f.read_bytes() == b"XXXXXXXXXXXXXX-two"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert f.read_bytes() == b"new"
    # O_TRUNC while another handle holds the file open and has unflushed writes
    a = os.open(f, os.O_RDWR)
    try:
        os.pwrite(a, b"Y" * 300_000, 0)
        b = os.open(f, os.O_RDWR | os.O_TRUNC)
        try:
            assert os.fstat(b).st_size == 0
            assert os.pread(a, 10, 0) == b""
            os.pwrite(b, b"after", 0)
        finally:
            os.close(b)
    finally:
        os.close(a)
    assert f.read_bytes() == b"after"
    with pytest.raises(FileExistsError):
        os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(pm.mnt / "excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    assert mode_of(pm.mnt / "excl") == 0o600
    os.symlink("dangling-target", pm.mnt / "dangling")
    with pytest.raises(FileExistsError):  # O_EXCL never follows a symlink
        os.open(pm.mnt / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    pm.remount()
    assert f.read_bytes() == b"after"


def test_o_direct_aligned_io(pm):
    """O_DIRECT either works with aligned buffers or open fails cleanly with EINVAL.
    On this kernel and FUSE setup it works (the test records which by asserting on it)."""
    f = pm.mnt / "direct"
    size = 3 * 262_144 + 8192
    pattern = os.urandom(size)
    try:
        fd = os.open(f, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        pytest.skip("O_DIRECT open fails with EINVAL (clean refusal)")
    try:
        buf = mmap.mmap(-1, size)
        buf.write(pattern)
        assert os.pwrite(fd, buf, 0) == size
        out = mmap.mmap(-1, size)
        assert os.preadv(fd, [out], 0) == size
        assert out[:] == pattern
        # an aligned rewrite in the middle, read back through a second O_DIRECT buffer
        patch = mmap.mmap(-1, 4096)
        patch.write(b"\xab" * 4096)
        assert os.pwrite(fd, patch, 262_144 - 2048 - 2048) == 4096
        os.fsync(fd)
        expect = bytearray(pattern)
        expect[262_144 - 4096:262_144] = b"\xab" * 4096
        out2 = mmap.mmap(-1, size)
        assert os.preadv(fd, [out2], 0) == size
        assert out2[:] == bytes(expect)
    finally:
        os.close(fd)
    assert f.read_bytes() == bytes(expect)  # buffered reads agree after close
    pm.remount()
    assert f.read_bytes() == bytes(expect)
