"""Delta chains (dccfs/delta.py, container.py): the configured bound, keyframes at the bound, bounded reads."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from dccfs.codecs import ChunkHints, Segment, encode_chunk
from dccfs.codecs.delta import CODEC_DELTA, delta_base_ref, encode_delta
from dccfs.config import ConfigError, parse_config
from dccfs.container import ChunkError, Container
from dccfs.delta import BaseRef, BaseStore, DeltaWriter, unreferenced_bases
from dccfs.format import RECORD_HEADER_SIZE, RecordHeader, checksum64

CHUNK_SHIFT = 16
N_CHUNKS = 3


def _series(n_files: int) -> list[bytes]:
    """Checkpoint-like f32 files: each one the previous one plus a small update."""
    rng = np.random.default_rng(7)
    x = rng.normal(0, 0.05, N_CHUNKS << (CHUNK_SHIFT - 2)).astype(np.float32)
    out = []
    for _ in range(n_files):
        out.append(x.tobytes())
        x = (x + rng.normal(0, 1e-4, x.size)).astype(np.float32)
    return out


def _hints(raw: bytes) -> ChunkHints:
    return ChunkHints(segments=(Segment(0, len(raw), "f32"),), effort=1)


def _write(root, rel: str, data: bytes, max_chain: int, mtime: int) -> Container:
    """Write data as a container the way a mount does, deltas against the newest earlier step."""
    path = os.path.join(root, rel)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    container = Container.create(fd, path, CHUNK_SHIFT)
    writer = DeltaWriter.for_file(str(root), rel, container.header.file_id, always=True,
                                  max_chain=max_chain)
    cs = 1 << CHUNK_SHIFT
    for idx in range(len(data) // cs):
        raw = data[idx * cs:(idx + 1) * cs]
        encoded = writer.encode(idx, raw, _hints(raw)) if writer else None
        encoded = encoded or encode_chunk(raw, _hints(raw))
        container.append_chunk(idx, encoded, len(raw), checksum64(raw))
    container.commit(len(data), durable=False)
    if writer:
        writer.close()
    os.utime(path, ns=(mtime, mtime))
    return container


def _depths(container: Container) -> list[int]:
    """Per chunk: 0 for a keyframe, else the chain depth its reference records."""
    out = []
    for idx in sorted(container.index):
        loc = container.index[idx]
        head = RecordHeader.unpack(os.pread(container.fd, RECORD_HEADER_SIZE, loc.offset))
        if head.sub != CODEC_DELTA:
            out.append(0)
            continue
        params = os.pread(container.fd, head.params_len, loc.offset + RECORD_HEADER_SIZE)
        out.append(BaseRef.unpack(delta_base_ref(params)).depth)
    return out


@pytest.fixture
def backing(tmp_path):
    (tmp_path / ".dccfs").mkdir()
    (tmp_path / "run").mkdir()
    return tmp_path


def _write_series(backing, n_files: int, max_chain: int) -> tuple[list[bytes], list[Container]]:
    data = _series(n_files)
    containers = [_write(backing, f"run/step-{10 * (i + 1)}.bin", d, max_chain, 10**18 + i * 10**9)
                  for i, d in enumerate(data)]
    return data, containers


def _read_counting(container: Container, backing, monkeypatch) -> tuple[bytes, int]:
    """The file's bytes read with no cache, and how many base chunks the reads walked."""
    walked = []
    real = Container.decode_record

    def counting(self, idx, record, chain_left=None):
        if chain_left is not None:  # a base chunk's record
            walked.append(idx)
        return real(self, idx, record, chain_left)

    monkeypatch.setattr(Container, "decode_record", counting)
    container.base_store = BaseStore(str(backing))
    try:
        data = b"".join(container.read_chunk(i) for i in sorted(container.index))
    finally:
        container.base_store.close()
        monkeypatch.setattr(Container, "decode_record", real)
    return data, len(walked)


def test_default_chain_is_one_and_alternates(backing, monkeypatch):
    data, files = _write_series(backing, 3, max_chain=1)
    assert _depths(files[0]) == [0] * N_CHUNKS
    assert _depths(files[1]) == [1] * N_CHUNKS
    # Its base's chunks are deltas, and the bound is 1: keyframes, which step 40 can use.
    assert _depths(files[2]) == [0] * N_CHUNKS
    got, walked = _read_counting(files[1], backing, monkeypatch)
    assert got == data[1] and walked == N_CHUNKS


