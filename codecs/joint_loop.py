"""The decoding of the joint classes 8 and 9 (codecs/joint.py): both parts of the symbol stream in one vector loop
(four chains) that writes the elements from each symbol, its packed low bits (and in class 9 its raw low half)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import njit
from . import rans, rans32, rans32e
from .joint import BLOCK, BLOCK_BYTES, WINDOW, compose, halves, merge_wide
from .rans32 import LANES, SLOTS
from .rans32_loop import _bcast, _emit_loop, _i32, _i64, _splat, _v8, _v16, _vt
from .rans32e import _prepare_ext, finish_part
from .tensor_format import M_CONST, M_RANS, M_RANS32, M_RANS32E, M_RAW


def _c64(v):
    return ir.Constant(_i64, v)


class _JointMerge:
    """The loop's merge: per part (half of the elements) a uint16 output and its packed low bits; one extra state
    value, the base exponent minus one."""
    targets = 4
    extra_state = 1

    @staticmethod
    def tops(builder, targets, i, syms, extras, per_part):
        """Per part, the 16 elements' top halves (bf16 fields) as i32 lanes from the symbols and the packed low
        bits (targets[per_part * part + 1])."""
        # (symbol + off) << 5 is the element's exponent and mantissa bits 6..5: off = 4 * (base - 1) for slots
        # 1..62, 0 for slot 0 (exponent 0), 4 * 192 for slot 63 (exponent 255)
        off = _bcast(builder, builder.trunc(builder.shl(extras[0], _c64(2)), _i32))
        # i is a multiple of 16 below the half's whole blocks: its 16 elements are the q-th 16 of block b
        b = builder.lshr(i, _c64(6))
        q = builder.and_(builder.lshr(i, _c64(4)), _c64(3))
        block = builder.mul(b, _c64(BLOCK_BYTES))
        nib_at = builder.add(block, builder.shl(builder.and_(q, _c64(1)), _c64(4)))
        nib_shift = _bcast(builder, builder.trunc(builder.shl(builder.lshr(q, _c64(1)), _c64(2)), _i32))
        two_at = builder.add(block, _c64(32))
        two_shift = _bcast(builder, builder.trunc(builder.shl(q, _c64(1)), _i32))
        out = []
        for part, sym in enumerate(syms):
            packed = targets[per_part * part + 1]

            def load16(at):
                return builder.zext(builder.load(builder.bitcast(builder.gep(packed, [at]), _v8.as_pointer()),
                                                 align=1), _vt)

            nib = builder.and_(builder.lshr(load16(nib_at), nib_shift), _splat(15))
            two = builder.and_(builder.lshr(load16(two_at), two_shift), _splat(3))
            add = builder.select(builder.icmp_unsigned("<", sym, _splat(4)), _splat(0), off)
            add = builder.select(builder.icmp_unsigned(">=", sym, _splat(252)), _splat(4 * 192), add)
            u = builder.shl(builder.add(sym, add), _splat(5))
            # two = sign << 1 | mantissa bit 4: (two << 4 | nib) holds bits 5..0 of the remainder
            r = builder.or_(builder.shl(two, _splat(4)), nib)
            out.append(builder.or_(u, builder.or_(builder.and_(r, _splat(0x1F)),
                                                  builder.shl(builder.and_(r, _splat(0x20)), _splat(10)))))
        return out

    @staticmethod
    def store(builder, targets, i, syms, extras):
        for part, u in enumerate(_JointMerge.tops(builder, targets, i, syms, extras, 2)):
            ptr = builder.bitcast(builder.gep(targets[2 * part], [i]), _v16.as_pointer())
            builder.store(builder.trunc(u, _v16), ptr, align=1)


class _JointMerge32:
    """_JointMerge for class 9: per part a uint32 output, its packed low bits and its raw mantissa bits 15..0
    (bytes, two per element), each element the top half _JointMerge writes above those 16 bits."""
    targets = 6
    extra_state = 1

    @staticmethod
    def store(builder, targets, i, syms, extras):
        for part, u in enumerate(_JointMerge.tops(builder, targets, i, syms, extras, 3)):
            low_at = builder.gep(targets[3 * part + 2], [builder.shl(i, _c64(1))])
            low = builder.zext(builder.load(builder.bitcast(low_at, _v16.as_pointer()), align=1), _vt)
            ptr = builder.bitcast(builder.gep(targets[3 * part], [i]), _vt.as_pointer())
            builder.store(builder.or_(builder.shl(u, _splat(16)), low), ptr, align=1)


@intrinsic
def loop2_joint(typingctx, lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16_a, packed_a, u16_b,
                packed_b, state):
    """The two parts of a class-8 symbol stream (they share its table: callers pass it twice), writing each
    half's elements u16_a / u16_b from its packed low bits (state: i, n, the parts' word positions, base - 1)."""
    sig = types.int64(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16_a, packed_a, u16_b, packed_b,
                      state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False, False), _JointMerge)


@intrinsic
def loop2_joint32(typingctx, lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u32_a, packed_a, low_a,
                  u32_b, packed_b, low_b, state):
    """loop2_joint for class 9: each half's elements u32_a / u32_b from its packed low bits and its raw mantissa
    bits 15..0 (low_a / low_b: two bytes per element)."""
    sig = types.int64(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u32_a, packed_a, low_a, u32_b,
                      packed_b, low_b, state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False, False), _JointMerge32)


@njit(nogil=True, boundscheck=False, inline="always")
def _fused_start(buf, lut, n, packed_size, base):
    """The two parts of a method-6 symbol stream for the fused loop: (words and states of each, the symbols each
    part has beyond its rounds' common end, the loop's state: i, end of its rounds, word positions, base - 1);
    the first count is -1 where the stream or the packed bits have not that shape."""
    parts, k_a, k_b, words_a, xs_a, words_b, xs_b, st = _prepare_ext(buf, lut)
    h, pa, pn = halves(n)
    m_a = h - LANES * k_a
    m_b = (n - h) - LANES * k_b
    if st or parts != 2 or packed_size != pn or m_b < 0:
        m_a = -1
    state = np.empty(5, np.int64)
    # the loop writes whole blocks only: the elements of each half's tail have their own packed layout
    state[0], state[1] = 0, min(m_a, m_b, BLOCK * ((n - h) // BLOCK))  # the second half is not the longer
    state[2], state[3], state[4] = 2 * LANES, 2 * LANES, base - 1
    return words_a, xs_a, words_b, xs_b, m_a, m_b, state


@njit(nogil=True, boundscheck=False)
def decode_fused(buf, sym, packed, base, u16):
    """A two-part method-6 symbol stream of n = sym.size elements whose low bits packed (joint.packed_bytes(n)
    bytes) are given: the rounds both parts decode together write the elements u16; returns how many leading
    elements of each half were (the other symbols are in sym, for joint.compose), or -1 (also for one-part
    streams)."""
    lut = np.empty(SLOTS, np.uint32)
    n = sym.size
    h = (n + 1) >> 1
    words_a, xs_a, words_b, xs_b, m_a, m_b, state = _fused_start(buf, lut, n, packed.size, base)
    if m_a < 0 or u16.size != n:
        return -1
    pa = halves(n)[1]
    merged = loop2_joint(lut, words_a, xs_a, sym[:h], lut, words_b, xs_b, sym[h:], u16[:h], packed[:pa], u16[h:],
                         packed[pa:], state)
    if finish_part(lut, words_a, xs_a, sym[:h], m_a, merged, state[2]) or \
            finish_part(lut, words_b, xs_b, sym[h:], m_b, merged, state[3]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False)
def decode_fused32(buf, sym, packed, low, base, u32):
    """decode_fused for class 9: the elements u32 from the symbols, the packed bits and the raw mantissa bits
    15..0 (low, 2n bytes)."""
    lut = np.empty(SLOTS, np.uint32)
    n = sym.size
    h = (n + 1) >> 1
    words_a, xs_a, words_b, xs_b, m_a, m_b, state = _fused_start(buf, lut, n, packed.size, base)
    if m_a < 0 or u32.size != n or low.size != 2 * n:
        return -1
    pa = halves(n)[1]
    merged = loop2_joint32(lut, words_a, xs_a, sym[:h], lut, words_b, xs_b, sym[h:], u32[:h], packed[:pa],
                           low[: 2 * h], u32[h:], packed[pa:], low[2 * h :], state)
    if finish_part(lut, words_a, xs_a, sym[:h], m_a, merged, state[2]) or \
            finish_part(lut, words_b, xs_b, sym[h:], m_b, merged, state[3]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False, inline="always")
def _base(payload, meths, offs, lens):
    """Stream 0's base exponent, or -1 where it is not one raw byte in range."""
    if meths[0] != M_RAW or lens[0] != 1:
        return -1
    base = np.int64(payload[offs[0]])
    return base if 1 <= base <= 255 - WINDOW else -1


