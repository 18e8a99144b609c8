"""Decoding of the tensor codec (codecs/tensor.py): params parsing, fused per-class stream decoding, merging."""
from __future__ import annotations

import logging
import threading

import numpy as np

from ._jit import njit
from . import blocks, fields, generic, rans, rans32, rans32c, rans32e, zeros
from .api import CodecError
from .tensor_format import (FORMAT_VERSION, M_CONST, M_LZ4, M_RANS, M_RANS32, M_RANS32C, M_RANS32E, M_RAW,
                            M_ZSTD, _get_varint)

log = logging.getLogger(__name__)


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
        if rans32e.decode_ext_pair_into(a, scratch[pending], b, scratch[k]) != 0:
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
            if not paired[k] and rans32e.decode_ext_into(payload[offs[k] : offs[k] + lens[k]], scratch[k]) != 0:
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
            if rans32e.decode_ext_into(payload[offs[k] : offs[k] + lens[k]], scratch[k]) != 0:
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
            if rans32e.decode_ext_into_scalar(payload[offs[k] : offs[k] + lens[k]], scratch[k]) != 0:
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
