"""The register-loop decoders (codecs/rans32_loop.py), the bf16 merge inside the loop and decoding into new bytes."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from dccfs.codecs import ChunkHints, CodecError, Segment, decode_chunk, encode_chunk
from dccfs.codecs import chunk_fast, fields, rans32, rans32c, rans32e, scratch, tensor, tensor_fast, zeros
from dccfs.codecs.varint import get_varint

log = logging.getLogger(__name__)

# element counts around the loop's 32-symbol rounds, the state-carried symbols and the 2-part split
SIZES = (40, 1000, 4097, 32768 + 33, 150001, 524288)


def _floats(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.05, n) * np.exp(rng.normal(0, 1, n) * 0.5)


def _class_3(x: np.ndarray) -> np.ndarray:
    """x (f32) with one element whose exponent lies far below the others: class 9 needs the normal exponents
    within 62 values, so the chunk is coded in class 3, whose loops the tests below drive."""
    x = x.astype(np.float32)
    x[0] = 1e-30
    return x


def _bf16(x: np.ndarray) -> bytes:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def _roundtrip(raw: bytes, dtype: str) -> None:
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), dtype),)))
    out = decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw))
    assert type(out) is bytes and out == raw


@pytest.mark.parametrize("n", SIZES)
def test_bf16_merged_in_the_loop_roundtrips(n):
    _roundtrip(_bf16(_floats(n, n)), "bf16")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_f16_f32_roundtrip(n, dtype):
    x = _floats(n, n + 1)
    _roundtrip((x.astype(np.float16) if dtype == "f16" else x.astype(np.float32)).tobytes(), dtype)


@pytest.mark.parametrize("nrows", [256, 1024])
def test_checkpoint_like_rows_with_method7_roundtrip(nrows):
    """Row-scaled f32 with method-7 exponents: below tensor.SPLIT_MIN elements both streams in one part (pair
    loop, four chains), above both in two (source 2 and a two-part method-6 stream: eight chains)."""
    rng = np.random.default_rng(7)
    rows = rng.normal(0, 1e-3, (nrows, 384)) * np.exp(rng.normal(0, 2, (nrows, 1)))
    raw = rows.astype(np.float32).tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),)))
    plan = np.empty((3, 8), np.int64)
    assert tensor_fast._single_class_plan(np.frombuffer(enc.params, np.uint8), len(raw), len(enc.payload), plan) == 3
    assert plan[0, 0] == 7, "expected a method-7 exponent stream in this chunk"
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    if rans32.vector_ok() and plan[0, 1] == 6 and plan[0, 2] == plan[0, 3] == 0:
        # the merged loop itself must succeed (a failure falls back to the stream-by-stream decoders, also exact)
        pay = np.frombuffer(enc.payload, np.uint8)
        s0, s1, m1, m0 = (pay[plan[1, k] : plan[1, k] + plan[2, k]] for k in range(4))
        n = len(raw) // 4
        e, sm, u = np.empty(n, np.uint8), np.empty(n, np.uint8), np.empty(n, np.uint32)
        want = np.frombuffer(raw, np.uint32)
        split = n >= tensor.SPLIT_MIN
        assert s0[0] == (rans32c.SRC_SELF2 if split else rans32c.SRC_SELF) and s1[0] == (2 if split else 1)
        if split:
            done = rans32c.decode_quad_f32(s0, e, s1, sm, m1, m0, u)
            h = (n + 1) >> 1
            assert done > 0 and np.array_equal(u[:done], want[:done]) and np.array_equal(u[h : h + done],
                                                                                         want[h : h + done])
            assert rans32c.decode_pair_into(s0, e, s1, sm, m1, m0, u) == -2  # not its shape
        else:
            done = rans32c.decode_pair_into(s0, e, s1, sm, m1, m0, u)
            assert done > 0 and np.array_equal(u[:done], want[:done])
            assert rans32c.decode_quad_f32(s0, e, s1, sm, m1, m0, u) == -2


def test_results_are_independent_bytes_objects():
    raw = _bf16(_floats(65536, 3))
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "bf16"),)))
    first = decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw))
    other = _bf16(_floats(65536, 4))
    enc2 = encode_chunk(other, ChunkHints(segments=(Segment(0, len(other), "bf16"),)))
    second = decode_chunk(enc2.codec_id, enc2.params, enc2.payload, len(other))
    again = decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw))
    assert first == raw and second == other and again == raw and first is not again
    assert hash(first) == hash(raw)


def _bf16_streams(elements, seed):
    """A bf16 chunk's raw bytes, its two method-6 streams and their planes from the scalar decoder. The two low
    mantissa bits are cleared so that the sign|mantissa plane is surely worth coding (random mantissas sit at the
    edge of raw)."""
    raw = (np.frombuffer(_bf16(_floats(elements, seed)), np.uint16) & 0xFFFC).tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "bf16"),)))
    plan = np.empty((3, 8), np.int64)
    assert tensor_fast._single_class_plan(np.frombuffer(enc.params, np.uint8), len(raw), len(enc.payload), plan) == 1
    pay = np.frombuffer(enc.payload, np.uint8)
    a, b = (pay[plan[1, k] : plan[1, k] + plan[2, k]] for k in range(2))
    n = len(raw) // 2
    ref = [np.empty(n, np.uint8) for _ in range(2)]
    assert rans32e.decode_ext_into_scalar(a, ref[0]) == 0 and rans32e.decode_ext_into_scalar(b, ref[1]) == 0
    return raw, a, b, ref


def test_loop_decoders_agree_with_the_scalar_ones_on_a_pair():
    """The paired bf16 path, the plain pair and the scalar decoders give the same planes for the same streams
    (streams shorter than tensor.SPLIT_MIN are written in one part)."""
    raw, a, b, ref = _bf16_streams(90001, 9)
    assert a[0] == 1 and b[0] == 1
    n = len(raw) // 2
    pair = [np.empty(n, np.uint8) for _ in range(2)]
    assert rans32e.decode_ext_pair_into(a, pair[0], b, pair[1]) == 0
    assert all(np.array_equal(p, r) for p, r in zip(pair, ref))
    if rans32.vector_ok():
        u = np.empty(n, np.uint16)
        planes = [np.empty(n, np.uint8) for _ in range(2)]
        done = rans32e.decode_ext_pair_bf16(a, planes[0], b, planes[1], u)
        assert 0 < done <= n
        assert np.array_equal(planes[0][done:], ref[0][done:]) and np.array_equal(planes[1][done:], ref[1][done:])
        assert np.array_equal(u[:done], np.frombuffer(raw, np.uint16)[:done])
        assert rans32e.decode_ext_quad_bf16(a, planes[0], b, planes[1], u) == -1  # one-part streams


@pytest.mark.parametrize("elements", [150001, 150000, 2 * tensor.SPLIT_MIN + 65])
def test_eight_chain_bf16_loop_agrees_with_the_scalar_decoder(elements):
    """Long bf16 streams are written in two parts each; the loop over all four writes the same elements as the
    scalar decoder's planes, from both halves, and leaves the rest in the planes."""
    raw, a, b, ref = _bf16_streams(elements, 10)
    assert a[0] == 2 and b[0] == 2
    n = len(raw) // 2
    h = (n + 1) >> 1
    pair = [np.empty(n, np.uint8) for _ in range(2)]
    assert rans32e.decode_ext_pair_into(a, pair[0], b, pair[1]) == -1  # two-part streams
    if not rans32.vector_ok():
        return
    u = np.empty(n, np.uint16)
    planes = [np.empty(n, np.uint8) for _ in range(2)]
    done = rans32e.decode_ext_quad_bf16(a, planes[0], b, planes[1], u)
    assert 0 < done <= n - h
    want = np.frombuffer(raw, np.uint16)
    assert np.array_equal(u[:done], want[:done]) and np.array_equal(u[h : h + done], want[h : h + done])
    for p, r in zip(planes, ref):
        assert np.array_equal(p[done:h], r[done:h]) and np.array_equal(p[h + done :], r[h + done :])
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "bf16"),)))
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


