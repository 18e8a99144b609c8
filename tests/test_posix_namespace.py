"""Names through a real allow_other mount: namespace errors, 255-byte names, paths past PATH_MAX, rename, renameat2."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

import pytest

pytestmark = pytest.mark.mount

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old, new, flags):
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- namespace errors ------------------------------------------------------------------------

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
