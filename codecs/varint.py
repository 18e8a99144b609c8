"""LEB128 varints for codec params (the on-disk format of codecs/tensor.py and codecs/delta.py)."""
from __future__ import annotations

import logging

from .api import CodecError

log = logging.getLogger(__name__)


def put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def get_varint(buf: bytes, pos: int, what: str, max_shift: int = 63) -> tuple[int, int]:
    """(value, next position); what names the params in the error of a truncated varint."""
    v = shift = 0
    while True:
        if pos >= len(buf) or shift > max_shift:
            raise CodecError(f"{what} params: truncated varint")
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos
