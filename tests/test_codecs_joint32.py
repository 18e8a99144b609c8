"""Class 9 (codecs/joint.py): f32 elements as class 8's symbol and six packed bits of their top half, low half raw."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dccfs.codecs import ChunkHints, CodecError, Segment, decode_chunk, encode_chunk, joint, joint_loop, rans32
from dccfs.codecs import chunk_fast, fields, rans32e, tensor, tensor_fast
from test_codec_hardening import build_v1, parse_v1, parse_v2
from test_codecs_joint import as_bytes, classes_of, reference_layout


def f32_weights(n: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * scale * np.exp(rng.normal(0, 0.5, n))).astype(np.float32).view(np.uint32)


def encode_f32(u: np.ndarray, effort: int = 1):
    raw = u.tobytes()
    return raw, encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),), effort=effort))


@pytest.mark.parametrize("n", [16384, 16385, 65536 + 17, 100_001, 262_144])
def test_f32_weights_take_class_9_and_roundtrip(n):
    raw, enc = encode_f32(f32_weights(n, n))
    assert classes_of(enc) == {fields.CLASS_F32J}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_the_streams_follow_the_documented_layout():
    """docs/codecs.md: class 8's streams over the top halves (bits 31..16), then the low halves as little-endian
    uint16."""
    u = f32_weights(70_001, 1)
    raw, enc = encode_f32(u)
    _, streams = parse_v1(enc.params, enc.payload)
    (m0, b0), (m1, b1), (m2, b2), (m3, b3) = streams
    assert (m0, m2, m3) == (tensor.M_RAW, tensor.M_RAW, tensor.M_RAW) and len(b0) == 1
    top = (u >> 16).astype(np.uint16)
    ref_sym, ref_packed = reference_layout(top, b0[0])
    sym = np.empty(u.size, np.uint8)
    assert m1 == tensor.M_RANS32E and rans32e.decode_ext_into(np.frombuffer(b1, np.uint8), sym) == 0
    assert np.array_equal(sym, ref_sym)
    assert bytes(b2) == ref_packed.tobytes()
    assert bytes(b3) == (u & 0xFFFF).astype("<u2").tobytes()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 20_000), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.01, 0.3]))
def test_any_f32_class_roundtrips_with_special_values(n, seed, special):
    rng = np.random.default_rng(seed)
    u = f32_weights(n, seed)
    pick = rng.random(n) < special
    specials = np.array([0, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00001], np.uint32)
    u[pick] = rng.choice(specials, pick.sum())
    raw, enc = encode_f32(u)
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_class_9_codes_weights_smaller_than_class_3(monkeypatch):
    raw, enc = encode_f32(f32_weights(262_144, 3))
    monkeypatch.setattr(tensor, "_split_joint", lambda cls, data, context: None)
    _, old = encode_f32(f32_weights(262_144, 3))
    assert classes_of(old) == {fields.CLASS_F32}
    assert len(enc.params) + len(enc.payload) < len(old.params) + len(old.payload)


def test_special_values_roundtrip_in_class_9():
    # (rare enough: many equal low halves make the low bytes worth coding, which class 3 does)
    u = f32_weights(50_000, 5)
    u[::997] = 0
    u[1::991] = 0x80000000  # -0.0
    u[2::983] = 0x00000003  # denormal
    u[3::977] = 0x7F800000  # +inf
    u[4::971] = 0xFFC00000  # NaN
    u[5::967] = 0x807FFFFF  # negative denormal
    raw, enc = encode_f32(u)
    assert classes_of(enc) == {fields.CLASS_F32J}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


@pytest.mark.parametrize("case", ["wide exponents", "upcast from bf16", "coarse low bytes", "no sign bit",
                                  "rows of their own scale"])
def test_chunks_class_9_would_code_worse_stay_in_class_3(case):
    rng = np.random.default_rng(2)
    u = f32_weights(262_144, 4)
    if case == "wide exponents":
        u = (rng.standard_normal(u.size) * np.exp2(rng.integers(-70, 10, u.size))).astype(np.float32).view(np.uint32)
    elif case == "upcast from bf16":
        u &= np.uint32(0xFFFF0000)
    elif case == "coarse low bytes":  # a low half that rANS codes below 8 bits per byte
        u = (u & np.uint32(0xFFFF0000)) | np.minimum(rng.geometric(0.01, u.size), 0xFFFF).astype(np.uint32)
    elif case == "no sign bit":  # second moments: the six raw bits would carry five
        u &= np.uint32(0x7FFFFFFF)
    else:  # first moments: each row's exponents follow the row, which method 7 of class 3 codes
        rows = rng.normal(0, 1e-3, (683, 384)) * np.exp(rng.normal(0, 2, (683, 1)))
        u = rows.reshape(-1)[: u.size].astype(np.float32).view(np.uint32)
    raw, enc = encode_f32(u)
    assert classes_of(enc) == {fields.CLASS_F32}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_rows_of_their_own_scale_take_class_9_at_effort_0():
    """Effort 0 plans no method 7, so the comparison of class 9 with class 3 is order-0 on both sides."""
    rng = np.random.default_rng(6)
    rows = rng.normal(0, 1e-3, (300, 384)) * np.exp(rng.normal(0, 0.3, (300, 1)))
    raw, enc = encode_f32(rows.reshape(-1).astype(np.float32).view(np.uint32), effort=0)
    assert classes_of(enc) == {fields.CLASS_F32J}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_classes_shorter_than_two_symbol_parts_stay_in_class_3():
    """Found by review: below 16384 elements the symbols were method 2, and decoding them, composing and joining
    the low halves ran 1.3-1.4x slower than class 3 for at most 0.6% fewer bytes."""
    raw, enc = encode_f32(f32_weights(joint.MIN_ELEMENTS_WIDE - 1, 8))
    assert classes_of(enc) == {fields.CLASS_F32}
    raw, enc = encode_f32(f32_weights(joint.MIN_ELEMENTS_WIDE, 8))
    assert classes_of(enc) == {fields.CLASS_F32J}
    _, streams = parse_v1(enc.params, enc.payload)
    assert streams[1][0] == tensor.M_RANS32E and streams[1][1][0] == 2
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


@pytest.mark.parametrize("method", ["raw", "rans", "one part"])
@pytest.mark.parametrize("n", [40_000, 40_001])
def test_symbol_streams_of_every_method_class_9_takes_decode(method, n):
    """The encoder writes two-part method 6 (or const); a decoder takes the other methods too, through the
    symbol pass, composing and joining the low halves."""
    u = f32_weights(n, 9)
    raw, enc = encode_f32(u)
    regions, streams = parse_v1(enc.params, enc.payload)
    sym = np.empty(n, np.uint8)
    assert rans32e.decode_ext_into(np.frombuffer(streams[1][1], np.uint8), sym) == 0
    meth, freq, _ = tensor._plan_plane(sym)
    streams[1] = {"raw": (tensor.M_RAW, sym.tobytes()),
                  "rans": (tensor.M_RANS, as_bytes(tensor._code_plane(sym, tensor.M_RANS, freq))),
                  "one part": (meth, as_bytes(tensor._code_plane(sym, meth, freq, 1)))}[method]
    params, payload = build_v1(regions, streams)
    assert decode_chunk(enc.codec_id, params, payload, len(raw)) == raw


@pytest.mark.parametrize("n", [200_000, 200_001, 262_144 + 40])
def test_the_fused_loop_writes_what_decoding_then_composing_writes(n):
    u = f32_weights(n, n)
    raw, enc = encode_f32(u)
    _, streams = parse_v1(enc.params, enc.payload)
    (_, b0), (m1, b1), (_, b2), (_, b3) = streams
    assert m1 == tensor.M_RANS32E and b1[0] == 2
    sym = np.empty(n, np.uint8)
    out = np.zeros(n, np.uint32)
    packed, low = np.frombuffer(b2, np.uint8), np.frombuffer(b3, np.uint8)
    done = joint_loop.decode_fused32(np.frombuffer(b1, np.uint8), sym, packed, low, b0[0], out)
    assert done > n // 2 - 4096  # nearly every element written by the loop
    h = (n + 1) // 2
    assert np.array_equal(out[:done], u[:done]) and np.array_equal(out[h : h + done], u[h : h + done])
    top = np.zeros(n, np.uint16)
    joint.compose(sym, packed, b0[0], top, done)
    joint.merge_wide(top, low, out, done, h)
    joint.merge_wide(top, low, out, h + done, n)
    assert np.array_equal(out, u)
    assert joint_loop.decode_fused32(np.frombuffer(b1, np.uint8), sym, packed, low[:-2], b0[0], out) == -1


def test_class_9_decodes_without_the_vector_loop(monkeypatch):
    raw, enc = encode_f32(f32_weights(262_144, 11))
    monkeypatch.setattr(rans32, "_vector", False)
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


@pytest.mark.parametrize("damage", ["base 0", "base 194", "packed short", "low short", "low long", "low coded",
                                    "symbols truncated", "symbols of method 7", "symbols missing"])
def test_a_damaged_class_9_is_refused(damage):
    raw, enc = encode_f32(f32_weights(262_144, 12))
    regions, streams = parse_v1(enc.params, enc.payload)
    (m0, b0), (m1, b1), (m2, b2), (m3, b3) = streams
    change = {
        "base 0": {0: (m0, b"\0")},
        "base 194": {0: (m0, bytes([194]))},
        "packed short": {2: (m2, b2[:-1])},
        "low short": {3: (m3, b3[:-2])},
        "low long": {3: (m3, b3 + b"\0\0")},
        "low coded": {3: (tensor.M_ZSTD, b3)},
        "symbols truncated": {1: (m1, b1[: len(b1) // 2])},
        "symbols of method 7": {1: (tensor.M_RANS32C, b"\x02" + b1[1:])},
        "symbols missing": {1: (tensor.M_RAW, b"")},
    }[damage]
    for k, v in change.items():
        streams[k] = v
    params, payload = build_v1(regions, streams)
    with pytest.raises(CodecError):
        decode_chunk(enc.codec_id, params, payload, len(raw))


@pytest.mark.parametrize("head", [600, 601, 602])
def test_a_mixed_chunk_with_class_9_takes_the_compiled_path_at_any_offset(head):
    u = f32_weights(150_000, 18)
    raw = b"h" * head + u.tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(head, 4 * u.size, "f32"),)))
    assert classes_of(enc) == {fields.CLASS_GENERIC, fields.CLASS_F32J}
    out = np.empty(len(raw), np.uint8)
    st = chunk_fast.decode_mixed(np.frombuffer(enc.params, np.uint8), np.frombuffer(enc.payload, np.uint8), len(raw),
                                 out, tensor_fast.scratch_for(2 * len(raw)))
    assert st == 0 and out.tobytes() == raw
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_blocks_of_class_9_decode():
    a, b = f32_weights(100_000, 13), f32_weights(100_000, 14, scale=1e-5)
    raw = a.tobytes() + b.tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, 400_000, "f32"), Segment(400_000, 400_000, "f32"))))
    assert enc.params[0] == 2
    blocks = parse_v2(enc.params, enc.payload)
    assert {cls for _, cls in parse_v1(blocks[0][1], blocks[0][2])[0]} == {fields.CLASS_F32J}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
