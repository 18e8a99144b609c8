"""Split bf16/f16/f32 elements into their streams and count the 16-bit ones for the encoder: exact histograms of
short inputs, a 1-in-8 sample over a proven support for long ones.

bf16 streams and the first two f32 streams hold the same fields (exponent; sign and top 7 mantissa bits), so both
count the top 16 bits of their elements. A long input's histograms come from every 8th element (the phase rotating
every 1024), scaled by 8, and every symbol the stream can hold gets a count of at least 1: the support is bounded by
vectorised min/max passes over the streams (the exponent's range, plus its all-zero and all-one values, which zeros,
denormals, infinities and NaNs take), so the rANS table has a slot for every symbol that occurs. Counting every
element was a third of the encoding time of a 1 MiB chunk (one 65536-bin histogram increment per element, ~0.45 ns);
the sample costs 0.0001-0.0003 of the coded size on the corpus (docs/codecs.md, "Sampled tables").
"""
from __future__ import annotations

import threading

import numpy as np

from ._jit import njit
from .fields import CLASS_BF16, CLASS_F32, _split_bf16, _split_f16, _split_f32

STEP = 8  # sample stride (tensor._plan_plane's raw test uses the same sample)
# the sample's phase moves on by one element every ROTATE elements (8 phases per 8 * ROTATE): with a fixed phase,
# data that repeats every 2, 4 or 8 elements (interleaved columns) showed the sample one column only, and tables
# from it coded a bf16 chunk at 0.95 of its size instead of 0.72 (found by review)
ROTATE = 1024
EXACT_MAX = 1 << 15  # inputs shorter than this many elements are counted exactly (the sample would be < 4096)
# the exponent field of each stream-0 symbol: (mask of the key, width of the special runs at both ends). bf16's
# key is the 8-bit exponent (0 and 255 special); f16's is the high byte without the sign, exponent << 2 | mantissa
# top 2 (exponent 0 and 31: keys 0-3 and 124-127), in each sign half that occurs
KEY_BF16, KEY_F16 = (0xFF, 1), (0x7F, 4)


@njit(nogil=True, boundscheck=False)
def _count_exact(u, mode, counts):
    """Histograms of both streams of 2-byte elements u (mode 1 bf16, 2 f16) into counts[0] / counts[1], those of
    every 8th element into counts[2] / counts[3], and +0.0 elements, all / every 16th, into counts[4, 0] /
    counts[4, 1]."""
    for i in range(u.size):
        v = np.int64(u[i])
        if mode == 1:
            x = (v >> 7) & 0xFF
            y = ((v >> 8) & 0x80) | (v & 0x7F)
        else:
            x = v >> 8
            y = v & 0xFF
        counts[0, x] += 1
        counts[1, y] += 1
        counts[4, 0] += v == 0
        if (i & 7) == 0:
            counts[2, x] += 1
            counts[3, y] += 1
            if (i & 15) == 0 and v == 0:
                counts[4, 1] += 1


