"""The bench_fs data set, its targets, and the timed write and read workloads run on them."""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import MIB, Daemon

log = logging.getLogger(__name__)

READ_BLOCK = MIB
RAND_BLOCK = 4096
RAND_TIME_CAP_S = 90.0


@dataclass
class DataSet:
    corpus: Path
    models: list[str]          # names under real/, each saved with torch.save and save_file
    ckpts: list[str]           # names under ckpt/, copied with shutil.copyfile
    small_copies: int          # copies of models/minilm's small files
    rand_reads: int            # 4 KiB random preads per target

    @classmethod
    def make(cls, corpus: Path, quick: bool) -> "DataSet":
        if quick:
            return cls(corpus, ["minilm_bf16", "minilm_fp32"], ["minilm_ft_step10.pt"], 10, 500)
        ckpts = [f"minilm_ft_step{s}.{ext}" for s in (10, 20, 30) for ext in ("pt", "safetensors")]
        return cls(corpus, ["mpnet_bf16", "mpnet_fp32"], ckpts, 50, 3000)

    def small_files(self) -> list[Path]:
        """The tokenizer/config files of models/minilm (everything but the weights), relative."""
        base = self.corpus / "models" / "minilm"
        out = []
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix not in (".safetensors", ".bin", ".pt") \
                    and path.stat().st_size < 4 * MIB:
                out.append(path.relative_to(base))
        return out

    def check(self) -> None:
        missing = [p for p in [self.corpus / "real" / f"{m}.safetensors" for m in self.models]
                   + [self.corpus / "ckpt" / c for c in self.ckpts] if not p.exists()]
        if missing:
            raise SystemExit(f"corpus files missing (make corpus-full builds them): {missing}")


@dataclass
class Target:
    name: str
    root: Path                       # where workloads write: the plain directory or the mountpoint
    backing: Path
    daemon: Daemon | None = None
    dccfs_budget: int | None = None  # t0_bytes + dirty_bytes, from dccfs stats --json
    dccfs_stats: dict | None = None
    results: dict = field(default_factory=dict)   # workload -> {"value", "unit", ...}

    def remount(self) -> None:
        if self.daemon is not None:
            self.daemon.remount()


# -- helpers ---------------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path, buf: bytearray) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            total += n


def warm(paths: list[Path]) -> None:
    buf = bytearray(READ_BLOCK)
    for p in paths:
        read_file(p, buf)


def record(t: Target, workload: str, unit: str, amount: float, secs: float, **extra) -> None:
    value = amount / secs if secs > 0 else float("inf")
    t.results[workload] = {"value": value, "unit": unit, "amount": amount, "secs": secs, **extra}
    log.info("%-12s %-24s %10.1f %s  (%.2f s)", t.name, workload, value, unit, secs)


# -- workloads -------------------------------------------------------------------------

def write_items(ds: DataSet, state_dicts: dict) -> list[tuple[str, str, object]]:
    """(kind, file name, save(path)) for every file of the sequential-write workload, in order."""
    import torch
    from safetensors.torch import save_file
    items = []
    for name, sd in state_dicts.items():
        items.append(("torch.save", f"{name}.pt", lambda p, sd=sd: torch.save(sd, p)))
        items.append(("save_file", f"{name}.safetensors", lambda p, sd=sd: save_file(sd, p)))
    for ckpt in ds.ckpts:
        src = ds.corpus / "ckpt" / ckpt
        items.append(("ckpt copy", ckpt, lambda p, src=src: shutil.copyfile(src, p)))
    return items


