"""Where a cold chunk miss's time goes: the record's read from disk, its decode and checksum, against smaller reads.

A cold 4 KiB read through the mount reads one whole chunk record and decodes it (docs/performance.md, "Random 4 KiB
reads"). This tool takes the containers of a backing directory (for example `tools/bench_fs.py --keep`'s
build/bench_fs/dccfs/backing), picks random stored chunks weighted by file size as the random-read workload does,
drops the page cache (root) and times, per chunk, single-threaded and outside FUSE:
- `record`: the pread of the whole record (what a miss reads today), then its decode and checksum (delta chunks
  include the read and decode of their base chunk);
- `1/8` and `1/16`: a cold pread of an eighth or a sixteenth of the same record at a random offset inside it,
  which is what a miss would read if records were cut into segments (128 KiB or 64 KiB of a 1 MiB chunk) that
  decode on their own; each column runs after its own cache drop, on other chunks of the same files;
- `4 KiB`: a cold 4 KiB pread at a random offset of the same files, about what a plain file's miss reads;
- for chunks stored as blocks (codec 3, `read_block_size`): a small read's miss (`Container.read_block`: the
  read of one block, its decode and checks), then the read of one block alone, each after its own cache drop.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from dccfs.container import Container, ContainerError
from dccfs.format import RECORD_HEADER_SIZE, RecordHeader, checksum64, looks_like_container
from dccfs.codecs import codec_name
from dccfs.codecs.delta import CODEC_DELTA

log = logging.getLogger("bench_miss")


def open_containers(root: Path) -> list[Container]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".dccfs" not in p.parts):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not looks_like_container(os.pread(fd, 64, 0)):
                os.close(fd)
                continue
            container = Container.open(fd, str(path))
        except (ContainerError, OSError) as exc:
            log.warning("%s: skipped: %s", path, exc)
            os.close(fd)
            continue
        if container.index:
            found.append(container)
        else:
            os.close(fd)
    return found


def pick(containers: list[Container], n: int, rng: random.Random) -> list[tuple[Container, int]]:
    chosen = rng.choices(containers, weights=[c.size for c in containers], k=n)
    return [(c, rng.choice(sorted(c.index))) for c in chosen]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def time_records(picks) -> dict[str, list[float]]:
    times: dict[str, list[float]] = defaultdict(list)
    for container, idx in picks:
        loc = container.index[idx]
        started = time.perf_counter()
        record = container.read_record(idx, loc)
        read_done = time.perf_counter()
        raw = container.decode_record(idx, record)  # verifies the checksum too
        decoded = time.perf_counter()
        head = RecordHeader.unpack(record)
        kind = "delta" if head.sub == CODEC_DELTA else codec_name(head.sub)
        checksum64(raw)
        summed = time.perf_counter()
        times["read"].append(read_done - started)
        times["decode+check"].append(decoded - read_done)
        times["checksum"].append(summed - decoded)
        times["bytes"].append(len(record))
        times[f"n {kind}"].append(1)
        times[f"decode {kind}"].append(decoded - read_done)
    return times


def time_partial(picks, fraction: int, rng: random.Random) -> list[float]:
    out = []
    for container, idx in picks:
        loc = container.index[idx]
        length = max(1, (loc.length - RECORD_HEADER_SIZE) // fraction)
        start = loc.offset + rng.randrange(0, max(1, loc.length - length))
        started = time.perf_counter()
        os.pread(container.fd, length, start)
        out.append(time.perf_counter() - started)
    return out


def block_picks(containers: list[Container], n: int, rng: random.Random) -> list[tuple[Container, int, int]]:
    """(container, chunk, block) of n random blocks of chunks stored as blocks (codec 3)."""
    blocked = [c for c in containers if any(loc.blocks for loc in c.index.values())]
    if not blocked:
        return []
    out = []
    for c in rng.choices(blocked, weights=[c.size for c in blocked], k=n):
        idx = rng.choice(sorted(i for i, loc in c.index.items() if loc.blocks))
        out.append((c, idx, rng.randrange(len(c.index[idx].blocks))))
    return out


def block_span(loc, block: int) -> tuple[int, int]:
    """Where block `block` of the record at loc starts and ends, relative to the record."""
    return loc.blocks[block], loc.blocks[block + 1] if block + 1 < len(loc.blocks) else loc.length


def time_block_misses(picks) -> list[float]:
    """A small read's miss on a chunk stored as blocks: the read of one block, its decode and its checks."""
    out = []
    for container, idx, block in picks:
        loc = container.index[idx]
        started = time.perf_counter()
        container.read_block(idx, loc, block)
        out.append(time.perf_counter() - started)
    return out


