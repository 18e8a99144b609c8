"""T0 cache benchmark through a real dccfs mount: hot re-read from RAM vs tmpfs, and scan resistance per policy.

Part 1 (hot re-read): write a real model into the mount, remount (cold), read it once (fills T0), drop the
kernel page cache (the FUSE mount's pages go too, so the next read reaches the daemon) and read it again.
The MB/s of that read is compared with reading the same file from a tmpfs after the same drop (tmpfs pages
cannot be dropped: that is the RAM baseline). T0 hits/misses and chunk decodes from `dccfs stats --json`
around the timed read show whether it was served from T0 (misses and decodes must not grow).

Part 2 (scan resistance): a hot file set that fits in `t0_bytes` is re-read (every 1 MiB block once per pass,
in random order) between steps of one sequential scan over a cold file set ten times larger. Each step of
the scan reads `t0_bytes` of cold data (one cache's worth), so a policy without scan resistance loses the
hot set between two hot passes. The page cache is dropped before every phase. The hot set's T0 hit ratio is
taken from the stats deltas of the hot passes only (nothing else reads while they run); "kept" is the hit
ratio during the scan divided by the one measured just before the scan started. Run for the default policy
and, via `dccfs tune`, for lru and s3fifo (each on a fresh mount, so they start from an empty T0).

Data is realistic: the model for part 1 is the real file; the hot and cold sets of part 2 are real fp32
corpus tensors, shuffled, scaled by a per-file factor and cast to bf16 or fp16 (alternating by file), saved
as safetensors, so they compress like real weights (os.urandom would be stored raw). File names contain no
digits, so the checkpoint-delta codec (which looks for siblings whose names differ only in digits) stays
out of the way.

Run as root (mounting a tmpfs, dropping caches). Everything this tool mounts is unmounted in `finally`;
the only processes it stops are the dccfs daemons it started, by PID.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (REPO, Daemon, drop_caches, fs_of, fusermount_unmount,  # noqa: E402
                          is_mounted, machine_facts, mountinfo, tree_state)

log = logging.getLogger("bench_cache")

MIB = 1 << 20
MB = 10**6
BLOCK = MIB
DEFAULT_POLICY = "wtinylfu"
HOT_TARGET_RATIO = 0.9     # dccfs hot re-read >= 0.9x tmpfs
KEPT_TARGET = 0.9          # >= 90% of the hot set's hits kept during the scan


# -- sizes per mode --------------------------------------------------------------------------------

def mode_params(quick: bool) -> dict:
    if quick:
        return {"model": "minilm_bf16", "source": ["minilm_fp32", "mpnet_fp32"],
                "hot_files": 2, "hot_bytes": 50 * MB, "scan_files": 5, "scan_bytes": 500 * MB,
                "t0_bytes": 100 * MIB}
    return {"model": "mpnet_bf16", "source": ["mpnet_fp32", "minilm_fp32"],
            "hot_files": 4, "hot_bytes": 200 * MB, "scan_files": 10, "scan_bytes": 2000 * MB,
            "t0_bytes": 400 * MIB}


# -- small helpers ---------------------------------------------------------------------------------

# Where the daemon and the CLI import dccfs from: None = this checkout (python -m dccfs.cli), or a
# directory holding a `git archive` of one revision (--dccfs-rev), put first on sys.path.
DCCFS_SRC: Path | None = None
_BOOT = "import sys; sys.path.insert(0, {src!r}); sys.argv[0] = 'dccfs'; from dccfs.cli import main; main()"


def dccfs_cmd(*args: str) -> list[str]:
    if DCCFS_SRC is None:
        return [sys.executable, "-m", "dccfs.cli", *args]
    return [sys.executable, "-c", _BOOT.format(src=str(DCCFS_SRC)), *args]


def export_rev(rev: str, dest: Path) -> Path:
    """`git archive REV` of the package directories into dest, laid out as an importable `dccfs`."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True,
                         cwd=str(REPO), check=True).stdout.strip()
    out = dest / sha[:12]
    if not (out / "dccfs" / "cli.py").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha, "dccfs", "codecs", "policies"], capture_output=True,
                                 cwd=str(REPO), check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        # pyproject maps dccfs.codecs -> codecs/ and dccfs.policies -> policies/.
        (out / "dccfs" / "codecs").symlink_to("../codecs")
        (out / "dccfs" / "policies").symlink_to("../policies")
    return out


