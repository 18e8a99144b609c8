"""File contents through a real allow_other mount: truncate and ftruncate, O_APPEND, O_TRUNC, O_EXCL, O_DIRECT."""
from __future__ import annotations

import errno
import mmap
import os

import pytest

from mounting import B, as_user, err, mode_of

pytestmark = pytest.mark.mount


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
