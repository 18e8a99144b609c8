"""The inode table on a real directory: descriptors opened only when needed, names that go, and its two bounds."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from dccfs import inodes as inodes_module
from dccfs.inodes import ROOT_INODE, InodeTable


def _table(directory, invalidate=None) -> InodeTable:
    return InodeTable(os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), invalidate)


def test_lookups_hold_no_descriptor_until_an_operation_needs_the_object(tmp_path):
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"%d" % i)
    table = _table(tmp_path)
    root = table.get(ROOT_INODE)
    found = [table.lookup_child(root, f"f{i}".encode())[0] for i in range(50)]
    assert table.held == 0 and all(inode.held_fd is None for inode in found)
    assert table.stat(found[7]).st_size == 1 and table.held == 0
    fd = found[7].open(os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"7" and table.held == 0
    finally:
        os.close(fd)
    assert found[7].backing_path() == str(tmp_path / "f7") and table.held == 0
    held = found[7].fd
    assert table.held == 1 and os.readlink(f"/proc/self/fd/{held}") == str(tmp_path / "f7")
    os.rename(tmp_path / "f7", tmp_path / "moved")  # a held descriptor follows its object
    assert table.stat(found[7]).st_size == 1
    table.forget(found[7].number, 1)
    assert table.held == 0 and found[7].held_fd is None


def test_a_name_that_now_holds_another_object_answers_estale(tmp_path):
    (tmp_path / "a").write_bytes(b"first")
    table = _table(tmp_path)
    inode, _ = table.lookup_child(table.get(ROOT_INODE), b"a")
    os.rename(tmp_path / "a", tmp_path / "kept")  # (kept: a new file cannot take its inode number)
    (tmp_path / "a").write_bytes(b"second, another inode")
    for use in (table.stat, lambda i: i.fd, lambda i: i.open(os.O_RDONLY)):
        with pytest.raises(OSError) as caught:
            use(inode)
        assert caught.value.errno == errno.ESTALE
    assert table.held == 0


def test_a_name_that_now_holds_a_fifo_answers_estale_without_waiting_for_a_writer(tmp_path):
    """Found by review: opening by name waited for a FIFO's writer (the name changed under another --shared node)."""
    (tmp_path / "a").write_bytes(b"file")
    table = _table(tmp_path)
    inode, _ = table.lookup_child(table.get(ROOT_INODE), b"a")
    os.rename(tmp_path / "a", tmp_path / "kept")
    os.mkfifo(tmp_path / "a")
    outcome = []

    def read_header():
        try:
            os.close(inode.open(os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            outcome.append(exc.errno)

    reader = threading.Thread(target=read_header, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():
        os.close(os.open(tmp_path / "a", os.O_WRONLY | os.O_NONBLOCK))  # (lets the thread go)
        pytest.fail("the open waited for a writer")
    assert outcome == [errno.ESTALE]


def test_past_max_inodes_the_least_recently_looked_up_entries_are_asked_to_go(tmp_path, monkeypatch):
    monkeypatch.setattr(inodes_module, "MAX_INODES", 256)
    for i in range(300):
        (tmp_path / f"f{i}").write_bytes(b"")
    asked = []
    table = _table(tmp_path, lambda parent, name: asked.append((parent, name)))
    root = table.get(ROOT_INODE)
    for i in range(255):
        table.lookup_child(root, f"f{i}".encode())
    assert asked == []  # the root and 255 others
    table.lookup_child(root, b"f255")
    # down to half the mark: the 257 looked up less 128, least recently looked up first
    assert asked == [(ROOT_INODE, f"f{i}".encode()) for i in range(129)] and table.held == 0
