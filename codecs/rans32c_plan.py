"""Method 7 (rans32c) chooser: bucket thresholds from samples, the bucketed symbols and their tables, the size
estimate. Not part of the format: any choice it makes decodes (codecs/rans32c.py)."""
from __future__ import annotations

import logging

import numpy as np

from ._jit import njit
from .count16 import _bounds
from .rans import SCALE_BITS, _normalize, normalize
from .rans32 import LANES, SLOTS, TABLE_MAX, write_table

log = logging.getLogger(__name__)

MIN_SYMBOLS = 16384  # shorter streams cannot pay for the extra tables and the 32-state flush


@njit(nogil=True, boundscheck=False)
def bucket_symbols(data, src, lag, thresholds, idx, counts, step):
    """idx[i] = bucket << 8 | data[i], the bucket being how many of thresholds (three uint16, 256 for one not used)
    the context of i reaches (context: src[i - lag], 0 before the start; lag 0: src[i]); every step-th symbol of
    idx (the phase moving every COUNT_ROTATE, as count16's; step 1: every symbol) counted into counts. The
    comparisons vectorise: a table lookup and a count per symbol ran ~6x slower (2026-12-06)."""
    n = data.size
    t0, t1, t2 = thresholds[0], thresholds[1], thresholds[2]
    head = min(lag, n)
    for i in range(head):
        idx[i] = np.uint16(data[i])  # context 0: bucket 0 (thresholds are 1..255)
    body = data[head:]
    ctx = src[: body.size]
    out = idx[head:]
    for i in range(body.size):
        c = np.uint16(ctx[i])
        b = np.uint16(c >= t0) + np.uint16(c >= t1) + np.uint16(c >= t2)
        out[i] = (b << np.uint16(8)) | np.uint16(body[i])
    for blk in range(0, n, COUNT_ROTATE):
        for i in range(blk + ((blk // COUNT_ROTATE) % step), min(blk + COUNT_ROTATE, n), step):
            counts[idx[i]] += 1


@njit(nogil=True)
def _estimate_counts(sample, bounds, counts):
    """counts = sample * COUNT_STEP, or 1 for a symbol of the support (bounds: count16._bounds of the stream with
    d = 1: the normal symbols' range, 0 and 255 where they occur) that the sample missed, in every bucket."""
    mk, xk, ml, xh = bounds[0], bounds[1], np.int64(bounds[2]), np.int64(bounds[3])
    for v in range(counts.size):
        s = v & 255
        present = (s == 0 and mk == 0) or (s == 255 and xk == 255) or (ml <= 253 and ml < s < xh)
        counts[v] = sample[v] * COUNT_STEP if sample[v] else np.int64(present)


@njit(nogil=True)
def joint_counts(data, ctx, lag, counts):
    """counts[context, symbol]: context = ctx[i] (lag 0) or data[i - lag] (0 before the start)."""
    for i in range(data.size):
        if lag:
            c = data[i - lag] if i >= lag else 0
        else:
            c = ctx[i]
        counts[c, data[i]] += 1


def bucket_freqs(counts: np.ndarray) -> np.ndarray:
    """A valid table for one bucket's counts: normalised, or a two-symbol stand-in for 0 or 1 symbols."""
    present = np.nonzero(counts)[0]
    if present.size >= 2:
        return normalize(counts, int(counts.sum()))
    freq = np.zeros(256, np.int64)
    s = int(present[0]) if present.size else 0
    freq[s] = SLOTS - 1
    freq[s + 1 if s < 255 else s - 1] = 1
    return freq


def table_bytes(freq: np.ndarray) -> int:
    buf = np.empty(TABLE_MAX, np.uint8)
    return int(write_table(freq, buf))


def _bucket_parts(data: np.ndarray, source: int, ctx: np.ndarray | None, thresholds: list[int], parts: int,
                  nb: int, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(idx, counts of every step-th bucketed symbol) of bucket_symbols over the stream, or over each half on its
    own (parts = 2, source 0: each half's first 32 symbols see context 0)."""
    th = np.full(3, 256, np.uint16)
    th[: len(thresholds)] = thresholds
    idx = np.empty(data.size, np.uint16)
    counts = np.zeros(nb * 256, np.int64)
    if parts == 1:
        src = data if source == SRC_SELF else ctx
        bucket_symbols(data, src, LANES if source == SRC_SELF else 0, th, idx, counts, step)
    else:
        h = (data.size + 1) >> 1
        bucket_symbols(data[:h], data[:h], LANES, th, idx[:h], counts, step)
        bucket_symbols(data[h:], data[h:], LANES, th, idx[h:], counts, step)
    return idx, counts


def _bucket_sampled_parts(data: np.ndarray, source: int, ctx: np.ndarray | None, thresholds: list[int], parts: int,
                          nb: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, estimated counts) of _bucket_parts: from every COUNT_STEP-th symbol, every symbol of the stream's
    support (count16's bounds: the normal symbols' range, 0 and 255 where they occur) in every bucket."""
    idx, sample = _bucket_parts(data, source, ctx, thresholds, parts, nb, COUNT_STEP)
    counts = np.empty(nb * 256, np.int64)
    _estimate_counts(sample, _bounds(data, np.uint8(1), np.uint8(0xFF)), counts)
    return idx, counts


SAMPLE_STEP = 16
# plan's tables come from every COUNT_STEP-th bucketed symbol (scaled back), with a count of 1 for each symbol of
# the stream's support the sample missed (count16's estimate): a full count cost as much as coding the stream, and
# the sample cost 0.00004 of the step-20 checkpoint (0.53498 -> 0.53502, one-off, 2026-12-06). Streams shorter
# than COUNT_EXACT are counted whole. The support is the whole stream's, so one outlier exponent gives every
# bucket's table its range (review: a 32768-element class of second moments with one 1e30 grew by 0.25% of its
# size, ~8x less in a 1 MiB chunk; tables of per-bucket bounds would cost a min/max pair per bucket in the pass)
COUNT_STEP = 8
COUNT_ROTATE = 1024
COUNT_EXACT = 1 << 15
SAMPLE_MIN_GAIN = 64  # bytes per bucket (its table and what the sample misses) the sample must promise


@njit(nogil=True)
def _sample_counts(data, ctx, lag, blut, step, counts):
    for i in range(0, data.size, step):
        if lag:
            c = data[i - lag] if i >= lag else 0
        else:
            c = ctx[i]
        counts[(np.int64(blut[c]) << 8) | np.int64(data[i])] += 1


@njit(nogil=True)
def _entropy_bits(c):
    n = 0.0
    for s in range(c.size):
        n += c[s]
    bits = 0.0
    for s in range(c.size):
        if c[s]:
            bits += c[s] * np.log2(n / c[s])
    return bits


@njit(nogil=True)
def _sample_choice(data, src, lag, thresholds, step):
    """The sampled half of plan, compiled (its numpy steps cost ~100 us per f32 chunk): quartile thresholds of a
    1-in-step sample of the contexts into thresholds (returns their count; 0: none), and the bits a 1-in-step
    sample of the bucketed symbols saves against one table (second value)."""
    hist = np.zeros(256, np.int64)
    for i in range(0, src.size, step):
        hist[src[i]] += 1
    total = 0
    for s in range(256):
        total += hist[s]
    if total == 0:
        return 0, 0.0
    # the contexts' mass in quarters (within 0.0001 of a greedy search on the corpus checkpoint, at a fraction of
    # its cost): the first context whose running count passes each quartile, once each, strictly inside 1..255
    nt = 0
    for q in (0.25, 0.5, 0.75):
        limit = total * q
        run = 0
        t = 0
        while t < 256 and run + hist[t] <= limit:
            run += hist[t]
            t += 1
        if 0 < t < 256 and (nt == 0 or thresholds[nt - 1] != t):
            thresholds[nt] = t
            nt += 1
    if nt == 0:
        return 0, 0.0
    blut = np.zeros(256, np.uint8)
    for k in range(nt):
        for c in range(thresholds[k], 256):
            blut[c] += 1
    sample = np.zeros((nt + 1) * 256, np.int64)
    _sample_counts(data, src, lag, blut, step, sample)
    per = sample.reshape(nt + 1, 256)
    gain = _entropy_bits(per.sum(axis=0))
    for b in range(nt + 1):
        gain -= _entropy_bits(per[b])
    return nt, gain


@njit(nogil=True)
def _bucket_tables(counts, nb, freqs, tab):
    """Normalised tables of each bucket's counts into freqs[b] (bucket_freqs) and their estimated coded bytes
    (symbols and tables), or -1.0 where a table cannot be normalised."""
    size = 0.0
    for b in range(nb):
        c = counts[b * 256 : (b + 1) * 256]
        f = freqs[b]
        nsym = 0
        total = 0
        first = -1
        for s in range(256):
            if c[s]:
                nsym += 1
                total += c[s]
                if first < 0:
                    first = s
        if nsym >= 2:
            if _normalize(c, total, f) != 0:
                return -1.0
        else:  # a two-symbol stand-in: the table must hold two symbols
            f[:] = 0
            s0 = first if first >= 0 else 0
            f[s0] = SLOTS - 1
            f[s0 + 1 if s0 < 255 else s0 - 1] = 1
        bits = 0.0
        for s in range(256):
            if c[s]:
                bits += c[s] * (SCALE_BITS - np.log2(f[s]))
        size += bits / 8 + write_table(f, tab)
    return size


def sampled_thresholds(data: np.ndarray, source: int, ctx: np.ndarray | None) -> list[int] | None:
    """The bucket thresholds of method 7 for data from a 1-in-16 sample (lag 32 keeps its contexts), or None when
    the sample says the buckets cannot pay for their tables and flush."""
    if data.size < MIN_SYMBOLS:
        return None
    src = data if source == SRC_SELF else ctx
    lag = LANES if source == SRC_SELF else 0
    th = np.zeros(3, np.int64)
    return _paying(*_sample_choice(data, src, lag, th, SAMPLE_STEP), th, SAMPLE_STEP)


def every_32nd_pays(sample: np.ndarray, n: int) -> bool:
    """Whether method 7 of source 0 would pay for a stream of n symbols, judged as sampled_thresholds judges it
    from sample[k] = symbol 32 k alone: each sampled symbol's context (the symbol 32 earlier) is the one before
    it in the sample."""
    if n < MIN_SYMBOLS:
        return False
    th = np.zeros(3, np.int64)
    return _paying(*_sample_choice(sample, sample, 1, th, 1), th, LANES) is not None


def _paying(nt: int, gain: float, th: np.ndarray, step: int) -> list[int] | None:
    """The thresholds of a choice from a 1-in-step sample whose gain pays for the buckets' tables and flush, else
    None."""
    if nt == 0 or gain * step / 8 < SAMPLE_MIN_GAIN * (nt + 1) + FLUSH:
        return None
    return [int(t) for t in th[:nt]]


def plan(data: np.ndarray, source: int, ctx: np.ndarray | None, parts: int = 1):
    """(thresholds, bucket tables, estimated bytes, idx) of method 7 for data, or None when it cannot pay; parts =
    2 (source 0 only): for the stream in two halves (encode with the same parts)."""
    # a 1-in-16 sample first: most weight planes gain too little to pay for the extra tables and flush, and the
    # full pass below costs about as much as coding the plane
    thresholds = sampled_thresholds(data, source, ctx)
    if thresholds is None:
        return None
    nt = len(thresholds)
    nb = nt + 1
    if data.size < COUNT_EXACT:
        idx, counts = _bucket_parts(data, source, ctx, thresholds, parts, nb)
    else:
        idx, counts = _bucket_sampled_parts(data, source, ctx, thresholds, parts, nb)
    freqs = np.empty((nb, 256), np.int64)
    tables = _bucket_tables(counts, nb, freqs, np.empty(TABLE_MAX, np.uint8))
    if tables < 0:
        raise ValueError("more than 4096 distinct symbols")
    size = 2.0 + nt + parts * FLUSH + (3 if parts == 2 else 0) + tables
    return thresholds, freqs, size, idx


# Last: rans32c re-exports this module's and rans32c_enc's names at its own end, so whichever of the three is
# imported first, each finds the others' names already defined.
from .rans32c import FLUSH, SRC_SELF  # noqa: E402
