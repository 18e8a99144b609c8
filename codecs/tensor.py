"""The tensor codec: cut a chunk into dtype regions, split floats into field streams, entropy-code each stream.

Decoding lives in tensor_decode.py (decode and decode_into are re-exported here)."""
from __future__ import annotations

import logging

import numpy as np

from ._jit import njit
from . import count16, fields, generic, joint, rans, rans32, rans32_enc, rans32c, rans32e_enc, scratch, zeros
from .api import CODEC_TENSOR, CODEC_ZSTD, EncodedChunk, Segment
from .tensor_decode import decode, decode_into, finish_bytes, new_bytes  # noqa: F401  (re-exported: api, blocks)
# the format numbers, also re-exported (blocks and tests read them as tensor.FORMAT_VERSION, tensor.M_*)
from .tensor_format import (FORMAT_VERSION, M_CONST, M_LZ4, M_RANS, M_RANS32, M_RANS32C,  # noqa: F401
                            M_RANS32E, M_RAW, M_ZSTD, _get_varint, _put_varint)

log = logging.getLogger(__name__)

MIN_FLOAT_ELEMENTS = 16  # shorter float runs cost more in params than field splitting saves
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


def plan_regions(raw_len: int, segments: tuple[Segment, ...]) -> list[tuple[int, int]]:
    """Cover [0, raw_len) with (length, class) regions; unknown bytes, odd tails and tiny tensors go generic."""
    regions: list[tuple[int, int]] = []

    def add(length: int, cls: int) -> None:
        if length <= 0:
            return
        if regions and regions[-1][1] == cls:
            regions[-1] = (regions[-1][0] + length, cls)
        else:
            regions.append((length, cls))

    pos = 0
    for seg in sorted(segments, key=lambda s: s.start):
        start, end = max(seg.start, pos), min(seg.start + seg.length, raw_len)
        if end <= start:
            continue
        cls = fields.DTYPE_CLASS.get(seg.dtype, fields.CLASS_GENERIC)
        width = fields.CLASSES[cls][0]
        # the element phase is seg.start; bytes before the first whole element stay generic
        first = seg.start + -(-(start - seg.start) // width) * width
        n_el = (end - first) // width
        if cls == fields.CLASS_GENERIC or n_el < MIN_FLOAT_ELEMENTS:
            add(end - pos, fields.CLASS_GENERIC)
        else:
            add(first - pos, fields.CLASS_GENERIC)
            add(n_el * width, cls)
            add(end - (first + n_el * width), fields.CLASS_GENERIC)
        pos = end
    add(raw_len - pos, fields.CLASS_GENERIC)
    return regions


# the bytes of a chunk's generic regions next to a float class up to this many (torch zip local headers between
# storages, ~130 bytes each) are stored raw: zstd saved ~40% of them, and the chunk then decodes in the compiled
# path (chunk_fast.decode_mixed). On the corpus step-20 .pt (ratios as tools/bench_codecs.py prints them; decoding
# from a one-off script timing decode_chunk over the tool's chunks, 2026-12-05): 256 bytes 0.53549, 5,710 MB/s (its
# 32 MiB window at 32 MiB 4,744); 1024 bytes 0.53558, 6,026 (5,264): blocks of several small tensors and their
# headers had gone through the Python parser and zstd; 4096 bytes 0.53562
SMALL_GENERIC = 1024


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


def _encode_runs(runs: bytes, effort: int, level: int | None) -> tuple[int, bytes]:
    """Stream 0 of a zero-masked class: varint length of the run list, then the list coded by its method."""
    method, coded = _encode_generic(np.frombuffer(runs, np.uint8), effort, level)
    head = bytearray()
    _put_varint(head, len(runs))
    return method, bytes(head) + coded


def _split(cls: int, data: np.ndarray):
    """(streams, counts or None, +0.0 elements if masking is worth trying else -1) of a float class. bf16, f16
    and f32 split and count their 16-bit streams together (count16: their histograms and the zero test were half
    of the encoding time); the +0.0 count of a long input is estimated from its sample."""
    width = fields.CLASSES[cls][0]
    if cls in (fields.CLASS_BF16, fields.CLASS_F16):
        planes, counts = count16.split_count(cls, data, scratch.take(data.size))
        return planes, counts, zeros.worth(data.size // width, int(counts[4, 0]), int(counts[4, 1]))
    if cls == fields.CLASS_F32:
        planes, counts = count16.split_count32(data)
        if counts is not None:
            return planes, counts, zeros.worth(data.size // width, int(counts[4, 0]), int(counts[4, 1]))
        return planes, None, zeros.zeros_if_worth(data, width)
    nzero = zeros.zeros_if_worth(data, width) if cls in zeros.ZERO_CLASS else -1
    return fields.split(cls, data), None, nzero


def _split_joint(cls: int, data: np.ndarray, context: bool):
    """(symbols, packed low bits, base, counts, +0.0 elements if masking is worth trying else -1, the raw low
    halves or None) of a bf16 class in class 8, or of an f32 class in class 9 (codecs/joint.py), or None where
    class 1 / 3 stays: exponents outside one window, low bits that are not near uniform (their sampled entropy;
    f32: also both mantissa bytes of the low half), a sample that says class 1 / 3 codes smaller, or too few
    elements (f32: fewer than two symbol parts need). context: an f32 class where method 7 would pay, judged from
    every 32nd exponent (they follow their rows: a checkpoint's first moments), stays in class 3, whose method-7
    exponents decode in eight vector chains (class 9 with method-7 symbols: 0.1% smaller, decoding 1.2-1.5x
    slower in one-off timings, 2026-12-06)."""
    wide = cls == fields.CLASS_F32
    n = data.size // (4 if wide else 2)
    if n < (joint.MIN_ELEMENTS_WIDE if wide else joint.MIN_ELEMENTS):
        return None
    low6, m1, m0 = np.zeros(64, np.int64), np.zeros(256, np.int64), np.zeros(256, np.int64)
    low = None
    if wide:
        # the low bits first, on a sample: optimizer state (second moments have no sign bit) and upcast weights
        # are refused before any pass over the class
        if not joint.sample_low(data.view("<u4"), low6, m1, m0) or not joint.low_bits_uniform(low6, m1, m0, True):
            return None
        if context:
            # (the exponents, not the symbols: the two mantissa bits a symbol adds say next to nothing of the row)
            every_32nd = np.empty(-(-n // 32), np.uint8)
            joint.every_32nd_exponent(data.view("<u4"), every_32nd)
            if rans32c.every_32nd_pays(every_32nd, n):
                return None
        halves = scratch.take(4 * n)
        u, low = halves[: 2 * n].view("<u2"), halves[2 * n :].view("<u2")
        joint.split_wide(data.view("<u4"), u, low)
        got = joint.plan(u)
        if got is None:
            return None
    else:
        # bf16: the sample after the exponent bounds' pass, which brings the class into the cache (sampled
        # first, its scattered reads of a chunk not yet in the cache cost ~5% of the encoding in the benchmark)
        u = data.view("<u2")
        got = joint.plan(u)
        if got is None:
            return None
        if not joint.sample_low(u, low6, m1, m0) or not joint.low_bits_uniform(low6, m1, m0, False):
            return None
    base, present = got
    buf = scratch.take(n + joint.packed_bytes(n))
    sym, packed = buf[:n], buf[n:]
    joint.symbols(u, base, sym)
    sample = np.zeros(256, np.int64)
    sm = np.zeros(256, np.int64)
    z = joint.split(u, sym, packed, sample, sm)
    if n < joint.EXACT_LOW:  # a 1-in-8 sample of a short class is too short for 256-value histograms
        sample_or_all = rans.histogram(sym)
        sm = np.bincount(((u >> 8) & 0x80) | (u & 0x7F), minlength=256)
    else:
        sample_or_all = sample
    if not joint.beats_class_1(sample_or_all, sm):
        return None
    if n < count16.EXACT_MAX:  # (< EXACT_LOW: the exact histogram above)
        counts = sample_or_all
    else:
        counts = np.empty(256, np.int64)
        count16._estimate(sample, present, n, counts)
    # (as count16 estimates them: the sample's +0.0 elements times 8, those of every 16th half of them; an f32
    # element whose top half is +0.0 is counted: its low half is near uniform, so few are +0.0 themselves)
    nzero = zeros.worth(n, count16.STEP * z, (z + 1) >> 1)
    return sym, packed, base, (counts, sample), nzero, low


def _encode_joint(sym: np.ndarray, packed: np.ndarray, base: int, plan, low: np.ndarray | None
                  ) -> list[tuple[int, bytes | memoryview]]:
    """The streams of class 8 / 9: the base exponent, the symbols (two parts where long enough: the fused decoder
    runs them as four chains), the packed low bits (and class 9's raw low halves)."""
    method, freq, size = plan
    # two parts from the length method 6 starts at (not SPLIT_MIN): the fused loop needs them, and a class of 20000
    # to 100000 elements decoded in one part and a composing pass ran 1.4x slower than class 1 (found by review)
    two = method == M_RANS32E and size + FLUSH_BYTES[M_RANS32E] + 3 < RANS_KEEP * sym.size
    coded = _code_plane(sym, method, freq, 2 if two else 1)
    size = sum(len(b) for b in coded) if isinstance(coded, tuple) else len(coded)
    if method not in (M_RAW, M_CONST) and size >= sym.size:
        method, coded = M_RAW, _code_plane(sym, M_RAW, None)
    streams = [(M_RAW, bytes([base])), (method, coded), (M_RAW, memoryview(packed).cast("B"))]
    if low is not None:
        streams.append((M_RAW, memoryview(low.view(np.uint8)).cast("B")))
    return streams


def _encode_float(cls: int, data: np.ndarray, effort: int, level: int | None
                  ) -> tuple[int, list[tuple[int, bytes | memoryview]]]:
    """(class written, streams): the class itself (bf16 / f32: class 8 / 9 where it applies), or its zero-masked
    variant where that is estimated smaller."""
    width = fields.CLASSES[cls][0]
    n = data.size // width
    # effort 0 skips method 7 altogether: its planning and encoding cost ~0.5 ms per MiB
    context = effort > 0
    joint_split = _split_joint(cls, data, context) if cls in (fields.CLASS_BF16, fields.CLASS_F32) else None
    if joint_split is not None:
        sym, packed, base, (counts, sample), nzero, low = joint_split
        planes = [sym] * fields.CLASSES[cls][1]  # (the constant class below: as many streams as the class has)
    else:
        planes, counts, nzero = _split(cls, data)
    # the count may be a sample's estimate (not exactly n for all-zero classes whose length is not a multiple of
    # count16's sampling period): near all, the elements themselves decide
    if nzero >= n - (n >> 4) and not data.any():
        # all +0.0 (optimizer state of unseen embedding rows): one constant symbol per stream, which the masked
        # class cannot beat (the sampled tables of f16 would keep its four exponent-0 symbols)
        return cls, [(M_CONST, b"\0")] * len(planes)
    # with a quarter or more of +0.0 elements the masked class wins by 1.2-2 bits per element on the corpus
    # checkpoints (and by 0.1-0.3 bits at 98-99.9%): it is taken without planning the plain streams (~0.5 ms per
    # MiB of optimizer state). Not at effort 0: its run list is coded with lz4, and with scattered zeros the plain
    # bf16/f16 class was 2-4% smaller there (found by review)
    plain = nzero < n // 4 or effort == 0
    if plain and joint_split is not None:
        jplan = _plan_plane(sym, counts, sample)
        best = jplan[2] + packed.size + 3 + (0 if low is None else 2 * low.size)
    elif plain:
        plans = _plan_planes(cls, planes, context=context, counts=counts)
        best = sum(p[2] for p in plans)
    if nzero >= 0:
        runs, nonzero = zeros.split_zeros(data, width)
        zplanes, zcounts, _ = _split(cls, nonzero)
        zplans = _plan_planes(cls, zplanes, context=context, counts=zcounts)
        run_stream = _encode_runs(runs, effort, level)
        if not plain or sum(p[2] for p in zplans) + len(run_stream[1]) + 1 < best:
            return zeros.ZERO_CLASS[cls], [run_stream] + _encode_planes(cls, zplanes, zplans)
    if joint_split is not None:
        joint_cls = fields.CLASS_F32J if cls == fields.CLASS_F32 else fields.CLASS_BF16J
        return joint_cls, _encode_joint(sym, packed, base, jplan, low)
    return cls, _encode_planes(cls, planes, plans)


def _encode_generic(data: np.ndarray, effort: int, level: int | None) -> tuple[int, bytes]:
    raw = data.tobytes()
    got = generic.encode_generic(raw, effort, level) if raw else None
    if got is None or len(got[1]) >= len(raw):
        return M_RAW, raw
    return (M_ZSTD if got[0] == CODEC_ZSTD else M_LZ4), got[1]


def encode(raw: bytes, segments: tuple[Segment, ...], effort: int, level: int | None, force: bool = False) -> EncodedChunk | None:
    regions = plan_regions(len(raw), segments)
    if not force and all(cls == fields.CLASS_GENERIC for _, cls in regions):
        got = generic.encode_generic(raw, effort, level)
        return EncodedChunk(got[0], b"", got[1]) if got else None
    with scratch.session():  # the streams may be views of scratch memory until joined
        params, payload = encode_parts(raw, regions, effort, level)
        return EncodedChunk(CODEC_TENSOR, params, b"".join(payload))


def encode_parts(raw: bytes | memoryview, regions: list[tuple[int, int]], effort: int, level: int | None
                 ) -> tuple[bytes, list[bytes]]:
    """Version-1 params and the payload's streams (not joined: blocks joins every block's streams once; they may
    be views of scratch memory, valid until the caller's scratch session ends)."""
    arr = np.frombuffer(raw, np.uint8)
    by_class: dict[int, list[np.ndarray]] = {}
    pos = 0
    for length, cls in regions:
        by_class.setdefault(cls, []).append(arr[pos : pos + length])
        pos += length
    written: dict[int, int] = {}
    coded_by_class: dict[int, list[tuple[int, bytes]]] = {}
    for cls in sorted(by_class):
        data = by_class[cls][0] if len(by_class[cls]) == 1 else np.concatenate(by_class[cls])
        if cls == fields.CLASS_GENERIC and len(by_class) > 1 and data.size <= SMALL_GENERIC:
            # stored raw: the compiled decoder then takes the chunk whole (chunk_fast.decode_mixed)
            written[cls], coded = cls, [(M_RAW, data.tobytes())]
        elif cls == fields.CLASS_GENERIC:
            written[cls], coded = cls, [_encode_generic(data, effort, level)]
        else:
            written[cls], coded = _encode_float(cls, np.ascontiguousarray(data), effort, level)
        coded_by_class[written[cls]] = coded
    params = bytearray([FORMAT_VERSION])
    _put_varint(params, len(regions))
    for length, cls in regions:
        _put_varint(params, length)
        params.append(written[cls])
    payload = []
    for cls in sorted(coded_by_class):
        for method, blob in coded_by_class[cls]:
            params.append(method)
            if isinstance(blob, tuple):  # a stream in pieces (rans32e_enc.encode_ext_many: two parts)
                _put_varint(params, sum(len(b) for b in blob))
                payload.extend(blob)
            else:
                _put_varint(params, len(blob))
                payload.append(blob)
    return bytes(params), payload
