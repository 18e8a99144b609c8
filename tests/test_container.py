"""Container create/append/commit/open round trips, index chains, torn tails and damage (no FUSE)."""
from __future__ import annotations

import os
import random

import pytest

from dccfs.codecs import ChunkHints, encode_chunk
from dccfs.container import (
    MAX_DELTA_CHAIN, ChunkError, Container, ContainerError, read_logical_size,
)
from dccfs.format import (
    HEADER_SIZE, INDEX_DELTA, INDEX_FULL, MIN_CHUNK_SHIFT, RECORD_HEADER_SIZE, REC_CHUNK, REC_INDEX,
    REC_TRAILER, RecordHeader, checksum64, trailer_record,
)
from offline_containers import flip_byte

SHIFT = MIN_CHUNK_SHIFT  # 64 KiB chunks
CS = 1 << SHIFT
ZSTD = ChunkHints(codec="zstd")


def chunk_bytes(seed: int, length: int = CS) -> bytes:
    """Compressible but seed-specific content."""
    rng = random.Random(seed)
    words = [f"w{seed}-{rng.randrange(1000)}".encode() for _ in range(64)]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words) + b" "
    return bytes(out[:length])


def append(container: Container, idx: int, raw: bytes, hints: ChunkHints | None = ZSTD):
    return container.append_chunk(idx, encode_chunk(raw, hints), len(raw), checksum64(raw))


def contents(container: Container) -> dict[int, bytes]:
    return {idx: container.read_chunk(idx) for idx in sorted(container.index)}


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "file.dcc")


def new_container(path: str) -> Container:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    return Container.create(fd, path, SHIFT)


def reopen(path: str) -> Container:
    fd = os.open(path, os.O_RDWR)
    return Container.open(fd, path)


def close(container: Container) -> None:
    os.close(container.fd)


def test_round_trip_across_reopen(path):
    c = new_container(path)
    data = {0: chunk_bytes(0), 1: os.urandom(CS), 3: chunk_bytes(3, 1000)}
    append(c, 0, data[0])
    append(c, 1, data[1], None)  # incompressible: stored
    append(c, 3, data[3])
    size = 3 * CS + 1000
    c.commit(size, durable=True)
    assert contents(c) == data
    close(c)

    c = reopen(path)
    try:
        assert c.size == size
        assert contents(c) == data
        assert c.read_chunk(2) is None  # a hole
        assert not c.recovery.used_scan and c.recovery.torn_tail == 0
        assert c.stored_bytes == os.path.getsize(path)
    finally:
        close(c)


def test_empty_container(path):
    c = new_container(path)
    close(c)
    c = reopen(path)
    try:
        assert c.size == 0 and c.index == {}
        assert c.recovery.torn_tail == 0
        assert read_logical_size(c.fd) == 0
    finally:
        close(c)


def test_bare_header_is_an_empty_container_that_takes_commits(path):
    c = new_container(path)
    os.ftruncate(c.fd, HEADER_SIZE)  # create() writes a bare header; no index before the first commit
    close(c)
    c = reopen(path)
    try:
        assert c.size == 0 and c.index == {}
        assert c.recovery.used_scan
        append(c, 0, chunk_bytes(1))
        c.commit(CS, durable=False)
    finally:
        close(c)
    c = reopen(path)
    try:
        assert c.read_chunk(0) == chunk_bytes(1)
    finally:
        close(c)


