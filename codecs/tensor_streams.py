"""One float class's streams, planned and coded: raw, constant, order-0 rANS (methods 2, 5, 6) or method 7."""
from __future__ import annotations

import logging

import numpy as np

from ._jit import njit
from . import fields, rans, rans32, rans32_enc, rans32c, rans32e_enc
from .tensor_format import M_CONST, M_RANS, M_RANS32, M_RANS32C, M_RANS32E, M_RAW

log = logging.getLogger(__name__)

RANS_KEEP = 0.999  # keep a rANS stream if it beats raw by 0.1%: the targets are ratio-first
# streams this long use the 32-lane coder (method 6: fast vector decoding; the end states carry the last symbols of
# every lane, which pays for most of the 32 states' flush); shorter ones keep the 4-state coder (method 2). At 16384
# (it was 60000 until 2026-12-05) every corpus file's ratio is the same to 5 digits, and the 64 KiB blocks of cut
# checkpoint chunks decode faster: one .pt chunk 0.84 -> 0.46 ms, the whole .pt ~5% (one-off timings; blocks.py
# estimates the same)
RANS32_MIN = 16_384
RANS32_METHOD = M_RANS32E  # what long streams are written with (tests set M_RANS32 to write legacy streams)
# a class whose only rANS stream is this long codes it in two parts (method 6, parts = 2) so that the decoder has
# four vector chains in flight instead of two (f16 high bytes)
SPLIT_MIN = 100_000
# typical cost of the final states beyond the entropy (method 6: per part)
FLUSH_BYTES = {M_RANS: 12, M_RANS32: 96, M_RANS32E: 48}
FLUSH_BYTES_RANS = FLUSH_BYTES[M_RANS]

# a plane whose 1-in-8 sample has more than this order-0 entropy (Miller-Madow corrected: the plug-in estimate is
# biased low by ~(K - 1) / (2 N ln 2), 0.006 bits for a 1 MiB f32 chunk's plane and 0.02 for a quarter of it,
# which sent the mantissa planes of most checkpoint blocks to a full histogram, ~2% of their encoding) is stored
# raw without a histogram: rANS needs < ~7.977 bits (131072 bytes) or < ~7.962 (65536) to beat raw by 0.1% after
# its table, so nothing that could be coded is skipped (mantissa low bytes: ~7.997)
RAW_SAMPLE_BITS = 7.985
SAMPLE_MIN = 1 << 16


@njit(nogil=True)
def _sample_says_raw(n, sample):
    total = sample.sum()  # ~n / 8: every 8th byte, or count16's rotating sample
    if total == 0:
        return False
    bits = 0.0
    seen = 0
    for s in range(256):
        if sample[s]:
            q = sample[s] / total
            bits -= q * np.log2(q)
            seen += 1
    return bits + (seen - 1) / (2.0 * total * np.log(2.0)) > RAW_SAMPLE_BITS


@njit(nogil=True)
def _plan_counts(n, counts, rans32_min, method32, flush32, freq):
    """_plan_plane's choice from the plane's histogram: (method, estimated size), freq filled for the rANS
    methods. (In numpy these expressions cost ~25 us per plane.)"""
    # one symbol with a count, not a count of n: estimated counts (count16) need not add up to n
    nsym = 0
    for s in range(256):
        nsym += counts[s] > 0
    if nsym == 1:
        return M_CONST, 1.0
    # the counts may be a sample's estimate (count16): their sum is the scale, n the stream's length
    rans._normalize(counts, counts.sum(), freq)
    body = 0.0
    nsym = 0
    big = 0
    for s in range(256):
        if counts[s]:
            body += counts[s] * (rans.SCALE_BITS - np.log2(freq[s]))
            nsym += 1
            big += freq[s] > 128
    body /= 8
    if n >= rans32_min:
        method = method32
        size = body + flush32 + 2 + rans32.write_table(freq, np.empty(rans32.TABLE_MAX, np.uint8))
    else:
        method = M_RANS
        size = body + FLUSH_BYTES_RANS + 33 + nsym + big  # rans.table_bytes
    if size >= RANS_KEEP * n:
        return M_RAW, float(n)
    return method, size


@njit(nogil=True, boundscheck=False)
def _all_equal(plane, value):
    diff = np.uint8(0)
    for i in range(plane.size):
        diff |= plane[i] ^ value  # no early exit: LLVM vectorises the whole pass (~10 us per 256 KiB)
    return diff == 0


def _plan_plane(plane: np.ndarray, counts: np.ndarray | None = None, sample: np.ndarray | None = None):
    """(method, freq, estimated size): const, raw, or the rANS coder that fits the stream's length. counts /
    sample: the plane's histogram and that of its every 8th byte, where a fused pass has them already."""
    n = plane.size
    if n == 0:
        return M_RAW, None, 0
    if n >= SAMPLE_MIN:
        if sample is None:
            sample = rans.histogram(np.ascontiguousarray(plane[::8]))
        if _sample_says_raw(n, sample):
            return M_RAW, None, n
        if np.count_nonzero(sample) == 1 and _all_equal(plane, np.uint8(np.argmax(sample))):
            return M_CONST, None, 1  # the mantissa bytes of all-zero optimizer state: no 154 us histogram
    if counts is None:
        counts = rans.histogram(plane)
    freq = np.empty(256, np.int64)
    method, size = _plan_counts(n, counts, RANS32_MIN, RANS32_METHOD, FLUSH_BYTES[RANS32_METHOD], freq)
    if method == M_RAW:
        return M_RAW, None, n
    return method, (None if method == M_CONST else freq), size


