"""The delta decoder's read path (codecs/delta.py): each result is its own bytes object, whatever buffers it reuses."""
from __future__ import annotations

import threading

import numpy as np

from dccfs.codecs import ChunkHints, CodecError, Segment
from dccfs.codecs.delta import decode_delta, encode_delta


def _f32_pair(seed: int, n: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.05, n).astype(np.float32)
    new = (base * (1 - 8 * 2.0**-24) * (1 + rng.normal(0, 1e-3, n))).astype(np.float32)
    return new.tobytes(), base.tobytes()


def _encoded(seed: int, n: int = 1 << 14):
    raw, base = _f32_pair(seed, n)
    hints = ChunkHints(segments=(Segment(0, len(raw), "f32"),))
    enc = encode_delta(raw, base, hints, b"ref")
    assert enc is not None
    return raw, base, enc


def test_each_decode_returns_its_own_bytes():
    """The residual goes through a per-thread scratch buffer and the output is written in place: a later decode
    on the same thread must not change an earlier result."""
    cases = [_encoded(seed) for seed in range(3)]
    outs = [decode_delta(enc.params, enc.payload, len(raw), base) for raw, base, enc in cases]
    for (raw, _, _), out in zip(cases, outs):
        assert type(out) is bytes
        assert out == raw
        assert hash(out) == hash(raw)  # a bytes object filled before anyone hashed it


def test_decodes_on_many_threads_match():
    cases = [_encoded(seed) for seed in range(8)]
    results: dict[int, bytes] = {}

    def decode(i: int) -> None:
        raw, base, enc = cases[i]
        for _ in range(5):
            results[i] = decode_delta(enc.params, enc.payload, len(raw), base)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == cases[i][0] for i in range(len(cases)))


def test_tiny_chunks_are_written_into_their_own_bytes():
    """0-, 1- and 2-byte chunks (CPython shares the empty and some 1-byte bytes objects: none may be written
    into)."""
    from dccfs.codecs.delta import K_BYTES, T_SUB, T_XOR, _untransform, _zigzag

    for raw, base in ((b"\x07", b"\x05"), (b"\x07\x09", b"\x05\x01"), (b"", b"")):
        new, old = np.frombuffer(raw, np.uint8), np.frombuffer(base, np.uint8)
        desc = [(len(raw), K_BYTES, None)] if raw else []
        assert _untransform((new ^ old).tobytes(), base, desc, T_XOR) == raw
        assert _untransform(_zigzag(new - old, 1).tobytes(), base, desc, T_SUB) == raw
    assert bytes(1) == b"\0" and bytes([7]) == b"\x07" and bytes(0) == b""


def test_damaged_residual_raises_codec_error():
    raw, base, enc = _encoded(5)
    payload = bytearray(enc.payload)
    payload[len(payload) // 2] ^= 0xFF
    try:
        out = decode_delta(enc.params, bytes(payload), len(raw), base)
    except CodecError:
        return
    assert out != raw  # decoded to the wrong bytes of the right length: the container's checksum rejects it