@njit(nogil=True, boundscheck=False)
def _symbols_into(blob, m, sym):
    """All symbols of stream 1 (method m, its bytes blob) into sym, by the methods without a fused loop; 0 or
    -1."""
    n = sym.size
    if m == M_RANS32E:
        return -1 if rans32e.decode_ext_into(blob, sym) != 0 else 0
    if m == M_RANS32:
        return -1 if rans32.decode_into(blob, sym) != 0 else 0
    if m == M_RANS:
        return -1 if rans.decode_into(blob, sym) != 0 else 0
    if m == M_RAW:
        if blob.size != n:
            return -1
        for i in range(n):
            sym[i] = blob[i]
        return 0
    if m == M_CONST:
        if blob.size != 1:
            return -1
        for i in range(n):
            sym[i] = blob[0]
        return 0
    return -1


@njit(nogil=True, boundscheck=False)
def decode_class(payload, meths, offs, lens, sym, out):
    """A class-8 chunk's three streams (methods, offsets, lengths into payload) into out (uint8, 2n bytes), its
    symbols through sym (at least n bytes); 0, or -(stream + 1) for the stream that is malformed or of a method it
    does not decode (zstd, lz4: only tensor_decode._decode_joint_class passes those, and then names the error)."""
    n = out.size // 2
    base = _base(payload, meths, offs, lens)
    if base < 0:
        return -1
    pn = halves(n)[2]
    if meths[2] != M_RAW or lens[2] != pn:
        return -3
    if sym.size < n:
        return -2
    sym = sym[:n]
    packed = payload[offs[2] : offs[2] + pn]
    blob = payload[offs[1] : offs[1] + lens[1]]
    u = out.view(np.uint16)
    done = 0
    if meths[1] == M_RANS32E and lens[1] > 0 and blob[0] == 2:
        done = decode_fused(blob, sym, packed, base, u)
        if done < 0:
            return -2
    elif _symbols_into(blob, meths[1], sym):
        return -2
    compose(sym, packed, base, u, done)
    return 0


