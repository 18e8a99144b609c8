"""dccfs.codecs on bad input: unknown codecs, wrong lengths and damaged chunks raise CodecError, never crash."""
import numpy as np
import pytest

from dccfs.codecs import CODEC_STORE, ChunkHints, CodecError, Segment, codec_name, decode_chunk, encode_chunk
from codec_samples import weights


def test_unknown_codec_rejected():
    with pytest.raises(CodecError):
        encode_chunk(b"abc", ChunkHints(codec="nope"))
    with pytest.raises(CodecError):
        decode_chunk(99, b"", b"abc", 3)
    with pytest.raises(CodecError):
        codec_name(99)


def test_wrong_length_is_an_error():
    raw = weights(20000, "bf16")
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), "bf16"),)))
    for n in (len(raw) - 2, len(raw) + 2, 0):
        with pytest.raises(CodecError):
            decode_chunk(enc.codec_id, enc.params, enc.payload, n)
    with pytest.raises(CodecError):
        decode_chunk(CODEC_STORE, b"", b"abc", 4)


@pytest.mark.parametrize("codec", ["tensor", "zstd", "lz4"])
def test_damaged_payloads_raise_or_keep_length(codec):
    raw = b"abc" + weights(30000, "bf16") + b"text " * 500
    hints = ChunkHints(segments=(Segment(3, 60000, "bf16"),), codec=codec)
    enc = encode_chunk(raw, hints)
    rng = np.random.default_rng(5)
    for trial in range(200):
        params, payload = bytearray(enc.params), bytearray(enc.payload)
        target = params if (trial % 4 == 0 and params) else payload
        mode = trial % 3
        if mode == 0:
            target[int(rng.integers(len(target)))] ^= 1 << int(rng.integers(8))
        elif mode == 1:
            del target[int(rng.integers(len(target))) :]
        else:
            target[int(rng.integers(len(target))) : 0] = bytes(rng.integers(0, 256, 3, dtype=np.uint8))
        try:
            out = decode_chunk(enc.codec_id, bytes(params), bytes(payload), len(raw))
        except CodecError:
            continue
        assert len(out) == len(raw)


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_damaged_single_class_chunks_raise_or_keep_length(dtype):
    """Chunks of one float class take the numba params parser and the fused decoder: damage anywhere is a
    CodecError (or, for damaged raw bytes, a wrong-but-full-length result), never a crash or a short result."""
    raw = weights(131072 if dtype != "f32" else 65536, dtype, 9)
    enc = encode_chunk(raw, ChunkHints(segments=(Segment(0, len(raw), dtype),)))
    rng = np.random.default_rng(6)
    for trial in range(150):
        params, payload = bytearray(enc.params), bytearray(enc.payload)
        target = params if trial % 3 == 0 else payload
        pos = int(rng.integers(len(target)))
        if trial % 2:
            target[pos] ^= 1 << int(rng.integers(8))
        else:
            del target[pos:]
        try:
            out = decode_chunk(enc.codec_id, bytes(params), bytes(payload), len(raw))
        except CodecError:
            continue
        assert len(out) == len(raw)
