"""Method-6 (rans32e) streams: the end-state payload, part setup, heads, and the streams of a class coded
together (encode_ext_many) with the kernels of rans32_enc.py."""
from __future__ import annotations

import logging
import sys

import numpy as np

from ._jit import njit
from .rans import RANS_L, SCALE_BITS
from .rans32 import LANES, TABLE_MAX, write_table
from .rans32_enc import _encode_pair, _encode_pair_scalar, vector_ok
from . import scratch

log = logging.getLogger(__name__)


KMAX = 16  # encoder cap on the symbols per lane carried in the end states (the format allows any K with 32K <= m)
_Y_LIMIT = (1 << 32) - RANS_L  # RANS_L + y must stay a valid 32-bit state


@njit(nogil=True)
def _tail_payload(data, freq, cum, kmax, y):
    """Code the last K symbols of every lane into y[lane] (rANS steps from 0, no renormalisation) for the largest
    K <= kmax that keeps every y < _Y_LIMIT; return K. Lane of symbol i is i mod 32, as in the main phase."""
    m = data.size
    kmax = min(kmax, m // LANES)
    trial = np.empty(LANES, np.int64)
    for j in range(LANES):
        y[j] = 0
    k = 0
    while k < kmax:
        base = m - LANES * (k + 1)
        for t in range(LANES):
            i = base + t
            j = i & (LANES - 1)
            s = data[i]
            f = freq[s]
            v = y[j]
            nv = ((v // f) << SCALE_BITS) + v % f + cum[s]
            if nv >= _Y_LIMIT:
                return k
            trial[j] = nv
        for j in range(LANES):
            y[j] = trial[j]
        k += 1
    return k


HEAD_MAX = 3 + TABLE_MAX + 6  # parts, K per part, table, varint: room left before the words (even)
_LITTLE = sys.byteorder == "little"


@njit(nogil=True)
def _setup_part(data, freq, cum, x0):
    """cum of freq, and the lane states x0 = RANS_L + the tail payload of data; return K (_tail_payload)."""
    cum[0] = 0
    for s in range(1, 256):
        cum[s] = cum[s - 1] + freq[s - 1]
    k = _tail_payload(data, freq, cum, KMAX, x0)
    for j in range(LANES):
        x0[j] += RANS_L
    return k


@njit(nogil=True)
def _write_head(region, end, ks, nparts, freq, words_a):
    """Write the method-6 head (parts, K per part, table, [varint words of part A]) to end just before region[end];
    return its first byte."""
    tab = np.empty(TABLE_MAX, np.uint8)
    tlen = write_table(freq, tab)
    var = np.empty(8, np.uint8)
    nv = 0
    if nparts == 2:
        v = words_a
        while v >= 0x80:
            var[nv] = (v & 0x7F) | 0x80
            nv += 1
            v >>= 7
        var[nv] = v
        nv += 1
    start = end - (1 + nparts + tlen + nv)
    region[start] = nparts
    for p in range(nparts):
        region[start + 1 + p] = ks[p]
    pos = start + 1 + nparts
    region[pos : pos + tlen] = tab[:tlen]
    region[pos + tlen : end] = var[:nv]
    return start


def encode_ext_many(jobs: list[tuple[np.ndarray, np.ndarray, int]]) -> list[memoryview]:
    """Method-6 streams (docs/codecs.md: u8 parts, u8 K per part, table, [varint words of part A], words per part)
    of several planes, jobs = (uint8 data, freq from rans.normalize, parts 1 or 2). The parts are coded two at a
    time (four vector chains; one part alone left 30% of the core idle) into scratch memory (codecs/scratch.py):
    the views returned are valid until the caller's scratch session ends; a two-part stream is a tuple of two
    views (part B's words where its coder wrote them: moving them next to part A's cost a copy)."""
    parts, streams = [], []
    for data, freq, nparts in jobs:
        n = data.size
        h = n if nparts == 1 else (n + 1) >> 1
        pieces = (data,) if nparts == 1 else (data[:h], data[h:])
        region = scratch.take(HEAD_MAX + 2 * (n + nparts * (2 * LANES + 8)))
        words = region[HEAD_MAX:].view(np.uint16)
        cum = np.empty(256, np.int64)
        ks, off = np.empty(2, np.int64), 0
        first = len(parts)
        for p, piece in enumerate(pieces):
            x0 = np.empty(LANES, np.int64)
            ks[p] = k = _setup_part(piece, freq, cum, x0)
            off += piece.size + 2 * LANES + 8
            parts.append([piece[: piece.size - LANES * k], freq, cum, x0, words[:off], 0, p])
        streams.append((region, words, freq, ks, parts[first:]))
    encode = _encode_pair if vector_ok() else _encode_pair_scalar
    # pairs of the same part of consecutive streams: a class's first stream (a bf16 or f32 exponent, whose
    # alphabet is narrow: permuted tables in _encode_pair) then goes first in each pair, as with one part each
    order = sorted(parts, key=lambda part: part[6])
    for i in range(0, len(order), 2):
        a = order[i]
        b = order[i + 1] if i + 1 < len(order) else [a[0][:0], a[1], a[2], a[3], np.empty(2 * LANES, np.uint16), 0]
        a[5], b[5] = encode(*a[:5], *b[:5])
    out = []
    for region, words, freq, ks, ps in streams:
        start, stop = ps[0][5], ps[0][4].size
        if not _LITTLE:
            words[start:stop].byteswap(inplace=True)
        first = _write_head(region, HEAD_MAX + 2 * start, ks, len(ps), freq, stop - start)
        blob = memoryview(region[first : HEAD_MAX + 2 * stop])
        if len(ps) == 2:  # part B's words, which follow part A's in the stream, where its coder left them
            b_start, b_stop = ps[1][5], ps[1][4].size
            if not _LITTLE:
                words[b_start:b_stop].byteswap(inplace=True)
            blob = (blob, memoryview(region[HEAD_MAX + 2 * b_start : HEAD_MAX + 2 * b_stop]))
        out.append(blob)
    return out


def encode_ext(data: np.ndarray, freq: np.ndarray, parts: int = 1) -> bytes:
    """One method-6 stream as bytes (tests, probes; the tensor encoder calls encode_ext_many)."""
    blob = encode_ext_many([(data, freq, parts)])[0]
    return b"".join(blob) if isinstance(blob, tuple) else bytes(blob)
