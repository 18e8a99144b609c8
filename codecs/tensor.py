"""The tensor codec: cut a chunk into dtype regions, split floats into field streams, entropy-code each stream.

Decoding lives in tensor_decode.py (decode and decode_into are re-exported here)."""
from __future__ import annotations

import logging

import numpy as np

from . import count16, fields, generic, joint, rans, rans32c, scratch, zeros
from .api import CODEC_TENSOR, CODEC_ZSTD, EncodedChunk, Segment
from .tensor_decode import decode, decode_into, finish_bytes, new_bytes  # noqa: F401  (re-exported: api, blocks)
# the format numbers, also re-exported (blocks and tests read them as tensor.FORMAT_VERSION, tensor.M_*)
from .tensor_format import (FORMAT_VERSION, M_CONST, M_LZ4, M_RANS, M_RANS32, M_RANS32C,  # noqa: F401
                            M_RANS32E, M_RAW, M_ZSTD, _get_varint, _put_varint)
# one class's streams (re-exported too: tests read tensor._plan_plane, tensor.SPLIT_MIN and others)
from .tensor_streams import (FLUSH_BYTES, RANS32_MIN, RANS_KEEP, SPLIT_MIN, _code_plane,  # noqa: F401
                             _encode_planes, _plan_plane, _plan_planes, _sample_says_raw)

log = logging.getLogger(__name__)

MIN_FLOAT_ELEMENTS = 16  # shorter float runs cost more in params than field splitting saves


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
        sm = np.zeros(256, np.int64)
        joint.sign_mantissa_histogram(u, sm)
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
