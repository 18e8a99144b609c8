"""The tensor codec's on-disk numbers: the params format version, the stream method ids and the params varint."""
# Its own module so that the encoder (tensor.py) and the decoder (tensor_decode.py, tensor_fast.py) import these
# without importing each other: tensor.py re-exports the decoder, so a decoder importing tensor.py was a cycle.
from __future__ import annotations

from .varint import get_varint, put_varint

FORMAT_VERSION = 1
# stream methods (on-disk format, docs/codecs.md)
M_RAW, M_ZSTD, M_RANS, M_CONST, M_LZ4, M_RANS32, M_RANS32E, M_RANS32C = 0, 1, 2, 3, 4, 5, 6, 7


def _put_varint(out: bytearray, v: int) -> None:
    put_varint(out, v)


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    return get_varint(buf, pos, "tensor", 35)
