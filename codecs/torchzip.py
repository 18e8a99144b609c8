"""torch.save zip archives: storage dtypes from data.pkl (read, never executed) and offsets from local headers."""
from __future__ import annotations

import bisect
import logging
import pickletools
import re
import struct
import threading

from .layout import ELEMENT_WIDTH, Layout

log = logging.getLogger(__name__)

LOCAL_HEADER = b"PK\x03\x04"
STORAGE_DTYPES = {
    "FloatStorage": "f32",
    "HalfStorage": "f16",
    "BFloat16Storage": "bf16",
    "DoubleStorage": "f64",
}
_DATA_NAME = re.compile(rb"^(?:[^/]+/)?data/([A-Za-z0-9_]+)$")


def _local_header(buf: bytes, pos: int):
    """(name, data_offset, size) of a stored zip entry whose local header starts at pos, else None.

    torch.save streams its entries (flag bit 3), so size is usually 0 here and comes from data.pkl instead.
    """
    if pos + 30 > len(buf) or buf[pos : pos + 4] != LOCAL_HEADER:
        return None
    _, flags, method, _, _, _, csize, usize, nlen, xlen = struct.unpack_from("<HHHHHIIIHH", buf, pos + 4)
    if method != 0 or pos + 30 + nlen + xlen > len(buf):
        return None
    name = buf[pos + 30 : pos + 30 + nlen]
    extra = buf[pos + 30 + nlen : pos + 30 + nlen + xlen]
    size = usize
    if usize == 0xFFFFFFFF:  # zip64: the real size sits in extra field 0x0001
        x = 0
        while x + 4 <= len(extra):
            tag, tlen = struct.unpack_from("<HH", extra, x)
            if tag == 1 and tlen >= 8:
                (size,) = struct.unpack_from("<Q", extra, x + 4)
                break
            x += 4 + tlen
        else:
            return None
    return name, pos + 30 + nlen + xlen, size


def storage_dtypes(pickle_bytes: bytes) -> dict[str, tuple[str, int]]:
    """Map storage key -> (dtype, numel) by scanning pickle opcodes (persistent ids), without unpickling."""
    memo: dict[int, object] = {}
    recent: list[object] = []  # atomic values pushed since the last persistent id
    found: dict[str, tuple[str, int]] = {}
    for op, arg, _ in pickletools.genops(pickle_bytes):
        name = op.name
        if name in ("GLOBAL",):
            recent.append(str(arg).replace("\n", " ").split(" ")[-1])
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2:
                recent[-2:] = [str(recent[-1])]
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING"):
            recent.append(arg)
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"):
            recent.append(arg)
        elif name in ("BINPUT", "LONG_BINPUT"):
            if recent:
                memo[arg] = recent[-1]
        elif name == "MEMOIZE":
            if recent:
                memo[len(memo)] = recent[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            recent.append(memo.get(arg))
        elif name == "BINPERSID":
            # persistent id: ('storage', <Type>Storage, key, location, numel)
            for i in range(len(recent) - 1, -1, -1):
                if recent[i] == "storage" and i + 4 < len(recent):
                    dtype = STORAGE_DTYPES.get(str(recent[i + 1]))
                    key, numel = recent[i + 2], recent[i + 4]
                    if dtype and isinstance(key, str) and isinstance(numel, int) and numel >= 0:
                        found[key] = (dtype, numel)
                    break
            recent.clear()
        if len(recent) > 64:
            del recent[:-16]
    return found


class TorchZipLayout(Layout):
    """Learns storage offsets from the zip local headers it sees in chunks (writes are sequential)."""

    def __init__(self, dtypes: dict[str, tuple[str, int]]):
        super().__init__("torch-zip")
        self._dtypes = dtypes
        self._lock = threading.Lock()
        self._known: dict[int, tuple[int, int, str]] = {}

    def _unknown_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Parts of [offset, offset+length), relative to offset, outside every known storage:
        a local header can only start there, so a chunk inside one storage is not scanned."""
        starts, spans = self._view
        end = offset + length
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        pos, out = offset, []
        while i < len(spans) and spans[i][0] < end:
            start, stop, _ = spans[i]
            i += 1
            if stop <= pos:
                continue
            if start > pos:
                out.append((pos - offset, start - offset))
            pos = max(pos, stop)
        if pos < end:
            out.append((pos - offset, length))
        return out

    def learn(self, offset: int, buf: bytes) -> None:
        new = []
        for lo, hi in self._unknown_ranges(offset, len(buf)):
            stop = min(hi + len(LOCAL_HEADER) - 1, len(buf))
            pos = buf.find(LOCAL_HEADER, lo, stop)
            while pos >= 0:
                entry = _local_header(buf, pos)
                if entry:
                    name, data, size = entry
                    m = _DATA_NAME.match(name)
                    info = self._dtypes.get(m.group(1).decode()) if m else None
                    after = data
                    if info:
                        dtype, numel = info
                        after = data + numel * ELEMENT_WIDTH[dtype]
                        new.append((offset + data, offset + after, dtype))
                    pos = buf.find(LOCAL_HEADER, max(after, pos + 4), stop) if after < stop else -1
                else:
                    pos = buf.find(LOCAL_HEADER, pos + 4, stop)
        if new:
            with self._lock:
                for span in new:
                    self._known[span[0]] = span
                self._set_spans(list(self._known.values()))

    def hints_for(self, file_offset: int, raw: bytes | memoryview) -> "ChunkHints":  # noqa: F821
        try:
            self.learn(file_offset, raw if isinstance(raw, bytes) else bytes(raw))
        except Exception:
            log.debug("torch-zip: header scan failed at %d", file_offset, exc_info=True)
        return super().hints_for(file_offset, raw)


def sniff_torch_zip(prefix: bytes) -> Layout | None:
    first = _local_header(prefix, 0)
    if first is None or not first[0].endswith(b"data.pkl"):
        return None
    # genops stops at the pickle's STOP opcode and raises if the prefix cuts the pickle short
    layout = TorchZipLayout(storage_dtypes(prefix[first[1] :]))
    layout.learn(0, prefix)
    return layout
