"""Stream method 7 (rans32c) encoder: bucketed 16-bit symbols coded against the buckets' tables, vector steps."""
from __future__ import annotations

import logging
import sys

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import njit
from . import scratch
from .rans import RANS_L, _enc_step
from .rans32 import LANES, TABLE_MAX, V, write_table
from .rans32_enc import _encode as _encode_lanes, _rcp32, gather_step_ir
from .varint import put_varint

log = logging.getLogger(__name__)

_i16, _i32 = ir.IntType(16), ir.IntType(32)


# ---------------------------------------------------------------- encoder


@intrinsic
def _enc16c(typingctx, xs, k, idx, i, ftab, rcp, out, pos):
    """rans32_enc._enc16 with 16-bit symbols idx = bucket << 8 | symbol indexing the tables of all buckets; new pos."""
    sig = types.int64(xs, types.int64, idx, types.int64, ftab, rcp, out, types.int64)

    def codegen(context, builder, signature, args):
        x_s, d_s, t_s, r_s, o_s = (context.make_array(signature.args[n])(context, builder, args[n])
                                   for n in (0, 2, 4, 5, 6))
        k, i, pos = args[1], args[3], args[7]
        sptr = builder.bitcast(builder.gep(d_s.data, [i]), ir.VectorType(_i16, V).as_pointer())
        sym = builder.zext(builder.load(sptr, align=2), ir.VectorType(_i32, V))
        return gather_step_ir(builder, x_s, k, sym, t_s, r_s, o_s, pos)

    return sig, codegen


@njit(nogil=True)
def _encode(idx, freq, cum, rcp, out):
    """Encode symbols idx (bucket << 8 | symbol) backwards with the flat tables; return the first word's position."""
    return _encode_lanes(idx, freq, cum, rcp, out, np.full(LANES, RANS_L, np.int64))


@njit(nogil=True, boundscheck=False)
def _encode_vec(idx, freq, cum, rcp, out):
    """_encode with the vector step for whole groups of 32 symbols (same output)."""
    x = np.full(LANES, RANS_L, np.int64)
    pos = out.size
    n = idx.size
    full = n & ~(LANES - 1)
    for i in range(n - 1, full - 1, -1):
        s = idx[i]
        j = i & (LANES - 1)
        x[j], pos = _enc_step(x[j], freq[s], cum[s], rcp[s], out, pos)
    ftab = np.empty(freq.size, np.uint32)
    for s in range(freq.size):
        ftab[s] = np.uint32(freq[s] | (cum[s] << 16))
    rcp32 = _rcp32(freq)
    xs = np.empty(LANES, np.uint32)
    for j in range(LANES):
        xs[j] = np.uint32(x[j])
    g = full
    while g > 0:
        g -= LANES
        pos = _enc16c(xs, 1, idx, g + V, ftab, rcp32, out, pos)
        pos = _enc16c(xs, 0, idx, g, ftab, rcp32, out, pos)
    for j in range(LANES - 1, -1, -1):
        out[pos - 1] = xs[j] & 0xFFFF
        out[pos - 2] = xs[j] >> 16
        pos -= 2
    return pos


_enc_vector: bool | None = None


def _encoder():
    """The vector encoder if it compiles and matches the scalar one on a probe, else the scalar encoder."""
    global _enc_vector
    if _enc_vector is None:
        ok = False
        try:
            idx = ((np.arange(1000) * 7 % 13) | ((np.arange(1000) % 3) << 8)).astype(np.uint16)
            freq = np.zeros(768, np.int64)
            for b in range(3):
                freq[b * 256 : b * 256 + 13] = 315
                freq[b * 256] += 1
            cum = np.zeros(768, np.int64)
            for b in range(3):
                cum[b * 256 + 1 : b * 256 + 256] = np.cumsum(freq[b * 256 : b * 256 + 255])
            rcp = 1.0 / np.maximum(freq, 1)
            a = np.empty(idx.size + 80, np.uint16)
            b2 = np.empty(idx.size + 80, np.uint16)
            pa = _encode(idx, freq, cum, rcp, a)
            pb = _encode_vec(idx, freq, cum, rcp, b2)
            ok = pa == pb and np.array_equal(a[pa:], b2[pb:])
            if not ok:
                log.warning("rans32c: vector encoder disagrees with the reference; using the scalar encoder")
        except Exception as exc:  # noqa: BLE001 - any LLVM/numba failure means: use the portable loop
            log.warning("rans32c: vector encoder unavailable (%s); using the scalar encoder", exc)
        _enc_vector = ok
    return _encode_vec if _enc_vector else _encode


