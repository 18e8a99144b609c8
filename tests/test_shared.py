"""Two mounts of one backing directory (--shared), as nodes sharing NFS or Lustre would."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.mount


def test_second_exclusive_mount_is_refused(make_mount, tmp_path):
    first = make_mount("one")
    (tmp_path / "two-mnt").mkdir()
    result = subprocess.run([sys.executable, "-m", "dccfs.cli", "mount", str(first.backing),
                             str(tmp_path / "two-mnt")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "already mounted by another dccfs daemon" in result.stderr


def test_close_to_open_consistency_and_serialised_writers(make_mount, tmp_path):
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    first = os.urandom(700_000)
    (a.mnt / "f").write_bytes(first)
    assert (b.mnt / "f").read_bytes() == first
    second = os.urandom(900_000)
    (a.mnt / "f").write_bytes(second)
    assert (b.mnt / "f").read_bytes() == second  # B re-reads at open

    a_content, b_content = b"A" * 600_000, b"B" * 500_000
    holder = open(a.mnt / "f", "r+b")
    holder.write(a_content)
    order = []

    def write_through_b():
        with open(b.mnt / "f", "r+b") as f:  # waits until A's writer closes
            order.append(("b-opened", time.monotonic()))
            f.write(b_content)
            f.truncate(len(b_content))
    thread = threading.Thread(target=write_through_b)
    thread.start()
    time.sleep(1.0)
    order.append(("a-closing", time.monotonic()))
    holder.close()
    thread.join(30)
    assert not thread.is_alive()
    assert [name for name, _ in order] == ["a-closing", "b-opened"]
    assert (a.mnt / "f").read_bytes() == b_content
    assert (b.mnt / "f").read_bytes() == b_content
    a.stop()
    b.stop()
    fsck = subprocess.run([sys.executable, "-m", "dccfs.cli", "fsck", "-q", str(a.backing)],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_daemon_pid_names_each_shared_mount_s_own_daemon(make_mount):
    """Every daemon of a --shared backing directory writes the same pid file, so `dccfs
    umount` of one mount waited for whichever daemon wrote it last (up to 120 s for the
    other node's, or not at all for a pid this host does not have). The pid now comes from
    the mount's own control socket."""
    from dccfs.umount import daemon_pid
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    assert daemon_pid(str(a.mnt)) == a.pid
    assert daemon_pid(str(b.mnt)) == b.pid


def test_umount_of_a_dead_shared_mount_waits_for_no_other_daemon(make_mount):
    """A --shared mount whose daemon was killed: its socket refuses, so nothing is waited for. The
    unmount fell back to the pid file, which named the other mount's daemon, and waited 120 s
    for it before it said the mount was "still flushing" (review J)."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    (b.backing / "x").write_bytes(b"x")  # b started last: the pid file is b's
    os.kill(a.pid, signal.SIGKILL)  # our own daemon
    a.proc.wait()
    a.proc = None
    result = subprocess.run([sys.executable, "-m", "dccfs.cli", "umount", str(a.mnt)], capture_output=True,
                            text=True, timeout=200)
    assert result.returncode == 0, result.stderr  # was 1 after 120 s: "daemon pid (b's) is still flushing"
    assert b.proc.poll() is None and (b.mnt / "x").read_bytes() == b"x"


def test_appends_to_a_plain_file_through_two_nodes_keep_both(make_mount):
    """O_APPEND writers of a plain file (one that was there before the mount) on two nodes, the
    second appending while the first still holds its descriptor: each append lands at the
    backing file's end. The daemon used to drop O_APPEND and write at the offset the kernel
    sent from its stale size, over the other node's line (found by review)."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    (a.backing / "log.txt").write_bytes(b"start\n")
    first = os.open(a.mnt / "log.txt", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(first, b"A1\n")
        second = os.open(b.mnt / "log.txt", os.O_WRONLY | os.O_APPEND)
        os.write(second, b"B1\n")
        os.close(second)
        os.write(first, b"A2\n")
    finally:
        os.close(first)
    assert (a.backing / "log.txt").read_bytes() == b"start\nA1\nB1\nA2\n"


def test_concurrent_appends_to_a_plain_file_through_two_nodes_stay_whole(make_mount):
    """Each write(2) of an O_APPEND writer is one record in the file, as on a local file system. Through the page
    cache the kernel cut a record at its page boundaries into several WRITEs, each appended on its own, and the
    other node's record landed in the middle (found by review: 14 torn lines in 600)."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    (a.backing / "log.txt").write_bytes(b"")

    def append(mnt, tag):
        for n in range(150):
            fd = os.open(mnt / "log.txt", os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"<%s%04d:" % (tag, n) + tag * (700 + 37 * n % 3000) + b">\n")
            finally:
                os.close(fd)

    threads = [threading.Thread(target=append, args=(m.mnt, tag)) for m, tag in ((a, b"A"), (b, b"B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    lines = (a.backing / "log.txt").read_bytes().splitlines()
    assert len(lines) == 300
    for line in lines:
        tag = line[1:2]
        assert line[6:7] == b":" and line[7:-1] == tag * (len(line) - 8) and line.endswith(b">"), line[:40]


def test_a_writer_waiting_for_another_node_opens_its_own_file(make_mount):
    """While B's writer waits for A's lock, B's last reader of the file closes and B opens another
    file, which may take the closed descriptor's number: the writer still gets its own file, as A
    committed it, and writes into it (found by review: it read and overwrote the other file)."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    content = os.urandom(300_000)
    (a.mnt / "f").write_bytes(content)
    other = b"G" * 200_000
    (a.mnt / "g").write_bytes(other)
    for attempt in range(3):
        holder = open(a.mnt / "f", "r+b")
        holder.write(b"A" * 1000)
        holder.flush()
        reader = open(b.mnt / "f", "rb")
        reader.read(10)
        got = {}

        def write_through_b():
            try:
                with open(b.mnt / "f", "r+b") as f:  # waits for A's lock
                    got["read"] = f.read(8)
                    f.seek(0)
                    f.write(b"W" * 5000)
            except OSError as exc:
                got["error"] = exc
        thread = threading.Thread(target=write_through_b)
        thread.start()
        time.sleep(0.5)
        reader.close()
        with open(b.mnt / "g", "rb"):
            time.sleep(0.3)
            holder.close()
            thread.join(30)
        assert not thread.is_alive()
        assert got.get("read") == b"A" * 8, got
        assert (a.mnt / "g").read_bytes() == other
        content = b"W" * 5000 + content[5000:]
        assert (a.mnt / "f").read_bytes() == content


def test_readers_do_not_wait_behind_a_writer_waiting_for_another_node(make_mount):
    """B's writer waits for A's lock on a file B has not open. A reader on B opens and reads it
    meanwhile (found by review: it waited with the writer, up to a minute). Once A closes, B's writer
    gets the lock on the file the reader attached, and holds it: A's next writer waits for B's."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    content = os.urandom(300_000)
    (a.mnt / "f").write_bytes(content)
    holder = open(a.mnt / "f", "r+b")
    events = []
    b_writes = threading.Event()

    def write_through_b():
        with open(b.mnt / "f", "r+b") as f:  # waits for A's lock
            events.append("b writer open")
            f.write(b"B" * 1000)
            f.flush()
            b_writes.wait(60)
        events.append("b writer closed")

    b_writer = threading.Thread(target=write_through_b)
    try:
        b_writer.start()
        time.sleep(0.5)
        with open(b.mnt / "f", "rb") as reader:
            assert reader.read() == content
            assert events == []  # the reader was served while B's writer still waited
            holder.close()
            for _ in range(600):
                if events:
                    break
                time.sleep(0.1)
            assert events == ["b writer open"]

        def write_through_a():
            with open(a.mnt / "f", "r+b") as f:  # waits for B's lock
                events.append("a writer open")
                f.seek(2000)
                f.write(b"A" * 1000)

        a_writer = threading.Thread(target=write_through_a)
        a_writer.start()
        time.sleep(1)
        assert events == ["b writer open"]  # B holds the lock through the reader's descriptor
        b_writes.set()
        b_writer.join(30)
        a_writer.join(30)
        assert events == ["b writer open", "b writer closed", "a writer open"]
    finally:
        b_writes.set()
        holder.close()
        b_writer.join(70)
    expected = b"B" * 1000 + content[1000:2000] + b"A" * 1000 + content[3000:]
    assert (a.mnt / "f").read_bytes() == expected
    assert (b.mnt / "f").read_bytes() == expected


def test_a_touch_on_a_reader_s_node_does_not_keep_its_view_stale(make_mount):
    """A has the file open for reading and sets its mtime (touch); B then appends and commits; A's
    next writer must see B's records (found by review: the explicit mtime counted as a change that
    kept A's old view, and A's write went over B's records: EIO on read, fsck damaged)."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    first, appended, written = os.urandom(2 << 20), os.urandom(2 << 20), os.urandom(1 << 20)
    (a.mnt / "f").write_bytes(first)
    with open(a.mnt / "f", "rb") as reader:
        reader.read(16)
        os.utime(a.mnt / "f", ns=(10**18, 10**18))
        with open(b.mnt / "f", "r+b") as f:
            f.seek(2 << 20)
            f.write(appended)
        with open(a.mnt / "f", "r+b") as f:
            assert os.fstat(f.fileno()).st_size == 4 << 20
            f.write(written)
    expected = written + first[1 << 20:] + appended
    assert (a.mnt / "f").read_bytes() == expected
    assert (b.mnt / "f").read_bytes() == expected


def test_a_torn_tail_left_by_a_killed_node_is_cut_for_a_file_with_links_open_elsewhere(make_mount):
    """A node is killed after an fsync and more writes; another node, which had the file open for
    reading since before, then writes it. The file has a second name (a hard link, not a delta base):
    its torn tail is cut as for any file, and the write succeeds (found by review: EIO, "a delta
    base", on the write and on the reader's close)."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    (a.mnt / "f").write_bytes(b"0" * 10)
    os.link(b.mnt / "f", b.mnt / "f_link")
    committed = os.urandom(1_000_000)
    writer = open(a.mnt / "f", "r+b")
    writer.write(committed)
    writer.flush()
    os.fsync(writer.fileno())
    reader = open(b.mnt / "f", "rb")
    assert reader.read() == committed
    writer.write(os.urandom(6_000_000))
    writer.flush()
    time.sleep(2)  # the encoders append records past the commit
    a.kill()
    try:
        writer.close()
    except OSError:
        pass  # its daemon is gone
    with open(b.mnt / "f", "r+b") as f:
        f.write(b"B" * 100)
    reader.close()
    assert (b.mnt / "f").read_bytes() == b"B" * 100 + committed[100:]
    assert (b.mnt / "f_link").read_bytes() == b"B" * 100 + committed[100:]


def two_nodes_with_a_plain_file(make_mount, name: str, content: bytes):
    """Two --shared mounts of a backing directory that holds a plain file (not a container), as one
    that was there before the first mount."""
    a = make_mount("a", "--shared")
    b = make_mount("b", "--shared", backing=a.backing)
    a.stop()
    b.stop()
    (a.backing / name).write_bytes(content)
    return a.start(), b.start()


def test_a_plain_file_open_on_one_node_stays_plain_when_another_overwrites_it(make_mount):
    """A file that is not a container (there before the first mount) is open for writing on A when
    B overwrites it: it stays a plain file, so A's write lands in B's content as on any shared file
    system (found by review: B made it a container, and A's write then destroyed it)."""
    a, b = two_nodes_with_a_plain_file(make_mount, "plain", b"P" * 30_000)
    with open(a.mnt / "plain", "r+b", buffering=0) as held:
        (b.mnt / "plain").write_bytes(b"B" * 40_000)
        held.seek(0)
        held.write(b"A" * 10)
    expected = b"A" * 10 + b"B" * 39_990
    assert (a.mnt / "plain").read_bytes() == expected
    assert (b.mnt / "plain").read_bytes() == expected
    assert (a.backing / "plain").read_bytes() == expected  # still a plain file


def test_a_plain_log_emptied_on_one_node_keeps_the_other_nodes_appends(make_mount):
    """Log rotation across nodes: B holds a plain log (there before the first mount) open for
    appending; A empties it, then appends. The empty file stays plain, so B's appends land in it
    too (found by review: A's append made the empty file a container, and B's lines were lost)."""
    a, b = two_nodes_with_a_plain_file(make_mount, "log", b"old\n" * 100)
    logger = os.open(b.mnt / "log", os.O_WRONLY | os.O_APPEND)
    try:
        open(a.mnt / "log", "wb").close()
        with open(a.mnt / "log", "ab") as f:
            f.write(b"A1\n")
        os.write(logger, b"B1\n")
        with open(a.mnt / "log", "ab") as f:
            f.write(b"A2\n")
        os.write(logger, b"B2\n")
    finally:
        os.close(logger)
    expected = b"A1\nB1\nA2\nB2\n"
    assert (a.mnt / "log").read_bytes() == expected
    assert (b.mnt / "log").read_bytes() == expected
    assert (a.backing / "log").read_bytes() == expected  # still a plain file
