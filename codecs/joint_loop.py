"""The fused vector decoding of class 8 (codecs/joint.py): both parts of its symbol stream in one loop (four chains)
that writes the bf16 elements from each symbol and its packed low bits."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import njit
from . import rans, rans32, rans32e
from .joint import BLOCK, BLOCK_BYTES, WINDOW, compose, halves
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
    def store(builder, targets, i, syms, extras):
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
        for part, sym in enumerate(syms):
            u16, packed = targets[2 * part], targets[2 * part + 1]

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
            u = builder.or_(u, builder.or_(builder.and_(r, _splat(0x1F)), builder.shl(builder.and_(r, _splat(0x20)),
                                                                                       _splat(10))))
            builder.store(builder.trunc(u, _v16), builder.bitcast(builder.gep(u16, [i]), _v16.as_pointer()), align=2)


@intrinsic
def loop2_joint(typingctx, lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16_a, packed_a, u16_b,
                packed_b, state):
    """The two parts of a class-8 symbol stream (they share its table: callers pass it twice), writing each
    half's elements u16_a / u16_b from its packed low bits (state: i, n, the parts' word positions, base - 1)."""
    sig = types.int64(lut_a, words_a, xs_a, out_a, lut_b, words_b, xs_b, out_b, u16_a, packed_a, u16_b, packed_b,
                      state)
    return sig, lambda c, b, s, a: _emit_loop(c, b, s, a, (False, False), _JointMerge)


@njit(nogil=True, boundscheck=False)
def decode_fused(buf, sym, packed, base, u16):
    """A two-part method-6 symbol stream of n = sym.size elements whose low bits packed (joint.packed_bytes(n)
    bytes) are given: the rounds both parts decode together write the elements u16; returns how many leading
    elements of each half were (the other symbols are in sym, for joint.compose), or -1 (also for one-part
    streams)."""
    lut = np.empty(SLOTS, np.uint32)
    parts, k_a, k_b, words_a, xs_a, words_b, xs_b, st = _prepare_ext(buf, lut)
    n = sym.size
    h, pa, pn = halves(n)
    if st or parts != 2 or u16.size != n or packed.size != pn:
        return -1
    m_a = h - LANES * k_a
    m_b = (n - h) - LANES * k_b
    if m_a < 0 or m_b < 0:
        return -1
    state = np.empty(5, np.int64)
    # the loop writes whole blocks only: the elements of each half's tail have their own packed layout
    state[0], state[1] = 0, min(m_a, m_b, BLOCK * ((n - h) // BLOCK))  # the second half is not the longer
    state[2], state[3], state[4] = 2 * LANES, 2 * LANES, base - 1
    merged = loop2_joint(lut, words_a, xs_a, sym[:h], lut, words_b, xs_b, sym[h:], u16[:h], packed[:pa], u16[h:],
                         packed[pa:], state)
    if finish_part(lut, words_a, xs_a, sym[:h], m_a, merged, state[2]) or \
            finish_part(lut, words_b, xs_b, sym[h:], m_b, merged, state[3]):
        return -1
    return merged


@njit(nogil=True, boundscheck=False)
def decode_class(payload, meths, offs, lens, sym, out):
    """A class-8 chunk's three streams (methods, offsets, lengths into payload) into out (uint8, 2n bytes), its
    symbols through sym (at least n bytes); 0, or -(stream + 1) for the stream that is malformed or of a method it
    does not decode (zstd, lz4: only tensor_decode._decode_joint_class passes those, and then names the error)."""
    n = out.size // 2
    if meths[0] != M_RAW or lens[0] != 1:
        return -1
    base = np.int64(payload[offs[0]])
    if base < 1 or base > 255 - WINDOW:
        return -1
    h, pa, pn = halves(n)
    if meths[2] != M_RAW or lens[2] != pn:
        return -3
    if sym.size < n:
        return -2
    sym = sym[:n]
    packed = payload[offs[2] : offs[2] + pn]
    blob = payload[offs[1] : offs[1] + lens[1]]
    m = meths[1]
    u = out.view(np.uint16)
    done = 0
    if m == M_RANS32E and lens[1] > 0 and blob[0] == 2:
        done = decode_fused(blob, sym, packed, base, u)
        if done < 0:
            return -2
    elif m == M_RANS32E:
        if rans32e.decode_ext_into(blob, sym) != 0:
            return -2
    elif m == M_RANS32:
        if rans32.decode_into(blob, sym) != 0:
            return -2
    elif m == M_RANS:
        if rans.decode_into(blob, sym) != 0:
            return -2
    elif m == M_RAW:
        if lens[1] != n:
            return -2
        for i in range(n):
            sym[i] = blob[i]
    elif m == M_CONST:
        if lens[1] != 1:
            return -2
        for i in range(n):
            sym[i] = blob[0]
    else:
        return -2
    compose(sym, packed, base, u, done)
    return 0
