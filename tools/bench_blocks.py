#!/usr/bin/env python3
"""Read blocks (codec 3) against whole chunks: stored fraction and encoder MB/s with one and two threads.

Every 1 MiB chunk of each file is encoded as the mount encodes it (`encode_chunk` with the file's own layout hints),
whole and as blocks of each size given, charged its 32-byte record header, params and payload (and, for blocks,
the index's block table: 4 bytes per block). The encoder figures are the files' bytes over the wall time of
encoding them all on one thread, then on two (the mount's encoders run on worker threads: what one holds of the
GIL the other waits for). docs/performance.md ("2026-12-07: read blocks") records its output.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dccfs.codecs import ChunkHints, encode_chunk, sniff_layout
from dccfs.format import RECORD_HEADER_SIZE

CHUNK = 1 << 20
TABLE_BYTES_PER_BLOCK = 4


def chunks_of(data: bytes, block: int) -> list[tuple[bytes, ChunkHints]]:
    layout = sniff_layout(data[:CHUNK], len(data))
    out = []
    for off in range(0, len(data), CHUNK):
        raw = data[off:off + CHUNK]
        hints = layout.hints_for(off, raw) if layout else ChunkHints()
        if block and hints.segments:
            hints = ChunkHints(hints.segments, hints.codec, hints.level, hints.effort, block)
        out.append((raw, hints))
    return out


def stored_and_speed(data: bytes, block: int) -> tuple[float, float, float]:
    """(stored fraction, MB/s on one thread, MB/s on two)."""
    work = chunks_of(data, block)
    started = time.perf_counter()
    encoded = [encode_chunk(raw, hints) for raw, hints in work]
    one = len(data) / (time.perf_counter() - started) / 1e6
    with ThreadPoolExecutor(2) as pool:
        started = time.perf_counter()
        list(pool.map(lambda item: encode_chunk(*item), work))
        two = len(data) / (time.perf_counter() - started) / 1e6
    total = 0
    for enc, (raw, _) in zip(encoded, work):
        total += RECORD_HEADER_SIZE + len(enc.params) + len(enc.payload)
        if block and enc.codec_id == 3:
            total += TABLE_BYTES_PER_BLOCK * -(-len(raw) // block)
    return total / len(data), one, two


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="tensor files, e.g. .corpus/real/*.safetensors")
    parser.add_argument("--blocks-kib", default="256,128", help="block sizes to compare (default 256,128)")
    args = parser.parse_args(argv)
    blocks = [int(k) << 10 for k in args.blocks_kib.split(",")]
    if any(b < 4096 or b >= CHUNK or b & (b - 1) for b in blocks):
        parser.error("--blocks-kib: each size must be a power of two from 4 to 512")
    # one chunk of each file first: the kernels load before anything is timed
    for path in args.files:
        with open(path, "rb") as f:
            head = f.read(CHUNK)
        for block in [0] + blocks:
            stored_and_speed(head, block)
    print("| file | whole 1 MiB chunks | " + " | ".join(f"{b >> 10} KiB blocks" for b in blocks) + " |")
    print("|---|---|" + "---|" * len(blocks))
    for path in args.files:
        data = path.read_bytes()
        whole, one, two = stored_and_speed(data, 0)
        cells = [f"{whole:.4f}; {one:.0f} / {two:.0f} MB/s"]
        for block in blocks:
            frac, b_one, b_two = stored_and_speed(data, block)
            cells.append(f"+{frac - whole:.4f}; {b_one:.0f} / {b_two:.0f} MB/s")
        print(f"| {path.name} | " + " | ".join(cells) + " |", flush=True)
    print("\n(stored fraction, its change for blocks; encoder MB/s on one / two threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
