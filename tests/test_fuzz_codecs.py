"""Fuzz the chunk decoders: mutated real encodings give CodecError or the right length, never a crash, hang or blow-up."""
from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import random
import select
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccfs.codecs import CODEC_BLOCKS, CODEC_TENSOR, ChunkHints, CodecError, EncodedChunk, Segment, encode_chunk
from dccfs.codecs import delta
from dccfs.codecs.delta import CODEC_DELTA, encode_delta
from codec_samples import weights
from test_codec_hardening import build_v1, build_v2, float_chunks, parse_v1, parse_v2

log = logging.getLogger(__name__)

# make stress sets DCCFS_FUZZ_SECONDS=600; make test runs a short hypothesis pass.
FUZZ_SECONDS = float(os.environ.get("DCCFS_FUZZ_SECONDS", "0"))
CASE_SECONDS = 30  # one decode of a 256 KiB chunk takes milliseconds: longer is a hang
START_SECONDS = 600  # the worker's start: numba's cache, or a full compile with bounds checks
MAX_ALLOCATION = 64 << 20  # what one decode of a 256 KiB chunk may allocate (a real one: ~1 MiB)

# The worker (tests/decode_child.py without arguments) decodes cases sent on stdin (u32 length + pickle) and
# answers each with one JSON line: decode_child.decode_one's list.
DECODE_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_child.py")


