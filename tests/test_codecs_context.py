"""Tests for tensor params v2 (blocks), zero-masked classes 5-7 and stream method 7 (rans32c), no corpus needed."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccfs.codecs import ChunkHints, CodecError, Segment, decode_chunk, encode_chunk
from dccfs.codecs import blocks, fields, rans32, rans32c, rans32c_plan, tensor, zeros
from dccfs.codecs.varint import get_varint, put_varint

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROW = 384


def _rows(n_rows: int, scale_spread: float, zero_share: float, seed: int) -> np.ndarray:
    """f32 rows with a per-row scale (neighbours share an exponent) and some all-zero rows (sparse optimizer
    state of embedding rows that saw no token)."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(0, scale_spread, n_rows))[:, None]
    vals = (rng.normal(0, 1e-3, (n_rows, ROW)) * scales).astype(np.float32)
    vals[rng.random(n_rows) < zero_share] = 0
    return vals.reshape(-1)


def _as(vals: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":
        return (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return vals.astype({"f16": np.float16, "f32": np.float32}[dtype]).tobytes()


def _classes(params: bytes) -> set[int]:
    """Classes of a version-1 params, or of every block of a version-2 params."""
    if params[0] == blocks.VERSION:
        nb, pos = tensor._get_varint(params, 1)
        lens = []
        for _ in range(nb):
            _, pos = tensor._get_varint(params, pos)
            plen, pos = tensor._get_varint(params, pos)
            _, pos = tensor._get_varint(params, pos)
            lens.append(plen)
        out = set()
        for plen in lens:
            out |= _classes(params[pos : pos + plen])
            pos += plen
        return out
    nreg, pos = tensor._get_varint(params, 1)
    out = set()
    for _ in range(nreg):
        _, pos = tensor._get_varint(params, pos)
        out.add(params[pos])
        pos += 1
    return out


def _roundtrip(raw: bytes, hints: ChunkHints):
    enc = encode_chunk(raw, hints)
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    return enc


def _checkpoint_chunk(header: int = 45) -> tuple[bytes, tuple[Segment, ...]]:
    """1 MiB like a chunk of an AdamW checkpoint: a header, then weights, row-sparse exp_avg, exp_avg_sq."""
    w = np.random.default_rng(1).normal(0, 0.05, 96 * ROW).astype(np.float32)
    m = _rows(300, 1.0, 0.6, 2)
    v = (_rows(285, 1.0, 0.6, 3) ** 2).astype(np.float32)
    parts = [w.tobytes(), m.tobytes(), v.tobytes()]
    raw = bytes(range(header)) + b"".join(parts)
    raw = raw[: 1 << 20]
    segs, pos = [], header
    for p in parts:
        segs.append(Segment(pos, min(len(p), len(raw) - pos), "f32"))
        pos += len(p)
    return raw, tuple(s for s in segs if s.length > 0)


def test_large_chunk_is_cut_into_blocks(monkeypatch):
    """A 1 MiB chunk spanning three tensors is cut; it beats one block and stays within 0.5% of 256 KiB chunks
    (the plan works on sampled estimates; on the corpus files 1 MiB chunks are smaller than 256 KiB ones)."""
    raw, segs = _checkpoint_chunk()
    enc = _roundtrip(raw, ChunkHints(segments=segs))
    assert enc.params[0] == blocks.VERSION
    big = len(enc.params) + len(enc.payload)
    with monkeypatch.context() as m:
        m.setattr(blocks, "plan", lambda raw, segments: [0, len(raw)])
        one = encode_chunk(raw, ChunkHints(segments=segs))
    assert big < len(one.params) + len(one.payload)
    small = 0
    q = 1 << 18
    for a in range(0, len(raw), q):
        sub = tuple(Segment(s.start - a, s.length, s.dtype) for s in segs if s.start < a + q and s.start + s.length > a)
        e = _roundtrip(raw[a : a + q], ChunkHints(segments=sub))
        small += len(e.params) + len(e.payload)
    assert big <= small * 1.005


@pytest.mark.parametrize("dtype,cls", [("f32", fields.CLASS_F32Z), ("bf16", fields.CLASS_BF16Z),
                                       ("f16", fields.CLASS_F16Z)])
@pytest.mark.parametrize("phase", [0, 1, 3])
def test_sparse_rows_use_the_zero_masked_class(dtype, cls, phase):
    raw = bytes(phase) + _as(_rows(120, 0.0, 0.5, 4), dtype) + b"tail"
    hints = ChunkHints(segments=(Segment(phase, len(raw) - phase - 4, dtype),))
    enc = _roundtrip(raw, hints)
    assert cls in _classes(enc.params)


def _methods(params: bytes) -> list[int]:
    """Stream methods of a version-1 params (or of every block of a version-2 params)."""
    if params[0] == blocks.VERSION:
        nb, pos = tensor._get_varint(params, 1)
        lens = []
        for _ in range(nb):
            _, pos = tensor._get_varint(params, pos)
            plen, pos = tensor._get_varint(params, pos)
            _, pos = tensor._get_varint(params, pos)
            lens.append(plen)
        out = []
        for plen in lens:
            out += _methods(params[pos : pos + plen])
            pos += plen
        return out
    nreg, pos = tensor._get_varint(params, 1)
    classes = set()
    for _ in range(nreg):
        _, pos = tensor._get_varint(params, pos)
        classes.add(params[pos])
        pos += 1
    out = []
    for cls in sorted(classes):
        for _ in range(fields.CLASSES[cls][1]):
            out.append(params[pos])
            _, pos = tensor._get_varint(params, pos + 1)
    return out


@pytest.mark.parametrize("phase", [0, 2, 5])
def test_row_scaled_f32_uses_method_7(phase):
    """Rows with their own scale: the exponent coded given the exponent 32 elements before (same row), and the
    sign+mantissa-top byte given its exponent."""
    rng = np.random.default_rng(5)
    u = rng.random(60000)
    # near 1.0 the top mantissa bits are 0, near 4.0 all ones; rows of 384 share one of the two
    rows = np.repeat(rng.random(60000 // ROW + 1) < 0.5, ROW)[:60000]
    vals = np.where(rows, 1.0 + u * 0.004, 3.99 - u * 0.004).astype(np.float32)
    raw = bytes(phase) + vals.tobytes() + b"x"
    enc = _roundtrip(raw, ChunkHints(segments=(Segment(phase, len(raw) - phase - 1, "f32"),)))
    assert tensor.M_RANS32C in _methods(enc.params)


@FAST
@given(n=st.integers(0, 5000), alphabet=st.integers(2, 256), seed=st.integers(0, 2**31),
       source=st.sampled_from([rans32c.SRC_SELF, rans32c.SRC_STREAM0]), nthr=st.integers(1, 3))
def test_rans32c_vector_and_scalar_agree(n, alphabet, seed, source, nthr):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, alphabet, n).astype(np.uint8)
    ctx = rng.integers(0, 256, n).astype(np.uint8)
    joint = np.zeros((256, 256), np.int64)
    rans32c.joint_counts(data, ctx, rans32c.LANES if source == rans32c.SRC_SELF else 0, joint)
    thresholds = sorted(set(int(t) for t in rng.integers(1, 256, nthr)))
    edges = [0, *thresholds, 256]
    freqs = [rans32c.bucket_freqs(joint[a:b].sum(0)) for a, b in zip(edges, edges[1:])]
    blob = np.frombuffer(rans32c.encode(data, source, ctx if source else None, thresholds, freqs), np.uint8)
    for fn in (rans32c.decode_into, rans32c.decode_into_scalar):
        out = np.empty(n, np.uint8)
        assert fn(blob, ctx, out) == 0
        assert (out == data).all()
    if blob.size > 8:
        bad = blob.copy()
        bad[-1] ^= 0x40
        out = np.empty(n, np.uint8)
        assert rans32c.decode_into(bad, ctx, out) in (0, -1)


@FAST
@given(n=st.integers(0, 5000), alphabet=st.integers(2, 256), seed=st.integers(0, 2**31), nthr=st.integers(1, 3))
def test_rans32c_two_parts_vector_and_scalar_agree(n, alphabet, seed, nthr):
    """Source 2 (each half coded on its own, contexts restarting at the half): both decoders give the data back,
    and a cut or grown part-A length is refused, never mis-decoded."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, alphabet, n).astype(np.uint8)
    thresholds = sorted(set(int(t) for t in rng.integers(1, 256, nthr)))
    _, counts = rans32c_plan._bucket_parts(data, rans32c.SRC_SELF, None, thresholds, 2, len(thresholds) + 1)
    freqs = [rans32c.bucket_freqs(c) for c in counts.reshape(-1, 256)]
    blob = np.frombuffer(rans32c.encode(data, rans32c.SRC_SELF, None, thresholds, freqs, parts=2), np.uint8)
    assert blob[0] == rans32c.SRC_SELF2
    for fn in (rans32c.decode_into, rans32c.decode_into_scalar):
        out = np.empty(n, np.uint8)
        assert fn(blob, data, out) == 0
        assert (out == data).all()
    head = 2 + len(thresholds) + sum(int(rans32.write_table(f, np.empty(rans32.TABLE_MAX, np.uint8))) for f in freqs)
    words_a, pos = get_varint(bytes(blob), head, "test", 35)
    for delta in (-1, 1):
        bad = bytearray(blob[:head].tobytes())
        put_varint(bad, words_a + delta)
        bad += blob[pos:].tobytes()
        out = np.empty(n, np.uint8)
        assert rans32c.decode_into(np.frombuffer(bytes(bad), np.uint8), data, out) == -1


def test_method_7_in_stream_0_must_use_its_own_context():
    data = np.random.default_rng(3).integers(0, 8, 4096).astype(np.uint8)
    joint = np.zeros((256, 256), np.int64)
    rans32c.joint_counts(data, data, 0, joint)
    freqs = [rans32c.bucket_freqs(joint[:4].sum(0)), rans32c.bucket_freqs(joint[4:].sum(0))]
    blob = rans32c.encode(data, rans32c.SRC_STREAM0, data, [4], freqs)
    params = bytes([1, 1, 2 * len(data) & 0x7F | 0x80, 2 * len(data) >> 7, fields.CLASS_BF16,
                    tensor.M_RANS32C]) + bytes([len(blob) & 0x7F | 0x80, len(blob) >> 7]) + bytes([tensor.M_CONST, 1])
    with pytest.raises(CodecError):
        decode_chunk(16, params, blob + b"\x00", 2 * len(data))


def test_version1_chunks_without_new_classes_still_decode(monkeypatch):
    """What the encoder wrote before v2 and classes 5-8 (one block, classes 0-4) keeps decoding."""
    raw, segs = _checkpoint_chunk(header=13)
    monkeypatch.setattr(blocks, "plan", lambda raw, segments: [0, len(raw)])
    monkeypatch.setattr(rans32c_plan, "MIN_SYMBOLS", 1 << 40)
    monkeypatch.setattr(zeros, "MIN_ZERO_SHARE", 2.0)
    enc = encode_chunk(raw, ChunkHints(segments=segs))
    assert enc.params[0] == tensor.FORMAT_VERSION and _classes(enc.params) <= {0, 1, 2, 3, 4}
    assert max(_methods(enc.params)) <= 6
    monkeypatch.undo()
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


@pytest.mark.parametrize("kind", ["blocks", "zero", "ctx"])
def test_damaged_new_chunks_raise_or_keep_length(kind, monkeypatch):
    if kind == "blocks":
        raw, segs = _checkpoint_chunk()
    else:
        raw = _as(_rows(100, 2.0, 0.5 if kind == "zero" else 0.0, 7), "f32")
        segs = (Segment(0, len(raw), "f32"),)
    enc = encode_chunk(raw, ChunkHints(segments=segs))
    rng = np.random.default_rng(8)
    for _ in range(40):
        params, payload = bytearray(enc.params), bytearray(enc.payload)
        target = params if rng.random() < 0.5 else payload
        target[int(rng.integers(len(target)))] ^= 1 << int(rng.integers(8))
        try:
            out = decode_chunk(enc.codec_id, bytes(params), bytes(payload), len(raw))
        except CodecError:
            continue
        assert len(out) == len(raw)


@FAST
@given(
    n_rows=st.integers(1, 60),
    zero_share=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    spread=st.sampled_from([0.0, 3.0]),
    dtypes=st.lists(st.sampled_from(["f32", "bf16", "f16", "raw"]), min_size=1, max_size=4),
    header=st.integers(0, 9),
    seed=st.integers(0, 1000),
)
def test_roundtrip_mixed_blocks(n_rows, zero_share, spread, dtypes, header, seed):
    """Small grid and units so that short inputs exercise cuts at odd element phases between tensors."""
    old = blocks.GRID, blocks.MIN_UNIT, rans32c_plan.MIN_SYMBOLS
    blocks.GRID, blocks.MIN_UNIT, rans32c_plan.MIN_SYMBOLS = 4096, 1024, 64
    try:
        parts, segs, pos = [bytes(range(header))], [], header
        for k, dtype in enumerate(dtypes):
            if dtype == "raw":
                p = np.random.default_rng(seed + k).integers(0, 4, n_rows * 8, np.uint8).tobytes()
            else:
                p = _as(_rows(n_rows, spread, zero_share, seed + k), dtype)
                segs.append(Segment(pos, len(p), dtype))
            parts.append(p)
            pos += len(p)
        _roundtrip(b"".join(parts), ChunkHints(segments=tuple(segs)))
    finally:
        blocks.GRID, blocks.MIN_UNIT, rans32c_plan.MIN_SYMBOLS = old


def test_effort_0_skips_block_cuts_and_still_round_trips():
    """Effort 0 (the encoders are behind the writer) keeps one table set per chunk: cheaper
    to encode, a little larger, and decoded by the same decoder."""
    rng = np.random.default_rng(1)
    small = (rng.standard_normal(131072) * 1e-3).astype(np.float32).tobytes()
    large = (rng.standard_normal(131072) * 30).astype(np.float32).tobytes()
    raw = small + large
    segments = (Segment(0, len(small), "f32"), Segment(len(small), len(large), "f32"))
    careful = encode_chunk(raw, ChunkHints(segments=segments, effort=1))
    cheap = encode_chunk(raw, ChunkHints(segments=segments, effort=0))
    assert careful.params[0] == blocks.VERSION
    assert cheap.params[0] != blocks.VERSION
    assert len(careful.payload) < len(cheap.payload) < len(raw)
    for enc in (careful, cheap):
        assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
