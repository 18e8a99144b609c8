"""Decoding of the tensor codec (codecs/tensor.py): params parsing, per-stream decoding, merging classes back."""
# The compiled fast path (one-class params, fused per-class decode-and-merge kernels) is in tensor_fast.py.
from __future__ import annotations

import ctypes
import logging

import numpy as np

from . import blocks, chunk_fast, fields, generic, joint, joint_loop, rans, rans32, tensor_fast, zeros
from .api import CodecError
from .tensor_fast import _FAST_METHODS, _decode_fast, _single_class_plan
from .tensor_format import (FORMAT_VERSION, M_CONST, M_LZ4, M_RANS, M_RANS32, M_RANS32C, M_RANS32E, M_RAW, M_ZSTD,
                            _get_varint)

log = logging.getLogger(__name__)


def _decode_runs(method: int, blob: memoryview, elements: int) -> bytes:
    """The run list of a zero-masked class of this many elements (its length checked before it is decoded)."""
    length, pos = _get_varint(blob, 0)
    if method not in (M_RAW, M_ZSTD, M_LZ4):
        raise CodecError(f"zero runs: unknown method {method}")
    if length > zeros.max_runs_bytes(elements):
        # zstd and lz4 allocate the length they are given: a damaged L must not size a buffer
        raise CodecError(f"zero runs: a list of {length} bytes for {elements} elements")
    return _decode_stream(method, blob[pos:], length).tobytes()


