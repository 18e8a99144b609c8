"""dccfs cat and fsck on a temporary backing directory (no FUSE mount): decoding, damage reports, repairs."""
from __future__ import annotations

import fcntl
import io
import os
import sys

import pytest

from dccfs.cli import main
from dccfs.codecs import ChunkHints, encode_chunk
from dccfs.container import Container
from dccfs.format import HEADER_SIZE, MAGIC, RECORD_HEADER_SIZE, REC_CHUNK, RecordHeader, checksum64
from dccfs.offline import OfflineError, run_fsck, write_decoded
from dccfs.offline_common import byte_progress
from offline_containers import CS, SHIFT, flip_byte, text, write_container


def sample_data() -> bytes:
    """Four chunks: text, a hole, random, and a short text tail."""
    return text(1, CS) + bytes(CS) + os.urandom(CS) + text(2, 1234)


# -- cat -----------------------------------------------------------------------------------------


def test_cat_decodes_containers_and_passes_plain_files(backing, runner):
    data = sample_data()
    write_container(backing / "model.bin", data, commits=3)
    (backing / "notes.txt").write_bytes(b"plain bytes\n")
    result = runner.invoke(main, ["cat", str(backing / "model.bin"), str(backing / "notes.txt")])
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == data + b"plain bytes\n"


def test_write_decoded_streams_chunk_by_chunk(backing):
    data = sample_data()
    write_container(backing / "f", data)

    class Recorder(io.BytesIO):
        writes = 0

        def write(self, b):
            Recorder.writes += 1
            assert len(b) <= 1 << 20
            return super().write(b)

    out = Recorder()
    write_decoded(str(backing / "f"), out)
    assert out.getvalue() == data
    assert Recorder.writes >= 4


def test_cat_damaged_chunk_names_file_chunk_and_range(backing, runner):
    data = text(3, 3 * CS)
    c = write_container(backing / "f", data)
    loc = c.index[1]
    flip_byte(backing / "f", loc.offset + loc.length - 5)
    with pytest.raises(OfflineError) as info:
        write_decoded(str(backing / "f"), io.BytesIO())
    message = str(info.value)
    assert str(backing / "f") in message and "chunk 1" in message
    assert f"bytes {CS}-{2 * CS - 1}" in message
    result = runner.invoke(main, ["cat", str(backing / "f")])
    assert result.exit_code == 1
    assert "chunk 1" in result.stderr
    assert result.stdout_bytes == data[:CS]  # what came before the damage


# -- fsck ----------------------------------------------------------------------------------------


def test_fsck_clean_tree_counts_and_skips_state_dir(backing, runner):
    write_container(backing / "a", sample_data())
    (backing / "sub").mkdir()
    write_container(backing / "sub" / "b", text(5, 5000), commits=2)
    (backing / "sub" / "plain.txt").write_bytes(b"x" * 100)
    # Junk in dccfs's own state directory is not data: fsck must not look at it.
    (backing / ".dccfs" / "tmp" / "junk").write_bytes(MAGIC + b"garbage" * 20)
    result = runner.invoke(main, ["fsck", "-q", str(backing)])
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip().splitlines()[-1]
    assert "3 files: 2 containers, 1 plain (100 bytes)" in summary
    assert f"{len(sample_data()) + 5000} logical bytes" in summary
    assert "0 damaged, 0 repaired" in summary
    assert "junk" not in result.stdout


def test_fsck_reports_a_corrupted_chunk_with_its_range(backing, runner):
    data = text(7, 4 * CS)
    c = write_container(backing / "weights.bin", data)
    write_container(backing / "ok.bin", text(8, 1000))
    loc = c.index[2]
    flip_byte(backing / "weights.bin", loc.offset + RECORD_HEADER_SIZE + 10)
    result = runner.invoke(main, ["fsck", "-q", str(backing)])
    assert result.exit_code == 1
    damaged = [line for line in result.stdout.splitlines() if "DAMAGED" in line]
    assert len(damaged) == 1
    assert str(backing / "weights.bin") in damaged[0]
    assert f"chunk 2 (bytes {2 * CS}-{3 * CS - 1}" in damaged[0]
    assert "1 damaged" in result.stdout
    # --repair cannot fix chunk damage and does not touch the file.
    before = (backing / "weights.bin").read_bytes()
    assert run_fsck(str(backing), repair=True, progress=False) == 1
    assert (backing / "weights.bin").read_bytes() == before


def _append_partial_chunk_record(path) -> int:
    garbage = RecordHeader(REC_CHUNK, 0, 0, 4096, 9, 4096, 0).pack() + b"\x01" * 1000
    with open(path, "ab") as f:
        f.write(garbage)
    return len(garbage)


