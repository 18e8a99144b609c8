"""Codec 3 (read blocks) and the version-2 index's block tables: round trips, one block read alone, damage."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from dccfs.cli import main as cli_main
from dccfs.codecs import CODEC_BLOCKS, ChunkHints, CodecError, Segment, decode_chunk, encode_chunk, read_blocks
from dccfs.compaction import write_compacted
from dccfs.container import ChunkError, Container
from dccfs.format import (
    FORMAT_VERSION, INDEX_BLOCKS, INDEX_FULL, RECORD_HEADER_SIZE, FormatError, Header, RecordHeader,
    checksum64, pack_index, parse_index_body, verify_index_payload,
)

BLOCK = 128 << 10
MIB = 1 << 20


def weights(n_bytes: int, seed: int = 0, dtype=np.float32) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n_bytes // np.dtype(dtype).itemsize) * 0.02).astype(dtype).tobytes()


def blocked(raw: bytes, segments: tuple[Segment, ...], block: int = BLOCK):
    return encode_chunk(raw, ChunkHints(segments=segments, block_size=block))


def block_bytes(enc, raw_len: int, k: int) -> bytes:
    starts = read_blocks.block_starts(enc.params, enc.payload, raw_len)
    ends = starts[1:] + [len(enc.payload)]
    return enc.payload[starts[k]:ends[k]]


def test_blocked_chunk_round_trips_and_each_block_decodes_alone():
    # a short last block, and a tensor boundary inside a block: a f32 tensor, then bf16 at an odd phase
    f32 = weights(600 << 10)
    bf16 = (np.frombuffer(weights(400 << 10, 1), np.uint32) >> 16).astype(np.uint16).tobytes()
    raw = f32 + b"header!" + bf16[: (1 << 20) - len(f32) - 7 - 1000]
    segments = (Segment(0, len(f32), "f32"), Segment(len(f32) + 7, len(raw) - len(f32) - 7, "bf16"))
    enc = blocked(raw, segments)
    assert enc.codec_id == CODEC_BLOCKS
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    count = -(-len(raw) // BLOCK)
    assert len(read_blocks.block_starts(enc.params, enc.payload, len(raw))) == count
    for k in range(count):
        expected = raw[k * BLOCK:(k + 1) * BLOCK]
        last = k == count - 1
        got = read_blocks.decode_block(block_bytes(enc, len(raw), k), None if last else BLOCK, decode_chunk,
                                       max_len=BLOCK)
        assert got == expected, k
    # the blocks cost little: within 0.5% of the chunk encoded whole
    whole = encode_chunk(raw, ChunkHints(segments=segments))
    assert len(enc.payload) + len(enc.params) < 1.005 * (len(whole.payload) + len(whole.params))


def test_incompressible_blocks_are_stored_and_read_back():
    raw = weights(MIB // 2) + np.random.default_rng(3).bytes(MIB // 2)
    enc = blocked(raw, (Segment(0, MIB, "f32"),))
    codecs = [block_bytes(enc, MIB, k)[0] for k in range(8)]
    assert codecs[:4] == [16] * 4 and codecs[4:] == [0] * 4
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, MIB) == raw
    assert read_blocks.decode_block(block_bytes(enc, MIB, 6), BLOCK, decode_chunk) == raw[6 * BLOCK:7 * BLOCK]


def test_piece_segments_keep_the_element_phase():
    # a f32 tensor starting at byte 2 of the chunk: a block at 128 KiB starts 2 bytes into an element
    segments = (Segment(2, 300_000, "f32"),)
    assert read_blocks.piece_segments(segments, 0, BLOCK) == (Segment(2, BLOCK - 2, "f32"),)
    assert read_blocks.piece_segments(segments, BLOCK, 2 * BLOCK) == (Segment(2, BLOCK - 2, "f32"),)
    assert read_blocks.piece_segments(segments, 2 * BLOCK, 3 * BLOCK) == (Segment(2, 300_002 - 2 * BLOCK - 2, "f32"),)
    assert read_blocks.piece_segments(segments, 3 * BLOCK, 4 * BLOCK) == ()


def test_small_or_generic_chunks_stay_whole():
    raw = weights(BLOCK)
    assert encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),), block_size=BLOCK)).codec_id \
        != CODEC_BLOCKS
    text = b"".join(b"line %d of a tokenizer file\n" % i for i in range(40000))
    enc = encode_chunk(text, ChunkHints(block_size=BLOCK))
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(text)) == text


@pytest.mark.parametrize("damage, message", [
    ("payload", "checksum mismatch|codec|rans|tensor"),
    ("digest", "checksum mismatch"),
    ("reserved", "reserved byte is 1"),
    ("raw_len", "raw bytes"),
    ("nested", "may not hold blocks"),
])
def test_a_damaged_block_is_refused_with_the_reason(damage, message):
    raw = weights(MIB)
    enc = blocked(raw, (Segment(0, MIB, "f32"),))
    block = bytearray(block_bytes(enc, MIB, 3))
    if damage == "payload":
        block[len(block) // 2] ^= 0x40
    elif damage == "digest":
        block[12] ^= 1
    elif damage == "reserved":
        block[1] = 1
    elif damage == "raw_len":
        struct.pack_into("<I", block, 8, BLOCK - 4)
    elif damage == "nested":
        block[0] = CODEC_BLOCKS
    with pytest.raises(CodecError, match=message):
        read_blocks.decode_block(bytes(block), BLOCK, decode_chunk)


@pytest.mark.parametrize("params", [b"", b"\x02\x11\x08", b"\x01\x05\x08", b"\x01\x11\x07", b"\x01\x11\x08\x00"])
def test_bad_blocks_params_are_refused(params):
    enc = blocked(weights(MIB), (Segment(0, MIB, "f32"),))
    with pytest.raises(CodecError, match="blocks params"):
        decode_chunk(CODEC_BLOCKS, params, enc.payload, MIB)


def test_truncated_blocks_payload_is_refused():
    enc = blocked(weights(MIB), (Segment(0, MIB, "f32"),))
    with pytest.raises(CodecError, match="blocks"):
        decode_chunk(CODEC_BLOCKS, enc.params, enc.payload[:-100], MIB)


def _index_head(blob: bytes) -> tuple[RecordHeader, bytes]:
    head = RecordHeader.unpack(blob)
    return head, blob[RECORD_HEADER_SIZE:]


def test_index_block_tables_round_trip():
    entries = {0: (64, 5000, (40, 1000, 3000), 17), 1: (5064, 300, (), 0), 7: (0, 0, (), 0)}
    head, payload = _index_head(pack_index(INDEX_FULL | INDEX_BLOCKS, 12345, 0, entries))
    assert parse_index_body(head, verify_index_payload(head, payload)) == entries


@pytest.mark.parametrize("table, reason", [
    (((40, 40), 17), "do not lie"),
    (((20, 1000), 17), "do not lie"),
    (((40, 6000), 17), "do not lie"),
    (((40, 1000), 11), "block table"),
    (((), 17), "block table"),
])
def test_index_block_tables_that_cannot_be_are_refused(table, reason):
    starts, shift = table
    blob = bytearray(pack_index(INDEX_FULL | INDEX_BLOCKS, 1, 0, {0: (64, 5000, starts, 0)}))
    # pack the bad shift by hand: pack_index writes 0 for an empty table
    struct.pack_into("<B", blob, RECORD_HEADER_SIZE + 24, shift)
    body = bytes(blob[RECORD_HEADER_SIZE:-8])
    blob[-8:] = checksum64(body).to_bytes(8, "little")
    head, payload = _index_head(bytes(blob))
    with pytest.raises(FormatError, match=reason):
        verify_index_payload(head, payload)


def test_unknown_index_kind_is_refused():
    head, payload = _index_head(pack_index(INDEX_FULL, 1, 0, {0: (64, 100)}))
    bad = RecordHeader(head.rtype, 4 | INDEX_FULL, 0, head.payload_len, head.a, head.b, head.c)
    with pytest.raises(FormatError, match="unknown index kind"):
        verify_index_payload(bad, payload)


def test_header_versions_1_and_2_read_3_refused():
    for version in (1, 2):
        header = Header(version, 20, bytes(16), 1)
        assert Header.unpack(header.pack()).version == version
    with pytest.raises(FormatError, match="version 3 is not supported"):
        Header.unpack(Header(3, 20, bytes(16), 1).pack())
    assert FORMAT_VERSION == 2


def _container_with_blocks(path: str, raw: bytes, version: int = FORMAT_VERSION) -> Container:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    container = Container.create(fd, path, 20)
    if version != FORMAT_VERSION:
        container.header = Header(version, 20, container.header.file_id, container.header.created_ns)
        os.pwrite(fd, container.header.pack(), 0)
    enc = blocked(raw, (Segment(0, len(raw), "f32"),))
    container.append_chunk(0, enc, len(raw), checksum64(raw))
    container.append_chunk(1, encode_chunk(raw[:1000]), 1000, checksum64(raw[:1000]))
    container.commit(MIB + 1000, durable=False)
    return container


def test_container_keeps_block_tables_and_reads_one_block(tmp_path):
    raw = weights(MIB)
    path = str(tmp_path / "c")
    _container_with_blocks(path, raw)
    fd = os.open(path, os.O_RDWR)
    container = Container.open(fd, path)
    loc = container.index[0]
    assert len(loc.blocks) == 8 and loc.block_shift == 17 and container.index[1].blocks == ()
    for k in (0, 5, 7):
        assert container.read_block(0, loc, k) == raw[k * BLOCK:(k + 1) * BLOCK]
    assert container.read_chunk(0, check_blocks=True) == raw
    # compaction carries the tables over
    copy = str(tmp_path / "copy")
    write_compacted(container, copy)
    copied = Container.open(os.open(copy, os.O_RDWR), copy)
    assert copied.index[0].blocks == tuple(b for b in loc.blocks) and copied.header.generation == 1
    assert copied.read_block(0, copied.index[0], 6) == raw[6 * BLOCK:7 * BLOCK]


def test_a_block_cannot_pass_for_another_chunks(tmp_path):
    """Block checksums are seeded with the chunk's index: an index entry naming another chunk's record (a bug, or
    damage the index's own checksum cannot see) fails a block read, as it fails the record's header check."""
    path = str(tmp_path / "c")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    container = Container.create(fd, path, 20)
    raws = [weights(MIB, seed) for seed in (1, 2)]
    for idx, raw in enumerate(raws):
        hints = ChunkHints(segments=(Segment(0, MIB, "f32"),), block_size=BLOCK, block_seed=idx)
        container.append_chunk(idx, encode_chunk(raw, hints), MIB, checksum64(raw))
    assert container.read_block(1, container.index[1], 3) == raws[1][3 * BLOCK:4 * BLOCK]
    with pytest.raises(ChunkError, match="chunk 0: block 3: blocks: block checksum mismatch"):
        container.read_block(0, container.index[1], 3)
    with pytest.raises(ChunkError, match="record of another chunk"):
        container.read_chunk(0, container.index[1])


def test_version_1_container_gets_no_block_tables_and_compaction_upgrades_it(tmp_path):
    raw = weights(MIB)
    path = str(tmp_path / "v1")
    container = _container_with_blocks(path, raw, version=1)
    assert not container.blocks_ok and container.index[0].blocks == ()
    reopened = Container.open(os.open(path, os.O_RDWR), path)
    assert reopened.header.version == 1 and reopened.read_chunk(0) == raw
    copy = str(tmp_path / "copy")
    write_compacted(reopened, copy)
    assert Container.open(os.open(copy, os.O_RDWR), copy).header.version == FORMAT_VERSION


def test_a_damaged_block_digest_fails_its_block_and_check_blocks_only(tmp_path):
    """The chunk's own checksum covers its raw bytes: a flipped bit in one block's digest leaves the whole
    chunk readable, fails only a read of that block, and fsck's check_blocks reports it."""
    raw = weights(MIB)
    path = str(tmp_path / "c")
    _container_with_blocks(path, raw)
    fd = os.open(path, os.O_RDWR)
    loc = Container.open(fd, path).index[0]
    digest_at = loc.offset + loc.blocks[2] + 12
    byte = os.pread(fd, 1, digest_at)
    os.pwrite(fd, bytes([byte[0] ^ 0x10]), digest_at)
    container = Container.open(fd, path)
    assert container.read_chunk(0) == raw
    assert container.read_block(0, loc, 1) == raw[BLOCK:2 * BLOCK]
    with pytest.raises(ChunkError, match="block 2: blocks: block checksum mismatch"):
        container.read_block(0, loc, 2)
    with pytest.raises(ChunkError, match="chunk 0: blocks: block 2 checksum mismatch"):
        container.read_chunk(0, check_blocks=True)



def _stats(mnt) -> dict:
    out = subprocess.run([sys.executable, "-m", "dccfs.cli", "stats", "--json", str(mnt)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["stats"]


@pytest.mark.mount
def test_small_reads_through_a_mount_decode_one_block(make_mount, corpus, tmp_path, runner):
    source = corpus / "models" / "minilm" / "model.safetensors"
    data = source.read_bytes()
    config = tmp_path / "blocks.toml"
    config.write_text('read_block_size = "128KiB"\n')
    mount = make_mount("m", "-c", str(config))
    shutil.copyfile(source, mount.mnt / "model.safetensors")
    plain = make_mount("d")  # the default stores chunks whole
    shutil.copyfile(source, plain.mnt / "model.safetensors")
    plain.stop()
    path = str(plain.backing / "model.safetensors")
    assert not any(loc.blocks for loc in Container.open(os.open(path, os.O_RDONLY), path).index.values())
    mount.remount()
    rng = random.Random(5)
    offsets = [rng.randrange(0, len(data) - 4096) for _ in range(200)]
    # across a block boundary, and the file's last bytes (a short last chunk)
    offsets += [(3 << 20) + BLOCK - 100, len(data) - 4096, len(data) - 10]
    fd = os.open(mount.mnt / "model.safetensors", os.O_RDONLY)
    try:
        for off in offsets:
            assert os.pread(fd, 4096, off) == data[off:off + 4096], off
    finally:
        os.close(fd)
    assert _stats(mount.mnt)["block_reads"] >= 150
    assert (mount.mnt / "model.safetensors").read_bytes() == data

    # two damaged chunks: a flipped digest in chunk 5's block 3 (its bytes are intact: a small read there falls
    # back to the whole chunk, whose own checksum holds), an unknown codec in chunk 6's block 2 (EIO there, for any
    # read of chunk 6 that needs that block; its other blocks still read alone). (A flipped payload bit is not sure
    # to change what decodes: it may land in bits the decoder never reads.)
    mount.stop()
    path = str(mount.backing / "model.safetensors")
    fd = os.open(path, os.O_RDWR)
    try:
        index = Container.open(fd, path).index
        at = index[5].offset + index[5].blocks[3] + 12
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x01]), at)
        os.pwrite(fd, b"\xee", index[6].offset + index[6].blocks[2])
    finally:
        os.close(fd)
    mount.start()
    mount.expect_errors = True
    fd = os.open(mount.mnt / "model.safetensors", os.O_RDONLY)
    try:
        for off in (5 * MIB + 3 * BLOCK + 8192, 6 * MIB + 4 * BLOCK + 8192):
            assert os.pread(fd, 4096, off) == data[off:off + 4096], off
        off = 6 * MIB + 2 * BLOCK + 8192
        with pytest.raises(OSError) as err:
            os.pread(fd, 4096, off)
        assert err.value.errno == errno.EIO
        # (a larger read of chunk 6 may come back short instead, with the bytes before block 2: read(2) reports
        # an error only when nothing was read)
        try:
            got = os.pread(fd, MIB, 6 * MIB)
        except OSError as exc:
            assert exc.errno == errno.EIO
        else:
            assert len(got) <= 2 * BLOCK and got == data[6 * MIB:6 * MIB + len(got)]
    finally:
        os.close(fd)
    assert _stats(mount.mnt)["block_reads"] >= 1
    with pytest.raises(OSError):
        (mount.mnt / "model.safetensors").read_bytes()
    assert _stats(mount.mnt)["errors"]["checksum"] >= 2
    mount.stop()
    result = runner.invoke(cli_main, ["fsck", "-q", str(mount.backing)])
    assert result.exit_code == 1
    assert "DAMAGED: chunk 5" in result.output and "blocks: block 3 checksum mismatch" in result.output
    assert "DAMAGED: chunk 6" in result.output and "blocks: block 2:" in result.output