class DecodeWorker:
    """A child interpreter that decodes cases one at a time: a crash or a hang there fails the case, not pytest."""

    def __init__(self, stderr_path, env: dict[str, str] | None = None):
        self.env = {**os.environ, **(env or {})}
        self.stderr_path = stderr_path  # a file, not a pipe: nobody reads a pipe until the worker fails
        self.proc: subprocess.Popen | None = None

    def decode(self, case: tuple, seconds: float = CASE_SECONDS) -> list:
        if self.proc is None or self.proc.poll() is not None:
            self.close()  # a worker that died on an earlier case
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen([sys.executable, DECODE_CHILD], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=err, env=self.env)
            seconds = max(seconds, START_SECONDS)
        blob = pickle.dumps(case)
        try:
            self.proc.stdin.write(struct.pack("<I", len(blob)) + blob)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died: reported below
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            hung = self.proc.poll() is None
            self.close()
            err = self.stderr_path.read_bytes().decode(errors="replace")[-2000:]
            raise AssertionError(f"decoder {'hung' if hung else f'died (rc {self.proc.returncode})'} on "
                                 f"codec {case[0]}, {len(case[1])} params bytes {case[1][:48]!r}: {err}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def _delta_pair(rng: np.random.Generator, n: int, decay: float) -> tuple[bytes, bytes]:
    """(new, base) f32 tensors: an AdamW-like step (decayed, slightly perturbed) for scaled delta regions."""
    base = rng.normal(0, 0.05, n).astype(np.float32)
    return (base * decay * (1 + rng.normal(0, 1e-3, n))).astype(np.float32).tobytes(), base.tobytes()


@functools.lru_cache(maxsize=None)
def samples() -> dict[str, tuple[bytes, EncodedChunk, bytes | None]]:
    """(raw, encoding, delta base) per name: every codec, tensor class and stream method, params versions 1 and 2,
    and deltas (plain and scaled regions)."""
    out = {name: (raw, encode_chunk(raw, hints), None) for name, (raw, hints) in float_chunks().items()}
    rng = np.random.default_rng(7)
    new, base = _delta_pair(rng, 1 << 16, 0.999)
    mixed_new = b"head" * 16 + new[: 1 << 17]
    mixed_base = b"HEAD" * 16 + base[: 1 << 17]
    for name, raw, old, hints in zip(DELTAS, (new, mixed_new), (base, mixed_base),
                                     (ChunkHints(segments=(Segment(0, len(new), "f32"),)),
                                      ChunkHints(segments=(Segment(64, 1 << 17, "f32"),)))):
        enc = encode_delta(raw, old, hints, bytes(48))
        assert enc is not None, name
        out[name] = (raw, enc, old)
    # codec 3: 64 KiB blocks of f32 weights, and of bf16 weights behind a text header (a block of two regions)
    f32, bf16 = weights(1 << 16, "f32", 11), weights(1 << 17, "bf16", 12)
    for name, raw, segments in (("blocks-f32", f32, (Segment(0, len(f32), "f32"),)),
                                ("blocks-mixed", b"header" * 100 + bf16, (Segment(600, len(bf16), "bf16"),))):
        enc = encode_chunk(raw, ChunkHints(segments=segments, block_size=1 << 16, block_seed=3))
        assert enc.codec_id == CODEC_BLOCKS, name
        out[name] = (raw, enc, None)
    return out


DELTAS = ("delta-f32", "delta-mixed")
BLOCKED = ("blocks-f32", "blocks-mixed")
NAMES = tuple(sorted(float_chunks(n=64))) + DELTAS + BLOCKED  # (the names only: samples() encodes on first use)


def _edit_bytes(data: bytes, op: str, pos: int, value: int) -> bytes:
    b = bytearray(data)
    if op == "truncate":
        return bytes(b[: pos % (len(b) + 1)])
    if op == "extend":
        return bytes(b) + bytes([value]) * (pos % 64 + 1)
    if not b:
        return bytes(b)
    if op == "big":  # a varint of 2**28 - 1 over whatever length or count was there
        at = pos % len(b)
        b[at : at + 4] = b"\xff\xff\xff\x7f"
    elif op == "flip":
        b[pos % len(b)] ^= 1 << (value & 7)
    else:
        b[pos % len(b)] = value
    return bytes(b)


def _edit_v1(params: bytes, payload: bytes, op: str, k: int, pos: int, value: int) -> tuple[bytes, bytes]:
    """One edit of a version-1 tensor encoding at the stream level (lengths in the params stay consistent)."""
    regions, streams = parse_v1(params, payload)
    if not streams:
        return params, _edit_bytes(payload, op, pos, value)
    k %= len(streams)
    method, blob = streams[k]
    if op == "method":
        streams[k] = (value % 9, blob)
    elif op == "region":
        length, _ = regions[k % len(regions)]
        regions[k % len(regions)] = (length, value % 9)
    elif op == "swap":
        streams[k] = streams[value % len(streams)]
    else:
        streams[k] = (method, _edit_bytes(blob, op, pos, value))
    return build_v1(regions, streams)


def _edit_tensor(params: bytes, payload: bytes, op: str, k: int, pos: int, value: int) -> tuple[bytes, bytes]:
    if params[:1] == b"\x02":
        blocks = parse_v2(params, payload)
        i = k % len(blocks)
        length, bparams, bpayload = blocks[i]
        blocks[i] = (length, *_edit_v1(bparams, bpayload, op, k // len(blocks), pos, value))
        return build_v2(blocks)
    return _edit_v1(params, payload, op, k, pos, value)


def _edit_streams(codec_id: int, params: bytes, payload: bytes, raw_len: int, op, k, pos, value
                  ) -> tuple[bytes, bytes]:
    """An edit inside the tensor streams (of a delta's inner encoding too); a byte edit of the payload where
    earlier edits left params that no longer parse."""
    try:
        if codec_id == CODEC_TENSOR:
            return _edit_tensor(params, payload, op, k, pos, value)
        if codec_id == CODEC_DELTA:
            ref = delta.delta_base_ref(params)
            transform, desc, inner_id, inner_params = delta._parse(params, raw_len)
            if inner_id == CODEC_TENSOR:
                inner_params, payload = _edit_tensor(inner_params, payload, op, k, pos, value)
                return delta._params(ref, transform, desc, EncodedChunk(inner_id, inner_params, b"")), payload
    except (CodecError, IndexError, ValueError, ZeroDivisionError):  # params that earlier edits broke
        pass
    return params, _edit_bytes(payload, op, pos, value)


def mutate(name: str, edits) -> tuple:
    """The case (codec_id, params, payload, raw_len, base) of sample name after the edits
    [(op, where, k, pos, value)]: where is params, payload or stream."""
    raw, enc, base = samples()[name]
    params, payload = enc.params, enc.payload
    for op, where, k, pos, value in edits:
        if where == "stream" and enc.codec_id in (CODEC_TENSOR, CODEC_DELTA):
            params, payload = _edit_streams(enc.codec_id, params, payload, len(raw), op, k, pos, value)
        elif where == "params":
            params = _edit_bytes(params, op, pos, value)
        else:
            payload = _edit_bytes(payload, op, pos, value)
    return enc.codec_id, params, payload, len(raw), base


OPS = ("flip", "flip", "set", "big", "truncate", "extend", "method", "region", "swap")
WHERE = ("stream", "stream", "params", "payload")


def check(worker: DecodeWorker, case: tuple) -> None:
    """The documented outcomes only: CodecError, or bytes of the raw length; no out-of-bounds access seen by a
    bounds-checked kernel, no big allocation."""
    outcome, detail, cause, cause_text, allocated = worker.decode(case)
    assert outcome in ("ok", "CodecError"), (outcome, detail)
    if outcome == "ok":
        assert detail == case[3], f"decoded {detail} bytes, expected {case[3]}"
    assert "out of bounds" not in cause_text, f"a kernel indexed out of bounds: {detail} ({cause})"
    assert allocated < MAX_ALLOCATION, f"one decode allocated {allocated >> 20} MiB: {detail}"


def started(worker: DecodeWorker) -> DecodeWorker:
    """The worker after every sample decoded unchanged (which also loads or compiles the kernels)."""
    for name, (raw, enc, base) in samples().items():
        assert worker.decode((enc.codec_id, enc.params, enc.payload, len(raw), base))[:2] == ["ok", len(raw)], name
    return worker


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = started(DecodeWorker(tmp_path_factory.mktemp("fuzz-codecs") / "worker.stderr"))
    yield w
    w.close()


edit = st.tuples(st.sampled_from(OPS), st.sampled_from(WHERE), st.integers(0, 63),
                 st.one_of(st.integers(0, 64), st.integers(0, 700), st.integers(0, 1 << 20)), st.integers(0, 255))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), edits=st.lists(edit, min_size=1, max_size=4))
def test_mutated_encodings_decode_to_codec_error_or_the_right_length(worker, name, edits):
    check(worker, mutate(name, edits))


def random_edits(rng: random.Random) -> list[tuple]:
    pos = rng.choice((64, 700, 1 << 20))
    return [(rng.choice(OPS), rng.choice(WHERE), rng.randrange(64), rng.randrange(pos + 1), rng.randrange(256))
            for _ in range(rng.randrange(1, 5))]


@pytest.mark.stress
@pytest.mark.timeout(int(FUZZ_SECONDS or 600) + START_SECONDS + 300)  # the loop itself runs FUZZ_SECONDS
def test_fuzz_codecs_for_a_while(tmp_path):
    """make stress: mutate encodings for DCCFS_FUZZ_SECONDS (600 by default there), with numba's bounds checks on
    (an out-of-bounds index in a kernel raises IndexError instead of reading memory) in a cache of their own."""
    seconds = FUZZ_SECONDS or 600
    seed = int(time.time())
    rng = random.Random(seed)
    w = started(DecodeWorker(tmp_path / "worker.stderr",
                             {"NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba-boundscheck")}))
    deadline = time.monotonic() + seconds
    cases = 0
    try:
        while time.monotonic() < deadline:
            name = rng.choice(NAMES)
            edits = random_edits(rng)
            try:
                check(w, mutate(name, edits))
            except AssertionError as exc:
                raise AssertionError(f"seed {seed}, case {cases}: {name} {edits}: {exc}") from None
            cases += 1
    finally:
        w.close()
    log.info("%d mutated encodings decoded cleanly (seed %d)", cases, seed)
    assert cases > 0
