"""The control channel and the trace under hostile or careless use, on real mounts (found by review, 2026-12-06)."""
from __future__ import annotations

import contextlib
import csv
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dccfs.control_socket import request, socket_path
from dccfs.trace import read_oracle_general

pytestmark = pytest.mark.mount

DCCFS = [sys.executable, "-m", "dccfs.cli"]
MIB = 1 << 20


def dccfs(*args, timeout=60):
    return subprocess.run([*DCCFS, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def settings(mnt) -> dict:
    return request(str(mnt), {"cmd": "stats"})["cache"]


def test_trace_targets_that_would_block_the_daemon_are_refused(mounted, tmp_path):
    """A trace inside the mount itself (each write would wait on the daemon, which waited in
    open() on its own mount: every access hung), or a FIFO (open blocked until a reader came),
    is refused with its reason, and the mount goes on serving."""
    (mounted.mnt / "f").write_bytes(b"data")
    result = dccfs("tune", mounted.mnt, f"trace={mounted.mnt / 'self.trace'}", timeout=30)
    assert result.returncode == 1 and "inside the mount" in result.stderr, result
    assert not (mounted.mnt / "self.trace").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = dccfs("tune", mounted.mnt, f"trace={fifo}", timeout=30)
    assert result.returncode == 1 and str(fifo) in result.stderr, result
    assert (mounted.mnt / "f").read_bytes() == b"data"
    assert settings(mounted.mnt)["trace"] == "off"


def test_a_mount_refuses_a_trace_inside_its_mountpoint(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    result = dccfs("mount", "--trace", tmp_path / "m" / "x.trace", tmp_path / "b", tmp_path / "m")
    if result.returncode == 0:  # mounted after all: unmount before failing
        if dccfs("umount", tmp_path / "m").returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "m")])
    assert result.returncode == 1 and "inside the mountpoint" in result.stderr, result
    assert not os.listdir(tmp_path / "m")  # nothing hidden under the mountpoint


def test_a_tune_that_fails_changes_nothing(mounted, tmp_path):
    before = settings(mounted.mnt)
    result = dccfs("tune", mounted.mnt, "policy=lru", "t0_bytes=8MiB", f"trace={tmp_path / 'missing' / 'x'}")
    assert result.returncode == 1 and "No such file or directory" in result.stderr, result
    assert settings(mounted.mnt) == before
    reply = request(str(mounted.mnt), [1, 2])
    assert reply["ok"] is False and "JSON object" in reply["error"], reply
    reply = request(str(mounted.mnt), {"cmd": "tune", "set": {"trace": "relative.trace"}})
    assert reply["ok"] is False and "absolute path" in reply["error"], reply


def test_restarting_a_trace_on_its_own_file_keeps_only_the_new_recording(mounted, tmp_path):
    """The new writer used to empty the file before the old one wrote its last buffer over it:
    thousands of all-zero records."""
    trace = tmp_path / "t.trace"
    (mounted.mnt / "f").write_bytes(os.urandom(4 * MIB))

    def direct_reads(n: int) -> None:  # each one a READ, so a trace record (24 bytes)
        buf = mmap.mmap(-1, 4096)
        fd = os.open(mounted.mnt / "f", os.O_RDONLY | os.O_DIRECT)
        try:
            for i in range(n):
                assert os.preadv(fd, [buf], (i * 4096) % (4 * MIB)) == 4096
        finally:
            os.close(fd)
            buf.close()

    assert dccfs("tune", mounted.mnt, f"trace={trace}").returncode == 0
    direct_reads(4000)  # 96,000 bytes: one 64 KiB flush, the rest still buffered
    assert dccfs("tune", mounted.mnt, f"trace={trace}").returncode == 0
    direct_reads(100)
    assert dccfs("tune", mounted.mnt, "trace=off").returncode == 0
    records = read_oracle_general(trace)
    assert 100 <= len(records) < 4000
    assert not ((records["obj_id"] == 0) & (records["size"] == 0)).any()