def test_longer_chain_is_configurable_and_keyframes_at_the_bound(backing, monkeypatch):
    data, files = _write_series(backing, 4, max_chain=2)
    assert [_depths(f) for f in files] == [[0] * N_CHUNKS, [1] * N_CHUNKS, [2] * N_CHUNKS,
                                           [0] * N_CHUNKS]
    for i, container in enumerate(files):
        got, walked = _read_counting(container, backing, monkeypatch)
        assert got == data[i]
        # Never more base reads than the bound per chunk.
        assert walked == N_CHUNKS * max(_depths(container))
    # Deleting the middle and the first step keeps step 30 readable (both bases pinned),
    # and neither pin counts as unreferenced: step 30 needs step 10 through step 20.
    os.unlink(backing / "run" / "step-10.bin")
    os.unlink(backing / "run" / "step-20.bin")
    assert unreferenced_bases(str(backing)) == []
    got, _ = _read_counting(files[2], backing, monkeypatch)
    assert got == data[2]
    os.unlink(backing / "run" / "step-30.bin")
    assert len(unreferenced_bases(str(backing))) == 2


def test_a_reference_shallower_than_its_chain_is_refused(backing):
    """A chunk whose reference says depth 1 while its base chunk is a delta: the read stops
    at the bound instead of walking on (damaged or foreign records)."""
    data, files = _write_series(backing, 2, max_chain=1)
    base = files[1]  # its chunks are deltas of depth 1
    loc = base.index[0]
    wrong = BaseRef(base.header.file_id, base.header.generation, 0, loc.offset, loc.length,
                    checksum64(data[1][:1 << CHUNK_SHIFT]), depth=1)
    from dccfs.delta import pin_base
    pin_base(str(backing), base.fd, base.header)
    raw = _series(3)[2][:1 << CHUNK_SHIFT]
    encoded = encode_delta(raw, data[1][:1 << CHUNK_SHIFT], _hints(raw), wrong.pack())
    path = str(backing / "run" / "bad.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    bad = Container.create(fd, path, CHUNK_SHIFT)
    bad.append_chunk(0, encoded, len(raw), checksum64(raw))
    bad.commit(len(raw), durable=False)
    with pytest.raises(ChunkError, match="chain of depth 1 where at most 0"):
        bad.read_chunk(0)
    # The same reference with its true depth reads back.
    right = BaseRef(*[getattr(wrong, f) for f in ("file_id", "generation", "chunk_index", "offset",
                                                  "length", "raw_sum")], depth=2)
    encoded = encode_delta(raw, data[1][:1 << CHUNK_SHIFT], _hints(raw), right.pack())
    bad.append_chunk(0, encoded, len(raw), checksum64(raw))
    bad.commit(len(raw), durable=False)
    assert bad.read_chunk(0) == raw


def test_base_ref_depth_packing():
    ref = BaseRef(b"x" * 16, 3, 4, 5, 6, 7)
    assert len(ref.pack()) == 48 and BaseRef.unpack(ref.pack()) == ref  # chain-1 refs unchanged
    deep = BaseRef(b"x" * 16, 3, 4, 5, 6, 7, depth=5)
    assert len(deep.pack()) == 49 and BaseRef.unpack(deep.pack()) == deep
    for bad in (ref.pack() + b"\x01", ref.pack() + b"\x11", ref.pack()[:-1]):
        with pytest.raises(ValueError):
            BaseRef.unpack(bad)


def test_delta_chain_config_key():
    assert parse_config({}, "t").delta_chain == 1
    assert parse_config({"delta_chain": 3}, "t").delta_chain == 3
    for bad in (0, 17, True, "2"):
        with pytest.raises(ConfigError, match="delta_chain"):
            parse_config({"delta_chain": bad}, "t")


def test_unpack_converts_a_pinned_base_and_its_dependent(backing, capsys):
    """The link that pins a delta base is dccfs's own, hidden from st_nlink: unpack must not
    take it for a user's hard link and leave the base a container ("2 hard links")."""
    from dccfs.offline import run_unpack
    from dccfs.offline_common import file_kind
    (backing / ".dccfs" / "tmp").mkdir()
    data, files = _write_series(backing, 2, max_chain=1)
    for f in files:
        os.close(f.fd)
    assert os.stat(backing / "run" / "step-10.bin").st_nlink == 2  # pinned
    assert run_unpack(str(backing), progress=False) == 0
    err = capsys.readouterr().err
    assert "skipped" not in err, err
    for i, rel in enumerate(("run/step-10.bin", "run/step-20.bin")):
        fd = os.open(backing / rel, os.O_RDONLY)
        try:
            assert file_kind(fd) == "plain", rel
        finally:
            os.close(fd)
        assert (backing / rel).read_bytes() == data[i]


def test_a_reference_naming_a_huge_record_is_refused_before_reading(backing):
    """A damaged reference's record length used to go straight into one pread: up to 4 GiB
    asked of the disk and of memory. It is refused as a damaged chunk first."""
    import dataclasses
    _, files = _write_series(backing, 2, max_chain=1)
    loc = files[1].index[0]
    head = RecordHeader.unpack(os.pread(files[1].fd, RECORD_HEADER_SIZE, loc.offset))
    params = os.pread(files[1].fd, head.params_len, loc.offset + RECORD_HEADER_SIZE)
    ref = BaseRef.unpack(delta_base_ref(params))
    store = BaseStore(str(backing))
    try:
        assert store.read_base_chunk(ref)  # the real reference reads
        with pytest.raises(ChunkError, match="names a record of"):
            store.read_base_chunk(dataclasses.replace(ref, length=(1 << 32) - 1))
        with pytest.raises(ChunkError, match="names a record of"):  # OverflowError from pread before
            store.read_base_chunk(dataclasses.replace(ref, offset=1 << 63))
    finally:
        store.close()


def test_no_pin_counts_as_unused_while_a_dependent_is_damaged(backing):
    """A dependent whose records cannot all be read may name any pin, so fsck --repair must
    not remove pins then: it used to count only the readable references and delete the
    rest, making the damage worse."""
    _, files = _write_series(backing, 2, max_chain=1)
    pins = os.listdir(backing / ".dccfs" / "bases")
    assert pins and unreferenced_bases(str(backing)) == []
    dependent = files[1]
    for loc in dependent.index.values():  # every record header destroyed, the index intact
        os.pwrite(dependent.fd, b"\xff" * 8, loc.offset)
    os.unlink(backing / "run" / "step-10.bin")
    assert unreferenced_bases(str(backing)) == []
    assert os.listdir(backing / ".dccfs" / "bases") == pins


def test_a_base_chunk_is_cached_when_asked_for_a_second_time(backing):
    """One read of one dependent uses each base chunk once, so the first decode stays out of
    T0; a chunk asked for again (a second dependent, a re-read after T0 dropped the
    dependent's chunk) is hot and is kept."""
    from dccfs.cache import ChunkCache
    _, files = _write_series(backing, 2, max_chain=1)
    refs = []
    for idx in sorted(files[1].index):
        loc = files[1].index[idx]
        head = RecordHeader.unpack(os.pread(files[1].fd, RECORD_HEADER_SIZE, loc.offset))
        params = os.pread(files[1].fd, head.params_len, loc.offset + RECORD_HEADER_SIZE)
        refs.append(BaseRef.unpack(delta_base_ref(params)))
    cache = ChunkCache("lru", 16 << 20)
    store = BaseStore(str(backing), cache)
    try:
        first = [store.read_base_chunk(ref) for ref in refs]
        assert cache.used == 0
        second = [store.read_base_chunk(ref) for ref in refs]
        assert second == first and cache.used == sum(map(len, first))
        assert [store.read_base_chunk(ref) for ref in refs] == first  # now from the cache
    finally:
        store.close()


def _read_all(backing, rel: str) -> bytes:
    fd = os.open(backing / rel, os.O_RDONLY)
    try:
        container = Container.open(fd, rel)
        container.base_store = BaseStore(str(backing))
        try:
            return b"".join(container.read_chunk(i) for i in sorted(container.index))
        finally:
            container.base_store.close()
    finally:
        os.close(fd)


def test_a_pinned_base_whose_end_is_damaged_is_never_cut(backing, capsys, caplog):
    """A base whose trailer and index end were destroyed recovers an earlier commit, and the
    bytes past it are committed records its dependents read by offset. fsck --repair, and the
    mount's next append, used to cut them as a torn tail, destroying the dependents (found by
    review). A linked container keeps its bytes: fsck reports it, and appends fail with EIO."""
    import errno
    from dccfs.offline import run_fsck
    (backing / ".dccfs" / "tmp").mkdir()
    data, files = _write_series(backing, 2, max_chain=1)
    for f in files:
        os.close(f.fd)
    base = backing / "run" / "step-10.bin"
    size = base.stat().st_size - 64
    os.truncate(base, size)
    with caplog.at_level(logging.WARNING):
        assert run_fsck(str(backing), repair=True, progress=False) == 1
    out = capsys.readouterr().out
    assert "not cut: the file has 2 links" in out
    # each finding once: not again for the pin's name, nor as the scan's own warning
    assert out.count("recovered by scanning") == 1
    assert not [r for r in caplog.records if r.name == "dccfs.container_records"]
    assert base.stat().st_size == size
    # fsck of a subdirectory finds the pins above it too
    assert run_fsck(str(backing / "run"), repair=True, progress=False) == 1
    assert "not cut: the file has 2 links" in capsys.readouterr().out
    assert base.stat().st_size == size
    assert _read_all(backing, "run/step-20.bin") == data[1]
    fd = os.open(base, os.O_RDWR)
    try:
        container = Container.open(fd, str(base))
        raw = data[0][:1 << CHUNK_SHIFT]
        with pytest.raises(OSError) as refused:
            container.append_chunk(0, encode_chunk(raw, _hints(raw)), len(raw), checksum64(raw))
        assert refused.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert base.stat().st_size == size
    assert _read_all(backing, "run/step-20.bin") == data[1]


def test_repair_changes_no_pin_while_a_base_reference_is_damaged(backing, capsys):
    """One flipped bit in a delta's base reference names a pin that does not exist, so the real
    one looked unused, and fsck --repair removed it although it reported the file damaged: the
    file was lost for good (found by review). With any damaged file, pins stay as they are."""
    from dccfs.offline import run_fsck
    (backing / ".dccfs" / "tmp").mkdir()
    data, files = _write_series(backing, 2, max_chain=1)
    dependent = files[1]
    os.close(files[0].fd)
    os.unlink(backing / "run" / "step-10.bin")  # only the pin holds the base now
    pins = sorted(os.listdir(backing / ".dccfs" / "bases"))
    assert pins
    idx = min(i for i in dependent.index if _depths(dependent)[sorted(dependent.index).index(i)])
    loc = dependent.index[idx]
    head = RecordHeader.unpack(os.pread(dependent.fd, RECORD_HEADER_SIZE, loc.offset))
    params = os.pread(dependent.fd, head.params_len, loc.offset + RECORD_HEADER_SIZE)
    at = loc.offset + RECORD_HEADER_SIZE + params.index(delta_base_ref(params))  # the base's file id
    first = os.pread(dependent.fd, 1, at)
    os.pwrite(dependent.fd, bytes([first[0] ^ 1]), at)
    assert run_fsck(str(backing), repair=True, progress=False) == 1
    assert "pins and their records left as they are" in capsys.readouterr().out
    assert sorted(os.listdir(backing / ".dccfs" / "bases")) == pins
    os.pwrite(dependent.fd, first, at)
    os.close(dependent.fd)
    assert _read_all(backing, "run/step-20.bin") == data[1]


def test_a_base_whose_index_has_a_flipped_bit_still_serves_its_dependents(backing):
    """A flipped bit in a base's own index makes the base's open fail (damage, not a crash: container_records
    .damage_behind_trailer), but its dependents name its records by offset, each with its own checksum: they still
    read."""
    from dccfs.container import ContainerError
    data, files = _write_series(backing, 2, max_chain=1)
    index_offset = files[0].last_index
    for f in files:
        os.close(f.fd)
    base = backing / "run" / "step-10.bin"
    with open(base, "r+b") as f:
        f.seek(index_offset + RECORD_HEADER_SIZE - 2)  # the index header's checksum
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    fd = os.open(base, os.O_RDONLY)
    try:
        with pytest.raises(ContainerError, match="does not verify"):
            Container.open(fd, str(base))
    finally:
        os.close(fd)
    assert _read_all(backing, "run/step-20.bin") == data[1]
