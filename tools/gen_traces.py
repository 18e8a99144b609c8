#!/usr/bin/env python3
"""Generate four seeded synthetic chunk-level traces of dccfs workloads (CSV + oracleGeneral)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dccfs.trace import write_csv, write_oracle_general  # noqa: E402

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MIB = 1024 * 1024


class TraceBuilder:
    """Accumulates chunk requests; a chunk's obj_id is (file_id << 24) | chunk_index."""

    def __init__(self, rng: np.random.Generator, first_file_id: int = 1):
        self.rng = rng
        self.file_sizes: dict[int, int] = {}
        self.next_file_id = first_file_id
        self.requests: list[tuple[int, int, bool]] = []  # (obj_id, size, is_write)

    def new_file(self, mean_bytes: float) -> int:
        # Sizes are not chunk multiples, so each file's last chunk is short.
        size = max(1, int(self.rng.uniform(0.5, 1.5) * mean_bytes))
        file_id = self.next_file_id
        self.next_file_id += 1
        self.file_sizes[file_id] = size
        return file_id

    def n_chunks(self, file_id: int) -> int:
        return -(-self.file_sizes[file_id] // CHUNK)

    def chunk(self, file_id: int, index: int, is_write: bool = False) -> None:
        size = min(CHUNK, self.file_sizes[file_id] - index * CHUNK)
        self.requests.append(((file_id << 24) | index, size, is_write))

    def whole_file(self, file_id: int, is_write: bool = False) -> None:
        for index in range(self.n_chunks(file_id)):
            self.chunk(file_id, index, is_write)


def zipf_choice(rng: np.random.Generator, n: int, alpha: float, count: int) -> np.ndarray:
    """count draws of ranks 0..n-1 with P(rank k) proportional to 1/(k+1)^alpha."""
    weights = 1.0 / np.arange(1, n + 1) ** alpha
    return rng.choice(n, size=count, p=weights / weights.sum())


def training(rng: np.random.Generator, first_file_id: int = 1) -> TraceBuilder:
    """Zipf reads of dataset shards; a checkpoint written every 5,000 reads, and the latest
    checkpoint reloaded (evaluation job or restart) with probability 0.5 after each."""
    trace = TraceBuilder(rng, first_file_id)
    shards = [trace.new_file(6 * MIB) for _ in range(600)]
    popular = rng.permutation(len(shards))
    checkpoint = None
    for step, rank in enumerate(zipf_choice(rng, len(shards), 0.9, 7_000)):
        trace.whole_file(shards[popular[rank]])
        if step % 200 == 199:
            checkpoint = trace.new_file(96 * MIB)
            trace.whole_file(checkpoint, is_write=True)
        if checkpoint is not None and step % 200 == 120 and rng.random() < 0.5:
            trace.whole_file(checkpoint)
    return trace


def inference(rng: np.random.Generator, first_file_id: int = 1) -> TraceBuilder:
    """Repeated full loads of a few model files (worker restarts, scale-out) plus Zipf random
    reads of chunks inside them (mmap'ed tensors: embeddings, experts)."""
    trace = TraceBuilder(rng, first_file_id)
    models = [trace.new_file(mean) for mean in (400 * MIB, 250 * MIB, 150 * MIB, 900 * MIB)]
    chunks = [(m, i) for m in models for i in range(trace.n_chunks(m))]
    hot_order = rng.permutation(len(chunks))
    model_popularity = np.array([0.45, 0.3, 0.2, 0.05])
    for _ in range(60):
        trace.whole_file(models[rng.choice(len(models), p=model_popularity)])
        for rank in zipf_choice(rng, len(chunks), 1.1, 2_500):
            trace.chunk(*chunks[hot_order[rank]])
    return trace


def scan_with_hot_set(rng: np.random.Generator, first_file_id: int = 1) -> TraceBuilder:
    """One large cold sequential scan (e.g. a data-validation pass) interleaved 1:2 with
    Zipf reads of a hot set of small files."""
    trace = TraceBuilder(rng, first_file_id)
    hot_files = [trace.new_file(2 * MIB) for _ in range(400)]
    hot_chunks = [(f, i) for f in hot_files for i in range(trace.n_chunks(f))]
    cold = trace.new_file(20_000 * MIB)
    hot_draws = iter(zipf_choice(rng, len(hot_chunks), 0.8, 200_000))
    for index in range(trace.n_chunks(cold)):
        trace.chunk(cold, index)
        for _ in range(2):
            trace.chunk(*hot_chunks[next(hot_draws)])
    for rank in hot_draws:  # the hot set keeps going after the scan
        trace.chunk(*hot_chunks[rank])
    return trace


def mixed(rng: np.random.Generator) -> TraceBuilder:
    """The three workloads sharing one node's cache, interleaved in random bursts."""
    parts = [training(rng, 1), inference(rng, 10_000), scan_with_hot_set(rng, 20_000)]
    # Keep every ~third request of each so the mix has a similar length to the others.
    streams = [p.requests[: len(p.requests) // 3] for p in parts]
    merged = TraceBuilder(rng)
    positions = [0, 0, 0]
    while any(pos < len(s) for pos, s in zip(positions, streams)):
        which = rng.integers(3)
        burst = int(rng.integers(50, 500))
        stream = streams[which]
        merged.requests.extend(stream[positions[which]: positions[which] + burst])
        positions[which] += burst
    return merged


WORKLOADS = {"training": training, "inference": inference, "scan": scan_with_hot_set,
             "mixed": mixed}


def write_trace(trace: TraceBuilder, out_base: Path) -> None:
    ids = np.array([r[0] for r in trace.requests], dtype=np.uint64)
    sizes = np.array([r[1] for r in trace.requests], dtype=np.uint32)
    writes = np.array([r[2] for r in trace.requests], dtype=bool)
    times = np.arange(len(ids)) / 1000.0  # 1,000 chunk requests per second
    write_csv(out_base.with_suffix(".csv"), times, ids, sizes, writes)
    write_oracle_general(out_base.with_suffix(".oracleGeneral.bin"), times, ids, sizes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for name, make in WORKLOADS.items():
        trace = make(np.random.default_rng([args.seed, len(name)]))
        write_trace(trace, args.outdir / name)
        ids = {r[0] for r in trace.requests}
        print(f"{name}: {len(trace.requests)} requests, {len(ids)} chunks, "
              f"{sum(r[2] for r in trace.requests)} writes -> {args.outdir / name}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
