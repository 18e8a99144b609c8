"""Fuzz the container parser: any bytes give a clean error or verified data, never a crash."""
from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccfs.codecs import ChunkHints, encode_chunk
from dccfs.container import ChunkError, Container, ContainerError
from dccfs.format import checksum64

CHUNK_SHIFT = 16
CS = 1 << CHUNK_SHIFT
# make stress sets DCCFS_FUZZ_SECONDS=600; make test runs a short smoke pass.
FUZZ_SECONDS = float(os.environ.get("DCCFS_FUZZ_SECONDS", "0"))


def build_valid(tmp_path, seed: int) -> tuple[bytes, dict[int, bytes]]:
    """A small container with a few commits, holes and a delta index chain."""
    import random
    rng = random.Random(seed)
    path = tmp_path / f"valid-{seed}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    container = Container.create(fd, str(path), CHUNK_SHIFT)
    model: dict[int, bytes] = {}
    for _ in range(rng.randrange(1, 6)):
        for _ in range(rng.randrange(1, 4)):
            idx = rng.randrange(6)
            raw = bytes(rng.randrange(4) for _ in range(rng.randrange(1, CS)))
            encoded = encode_chunk(raw, ChunkHints(codec=rng.choice(["zstd", "lz4", "store"])))
            container.append_chunk(idx, encoded, len(raw), checksum64(raw))
            model[idx] = raw
        container.commit(6 * CS, durable=False)
    os.close(fd)
    return path.read_bytes(), model


def read_everything(path) -> None:
    """Open and read every chunk; only the documented errors may come out."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            container = Container.open(fd, str(path))
        except ContainerError:
            return
        for idx in list(container.index):
            try:
                data = container.read_chunk(idx)
            except ChunkError:
                continue
            assert data is None or len(data) <= container.chunk_size
    finally:
        os.close(fd)


mutation = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 5), flips=mutation, cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_mutated_containers_never_crash(tmp_path, seed, flips, cut):
    blob, _ = build_valid(tmp_path, seed)
    data = bytearray(blob)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    path = tmp_path / "mutated"
    path.write_bytes(bytes(data))
    read_everything(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=4096))
def test_random_bytes_behind_a_valid_header_never_crash(tmp_path, junk):
    blob, _ = build_valid(tmp_path, 0)
    path = tmp_path / "junk"
    path.write_bytes(blob[:64] + junk)
    read_everything(path)


@pytest.mark.stress
@pytest.mark.timeout(int(FUZZ_SECONDS or 600) + 300)  # the loop itself runs FUZZ_SECONDS
def test_fuzz_for_a_while(tmp_path):
    """make stress: mutate containers for DCCFS_FUZZ_SECONDS (600 by default there)."""
    import random
    seconds = FUZZ_SECONDS or 600
    rng = random.Random(int(time.time()))
    valid = [build_valid(tmp_path, s)[0] for s in range(8)]
    deadline = time.monotonic() + seconds
    cases = 0
    path = tmp_path / "fuzz"
    while time.monotonic() < deadline:
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 10)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)):]
        if rng.random() < 0.2:
            data += os.urandom(rng.randrange(200))
        path.write_bytes(bytes(data))
        read_everything(path)
        cases += 1
    assert cases > 0