def dccfs_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(dccfs_cmd(*args), capture_output=True, text=True, cwd=str(REPO), timeout=timeout)


def stats(mnt: Path) -> dict:
    """`dccfs stats --json MNT`, reduced to the counters this benchmark uses."""
    result = dccfs_cli("stats", "--json", str(mnt))
    if result.returncode != 0:
        raise RuntimeError(f"dccfs stats failed: {result.stderr.strip()}")
    reply = json.loads(result.stdout)
    t0, t2 = reply["stats"]["tiers"]["t0"], reply["stats"]["tiers"]["t2"]
    return {"t0_hits": t0["hits"], "t0_misses": t0["misses"], "t0_resident": t0["resident_bytes"],
            "t0_admissions": t0["admissions"], "t0_refused": t0["refused"], "t0_evictions": t0["evictions"],
            "decodes": t2["misses"], "readahead": reply["stats"].get("readahead_chunks", 0),
            "policy": reply["cache"]["policy"], "t0_bytes": reply["cache"]["t0_bytes"]}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if isinstance(after[k], int) and k in before
            and k not in ("t0_resident", "t0_bytes")}


def settled_stats(mnt: Path, tries: int = 6) -> dict:
    """Stats once background read-ahead has stopped decoding (two snapshots with equal decode counts)."""
    prev = stats(mnt)
    for _ in range(tries):
        time.sleep(0.1)
        cur = stats(mnt)
        if cur["decodes"] == prev["decodes"] and cur["t0_admissions"] == prev["t0_admissions"]:
            return cur
        prev = cur
    return prev