@pytest.mark.parametrize("elements", [150001, 2 * tensor.SPLIT_MIN + 33])
def test_eight_chain_f32_loop_agrees_with_the_scalar_decoder(elements):
    """The f32 form of the eight-chain loop: exponents and sign|mantissa-top bytes in two parts each, the mantissa
    planes raw."""
    raw = _class_3(_floats(elements, 11)).tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),)))
    plan = np.empty((3, 8), np.int64)
    assert tensor_fast._single_class_plan(np.frombuffer(enc.params, np.uint8), len(raw), len(enc.payload), plan) == 3
    pay = np.frombuffer(enc.payload, np.uint8)
    n = elements
    a, b, m1, m0 = (pay[plan[1, k] : plan[1, k] + plan[2, k]] for k in range(4))
    assert list(plan[0, :4]) == [tensor.M_RANS32E, tensor.M_RANS32E, tensor.M_RAW, tensor.M_RAW]
    assert a[0] == 2 and b[0] == 2
    ref = [np.empty(n, np.uint8) for _ in range(2)]
    assert rans32e.decode_ext_into_scalar(a, ref[0]) == 0 and rans32e.decode_ext_into_scalar(b, ref[1]) == 0
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    if not rans32.vector_ok():
        return
    h = (n + 1) >> 1
    u = np.empty(n, np.uint32)
    planes = [np.empty(n, np.uint8) for _ in range(2)]
    done = rans32e.decode_ext_quad_f32(a, planes[0], b, planes[1], m1, m0, u)
    assert 0 < done <= n - h
    want = np.frombuffer(raw, np.uint32)
    assert np.array_equal(u[:done], want[:done]) and np.array_equal(u[h : h + done], want[h : h + done])
    for p, r in zip(planes, ref):
        assert np.array_equal(p[done:h], r[done:h]) and np.array_equal(p[h + done :], r[h + done :])
    assert rans32e.decode_ext_quad_f32(a, planes[0], b, planes[1], m1[:-1], m0, u) == -1  # plane length checked


