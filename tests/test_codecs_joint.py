"""Class 8 (codecs/joint.py): bf16 elements as one symbol of exponent and top mantissa bits plus six packed bits."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dccfs.codecs import ChunkHints, CodecError, Segment, decode_chunk, encode_chunk, joint, joint_loop, rans32
from dccfs.codecs import fields, rans32e, tensor
from test_codec_hardening import build_v1, build_v2, parse_v1, parse_v2


def bf16_weights(n: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    return (w.view(np.uint32) >> 16).astype(np.uint16)


def encode_bf16(u: np.ndarray):
    raw = u.tobytes()
    return raw, encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "bf16"),)))


def classes_of(enc) -> set[int]:
    regions, _ = parse_v1(enc.params, enc.payload)
    return {cls for _, cls in regions}


def reference_layout(u: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """docs/codecs.md's class-8 streams 1 and 2, element by element."""
    sym, packed = [], bytearray()
    for v in u.tolist():
        e = (v >> 7) & 0xFF
        slot = 0 if e == 0 else 63 if e == 255 else e - base + 1
        sym.append(slot << 2 | (v >> 5) & 3)
    h = (len(u) + 1) // 2
    for half in (u[:h].tolist(), u[h:].tolist()):
        low6 = [(v >> 15) << 5 | (v & 0x1F) for v in half]
        whole = len(half) // 64 * 64
        for b in range(0, whole, 64):
            blk = low6[b : b + 64]
            packed += bytes((blk[j] & 15) | (blk[32 + j] & 15) << 4 for j in range(16))
            packed += bytes((blk[16 + j] & 15) | (blk[48 + j] & 15) << 4 for j in range(16))
            packed += bytes(sum((blk[16 * q + j] >> 4) << (2 * q) for q in range(4)) for j in range(16))
        packed += bytes(low6[whole:])
    return np.array(sym, np.uint8), np.frombuffer(bytes(packed), np.uint8)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.1, 0.9]))
def test_split_and_compose_follow_the_documented_layout(n, seed, special):
    rng = np.random.default_rng(seed)
    u = bf16_weights(n, seed)
    pick = rng.random(n) < special
    u[pick] = rng.choice(np.array([0, 0x8000, 0x0001, 0x807F, 0x7F80, 0xFF80, 0x7FC1], np.uint16), pick.sum())
    got = joint.plan(u)
    assert got is not None
    base, present = got
    sym = np.empty(n, np.uint8)
    packed = np.empty(joint.packed_bytes(n), np.uint8)
    joint.symbols(u, base, sym)
    joint.split(u, sym, packed, np.zeros(256, np.int64), np.zeros(256, np.int64))
    ref_sym, ref_packed = reference_layout(u, base)
    assert np.array_equal(sym, ref_sym)
    assert np.array_equal(packed, ref_packed)
    assert present[sym].all(), "a symbol that occurs has no slot in the table's support"
    out = np.zeros(n, np.uint16)
    joint.compose(sym, packed, base, out, 0)
    assert np.array_equal(out, u)


@pytest.mark.parametrize("n", [4096, 4097, 65536 + 17, 100_001, 262_144, 524_288])
def test_bf16_weights_take_class_8_and_roundtrip(n):
    raw, enc = encode_bf16(bf16_weights(n, n))
    assert classes_of(enc) == {fields.CLASS_BF16J}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_class_8_codes_real_looking_weights_smaller_than_class_1(monkeypatch):
    raw, enc = encode_bf16(bf16_weights(262_144, 3))
    monkeypatch.setattr(tensor, "_split_joint", lambda cls, data, context: None)
    old = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "bf16"),)))
    assert classes_of(old) == {fields.CLASS_BF16}
    assert len(enc.params) + len(enc.payload) < len(old.params) + len(old.payload)


