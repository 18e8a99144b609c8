"""dccfs.codecs: pure chunk codecs (generic and tensor-aware) and the file-structure sniffer."""
import logging

from .api import (
    CODEC_BLOCKS,
    CODEC_LZ4,
    CODEC_STORE,
    CODEC_TENSOR,
    CODEC_ZSTD,
    ChunkHints,
    CodecError,
    EncodedChunk,
    Segment,
    codec_name,
    decode_blocks_checked,
    decode_chunk,
    encode_chunk,
)
from .layout import Layout, sniff_layout

log = logging.getLogger(__name__)

__all__ = [
    "CODEC_BLOCKS",
    "CODEC_LZ4",
    "CODEC_STORE",
    "CODEC_TENSOR",
    "CODEC_ZSTD",
    "ChunkHints",
    "CodecError",
    "EncodedChunk",
    "Layout",
    "Segment",
    "codec_name",
    "decode_blocks_checked",
    "decode_chunk",
    "encode_chunk",
    "sniff_layout",
]
