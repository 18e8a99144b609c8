"""The tensor codec: cut a chunk into dtype regions, split floats into field streams, entropy-code each stream."""
from __future__ import annotations

import logging

import numpy as np

from . import fields, generic, rans, rans32
from .api import CODEC_LZ4, CODEC_TENSOR, CODEC_ZSTD, CodecError, EncodedChunk, Segment

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# stream methods (on-disk format, docs/codecs.md)
M_RAW, M_ZSTD, M_RANS, M_CONST, M_LZ4, M_RANS32 = 0, 1, 2, 3, 4, 5
MIN_FLOAT_ELEMENTS = 16  # shorter float runs cost more in params than field splitting saves
RANS_KEEP = 0.999  # keep a rANS stream if it beats raw by 0.1%: the targets are ratio-first
RANS32_MIN = 4096  # streams this long use the 32-lane coder (fast vector decoding, ~90 bytes more flush)
FLUSH_BYTES = {M_RANS: 12, M_RANS32: 96}  # typical cost of the final states beyond the entropy


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if pos >= len(buf) or shift > 35:
            raise CodecError("tensor params: truncated varint")
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos


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


def _encode_plane(plane: np.ndarray) -> tuple[int, bytes]:
    if plane.size == 0:
        return M_RAW, b""
    counts = rans.histogram(plane)
    if counts.max() == plane.size:
        return M_CONST, bytes([int(plane[0])])
    freq = rans.normalize(counts, plane.size)
    present = counts > 0
    body = float((counts[present] * (rans.SCALE_BITS - np.log2(freq[present]))).sum()) / 8
    if plane.size >= RANS32_MIN:
        method, size = M_RANS32, body + FLUSH_BYTES[M_RANS32] + rans32.table_bytes(freq)
    else:
        method, size = M_RANS, body + FLUSH_BYTES[M_RANS] + rans.table_bytes(freq)
    if size >= RANS_KEEP * plane.size:
        return M_RAW, plane.tobytes()
    return method, (rans32.encode if method == M_RANS32 else rans.encode)(plane, freq)


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
    arr = np.frombuffer(raw, np.uint8)
    by_class: dict[int, list[np.ndarray]] = {}
    pos = 0
    for length, cls in regions:
        by_class.setdefault(cls, []).append(arr[pos : pos + length])
        pos += length
    params = bytearray([FORMAT_VERSION])
    _put_varint(params, len(regions))
    for length, cls in regions:
        _put_varint(params, length)
        params.append(cls)
    payload = []
    for cls in sorted(by_class):
        data = by_class[cls][0] if len(by_class[cls]) == 1 else np.concatenate(by_class[cls])
        if cls == fields.CLASS_GENERIC:
            coded = [_encode_generic(data, effort, level)]
        else:
            coded = [_encode_plane(p) for p in fields.split(cls, np.ascontiguousarray(data))]
        for method, blob in coded:
            params.append(method)
            _put_varint(params, len(blob))
            payload.append(blob)
    return EncodedChunk(CODEC_TENSOR, bytes(params), b"".join(payload))


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
    if method == M_RANS32:
        out = np.empty(n, np.uint8)
        try:
            rans32.decode(np.frombuffer(blob, np.uint8), out)
        except ValueError as exc:
            raise CodecError(f"rans32 stream: {exc}") from exc
        return out
    if method == M_ZSTD:
        return np.frombuffer(generic.zstd_decompress(blob, n), np.uint8)
    if method == M_LZ4:
        return np.frombuffer(generic.lz4_decompress(blob, n), np.uint8)
    raise CodecError(f"unknown stream method {method}")


def decode(params: bytes, payload: bytes | memoryview, raw_len: int) -> bytes:
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
    decoded: dict[int, np.ndarray] = {}
    for cls in sorted(class_bytes):
        width, nstreams = fields.CLASSES[cls]
        streams = []
        for _ in range(nstreams):
            if pos >= len(params):
                raise CodecError("tensor params: truncated stream list")
            method = params[pos]
            blen, pos = _get_varint(params, pos + 1)
            if ppos + blen > len(payload):
                raise CodecError("tensor payload shorter than its streams")
            streams.append(_decode_stream(method, payload[ppos : ppos + blen], class_bytes[cls] // width))
            ppos += blen
        decoded[cls] = fields.merge(cls, streams, class_bytes[cls])
    if ppos != len(payload) or pos != len(params):
        raise CodecError("tensor payload or params have trailing bytes")
    if len(decoded) == 1:
        return decoded.popitem()[1].tobytes()
    out = np.empty(raw_len, np.uint8)
    taken = dict.fromkeys(decoded, 0)
    opos = 0
    for length, cls in regions:
        out[opos : opos + length] = decoded[cls][taken[cls] : taken[cls] + length]
        taken[cls] += length
        opos += length
    return out.tobytes()
