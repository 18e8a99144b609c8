"""Tests for tensor params v2 (blocks), zero-masked classes 5-7 and the f32 context class 8 (no corpus needed)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccfs.codecs import ChunkHints, CodecError, Segment, decode_chunk, encode_chunk
from dccfs.codecs import blocks, context, fields, tensor, zeros

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


def test_large_chunk_is_cut_into_blocks_and_beats_small_chunks():
    raw, segs = _checkpoint_chunk()
    enc = _roundtrip(raw, ChunkHints(segments=segs))
    assert enc.params[0] == blocks.VERSION
    big = len(enc.params) + len(enc.payload)
    small = 0
    q = 1 << 18
    for a in range(0, len(raw), q):
        sub = tuple(Segment(s.start - a, s.length, s.dtype) for s in segs if s.start < a + q and s.start + s.length > a)
        e = _roundtrip(raw[a : a + q], ChunkHints(segments=sub))
        small += len(e.params) + len(e.payload)
    assert big <= small


@pytest.mark.parametrize("dtype,cls", [("f32", fields.CLASS_F32Z), ("bf16", fields.CLASS_BF16Z),
                                       ("f16", fields.CLASS_F16Z)])
@pytest.mark.parametrize("phase", [0, 1, 3])
def test_sparse_rows_use_the_zero_masked_class(dtype, cls, phase, monkeypatch):
    monkeypatch.setattr(context, "MIN_ELEMENTS", 1 << 40)  # keep class 8 out of the comparison
    raw = bytes(phase) + _as(_rows(120, 0.0, 0.5, 4), dtype) + b"tail"
    hints = ChunkHints(segments=(Segment(phase, len(raw) - phase - 4, dtype),))
    enc = _roundtrip(raw, hints)
    assert cls in _classes(enc.params)


@pytest.mark.parametrize("phase", [0, 2, 5])
def test_mantissa_given_exponent_uses_the_context_class(phase):
    # the top mantissa bits depend on the exponent: near 1.0 they are 0, near 4.0 all ones
    rng = np.random.default_rng(5)
    u = rng.random(60000)
    vals = np.where(rng.random(60000) < 0.5, 1.0 + u * 0.004, 3.99 - u * 0.004).astype(np.float32)
    raw = bytes(phase) + vals.tobytes() + b"x"
    enc = _roundtrip(raw, ChunkHints(segments=(Segment(phase, len(raw) - phase - 1, "f32"),)))
    assert fields.CLASS_F32CTX in _classes(enc.params)


def test_version1_chunks_without_new_classes_still_decode(monkeypatch):
    """What the encoder wrote before v2 and classes 5-8 (one block, classes 0-4) keeps decoding."""
    raw, segs = _checkpoint_chunk(header=13)
    monkeypatch.setattr(blocks, "plan", lambda raw, segments: [0, len(raw)])
    monkeypatch.setattr(context, "MIN_ELEMENTS", 1 << 40)
    monkeypatch.setattr(zeros, "MIN_ZERO_SHARE", 2.0)
    enc = encode_chunk(raw, ChunkHints(segments=segs))
    assert enc.params[0] == tensor.FORMAT_VERSION and _classes(enc.params) <= {0, 1, 2, 3, 4}
    monkeypatch.undo()
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_context_merge_rejects_mismatched_streams():
    u = _rows(40, 2.0, 0.3, 6).view(np.uint32)
    te, tm, _ = context.plan(u)
    head, subs = context.split(u, te, tm)
    lut_e, lut_m, ne, nm = context.parse_header(head, u.size)
    planes = np.zeros((4, u.size), np.uint8)
    for f, counts in enumerate((ne, nm, nm, nm)):
        planes[f] = np.concatenate(subs[f * context.BUCKETS : (f + 1) * context.BUCKETS])
    out = np.empty(u.size, np.uint32)
    assert context.merge(planes, lut_e, lut_m, ne, nm, out) == 0 and (out == u).all()
    if ne.size > 1 and ne[0] and ne[1]:
        bad = ne.copy()
        bad[0] -= 1
        bad[1] += 1
        assert context.merge(planes, lut_e, lut_m, bad, nm, out) in (0, -1)
    with pytest.raises(CodecError):
        context.parse_header(head + b"\x00", u.size)


@pytest.mark.parametrize("kind", ["blocks", "zero", "ctx"])
def test_damaged_new_chunks_raise_or_keep_length(kind, monkeypatch):
    if kind == "blocks":
        raw, segs = _checkpoint_chunk()
    else:
        if kind == "zero":
            monkeypatch.setattr(context, "MIN_ELEMENTS", 1 << 40)
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
    old = blocks.GRID, blocks.MIN_UNIT, context.MIN_ELEMENTS
    blocks.GRID, blocks.MIN_UNIT, context.MIN_ELEMENTS = 4096, 1024, 64
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
        blocks.GRID, blocks.MIN_UNIT, context.MIN_ELEMENTS = old