def _f32_with_skewed_mantissa(n: int, seed: int) -> bytes:
    """f32 weights whose two low mantissa bytes carry well under 8 bits (so all four streams are coded)."""
    rng = np.random.default_rng(seed)
    top = _floats(n, seed).astype(np.float32).view(np.uint32) & np.uint32(0xFFF80000)  # 4 mantissa bits
    low = np.minimum(rng.geometric(0.02, n), 255).astype(np.uint32) << 8 | np.minimum(rng.geometric(0.05, n), 255)
    return (top | low.astype(np.uint32)).tobytes()


@pytest.mark.parametrize("elements", [40, 1000, 32768 + 33, 262144])
def test_four_coded_f32_streams_decode_in_one_loop(elements):
    """Every stream of an f32 class coded, one part each: the eight-chain loop writes the elements, the parts'
    tails and state symbols are finished after it, and the result matches the scalar decoder of each stream."""
    raw = _f32_with_skewed_mantissa(elements, 17)
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),)))
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    if elements < tensor.RANS32_MIN:
        return  # short streams take the 4-state coder (or the chunk another codec)
    plan = np.empty((3, 8), np.int64)
    assert tensor_fast._single_class_plan(np.frombuffer(enc.params, np.uint8), len(raw), len(enc.payload), plan) == 3
    assert list(plan[0, :4]) == [tensor.M_RANS32E] * 4
    pay = np.frombuffer(enc.payload, np.uint8)
    bufs = [pay[plan[1, k] : plan[1, k] + plan[2, k]] for k in range(4)]
    assert all(b[0] == 1 for b in bufs)
    ref = [np.empty(elements, np.uint8) for _ in range(4)]
    assert all(rans32e.decode_ext_into_scalar(b, r) == 0 for b, r in zip(bufs, ref))
    if not rans32.vector_ok():
        return
    u = np.empty(elements, np.uint32)
    planes = [np.empty(elements, np.uint8) for _ in range(4)]
    done = rans32e.decode_ext_four_f32(bufs[0], planes[0], bufs[1], planes[1], bufs[2], planes[2], bufs[3],
                                       planes[3], u)
    assert 0 < done <= elements
    assert np.array_equal(u[:done], np.frombuffer(raw, np.uint32)[:done])
    for p, r in zip(planes, ref):
        assert np.array_equal(p[done:], r[done:])
    assert rans32e.decode_ext_four_f32(bufs[0], planes[0], bufs[1], planes[1], bufs[2], planes[2], bufs[3],
                                       planes[3][:-1], u) == -1  # plane length checked
    damaged = bytearray(enc.payload)
    damaged[plan[1, 3] + plan[2, 3] // 2] ^= 0x40
    try:
        out = decode_chunk(enc.codec_id, enc.params, bytes(damaged), len(raw))
    except CodecError:
        return
    assert len(out) == len(raw)


@pytest.mark.parametrize("elements", [65536 + 17, 262144])
def test_four_coded_f32_streams_with_method_7_exponents_decode_in_one_loop(elements):
    """Rows with their own scale (method-7 exponents) and coded mantissa bytes: the method-7 form of the loop."""
    rng = np.random.default_rng(19)
    rows = (rng.normal(0, 1e-3, (elements // 384 + 1, 384)) * np.exp(rng.normal(0, 2, (elements // 384 + 1, 1))))
    top = rows.reshape(-1)[:elements].astype(np.float32).view(np.uint32) & np.uint32(0xFFF80000)
    low = np.minimum(rng.geometric(0.02, elements), 255).astype(np.uint32) << 8 | np.minimum(
        rng.geometric(0.05, elements), 255)
    raw = (top | low.astype(np.uint32)).tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),)))
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    plan = np.empty((3, 8), np.int64)
    assert tensor_fast._single_class_plan(np.frombuffer(enc.params, np.uint8), len(raw), len(enc.payload), plan) == 3
    assert list(plan[0, :4]) == [tensor.M_RANS32C] + [tensor.M_RANS32E] * 3
    pay = np.frombuffer(enc.payload, np.uint8)
    bufs = [pay[plan[1, k] : plan[1, k] + plan[2, k]] for k in range(4)]
    assert bufs[0][0] == rans32c.SRC_SELF and all(b[0] == 1 for b in bufs[1:])
    ref = [np.empty(elements, np.uint8) for _ in range(4)]
    assert rans32c.decode_into_scalar(bufs[0], ref[0], ref[0]) == 0
    assert all(rans32e.decode_ext_into_scalar(b, r) == 0 for b, r in zip(bufs[1:], ref[1:]))
    if not rans32.vector_ok():
        return
    u = np.empty(elements, np.uint32)
    planes = [np.empty(elements, np.uint8) for _ in range(4)]
    args = [x for pair in zip(bufs, planes) for x in pair]
    done = rans32c.decode_four_f32(*args, u)
    assert 0 < done <= elements
    assert np.array_equal(u[:done], np.frombuffer(raw, np.uint32)[:done])
    for p, r in zip(planes, ref):
        assert np.array_equal(p[done:], r[done:])
    assert rans32c.decode_four_f32(*args[:-1], planes[3][:-1], u) == -1  # plane length checked
    assert rans32c.decode_four_f32(bufs[1], planes[0], *args[2:], u) == -2  # not a method-7 stream first


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_zero_masked_classes_use_the_eight_chain_loop_for_their_nonzero_elements(dtype):
    """A third of the elements +0.0 (zero-masked class): the nonzero elements' streams are long enough to be split
    in two parts each and decode through the base class's eight-chain loop, bit-exact."""
    rng = np.random.default_rng(13)
    x = _floats(300_000, 13)
    x[rng.random(x.size) < 0.33] = 0.0
    raw = _bf16(x) if dtype == "bf16" else x.astype(np.float32).tobytes()
    base = fields.CLASS_BF16 if dtype == "bf16" else fields.CLASS_F32
    with scratch.session():
        cls, streams = tensor._encode_float(base, np.frombuffer(raw, np.uint8), 1, None)
        assert cls == zeros.ZERO_CLASS[base]
        # stream 0 is the run list; a two-part stream comes as its two pieces
        assert [m for m, _ in streams[1:3]] == [tensor.M_RANS32E] * 2
        assert all(isinstance(blob, tuple) and blob[0][0] == 2 for _, blob in streams[1:3])
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), dtype),)))
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_damaged_bf16_streams_are_refused_or_exact_length():
    raw = _bf16(_floats(65536, 11))
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "bf16"),)))
    rng = np.random.default_rng(12)
    for _ in range(200):
        payload = bytearray(enc.payload)
        pos = int(rng.integers(len(payload)))
        payload[pos] ^= 1 << int(rng.integers(8))
        try:
            out = decode_chunk(enc.codec_id, enc.params, bytes(payload), len(raw))
        except CodecError:
            continue
        assert len(out) == len(raw)