def test_fsck_torn_tail_reported_then_repaired(backing, runner):
    data = text(9, 2 * CS + 77)
    write_container(backing / "f", data, commits=2)
    committed = os.path.getsize(backing / "f")
    torn = _append_partial_chunk_record(backing / "f")

    result = runner.invoke(main, ["fsck", "-q", str(backing)])
    assert result.exit_code == 1
    assert f"TORN TAIL: {torn} bytes" in result.stdout and str(backing / "f") in result.stdout
    assert os.path.getsize(backing / "f") == committed + torn  # report only
    # cat prints the last commit, as the mount shows it, and says what it left out (it used to
    # exit 0 even when a damaged end had hidden every commit: found by review).
    result = runner.invoke(main, ["cat", str(backing / "f")])
    assert result.exit_code == 1 and result.stdout_bytes == data
    assert f"{torn} bytes past it were left out" in result.stderr

    result = runner.invoke(main, ["fsck", "-q", "--repair", str(backing)])
    assert result.exit_code == 0, result.output
    assert f"cut {torn} torn-tail bytes" in result.stdout and "1 repaired" in result.stdout
    assert os.path.getsize(backing / "f") == committed
    assert f"{committed} stored bytes" in result.stdout  # what is left, not what was there (found by review)
    assert runner.invoke(main, ["cat", str(backing / "f")]).stdout_bytes == data
    assert run_fsck(str(backing), repair=False, progress=False) == 0


def test_fsck_repair_keeps_a_commit_whose_trailer_was_torn(backing):
    first = text(10, CS)
    c = write_container(backing / "f", first)
    # A second commit whose trailer only got half written.
    second = first + text(11, 500)
    fd = os.open(backing / "f", os.O_RDWR)
    try:
        c = Container.open(fd, str(backing / "f"))
        raw = second[CS:]
        c.append_chunk(1, encode_chunk(raw, ChunkHints(codec="zstd")), len(raw), checksum64(raw))
        c.commit(len(second), durable=True)
        os.ftruncate(fd, c.end - RECORD_HEADER_SIZE // 2)
    finally:
        os.close(fd)
    out = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, out
    try:
        assert run_fsck(str(backing), repair=True, progress=False) == 0
    finally:
        sys.stdout = sys_stdout
    assert "recovered by scanning" in out.getvalue()
    assert f"cut {RECORD_HEADER_SIZE // 2} torn-tail bytes" in out.getvalue()
    decoded = io.BytesIO()
    write_decoded(str(backing / "f"), decoded)
    assert decoded.getvalue() == second


def test_fsck_damaged_header_and_unreadable_container(backing, runner):
    (backing / "torn-create").write_bytes(MAGIC + b"\0" * 20)
    c = write_container(backing / "bad-index", text(12, 3000))
    flip_byte(backing / "bad-index", c.last_index + RECORD_HEADER_SIZE + 2)
    result = runner.invoke(main, ["fsck", "-q", str(backing)])
    assert result.exit_code == 1
    assert "torn-create: DAMAGED: starts with the container magic" in result.stdout
    assert "bad-index: DAMAGED: the index record at offset" in result.stdout and "does not verify" in result.stdout
    assert "2 damaged" in result.stdout
    result = runner.invoke(main, ["cat", str(backing / "torn-create")])
    assert result.exit_code == 1 and "header is invalid" in result.stderr


def test_fsck_repair_refused_while_mounted(backing, runner):
    write_container(backing / "f", text(13, 100))
    fd = os.open(backing / ".dccfs" / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = runner.invoke(main, ["fsck", "--repair", "-q", str(backing)])
        assert result.exit_code == 1 and "unmount it first" in result.stderr
        # Report-only still runs.
        assert runner.invoke(main, ["fsck", "-q", str(backing)]).exit_code == 0
        result = runner.invoke(main, ["pack", "-q", str(backing)])
        assert result.exit_code == 1 and "unmount it first" in result.stderr
    finally:
        os.close(fd)


def test_fsck_progress_bar_on_a_terminal(backing, monkeypatch):
    write_container(backing / "f", text(14, 3 * CS))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert run_fsck(str(backing), repair=False, progress=True) == 0
    with byte_progress(True, 10, "x") as advance:
        advance(10)


def test_empty_container_header_only_is_clean(backing):
    fd = os.open(backing / "e", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        Container.create(fd, "e", SHIFT)
    finally:
        os.close(fd)
    assert os.path.getsize(backing / "e") == HEADER_SIZE
    assert run_fsck(str(backing), repair=False, progress=False) == 0
    out = io.BytesIO()
    write_decoded(str(backing / "e"), out)
    assert out.getvalue() == b""