def seq_write(targets: list[Target], ds: DataSet, state_dicts: dict) -> None:
    """Write every file to each target before the next file, the first target rotating per file.

    The disk is shared: a cloud volume that slows down as it absorbs writes (its burst budget
    spent) made whichever target wrote last look 2-5x slower when each target wrote all its
    files in turn (dccfs/passthrough 0.23x in that order, 2.1x in the reverse one, same tree).
    Interleaved, every target meets the same disk.
    """
    warm([ds.corpus / "ckpt" / c for c in ds.ckpts])  # the copy should measure the target, not the corpus disk
    totals = {t.name: {"torch.save": [0, 0.0], "save_file": [0, 0.0], "ckpt copy": [0, 0.0]} for t in targets}
    for t in targets:
        (t.root / "seq").mkdir(parents=True, exist_ok=True)
    for i, (kind, fname, save) in enumerate(write_items(ds, state_dicts)):
        k = i % len(targets)
        for t in targets[k:] + targets[:k]:
            path = t.root / "seq" / fname
            started = time.perf_counter()
            save(path)
            fsync_path(path)
            totals[t.name][kind][1] += time.perf_counter() - started
            totals[t.name][kind][0] += path.stat().st_size
    for t in targets:
        for kind, (nbytes, secs) in totals[t.name].items():
            record(t, f"write {kind}", "MB/s", nbytes / 1e6, secs)
        nbytes = sum(v[0] for v in totals[t.name].values())
        secs = sum(v[1] for v in totals[t.name].values())
        record(t, "write all (seq)", "MB/s", nbytes / 1e6, secs)


def seq_files(t: Target) -> list[Path]:
    return sorted((t.root / "seq").iterdir())


def seq_read(t: Target, workload: str) -> None:
    buf = bytearray(READ_BLOCK)
    nbytes = 0
    started = time.perf_counter()
    for path in seq_files(t):
        nbytes += read_file(path, buf)
    record(t, workload, "MB/s", nbytes / 1e6, time.perf_counter() - started)


def digests(t: Target) -> dict[str, str]:
    out = {}
    for path in seq_files(t) + sorted(p for p in (t.root / "small").rglob("*") if p.is_file()):
        h = hashlib.sha1()
        with open(path, "rb") as f:
            while chunk := f.read(8 * MIB):
                h.update(chunk)
        out[str(path.relative_to(t.root))] = h.hexdigest()
    return out


def rand_plan(t: Target, n: int, seed: int, pattern: str | None = None) -> list[tuple[str, int]]:
    """n 4 KiB-aligned offsets in the written files (those whose name matches pattern, when given), files
    picked in proportion to their size."""
    files = [(p.name, p.stat().st_size) for p in seq_files(t) if pattern is None or fnmatch.fnmatch(p.name, pattern)]
    if not files:
        raise SystemExit(f"--rand-files {pattern!r} matches none of the written files")
    rng = random.Random(seed)
    weights = [size for _, size in files]
    picks = rng.choices(files, weights=weights, k=n)
    return [(name, rng.randrange(0, max(1, size // RAND_BLOCK)) * RAND_BLOCK) for name, size in picks]


def rand_read(t: Target, plan: list[tuple[str, int]], workload: str) -> None:
    fds = {}
    try:
        for name in {name for name, _ in plan}:
            fds[name] = os.open(t.root / "seq" / name, os.O_RDONLY)
        done = 0
        started = time.perf_counter()
        deadline = started + RAND_TIME_CAP_S
        for name, off in plan:
            os.pread(fds[name], RAND_BLOCK, off)
            done += 1
            if (done & 63) == 0 and time.perf_counter() > deadline:
                log.warning("%s %s: stopped after %d reads (time cap %ds)", t.name, workload, done,
                            RAND_TIME_CAP_S)
                break
        record(t, workload, "IOPS", done, time.perf_counter() - started, reads=done)
    finally:
        for fd in fds.values():
            os.close(fd)


def small_write(t: Target, ds: DataSet, rels: list[Path]) -> None:
    base = ds.corpus / "models" / "minilm"
    warm([base / r for r in rels])
    started = time.perf_counter()
    for i in range(ds.small_copies):
        for rel in rels:
            dst = t.root / "small" / f"copy{i:03d}" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / rel, dst)
    record(t, "small files write", "files/s", ds.small_copies * len(rels), time.perf_counter() - started)


def small_read(t: Target, ds: DataSet, rels: list[Path], workload: str) -> None:
    buf = bytearray(READ_BLOCK)
    started = time.perf_counter()
    for i in range(ds.small_copies):
        for rel in rels:
            read_file(t.root / "small" / f"copy{i:03d}" / rel, buf)
    record(t, workload, "files/s", ds.small_copies * len(rels), time.perf_counter() - started)


def load_state_dicts(ds: DataSet) -> dict:
    from safetensors.torch import load_file
    out = {}
    for name in ds.models:
        out[name] = load_file(str(ds.corpus / "real" / f"{name}.safetensors"))
    return out
