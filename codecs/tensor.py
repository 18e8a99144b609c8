"""The tensor codec: cut a chunk into dtype regions, split floats into field streams, entropy-code each stream."""
from __future__ import annotations

import logging

import threading

from .varint import get_varint, put_varint
from ._jit import njit
import numpy as np

from . import blocks, fields, generic, rans, rans32, rans32c, zeros
from .api import CODEC_LZ4, CODEC_TENSOR, CODEC_ZSTD, CodecError, EncodedChunk, Segment

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# stream methods (on-disk format, docs/codecs.md)
M_RAW, M_ZSTD, M_RANS, M_CONST, M_LZ4, M_RANS32, M_RANS32E, M_RANS32C = 0, 1, 2, 3, 4, 5, 6, 7
MIN_FLOAT_ELEMENTS = 16  # shorter float runs cost more in params than field splitting saves
RANS_KEEP = 0.999  # keep a rANS stream if it beats raw by 0.1%: the targets are ratio-first
# streams this long use the 32-lane coder (method 6: fast vector decoding; the end states carry the last symbols of
# every lane, which pays for most of the 32 states' flush); shorter ones keep the 4-state coder (method 2)
RANS32_MIN = 60_000
RANS32_METHOD = M_RANS32E  # what long streams are written with (tests set M_RANS32 to write legacy streams)
# a class whose only rANS stream is this long codes it in two parts (method 6, parts = 2) so that the decoder has
# four vector chains in flight instead of two (f16 high bytes)
SPLIT_MIN = 100_000
# typical cost of the final states beyond the entropy (method 6: per part)
FLUSH_BYTES = {M_RANS: 12, M_RANS32: 96, M_RANS32E: 48}


def _put_varint(out: bytearray, v: int) -> None:
    put_varint(out, v)


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    return get_varint(buf, pos, "tensor", 35)


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


# a plane whose 1-in-8 sample has more than this order-0 entropy is stored raw without a full histogram: the
# plug-in estimate is biased low, and rANS needs < ~7.977 bits (131072 bytes) or < ~7.962 (65536) to beat raw by
# 0.1% after its table, so nothing that could be coded is skipped (mantissa low bytes: ~7.997)
RAW_SAMPLE_BITS = 7.985
SAMPLE_MIN = 1 << 16


def _plan_plane(plane: np.ndarray):
    """(method, freq, estimated size): const, raw, or the rANS coder that fits the stream's length."""
    if plane.size == 0:
        return M_RAW, None, 0
    if plane.size >= SAMPLE_MIN:
        sample = rans.histogram(np.ascontiguousarray(plane[::8]))
        p = sample[sample > 0] / (plane.size + 7 >> 3)
        if -(p * np.log2(p)).sum() > RAW_SAMPLE_BITS:
            return M_RAW, None, plane.size
    counts = rans.histogram(plane)
    if counts.max() == plane.size:
        return M_CONST, None, 1
    freq = rans.normalize(counts, plane.size)
    present = counts > 0
    body = float((counts[present] * (rans.SCALE_BITS - np.log2(freq[present]))).sum()) / 8
    if plane.size >= RANS32_MIN:
        method = RANS32_METHOD
        size = body + FLUSH_BYTES[method] + 2 + rans32.table_bytes(freq)
    else:
        method, size = M_RANS, body + FLUSH_BYTES[M_RANS] + rans.table_bytes(freq)
    if size >= RANS_KEEP * plane.size:
        return M_RAW, None, plane.size
    return method, freq, size


def _code_plane(plane: np.ndarray, method: int, freq, parts: int = 1) -> bytes | memoryview:
    if method == M_RAW:
        # the payload join copies it once; a bytes copy here first cost ~0.1 ms per MiB of mantissa planes
        return memoryview(np.ascontiguousarray(plane)).cast("B")
    if method == M_CONST:
        return bytes([int(plane[0])])
    if method == M_RANS:
        return rans.encode(plane, freq)
    if method == M_RANS32:
        return rans32.encode(plane, freq)
    return rans32.encode_ext(plane, freq, parts)


# classes whose streams may use method 7: f32 (optimizer state and fp32 weights). bf16 would gain 0.002 of its
# size but decode ~40% slower (its two method-6 streams decode paired, four vector chains; method 7 has two)
CONTEXT_CLASSES = (fields.CLASS_F32,)


