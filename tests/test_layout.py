"""Layout sniffing: safetensors, npy, GGUF, torch zip; truncated/corrupt headers fall back without harm."""
import io
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save

from dccfs.codecs import ChunkHints, Segment, decode_chunk, encode_chunk, sniff_layout
from dccfs.codecs.torchzip import storage_dtypes

CHUNK = 65536


def chunked_roundtrip(data: bytes, chunk: int = CHUNK) -> int:
    layout = sniff_layout(data[: 1 << 20], len(data))
    total = 0
    for off in range(0, len(data), chunk):
        raw = data[off : off + chunk]
        hints = layout.hints_for(off, raw) if layout else ChunkHints()
        enc = encode_chunk(raw, hints)
        assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw
        total += len(enc.params) + len(enc.payload)
    return total


def normal(n, seed=0):
    return np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)


def safetensors_bytes():
    return st_save({"a": normal(30001), "b": normal(20000).astype(np.float16), "ids": np.arange(999, dtype=np.int64)})


def test_safetensors_segments():
    data = safetensors_bytes()
    layout = sniff_layout(data[:100000])
    assert layout.kind == "safetensors"
    (hlen,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + hlen])
    a_start = 8 + hlen + header["a"]["data_offsets"][0]
    segs = layout.hints_for(0, data[:CHUNK]).segments
    assert Segment(a_start, CHUNK - a_start, "f32") in segs or any(s.dtype == "f32" for s in segs)
    # a chunk starting mid-tensor gets the element phase right
    off = a_start + 4 * 1000 + 1
    (seg,) = [s for s in layout.hints_for(off, data[off : off + 4096]).segments if s.dtype == "f32"]
    assert (off + seg.start - a_start) % 4 == 0
    assert chunked_roundtrip(data) < 0.95 * len(data)


def test_npy_and_gguf():
    buf = io.BytesIO()
    np.save(buf, normal(50000))
    data = buf.getvalue()
    layout = sniff_layout(data[:4096], len(data))
    assert layout.kind == "npy" and layout.hints_for(0, data[:CHUNK]).segments[0].dtype == "f32"
    chunked_roundtrip(data)

    def gstr(s):
        return struct.pack("<Q", len(s)) + s

    tensor = normal(4096).astype(np.float16).tobytes()
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + gstr(b"general.alignment") + struct.pack("<II", 4, 32)
    head += gstr(b"w") + struct.pack("<IQQ", 2, 64, 64) + struct.pack("<IQ", 1, 0)
    head += bytes(-len(head) % 32)
    data = head + tensor
    layout = sniff_layout(data)
    assert layout.kind == "gguf"
    assert layout.hints_for(0, data).segments == (Segment(len(head), len(tensor), "f16"),)
    chunked_roundtrip(data, 4096)


def torch_bytes():
    buf = io.BytesIO()
    state = {
        "w": torch.from_numpy(normal(40000)),
        "h": torch.from_numpy(normal(30000)).to(torch.bfloat16),
        "f": torch.from_numpy(normal(5000)).half(),
        "i": torch.arange(100),
        "step": 7,
    }
    torch.save(state, buf)
    return buf.getvalue()


def test_torch_zip_layout():
    data = torch_bytes()
    layout = sniff_layout(data[:65536])
    assert layout.kind == "torch-zip"
    assert sorted(d for d, _ in layout._dtypes.values()) == ["bf16", "f16", "f32"]
    dtypes = set()
    for off in range(0, len(data), CHUNK):
        dtypes |= {s.dtype for s in layout.hints_for(off, data[off : off + CHUNK]).segments}
    assert dtypes == {"bf16", "f16", "f32"}
    assert chunked_roundtrip(data) < 0.9 * len(data)
    # out of order and repeated calls on a fresh layout are still safe
    fresh = sniff_layout(data[:65536])
    for off in reversed(range(0, len(data), CHUNK)):
        raw = data[off : off + CHUNK]
        enc = encode_chunk(raw, fresh.hints_for(off, raw))
        assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_pickle_is_never_executed():
    evil = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03."
    assert storage_dtypes(evil) == {}


@pytest.mark.parametrize("make", [safetensors_bytes, torch_bytes])
def test_truncated_and_corrupt_headers(make):
    data = make()
    rng = np.random.default_rng(3)
    cuts = [0, 1, 7, 8, 9, 30, 100, 200, 500, 1000, 5000]
    variants = [data[:n] for n in cuts]
    for _ in range(40):
        bad = bytearray(data[:20000])
        for _ in range(3):
            bad[int(rng.integers(0, 600))] = int(rng.integers(0, 256))
        variants.append(bytes(bad) + data[20000:])
    for prefix in variants:
        layout = sniff_layout(prefix[:65536])  # must not raise
        body = prefix if len(prefix) > 1000 else data
        for off in (0, 1, 4097, 30000):
            raw = body[off : off + 8192]
            hints = layout.hints_for(off, raw) if layout else ChunkHints()
            enc = encode_chunk(raw, hints)
            assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw


def test_garbage_prefixes():
    for prefix in (b"", b"PK\x03\x04", b"\x93NUMPY\x01\x00\xff\xff", b"GGUF" + b"\xff" * 40, b"\xff" * 8 + b"{"):
        layout = sniff_layout(prefix)
        if layout is not None:
            layout.hints_for(0, b"\x00" * 100)