def test_f32_merged_in_the_loop_decodes_most_elements():
    """Single-part streams (shorter than tensor.SPLIT_MIN): the pair loop."""
    x = _class_3(_floats(90000, 5))
    raw = x.tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f32"),)))
    plan = np.empty((3, 8), np.int64)
    assert tensor_fast._single_class_plan(np.frombuffer(enc.params, np.uint8), len(raw), len(enc.payload), plan) == 3
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    if rans32.vector_ok() and list(plan[0, :4]) == [6, 6, 0, 0]:
        pay = np.frombuffer(enc.payload, np.uint8)
        s0, s1, m1, m0 = (pay[plan[1, k] : plan[1, k] + plan[2, k]] for k in range(4))
        n = x.size
        e, sm, u = np.empty(n, np.uint8), np.empty(n, np.uint8), np.empty(n, np.uint32)
        done = rans32e.decode_ext_pair_f32(s0, e, s1, sm, m1, m0, u)
        assert n - 1024 <= done <= n and np.array_equal(u[:done], x.view(np.uint32)[:done])


def test_f16_two_part_high_bytes_merged_in_the_loop():
    x = _floats(524288, 6).astype(np.float16)
    raw = x.tobytes()
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "f16"),)))
    plan = np.empty((3, 8), np.int64)
    assert tensor_fast._single_class_plan(np.frombuffer(enc.params, np.uint8), len(raw), len(enc.payload), plan) == 2
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    pay = np.frombuffer(enc.payload, np.uint8)
    hi = pay[plan[1, 0] : plan[1, 0] + plan[2, 0]]
    if rans32.vector_ok() and list(plan[0, :2]) == [6, 0] and hi[0] == 2:
        n = x.size
        lo = pay[plan[1, 1] : plan[1, 1] + n]
        planes, u = np.empty(n, np.uint8), np.empty(n, np.uint16)
        done = rans32e.decode_ext_f16(hi, planes, lo, u)
        h = (n + 1) // 2
        ref = x.view(np.uint16)
        assert h - 1024 <= done <= h
        assert np.array_equal(u[:done], ref[:done]) and np.array_equal(u[h : h + done], ref[h : h + done])


