"""Shared fixtures and helpers: real dccfs mounts, the built corpus, offline containers, sample weights."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dccfs.codecs import ChunkHints, encode_chunk
from dccfs.container import Container
from dccfs.format import checksum64

sys.path.insert(0, str(Path(__file__).parent))
from mounting import Mount  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("DCCFS_CORPUS", REPO / ".corpus"))


def pytest_collection_modifyitems(config, items):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root and /dev/fuse")
        for item in items:
            if "mount" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def make_mount(tmp_path):
    """Factory for mounts; every mount is unmounted at teardown even when the test fails,
    and the test fails if a daemon logged an error it did not expect."""
    mounts: list[Mount] = []

    def factory(name: str = "m", *args: str, backing: Path | None = None) -> Mount:
        mount = Mount(backing or tmp_path / f"{name}-backing", tmp_path / f"{name}-mnt",
                      tmp_path / f"{name}.log", args)
        mounts.append(mount)
        return mount.start()

    yield factory
    surprises = []
    for mount in mounts:
        mount.stop()
        surprises += mount.surprises()
    if surprises:
        pytest.fail("the daemon logged unexpected errors:\n" + "\n".join(surprises[:20]))


@pytest.fixture
def mounted(make_mount):
    return make_mount()


@pytest.fixture
def pm(make_mount):
    """A mount with allow_other and a world-writable sticky scratch directory /pub."""
    mount = make_mount("p", "-o", "allow_other")
    os.chmod(mount.mnt, 0o755)
    pub = mount.mnt / "pub"
    pub.mkdir()
    os.chmod(pub, 0o1777)
    return mount


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "models" / "minilm" / "model.safetensors").exists():
        pytest.skip(f"corpus not built at {CORPUS} (make corpus)")
    return CORPUS


# -- offline containers: written and checked without a mount ----------------------------------

SHIFT = 16
CS = 1 << SHIFT


def text(seed: int, length: int) -> bytes:
    rng = random.Random(seed)
    words = [f"tok{seed}_{rng.randrange(500)}".encode() for _ in range(50)]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words) + b" "
    return bytes(out[:length])


def write_container(path, data: bytes, commits: int = 1) -> Container:
    """Store data as a container the way the mount does: zero chunks are holes.
    With commits > 1 the chunks are spread over several commits. Returns the closed view."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        c = Container.create(fd, str(path), SHIFT)
        n = -(-len(data) // CS)
        per_commit = max(1, -(-n // commits))
        for idx in range(n):
            raw = data[idx * CS:(idx + 1) * CS]
            if raw.count(0) != len(raw):
                enc = encode_chunk(raw, ChunkHints(codec="zstd"))
                c.append_chunk(idx, enc, len(raw), checksum64(raw))
            if (idx + 1) % per_commit == 0:
                c.commit(min(len(data), (idx + 1) * CS), durable=False)
        c.commit(len(data), durable=True)
        return c
    finally:
        os.close(fd)


@pytest.fixture
def backing(tmp_path):
    root = tmp_path / "backing"
    (root / ".dccfs" / "tmp").mkdir(parents=True)
    return root


@pytest.fixture
def runner():
    return CliRunner()


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))


# -- codec inputs ---------------------------------------------------------------------------------

NP_FLOAT = {"f16": np.float16, "f32": np.float32, "f64": np.float64}


def weights(n: int, dtype: str, seed: int = 0) -> bytes:
    vals = np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)
    if dtype == "bf16":
        return (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return vals.astype(NP_FLOAT[dtype]).tobytes()