@njit(nogil=True, boundscheck=False)
def _count_sample(u, joint):
    """Every 8th element of u (the phase rotating every ROTATE elements) into joint (65536 uint32 bins, all zero on
    entry: _joint). Whole elements, not stream bytes: a bf16 exponent histogram repeats a few bins, and each
    increment waits for the previous one to the same bin."""
    n = u.size
    for blk in range(0, n, ROTATE):
        for i in range(blk + ((blk // ROTATE) & (STEP - 1)), min(blk + ROTATE, n), STEP):
            joint[u[i]] += 1


@njit(nogil=True, boundscheck=False)
def _count_sample32(u, joint, low):
    """_count_sample for f32 elements: their top 16 bits into joint (the bf16 fields), their two low bytes into
    low[0] / low[1] (the mantissa streams' samples, for the planner's raw test); returns the +0.0 elements of the
    sample (the top bits alone cannot tell them)."""
    n = u.size
    z = 0
    for blk in range(0, n, ROTATE):
        for i in range(blk + ((blk // ROTATE) & (STEP - 1)), min(blk + ROTATE, n), STEP):
            v = u[i]
            joint[v >> 16] += 1
            low[0, (v >> 8) & 0xFF] += 1
            low[1, v & 0xFF] += 1
            z += v == 0
    return z


@njit(nogil=True, boundscheck=False)
def _fold(joint, mode, in_a, counts):
    """The sample's histograms of both streams into counts[2] / counts[3] and its +0.0 elements, times 8 and
    halved (estimates of all elements' and of every 16th's), into counts[4], from the runs of bins whose stream-0
    symbol is in in_a (no other run has a count); those runs are cleared for the next call."""
    counts[4, 0] = STEP * np.int64(joint[0])
    counts[4, 1] = (np.int64(joint[0]) + 1) >> 1
    if mode == 1:  # run r = sign << 8 | exponent, bins = sign-less mantissa: stream 1 = sign << 7 | mantissa
        for r in range(512):
            if not in_a[r & 0xFF]:
                continue
            t = np.int64(0)
            hi = (r >> 8) << 7
            for m in range(128):
                c = joint[r * 128 + m]
                t += c
                counts[3, hi | m] += c
            counts[2, r & 0xFF] += t
            joint[r * 128 : (r + 1) * 128] = 0
    else:  # run r = high byte, bins = low byte
        for r in range(256):
            if not in_a[r]:
                continue
            t = np.int64(0)
            for m in range(256):
                c = joint[r * 256 + m]
                t += c
                counts[3, m] += c
            counts[2, r] += t
            joint[r * 256 : (r + 1) * 256] = 0


@njit(nogil=True, boundscheck=False)
def _bounds(a, d, kmask):
    """(min key, max key, min (key - d) & kmask, max (key + d) & kmask, min byte, max byte) of stream a, key =
    byte & kmask. The shifted keys move the d special keys at each end past the normal ones, so their min and
    max are those of the normal keys. Written as selects on uint8 so that LLVM vectorises it (~17 us per MiB)."""
    mk = np.uint8(255)
    xk = np.uint8(0)
    ml = np.uint8(255)
    xh = np.uint8(0)
    mb = np.uint8(255)
    xb = np.uint8(0)
    for i in range(a.size):
        b = a[i]
        k = np.uint8(b & kmask)
        lo = np.uint8(np.uint8(k - d) & kmask)
        hi = np.uint8(np.uint8(k + d) & kmask)
        mk = k if k < mk else mk
        xk = k if k > xk else xk
        ml = lo if lo < ml else ml
        xh = hi if hi > xh else xh
        mb = b if b < mb else mb
        xb = b if b > xb else xb
    return mk, xk, ml, xh, mb, xb


@njit(nogil=True)
def _support(mode, a, b, in_a, in_b):
    kmask, d = KEY_BF16 if mode == 1 else KEY_F16
    mk, xk, ml, xh, mb, xb = _bounds(a, np.uint8(d), np.uint8(kmask))
    mk, xk, ml, xh, mb, xb = np.int64(mk), np.int64(xk), np.int64(ml), np.int64(xh), np.int64(mb), np.int64(xb)
    keys = np.zeros(kmask + 1, np.bool_)
    if ml <= kmask - 2 * d:  # some key is normal
        keys[ml + d : xh - d + 1] = True
    if mk < d:
        keys[:d] = True
    if xk > kmask - d:
        keys[kmask + 1 - d :] = True
    if mode == 1:
        in_a[:] = keys
    else:  # the sign halves that occur (min byte < 128: a positive element; max >= 128: a negative one)
        if mb < 128:
            in_a[:128] = keys
        if xb >= 128:
            in_a[128:] = keys
    lo, hi = _bounds(b, np.uint8(0), np.uint8(0xFF))[4:]
    in_b[np.int64(lo) : np.int64(hi) + 1] = True


def support(mode: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of 256 that hold every symbol of stream a (exponents) and of stream b (the low bytes)."""
    in_a, in_b = np.zeros(256, bool), np.zeros(256, bool)
    _support(mode, a, b, in_a, in_b)
    return in_a, in_b


@njit(nogil=True, boundscheck=False)
def _estimate(sample, present, n, out):
    """Counts of a stream of n symbols from its sample: STEP per sampled symbol, 1 for a possible one the sample
    missed; n for the only possible symbol (so that a constant stream is seen as constant). (In numpy: ~10 us.)"""
    possible = 0
    for s in range(out.size):
        possible += present[s]
    for s in range(out.size):
        if possible == 1:
            out[s] = n if present[s] else 0
        else:
            out[s] = sample[s] * STEP if sample[s] > 0 else np.int64(present[s])


_local = threading.local()


def _joint() -> np.ndarray:
    """This thread's 65536 bins for _count_sample, all zero between calls (clearing them for every chunk cost more
    than counting a bf16 exponent stream)."""
    j = getattr(_local, "joint", None)
    if j is None:
        j = _local.joint = np.zeros(1 << 16, np.uint32)
    return j


def split_count32(data: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(streams, counts) of an f32 class: the four streams as fields.split gives them, and for inputs of
    EXACT_MAX elements or more the counts of streams 0 and 1 as split_count gives them (rows 0-4) and the samples
    of the mantissa byte streams (rows 5 and 6: the planner's raw test; a strided copy and histogram of each cost
    ~35 us per MiB), else None."""
    n = data.size // 4
    u = data.view("<u4")
    planes = [np.empty(n, np.uint8) for _ in range(4)]
    if n < EXACT_MAX:
        _split_f32(u, *planes)
        return planes, None
    counts = np.zeros((7, 256), np.int64)
    joint = _joint()
    zeros = _count_sample32(u, joint, counts[5:])
    _split_f32(u, *planes)
    try:
        in_a, in_b = support(1, planes[0], planes[1])
    except BaseException:
        joint[:] = 0
        raise
    _fold(joint, 1, in_a, counts)
    counts[4, 0] = STEP * zeros
    counts[4, 1] = (zeros + 1) >> 1
    _estimate(counts[2], in_a, n, counts[0])
    _estimate(counts[3], in_b, n, counts[1])
    return planes, counts


def split_count(cls: int, data: np.ndarray, out: np.ndarray | None = None):
    """(streams, counts) of a 2-byte float class (bf16, f16): the streams as fields.split gives them (into out,
    2 * n bytes, when given) and counts [5, 256]: the streams' histograms (estimated from the sample for inputs
    of EXACT_MAX elements or more, never 0 for a symbol that occurs), those of a 1-in-8 sample, and +0.0 elements
    of all and of every 16th (from EXACT_MAX on, estimates from the sample)."""
    n = data.size // 2
    u = data.view("<u2")
    if out is None:
        out = np.empty(2 * n, np.uint8)
    a, b = out[:n], out[n : 2 * n]
    mode = 1 if cls == CLASS_BF16 else 2
    counts = np.zeros((5, 256), np.int64)
    # count first, split second: the coder then reads streams that are still in the cache (the other order cost
    # ~10% of the encoding time of a 1 MiB chunk)
    exact = n < EXACT_MAX
    if exact:
        _count_exact(u, mode, counts)
    else:
        joint = _joint()
        _count_sample(u, joint)
    if mode == 1:
        _split_bf16(u, a, b)
    else:
        _split_f16(u, a, b)
    if not exact:
        try:
            in_a, in_b = support(mode, a, b)
        except BaseException:
            joint[:] = 0  # the fold clears only what it reads
            raise
        _fold(joint, mode, in_a, counts)
        _estimate(counts[2], in_a, n, counts[0])
        _estimate(counts[3], in_b, n, counts[1])
    return [a, b], counts