def _torch_zip_like(rng, sizes, header=130, scales=None):
    """Float tensors of the given element counts (and scales) with a zip-header-like run of bytes between them:
    (raw, hints)."""
    raw, segs = bytearray(), []
    for k, n in enumerate(sizes):
        if k:
            name = b"ckpt/data/%d" % k  # then zero padding to the next storage, as torch writes it
            raw += (b"PK\x03\x04" + name).ljust(header, b"\0")
        segs.append(Segment(len(raw), 4 * n, "f32"))
        scale = scales[k] if scales else 0.05
        raw += (rng.normal(0, scale, n) * np.exp(rng.normal(0, 1, n) * 0.5)).astype(np.float32).tobytes()
    return bytes(raw), ChunkHints(segments=tuple(segs))


@pytest.mark.parametrize("header", [64, 130, 300, 1024, 1100])
def test_float_chunk_with_small_generic_gaps_decodes_compiled(header):
    """Two storages of a .pt with the zip header between them: up to tensor.SMALL_GENERIC bytes of header are stored
    raw and the chunk decodes in chunk_fast.decode_mixed (the Python multi-class path otherwise); either way exact,
    and a payload of the wrong length raises CodecError."""
    rng = np.random.default_rng(header)
    raw, hints = _torch_zip_like(rng, [150_000, 110_000], header)
    enc = encode_chunk(raw, hints)
    assert enc.params[0] == tensor.FORMAT_VERSION
    out = np.empty(len(raw), np.uint8)
    st = chunk_fast.decode_mixed(np.frombuffer(enc.params, np.uint8), np.frombuffer(enc.payload, np.uint8),
                                  len(raw), out, tensor_fast.scratch_for(2 * len(raw)))
    if rans32.vector_ok():
        assert (st == 0) == (header <= tensor.SMALL_GENERIC)
        if st == 0:
            assert out.tobytes() == raw
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    for payload in (enc.payload[:-1], enc.payload + b"\0"):  # refused by both paths, named by the Python one
        with pytest.raises(CodecError):
            decode_chunk(enc.codec_id, enc.params, payload, len(raw))