@njit(nogil=True, boundscheck=False)
def decode_class32(payload, meths, offs, lens, scratch, out):
    """decode_class for class 9 (four streams) into out (uint8, 4n bytes) through scratch (4n bytes, C order:
    the symbols, then the top halves of the elements the fused loop does not write)."""
    n = out.size // 4
    base = _base(payload, meths, offs, lens)
    if base < 0:
        return -1
    h, pa, pn = halves(n)
    if meths[2] != M_RAW or lens[2] != pn:
        return -3
    if meths[3] != M_RAW or lens[3] != 2 * n:
        return -4
    if scratch.size < 4 * n:
        return -2
    flat = scratch.reshape(scratch.size)
    sym = flat[:n]
    top = flat[2 * n : 4 * n].view(np.uint16)
    packed = payload[offs[2] : offs[2] + pn]
    low = payload[offs[3] : offs[3] + 2 * n]
    blob = payload[offs[1] : offs[1] + lens[1]]
    u = out.view(np.uint32)
    done = 0
    if meths[1] == M_RANS32E and lens[1] > 0 and blob[0] == 2:
        done = decode_fused32(blob, sym, packed, low, base, u)
        if done < 0:
            return -2
    elif _symbols_into(blob, meths[1], sym):
        return -2
    compose(sym, packed, base, top, done)
    merge_wide(top, low, u, done, h)
    merge_wide(top, low, u, h + done, n)
    return 0
