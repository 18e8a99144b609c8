"""Hostile chunk records, each crafted at one hole the decoders had: a clean error, never a hang, crash or huge allocation."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zstandard

from dccfs.codecs import ChunkHints, EncodedChunk, Segment, encode_chunk
from dccfs.codecs.varint import get_varint, put_varint
from dccfs.container import ChunkError, Container, ContainerError
from dccfs.format import (HEADER_SIZE, INDEX_DELTA, INDEX_FULL, RECORD_HEADER_SIZE, REC_INDEX, Header, RecordHeader,
                          checksum64, chunk_record_header, pack_index, trailer_record)

# a case that decodes longer than this hangs (a real decode takes milliseconds); the child's start, a cold compile
# of the kernels on a fresh clone included (minutes), is not counted: it warms the kernels up before the first case
CHILD_SECONDS = 120
START_SECONDS = 900

# The child (tests/decode_child.py) prints one JSON line per case: outcome, length or message, the cause's type
# and text, and the memory the decode allocated.
DECODE_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_child.py")


def decode_in_child(tmp_path, cases, env=None) -> list[list]:
    """Decode (codec_id, params, payload, raw_len, base) cases in a fresh interpreter, so that a crash or a hang
    fails the test instead of killing pytest; decode_child.decode_one's list per case."""
    path = tmp_path / "cases.pickle"
    path.write_bytes(pickle.dumps([tuple(c) + (None,) * (5 - len(c)) for c in cases]))
    env = {**os.environ, "DCCFS_CASE_SECONDS": str(CHILD_SECONDS), **(env or {})}
    try:
        proc = subprocess.run([sys.executable, DECODE_CHILD, str(path)], capture_output=True, text=True,
                              timeout=START_SECONDS + CHILD_SECONDS * len(cases), env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the decoding child did not finish in {exc.timeout} s: {(exc.stderr or b'')[-2000:]!r}")
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 and "Timeout (" in proc.stderr:
        pytest.fail(f"decoding case {len(lines)} did not finish in {CHILD_SECONDS} s (a hang): {proc.stderr[-2000:]}")
    assert proc.returncode == 0, (f"the decoding child died (rc {proc.returncode}) at case {len(lines)}: "
                                  f"{proc.stderr[-2000:]}")
    return [json.loads(line) for line in lines]


# ---------------------------------------------------------------------------------------------- crafting records


def parse_v1(params: bytes, payload: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, bytes]]]:
    """(regions, streams) of version-1 tensor params: [(length, class)], [(method, stream bytes)]."""
    nreg, pos = get_varint(params, 1, "test")
    regions = []
    for _ in range(nreg):
        length, pos = get_varint(params, pos, "test")
        regions.append((length, params[pos]))
        pos += 1
    streams, ppos = [], 0
    while pos < len(params):
        method = params[pos]
        blen, pos = get_varint(params, pos + 1, "test")
        streams.append((method, bytes(payload[ppos : ppos + blen])))
        ppos += blen
    return regions, streams


def build_v1(regions, streams) -> tuple[bytes, bytes]:
    """(params, payload) of version-1 tensor params from parse_v1's form."""
    params = bytearray([1])
    put_varint(params, len(regions))
    for length, cls in regions:
        put_varint(params, length)
        params.append(cls)
    for method, blob in streams:
        params.append(method)
        put_varint(params, len(blob))
    return bytes(params), b"".join(blob for _, blob in streams)


def parse_v2(params: bytes, payload: bytes) -> list[tuple[int, bytes, bytes]]:
    """The blocks of version-2 tensor params: [(raw length, version-1 params, payload)]."""
    nblocks, pos = get_varint(params, 1, "test")
    sizes = []
    for _ in range(nblocks):
        fields = []
        for _ in range(3):
            value, pos = get_varint(params, pos, "test")
            fields.append(value)
        sizes.append(fields)
    blocks, ppos = [], 0
    for length, plen, blen in sizes:
        blocks.append((length, bytes(params[pos : pos + plen]), bytes(payload[ppos : ppos + blen])))
        pos += plen
        ppos += blen
    return blocks


def build_v2(blocks) -> tuple[bytes, bytes]:
    params = bytearray([2])
    put_varint(params, len(blocks))
    for length, bparams, bpayload in blocks:
        for value in (length, len(bparams), len(bpayload)):
            put_varint(params, value)
    for _, bparams, _ in blocks:
        params += bparams
    return bytes(params), b"".join(bpayload for _, _, bpayload in blocks)