def test_blocks_with_mixed_blocks_decode_in_the_compiled_loop(monkeypatch):
    """A version-2 chunk whose blocks are one float class or a float class with a small raw header: every block in
    chunk_fast.decode_blocks, exactly."""
    from dccfs.codecs import blocks

    rng = np.random.default_rng(3)
    raw, hints = _torch_zip_like(rng, [60_000, 40_000, 100_000, 50_000], scales=[1e-6, 1.0, 1e4, 1e-2])
    monkeypatch.setattr(blocks, "BLOCK_PENALTY", 0)  # cut wherever it pays at all
    enc = encode_chunk(raw, hints)
    assert enc.params[0] == blocks.VERSION
    assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
    if rans32.vector_ok():
        nblocks, pos = get_varint(enc.params, 1, "test", 35)
        table = np.empty((nblocks, 6), np.int64)
        opos, qpos, sizes = 0, 0, []
        for b in range(nblocks):
            length, pos = get_varint(enc.params, pos, "test", 35)
            plen, pos = get_varint(enc.params, pos, "test", 35)
            blen, pos = get_varint(enc.params, pos, "test", 35)
            sizes.append((length, plen, blen))
        ppos = pos
        for b, (length, plen, blen) in enumerate(sizes):
            table[b] = opos, length, ppos, plen, qpos, blen
            opos, ppos, qpos = opos + length, ppos + plen, qpos + blen
        out = np.empty(len(raw), np.uint8)
        done = chunk_fast.decode_blocks(np.frombuffer(enc.params, np.uint8), np.frombuffer(enc.payload, np.uint8),
                                         table, out, tensor_fast.scratch_for(2 * len(raw)))
        assert done == nblocks and out.tobytes() == raw


def test_mixed_chunk_params_the_python_parser_refuses_are_refused():
    """decode_mixed takes only what the Python parser takes (review, 2026-12-05): a float region that is not whole
    elements, or more regions than bytes, is a CodecError, never bytes laid out around a shifted gap."""
    from test_codec_hardening import build_v1, parse_v1

    rng = np.random.default_rng(5)
    raw, hints = _torch_zip_like(rng, [20000, 15000], 130)
    enc = encode_chunk(raw, hints)
    regions, streams = parse_v1(enc.params, enc.payload)
    assert [c for _, c in regions] == [fields.CLASS_F32J, fields.CLASS_GENERIC, fields.CLASS_F32J]
    shifted = [(regions[0][0] - 2, regions[0][1]), regions[1], (regions[2][0] + 2, regions[2][1])]
    params, payload = build_v1(shifted, streams)
    with pytest.raises(CodecError, match="bad region"):
        decode_chunk(enc.codec_id, params, payload, len(raw))
    small = [(1, fields.CLASS_GENERIC), (4, fields.CLASS_F32)] + [(0, fields.CLASS_F32)] * 5
    params, payload = build_v1(small, [(tensor.M_RAW, b"g")] + [(tensor.M_RAW, b"x")] * 4)
    with pytest.raises(CodecError):
        decode_chunk(enc.codec_id, params, payload, 5)