def _plan_planes(cls: int, planes: list[np.ndarray], context: bool = True) -> list:
    """Plans of a float class's streams: order-0 (_plan_plane), or method 7 where a context bucketing is estimated
    smaller (stream 0 given its own symbol 32 earlier, later streams given stream 0)."""
    plans = [_plan_plane(p) for p in planes]
    if not context or cls not in CONTEXT_CLASSES or plans[0][0] not in (M_RANS, M_RANS32E):
        return plans
    # stream 0 only: the exponent given the same lane's previous exponent carries nearly all of the gain (the
    # mantissa given the exponent added 0.0003 on the checkpoint for twice the encoding time)
    got = rans32c.plan(planes[0], rans32c.SRC_SELF, None)
    if got is not None and got[2] < plans[0][2]:
        plans[0] = (M_RANS32C, (rans32c.SRC_SELF, got[0], got[1], got[3]), got[2])
    return plans


def _encode_planes(planes: list[np.ndarray], plans) -> list[tuple[int, bytes]]:
    parts = [1] * len(planes)
    coders = [k for k, (m, _, _) in enumerate(plans) if m in (M_RANS32E, M_RANS32C)]
    # a lone method-6 stream is split in two parts (four vector chains); next to a method-7 stream it is not:
    # the two decode in one loop
    if len(coders) == 1 and plans[coders[0]][0] == M_RANS32E and planes[coders[0]].size >= SPLIT_MIN:
        k = coders[0]
        if plans[k][2] + FLUSH_BYTES[M_RANS32E] + 3 < RANS_KEEP * planes[k].size:
            parts[k] = 2
    out = []
    for p, (m, freq, _), n in zip(planes, plans, parts):
        if m == M_RANS32C:
            src, thresholds, freqs, idx = freq
            out.append((m, rans32c.encode(p, src, planes[0] if src else None, thresholds, freqs, idx)))
        else:
            out.append((m, _code_plane(p, m, freq, n)))
    return out


def _encode_runs(runs: bytes, effort: int, level: int | None) -> tuple[int, bytes]:
    """Stream 0 of a zero-masked class: varint length of the run list, then the list coded by its method."""
    method, coded = _encode_generic(np.frombuffer(runs, np.uint8), effort, level)
    head = bytearray()
    _put_varint(head, len(runs))
    return method, bytes(head) + coded