def float_chunks(n: int = 1 << 17, seed: int = 1) -> dict[str, tuple[bytes, ChunkHints]]:
    """Raw chunks (with their hints) whose encodings cover the tensor codec's classes and stream methods."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n).astype(np.float32) * 0.02

    def whole(raw: bytes, dtype: str) -> tuple[bytes, ChunkHints]:
        return raw, ChunkHints(segments=(Segment(0, len(raw), dtype),))

    def bf16(x: np.ndarray) -> bytes:
        return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()

    sparse = w.copy()
    sparse[rng.random(n) < 0.5] = 0
    third = n // 4
    parts = [(rng.standard_normal(third) * s).astype(np.float32) for s in (0.02, 1e-8, 3.0)]
    # spread over exponents like real weights, with the two lowest bits of the sign|mantissa stream cleared so
    # that it is surely coded (random ones sit at the edge of raw); the f32 mantissa planes below it stay raw
    g = (rng.normal(0, 0.05, n) * np.exp(rng.normal(0, 1, n) * 0.5)).astype(np.float32).view(np.uint32)
    spread = g.copy()  # all bits as drawn: class 9
    g &= np.uint32(~0x30000 & 0xFFFFFFFF)
    g16 = (g >> 16).astype(np.uint16)
    # rows with their own scale (optimizer state): method-7 exponents
    rows = (rng.normal(0, 1e-3, (300, 384)) * np.exp(rng.normal(0, 2, (300, 1)))).astype(np.float32).view(np.uint32)
    rows = rows.reshape(-1) & np.uint32(~0x30000 & 0xFFFFFFFF)
    # every byte coded: few mantissa-top bits, skewed low mantissa bytes
    low = np.minimum(rng.geometric(0.02, n), 255).astype(np.uint32) << 8 | np.minimum(rng.geometric(0.05, n), 255)
    coded = (g & np.uint32(0xFFF80000)) | low.astype(np.uint32)
    return {
        # class 1 (two low mantissa bits cleared: class 8 needs the six low bits near uniform): method 6, both
        # streams in two parts (eight-chain loop)
        "bf16": whole(g16.tobytes(), "bf16"),
        "bf16-pair": whole(g16[:80000].tobytes(), "bf16"),  # method 6, one part each, paired
        "bf16-joint": whole(bf16(w), "bf16"),  # class 8: method 6 in two parts (the fused loop), packed low bits
        "bf16-joint-short": whole(bf16(w[:6000]), "bf16"),  # class 8: method 2, decoded and then composed
        "f16": whole(w.astype(np.float16).tobytes(), "f16"),  # method 6 in two parts, raw
        "f32": whole(w[: n // 2].tobytes(), "f32"),
        "f32-joint": whole(spread[: n // 2].tobytes(), "f32"),  # class 9: method 6 in two parts (the fused loop)
        "f32-quad": whole(g[:110000].tobytes(), "f32"),  # methods 6, 6 in two parts each, raw, raw
        "f32-ctx-pair": whole(rows[:76800].tobytes(), "f32"),  # methods 7 (source 0), 6, raw, raw
        "f32-ctx-quad": whole(rows.tobytes(), "f32"),  # methods 7 (source 2), 6 in two parts, raw, raw
        "f32-four": whole(coded[:40000].tobytes(), "f32"),  # method 6 in one part, all four streams
        "f32-ctx-four": whole(((rows & np.uint32(0xFFF80000)) | np.resize(low, rows.size).astype(np.uint32)).tobytes(),
                              "f32"),  # methods 7 (source 0), then 6 in one part for the other three streams
        "bf16z": whole(bf16(sparse), "bf16"),  # zero runs (zstd), methods 6 and raw
        "f32z": whole(sparse[: n // 2].tobytes(), "f32"),  # zero runs, method 6
        "bf16-short": whole(bf16(w[:2000]), "bf16"),  # method 2
        "f64": whole(rng.standard_normal(n // 4).tobytes(), "f64"),
        # as f32 from byte 2: method 7, const (hinted: a probe leaves this ramp to zstd, 1,951 bytes against
        # 164,004 as floats)
        "int": ((np.arange(n) % 1000).astype(np.int32).tobytes(), ChunkHints(segments=(Segment(2, 4 * n - 2, "f32"),))),
        "mixed": (b"header" * 100 + bf16(w[:50000]), ChunkHints(segments=(Segment(600, 100000, "bf16"),))),
        "blocks": (b"".join(p.tobytes() for p in parts),  # params version 2
                   ChunkHints(segments=tuple(Segment(i * 4 * third, 4 * third, "f32") for i in range(3)))),
        "text": (b"".join(b"the quick brown fox %d\n" % i for i in range(8000)), ChunkHints()),
        "lz4": (b"".join(b"the quick brown fox %d\n" % i for i in range(8000)), ChunkHints(codec="lz4")),
    }


def stream_with_method(kind: str, method: int) -> tuple[bytes, EncodedChunk, int]:
    """(raw, encoding, index of the first stream of the method) of a sample chunk that has one."""
    raw, hints = float_chunks()[kind]
    enc = encode_chunk(raw, hints)
    _, streams = parse_v1(enc.params, enc.payload)
    return raw, enc, next(k for k, (m, _) in enumerate(streams) if m == method)


def rice_table(values: list[int]) -> bytes:
    """A method-5 frequency table (docs/codecs.md) coding freq - 1 = values for symbols 0..len - 1, written with the
    Rice parameter the decoder derives, whatever the values (also ones no encoder writes)."""
    n = len(values)
    out = bytearray([0, n - 1])
    bitmap = bytearray((n - 1 + 8) >> 3)
    for s in range(n):
        bitmap[s >> 3] |= 1 << (s & 7)
    out += bitmap
    bits: list[int] = []
    prev = 16
    for v in values:
        k = max(prev.bit_length() - 1, 0)
        q = v >> k
        bits += [1] * q + [0] + [(v >> b) & 1 for b in range(k)]
        prev = v
    bits += [0] * (-len(bits) % 8)
    out += bytes(sum(bits[i + j] << j for j in range(8)) for i in range(0, len(bits), 8))
    return bytes(out)


def exploding_rice_table(symbols: int = 24) -> bytes:
    """A table whose Rice parameter grows by 3 per symbol (quotient 15, all remainder bits set): by the 20th symbol
    freq - 1 no longer fits 63 bits. The frequencies are absurd, so a decoder must refuse the table."""
    values, prev = [], 16
    for _ in range(symbols):
        k = max(prev.bit_length() - 1, 0)
        v = (15 << k) | ((1 << k) - 1)
        values.append(v)
        prev = v
    return rice_table(values)


# ---------------------------------------------------------------------------------------------- the holes


@pytest.mark.parametrize("method", [5, 6, 7])
def test_a_rice_table_with_runaway_frequencies_is_refused_not_decoded_forever(tmp_path, method):
    """The method-5 table reader (shared by methods 5, 6 and 7) let the Rice parameter follow absurd frequencies
    up to 62 bits; one that wrapped negative made bit_length loop forever (a decoder thread spinning at 100%)."""
    table = exploding_rice_table()
    words = bytes(4 * 32 + 64)
    kind, host = ("int", 7) if method == 7 else ("bf16", 6)
    raw, enc, k = stream_with_method(kind, host)
    regions, streams = parse_v1(enc.params, enc.payload)
    blob = {5: table + words, 6: bytes([1, 0]) + table + words,
            7: bytes([0, 1, 128]) + table + rice_table([2047, 2047]) + words}[method]
    streams[k] = (method, blob)
    params, payload = build_v1(regions, streams)
    (got,) = decode_in_child(tmp_path, [(enc.codec_id, params, payload, len(raw))])
    assert got[0] == "CodecError", got


def test_a_zero_run_list_longer_than_its_class_is_refused_before_it_is_decoded(tmp_path):
    """Stream 0 of a zero-masked class says how long its run list is (varint L); L was trusted: a 10 KiB zstd
    frame of 64 MiB made a 256 KiB chunk allocate 64 MiB and then 8 bytes per run byte (512 MiB) of run table.
    The child measures what Python and numpy allocate during the decode (tracemalloc)."""
    raw, enc, _ = stream_with_method("bf16z", 6)
    regions, streams = parse_v1(enc.params, enc.payload)
    assert regions[0][1] == 5 and streams[0][0] == 1  # bf16z; the run list coded with zstd
    length = 64 << 20
    head = bytearray()
    put_varint(head, length)
    streams[0] = (1, bytes(head) + zstandard.ZstdCompressor(level=1).compress(bytes(length)))
    params, payload = build_v1(regions, streams)
    (got,) = decode_in_child(tmp_path, [(enc.codec_id, params, payload, len(raw))])
    assert got[0] == "CodecError", got
    assert got[-1] < 32 << 20, f"decoding the damaged chunk allocated {got[-1] >> 20} MiB"


def _container_file(path, chunk_shift: int, records: list[bytes], entries: dict[int, tuple[int, int]],
                    size: int) -> None:
    """A committed container: header, the given records, one full index with entries, trailer."""
    blob = bytearray(Header.new(chunk_shift, 1).pack())
    for record in records:
        blob += record
    index_offset = len(blob)
    blob += pack_index(INDEX_FULL, size, 0, entries)
    blob += trailer_record(size, index_offset)
    path.write_bytes(bytes(blob))


def _open(path) -> tuple[int, Container]:
    fd = os.open(path, os.O_RDONLY)
    return fd, Container.open(fd, str(path))


def test_a_chunk_record_longer_than_the_chunk_size_is_damage(tmp_path):
    """The record's raw length (u32) was not held to the container's chunk size: a 2 KiB record of a 64 KiB-chunk
    file decoded to 64 MiB (a zstd frame of zeros) and was returned, checksum and all."""
    raw_len = 64 << 20
    payload = zstandard.ZstdCompressor().compress(bytes(raw_len))
    head = chunk_record_header(0, 1, 0, len(payload), raw_len, checksum64(bytes(raw_len)))
    path = tmp_path / "big"
    _container_file(path, 16, [head.pack() + payload], {0: (HEADER_SIZE, RECORD_HEADER_SIZE + len(payload))}, 1 << 16)
    fd, container = _open(path)
    try:
        with pytest.raises(ChunkError, match="raw length"):
            container.read_chunk(0)
    finally:
        os.close(fd)


def test_an_index_entry_naming_a_huge_record_is_damage_without_reading_it(tmp_path):
    """An index entry's record length and offset (u64) went straight to pread: a length of 2**40 asked Python for
    a 1 TiB buffer (MemoryError, not ChunkError); a length or an offset of 2**63 or more overflowed (OverflowError)."""
    raw = b"hello, dccfs!\n"
    record = chunk_record_header(0, 0, 0, len(raw), len(raw), checksum64(raw)).pack() + raw
    good = RECORD_HEADER_SIZE + len(raw)
    for offset, length in ((HEADER_SIZE, 1 << 40), (HEADER_SIZE, (1 << 64) - 1), (HEADER_SIZE, 3), (1 << 63, good),
                           ((1 << 64) - 1, good)):
        path = tmp_path / f"index-{offset}-{length}"
        _container_file(path, 16, [record], {0: (offset, length)}, len(raw))
        fd, container = _open(path)
        try:
            with pytest.raises(ChunkError, match="record of"):
                container.read_chunk(0)
        finally:
            os.close(fd)


def test_a_delta_index_pointing_at_a_record_past_the_end_is_refused_before_reading(tmp_path):
    """A delta index's back pointer reached a record header whose payload length (u32) was read as is: an
    index record claiming 4 GiB made open() ask for a 4 GiB buffer before the checksum failed."""
    path = tmp_path / "chain"
    blob = bytearray(Header.new(16, 1).pack())
    fake_offset = len(blob)
    blob += RecordHeader(REC_INDEX, INDEX_FULL, 0, 0xFFFFFFFF, 0, 0, 0).pack()
    index_offset = len(blob)
    blob += pack_index(INDEX_DELTA, 0, fake_offset, {})
    blob += trailer_record(0, index_offset)
    path.write_bytes(bytes(blob))
    # without numba or the codecs (they need more address space than the limit), under a 1 GiB limit on it
    script = textwrap.dedent(f"""
        import os, resource, sys
        from dccfs.container_records import ContainerError, load_index_chain
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        fd = os.open({str(path)!r}, os.O_RDONLY)
        try:
            load_index_chain(fd, "chain", {index_offset})
        except ContainerError as exc:
            print("ContainerError", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=CHILD_SECONDS)
    assert proc.returncode == 0 and proc.stdout.startswith("ContainerError"), proc.stderr[-2000:]
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ContainerError):
            Container.open(fd, str(path))
    finally:
        os.close(fd)


