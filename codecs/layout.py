"""Sniff a file's tensor layout from its first bytes (safetensors, .npy, GGUF, torch zip) to hint chunk dtypes."""
from __future__ import annotations

import ast
import bisect
import json
import logging
import struct

from .api import ChunkHints, Segment

log = logging.getLogger(__name__)

ELEMENT_WIDTH = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8}
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32", "F64": "f64"}
NPY_DTYPES = {"<f2": "f16", "<f4": "f32", "<f8": "f64"}
GGUF_DTYPES = {0: "f32", 1: "f16", 30: "bf16", 28: "f64"}
MAX_SAFETENSORS_HEADER = 100 << 20


class Layout:
    """Float tensor spans of one file, as absolute (start, end, dtype); everything else is generic."""

    def __init__(self, kind: str, spans: list[tuple[int, int, str]] | None = None):
        self.kind = kind
        self._set_spans(spans or [])

    def _set_spans(self, spans: list[tuple[int, int, str]]) -> None:
        spans = sorted(s for s in spans if s[1] > s[0] and s[2] in ELEMENT_WIDTH)
        # publish both lists in one assignment so concurrent readers never see a mismatched pair
        self._view = ([s[0] for s in spans], spans)

    def hints_for(self, file_offset: int, raw: bytes | memoryview) -> ChunkHints:
        try:
            return ChunkHints(segments=self._segments(file_offset, len(raw)))
        except Exception:  # a hint is an optimisation: never let it break a write
            log.debug("layout %s: no hints at %d", self.kind, file_offset, exc_info=True)
            return ChunkHints()

    def _segments(self, offset: int, length: int) -> tuple[Segment, ...]:
        starts, spans = self._view
        end = offset + length
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        out = []
        while i < len(spans) and spans[i][0] < end:
            s, e, dtype = spans[i]
            i += 1
            if e <= offset:
                continue
            width = ELEMENT_WIDTH[dtype]
            first = s - offset if s >= offset else (s - offset) % width
            last = min(e, end) - offset
            if last > first:
                out.append(Segment(first, last - first, dtype))
        return tuple(out)


def _sniff_safetensors(prefix: bytes) -> Layout | None:
    if len(prefix) < 10:
        return None
    (hlen,) = struct.unpack_from("<Q", prefix)
    if hlen > MAX_SAFETENSORS_HEADER or len(prefix) < 8 + hlen or prefix[8:9] != b"{":
        return None
    header = json.loads(prefix[8 : 8 + hlen])
    if not isinstance(header, dict):
        return None
    base = 8 + hlen
    spans = []
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, 0))
        if dtype and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end:
            spans.append((base + begin, base + end, dtype))
    return Layout("safetensors", spans)


def _sniff_npy(prefix: bytes, file_size: int | None) -> Layout | None:
    if not prefix.startswith(b"\x93NUMPY") or len(prefix) < 12:
        return None
    if prefix[6] == 1:
        (hlen,), start = struct.unpack_from("<H", prefix, 8), 10
    else:
        (hlen,), start = struct.unpack_from("<I", prefix, 8), 12
    if len(prefix) < start + hlen:
        return None
    header = ast.literal_eval(prefix[start : start + hlen].decode("latin1"))  # literals only: safe
    dtype = NPY_DTYPES.get(header.get("descr")) if isinstance(header, dict) else None
    if dtype is None:
        return Layout("npy", [])
    shape = header.get("shape", ())
    count = 1
    for dim in shape:
        count *= int(dim)
    data = start + hlen
    return Layout("npy", [(data, data + count * ELEMENT_WIDTH[dtype], dtype)])


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        vals = struct.unpack_from(fmt, self.buf, self.pos)  # raises struct.error past the end
        self.pos += struct.calcsize(fmt)
        return vals[0] if len(vals) == 1 else vals

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("gguf string past the prefix")
        self.pos += n
        return self.buf[self.pos - n : self.pos]


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_value(r: _Reader, vtype: int):
    if vtype in _GGUF_SCALAR:
        return r.take(_GGUF_SCALAR[vtype])
    if vtype == 8:
        return r.string()
    if vtype == 9:
        etype, count = r.take("<I"), r.take("<Q")
        if count > len(r.buf):
            raise ValueError("gguf array longer than the prefix")
        for _ in range(count):
            _gguf_value(r, etype)
        return None
    raise ValueError(f"gguf value type {vtype}")


def _sniff_gguf(prefix: bytes) -> Layout | None:
    if not prefix.startswith(b"GGUF"):
        return None
    r = _Reader(prefix)
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    if version < 2 or n_tensors > len(prefix) or n_kv > len(prefix):
        return None
    alignment = 32
    for _ in range(n_kv):
        key = r.string()
        value = _gguf_value(r, r.take("<I"))
        if key == b"general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    infos = []
    for _ in range(n_tensors):
        r.string()
        n_dims = r.take("<I")
        if n_dims > 8:
            return None
        count = 1
        for _ in range(n_dims):
            count *= r.take("<Q")
        ttype, offset = r.take("<I"), r.take("<Q")
        infos.append((ttype, count, offset))
    base = -(-r.pos // alignment) * alignment
    spans = []
    for ttype, count, offset in infos:
        dtype = GGUF_DTYPES.get(ttype)
        if dtype:
            spans.append((base + offset, base + offset + count * ELEMENT_WIDTH[dtype], dtype))
    return Layout("gguf", spans)


def sniff_layout(prefix: bytes, file_size_hint: int | None = None) -> Layout | None:
    """Layout of a recognised tensor file from its first bytes, or None (then chunks are probed)."""
    from .torchzip import sniff_torch_zip

    prefix = bytes(prefix)
    for sniff in (_sniff_safetensors, lambda p: _sniff_npy(p, file_size_hint), _sniff_gguf, sniff_torch_zip):
        try:
            layout = sniff(prefix)
        except Exception:  # truncated or corrupt headers: fall back to probing
            log.debug("layout sniffer %s failed", getattr(sniff, "__name__", sniff), exc_info=True)
            continue
        if layout is not None:
            return layout
    return None
