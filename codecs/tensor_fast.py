"""The tensor decoder's compiled fast path: the one-class params parser and the fused decode-and-merge kernels."""
# tensor_decode.py calls in here first and falls back to its Python parser and per-stream decoders for the rest.
# The inline="always" helpers sit beside the kernels that inline them.
from __future__ import annotations

import logging
import threading

import numpy as np

from ._jit import njit
from . import fields, joint_loop, rans, rans32, rans32c, rans32e
from .api import CodecError
from .tensor_format import FORMAT_VERSION, M_CONST, M_RANS, M_RANS32, M_RANS32C, M_RANS32E, M_RAW

log = logging.getLogger(__name__)

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
    return lens[k] > 0 and (k > 0 or payload[offs[k]] != rans32c.SRC_STREAM0)


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


@njit(nogil=True)
def _constant_class(cls, payload, meths, offs, lens, scratch, out):
    """Fill out with one element when every stream of the class is constant (all-zero optimizer state: a fill is
    ~4x faster than filling each stream and merging them); False where a stream is not constant."""
    width = meths.size
    for k in range(width):
        if meths[k] != M_CONST or lens[k] != 1:
            return False
    n = out.size // width
    if n == 0:
        return True
    for k in range(width):
        scratch[k, 0] = payload[offs[k]]
    _merge_class(cls, scratch[:, :1], out[:width])
    if width == 2:
        w2 = out.view(np.uint16)
        v2 = w2[0]
        for i in range(n):
            w2[i] = v2
    elif width == 4:
        w4 = out.view(np.uint32)
        v4 = w4[0]
        for i in range(n):
            w4[i] = v4
    else:
        for i in range(width, out.size):
            out[i] = out[i - width]
    return True


@njit(nogil=True, inline="always")
def _single_part(k, payload, meths, offs, lens, method):
    return meths[k] == method and lens[k] > 0 and payload[offs[k]] == (1 if method == M_RANS32E else rans32c.SRC_SELF)


@njit(nogil=True, inline="always")
def _parts(k, payload, meths, offs, lens):
    """How many parts method-6 stream k has (its first byte), or 0 if it is not a method-6 stream."""
    return payload[offs[k]] if meths[k] == M_RANS32E and lens[k] > 0 else 0