def test_a_cached_kernel_is_rebuilt_when_a_kernel_it_calls_changes_in_another_file(tmp_path):
    """numba keys a cached kernel on its own source file, but the kernel holds the code of every kernel it calls
    (found when a fix to rans32.read_table did not reach the cached fused decoders of tensor_fast.py: they kept
    the old reader until the cache was cleared). codecs/_jit.py keys every kernel on the whole package."""
    import shutil

    import dccfs.codecs._jit as jit

    pkg = tmp_path / "kernels"
    pkg.mkdir()
    for name in ("_jit.py", "_jit_memory.py"):
        shutil.copy(Path(jit.__file__).with_name(name), pkg / name)
    (pkg / "__init__.py").write_text('"""A package of two kernels in two files."""\n')
    (pkg / "inner.py").write_text('"""The callee."""\nfrom ._jit import njit\n\n\n@njit()\ndef inner():\n    return 1\n')
    (pkg / "outer.py").write_text('"""The caller."""\nfrom ._jit import njit\nfrom .inner import inner\n\n\n'
                                  '@njit()\ndef outer():\n    return inner() * 10\n')
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # the cache next to the sources

    def outer() -> str:
        proc = subprocess.run([sys.executable, "-c", "from kernels.outer import outer; print(outer())"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=CHILD_SECONDS, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    assert outer() == "10"
    assert list((pkg / "__pycache__").glob("outer.outer-*.nbi")), "the caller was not cached"
    (pkg / "inner.py").write_text((pkg / "inner.py").read_text().replace("return 1", "return 2"))
    assert outer() == "20"