def encode(data: np.ndarray, source: int, ctx: np.ndarray | None, thresholds: list[int],
           freqs: list[np.ndarray], idx: np.ndarray | None = None, parts: int = 1) -> bytes:
    """Method-7 stream of data with len(thresholds) + 1 bucket tables freqs (context: own symbol 32 earlier for
    source 0, ctx[i] for source 1); idx from bucket_symbols (or plan with the same parts) if the caller has it.
    parts = 2 (source 0 only) writes source 2: each half of the symbols coded on its own with the same tables."""
    return b"".join(encode_pieces(data, source, ctx, thresholds, freqs, idx, parts))


@njit(nogil=True, boundscheck=False)
def _flat_tables(freqs, freq, cum, rcp, tab):
    """The encoder's flat tables of the bucket tables freqs [nb, 256]: freq, cum (within each bucket) and 1 / freq
    (1 for a symbol not in the table); the tables as the stream writes them into tab (returns their length).
    (Their numpy steps cost ~25 us per stream.)"""
    pos = 0
    for b in range(freqs.shape[0]):
        c = 0
        for s in range(256):
            f = freqs[b, s]
            freq[b * 256 + s] = f
            cum[b * 256 + s] = c
            rcp[b * 256 + s] = 1.0 / max(f, 1)
            c += f
        pos += write_table(freqs[b], tab[pos:])
    return pos


def encode_pieces(data: np.ndarray, source: int, ctx: np.ndarray | None, thresholds: list[int],
                  freqs: list[np.ndarray], idx: np.ndarray | None = None, parts: int = 1) -> tuple:
    """encode's stream in pieces: its header (bytes), then each part's words, views of scratch memory (valid until
    the caller's scratch session ends, codecs/scratch.py). The tensor encoder joins every stream of a chunk once;
    joining here first cost three more copies of the words."""
    nb = len(thresholds) + 1
    if idx is None:
        idx, _ = _bucket_parts(data, source, ctx, thresholds, parts, nb)
    freqs = np.asarray(freqs, np.int64)  # (plan's are one array already)
    freq, cum, rcp = np.empty(nb * 256, np.int64), np.empty(nb * 256, np.int64), np.empty(nb * 256)
    tab = np.empty(nb * TABLE_MAX, np.uint8)
    tables = _flat_tables(freqs, freq, cum, rcp, tab)
    h = (data.size + 1) >> 1 if parts == 2 else data.size
    coded = []
    for piece in ((idx,) if parts == 1 else (idx[:h], idx[h:])):
        out = scratch.take(2 * (piece.size + 2 * LANES + 8)).view(np.uint16)
        words = out[_encoder()(piece, freq, cum, rcp, out) :]
        if sys.byteorder != "little":
            words.byteswap(inplace=True)
        coded.append(memoryview(words).cast("B"))
    head = bytearray([SRC_SELF2 if parts == 2 else source, len(thresholds), *thresholds])
    head += tab[:tables].tobytes()
    if parts == 2:
        put_varint(head, len(coded[0]) // 2)
    return (bytes(head), *coded)


# Last: rans32c re-exports this module's and rans32c_plan's names at its own end, so whichever of the three is
# imported first, each finds the others' names already defined.
from .rans32c_plan import _bucket_parts  # noqa: E402
from .rans32c import SRC_SELF2  # noqa: E402