@njit(nogil=True, inline="always")
def _merged_in_loop(cls, payload, meths, offs, lens, scratch, out):
    """The usual bf16, f32 and f16 chunks: the first two streams (f16: the two parts of the first; bf16, f32: both
    streams' two parts where they have two) decode in one loop that writes most elements itself (the last ones
    are merged here); False where the chunk is not of that shape or a stream is malformed (the caller then
    decodes stream by stream and names the stream)."""
    n = scratch.shape[1]
    if n == 0:
        return False
    if cls == fields.CLASS_F16:
        # high bytes in two parts, low bytes raw (the f16 chunks of 1 MiB)
        if (meths[0] != M_RANS32E or lens[0] < 1 or payload[offs[0]] != 2 or meths[1] != M_RAW
                or lens[1] != n):
            return False
        lo = payload[offs[1] : offs[1] + n]
        u = out.view(np.uint16)
        done = rans32e.decode_ext_f16(payload[offs[0] : offs[0] + lens[0]], scratch[0], lo, u)
        if done < 0:
            return False
        h = (n + 1) >> 1
        fields._merge_f16(scratch[0][done:h], lo[done:h], u[done:h])
        fields._merge_f16(scratch[0][h + done :], lo[h + done :], u[h + done :])
        return True
    if cls == fields.CLASS_BF16 and _parts(0, payload, meths, offs, lens) == 2 \
            and _parts(1, payload, meths, offs, lens) == 2:
        # both streams in two parts (bf16 and f32 chunks written since 2026-12-05): eight chains in one loop
        u = out.view(np.uint16)
        done = rans32e.decode_ext_quad_bf16(payload[offs[0] : offs[0] + lens[0]], scratch[0],
                                            payload[offs[1] : offs[1] + lens[1]], scratch[1], u)
        if done < 0:
            return False
        h = (n + 1) >> 1
        fields._merge_bf16(scratch[0][done:h], scratch[1][done:h], u[done:h])
        fields._merge_bf16(scratch[0][h + done :], scratch[1][h + done :], u[h + done :])
        return True
    ctx = _single_part(0, payload, meths, offs, lens, M_RANS32C)
    if cls == fields.CLASS_F32 and (ctx or _parts(0, payload, meths, offs, lens) == 1) and \
            _parts(1, payload, meths, offs, lens) == 1 and _parts(2, payload, meths, offs, lens) == 1 and \
            _parts(3, payload, meths, offs, lens) == 1:
        # every stream coded, one part each (weights whose mantissa bytes carry a little less than 8 bits; the
        # exponents method 6, or method 7 in checkpoints): eight chains in one loop
        u = out.view(np.uint32)
        s0, s1 = payload[offs[0] : offs[0] + lens[0]], payload[offs[1] : offs[1] + lens[1]]
        s2, s3 = payload[offs[2] : offs[2] + lens[2]], payload[offs[3] : offs[3] + lens[3]]
        if ctx:
            done = rans32c.decode_four_f32(s0, scratch[0], s1, scratch[1], s2, scratch[2], s3, scratch[3], u)
        else:
            done = rans32e.decode_ext_four_f32(s0, scratch[0], s1, scratch[1], s2, scratch[2], s3, scratch[3], u)
        if done < 0:
            return False
        fields._merge_f32(scratch[0][done:], scratch[1][done:], scratch[2][done:], scratch[3][done:], u[done:])
        return True
    if cls == fields.CLASS_F32 and _parts(1, payload, meths, offs, lens) == 2 and meths[2] == M_RAW \
            and lens[2] == n and meths[3] == M_RAW and lens[3] == n:
        # the exponents in two parts too: method 6 (weights), or method 7 of source 2 (checkpoint chunks written
        # since 2026-12-05); eight chains in one loop
        quad6 = _parts(0, payload, meths, offs, lens) == 2
        if quad6 or (meths[0] == M_RANS32C and lens[0] > 0 and payload[offs[0]] == rans32c.SRC_SELF2):
            m1 = payload[offs[2] : offs[2] + n]
            m0 = payload[offs[3] : offs[3] + n]
            u = out.view(np.uint32)
            s0 = payload[offs[0] : offs[0] + lens[0]]
            s1 = payload[offs[1] : offs[1] + lens[1]]
            if quad6:
                done = rans32e.decode_ext_quad_f32(s0, scratch[0], s1, scratch[1], m1, m0, u)
            else:
                done = rans32c.decode_quad_f32(s0, scratch[0], s1, scratch[1], m1, m0, u)
            if done < 0:
                return False
            h = (n + 1) >> 1
            fields._merge_f32(scratch[0][done:h], scratch[1][done:h], m1[done:h], m0[done:h], u[done:h])
            fields._merge_f32(scratch[0][h + done :], scratch[1][h + done :], m1[h + done :], m0[h + done :],
                              u[h + done :])
            return True
    if not _single_part(1, payload, meths, offs, lens, M_RANS32E):
        return False
    a = payload[offs[0] : offs[0] + lens[0]]
    b = payload[offs[1] : offs[1] + lens[1]]
    if cls == fields.CLASS_BF16:
        if not _single_part(0, payload, meths, offs, lens, M_RANS32E):
            return False
        u = out.view(np.uint16)
        done = rans32e.decode_ext_pair_bf16(a, scratch[0], b, scratch[1], u)
        if done < 0:
            return False
        fields._merge_bf16(scratch[0][done:], scratch[1][done:], u[done:])
        return True
    if cls != fields.CLASS_F32 or meths[2] != M_RAW or lens[2] != n or meths[3] != M_RAW or lens[3] != n:
        return False
    m1 = payload[offs[2] : offs[2] + n]
    m0 = payload[offs[3] : offs[3] + n]
    u = out.view(np.uint32)
    if _single_part(0, payload, meths, offs, lens, M_RANS32E):
        done = rans32e.decode_ext_pair_f32(a, scratch[0], b, scratch[1], m1, m0, u)
    elif _single_part(0, payload, meths, offs, lens, M_RANS32C):
        done = rans32c.decode_pair_into(a, scratch[0], b, scratch[1], m1, m0, u)
    else:
        return False
    if done < 0:
        return False
    fields._merge_f32(scratch[0][done:], scratch[1][done:], m1[done:], m0[done:], u[done:])
    return True


# Two explicit variants rather than one closure built by a factory: numba's cache cannot reuse a closure that
# captures dispatchers (their pickled form differs in every process), so a factory recompiled these kernels at
# every process start (~5-10 s). Top-level functions calling the stream decoders directly load from the cache.


@njit(nogil=True)
def _fused_vec(cls, payload, meths, offs, lens, scratch, out):
    """Decode a float class's streams (methods 0, 2, 3, 6, 7) into scratch rows and merge them into out (class 8:
    joint_loop.decode_class, which takes method 5 too, through scratch row 0; class 9: decode_class32 through all
    four rows); 0 or -(stream+1)."""
    # two single-part method-6 streams at a time: one loop over both keeps four vector chains in flight
    # (a two-part stream has its own two parts for that)
    if cls == fields.CLASS_BF16J:  # its own decoder: one symbol stream and packed bits (codecs/joint.py)
        return joint_loop.decode_class(payload, meths, offs, lens, scratch[0], out)
    if cls == fields.CLASS_F32J:
        return joint_loop.decode_class32(payload, meths, offs, lens, scratch, out)
    if _merged_in_loop(cls, payload, meths, offs, lens, scratch, out):
        return 0
    if _constant_class(cls, payload, meths, offs, lens, scratch, out):
        return 0
    pending = -1
    paired = np.zeros(meths.size, np.bool_)
    if meths.size > 1 and meths[0] == M_RANS32C and lens[0] > 0 and payload[offs[0]] == rans32c.SRC_SELF:
        # a method-7 exponent and the first single-part method-6 stream: one loop, four vector chains
        for k in range(1, meths.size):
            if meths[k] == M_RANS32E and lens[k] > 0 and payload[offs[k]] == 1:
                st = rans32c.decode_pair_into(payload[offs[0] : offs[0] + lens[0]], scratch[0],
                                              payload[offs[k] : offs[k] + lens[k]], scratch[k], out[:0], out[:0],
                                              out[:0].view(np.uint32))
                if st == -1:
                    return -(k + 1)
                if st >= 0:
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
    # numpy calls only where needed: even np.asarray of an int64 array, or a comparison, before the kernel made
    # the kernel ~10-25 us slower per 1 MiB chunk (measured over and over in one process, 2026-12-06; not
    # understood, perhaps the CPU's vector power state). decode_into passes int64 rows of its plan.
    rows = type(meths) is type(offs) is type(lens) is np.ndarray
    if not (rows and meths.dtype == offs.dtype == lens.dtype == np.int64):
        meths, offs, lens = (np.asarray(a, np.int64) for a in (meths, offs, lens))
    if not rans32.vector_ok():
        fused = _fused_scalar
    else:  # (classes 8 and 9 decode method-5 symbols in _fused_vec)
        fused = _fused_vec5 if M_RANS32 in meths.tolist() and cls not in fields.JOINT_CLASSES else _fused_vec
    st = fused(cls, payload, meths, offs, lens, _scratch(nstreams, n), out)
    if st:
        raise CodecError(f"tensor stream {-st - 1} of class {cls} is malformed")


@njit(nogil=True)
def _single_class_plan(params, raw_len, payload_len, plan):
    """Parse params of the common chunk, one float class covering it, all streams of the fused methods, into
    plan[0:3, :streams] (methods, payload offsets, lengths); return the class id, or -1 for anything else
    (other chunks, malformed params: the Python parser handles those and names the error)."""
    n = params.size
    if n < 2 or params[0] != FORMAT_VERSION:
        return -1
    nreg, pos = rans32e.varint_at(params, 1)
    if nreg < 1:
        return -1
    cls = -1
    total = 0
    for _ in range(nreg):
        length, pos = rans32e.varint_at(params, pos)
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
    width, ns = class_shape(cls)
    if width == 0 or raw_len % width:
        return -1
    pos, total = stream_plan(params, pos, ns, plan)
    if pos != n or total != payload_len:
        return -1
    return cls


@njit(nogil=True, inline="always")
def class_shape(cls):
    """(element width, streams) of a float class the compiled decoders take (classes 1-4, 8 and 9), (0, 0) else."""
    if cls == fields.CLASS_BF16 or cls == fields.CLASS_F16:
        return 2, 2
    if cls == fields.CLASS_F32:
        return 4, 4
    if cls == fields.CLASS_F64:
        return 8, 8
    if cls == fields.CLASS_BF16J:
        return 2, 3
    if cls == fields.CLASS_F32J:
        return 4, 4
    return 0, 0


@njit(nogil=True, inline="always")
def stream_plan(params, pos, width, plan):
    """The width streams of a float class (class_shape's count) from params[pos] into plan[0:3, :width]:
    methods, payload offsets from 0, lengths; (next position, their total bytes), or (-1, 0) when truncated or of
    a method the fused decoders do not take."""
    total = 0
    for k in range(width):
        if pos >= params.size:
            return -1, 0
        m = np.int64(params[pos])
        if m != M_RAW and m != M_CONST and m != M_RANS and m != M_RANS32 and m != M_RANS32E and m != M_RANS32C:
            return -1, 0
        blen, pos = rans32e.varint_at(params, pos + 1)
        if blen < 0:
            return -1, 0
        plan[0, k] = m
        plan[1, k] = total
        plan[2, k] = blen
        total += blen
    return pos, total


def scratch_for(nbytes: int) -> np.ndarray:
    """This thread's decode scratch as one flat array of at least nbytes (decode_blocks reshapes it per block)."""
    return _scratch(1, nbytes).reshape(-1)