def test_reads_and_writes_of_a_chunk_are_traced_with_one_size(make_mount, tmp_path):
    """A read was traced with its stored record's length, a write with the chunk's length: a
    replay then weighed one chunk two ways (T0 charges the decoded length)."""
    mount = make_mount()
    trace = tmp_path / "t.csv"
    assert dccfs("tune", mount.mnt, f"trace={trace}").returncode == 0
    data = b"".join(i.to_bytes(4, "little") * 1000 for i in range(700))  # compressible: records are shorter
    (mount.mnt / "f.txt").write_bytes(data)
    assert dccfs("tune", mount.mnt, "t0_bytes=0").returncode == 0  # every read is a miss
    with open(mount.mnt / "f.txt", "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the reads reach the daemon
        assert f.read() == data
    assert dccfs("tune", mount.mnt, "trace=off").returncode == 0
    sizes: dict[str, set] = {}
    with open(trace) as f:
        for row in csv.DictReader(f):
            sizes.setdefault(row["obj_id"], set()).add((row["op"], int(row["size"])))
    ops = {op for seen in sizes.values() for op, _ in seen}
    assert ops == {"r", "w"}
    assert all(len({size for _, size in seen}) == 1 for seen in sizes.values()), sizes


def _hold_connections_as_nobody(mnt, count: int, hold_s: float) -> int:
    """A child of uid 65534 that opens count connections to the control socket, sends nothing
    and holds them for hold_s; returns its pid once they are open."""
    path = socket_path(str(mnt))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            held = []
            for _ in range(count):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(5)
                try:
                    sock.connect(path)
                except OSError:
                    sock.close()
                    continue
                held.append(sock)
            os.write(write_end, str(len(held)).encode())
            time.sleep(hold_s)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        # One write, read as it comes: reading to the end waited for the child's exit (hold_s).
        assert int(os.read(read_end, 32) or 0) > 0
    finally:
        os.close(read_end)
    return pid


def test_another_users_idle_connections_never_lock_the_owner_out(mounted):
    """Another user's connections are answered and closed at once, before any read: a flood of
    idle ones used to fill the daemon's descriptors, and the control server then stopped for
    good (stats and tune unavailable until a remount)."""
    pid = _hold_connections_as_nobody(mounted.mnt, 200, 20)
    try:
        # while the child still holds its connections (no timed assertion: the request's own
        # timeouts bound the wait)
        reply = request(str(mounted.mnt), {"cmd": "stats"}, timeout=5)
        assert reply["ok"]
    finally:
        os.kill(pid, 9)  # our own child
        os.waitpid(pid, 0)
    assert json.loads(dccfs("stats", "--json", mounted.mnt).stdout)["cache"]["policy"]
    assert mounted.log_text().count("control: refused uid 65534") == 1  # one warning a minute


def test_read_ahead_starts_again_after_a_rewind(mounted):
    """prefetched_to only grew: a second pass over the same descriptor got no read-ahead."""
    data = os.urandom(24 * MIB)
    (mounted.mnt / "w.safetensors").write_bytes(data)  # 1 MiB chunks
    fd = os.open(mounted.mnt / "w.safetensors", os.O_RDONLY)
    try:
        counts = []
        for _ in range(2):
            assert dccfs("tune", mounted.mnt, "t0_bytes=0").returncode == 0
            assert dccfs("tune", mounted.mnt, "t0_bytes=1GiB").returncode == 0
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            before = request(str(mounted.mnt), {"cmd": "stats"})["stats"]["readahead_chunks"]
            os.lseek(fd, 0, os.SEEK_SET)
            got = b""
            while chunk := os.read(fd, MIB):
                got += chunk
            assert got == data
            counts.append(request(str(mounted.mnt), {"cmd": "stats"})["stats"]["readahead_chunks"] - before)
    finally:
        os.close(fd)
    assert counts[0] > 0 and counts[1] > 0, counts


def test_a_user_mount_s_socket_is_looked_for_in_its_owner_s_directory_first(tmp_path):
    """A stale socket in /run/dccfs (root's mount at the same path, killed) hid a user's live daemon
    at /tmp/dccfs-UID: root's stats said "connection refused" and its umount skipped the daemon
    (review J). The owner's own directory now comes first."""
    from dccfs.control_socket import mount_socket_path, _socket_tag
    uid = 65534
    user_dir = f"/tmp/dccfs-{uid}"
    target = str(tmp_path / "m")
    name = f"{_socket_tag(target)}.sock"
    made_dir = not os.path.exists(user_dir)
    stale, live = os.path.join("/run/dccfs", name), os.path.join(user_dir, name)
    try:
        os.makedirs("/run/dccfs", mode=0o755, exist_ok=True)
        os.makedirs(user_dir, mode=0o700, exist_ok=True)
        if made_dir:
            os.chown(user_dir, uid, uid)
        for path in (stale, live):
            open(path, "w").close()  # only their presence counts here
        assert mount_socket_path(target, uid) == live
        assert mount_socket_path(target, 0) == stale
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)
        if made_dir:
            os.rmdir(user_dir)


