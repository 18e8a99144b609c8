"""dccfs cat, fsck, pack and unpack on a temporary backing directory (no FUSE mount)."""
from __future__ import annotations

import fcntl
import io
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import dccfs.offline_convert as offline_convert
from dccfs.cli import main
from dccfs.codecs import ChunkHints, encode_chunk
from dccfs.container import Container
from dccfs.format import HEADER_SIZE, MAGIC, RECORD_HEADER_SIZE, REC_CHUNK, RecordHeader, checksum64
from dccfs.offline import OfflineError, run_fsck, run_pack, run_unpack, write_decoded
from dccfs.offline_common import TEMP_PREFIX, byte_progress

SHIFT = 16
CS = 1 << SHIFT


def text(seed: int, length: int) -> bytes:
    rng = random.Random(seed)
    words = [f"tok{seed}_{rng.randrange(500)}".encode() for _ in range(50)]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words) + b" "
    return bytes(out[:length])


def write_container(path, data: bytes, commits: int = 1) -> Container:
    """Store data as a container the way the mount does: zero chunks are holes.
    With commits > 1 the chunks are spread over several commits. Returns the closed view."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        c = Container.create(fd, str(path), SHIFT)
        n = -(-len(data) // CS)
        per_commit = max(1, -(-n // commits))
        for idx in range(n):
            raw = data[idx * CS:(idx + 1) * CS]
            if raw.count(0) != len(raw):
                enc = encode_chunk(raw, ChunkHints(codec="zstd"))
                c.append_chunk(idx, enc, len(raw), checksum64(raw))
            if (idx + 1) % per_commit == 0:
                c.commit(min(len(data), (idx + 1) * CS), durable=False)
        c.commit(len(data), durable=True)
        return c
    finally:
        os.close(fd)


@pytest.fixture
def backing(tmp_path):
    root = tmp_path / "backing"
    (root / ".dccfs" / "tmp").mkdir(parents=True)
    return root


@pytest.fixture
def runner():
    return CliRunner()


def sample_data() -> bytes:
    """Four chunks: text, a hole, random, and a short text tail."""
    return text(1, CS) + bytes(CS) + os.urandom(CS) + text(2, 1234)


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))


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

    result = runner.invoke(main, ["fsck", "-q", "--repair", str(backing)])
    assert result.exit_code == 0, result.output
    assert f"cut {torn} torn-tail bytes" in result.stdout and "1 repaired" in result.stdout
    assert os.path.getsize(backing / "f") == committed
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
    assert "bad-index: DAMAGED: cannot open the container" in result.stdout
    assert "2 damaged" in result.stdout
    result = runner.invoke(main, ["cat", str(backing / "torn-create")])
    assert result.exit_code == 1 and "header is invalid" in result.stderr


def test_fsck_repair_refused_while_mounted(backing, runner):
    write_container(backing / "f", text(13, 100))
    fd = os.open(backing / ".dccfs" / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = runner.invoke(main, ["fsck", "--repair", "-q", str(backing)])
        assert result.exit_code == 1 and "mounted" in result.stderr
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


# -- pack and unpack -----------------------------------------------------------------------------


def make_tree(root) -> dict[str, bytes]:
    files = {
        "text.txt": text(20, 3 * CS + 11),
        "sub/random.bin": os.urandom(CS + 100),
        "sub/deeper/sparse.img": bytes(2 * CS) + b"tail",
        "empty": b"",
    }
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).standard_normal(20000).astype(np.float32))
    files["sub/weights.npy"] = buf.getvalue()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def metadata(path) -> tuple:
    st = os.lstat(path)
    xattrs = {n: os.getxattr(path, n) for n in os.listxattr(path)}
    return (st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, xattrs)


def test_pack_unpack_identity_with_metadata(backing, runner):
    files = make_tree(backing)
    text_path = backing / "text.txt"
    os.setxattr(text_path, "user.origin", b"test")
    os.chmod(text_path, 0o640)
    if os.geteuid() == 0:
        os.chown(text_path, 1234, 5678)
    os.utime(text_path, ns=(1_000_000_123, 2_000_000_456))
    before = {rel: metadata(backing / rel) for rel in files}

    result = runner.invoke(main, ["pack", "-q", "--chunk-size", "64KiB", str(backing)])
    assert result.exit_code == 0, result.output
    assert f"pack: {len(files)} files converted" in result.stdout
    after_pack = {rel: metadata(backing / rel) for rel in files}  # before reading moves atime
    assert after_pack == before
    for rel, data in files.items():
        with open(backing / rel, "rb") as f:
            assert f.read(len(MAGIC)) == MAGIC, rel
        out = io.BytesIO()
        write_decoded(str(backing / rel), out)
        assert out.getvalue() == data, rel
    assert os.listdir(backing / ".dccfs" / "tmp") == []
    assert run_fsck(str(backing), repair=False, progress=False) == 0
    for rel in files:  # put the atime back so the unpack check compares like with like
        os.utime(backing / rel, ns=(before[rel][3], before[rel][4]))

    result = runner.invoke(main, ["unpack", "-q", str(backing)])
    assert result.exit_code == 0, result.output
    assert f"unpack: {len(files)} files converted" in result.stdout
    assert {rel: metadata(backing / rel) for rel in files} == before
    for rel, data in files.items():
        assert (backing / rel).read_bytes() == data, rel
    # Both directions are idempotent.
    assert run_unpack(str(backing), progress=False) == 0
    assert (backing / "text.txt").read_bytes() == files["text.txt"]


def test_pack_skips_hard_links_symlinks_and_containers(backing, capsys):
    (backing / "a").write_bytes(text(21, 5000))
    os.link(backing / "a", backing / "a-link")
    os.symlink("a", backing / "sym")
    write_container(backing / "c", text(22, 5000))
    assert run_pack(str(backing), "64KiB", progress=False) == 0
    captured = capsys.readouterr()
    assert "a: skipped: it has 2 hard links" in captured.err
    assert "0 files converted" in captured.out and "1 already containers" in captured.out
    assert (backing / "a").read_bytes() == text(21, 5000)
    assert os.path.islink(backing / "sym")


def test_interrupted_pack_resumes(backing, capsys):
    files = make_tree(backing)
    # A run killed half way: one file already packed, temp files left behind by a dead pid.
    assert run_pack(str(backing / "text.txt"), "64KiB", progress=False) == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_state = backing / ".dccfs" / "tmp" / f"{TEMP_PREFIX}{dead.pid}-abc123.tmp"
    stale_state.write_bytes(MAGIC + b"partial")
    stale_beside = backing / "sub" / f"{TEMP_PREFIX}{dead.pid}-zz99.tmp"
    stale_beside.write_bytes(b"partial")
    live = backing / "sub" / f"{TEMP_PREFIX}{os.getppid()}-live.tmp"  # a live run's: kept
    live.write_bytes(b"in use")
    capsys.readouterr()

    assert run_pack(str(backing), "64KiB", progress=False) == 0
    summary = capsys.readouterr().out
    assert f"{len(files) - 1} files converted" in summary
    assert "1 already containers" in summary and "2 stale temp files" in summary
    assert not stale_state.exists() and not stale_beside.exists() and live.exists()
    for rel, data in files.items():
        out = io.BytesIO()
        write_decoded(str(backing / rel), out)
        assert out.getvalue() == data


def test_ctrl_c_during_pack_leaves_the_original(backing, monkeypatch):
    data = text(23, 6 * CS)
    target = backing / "big.txt"
    target.write_bytes(data)
    ino = os.stat(target).st_ino
    calls = 0
    real_encode = offline_convert.encode_chunk

    def interrupting(raw, hints=None):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_encode(raw, hints)

    monkeypatch.setattr(offline_convert, "encode_chunk", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_pack(str(backing), "64KiB", progress=False)
    assert target.read_bytes() == data and os.stat(target).st_ino == ino
    assert os.listdir(backing / ".dccfs" / "tmp") == []
    monkeypatch.undo()
    assert run_pack(str(backing), "64KiB", progress=False) == 0
    out = io.BytesIO()
    write_decoded(str(target), out)
    assert out.getvalue() == data


def test_pack_outside_a_backing_dir_uses_a_hidden_temp(tmp_path, runner):
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "f").write_bytes(text(24, 3000))
    result = runner.invoke(main, ["pack", "-q", str(loose / "f")])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(loose)) == ["f"]
    assert runner.invoke(main, ["cat", str(loose / "f")]).stdout_bytes == text(24, 3000)


def test_pack_rejects_a_bad_chunk_size_and_the_state_dir(backing, runner):
    (backing / "f").write_bytes(b"x")
    result = runner.invoke(main, ["pack", "--chunk-size", "100KiB", str(backing)])
    assert result.exit_code == 1 and "power of two" in result.stderr
    result = runner.invoke(main, ["pack", str(backing / ".dccfs")])
    assert result.exit_code == 1 and ".dccfs" in result.stderr


def test_unpack_leaves_damaged_and_ambiguous_containers(backing, runner):
    c = write_container(backing / "damaged", text(25, 2 * CS))
    loc = c.index[0]
    flip_byte(backing / "damaged", loc.offset + loc.length - 1)
    damaged_before = (backing / "damaged").read_bytes()
    # A container whose content is itself a container: as a plain file it would be misread.
    inner = backing / "inner"
    write_container(inner, text(26, 100))
    write_container(backing / "nested", inner.read_bytes())
    inner.unlink()

    result = runner.invoke(main, ["unpack", "-q", str(backing)])
    assert result.exit_code == 1
    assert "damaged: unpack failed, original left intact" in result.stderr
    assert "chunk 0" in result.stderr
    assert "nested: skipped: its content starts with a container header" in result.stderr
    assert (backing / "damaged").read_bytes() == damaged_before
    with open(backing / "nested", "rb") as f:
        assert f.read(len(MAGIC)) == MAGIC
    assert os.listdir(backing / ".dccfs" / "tmp") == []


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