def test_special_values_roundtrip_in_class_8():
    u = bf16_weights(20_000, 5)
    # (rare enough: a quarter of zeros would take the zero-masked class, and many equal low bits class 1)
    u[::89] = 0
    u[1::97] = 0x8000  # -0.0
    u[2::101] = 0x0003  # denormal
    u[3::103] = 0x7F80  # +inf
    u[4::107] = 0xFFC0  # NaN
    u[5::109] = 0x807F  # negative denormal
    raw, enc = encode_bf16(u)
    assert classes_of(enc) == {fields.CLASS_BF16J}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_exponents_beyond_one_window_stay_in_class_1():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal(50_000) * np.exp2(rng.integers(-70, 10, 50_000))).astype(np.float32)
    u = (w.view(np.uint32) >> 16).astype(np.uint16)
    assert joint.plan(u) is None
    raw, enc = encode_bf16(u)
    assert classes_of(enc) == {fields.CLASS_BF16}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_a_window_at_the_top_of_the_exponents_keeps_every_slot_a_normal_exponent():
    u = bf16_weights(10_000, 6, scale=1e37)  # exponents near 250: the base moves down to 193
    base, _ = joint.plan(u)
    assert base == 255 - joint.WINDOW
    raw, enc = encode_bf16(u)
    assert classes_of(enc) == {fields.CLASS_BF16J}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_low_bits_that_carry_little_stay_in_class_1():
    """bf16 upcast from a narrower format (four low mantissa bits zero): six raw bits would waste four."""
    u = bf16_weights(100_000, 7) & np.uint16(0xFFF0)
    raw, enc = encode_bf16(u)
    assert classes_of(enc) == {fields.CLASS_BF16}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_short_classes_stay_in_class_1():
    raw, enc = encode_bf16(bf16_weights(joint.MIN_ELEMENTS - 1, 8))
    assert classes_of(enc) == {fields.CLASS_BF16}


def test_a_mixed_chunk_holds_class_8_next_to_generic_bytes():
    head = b"header" * 100
    u = bf16_weights(50_000, 9)
    raw = head + u.tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(len(head), 2 * u.size, "bf16"),)))
    assert classes_of(enc) == {fields.CLASS_GENERIC, fields.CLASS_BF16J}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def as_bytes(blob) -> bytes:
    """A coded stream as the payload holds it (_code_plane gives a two-part stream in two pieces)."""
    return b"".join(blob) if isinstance(blob, tuple) else bytes(blob)


@pytest.mark.parametrize("n", [200_000, 200_001, 262_144 + 40])
def test_the_fused_loop_writes_what_decoding_then_composing_writes(n):
    u = bf16_weights(n, n)
    base, present = joint.plan(u)
    sym = np.empty(n, np.uint8)
    packed = np.empty(joint.packed_bytes(n), np.uint8)
    joint.symbols(u, base, sym)
    joint.split(u, sym, packed, np.zeros(256, np.int64), np.zeros(256, np.int64))
    method, freq, _ = tensor._plan_plane(sym)
    stream = np.frombuffer(as_bytes(tensor._code_plane(sym, method, freq, 2)), np.uint8)
    plain = np.empty(n, np.uint8)
    assert rans32e.decode_ext_into(stream, plain) == 0
    assert np.array_equal(plain, sym)
    fused_sym = np.empty(n, np.uint8)
    out = np.zeros(n, np.uint16)
    done = joint_loop.decode_fused(stream, fused_sym, packed, base, out)
    assert done > n // 2 - 4096  # nearly every element written by the loop
    joint.compose(fused_sym, packed, base, out, done)
    assert np.array_equal(out, u)
    # one-part streams and wrong lengths are left to the caller
    one = np.frombuffer(as_bytes(tensor._code_plane(sym, method, freq, 1)), np.uint8)
    assert joint_loop.decode_fused(one, fused_sym, packed, base, out) == -1
    assert joint_loop.decode_fused(stream, fused_sym, packed[:-1], base, out) == -1


def test_class_8_decodes_without_the_vector_loop(monkeypatch):
    raw, enc = encode_bf16(bf16_weights(262_144, 11))
    monkeypatch.setattr(rans32, "_vector", False)
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def _rebuilt(enc, streams):
    regions, _ = parse_v1(enc.params, enc.payload)
    return build_v1(regions, streams)


@pytest.mark.parametrize("damage", ["base 0", "base 194", "base coded", "two base bytes", "packed short",
                                    "packed long", "packed coded", "symbols truncated", "symbols missing"])
