"""The two measured phases of bench_cache: hot re-read from T0 against tmpfs, and scan resistance per policy."""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench_cache_dccfs import delta, guarded_start, settled_stats, stats, tune
from bench_common import MB, MIB, Daemon, drop_caches, is_mounted

log = logging.getLogger(__name__)

BLOCK = MIB


def must_drop() -> None:
    if not drop_caches():
        raise SystemExit("cannot write /proc/sys/vm/drop_caches (run as root): every figure here needs it")


def read_whole(path: Path, buf: bytearray, sha=None) -> int:
    """Sequential 1 MiB reads into a preallocated buffer; returns the bytes read."""
    total = 0
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [buf])
            if not n:
                return total
            if sha is not None:
                sha.update(view[:n])
            total += n
    finally:
        os.close(fd)


def timed_read(path: Path, buf: bytearray) -> tuple[int, float]:
    started = time.perf_counter()
    n = read_whole(path, buf)
    return n, time.perf_counter() - started


def mmap_load(path: Path, buf: bytearray) -> tuple[int, float]:
    """Load the file the way safetensors does: map it and copy it out 1 MiB at a time (page faults, not
    read calls); returns (bytes, seconds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
            view = memoryview(mapped)
            size = len(view)
            for off in range(0, size, len(buf)):
                n = min(len(buf), size - off)
                buf[:n] = view[off : off + n]
            view.release()
        return size, time.perf_counter() - started
    finally:
        os.close(fd)


def sha1_of(path: Path, buf: bytearray) -> str:
    h = hashlib.sha1()
    read_whole(path, buf, h)
    return h.hexdigest()


# -- tmpfs -----------------------------------------------------------------------------------------

class Tmpfs:
    """A tmpfs this tool mounts for the RAM baseline of the hot re-read, unmounted on exit."""

    def __init__(self, path: Path, size: int):
        self.path, self.size, self.mounted = path, size, False

    def __enter__(self) -> "Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.path):
            raise RuntimeError(f"{self.path} is already mounted")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path)],
                       check=True, capture_output=True)
        self.mounted = True
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()

    def unmount(self) -> None:
        if not self.mounted:
            return
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            log.warning("umount %s failed; lazy unmount", self.path)
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        self.mounted = is_mounted(self.path)


# -- part 1: hot re-read vs tmpfs -------------------------------------------------------------------

def part_hot(daemon: Daemon, model: Path, workdir: Path, reps: int) -> dict:
    mnt = daemon.mnt
    size = model.stat().st_size
    buf = bytearray(BLOCK)
    dst = mnt / "model" / model.name
    dst.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    shutil.copyfile(model, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    write_s = time.perf_counter() - started
    log.info("wrote %s into the mount: %.1f MB/s (copy + fsync)", model.name, size / MB / write_s)
    guarded_start(daemon, remount=True)
    must_drop()
    s0 = stats(mnt)
    n, secs = timed_read(dst, buf)
    assert n == size, (n, size)
    s1 = settled_stats(mnt)
    log.info("cold read (fills T0): %.1f MB/s; %s", size / MB / secs, delta(s1, s0))
    result = {"file": model.name, "bytes": size, "write_mb_s": size / MB / write_s,
              "cold_mb_s": size / MB / secs, "fill": delta(s1, s0), "after_fill": s1, "reps": []}
    with Tmpfs(workdir / "tmpfs", 2 * size + 64 * MIB) as tmp:
        ref = Path(tmp.path) / model.name
        shutil.copyfile(model, ref)
        for rep in range(reps):
            # Alternate the two so that load on this shared machine hits both alike.
            must_drop()
            before = stats(mnt)
            n, d_secs = timed_read(dst, buf)
            after = stats(mnt)
            assert n == size
            # The same read again without a drop: what a user's second load gets, from the
            # kernel's page cache (dccfs opens with keep_cache), not from T0.
            n, k_secs = timed_read(dst, buf)
            assert n == size
            must_drop()
            n, t_secs = timed_read(ref, buf)
            assert n == size
            row = {"dccfs_mb_s": size / MB / d_secs, "tmpfs_mb_s": size / MB / t_secs,
                   "page_cache_mb_s": size / MB / k_secs,
                   "t0_before": {k: before[k] for k in ("t0_hits", "t0_misses", "decodes")},
                   "t0_after": {k: after[k] for k in ("t0_hits", "t0_misses", "decodes")},
                   "delta": delta(after, before)}
            row["ratio"] = row["dccfs_mb_s"] / row["tmpfs_mb_s"]
            row["page_cache_ratio"] = row["page_cache_mb_s"] / row["tmpfs_mb_s"]
            result["reps"].append(row)
            log.info("hot re-read %d: dccfs %.0f MB/s from T0, %.0f MB/s from the page cache, tmpfs %.0f MB/s "
                     "(%.2fx, %.2fx); T0 hits +%d misses +%d, decodes +%d", rep + 1, row["dccfs_mb_s"],
                     row["page_cache_mb_s"], row["tmpfs_mb_s"], row["ratio"], row["page_cache_ratio"],
                     row["delta"]["t0_hits"], row["delta"]["t0_misses"], row["delta"]["decodes"])
        result["mmap"] = _mmap_loads(dst, model, Path(tmp.path), reps, buf)
        src_sha = sha1_of(ref, buf)
    result["verified"] = sha1_of(dst, buf) == src_sha
    ratios = [r["ratio"] for r in result["reps"]]
    result["ratio_median"] = statistics.median(ratios)
    result["dccfs_median"] = statistics.median(r["dccfs_mb_s"] for r in result["reps"])
    result["tmpfs_median"] = statistics.median(r["tmpfs_mb_s"] for r in result["reps"])
    result["page_cache_median"] = statistics.median(r["page_cache_mb_s"] for r in result["reps"])
    result["page_cache_ratio_median"] = statistics.median(r["page_cache_ratio"] for r in result["reps"])
    result["from_t0"] = all(r["delta"]["t0_misses"] == 0 and r["delta"]["decodes"] == 0
                            and r["delta"]["t0_hits"] > 0 for r in result["reps"])
    return result


def _mmap_loads(dst: Path, model: Path, tmp: Path, reps: int, buf: bytearray) -> dict:
    """Two loads through mmap after a drop, of the dccfs file (the first from T0 through FUSE page faults,
    the second from the page cache) and of a fresh tmpfs copy, alternating: what a safetensors load gets."""
    rows = []
    for rep in range(reps):
        fresh = tmp / "fresh-copy"
        shutil.copyfile(model, fresh)
        must_drop()
        t1, t2 = (mmap_load(fresh, buf) for _ in range(2))
        fresh.unlink()
        must_drop()
        d1, d2 = (mmap_load(dst, buf) for _ in range(2))
        row = {k: n / MB / secs for k, (n, secs) in (("tmpfs_first", t1), ("tmpfs_second", t2),
                                                      ("dccfs_first", d1), ("dccfs_second", d2))}
        row["ratio"] = row["dccfs_second"] / row["tmpfs_second"]
        rows.append(row)
        log.info("mmap load %d: dccfs %.0f then %.0f MB/s, fresh tmpfs copy %.0f then %.0f MB/s (%.2fx)", rep + 1,
                 row["dccfs_first"], row["dccfs_second"], row["tmpfs_first"], row["tmpfs_second"], row["ratio"])
    return {"reps": rows, **{f"{k}_median": statistics.median(r[k] for r in rows)
                             for k in ("tmpfs_first", "tmpfs_second", "dccfs_first", "dccfs_second", "ratio")}}


# -- part 2: scan resistance ---------------------------------------------------------------------------

def blocks_of(paths: list[Path]) -> list[tuple[Path, int]]:
    return [(p, off) for p in paths for off in range(0, p.stat().st_size, BLOCK)]


def hot_pass(blocks: list[tuple[Path, int]], fds: dict, buf: bytearray, rng: random.Random) -> tuple[int, float]:
    """Every hot 1 MiB block once, in random order (os.preadv into one buffer)."""
    order = list(blocks)
    rng.shuffle(order)
    total = 0
    started = time.perf_counter()
    for path, off in order:
        total += os.preadv(fds[path], [buf], off)
    return total, time.perf_counter() - started


class Scanner:
    """One sequential reader over the cold files, advanced step by step."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self.fd: int | None = None
        self.done = False

    def step(self, nbytes: int, buf: bytearray) -> int:
        got = 0
        while got < nbytes and not self.done:
            if self.fd is None:
                if not self.paths:
                    self.done = True
                    break
                self.fd = os.open(self.paths.pop(0), os.O_RDONLY)
            n = os.readv(self.fd, [buf])
            if not n:
                os.close(self.fd)
                self.fd = None
                continue
            got += n
        return got

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def hit_ratio(d: dict) -> float | None:
    total = d["t0_hits"] + d["t0_misses"]
    return d["t0_hits"] / total if total else None