def time_block_reads(picks) -> list[float]:
    """The pread of one block alone (what the miss reads from disk)."""
    out = []
    for container, idx, block in picks:
        loc = container.index[idx]
        start, end = block_span(loc, block)
        started = time.perf_counter()
        os.pread(container.fd, end - start, loc.offset + start)
        out.append(time.perf_counter() - started)
    return out


def time_small_reads(picks, rng: random.Random) -> list[float]:
    """A cold 4 KiB pread at a random offset of the same files: about what a plain file's 4 KiB miss reads."""
    out = []
    for container, _ in picks:
        size = os.fstat(container.fd).st_size
        start = rng.randrange(0, max(1, size - 4096)) & ~4095
        started = time.perf_counter()
        os.pread(container.fd, 4096, start)
        out.append(time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backing", type=Path, help="a backing directory (or any folder of containers)")
    parser.add_argument("--misses", type=int, default=500, help="chunks per column (default 500)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        parser.error("needs root: it drops the page cache before each column")
    containers = open_containers(args.backing)
    if not containers:
        parser.error(f"{args.backing}: no containers with stored chunks")
    rng = random.Random(args.seed)
    warm = pick(containers, 20, rng)
    time_records(warm)  # loads the codec kernels before anything is timed
    drop_caches()
    full = time_records(pick(containers, args.misses, rng))
    partial = {}
    for fraction in (8, 16):
        chosen = pick(containers, args.misses, rng)
        drop_caches()
        partial[fraction] = time_partial(chosen, fraction, rng)
    chosen = pick(containers, args.misses, rng)
    drop_caches()
    small = time_small_reads(chosen, rng)
    blocks = {}
    block_bytes = 0.0
    if block_picks(containers, 1, rng):
        time_block_misses(block_picks(containers, 20, rng))  # the block decoders' kernels
        for name, timer in (("block miss", time_block_misses), ("block read", time_block_reads)):
            chosen = block_picks(containers, args.misses, rng)
            drop_caches()
            blocks[name] = timer(chosen)
        block_bytes = statistics.fmean(end - start for start, end in (block_span(c.index[i], b) for c, i, b in chosen))
    ms = 1e3
    print(f"{len(containers)} files, {args.misses} cold chunks per column, mean record "
          f"{statistics.fmean(full['bytes']) / 1e3:.0f} KB")
    print()
    print("| per miss | mean ms | median ms |")
    print("|---|---|---|")
    for key in ("read", "decode+check", "checksum"):
        print(f"| {key} | {statistics.fmean(full[key]) * ms:.3f} | {statistics.median(full[key]) * ms:.3f} |")
    total = [r + d for r, d in zip(full["read"], full["decode+check"])]
    print(f"| **whole miss** (read + decode + check) | {statistics.fmean(total) * ms:.3f} | "
          f"{statistics.median(total) * ms:.3f} |")
    for fraction, values in partial.items():
        print(f"| read of 1/{fraction} of a record | {statistics.fmean(values) * ms:.3f} | "
              f"{statistics.median(values) * ms:.3f} |")
    print(f"| read of 4 KiB (a plain file's miss) | {statistics.fmean(small) * ms:.3f} | "
          f"{statistics.median(small) * ms:.3f} |")
    labels = {"block miss": "**block miss** (read of one block + decode + check; chunks stored as blocks)",
              "block read": f"read of one block alone (mean {block_bytes / 1e3:.0f} KB)"}
    for name, values in blocks.items():
        print(f"| {labels[name]} | {statistics.fmean(values) * ms:.3f} | {statistics.median(values) * ms:.3f} |")
    print()
    print("| codec | misses | mean decode+check ms |")
    print("|---|---|---|")
    for key in sorted(k for k in full if k.startswith("n ")):
        kind = key[2:]
        print(f"| {kind} | {len(full[key])} | {statistics.fmean(full['decode ' + kind]) * ms:.3f} |")
    for c in containers:
        os.close(c.fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
