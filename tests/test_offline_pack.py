"""dccfs pack and unpack on a temporary backing directory (no FUSE mount): identity, skips, resume, interruption."""
from __future__ import annotations

import io
import os
import subprocess

import numpy as np
import pytest

import dccfs.offline_convert as offline_convert
from dccfs.cli import main
from dccfs.format import MAGIC
from dccfs.offline import run_fsck, run_pack, run_unpack, write_decoded
from dccfs.offline_common import TEMP_PREFIX
from offline_containers import CS, flip_byte, text, write_container


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


def test_pack_gives_each_file_the_chunk_size_a_mount_would(backing, runner):
    """Without --chunk-size, checkpoint and weight files get 1 MiB chunks, as on a mount
    (pack used 256 KiB for every file)."""
    from dccfs.container import Container
    (backing / "model.safetensors").write_bytes(text(31, 3 << 20))
    (backing / "notes.txt").write_bytes(text(32, 3 << 20))
    result = runner.invoke(main, ["pack", "-q", str(backing)])
    assert result.exit_code == 0, result.output
    for name, chunk_size in (("model.safetensors", 1 << 20), ("notes.txt", 256 << 10)):
        fd = os.open(backing / name, os.O_RDONLY)
        try:
            assert Container.open(fd, name).chunk_size == chunk_size, name
        finally:
            os.close(fd)
    assert (backing / "model.safetensors").read_bytes()[:4] == MAGIC[:4]


def test_pack_of_a_sparse_file_reads_only_its_data_and_keeps_its_holes(backing, runner):
    """Its holes (SEEK_HOLE) are not read: an 8 GiB file with one byte of data took 52 s (found by review)."""
    path = backing / "sparse"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 * CS + 7)
        f.write(text(30, 3 * CS))
        f.seek(40 << 20)
        f.write(b"tail")
    expected = path.read_bytes()
    result = runner.invoke(main, ["pack", "-q", str(path)])
    assert result.exit_code == 0, result.output
    assert os.path.getsize(path) < 1 << 20
    assert runner.invoke(main, ["cat", str(path)]).stdout_bytes == expected