def _decode_zero_class(cls: int, payload: memoryview, meths, offs, lens, nbytes: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """A zero-masked class: the run list, the base class's streams over the nonzero elements, then expand (into
    out when given)."""
    base = zeros.BASE_CLASS[cls]
    width = fields.CLASSES[base][0]
    elements = nbytes // width
    runs, k, nonzero = zeros.parse_runs(_decode_runs(meths[0], payload[offs[0] : offs[0] + lens[0]], elements), elements)
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


def _decode_joint_class(cls: int, payload: memoryview, meths, offs, lens, out: np.ndarray) -> np.ndarray:
    """Class 8 or 9 (codecs/joint.py) into out: the base exponent, the symbols (both parts of a two-part method-6
    stream in the fused loop, which writes most elements), then the remaining elements from the packed bits (and
    class 9's raw low halves). For the chunks the compiled paths do not take (several float classes), and hosts
    without the vector loops."""
    if rans32.vector_ok():
        # the compiled decoder (_fused_vec's, which every process has loaded already: a kernel loaded from numba's
        # cache on first use costs ~10 ms); on an error the steps below find it again and name it
        try:
            _decode_fast(cls, np.frombuffer(payload, np.uint8), meths, offs, lens, out)
            return out
        except CodecError:
            pass
    wide = cls == fields.CLASS_F32J
    n = out.size // (4 if wide else 2)
    if meths[0] != M_RAW or lens[0] != 1:
        raise CodecError("joint class: stream 0 is not one raw byte")
    base = payload[offs[0]]
    if not 1 <= base <= 255 - joint.WINDOW:
        raise CodecError(f"joint class: base exponent {base} out of range")
    if meths[2] != M_RAW or lens[2] != joint.packed_bytes(n):
        raise CodecError(f"joint class: low bits stream of {lens[2]} bytes (method {meths[2]}) for {n} elements")
    if wide and (meths[3] != M_RAW or lens[3] != 2 * n):
        raise CodecError(f"joint class: low halves stream of {lens[3]} bytes (method {meths[3]}) for {n} elements")
    arr = np.frombuffer(payload, np.uint8)
    packed = arr[offs[2] : offs[2] + lens[2]]
    sym = tensor_fast.scratch_for(n)[:n]
    blob = arr[offs[1] : offs[1] + lens[1]]
    done = 0
    u = np.empty(n, np.uint16) if wide else out.view(np.uint16)
    if meths[1] == M_RANS32C:
        raise CodecError("joint class: a method-7 symbol stream")
    if meths[1] == M_RANS32E and lens[1] > 0 and blob[0] == 2 and rans32.vector_ok() and not wide:
        done = joint_loop.decode_fused(blob, sym, packed, base, u)
        if done < 0:
            raise CodecError("joint class: symbol stream is malformed")
    else:
        sym[:] = _decode_stream(meths[1], payload[offs[1] : offs[1] + lens[1]], n)
    joint.compose(sym, packed, base, u, done)
    if wide:
        joint.merge_wide(u, arr[offs[3] : offs[3] + lens[3]], out.view(np.uint32), 0, n)
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


def _bytes_api():
    """CPython's PyBytes_FromStringAndSize(NULL, n) and PyBytes_AsString, or None where ctypes cannot reach them."""
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        addr = ctypes.pythonapi.PyBytes_AsString
    except (AttributeError, OSError):  # not CPython
        return None
    new.restype, new.argtypes = ctypes.py_object, (ctypes.c_char_p, ctypes.c_ssize_t)
    addr.restype, addr.argtypes = ctypes.c_void_p, (ctypes.py_object,)
    return new, addr


_BYTES_API = _bytes_api()


def new_bytes(raw_len: int) -> tuple[bytes, np.ndarray]:
    """A new bytes object of raw_len bytes and a writable array over its memory, to decode into.

    Why: decoding into an array and copying it out with tobytes() cost 30-60 us per MiB (the copy, the page faults
    of a fresh array): ~15% of decoding a bf16 chunk. This is what C extensions do (PyBytes_FromStringAndSize with
    NULL, then fill the buffer before anyone else sees the object). The array must not outlive the decode: it holds
    no reference to the bytes object, so callers keep the bytes and drop the array."""
    if _BYTES_API is None or raw_len < 2:  # 0 and 1 byte objects may be shared singletons
        arr = np.empty(raw_len, np.uint8)
        return b"", arr
    new, addr = _BYTES_API
    result = new(None, raw_len)
    return result, np.ctypeslib.as_array((ctypes.c_uint8 * raw_len).from_address(addr(result)))


def finish_bytes(result: bytes, out: np.ndarray) -> bytes:
    """The bytes of a decode into new_bytes()'s pair."""
    return result if len(result) == out.size else out.tobytes()


def decode(params: bytes, payload: bytes | memoryview, raw_len: int) -> bytes:
    if params and params[0] == blocks.VERSION:
        return blocks.decode(params, payload, raw_len)
    result, out = new_bytes(raw_len)
    decode_into(params, payload, raw_len, out)
    return finish_bytes(result, out)


def decode_into(params: bytes, payload: bytes | memoryview, raw_len: int, out: np.ndarray) -> np.ndarray:
    """Decode a version-1 chunk into out (uint8, raw_len bytes); return out."""
    # the common chunk (one float class) without the Python parser: ~10 us less per 256 KiB chunk
    plan = np.empty((3, 8), np.int64)
    cls = _single_class_plan(np.frombuffer(params, np.uint8), raw_len, len(payload), plan) if params else -1
    if cls > 0 and (cls not in fields.JOINT_CLASSES or rans32.vector_ok()):  # (8, 9: no scalar fused decoder)
        ns = fields.CLASSES[cls][1]
        _decode_fast(cls, np.frombuffer(payload, np.uint8), plan[0, :ns], plan[1, :ns], plan[2, :ns], out)
        return out
    # (the thread's decode scratch grows to twice the chunk size for it: 2 MiB per decoding thread at 1 MiB chunks)
    if params and rans32.vector_ok() and not chunk_fast.decode_mixed(
            np.frombuffer(params, np.uint8), np.frombuffer(payload, np.uint8), raw_len, out,
            tensor_fast.scratch_for(2 * raw_len)):
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
    if len(plan) == 1 and plan[0][0] in fields.JOINT_CLASSES:
        return _decode_joint_class(plan[0][0], payload, *plan[0][1:], out)
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
        if cls in fields.JOINT_CLASSES:
            decoded[cls] = _decode_joint_class(cls, payload, meths, offs, lens, np.empty(class_bytes[cls], np.uint8))
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
