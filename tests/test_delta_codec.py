"""Checkpoint delta codec (codecs/delta.py): bit-exact round trips, damage detection, corpus pairs."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccfs.codecs import ChunkHints, CodecError, Segment, decode_chunk, encode_chunk, sniff_layout
from dccfs.codecs.delta import CODEC_DELTA, decode_delta, delta_base_ref, encode_delta

REPO = Path(__file__).resolve().parent.parent
CKPT = Path(os.environ.get("DCCFS_CORPUS", REPO / ".corpus")) / "ckpt"
DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": None, "f64": np.float64}


def _size(enc) -> int:
    return len(enc.params) + len(enc.payload)


def _floats(rng: np.random.Generator, dtype: str, n: int, scale: float = 0.05) -> np.ndarray:
    x = rng.normal(0, scale, n)
    if dtype == "bf16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(DTYPES[dtype])


def _pair(rng, dtype: str, n: int, rel: float = 1e-3, decay: float = 1.0) -> tuple[bytes, bytes]:
    """(new, base) tensors of one dtype where new is a scaled, slightly perturbed base."""
    if dtype == "bf16":
        base32 = rng.normal(0, 0.05, n).astype(np.float32)
        new32 = (base32 * decay * (1 + rng.normal(0, rel, n))).astype(np.float32)
        return (new32.view(np.uint32) >> 16).astype(np.uint16).tobytes(), (base32.view(np.uint32) >> 16).astype(
            np.uint16).tobytes()
    t = DTYPES[dtype]
    base = rng.normal(0, 0.05, n).astype(t)
    new = (base.astype(np.float64) * decay * (1 + rng.normal(0, rel, n))).astype(t)
    return new.tobytes(), base.tobytes()


def _roundtrip(raw: bytes, base: bytes, hints=None, ref: bytes = b"ref") -> object:
    enc = encode_delta(raw, base, hints or ChunkHints(), ref)
    if enc is None:
        return None
    assert enc.codec_id == CODEC_DELTA
    assert delta_base_ref(enc.params) == ref
    assert len(enc.params) <= 65535
    assert decode_delta(enc.params, enc.payload, len(raw), base) == raw
    key = encode_chunk(raw, hints or ChunkHints())
    assert _size(enc) < _size(key)
    return enc


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "f64"])
@pytest.mark.parametrize("hinted", [True, False])
def test_close_tensors_delta_beats_keyframe(dtype, hinted):
    rng = np.random.default_rng(1)
    width = 2 if dtype in ("f16", "bf16") else np.dtype(DTYPES[dtype]).itemsize
    n = (256 * 1024) // width
    raw, base = _pair(rng, dtype, n, rel=1e-4)
    hints = ChunkHints(segments=(Segment(0, len(raw), dtype),)) if hinted else ChunkHints()
    enc = _roundtrip(raw, base, hints)
    assert enc is not None


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_decayed_optimizer_state_uses_the_scale(dtype):
    """exp_avg-like tensors (new = base * 0.9**10 + a little) code far smaller than a plain difference would."""
    rng = np.random.default_rng(2)
    n = 65536
    raw, base = _pair(rng, dtype, n, rel=1e-6, decay=0.9 ** 10)
    hints = ChunkHints(segments=(Segment(0, len(raw), dtype),))
    enc = _roundtrip(raw, base, hints)
    assert enc is not None
    assert _size(enc) < 0.25 * len(raw)


def test_identical_chunks_are_tiny():
    rng = np.random.default_rng(3)
    raw = rng.normal(0, 1, 65536).astype(np.float32).tobytes()
    enc = _roundtrip(raw, raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),)))
    assert enc is not None and _size(enc) < 200


def test_empty_raw_gives_none():
    assert encode_delta(b"", b"abc", ChunkHints(), b"r") is None


def test_shorter_longer_and_empty_base():
    rng = np.random.default_rng(4)
    raw, base = _pair(rng, "f32", 65536, rel=1e-4)
    for b in (base[:1000], base[: len(base) // 2], base + b"tail" * 100, b""):
        enc = encode_delta(raw, b, ChunkHints(), b"x")
        if enc is not None:
            assert decode_delta(enc.params, enc.payload, len(raw), b) == raw


def test_base_ref_limits():
    raw, base = _pair(np.random.default_rng(5), "f32", 4096, rel=1e-5)
    enc = _roundtrip(raw, base, ref=b"\xff" * 64)
    assert enc is not None and delta_base_ref(enc.params) == b"\xff" * 64
    enc = _roundtrip(raw, base, ref=b"")
    assert enc is not None and delta_base_ref(enc.params) == b""
    with pytest.raises(ValueError):
        encode_delta(raw, base, ChunkHints(), b"x" * 65)


def test_unrelated_base_gives_none_or_roundtrips():
    rng = np.random.default_rng(6)
    raw = rng.normal(0, 1, 65536).astype(np.float32).tobytes()
    base = rng.normal(0, 1, 65536).astype(np.float32).tobytes()
    enc = encode_delta(raw, base, ChunkHints(), b"r")
    assert enc is None or decode_delta(enc.params, enc.payload, len(raw), base) == raw


def test_mixed_regions_and_generic_bytes():
    rng = np.random.default_rng(7)
    head = bytes(rng.integers(0, 40, 777, dtype=np.uint8))
    t1n, t1b = _pair(rng, "f32", 10000, rel=1e-4)
    t2n, t2b = _pair(rng, "bf16", 7001, rel=1e-3)
    ints = np.arange(3000, dtype=np.int64)
    raw = head + t1n + t2n + (ints + 10).tobytes() + b"\x01\x02\x03"
    base = head + t1b + t2b + ints.tobytes() + b"\x01\x02\x03"
    segs = (Segment(777, len(t1n), "f32"), Segment(777 + len(t1n), len(t2n), "bf16"),
            Segment(777 + len(t1n) + len(t2n), 24000, "i64"))
    enc = _roundtrip(raw, base, ChunkHints(segments=segs))
    assert enc is not None


def test_bogus_hints_never_break_round_trip():
    rng = np.random.default_rng(8)
    raw, base = _pair(rng, "f32", 20000, rel=1e-4)
    segs = (Segment(3, 50001, "f32"), Segment(1, 10, "bf16"), Segment(40000, 10**9, "f64"), Segment(-5, 3, "f16"))
    enc = encode_delta(raw, base, ChunkHints(segments=segs), b"r")
    if enc is not None:
        assert decode_delta(enc.params, enc.payload, len(raw), base) == raw


@st.composite
def chunk_pairs(draw):
    dtype = draw(st.sampled_from(["f32", "f16", "bf16", "f64", "bytes"]))
    n = draw(st.integers(0, 3000))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype == "bytes":
        raw = bytes(rng.integers(0, 256, n, dtype=np.uint8))
        base = bytes(np.frombuffer(raw, np.uint8) ^ (rng.random(n) < 0.1).astype(np.uint8))
    else:
        raw, base = _pair(rng, dtype, n, rel=draw(st.sampled_from([0.0, 1e-6, 1e-3, 1.0])),
                          decay=draw(st.sampled_from([1.0, 0.9, 0.999, -1.0])))
        cut = draw(st.integers(0, 3))
        raw = raw[: len(raw) - cut] if cut < len(raw) else raw
    special = draw(st.sampled_from(["none", "nan", "inf", "zero", "denormal"]))
    if special != "none" and len(raw) >= 8:
        fill = {"nan": b"\x00\x00\xc0\x7f", "inf": b"\x00\x00\x80\x7f", "zero": b"\0\0\0\0",
                "denormal": b"\x01\x00\x00\x00"}[special]
        k = draw(st.integers(0, len(raw) - 4))
        raw = raw[:k] + fill + raw[k + 4 :]
        base = base[:k] + fill[::-1] + base[k + 4 :]
    base_mode = draw(st.sampled_from(["same", "shorter", "longer", "empty"]))
    if base_mode == "shorter":
        base = base[: draw(st.integers(0, max(0, len(base) - 1)))]
    elif base_mode == "longer":
        base = base + bytes(draw(st.integers(1, 100)))
    elif base_mode == "empty":
        base = b""
    phase = draw(st.integers(0, 7))
    hinted = draw(st.booleans()) and dtype != "bytes"
    hints = ChunkHints(segments=(Segment(phase, max(0, len(raw) - phase), dtype),)) if hinted else ChunkHints()
    return raw, base, hints


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk_pairs(), st.binary(max_size=64))
def test_roundtrip_property(pair, ref):
    raw, base, hints = pair
    enc = encode_delta(raw, base, hints, ref)
    if enc is None:
        return
    assert delta_base_ref(enc.params) == ref
    assert decode_delta(enc.params, enc.payload, len(raw), base) == raw
    key = encode_chunk(raw, hints)
    assert _size(enc) < _size(key)


def _some_delta():
    raw, base = _pair(np.random.default_rng(9), "f32", 16384, rel=1e-3)
    enc = encode_delta(raw, base, ChunkHints(segments=(Segment(0, len(raw), "f32"),)), b"ref")
    assert enc is not None
    return raw, base, enc


def test_damaged_payload_and_params_raise_or_differ():
    """Damage raises CodecError or decodes to a same-length chunk the caller's checksum rejects; never a crash."""
    raw, base, enc = _some_delta()
    rnd = random.Random(10)
    payload, params = bytearray(enc.payload), bytearray(enc.params)
    for trial in range(300):
        p, q = bytearray(payload), bytearray(params)
        target = q if trial % 3 == 0 else p
        for _ in range(rnd.randint(1, 3)):
            if target:
                target[rnd.randrange(len(target))] ^= 1 << rnd.randrange(8)
        try:
            out = decode_delta(bytes(q), bytes(p), len(raw), base)
        except CodecError:
            continue
        assert len(out) == len(raw)
    for cut in (0, 1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            decode_delta(enc.params, enc.payload[:cut], len(raw), base)
    for cut in range(len(params)):
        try:
            out = decode_delta(enc.params[:cut], enc.payload, len(raw), base)
        except CodecError:
            continue
        assert len(out) == len(raw)
    with pytest.raises(CodecError):
        decode_delta(enc.params, enc.payload + b"x", len(raw), base)
    with pytest.raises(CodecError):
        decode_delta(enc.params, enc.payload, len(raw) + 4, base)
    with pytest.raises(CodecError):
        decode_delta(b"\x09" + enc.params[1:], enc.payload, len(raw), base)
    with pytest.raises(CodecError):
        delta_base_ref(b"")


def test_wrong_base_decodes_to_same_length():
    raw, base, enc = _some_delta()
    rng = np.random.default_rng(11)
    for wrong in (b"", base[:100], rng.bytes(len(base)), base + b"zz"):
        out = decode_delta(enc.params, enc.payload, len(raw), wrong)
        assert len(out) == len(raw)
    assert decode_delta(enc.params, enc.payload, len(raw), rng.bytes(len(base))) != raw


@pytest.mark.skipif(not (CKPT / "minilm_ft_step30.safetensors").exists(), reason="no .corpus/ckpt")
@pytest.mark.parametrize("ext", ["safetensors", "pt"])
def test_corpus_checkpoint_pairs(ext):
    new_path, base_path = CKPT / f"minilm_ft_step30.{ext}", CKPT / f"minilm_ft_step20.{ext}"
    chunk = 256 * 1024
    with open(new_path, "rb") as f:
        prefix = f.read(8 << 20)
    layout = sniff_layout(prefix)
    size = new_path.stat().st_size
    offsets = list(range(0, size, chunk))
    picked = set(offsets[:: max(1, len(offsets) // 12)]) | {offsets[-1]}
    total = stored = key_total = 0
    with open(new_path, "rb") as fn, open(base_path, "rb") as fb:
        for off in offsets:
            fn.seek(off)
            raw = fn.read(chunk)
            hints = layout.hints_for(off, raw) if layout else ChunkHints()
            if off not in picked:
                continue
            fb.seek(off)
            base = fb.read(chunk)
            key = encode_chunk(raw, hints)
            enc = encode_delta(raw, base, hints, b"%d" % off)
            if enc is not None:
                assert decode_delta(enc.params, enc.payload, len(raw), base) == raw
            else:
                assert decode_chunk(key.codec_id, key.params, key.payload, len(raw)) == raw
            total += len(raw)
            key_total += _size(key)
            stored += _size(enc) if enc is not None else _size(key)
    assert stored < 0.8 * key_total


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_scale_prediction_is_ieee_multiply(dtype):
    """One step of the integer-only prediction equals numpy's IEEE multiply, subnormals and overflow included."""
    from dccfs.codecs.delta import KIND_FLOAT, DTYPE_KIND, _scale_pred

    t, u = (np.float32, np.uint32) if dtype == "f32" else (np.float16, np.uint16)
    rng = np.random.default_rng(12)
    bits = rng.integers(0, np.iinfo(u).max, 20000, dtype=np.uint64).astype(u)
    vals = bits.view(t)
    finite = np.isfinite(vals)
    bits = bits[finite]
    ebits, mbits = KIND_FLOAT[DTYPE_KIND[dtype]]
    for c in (0.9, 0.999, 1 - 8 * 2.0**-24, 1.7, 3.0e-4, 2.0**-16 * 1.5):
        c32 = np.float32(c)
        cbits = int(np.array([c32]).view(np.uint32)[0])
        out = np.empty_like(bits)
        _scale_pred(bits, out, ebits, mbits, cbits, 1)
        with np.errstate(over="ignore", under="ignore"):
            want = (bits.view(t).astype(np.float64) * float(c32)).astype(t) if dtype == "f16" else bits.view(t) * c32
        # f16: the f64 product of two short mantissas is exact, so one rounding to f16 is the IEEE result
        assert np.array_equal(out, np.asarray(want, t).view(u)), c


def test_iterated_decay_is_reproduced_exactly(monkeypatch):
    # The default encoder searches one step only (decode speed); the format and the
    # decoder support any step count, which a wider search exercises here.
    import dccfs.codecs.delta_fit as delta_fit
    monkeypatch.setattr(delta_fit, "STEP_CANDIDATES", (1, 2, 5, 10, 20))
    rng = np.random.default_rng(13)
    base = rng.normal(0, 0.05, 65536).astype(np.float32)
    a = np.float32(1 - 8 * 2.0**-24)
    new = base.copy()
    for _ in range(10):
        new = new * a
    raw = new.tobytes()
    enc = _roundtrip(raw, base.tobytes(), ChunkHints(segments=(Segment(0, len(raw), "f32"),)))
    assert enc is not None and _size(enc) < 1000


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("offset", [0, 1])
def test_fused_decoder_matches_the_reference_prediction(kind, steps, offset):
    """The decoder's one-pass kernel (branch-free step for normal elements, zeros and inf/nan
    selected, the rest redone) gives exactly base * c as the reference emulation, for every
    bit pattern class: zeros, subnormals, normals, inf, nan, subnormal and overflowing products;
    aligned and unaligned regions."""
    from dccfs.codecs.delta import (DTYPE_KIND, KIND_FLOAT, KIND_WIDTH, T_SUB, _scale_pred, _untransform,
                                    _zigzag)

    k = DTYPE_KIND[kind]
    width = KIND_WIDTH[k]
    u = np.uint32 if width == 4 else np.uint16
    ebits, mbits = KIND_FLOAT[k]
    rng = np.random.default_rng(21)
    n = 4096
    bits = rng.integers(0, 1 << (8 * width), n, dtype=np.uint64).astype(u)
    bits[::7] = 0
    bits[1::7] = u(1 << (ebits + mbits))  # -0
    bits[2::7] &= u((1 << mbits) - 1)  # subnormals
    bits[3::7] |= u(((1 << ebits) - 1) << mbits)  # inf / nan
    for c in (0.9, 1 - 8 * 2.0**-24, 1.7, 2.0**-15 * 1.3, 2.0**15 * 1.9):
        cbits = int(np.array([np.float32(c)]).view(np.uint32)[0])
        pred = np.empty_like(bits)
        _scale_pred(bits, pred, ebits, mbits, cbits, steps)
        new = (pred + rng.integers(-3, 4, n).astype(u)).astype(u)
        z = _zigzag(new - pred, width)
        if width == 4:  # the stored bit permutation of f32 residuals
            z = ((z >> u(24)) << u(23)) | (((z >> u(23)) & u(1)) << u(31)) | (z & u(0x7FFFFF))
        pad = b"\0" * offset
        data = pad + z.tobytes()
        base = pad + bits.tobytes()
        desc = ([(offset, 0, None)] if offset else []) + [(n * width, k, (cbits, steps))]
        assert _untransform(data, base, desc, T_SUB)[offset:] == new.tobytes(), c