def part_scan(daemon: Daemon, policy: str, t0_bytes: int, hot: list[Path], scan: list[Path], seed: int,
              warm_passes: int = 2) -> dict:
    mnt = daemon.mnt
    # A fresh daemon: empty T0, counters from zero, nothing admitted by the writes.
    guarded_start(daemon, remount=True)
    settings = tune(mnt, policy=policy, t0_bytes=t0_bytes)
    assert settings["policy"] == policy and int(settings["t0_bytes"]) == t0_bytes, settings
    buf = bytearray(BLOCK)
    rng = random.Random(seed)
    blocks = blocks_of(hot)
    hot_bytes = sum(p.stat().st_size for p in hot)
    hot_chunks_est = sum((p.stat().st_size + 256 * 1024 - 1) // (256 * 1024) for p in hot)
    fds = {p: os.open(p, os.O_RDONLY) for p in hot}
    scanner = Scanner(scan)
    out: dict = {"policy": policy, "t0_bytes": t0_bytes, "hot_bytes": hot_bytes, "hot_chunks": hot_chunks_est,
                 "warm": [], "rounds": []}
    try:
        for _ in range(warm_passes):
            must_drop()
            hot_pass(blocks, fds, buf, rng)
        must_drop()
        s0 = settled_stats(mnt)
        n, secs = hot_pass(blocks, fds, buf, rng)
        s1 = settled_stats(mnt)
        base = delta(s1, s0)
        out["baseline"] = {**base, "hit_ratio": hit_ratio(base), "mb_s": n / MB / secs,
                           "t0_resident": s1["t0_resident"]}
        log.info("%s: hot set before the scan: T0 hit ratio %.4f, %d decodes, %.0f MB/s, resident %.0f MiB",
                 policy, out["baseline"]["hit_ratio"] or 0, base["decodes"], n / MB / secs,
                 s1["t0_resident"] / MIB)
        scan_total = scan_secs = 0.0
        while not scanner.done:
            must_drop()
            a = stats(mnt)
            started = time.perf_counter()
            got = scanner.step(t0_bytes, buf)
            step_secs = time.perf_counter() - started
            if not got:
                break
            b = settled_stats(mnt)
            scan_total += got
            scan_secs += step_secs
            must_drop()
            c = settled_stats(mnt)
            n, secs = hot_pass(blocks, fds, buf, rng)
            d = settled_stats(mnt)
            hd = delta(d, c)
            row = {"scan_bytes": got, "scan_mb_s": got / MB / step_secs, "scan": delta(b, a),
                   "hot": hd, "hot_hit_ratio": hit_ratio(hd), "hot_mb_s": n / MB / secs,
                   "t0_resident": d["t0_resident"]}
            out["rounds"].append(row)
            log.info("%s round %d: scanned %.0f MB at %.0f MB/s; hot pass: T0 hit ratio %.4f (hits %d, misses %d, "
                     "decodes %d), %.0f MB/s", policy, len(out["rounds"]), got / MB, row["scan_mb_s"],
                     row["hot_hit_ratio"] or 0, hd["t0_hits"], hd["t0_misses"], hd["decodes"], row["hot_mb_s"])
        final = stats(mnt)
    finally:
        scanner.close()
        for fd in fds.values():
            os.close(fd)
    hits = sum(r["hot"]["t0_hits"] for r in out["rounds"])
    misses = sum(r["hot"]["t0_misses"] for r in out["rounds"])
    decodes = sum(r["hot"]["decodes"] for r in out["rounds"])
    during = hits / (hits + misses) if hits + misses else None
    base_ratio = out["baseline"]["hit_ratio"]
    out.update(scan_mb_s=scan_total / MB / scan_secs if scan_secs else None, scan_bytes=scan_total,
               during_hit_ratio=during, during_hits=hits, during_misses=misses, during_decodes=decodes,
               worst_round=min((r["hot_hit_ratio"] for r in out["rounds"] if r["hot_hit_ratio"] is not None),
                               default=None),
               chunk_hit_ratio=1 - decodes / (hot_chunks_est * len(out["rounds"])) if out["rounds"] else None,
               kept=(during / base_ratio) if during is not None and base_ratio else None,
               hot_mb_s_during=statistics.median(r["hot_mb_s"] for r in out["rounds"]) if out["rounds"] else None,
               final=final)
    return out
