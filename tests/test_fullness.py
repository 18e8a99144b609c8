"""A full backing filesystem: the backing directory lives on a 40 MiB tmpfs.

A writer streams incompressible data into one file until the backing store is full.
It must get ENOSPC (from write, fsync or close), not EIO and not a hang; files closed
before stay intact; deleting a file makes writing work again; and after a remount the
file that hit ENOSPC reads as a state it really had (a prefix of the stream at least as
long as its last fsync), or fails cleanly with EIO, never as garbage.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import subprocess
import sys
import time

import pytest
from test_delta_mount import series  # noqa: F401 (a fixture)

pytestmark = pytest.mark.mount

TMPFS_SIZE = "40m"
BLOCK = 1 << 20
WRITER_TIMEOUT_S = 15  # filling 40 MiB takes about a second


def stream_block(seed: int, i: int) -> bytes:
    return random.Random(seed * 1_000_003 + i).randbytes(BLOCK)


def stream(seed: int, length: int) -> bytes:
    blocks = [stream_block(seed, i) for i in range(-(-length // BLOCK))]
    return b"".join(blocks)[:length]


@pytest.fixture
def small_backing(tmp_path):
    """Requested before make_mount, so the tmpfs is unmounted after the dccfs mount."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield where / "b"
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Hung(AssertionError):
    pass


def in_child(mount, fn, timeout_s: float = WRITER_TIMEOUT_S):
    """Run fn() in a forked child and return its pickled result. A child stuck in a FUSE
    request cannot be killed, so on a timeout the daemon is killed (which aborts the
    connection and frees the child) and Hung is raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, pickle.dumps(fn()))
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            with os.fdopen(r, "rb") as pipe:
                return pickle.loads(pipe.read())
        time.sleep(0.05)
    mount.expect_errors = True
    mount.kill()  # our own daemon, by PID; unblocks the child with ENOTCONN
    os.waitpid(pid, 0)
    os.close(r)
    raise Hung(f"hung for {timeout_s:.0f}s on a full backing store (daemon killed to free it)")


def fill_until_enospc(path, seed: int) -> dict:
    """Write the stream until an error; report where and what:
    {'errno', 'stage', 'written', 'fsynced'}."""
    report = {"errno": None, "stage": None, "written": 0, "fsynced": 0}
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    i = 0
    try:
        while i < 200:  # 200 MiB is far beyond the tmpfs
            report["stage"] = "write"
            os.write(fd, stream_block(seed, i))
            i += 1
            report["written"] = i * BLOCK
            if i % 4 == 0:
                report["stage"] = "fsync"
                os.fsync(fd)
                report["fsynced"] = i * BLOCK
    except OSError as exc:
        report["errno"] = exc.errno
    return close_and_report(fd, report)


def close_and_report(fd: int, report: dict) -> dict:
    """Close fd; an error there is the report's error if nothing failed before."""
    try:
        os.close(fd)
    except OSError as exc:
        if report["errno"] is None:
            report["errno"], report["stage"] = exc.errno, "close"
    return report