def test_a_damaged_class_8_is_refused(damage):
    raw, enc = encode_bf16(bf16_weights(262_144, 12))
    _, streams = parse_v1(enc.params, enc.payload)
    (m0, b0), (m1, b1), (m2, b2) = streams
    change = {
        "base 0": {0: (m0, b"\0")},
        "base 194": {0: (m0, bytes([194]))},
        "base coded": {0: (tensor.M_CONST, b0)},
        "two base bytes": {0: (m0, b0 + b0)},
        "packed short": {2: (m2, b2[:-1])},
        "packed long": {2: (m2, b2 + b"\0")},
        "packed coded": {2: (tensor.M_ZSTD, b2)},
        "symbols truncated": {1: (m1, b1[: len(b1) // 2])},
        "symbols missing": {1: (tensor.M_RAW, b"")},
    }[damage]
    for k, v in change.items():
        streams[k] = v
    params, payload = _rebuilt(enc, streams)
    with pytest.raises(CodecError):
        decode_chunk(enc.codec_id, params, payload, len(raw))


def test_blocks_of_class_8_decode_after_the_compiled_blocks():
    """A chunk cut into blocks (params version 2) whose blocks are class 8 goes through the Python decoder."""
    a, b = bf16_weights(200_000, 13), bf16_weights(200_000, 14, scale=1e-5)
    raw = a.tobytes() + b.tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, 400_000, "bf16"), Segment(400_000, 400_000, "bf16"))))
    assert enc.params[0] == 2
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_low_bits_that_predict_the_top_mantissa_bits_stay_in_class_1():
    """Found by review: uniform low bits, but mantissa bits 6..5 copied from bits 1..0. Class 8 stores the six bits
    raw and codes the copy again (21% larger); the sampled comparison keeps class 1."""
    u = bf16_weights(262_144, 3)
    u = (u & ~np.uint16(0x60)) | ((u & 3) << 5).astype(np.uint16)
    raw, enc = encode_bf16(u)
    assert classes_of(enc) == {fields.CLASS_BF16}
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_a_class_8_symbol_stream_of_method_6_always_has_two_parts():
    """Found by review: classes below 100,000 elements decoded in one part plus a composing pass, 1.4x slower
    than class 1; two parts take the fused loop."""
    raw, enc = encode_bf16(bf16_weights(20_000, 15))
    _, streams = parse_v1(enc.params, enc.payload)
    method, blob = streams[1]
    assert method == tensor.M_RANS32E and blob[0] == 2
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


@pytest.mark.parametrize("where", ["mixed", "blocks"])
def test_a_damaged_class_8_is_refused_in_mixed_chunks_and_blocks(where):
    head = b"header" * 100
    u = bf16_weights(200_000, 16)
    if where == "mixed":
        raw = head + u.tobytes()
        enc = encode_chunk(raw, ChunkHints(segments=(Segment(len(head), 2 * u.size, "bf16"),)))
        regions, streams = parse_v1(enc.params, enc.payload)
        k = 1  # the generic class's stream comes first
        streams[k] = (streams[k][0], bytes([250]))  # base out of range
        params, payload = build_v1(regions, streams)
    else:
        other = bf16_weights(200_000, 17, scale=1e-5)
        raw = u.tobytes() + other.tobytes()
        enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, 400_000, "bf16"), Segment(400_000, 400_000, "bf16"))))
        assert enc.params[0] == 2
        blocks = parse_v2(enc.params, enc.payload)
        length, bparams, bpayload = blocks[0]
        regions, streams = parse_v1(bparams, bpayload)
        assert {cls for _, cls in regions} == {fields.CLASS_BF16J}
        method, blob = streams[1]
        streams[1] = (method, blob[: len(blob) // 2])  # the first block's symbols, truncated
        blocks[0] = (length, *build_v1(regions, streams))
        params, payload = build_v2(blocks)
    with pytest.raises(CodecError):
        decode_chunk(enc.codec_id, params, payload, len(raw))


def test_a_mixed_chunk_whose_class_8_lies_at_an_odd_offset_takes_the_compiled_path():
    """Found by review: with an odd-length header the class decodes into scratch first, and class 8's three rows
    of scratch plus the floats needed more than the scratch holds (the chunk fell back to the Python parser)."""
    from dccfs.codecs import chunk_fast, tensor_fast
    head = b"h" * 601
    u = bf16_weights(200_000, 18)
    raw = head + u.tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(len(head), 2 * u.size, "bf16"),)))
    assert classes_of(enc) == {fields.CLASS_GENERIC, fields.CLASS_BF16J}
    out = np.empty(len(raw), np.uint8)
    assert out.ctypes.data % 2 == 0  # the class starts at an odd address: not in place
    st = chunk_fast.decode_mixed(np.frombuffer(enc.params, np.uint8), np.frombuffer(enc.payload, np.uint8), len(raw),
                                 out, tensor_fast.scratch_for(2 * len(raw)))
    assert st == 0
    assert out.tobytes() == raw