def index_kind_at(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        head = RecordHeader.unpack(f.read(RECORD_HEADER_SIZE))
    assert head.rtype == REC_INDEX
    return head.sub


def test_delta_and_full_index_chain(path):
    c = new_container(path)
    model: dict[int, bytes] = {}
    kinds = []
    commits = 2 * MAX_DELTA_CHAIN + 5
    for n in range(commits):
        idx = n % 5
        if n % 7 == 6 and idx in model:
            c.drop_chunk(idx)  # a delta entry with offset 0
            del model[idx]
        else:
            model[idx] = chunk_bytes(100 + n)
            append(c, idx, model[idx])
        c.commit(5 * CS, durable=False)
        kinds.append(index_kind_at(path, c.last_index))
        assert c.delta_chain <= MAX_DELTA_CHAIN
        if n % 6 == 0 or n == commits - 1:
            other = reopen(path)
            try:
                assert contents(other) == model
                assert other.delta_chain == c.delta_chain
            finally:
                close(other)
    close(c)
    # The first commit writes a full index, then MAX_DELTA_CHAIN deltas, then a full one again.
    period = MAX_DELTA_CHAIN + 1
    assert kinds == [INDEX_FULL if n % period == 0 else INDEX_DELTA for n in range(commits)]
    c = reopen(path)
    try:
        assert contents(c) == model
        assert all(c.read_chunk(i) is None for i in range(5) if i not in model)
    finally:
        close(c)


def _state(c: Container) -> tuple[int, dict[int, bytes]]:
    return c.size, contents(c)


def test_torn_tail_at_every_offset_of_the_last_commit(tmp_path):
    path = str(tmp_path / "full.dcc")
    c = new_container(path)
    append(c, 0, chunk_bytes(1, 3000))
    c.commit(3000, durable=True)
    state1 = _state(c)
    end1 = c.end
    append(c, 0, chunk_bytes(2, 1500))
    append(c, 1, chunk_bytes(3, 500))
    c.commit(CS + 500, durable=True)
    state2 = _state(c)
    end2 = c.end
    close(c)
    with open(path, "rb") as f:
        blob = f.read()
    assert len(blob) == end2 and end1 < end2

    torn = str(tmp_path / "torn.dcc")
    seen_new_at = None
    for cut in range(end1, end2 + 1):
        with open(torn, "wb") as f:
            f.write(blob[:cut])
        fd = os.open(torn, os.O_RDONLY)
        try:
            c = Container.open(fd, torn)
            state = _state(c)
            assert state in (state1, state2), f"cut at {cut}: garbage state"
            if state == state2 and seen_new_at is None:
                seen_new_at = cut
            if seen_new_at is not None:
                assert state == state2, f"cut at {cut}: went back to the old commit"
            assert c.recovery.committed_end <= cut == c.recovery.file_end
            logical = read_logical_size(fd)
            assert logical is None or logical == c.size
        finally:
            os.close(fd)
    assert _state_at(torn, blob, end1) == state1
    assert _state_at(torn, blob, end2) == state2
    # The new commit is visible once its index is complete, even without the trailer.
    assert seen_new_at == end2 - RECORD_HEADER_SIZE


def _state_at(path: str, blob: bytes, cut: int):
    with open(path, "wb") as f:
        f.write(blob[:cut])
    c = reopen(path)
    try:
        return _state(c)
    finally:
        close(c)


def test_torn_tail_is_cut_before_the_next_append(path):
    c = new_container(path)
    append(c, 0, chunk_bytes(1))
    c.commit(CS, durable=True)
    committed = c.end
    close(c)
    with open(path, "ab") as f:  # half a chunk record from an interrupted write
        f.write(RecordHeader(REC_CHUNK, 0, 0, 1000, 1, 1000, 0).pack() + b"x" * 300)
    c = reopen(path)
    try:
        assert c.recovery.used_scan
        assert c.recovery.torn_tail == RECORD_HEADER_SIZE + 300
        assert read_logical_size(c.fd) is None
        append(c, 1, chunk_bytes(2))
        c.commit(2 * CS, durable=True)
    finally:
        close(c)
    # Had the garbage stayed in the middle, a later scan would stop there; it was cut.
    with open(path, "rb") as f:
        f.seek(committed)
        assert RecordHeader.unpack(f.read(RECORD_HEADER_SIZE)).rtype == REC_CHUNK
    with open(path, "r+b") as f:  # tear the new trailer so opening has to scan
        f.truncate(os.path.getsize(path) - 1)
    c = reopen(path)
    try:
        assert c.recovery.used_scan
        assert contents(c) == {0: chunk_bytes(1), 1: chunk_bytes(2)}
    finally:
        close(c)


def test_a_view_that_must_end_where_read_refuses_to_append_over_another_writer(path):
    """--shared: another node appended and committed after this view was read; appending at the
    view's end would go over that node's records (found by review, behind a stale view). The
    append and the commit fail instead, and the file keeps the other node's commit."""
    c = new_container(path)
    append(c, 0, chunk_bytes(1))
    c.commit(CS, durable=True)
    stale = reopen(path)
    stale.ends_where_read = True
    append(c, 1, chunk_bytes(2))  # the other node
    c.commit(2 * CS, durable=True)
    close(c)
    size = os.path.getsize(path)
    try:
        with pytest.raises(OSError, match="another node wrote it meanwhile"):
            append(stale, 0, chunk_bytes(3))
        stale.size = 3 * CS
        with pytest.raises(OSError, match="another node wrote it meanwhile"):
            stale.commit(3 * CS, durable=True)
    finally:
        close(stale)
    assert os.path.getsize(path) == size
    c = reopen(path)
    try:
        assert contents(c) == {0: chunk_bytes(1), 1: chunk_bytes(2)}
    finally:
        close(c)


def test_a_reset_whose_header_write_fails_never_leaves_a_headerless_file(path, monkeypatch):
    """Overwriting (reset) truncates the file, then writes a fresh header. If that write
    fails, the next append used to land at the old end of an empty file: a file without a
    header, which a later open takes for a plain file of record bytes."""
    import dccfs.container as container_module
    c = new_container(path)
    try:
        for idx in range(3):
            append(c, idx, chunk_bytes(idx))
        c.commit(3 * CS, durable=True)
        real_pwrite_all = container_module.pwrite_all

        def header_write_fails(fd, data, offset):
            monkeypatch.setattr(container_module, "pwrite_all", real_pwrite_all)
            raise OSError(5, "injected disk error")

        monkeypatch.setattr(container_module, "pwrite_all", header_write_fails)
        with pytest.raises(OSError):
            c.reset()
        assert os.path.getsize(path) == 0 and not c.index and c.size == 0
        append(c, 0, chunk_bytes(9))
        c.commit(CS, durable=True)
    finally:
        close(c)
    c = reopen(path)
    try:
        assert c.size == CS and contents(c) == {0: chunk_bytes(9)}
    finally:
        close(c)


def test_read_logical_size(path):
    c = new_container(path)
    assert read_logical_size(c.fd) == 0
    append(c, 2, chunk_bytes(7))
    c.commit(2 * CS + 123, durable=False)
    assert read_logical_size(c.fd) == 2 * CS + 123
    with open(path, "rb") as f:
        f.seek(-RECORD_HEADER_SIZE, os.SEEK_END)
        trailer = RecordHeader.unpack(f.read())
    assert trailer.rtype == REC_TRAILER and trailer.a == 2 * CS + 123 and trailer.c == c.last_index
    os.ftruncate(c.fd, HEADER_SIZE)
    assert read_logical_size(c.fd) == 0
    os.ftruncate(c.fd, HEADER_SIZE - 1)
    assert read_logical_size(c.fd) is None
    close(c)


@pytest.mark.parametrize("offset", [0, 5, 10, 30, HEADER_SIZE - 1])
def test_corrupt_header_is_a_container_error(path, offset):
    c = new_container(path)
    append(c, 0, chunk_bytes(1))
    c.commit(CS, durable=False)
    close(c)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(ContainerError) as info:
        reopen(path)
    assert info.value.path == path and "header" in info.value.reason


def test_corrupt_index_payload_is_a_container_error(path):
    c = new_container(path)
    append(c, 0, chunk_bytes(1))
    c.commit(CS, durable=False)
    index_offset = c.last_index
    close(c)
    with open(path, "r+b") as f:
        f.seek(index_offset + RECORD_HEADER_SIZE + 3)
        f.write(b"\xff")
    with pytest.raises(ContainerError, match="index"):
        reopen(path)


@pytest.mark.parametrize("where", ["payload", "record header"])
def test_flipped_byte_in_one_chunk_only_fails_that_chunk(path, where):
    c = new_container(path)
    data = {i: chunk_bytes(i) for i in range(4)}
    for i, raw in data.items():
        append(c, i, raw)
    c.commit(4 * CS, durable=True)
    loc = c.index[2]
    close(c)
    spot = loc.offset + (loc.length // 2 if where == "payload" else 12)
    with open(path, "r+b") as f:
        f.seek(spot)
        byte = f.read(1)
        f.seek(spot)
        f.write(bytes([byte[0] ^ 0x01]))
    c = reopen(path)
    try:
        for i, raw in data.items():
            if i == 2:
                with pytest.raises(ChunkError) as info:
                    c.read_chunk(i)
                assert info.value.chunk_index == 2 and info.value.path == path
            else:
                assert c.read_chunk(i) == raw
    finally:
        close(c)


def _commits(path: str, counts: list[int]) -> list[dict[int, bytes]]:
    """A container with one commit per entry of counts (that many chunks rewritten, from chunk 0); the state after
    each commit."""
    c = new_container(path)
    states = []
    for n, count in enumerate(counts):
        for idx in range(count):
            append(c, idx, chunk_bytes(100 * n + idx))
        c.commit(max(counts[:n + 1]) * CS, durable=False)
        states.append(_state(c))
    close(c)
    return states


def _index_offsets(path: str) -> list[int]:
    with open(path, "rb") as f:
        blob = f.read()
    offsets, at = [], HEADER_SIZE
    while at < len(blob):
        head = RecordHeader.unpack(blob[at:at + RECORD_HEADER_SIZE])
        if head.rtype == REC_INDEX:
            offsets.append(at)
        at += head.total_len
    return offsets


@pytest.mark.parametrize("which,where", [(-1, "header"), (-1, "payload"), (0, "header"), (1, "payload")])
def test_a_flipped_bit_in_a_committed_index_fails_the_open_rather_than_roll_back(path, which, where):
    """A valid trailer closes the file, so its commit completed; an index in its chain that does not verify, with no
    sector of zeros a power loss would leave, is damage. The open used to fall back to an earlier commit: the file
    read as empty, or as an older version, with no error, and fsck --repair cut the intact records (found by
    review). It fails now; fsck and cat (damaged_ok) see the last commit that verifies."""
    states = _commits(path, [3, 1, 1])
    target = _index_offsets(path)[which]
    flip_byte(path, target + (RECORD_HEADER_SIZE - 2 if where == "header" else RECORD_HEADER_SIZE + 9))
    with pytest.raises(ContainerError, match="does not verify"):
        reopen(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        c = Container.open(fd, path, damaged_ok=True)
        assert c.recovery.damage and f"offset {target}" in c.recovery.damage
        assert _state(c) == {-1: states[1], 0: (0, {}), 1: states[0]}[which]  # the commit before the damage
    finally:
        os.close(fd)


def test_a_zeroed_sector_in_the_last_index_is_a_power_loss_and_rolls_back(path):
    """Window 5b of docs/commit-protocol.md: the trailer's page reached the disk, a page of the index did not and
    reads as zeros. The commit was never acknowledged, so the one before answers (invariant 5), with no error."""
    states = _commits(path, [2, 80])  # an index of 80 entries spans whole 512-byte sectors
    last = _index_offsets(path)[-1]
    sector = last + RECORD_HEADER_SIZE + 512 - (last + RECORD_HEADER_SIZE) % 512
    with open(path, "r+b") as f:
        f.seek(sector)
        f.write(bytes(512))
    c = reopen(path)
    try:
        assert c.recovery.damage is None and _state(c) == states[0]
    finally:
        close(c)


def test_a_crash_after_chunk_data_that_ends_like_a_trailer_is_no_damage(path):
    """A crash after a commit's chunk records, before its index, leaves the last chunk's data at the end of the file.
    When that data is itself a container (stored through the mount), its last 32 bytes are a valid trailer naming an
    index that is not there. That was taken for damage, and the file stayed unreadable (found by review): damage is
    called so only when the recovery scan stops on the index the trailer names."""
    c = new_container(path)
    append(c, 0, chunk_bytes(1))
    c.commit(CS, durable=True)
    committed = _state(c)
    index_at = c.end
    data = random.Random(3).randbytes(CS - RECORD_HEADER_SIZE) + trailer_record(CS, index_at + 100)
    append(c, 1, data, ChunkHints(codec="store"))
    close(c)
    with open(path, "rb") as f:
        assert f.read()[-RECORD_HEADER_SIZE:] == data[-RECORD_HEADER_SIZE:]
    c = reopen(path)
    try:
        assert c.recovery.damage is None and _state(c) == committed and c.recovery.torn_tail > CS
    finally:
        close(c)