def tune(mnt: Path, **settings) -> dict:
    result = dccfs_cli("tune", str(mnt), *[f"{k}={v}" for k, v in settings.items()])
    if result.returncode != 0:
        raise RuntimeError(f"dccfs tune {settings} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


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


def sha1_of(path: Path, buf: bytearray) -> str:
    h = hashlib.sha1()
    read_whole(path, buf, h)
    return h.hexdigest()


def letters(i: int) -> str:
    """a, b, ..., z, ba, bb, ...: file names without digits (keeps the delta codec's series detection off)."""
    out = ""
    while True:
        out = string.ascii_lowercase[i % 26] + out
        i //= 26
        if i == 0:
            return out


# -- tmpfs -----------------------------------------------------------------------------------------

class Tmpfs:
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


# -- realistic data --------------------------------------------------------------------------------

class TensorStream:
    """Endless realistic tensor data: real fp32 corpus tensors, shuffled, scaled, cast; one variant per pass."""

    def __init__(self, corpus: Path, sources: list[str], seed: int):
        from safetensors.torch import load_file
        self.tensors = []
        for name in sources:
            path = corpus / "real" / f"{name}.safetensors"
            if path.exists():
                sd = load_file(str(path))
                self.tensors = [(k, v.flatten()) for k, v in sd.items() if v.is_floating_point() and v.numel()]
                log.info("realistic data from %s (%d tensors, %.0f M parameters)", path.name, len(self.tensors),
                         sum(v.numel() for _, v in self.tensors) / 1e6)
                break
        if not self.tensors:
            raise SystemExit(f"none of {sources} in {corpus}/real (make corpus / make corpus-full)")
        self.rng = random.Random(seed)
        self.variant = -1
        self.queue: list = []

    def _refill(self) -> None:
        self.variant += 1
        order = list(self.tensors)
        self.rng.shuffle(order)
        scale = 1.0 + 0.0137 * (self.variant + 1)
        self.queue = [(f"{k}.v{self.variant}", v, scale) for k, v in order]

    def file_dict(self, nbytes: int, dtype) -> dict:
        """Tensors of `dtype` adding up to nbytes (the last one cut to fit)."""
        out, have, elem = {}, 0, dtype.itemsize
        while have < nbytes:
            if not self.queue:
                self._refill()
            name, t, scale = self.queue.pop(0)
            want = (nbytes - have) // elem
            if want <= 0:
                break
            if t.numel() > want:
                self.queue.insert(0, (name + ".tail", t[want:], scale))
                t = t[:want]
            out[name] = (t * scale).to(dtype).contiguous()
            have += t.numel() * elem
        return out


def write_set(stream: TensorStream, root: Path, prefix: str, files: int, total: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        dtype = torch.bfloat16 if i % 2 == 0 else torch.float16
        path = root / f"{prefix}_{letters(i)}.safetensors"
        save_file(stream.file_dict(total // files, dtype), str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        paths.append(path)
    return paths


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
    with Tmpfs(workdir / "tmpfs", size + 64 * MIB) as tmp:
        ref = Path(tmp.path) / model.name
        shutil.copyfile(model, ref)
        for rep in range(reps):
            # Alternate the two so that load on this shared machine hits both alike.
            must_drop()
            before = stats(mnt)
            n, d_secs = timed_read(dst, buf)
            after = stats(mnt)
            assert n == size
            must_drop()
            n, t_secs = timed_read(ref, buf)
            assert n == size
            row = {"dccfs_mb_s": size / MB / d_secs, "tmpfs_mb_s": size / MB / t_secs,
                   "t0_before": {k: before[k] for k in ("t0_hits", "t0_misses", "decodes")},
                   "t0_after": {k: after[k] for k in ("t0_hits", "t0_misses", "decodes")},
                   "delta": delta(after, before)}
            row["ratio"] = row["dccfs_mb_s"] / row["tmpfs_mb_s"]
            result["reps"].append(row)
            log.info("hot re-read %d: dccfs %.0f MB/s, tmpfs %.0f MB/s (%.2fx); T0 hits +%d misses +%d, "
                     "decodes +%d", rep + 1, row["dccfs_mb_s"], row["tmpfs_mb_s"], row["ratio"],
                     row["delta"]["t0_hits"], row["delta"]["t0_misses"], row["delta"]["decodes"])
        src_sha = sha1_of(ref, buf)
    result["verified"] = sha1_of(dst, buf) == src_sha
    ratios = [r["ratio"] for r in result["reps"]]
    result["ratio_median"] = statistics.median(ratios)
    result["dccfs_median"] = statistics.median(r["dccfs_mb_s"] for r in result["reps"])
    result["tmpfs_median"] = statistics.median(r["tmpfs_mb_s"] for r in result["reps"])
    result["from_t0"] = all(r["delta"]["t0_misses"] == 0 and r["delta"]["decodes"] == 0
                            and r["delta"]["t0_hits"] > 0 for r in result["reps"])
    return result


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


# -- the run ------------------------------------------------------------------------------------------

def clear_workdir(workdir: Path) -> None:
    prefix = str(workdir.resolve()) + "/"
    for mnt, fstype, _, _ in mountinfo():
        if mnt.startswith(prefix):
            log.warning("unmounting %s (%s), left mounted by an earlier run of this tool", mnt, fstype)
            if fstype.startswith("fuse"):
                fusermount_unmount(mnt)
            else:
                subprocess.run(["umount", mnt], capture_output=True)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)


class Watchdog(threading.Thread):
    """Kills the daemon this tool started (by PID) if the run outlives its deadline, so that a hung mount
    turns into ENOTCONN errors and the `finally` clean-up runs instead of blocking forever."""

    def __init__(self, daemon: Daemon, seconds: float):
        super().__init__(daemon=True)
        self.target, self.seconds, self.stopped = daemon, seconds, threading.Event()
        self.fired = False

    def run(self) -> None:
        if self.stopped.wait(self.seconds):
            return
        proc = self.target.proc
        if proc is not None and proc.poll() is None:
            self.fired = True
            log.error("deadline of %.0f s passed: killing dccfs pid %d (hung?)", self.seconds, proc.pid)
            proc.kill()

    def cancel(self) -> None:
        self.stopped.set()


MOUNT_GUARD_S = 90


def guarded_start(daemon: Daemon, remount: bool = False) -> None:
    """daemon.start()/remount(), killing our daemon if the mount does not come up (answer INIT) in time."""
    def kill():
        proc = daemon.proc
        if proc is not None and proc.poll() is None:
            log.error("dccfs pid %d did not answer on its mount within %d s; killing it", proc.pid, MOUNT_GUARD_S)
            proc.kill()
    timer = threading.Timer(MOUNT_GUARD_S, kill)
    timer.daemon = True
    timer.start()
    try:
        daemon.remount() if remount else daemon.start()
        os.stat(daemon.mnt)  # the mount answers
    finally:
        timer.cancel()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")




def run(args) -> dict:
    p = mode_params(args.quick)
    if args.t0_bytes:
        from dccfs.config import parse_size
        p["t0_bytes"] = parse_size(args.t0_bytes)
    corpus = Path(args.corpus)
    model = corpus / "real" / f"{p['model']}.safetensors"
    if not model.exists():
        raise SystemExit(f"{model} missing (make corpus-full builds mpnet; --quick uses minilm)")
    global DCCFS_SRC
    if args.dccfs_rev:
        DCCFS_SRC = export_rev(args.dccfs_rev, REPO / "build" / "bench_cache_src")
        log.info("dccfs from %s (git archive of %s)", DCCFS_SRC, args.dccfs_rev)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    workdir = Path(args.workdir).resolve()
    clear_workdir(workdir)
    if fs_of(workdir)[1] in ("tmpfs", "ramfs"):
        raise SystemExit(f"{workdir} is on a RAM filesystem; use a directory on a disk")
    facts = machine_facts(workdir)
    facts["dccfs_tree"] = (tree_state() if DCCFS_SRC is None
                           else f"git archive {DCCFS_SRC.name} ({args.dccfs_rev})")
    facts["loadavg_start"] = os.getloadavg()
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "mode": "quick" if args.quick else "full", "params": p, "policies": policies,
                    "machine": facts}
    backing, mnt = workdir / "backing", workdir / "mnt"
    backing.mkdir()
    daemon = Daemon("dccfs", dccfs_cmd("mount", "--foreground", str(backing), str(mnt)), mnt,
                    workdir / "dccfs.log")
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    watchdog = Watchdog(daemon, args.deadline)
    try:
        # A daemon that never answers FUSE INIT blocks even a stat of the mountpoint (is_mounted's
        # realpath); only killing our daemon unblocks it, so a watchdog does that at the deadline.
        watchdog.start()
        guarded_start(daemon)
        log.info("dccfs mounted on %s (pid %d)", mnt, daemon.pid)
        cfg = stats(mnt)
        report["default_cache"] = {"policy": cfg["policy"], "t0_bytes": cfg["t0_bytes"]}
        if not args.skip_hot:
            log.info("== part 1: hot re-read of %s from T0 vs tmpfs", model.name)
            report["hot"] = part_hot(daemon, model, workdir, args.reps)
        if not args.skip_scan:
            log.info("== part 2: writing a %.0f MB hot set and a %.0f MB scan set of realistic tensors",
                     p["hot_bytes"] / MB, p["scan_bytes"] / MB)
            stream = TensorStream(corpus, p["source"], args.seed)
            t = time.perf_counter()
            hot = write_set(stream, mnt / "hot", "hot", p["hot_files"], p["hot_bytes"])
            scan = write_set(stream, mnt / "scan", "scan", p["scan_files"], p["scan_bytes"])
            secs = time.perf_counter() - t
            del stream
            written = sum(x.stat().st_size for x in hot + scan)
            stored = sum(os.stat(backing / x.relative_to(mnt)).st_blocks * 512 for x in hot + scan)
            report["scan_data"] = {"hot_files": [x.name for x in hot], "scan_files": [x.name for x in scan],
                                   "logical": written, "stored": stored, "write_mb_s": written / MB / secs}
            log.info("wrote %.0f MB at %.1f MB/s; stored %.0f MB (%.3f)", written / MB, written / MB / secs,
                     stored / MB, stored / written)
            report["scan"] = []
            for i, policy in enumerate(policies):
                log.info("== part 2: scan resistance, policy %s, t0_bytes %d MiB", policy, p["t0_bytes"] // MIB)
                report["scan"].append(part_scan(daemon, policy, p["t0_bytes"], hot, scan, args.seed + i))
        daemon.sample_rss()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        watchdog.cancel()
        try:
            daemon.stop()
        except Exception:
            log.exception("stopping dccfs")
        leftovers = [m for m, *_ in mountinfo() if m.startswith(str(workdir) + "/")]
        if leftovers:
            log.error("still mounted: %s", leftovers)
        elif not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["peak_rss"] = daemon.peak_rss
    report["machine"]["loadavg_end"] = os.getloadavg()
    return report


# -- reporting ----------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(report: dict) -> str:
    p = report["params"]
    m = report["machine"]
    lines = [f"bench_cache {report['mode']} run, {report['date']}, {report['elapsed_s']} s; "
             f"{m.get('nproc')} cores, load average {m['loadavg_start'][0]:.1f} at start, "
             f"{m['loadavg_end'][0]:.1f} at end; dccfs tree {m.get('dccfs_tree')}; "
             f"default cache {report['default_cache']['policy']} {report['default_cache']['t0_bytes'] // MIB} MiB; "
             f"daemon peak RSS {report['peak_rss'] / MB:.0f} MB", ""]
    checks = []
    if "hot" in report:
        h = report["hot"]
        lines += [f"### 1. Hot re-read of {h['file']} ({h['bytes'] / MB:.1f} MB), 1 MiB reads, page cache dropped "
                  f"before each read", "",
                  f"write into the mount {h['write_mb_s']:.1f} MB/s; cold read after remount (fills T0) "
                  f"{h['cold_mb_s']:.1f} MB/s: T0 hits +{h['fill']['t0_hits']}, misses +{h['fill']['t0_misses']}, "
                  f"chunk decodes +{h['fill']['decodes']}, T0 resident {h['after_fill']['t0_resident'] / MIB:.0f} MiB;"
                  f" sha1 through the mount matches: {h['verified']}", "",
                  "| rep | dccfs MB/s (from T0) | tmpfs MB/s | dccfs/tmpfs | T0 hits before → after | "
                  "T0 misses before → after | decodes before → after |", "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(h["reps"]):
            b, a = r["t0_before"], r["t0_after"]
            lines.append(f"| {i + 1} | {r['dccfs_mb_s']:,.0f} | {r['tmpfs_mb_s']:,.0f} | {r['ratio']:.2f} | "
                         f"{b['t0_hits']} → {a['t0_hits']} | {b['t0_misses']} → {a['t0_misses']} | "
                         f"{b['decodes']} → {a['decodes']} |")
        lines.append(f"| median | {h['dccfs_median']:,.0f} | {h['tmpfs_median']:,.0f} | {h['ratio_median']:.2f} | | | |")
        lines.append("")
        checks.append((f"hot re-read from T0 >= {HOT_TARGET_RATIO}x tmpfs", f"{h['ratio_median']:.2f}x (median)",
                       "met" if h["ratio_median"] >= HOT_TARGET_RATIO else "MISSED"))
        checks.append(("second read served from T0 (T0 misses and decodes unchanged)",
                       "yes" if h["from_t0"] else "no", "met" if h["from_t0"] else "MISSED"))
    if "scan" in report:
        sd = report["scan_data"]
        lines += [f"### 2. Scan resistance: hot set {p['hot_bytes'] / MB:.0f} MB ({len(sd['hot_files'])} files), "
                  f"scan {p['scan_bytes'] / MB:.0f} MB ({len(sd['scan_files'])} files) read once, "
                  f"t0_bytes {p['t0_bytes'] // MIB} MiB, one hot pass after every {p['t0_bytes'] // MIB} MiB "
                  f"of scan", "",
                  f"data: {sd['logical'] / MB:.0f} MB logical, {sd['stored'] / MB:.0f} MB stored "
                  f"({sd['stored'] / sd['logical']:.3f}), written at {sd['write_mb_s']:.1f} MB/s", "",
                  "T0 hit ratios count FUSE read requests (one per chunk a request touches); the chunk column "
                  "counts hot chunks that had to be decoded again, which is the stricter measure.", "",
                  "| policy | hot T0 hit ratio before scan | during scan (all hot passes) | worst pass | kept | "
                  "hot chunks decoded during scan | hot chunks kept | hot pass MB/s (median) | scan MB/s | "
                  "T0 evictions / refused | target (kept >= 90%) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in report["scan"]:
            kept = s["kept"]
            status = "met" if kept is not None and kept >= KEPT_TARGET else "MISSED"
            name = s["policy"] + (" (default)" if s["policy"] == report["default_cache"]["policy"] else "")
            lines.append(f"| {name} | {_pct(s['baseline']['hit_ratio'])} | {_pct(s['during_hit_ratio'])} "
                         f"({s['during_hits']}/{s['during_hits'] + s['during_misses']}) | {_pct(s['worst_round'])} | "
                         f"{_pct(kept)} | {s['during_decodes']} of {s['hot_chunks'] * len(s['rounds'])} | "
                         f"{_pct(s['chunk_hit_ratio'])} | "
                         f"{s['hot_mb_s_during']:,.0f} | {s['scan_mb_s']:,.0f} | "
                         f"{s['final']['t0_evictions']} / {s['final']['t0_refused']} | {status} |")
            checks.append((f"scan resistance, {name}: >= 90% of hot hits kept", _pct(kept), status))
        lines += ["", "Per hot pass (T0 hit ratio of the hot set after each scan step):", "",
                  "| policy | " + " | ".join(f"pass {i + 1}" for i in range(max(len(s["rounds"]) for s in report["scan"])))
                  + " |", "|---|" + "---|" * max(len(s["rounds"]) for s in report["scan"])]
        for s in report["scan"]:
            lines.append(f"| {s['policy']} | " + " | ".join(_pct(r["hot_hit_ratio"]) for r in s["rounds"]) + " |")
        lines.append("")
    lines += ["| target | measured | status |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="minilm_bf16, 50 MB hot set, 500 MB scan, t0_bytes 100 MiB")
    parser.add_argument("--corpus", default=str(REPO / ".corpus"))
    parser.add_argument("--workdir", default=str(REPO / "build" / "bench_cache"),
                        help="fresh backing dir, mountpoint and tmpfs go here (on a disk); removed afterwards")
    parser.add_argument("--policies", default=f"{DEFAULT_POLICY},lru,s3fifo")
    parser.add_argument("--t0-bytes", default=None, help="override the scan part's t0_bytes (e.g. 400MiB)")
    parser.add_argument("--reps", type=int, default=3, help="timed hot re-reads (each dccfs then tmpfs)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-hot", action="store_true")
    parser.add_argument("--skip-scan", action="store_true")
    parser.add_argument("--dccfs-rev", default=None,
                        help="run the daemon from `git archive REV` instead of the working tree (e.g. HEAD)")
    parser.add_argument("--deadline", type=float, default=1800,
                        help="kill the daemon this tool started if the run takes longer (s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", default=None, help="also write the full report here")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--render", default=None, metavar="JSON", help="only print a saved --json report")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts a tmpfs and drops the page cache")
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