def test_enospc_is_reported_and_recoverable(small_backing, make_mount):
    mount = make_mount("full", backing=small_backing)
    mount.expect_errors = True  # a full disk may be logged as an error; checked below
    keep = {f"keep{i}": random.Random(i).randbytes(6 << 20) for i in range(2)}
    for name, data in keep.items():
        (mount.mnt / name).write_bytes(data)
    seed = random.SystemRandom().randrange(1 << 30)
    report = in_child(mount, lambda: fill_until_enospc(mount.mnt / "big", seed))
    print("writer:", report)
    assert report["errno"] == errno.ENOSPC, \
        f"the writer got {errno.errorcode.get(report['errno'], report['errno'])} at {report['stage']}, not ENOSPC"
    for name, data in keep.items():
        assert (mount.mnt / name).read_bytes() == data, f"{name} changed when the disk filled"

    def big_is_a_real_state(what: str) -> None:
        try:
            got = (mount.mnt / "big").read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, f"{what}: big fails with {exc!r}, not EIO"
            return
        assert len(got) >= report["fsynced"], f"{what}: big lost fsynced data"
        assert got == stream(seed, len(got)), f"{what}: big holds {len(got)} bytes that were never written"

    big_is_a_real_state("before remount")
    # free space and write again
    os.unlink(mount.mnt / "keep1")
    fresh = random.Random(7).randbytes(3 << 20)
    in_child(mount, lambda: (mount.mnt / "fresh").write_bytes(fresh))
    assert (mount.mnt / "fresh").read_bytes() == fresh
    mount.remount()
    assert (mount.mnt / "keep0").read_bytes() == keep["keep0"]
    assert (mount.mnt / "fresh").read_bytes() == fresh
    big_is_a_real_state("after remount")
    log = mount.log_text()
    assert "Traceback" not in log, "the daemon logged a traceback on a full disk:\n" + log[-3000:]
    mount.stop()
    fsck = subprocess.run([sys.executable, "-m", "dccfs.cli", "fsck", "-q", str(mount.backing)],
                          capture_output=True, text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    if fsck.returncode == 1:  # a torn tail from the failed append: repair cuts it
        fsck = subprocess.run([sys.executable, "-m", "dccfs.cli", "fsck", "-q", "--repair",
                               str(mount.backing)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_enospc_on_small_writes_then_delete_frees(small_backing, make_mount):
    """Many small files until the disk is full: creating or closing one fails with ENOSPC;
    every file closed without error before reads back; a delete makes room again."""
    mount = make_mount("full2", backing=small_backing)
    mount.expect_errors = True

    def fill():
        names = []
        for i in range(2000):
            try:
                with open(mount.mnt / f"f{i}", "wb") as f:
                    f.write(random.Random(i).randbytes(256 << 10))
            except OSError as exc:
                return names, exc.errno
            names.append(f"f{i}")
        return names, None

    names, failure = in_child(mount, fill)
    assert failure == errno.ENOSPC, errno.errorcode.get(failure, failure)
    written = {name: random.Random(int(name[1:])).randbytes(256 << 10) for name in names}
    for name, data in written.items():
        assert (mount.mnt / name).read_bytes() == data
    for name in list(written)[:8]:
        os.unlink(mount.mnt / name)
        del written[name]
    in_child(mount, lambda: (mount.mnt / "again").write_bytes(b"a" * 100_000))
    mount.remount()
    assert (mount.mnt / "again").read_bytes() == b"a" * 100_000
    for name, data in written.items():
        assert (mount.mnt / name).read_bytes() == data


def pad_until_full(directory, prefix: str, size: int):
    """Write files of `size` random bytes until one fails; its errno (None if all fit)."""
    for i in range(1000):
        try:
            with open(directory / f"{prefix}{i}", "wb") as f:
                f.write(random.Random(i).randbytes(size))
        except OSError as exc:
            return exc.errno
    return None


def settled_free_bytes(path, polls: int = 5, interval_s: float = 0.2) -> int:
    """Free bytes of the filesystem holding path once unchanged over `polls` polls (at most 10 s)."""
    deadline = time.monotonic() + 10
    last, same = None, 0
    while time.monotonic() < deadline:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        same = same + 1 if free == last else 0
        if same >= polls:
            break
        last = free
        time.sleep(interval_s)
    return last


def test_creates_failing_on_a_full_disk_leave_nothing_behind(small_backing, make_mount):
    """A create that fails with ENOSPC (the container header does not fit) leaves no empty
    file and no inode in the daemon's table: each one used to keep an O_PATH descriptor
    until unmount, so a saver retrying on a full disk leaked descriptors without bound."""
    mount = make_mount("full4", backing=small_backing)
    mount.expect_errors = True

    def fill():
        # big incompressible writes, then small files into whatever is left
        try:
            with open(mount.mnt / "filler", "wb") as f:
                for i in range(100):
                    f.write(stream_block(7, i))
                    f.flush()
                    os.fsync(f.fileno())
        except OSError:
            pass
        return pad_until_full(mount.mnt, "pad", 16 << 10)

    assert in_child(mount, fill) == errno.ENOSPC
    # The filler's release is asynchronous: its last chunk can still be failing to append, and
    # holding space for a moment, when a pad gets ENOSPC. Top up with one-byte files until the
    # space is gone for good, so that the creates below really find a full disk.
    for top_up in range(5):
        if settled_free_bytes(small_backing) < 64 << 10:  # fewer pages than the 40 creates need
            break
        assert in_child(mount, lambda: pad_until_full(mount.mnt, f"top{top_up}-", 1)) == errno.ENOSPC
    fds = lambda: len(os.listdir(f"/proc/{mount.proc.pid}/fd"))  # noqa: E731

    def creates():
        failures = []
        for i in range(40):
            try:
                with open(mount.mnt / f"new{i}", "wb") as f:
                    f.write(b"x")
            except OSError as exc:
                failures.append(exc.errno)
        return failures

    before = fds()
    failures = in_child(mount, creates)
    assert failures and set(failures) == {errno.ENOSPC}, failures
    assert fds() - before < 5, (before, fds())
    left = [n for n in os.listdir(mount.mnt) if n.startswith("new")]
    assert len(left) == 40 - len(failures), left


def stream_until_error(path, seed: int) -> dict:
    """Write the stream with no fsync, so unstored chunks pile up against the dirty budget."""
    report = {"errno": None, "stage": "write", "written": 0}
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for i in range(200):
            os.write(fd, stream_block(seed, i))
            report["written"] = (i + 1) * BLOCK
    except OSError as exc:
        report["errno"] = exc.errno
    return close_and_report(fd, report)


def test_enospc_with_a_full_dirty_budget_fails_the_writer(small_backing, make_mount, tmp_path):
    """Chunks that cannot be stored stay dirty and hold the dirty budget; a writer waiting
    for budget must get the store's error, not wait for a release that never comes."""
    config = tmp_path / "small-dirty.toml"
    config.write_text('[cache]\ndirty_bytes = "4MiB"\n')
    mount = make_mount("fulldirty", "-c", str(config), backing=small_backing)
    mount.expect_errors = True
    seed = random.SystemRandom().randrange(1 << 30)
    report = in_child(mount, lambda: stream_until_error(mount.mnt / "big", seed))
    assert report["errno"] == errno.ENOSPC, report
    os.unlink(mount.mnt / "big")
    fresh = random.Random(3).randbytes(3 << 20)
    in_child(mount, lambda: (mount.mnt / "fresh").write_bytes(fresh))
    assert (mount.mnt / "fresh").read_bytes() == fresh


def _push_to_daemon(fd: int) -> None:
    """Hand the kernel's dirty pages of fd to the daemon and wait, without an fsync (no commit)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    write_and_wait = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER
    if libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), write_and_wait) != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range")


def test_a_failed_close_leaves_no_stale_chunk_for_the_next_writer(small_backing, make_mount):
    """A record appended by a close whose commit failed is cut before the next append, and the
    next record of that chunk takes its offset: the chunk cached from the cut record must not
    be served for it (found by review: the failed bytes came back after a later fsync, and a
    small rewrite then stored them)."""
    mount = make_mount("stale", backing=small_backing)
    mount.expect_errors = True  # the failed commit is logged
    chunk = 256 << 10  # a .txt file's chunk
    path = mount.mnt / "f.txt"
    path.write_bytes(os.urandom(4 * chunk))
    free = os.statvfs(small_backing).f_bavail * os.statvfs(small_backing).f_frsize
    filler = small_backing / "filler"  # another user fills the disk, leaving room for about 1.5 chunks
    filler.write_bytes(bytes(max(0, free - chunk - chunk // 2)))
    failed = os.urandom(chunk)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, failed, 0)
        _push_to_daemon(fd)  # chunk 0 appended (and cached), not committed
        os.pwrite(fd, os.urandom(chunk), chunk)  # no room for chunk 1's record
    finally:
        with pytest.raises(OSError) as closing:
            os.close(fd)
    assert closing.value.errno == errno.ENOSPC
    time.sleep(1.5)  # the release retries the commit and gives up
    filler.unlink()
    stored = os.urandom(chunk)
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, stored, 0)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"0123456789", 100)  # a read-modify-write of chunk 0
    os.fsync(fd)
    os.close(fd)
    want = stored[:100] + b"0123456789" + stored[110:]
    with open(path, "rb") as f:
        assert f.read(chunk) == want
    mount.remount()
    with open(path, "rb") as f:
        assert f.read(chunk) == want


def last_close_fails(fd: int, mount) -> None:
    """Close fd, which must fail with ENOSPC, and wait until the daemon has given up on the commit."""
    with pytest.raises(OSError) as closing:
        os.close(fd)
    assert closing.value.errno == errno.ENOSPC
    deadline = time.monotonic() + 10
    while "last commit failed" not in mount.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_after_a_failed_last_close_the_mount_shows_what_is_stored(small_backing, make_mount):
    """A last close whose commit failed leaves the stored state at the last commit; reads through
    the mount must show that state and its size, not the failed writes the kernel still had in its
    page cache (found by review: they stayed visible until a remount)."""
    mount = make_mount("shown", backing=small_backing)
    mount.expect_errors = True  # the failed commit is logged
    chunk = 256 << 10  # a .txt file's chunk
    path = mount.mnt / "f.txt"
    stored = os.urandom(4 * chunk)
    path.write_bytes(stored)
    assert path.read_bytes() == stored  # the kernel caches the pages
    free = os.statvfs(small_backing).f_bavail * os.statvfs(small_backing).f_frsize
    filler = small_backing / "filler"
    filler.write_bytes(bytes(max(0, free - chunk // 2)))  # room for less than one record
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(chunk), 0)
        os.pwrite(fd, os.urandom(2 * chunk), 4 * chunk)  # grows the file
    finally:
        last_close_fails(fd, mount)
    time.sleep(0.5)  # the kernel's view is dropped after the release
    assert os.stat(path).st_size == len(stored)
    assert path.read_bytes() == stored
    filler.unlink()
    mount.remount()
    assert path.read_bytes() == stored


def test_a_failed_last_close_of_a_dependent_keeps_its_base_pinned(small_backing, make_mount, tmp_path, series):
    """The pins a file's deltas need are judged from what is committed: a last close whose commit failed
    (ENOSPC) must not free the base of the deltas still on disk (found by review: with the index in memory,
    which named the failed keyframes, the pin went and the dependent read EIO after a remount)."""
    from safetensors.torch import save
    from test_pins import forced, pins_of
    first, second = (save(sd) for sd in series)
    mount = make_mount("full-dependent", *forced(tmp_path), backing=small_backing)
    mount.expect_errors = True  # the failed stores and commit are logged
    (mount.mnt / "run").mkdir()
    step10, step20 = (mount.mnt / "run" / f"step-{n}.safetensors" for n in (10, 20))
    step10.write_bytes(first)
    step20.write_bytes(second)
    pins = pins_of(mount)
    assert len(pins) == 1
    os.unlink(step10)  # only the pin keeps it now
    free = os.statvfs(small_backing).f_bavail * os.statvfs(small_backing).f_frsize
    filler = small_backing / "filler"
    # room for the overwrite's keyframes, not for what follows: the index in memory then names keyframes only
    filler.write_bytes(bytes(max(0, free - len(second) - (2 << 20))))
    fd = os.open(step20, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(len(second)), 0)  # keyframes over every delta, then more
        os.pwrite(fd, os.urandom(8 << 20), len(second))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        last_close_fails(fd, mount)
    filler.unlink()
    mount.remount()
    assert pins_of(mount) == pins
    assert step20.read_bytes() == second
