"""Owner, group, mode, permission errors and timestamps through a real allow_other mount, as root and other uids."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import time

import pytest

from mounting import A, B, as_user, err, mode_of

pytestmark = pytest.mark.mount

GX = 1003                  # an extra group A is a supplementary member of in some tests

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
AT_FDCWD = -100
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def utimensat(path, atime, mtime):
    """atime/mtime: (sec, nsec) tuples, or UTIME_NOW / UTIME_OMIT."""
    def ts(v):
        return _Timespec(0, v) if isinstance(v, int) else _Timespec(*v)
    times = (_Timespec * 2)(ts(atime), ts(mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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
