#!/usr/bin/env python3
"""Ratio cost of cutting every 1 MiB chunk into independent pieces, each coded alone with its own tables.

An upper bound of what independent blocks inside a chunk (params version 2 cut on a fixed grid) would cost:
each piece is a whole `encode_chunk` with the file's own layout hints, charged its params, its payload and a
32-byte record header (a version-2 block costs a few bytes of params instead). docs/performance.md
("2026-12-07") uses it to size blocks that a small random read could decode alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dccfs.codecs import ChunkHints, encode_chunk, sniff_layout
from dccfs.format import RECORD_HEADER_SIZE

CHUNK = 1 << 20


def stored_fraction(data: bytes, piece: int) -> float:
    """Stored bytes over raw bytes with every CHUNK cut into pieces of `piece` bytes."""
    layout = sniff_layout(data[:CHUNK], len(data))
    total = 0
    for off in range(0, len(data), CHUNK):
        chunk = data[off:off + CHUNK]
        for start in range(0, len(chunk), piece):
            raw = chunk[start:start + piece]
            hints = layout.hints_for(off + start, raw) if layout else ChunkHints()
            encoded = encode_chunk(raw, hints)
            total += RECORD_HEADER_SIZE + len(encoded.params) + len(encoded.payload)
    return total / len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="tensor files, e.g. .corpus/real/*.safetensors")
    parser.add_argument("--pieces-kib", default="256,128", help="piece sizes to compare (default 256,128)")
    args = parser.parse_args(argv)
    pieces = [int(k) << 10 for k in args.pieces_kib.split(",")]
    if any(p <= 0 or CHUNK % p for p in pieces):
        parser.error("--pieces-kib: each size must divide 1024")
    print("| file | 1 MiB chunks | " + " | ".join(f"{p >> 10} KiB pieces" for p in pieces) + " |")
    print("|---|---|" + "---|" * len(pieces))
    for path in args.files:
        data = path.read_bytes()
        whole = stored_fraction(data, CHUNK)
        extra = [stored_fraction(data, p) - whole for p in pieces]
        print(f"| {path.name} | {whole:.4f} | " + " | ".join(f"+{e:.4f}" for e in extra) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
