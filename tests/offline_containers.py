"""Offline containers for the offline tools' tests: written and damaged without a mount."""
from __future__ import annotations

import os
import random

from dccfs.codecs import ChunkHints, encode_chunk
from dccfs.container import Container
from dccfs.format import checksum64

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


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))