def _code_plane(plane: np.ndarray, method: int, freq, parts: int = 1) -> bytes | memoryview | tuple:
    if method == M_RAW:
        # the payload join copies it once; a bytes copy here first cost ~0.1 ms per MiB of mantissa planes
        return memoryview(np.ascontiguousarray(plane)).cast("B")
    if method == M_CONST:
        return bytes([int(plane[0])])
    if method == M_RANS:
        return rans.encode(plane, freq)
    if method == M_RANS32:
        return rans32_enc.encode(plane, freq)
    # in scratch memory, a two-part stream in two pieces, as _encode_planes has them: joining the parts here first
    # copied class 8's symbol stream once more (~4% of a bf16 chunk's encoding)
    return rans32e_enc.encode_ext_many([(plane, freq, parts)])[0]


# classes whose streams may use method 7: f32 (optimizer state and fp32 weights). bf16 would gain 0.002 of its
# size but decode ~40% slower (its two method-6 streams decode paired, four vector chains; method 7 has two)
CONTEXT_CLASSES = (fields.CLASS_F32,)


def _plan_planes(cls: int, planes: list[np.ndarray], context: bool = True, counts: np.ndarray | None = None) -> list:
    """Plans of a float class's streams: order-0 (_plan_plane), or method 7 where a context bucketing is estimated
    smaller (stream 0 given its own symbol 32 earlier, later streams given stream 0). counts: as
    count16.split_count gives them (2-byte classes)."""
    if counts is None:
        plans = [_plan_plane(p) for p in planes]
    else:  # counts of streams 0 and 1 (count16), and f32 mantissa byte streams' samples
        plans = [_plan_plane(p, counts[k], counts[2 + k]) if k < 2 else _plan_plane(p, None, counts[3 + k])
                 for k, p in enumerate(planes)]
    if not context or cls not in CONTEXT_CLASSES or plans[0][0] not in (M_RANS, M_RANS32E):
        return plans
    # stream 0 only: the exponent given the same lane's previous exponent carries nearly all of the gain (the
    # mantissa given the exponent added 0.0003 on the checkpoint for twice the encoding time)
    # next to a method-6 sign|mantissa stream that splits, with raw mantissa planes (the usual checkpoint chunk),
    # both streams go in two parts: eight vector chains decode them (rans32c.decode_quad_f32) where one part each
    # ran four, nearly twice the time; ~130 bytes more per 1 MiB chunk
    parts = 2 if (planes[0].size >= SPLIT_MIN and _splits(plans[1], planes[1].size)
                  and plans[2][0] == M_RAW and plans[3][0] == M_RAW) else 1
    got = rans32c.plan(planes[0], rans32c.SRC_SELF, None, parts)
    if got is not None and got[2] < plans[0][2]:
        plans[0] = (M_RANS32C, (rans32c.SRC_SELF, got[0], got[1], got[3], parts), got[2])
    return plans


def _splits(plan, n: int) -> bool:
    """Whether a stream of n symbols with this plan is coded in two parts (method 6, long enough, still kept
    against raw with a second flush)."""
    return plan[0] == M_RANS32E and n >= SPLIT_MIN and plan[2] + FLUSH_BYTES[M_RANS32E] + 3 < RANS_KEEP * n


def _encode_planes(cls: int, planes: list[np.ndarray], plans) -> list[tuple[int, bytes | memoryview]]:
    parts = [1] * len(planes)
    coders = [k for k, (m, _, _) in enumerate(plans) if m in (M_RANS32E, M_RANS32C)]
    # a lone method-6 stream is split in two parts (four vector chains); next to a method-7 stream it is not:
    # the two decode in one loop. The two method-6 streams of a bf16 class, or of an f32 class with raw mantissa
    # planes, are split too: their four parts decode in one loop (eight chains; about 110 bytes more per 1 MiB
    # chunk for decoding 10-15% faster, docs/codecs.md)
    quad = coders == [0, 1] and (cls == fields.CLASS_BF16 or (
        cls == fields.CLASS_F32 and plans[2][0] == M_RAW and plans[3][0] == M_RAW))
    if plans[0][0] == M_RANS32C and plans[0][1][4] == 2:
        parts[1] = 2  # _plan_planes checked that it splits
    elif len(coders) == 1 or quad:
        # all or none: a class with one of the two streams split has no fused loop
        if all(_splits(plans[k], planes[k].size) for k in coders):
            for k in coders:
                parts[k] = 2
    # every method-6 stream of the class in one call: their parts are coded two at a time
    ext = [k for k, (m, _, _) in enumerate(plans) if m == M_RANS32E]
    coded = dict(zip(ext, rans32e_enc.encode_ext_many([(planes[k], plans[k][1], parts[k]) for k in ext])))
    out = []
    for k, (p, (m, freq, _), n) in enumerate(zip(planes, plans, parts)):
        if k in coded:
            out.append((m, coded[k]))
        elif m == M_RANS32C:
            src, thresholds, freqs, idx, nparts = freq
            out.append((m, rans32c.encode_pieces(p, src, planes[0] if src else None, thresholds, freqs, idx, nparts)))
        else:
            out.append((m, _code_plane(p, m, freq, n)))
    for k, (m, blob) in enumerate(out):
        size = sum(len(b) for b in blob) if isinstance(blob, tuple) else len(blob)
        if m not in (M_RAW, M_CONST) and size >= planes[k].size:
            # the plan's estimate comes from a sample (count16): never keep a coded stream larger than the plane
            out[k] = (M_RAW, _code_plane(planes[k], M_RAW, None))
    return out