def _encode_float(cls: int, data: np.ndarray, effort: int, level: int | None) -> tuple[int, list[tuple[int, bytes]]]:
    """(class written, streams): the class itself, or its zero-masked variant where that is estimated smaller."""
    planes = fields.split(cls, data)
    width = fields.CLASSES[cls][0]
    n = data.size // width
    nzero = zeros.zeros_if_worth(data, width) if cls in zeros.ZERO_CLASS else -1
    # with a quarter or more of +0.0 elements the masked class practically always wins: the plain estimate skips
    # method 7 planning (~0.3 ms per MiB)
    plans = _plan_planes(cls, planes, context=nzero < n // 4)
    best = sum(p[2] for p in plans)
    if nzero >= 0:
        runs, nonzero = zeros.split_zeros(data, width)
        zplanes = fields.split(cls, nonzero)
        zplans = _plan_planes(cls, zplanes)
        run_stream = _encode_runs(runs, effort, level)
        if sum(p[2] for p in zplans) + len(run_stream[1]) + 1 < best:
            return zeros.ZERO_CLASS[cls], [run_stream] + _encode_planes(zplanes, zplans)
    return cls, _encode_planes(planes, plans)


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
    params, payload = encode_parts(raw, regions, effort, level)
    return EncodedChunk(CODEC_TENSOR, params, b"".join(payload))


def encode_parts(raw: bytes | memoryview, regions: list[tuple[int, int]], effort: int, level: int | None
                 ) -> tuple[bytes, list[bytes]]:
    """Version-1 params and the payload's streams (not joined: blocks joins every block's streams once)."""
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
        if cls == fields.CLASS_GENERIC:
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
            _put_varint(params, len(blob))
            payload.append(blob)
    return bytes(params), payload


def _decode_runs(method: int, blob: memoryview) -> bytes:
    length, pos = _get_varint(blob, 0)
    if method not in (M_RAW, M_ZSTD, M_LZ4):
        raise CodecError(f"zero runs: unknown method {method}")
    return _decode_stream(method, blob[pos:], length).tobytes()


def _decode_zero_class(cls: int, payload: memoryview, meths, offs, lens, nbytes: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """A zero-masked class: the run list, the base class's streams over the nonzero elements, then expand (into
    out when given)."""
    base = zeros.BASE_CLASS[cls]
    width = fields.CLASSES[base][0]
    runs, k, nonzero = zeros.parse_runs(_decode_runs(meths[0], payload[offs[0] : offs[0] + lens[0]]), nbytes // width)
    meths, offs, lens = meths[1:], offs[1:], lens[1:]
    if nonzero == 0:
        if any(lens):
            raise CodecError("zero-masked class without nonzero elements has stream bytes")
        packed = np.empty(0, np.uint8)
    elif all(m in _FAST_METHODS for m in meths):
        packed = np.empty(nonzero * width, np.uint8)
        _decode_fast(base, np.frombuffer(payload, np.uint8), meths, offs, lens, packed)
    else:
        streams = [_decode_stream(m, payload[o : o + ln], nonzero) for m, o, ln in zip(meths, offs, lens)]
        packed = fields.merge(base, streams, nonzero * width)
    if out is None:
        out = np.empty(nbytes, np.uint8)
    zeros.expand(packed, runs, k, width, out)
    return out


def _decode_stream(method: int, blob: memoryview, n: int) -> np.ndarray:
    if method == M_RAW:
        if len(blob) != n:
            raise CodecError(f"raw stream has {len(blob)} bytes, expected {n}")
        return np.frombuffer(blob, np.uint8)
    if method == M_CONST:
        if len(blob) != 1:
            raise CodecError("constant stream must hold one byte")
        return np.full(n, blob[0], np.uint8)
    if method == M_RANS:
        try:
            return rans.decode(blob, n)
        except ValueError as exc:
            raise CodecError(f"rans stream: {exc}") from exc
    if method in (M_RANS32, M_RANS32E):
        out = np.empty(n, np.uint8)
        try:
            rans32.decode(np.frombuffer(blob, np.uint8), out, ext=method == M_RANS32E)
        except ValueError as exc:
            raise CodecError(f"rans32 stream: {exc}") from exc
        return out
    if method == M_ZSTD:
        return np.frombuffer(generic.zstd_decompress(blob, n), np.uint8)
    if method == M_LZ4:
        return np.frombuffer(generic.lz4_decompress(blob, n), np.uint8)
    raise CodecError(f"unknown stream method {method}")


_FAST_METHODS = (M_RAW, M_CONST, M_RANS, M_RANS32, M_RANS32E, M_RANS32C)


@njit(nogil=True, inline="always")
def _decode_simple(k, payload, meths, offs, lens, dst):
    """Decode stream k if it is raw, const or method 2 (method 5 streams are left to the caller); 0 or -1."""
    blob = payload[offs[k] : offs[k] + lens[k]]
    m = meths[k]
    if m == M_RAW:
        # explicit loops: slice assignment pulls in numba's shape-error formatting (~3 s of cold compile)
        if lens[k] != dst.size:
            return -1
        for i in range(dst.size):
            dst[i] = blob[i]
    elif m == M_CONST:
        if lens[k] != 1:
            return -1
        v = blob[0]
        for i in range(dst.size):
            dst[i] = v
    elif m == M_RANS:
        if rans.decode_into(blob, dst) != 0:
            return -1
    return 0


@njit(nogil=True, inline="always")
def _ctx_ok(k, payload, offs, lens):
    """A method-7 stream may take its context from stream 0 only if it is not stream 0 itself."""
    return lens[k] > 0 and (k > 0 or payload[offs[k]] == rans32c.SRC_SELF)


@njit(nogil=True, inline="always")
def _merge_class(cls, scratch, out):
    if cls == fields.CLASS_BF16:
        fields._merge_bf16(scratch[0], scratch[1], out.view(np.uint16))
    elif cls == fields.CLASS_F16:
        fields._merge_f16(scratch[0], scratch[1], out.view(np.uint16))
    elif cls == fields.CLASS_F32:
        fields._merge_f32(scratch[0], scratch[1], scratch[2], scratch[3], out.view(np.uint32))
    else:
        fields._merge_planes(scratch, scratch.shape[0], out)


# Two explicit variants rather than one closure built by a factory: numba's cache cannot reuse a closure that
# captures dispatchers (their pickled form differs in every process), so a factory recompiled these kernels at
# every process start (~5-10 s). Top-level functions calling the stream decoders directly load from the cache.


@njit(nogil=True)
def _fused_vec(cls, payload, meths, offs, lens, scratch, out):
    """Decode a float class's streams (methods 0, 2, 3, 6, 7) into scratch rows and merge them into out;
    0 or -(stream+1)."""
    # two single-part method-6 streams at a time: one loop over both keeps four vector chains in flight
    # (a two-part stream has its own two parts for that)
    pending = -1
    paired = np.zeros(meths.size, np.bool_)
    if meths.size > 1 and meths[0] == M_RANS32C and lens[0] > 0 and payload[offs[0]] == rans32c.SRC_SELF:
        # a method-7 exponent and the first single-part method-6 stream: one loop, four vector chains
        for k in range(1, meths.size):
            if meths[k] == M_RANS32E and lens[k] > 0 and payload[offs[k]] == 1:
                st = rans32c.decode_pair_into(payload[offs[0] : offs[0] + lens[0]], scratch[0],
                                              payload[offs[k] : offs[k] + lens[k]], scratch[k])
                if st == -1:
                    return -(k + 1)
                if st == 0:
                    paired[0] = paired[k] = True
                break
    for k in range(meths.size):
        if paired[k] or meths[k] != M_RANS32E or lens[k] < 1 or payload[offs[k]] != 1:
            continue
        if pending < 0:
            pending = k
            continue
        a = payload[offs[pending] : offs[pending] + lens[pending]]
        b = payload[offs[k] : offs[k] + lens[k]]
        if rans32.decode_ext_pair_into(a, scratch[pending], b, scratch[k]) != 0:
            return -(k + 1)
        paired[pending] = paired[k] = True
        pending = -1
    n = scratch.shape[1]
    # the usual f32 / f16 chunk: mantissa planes stored raw are merged straight from the payload (no copy)
    raw_tail = cls == fields.CLASS_F32 or cls == fields.CLASS_F16
    for k in range(1, meths.size):
        if meths[k] != M_RAW or lens[k] != n:
            raw_tail = False
    for k in range(meths.size):
        if raw_tail and k > 0:
            break
        if meths[k] == M_RANS32E:
            if not paired[k] and rans32.decode_ext_into(payload[offs[k] : offs[k] + lens[k]], scratch[k]) != 0:
                return -(k + 1)
        elif meths[k] == M_RANS32C:
            if not paired[k] and (not _ctx_ok(k, payload, offs, lens) or
                                  rans32c.decode_into(payload[offs[k] : offs[k] + lens[k]], scratch[0], scratch[k])):
                return -(k + 1)
        elif _decode_simple(k, payload, meths, offs, lens, scratch[k]) != 0:
            return -(k + 1)
    if raw_tail:
        if cls == fields.CLASS_F32:
            fields._merge_f32(scratch[0], payload[offs[1] : offs[1] + n], payload[offs[2] : offs[2] + n],
                              payload[offs[3] : offs[3] + n], out.view(np.uint32))
        else:
            fields._merge_f16(scratch[0], payload[offs[1] : offs[1] + n], out.view(np.uint16))
        return 0
    _merge_class(cls, scratch, out)
    return 0


@njit(nogil=True)
def _fused_vec5(cls, payload, meths, offs, lens, scratch, out):
    """_fused_vec for chunks with method-5 streams (written before method 6; compiled on first use only)."""
    pending = -1
    for k in range(meths.size):
        if meths[k] != M_RANS32:
            continue
        if pending < 0:
            pending = k
            continue
        a = payload[offs[pending] : offs[pending] + lens[pending]]
        b = payload[offs[k] : offs[k] + lens[k]]
        if rans32.decode2_into(a, scratch[pending], b, scratch[k]) != 0:
            return -(k + 1)
        pending = -1
    for k in range(meths.size):
        if meths[k] == M_RANS32:
            if k == pending and rans32.decode_into(payload[offs[k] : offs[k] + lens[k]], scratch[k]) != 0:
                return -(k + 1)
        elif meths[k] == M_RANS32E:
            if rans32.decode_ext_into(payload[offs[k] : offs[k] + lens[k]], scratch[k]) != 0:
                return -(k + 1)
        elif meths[k] == M_RANS32C:
            if not _ctx_ok(k, payload, offs, lens) or \
                    rans32c.decode_into(payload[offs[k] : offs[k] + lens[k]], scratch[0], scratch[k]) != 0:
                return -(k + 1)
        elif _decode_simple(k, payload, meths, offs, lens, scratch[k]) != 0:
            return -(k + 1)
    _merge_class(cls, scratch, out)
    return 0


@njit(nogil=True)
def _fused_scalar(cls, payload, meths, offs, lens, scratch, out):
    """_fused_vec without the vector decoder (used when its IR cannot be compiled on this machine)."""
    for k in range(meths.size):
        if meths[k] == M_RANS32:
            if rans32.decode_into_scalar(payload[offs[k] : offs[k] + lens[k]], scratch[k]) != 0:
                return -(k + 1)
        elif meths[k] == M_RANS32E:
            if rans32.decode_ext_into_scalar(payload[offs[k] : offs[k] + lens[k]], scratch[k]) != 0:
                return -(k + 1)
        elif meths[k] == M_RANS32C:
            if not _ctx_ok(k, payload, offs, lens) or \
                    rans32c.decode_into_scalar(payload[offs[k] : offs[k] + lens[k]], scratch[0], scratch[k]) != 0:
                return -(k + 1)
        elif _decode_simple(k, payload, meths, offs, lens, scratch[k]) != 0:
            return -(k + 1)
    _merge_class(cls, scratch, out)
    return 0


_local = threading.local()


def _scratch(rows: int, n: int) -> np.ndarray:
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.size < rows * n:
        buf = _local.scratch = np.empty(max(rows * n, 1 << 19), np.uint8)
    return buf[: rows * n].reshape(rows, n)


def _decode_fast(cls: int, payload: np.ndarray, meths, offs, lens, out: np.ndarray) -> None:
    width, nstreams = fields.CLASSES[cls]
    n = out.size // width
    meths, offs, lens = (np.asarray(a, np.int64) for a in (meths, offs, lens))
    if not rans32.vector_ok():
        fused = _fused_scalar
    else:
        fused = _fused_vec5 if (meths == M_RANS32).any() else _fused_vec
    st = fused(cls, payload, meths, offs, lens, _scratch(nstreams, n), out)
    if st:
        raise CodecError(f"tensor stream {-st - 1} of class {cls} is malformed")


@njit(nogil=True, inline="always")
def _varint_at(buf, pos):
    """(value, next position), or (-1, pos) when truncated or longer than 5 bytes."""
    v = np.int64(0)
    shift = 0
    while True:
        if pos >= buf.size or shift > 28:
            return np.int64(-1), pos
        b = np.int64(buf[pos])
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos


@njit(nogil=True)
def _single_class_plan(params, raw_len, payload_len, plan):
    """Parse params of the common chunk, one float class covering it, all streams of the fused methods, into
    plan[0:3, :streams] (methods, payload offsets, lengths); return the class id, or -1 for anything else
    (other chunks, malformed params: the Python parser handles those and names the error)."""
    n = params.size
    if n < 2 or params[0] != FORMAT_VERSION:
        return -1
    nreg, pos = _varint_at(params, 1)
    if nreg < 1:
        return -1
    cls = -1
    total = 0
    for _ in range(nreg):
        length, pos = _varint_at(params, pos)
        if length < 0 or pos >= n:
            return -1
        c = np.int64(params[pos])
        pos += 1
        if cls < 0:
            cls = c
        elif c != cls:
            return -1
        total += length
    if total != raw_len:
        return -1
    if cls == fields.CLASS_BF16 or cls == fields.CLASS_F16:
        width = 2
    elif cls == fields.CLASS_F32:
        width = 4
    elif cls == fields.CLASS_F64:
        width = 8
    else:
        return -1
    if raw_len % width:
        return -1
    ppos = 0
    for k in range(width):  # float classes have one stream per byte of the element
        if pos >= n:
            return -1
        m = np.int64(params[pos])
        if m != M_RAW and m != M_CONST and m != M_RANS and m != M_RANS32 and m != M_RANS32E and m != M_RANS32C:
            return -1
        blen, pos = _varint_at(params, pos + 1)
        if blen < 0:
            return -1
        plan[0, k] = m
        plan[1, k] = ppos
        plan[2, k] = blen
        ppos += blen
    if ppos != payload_len or pos != n:
        return -1
    return cls


def decode(params: bytes, payload: bytes | memoryview, raw_len: int) -> bytes:
    if params and params[0] == blocks.VERSION:
        return blocks.decode(params, payload, raw_len)
    return decode_into(params, payload, raw_len, np.empty(raw_len, np.uint8)).tobytes()


def decode_into(params: bytes, payload: bytes | memoryview, raw_len: int, out: np.ndarray) -> np.ndarray:
    """Decode a version-1 chunk into out (uint8, raw_len bytes); return out."""
    # the common chunk (one float class) without the Python parser: ~10 us less per 256 KiB chunk
    plan = np.empty((3, 8), np.int64)
    cls = _single_class_plan(np.frombuffer(params, np.uint8), raw_len, len(payload), plan) if params else -1
    if cls > 0:
        ns = fields.CLASSES[cls][1]
        _decode_fast(cls, np.frombuffer(payload, np.uint8), plan[0, :ns], plan[1, :ns], plan[2, :ns], out)
        return out
    if not params or params[0] != FORMAT_VERSION:
        raise CodecError("tensor params: unknown format version")
    nreg, pos = _get_varint(params, 1)
    if nreg > raw_len + 1:
        raise CodecError("tensor params: more regions than bytes")
    regions = []
    class_bytes: dict[int, int] = {}
    for _ in range(nreg):
        length, pos = _get_varint(params, pos)
        if pos >= len(params):
            raise CodecError("tensor params: truncated region list")
        cls = params[pos]
        pos += 1
        if cls not in fields.CLASSES or length % fields.CLASSES[cls][0]:
            raise CodecError(f"tensor params: bad region class {cls} / length {length}")
        regions.append((length, cls))
        class_bytes[cls] = class_bytes.get(cls, 0) + length
    if sum(class_bytes.values()) != raw_len:
        raise CodecError("tensor params: regions do not cover the chunk")
    payload = memoryview(payload)
    ppos = 0
    plan = []
    for cls in sorted(class_bytes):
        width, nstreams = fields.CLASSES[cls]
        meths, offs, lens = [], [], []
        for _ in range(nstreams):
            if pos >= len(params):
                raise CodecError("tensor params: truncated stream list")
            meths.append(params[pos])
            blen, pos = _get_varint(params, pos + 1)
            if ppos + blen > len(payload):
                raise CodecError("tensor payload shorter than its streams")
            offs.append(ppos)
            lens.append(blen)
            ppos += blen
        plan.append((cls, meths, offs, lens))
    if ppos != len(payload) or pos != len(params):
        raise CodecError("tensor payload or params have trailing bytes")
    arr = None
    if (len(plan) == 1 and plan[0][0] != fields.CLASS_GENERIC and plan[0][0] not in zeros.BASE_CLASS
            and all(m in _FAST_METHODS for m in plan[0][1])):
        # one float class covering the chunk: decode and merge straight into the output
        _decode_fast(plan[0][0], np.frombuffer(payload, np.uint8), *plan[0][1:], out)
        return out
    if len(plan) == 1 and plan[0][0] in zeros.BASE_CLASS:
        # one zero-masked class covering the chunk: expand straight into the output
        return _decode_zero_class(plan[0][0], payload, *plan[0][1:], raw_len, out)
    decoded: dict[int, np.ndarray] = {}
    for cls, meths, offs, lens in plan:
        width, _ = fields.CLASSES[cls]
        if cls in zeros.BASE_CLASS:
            decoded[cls] = _decode_zero_class(cls, payload, meths, offs, lens, class_bytes[cls])
            continue
        if cls != fields.CLASS_GENERIC and all(m in _FAST_METHODS for m in meths):
            if arr is None:
                arr = np.frombuffer(payload, np.uint8)
            decoded[cls] = np.empty(class_bytes[cls], np.uint8)
            _decode_fast(cls, arr, meths, offs, lens, decoded[cls])
            continue
        n = class_bytes[cls] // width
        streams = [_decode_stream(m, payload[o : o + ln], n) for m, o, ln in zip(meths, offs, lens)]
        decoded[cls] = fields.merge(cls, streams, class_bytes[cls])
    if len(decoded) == 1:
        out[:] = decoded.popitem()[1]
        return out
    taken = dict.fromkeys(decoded, 0)
    opos = 0
    for length, cls in regions:
        out[opos : opos + length] = decoded[cls][taken[cls] : taken[cls] + length]
        taken[cls] += length
        opos += length
    return out
