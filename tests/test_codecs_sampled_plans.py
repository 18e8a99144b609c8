"""The encoder's sampled and compiled planning steps agree with the exact numpy forms they replace."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccfs.codecs import blocks, count16, joint, rans32c, rans32c_enc, rans32c_plan, scratch, tensor

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _exponent_stream(draw):
    """A stream like an f32 exponent plane: rows of one scale with noise, zeros and specials sprinkled in."""
    n = draw(st.integers(0, 90000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    width = draw(st.sampled_from([1, 3, 40]))
    rows = rng.integers(100, 100 + width, n // 384 + 1)
    data = np.repeat(rows, 384)[:n] + rng.integers(0, 4, n)
    for value in draw(st.lists(st.sampled_from([0, 255, 1, 254]), max_size=2)):
        data[rng.random(n) < 0.01] = value
    return np.minimum(data, 255).astype(np.uint8)


def _bucketed_reference(data, source, ctx, thresholds, parts):
    """bucket << 8 | symbol in numpy: the context is the symbol 32 earlier in its part (0 before it), or ctx."""
    if source != rans32c.SRC_SELF:
        context = ctx.astype(np.int64)
    else:
        h = (data.size + 1) >> 1 if parts == 2 else data.size
        context = np.concatenate([np.r_[np.zeros(min(32, p.size), np.int64), p[:-32].astype(np.int64)][: p.size]
                                  for p in (data[:h], data[h:])])
    return (np.searchsorted(np.array(thresholds), context, side="right") << 8 | data).astype(np.uint16)


@FAST
@given(_exponent_stream(), st.lists(st.integers(1, 255), min_size=1, max_size=3, unique=True),
       st.sampled_from([(rans32c.SRC_SELF, 1), (rans32c.SRC_SELF, 2), (rans32c.SRC_STREAM0, 1)]))
def test_sampled_buckets_give_the_exact_symbols_and_cover_every_symbol(data, thresholds, source_parts):
    source, parts = source_parts
    thresholds = sorted(thresholds)
    nb = len(thresholds) + 1
    ctx = None if source == rans32c.SRC_SELF else np.roll(data, 1)
    idx = _bucketed_reference(data, source, ctx, thresholds, parts)
    exact = np.bincount(idx, minlength=nb * 256)
    got_idx, counts = rans32c_plan._bucket_parts(data, source, ctx, thresholds, parts, nb)
    assert np.array_equal(got_idx, idx) and np.array_equal(counts, exact)
    got_idx, estimate = rans32c_plan._bucket_sampled_parts(data, source, ctx, thresholds, parts, nb)
    assert np.array_equal(got_idx, idx)
    assert (estimate[exact > 0] > 0).all()  # every symbol that occurs has a slot in its bucket's table
    # the sample is every COUNT_STEP-th symbol: scaled back, it counts the stream within one step per part
    assert abs(int(estimate[estimate > 1].sum()) - data.size) <= rans32c_plan.COUNT_STEP * parts


@FAST
@given(_exponent_stream(), st.sampled_from([1, 2]))
def test_a_plan_from_sampled_counts_codes_its_stream_exactly(data, parts):
    got = rans32c.plan(data, rans32c.SRC_SELF, None, parts)
    if got is None:
        return
    thresholds, freqs, _, idx = got
    with scratch.session():
        blob = np.frombuffer(rans32c.encode(data, rans32c.SRC_SELF, None, thresholds, freqs, idx, parts), np.uint8)
    for decode in (rans32c.decode_into, rans32c.decode_into_scalar):
        out = np.empty(data.size, np.uint8)
        assert decode(blob, data, out) == 0
        assert np.array_equal(out, data)


def test_flat_tables_match_the_numpy_steps():
    rng = np.random.default_rng(5)
    freqs = np.zeros((3, 256), np.int64)
    for b in range(3):
        freqs[b, rng.integers(0, 256, 40)] = 1
        freqs[b] = rans32c_plan.bucket_freqs(freqs[b] * rng.integers(1, 500, 256))
    freq, cum, rcp = np.empty(768, np.int64), np.empty(768, np.int64), np.empty(768)
    tab = np.empty(3 * rans32c_enc.TABLE_MAX, np.uint8)
    length = rans32c_enc._flat_tables(freqs, freq, cum, rcp, tab)
    flat = freqs.reshape(-1)
    assert np.array_equal(freq, flat)
    for b in range(3):
        assert cum[b * 256] == 0
        assert np.array_equal(cum[b * 256 + 1 : (b + 1) * 256], np.cumsum(flat[b * 256 : (b + 1) * 256 - 1]))
    assert np.array_equal(rcp, 1.0 / np.maximum(flat, 1))
    one = np.empty(rans32c_enc.TABLE_MAX, np.uint8)
    want = b"".join(one[: rans32c_enc.write_table(f, one)].tobytes() for f in freqs)
    assert tab[:length].tobytes() == want


@pytest.mark.parametrize("top", [np.uint32, np.uint16])
def test_low_bit_sample_stops_at_one_sign_and_reads_all_of_a_short_class(top):
    rng = np.random.default_rng(1)
    bits = 32 if top is np.uint32 else 16
    mixed = rng.integers(0, 1 << bits, 300000, dtype=np.uint64).astype(top)
    positive = mixed & top((1 << (bits - 1)) - 1)
    step = mixed.size // (joint.LOW_SAMPLES // joint.LOW_RUN)
    starts = range(0, mixed.size, step)
    every = sum(min(joint.LOW_RUN, mixed.size - a) for a in starts)
    first = sum(min(joint.LOW_RUN, mixed.size - a) for k, a in enumerate(starts) if k % 8 == 0)
    for u, complete in ((mixed, True), (positive, False), (positive | top(1 << (bits - 1)), False)):
        low6, m1, m0 = np.zeros(64, np.int64), np.zeros(256, np.int64), np.zeros(256, np.int64)
        assert joint.sample_low(u, low6, m1, m0) == complete
        assert low6.sum() == (every if complete else first)
    short = mixed[:1003]  # every element, the last run short
    low6, m1, m0 = np.zeros(64, np.int64), np.zeros(256, np.int64), np.zeros(256, np.int64)
    assert joint.sample_low(short, low6, m1, m0)
    v = short.astype(np.int64) >> (16 if bits == 32 else 0)
    assert np.array_equal(low6, np.bincount(((v >> 10) & 0x20) | (v & 0x1F), minlength=64))


@pytest.mark.parametrize("seed", range(4))
def test_compiled_raw_stream_test_of_the_block_plan_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    key_cls = np.array([0, 0, 0, 0, 1, 1], np.int64)
    total = np.zeros((6, 256), np.int64)
    total[0] = rng.integers(0, 50, 256) * (rng.random(256) < 0.1)
    total[1] = rng.integers(900, 1100, 256)  # near uniform: raw
    total[2] = rng.integers(0, 1000, 256) * (rng.random(256) < 0.5)
    total[3] = 1000
    total[4] = total[0]
    total[5] = rng.integers(995, 1005, 256)
    keep, raw_cnt = np.ones(6, bool), np.zeros(2, np.int64)
    blocks._raw_streams(total, key_cls, keep, raw_cnt)
    n = total.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = np.where(total > 0, total * np.log2(np.maximum(n, 1)[:, None] / np.maximum(total, 1)), 0.0).sum(-1)
    first = np.r_[True, key_cls[1:] != key_cls[:-1]]
    want_keep = first | ~(bits > blocks.RAW_BITS * n)
    assert np.array_equal(keep, want_keep)
    assert list(raw_cnt) == [int((~want_keep & (key_cls == c)).sum()) for c in range(2)]


@pytest.mark.parametrize("mode", [1, 2])
def test_compiled_support_holds_every_symbol_of_both_streams(mode):
    rng = np.random.default_rng(mode)
    a = rng.integers(60, 70, 5000).astype(np.uint8)
    a[:3] = (0, 255, 128 + 65) if mode == 2 else (0, 255, 66)
    b = rng.integers(3, 200, 5000).astype(np.uint8)
    in_a, in_b = count16.support(mode, a, b)
    assert in_a[a].all() and in_b[b].all()
    assert in_b.sum() == int(b.max()) - int(b.min()) + 1


def test_a_uniform_sample_says_raw_at_every_block_length():
    """Miller-Madow: the plug-in entropy of a uniform byte sample reads ~(K - 1) / (2 N ln 2) low, which sent
    short blocks' mantissa planes to a full histogram."""
    rng = np.random.default_rng(3)
    for n in (65536, 131072, 262144):
        sample = np.bincount(rng.integers(0, 256, n // 8), minlength=256).astype(np.int64)
        assert tensor._sample_says_raw(n, sample)
    skewed = np.bincount(np.minimum(rng.geometric(0.02, 32768), 255), minlength=256).astype(np.int64)
    assert not tensor._sample_says_raw(262144, skewed)
    assert not tensor._sample_says_raw(70000, np.zeros(256, np.int64))  # (no sample: no claim, found by review)