def test_a_full_backlog_is_a_daemon_that_does_not_answer(tmp_path):
    """A stopped daemon's listen backlog fills with the connections of earlier attempts; then a
    connection times out. That read as "no daemon", and a plain umount went ahead (review J)."""
    from dccfs.control_socket import mount_socket_path
    from dccfs.mountinfo import MountEntry
    from dccfs.umount import probe
    entry = MountEntry(str(tmp_path / "m"), "fuse.dccfs", str(tmp_path / "b"), "0:0", 0)
    path = mount_socket_path(entry.mountpoint, 0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting = []
    try:
        listener.bind(path)
        listener.listen(0)  # never accepts, as a stopped daemon
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(path)
            except BlockingIOError:
                break  # the backlog is full
        assert probe(entry) == ("stuck", None)
    finally:
        for client in waiting:
            client.close()
        listener.close()
        os.unlink(path)
    assert probe(entry) == ("unknown", None)  # no socket at all


@contextlib.contextmanager
def bind_mounted(source, target):
    """source bind-mounted on target for the block; unmounted after, lazily if it is busy."""
    target.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_trace_targets_in_the_backing_directory_or_through_a_bind_mount_are_refused(mounted, tmp_path):
    """A trace in the backing directory emptied the stored file it named, which then read back as
    zeros; one reached through a bind mount of the mount passed the path check, and the daemon
    waited on itself past kill -9 (found by review). Both are refused; the files stay as they were."""
    precious = os.urandom(3 * MIB)
    (mounted.mnt / "precious").write_bytes(precious)
    for target in (mounted.backing / "precious", mounted.backing / ".dccfs" / "x.trace"):
        result = dccfs("tune", mounted.mnt, f"trace={target}", timeout=30)
        assert result.returncode == 1 and "inside the backing directory" in result.stderr, result
    assert not (mounted.backing / ".dccfs" / "x.trace").exists()
    with bind_mounted(mounted.mnt, tmp_path / "bind") as bind:
        result = dccfs("tune", mounted.mnt, f"trace={bind / 'x.trace'}", timeout=30)
        assert result.returncode == 1 and "on this mount" in result.stderr, result
    assert not (mounted.mnt / "x.trace").exists()
    with bind_mounted(mounted.backing, tmp_path / "backing-bind") as backing_bind:
        result = dccfs("tune", mounted.mnt, f"trace={backing_bind / 'precious'}", timeout=30)
        assert result.returncode == 1 and "inside the backing directory" in result.stderr, result
    copy = tmp_path / "copied-container"
    copy.write_bytes((mounted.backing / "precious").read_bytes())
    result = dccfs("tune", mounted.mnt, f"trace={copy}", timeout=30)
    assert result.returncode == 1 and "is a dccfs container" in result.stderr, result
    assert copy.read_bytes() == (mounted.backing / "precious").read_bytes()
    assert (mounted.mnt / "precious").read_bytes() == precious
    assert settings(mounted.mnt)["trace"] == "off"


def test_concurrent_tunes_of_the_trace_leave_one_writer_open(mounted, tmp_path):
    """Two tunes swapping the trace at once each closed the other's old writer, and the one swapped
    out unseen stayed open, emptied and never written (found by review)."""
    for i in range(20):
        runs = [subprocess.Popen([*DCCFS, "tune", str(mounted.mnt), f"trace={tmp_path / f't{i}-{j}.trace'}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for j in range(3)]
        assert all(run.wait(60) == 0 for run in runs)
    open_traces = [target for fd in os.listdir(f"/proc/{mounted.pid}/fd")
                   if (target := os.readlink(f"/proc/{mounted.pid}/fd/{fd}")).endswith(".trace")]
    assert open_traces == [settings(mounted.mnt)["trace"]], open_traces
    assert dccfs("tune", mounted.mnt, "trace=off").returncode == 0


def test_a_trace_file_that_does_not_open_fails_its_tune_in_time_and_the_next_tune_goes_through(make_mount):
    """A tune whose trace path hung in open (here: in another mount, whose daemon is stopped) held the tune lock, so
    every later tune waited behind it and its client gave up after 10 s with no reason (found by review). The tune
    now fails after 5 s with its reason, and the next one goes through."""
    mount = make_mount("m")
    hung = make_mount("hung")
    os.kill(hung.pid, signal.SIGSTOP)  # our own daemon
    try:
        result = dccfs("tune", mount.mnt, f"trace={hung.mnt / 'x.trace'}", timeout=30)
        assert result.returncode == 1 and "did not open within 5 s" in result.stderr, result
        result = dccfs("tune", mount.mnt, "readahead_chunks=3", timeout=30)
        assert result.returncode == 0, result
        assert settings(mount.mnt)["trace"] == "off" and settings(mount.mnt)["readahead_chunks"] == 3
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    for _ in range(100):  # the abandoned open ends once the other daemon runs again, and its writer is closed
        if "opened after its tune gave up on it: closed" in mount.log_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the late trace writer was not closed")
    held = [os.readlink(f"/proc/{mount.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{mount.pid}/fd")]
    assert not [target for target in held if target.endswith(".trace")], held


def test_a_mount_refuses_a_trace_or_log_inside_its_backing_directory(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "b" / "keep.dat").write_bytes(b"stored")
    for option in ("--trace", "--log"):
        result = dccfs("mount", option, tmp_path / "b" / "keep.dat", tmp_path / "b", tmp_path / "m")
        if result.returncode == 0:  # mounted after all: unmount before failing
            if dccfs("umount", tmp_path / "m").returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "m")])
        assert result.returncode == 1 and "inside the backing directory" in result.stderr, result
    assert (tmp_path / "b" / "keep.dat").read_bytes() == b"stored"


def test_a_tune_refused_for_another_key_leaves_the_named_trace_file_untouched(mounted, tmp_path):
    """The trace was opened, and its CSV header written over the file's start, before the other
    keys were checked (found by review)."""
    important = tmp_path / "important.csv"
    important.write_bytes(b"0123456789" * 10)
    result = dccfs("tune", mounted.mnt, f"trace={important}", "polcy=lru")
    assert result.returncode == 1 and "unknown key" in result.stderr, result
    assert important.read_bytes() == b"0123456789" * 10
    result = dccfs("tune", mounted.mnt, f"trace={tmp_path / 'never.csv'}", "t0_bytes=1KiB")
    assert result.returncode == 1 and not (tmp_path / "never.csv").exists(), result


def test_an_overlong_request_is_named_as_such(mounted):
    reply = request(str(mounted.mnt), {"cmd": "tune", "set": {"trace": "/tmp/" + "a" * 70_000}})
    assert reply["ok"] is False and "longer than 64 KiB" in reply["error"], reply
