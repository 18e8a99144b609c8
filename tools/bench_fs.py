"""Filesystem benchmark: the same real-data workloads on a plain directory, a Python passthrough mount and dccfs."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (REPO, Daemon, drop_caches, du, fs_of, fusermount_unmount,  # noqa: E402
                          machine_facts, mountinfo, set_read_ahead_kb, tree_state)

log = logging.getLogger("bench_fs")

ALL_TARGETS = ("plain", "passthrough", "dccfs")
MIB = 1 << 20
READ_BLOCK = MIB
RAND_BLOCK = 4096
RAND_TIME_CAP_S = 90.0
STATE_DIRS = (".dccfs",)
RSS_SLACK = 200 * 10**6


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




def dccfs_stats(mnt: Path) -> dict | None:
    result = subprocess.run([sys.executable, "-m", "dccfs.cli", "stats", "--json", str(mnt)],
                            capture_output=True, text=True, cwd=str(REPO), timeout=60)
    if result.returncode != 0:
        log.warning("dccfs stats failed: %s", result.stderr.strip())
        return None
    return json.loads(result.stdout)


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


def rand_plan(t: Target, n: int, seed: int) -> list[tuple[str, int]]:
    files = [(p.name, p.stat().st_size) for p in seq_files(t)]
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


# -- setup and teardown ------------------------------------------------------------------

def make_targets(names: list[str], workdir: Path, args) -> list[Target]:
    targets = []
    for name in names:
        base = workdir / name
        if name == "plain":
            targets.append(Target(name, base / "data", base / "data"))
            continue
        backing, mnt = base / "backing", base / "mnt"
        if name == "passthrough":
            cmd = [sys.executable, str(REPO / "tools" / "passthrough.py"), "-f", *args.passthrough_arg,
                   str(backing), str(mnt)]
        else:
            cmd = [sys.executable, "-m", "dccfs.cli", "mount", "--foreground"]
            if args.dccfs_config:
                cmd += ["-c", str(Path(args.dccfs_config).resolve())]
            cmd += [str(backing), str(mnt)]
        daemon = Daemon(name, cmd, mnt, base / f"{name}.log")
        if args.read_ahead_kb:
            daemon.after_mount = lambda m, kb=args.read_ahead_kb: set_read_ahead_kb(m, kb)
        targets.append(Target(name, mnt, backing, daemon))
    return targets


def clear_workdir(workdir: Path, names: list[str]) -> None:
    """Fresh directories for every target; unmount stale mounts a crashed earlier run left here."""
    prefix = str(workdir.resolve()) + "/"
    for mnt, fstype, _, _ in mountinfo():
        if mnt.startswith(prefix) and fstype.startswith("fuse"):
            log.warning("unmounting %s, left mounted by an earlier run", mnt)
            fusermount_unmount(mnt)
    for name in names:
        shutil.rmtree(workdir / name, ignore_errors=True)
        (workdir / name).mkdir(parents=True)
    for t in names:
        if t == "plain":
            (workdir / t / "data").mkdir()
        else:
            (workdir / t / "backing").mkdir()
            (workdir / t / "mnt").mkdir()


def load_state_dicts(ds: DataSet) -> dict:
    from safetensors.torch import load_file
    out = {}
    for name in ds.models:
        out[name] = load_file(str(ds.corpus / "real" / f"{name}.safetensors"))
    return out


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# -- the run -----------------------------------------------------------------------------

def run(args) -> dict:
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_TARGETS]
    if bad or not names:
        raise SystemExit(f"unknown targets {bad}; choose from {','.join(ALL_TARGETS)}")
    ds = DataSet.make(Path(args.corpus), args.quick)
    if args.small_copies is not None:
        ds.small_copies = args.small_copies
    if args.rand_reads is not None:
        ds.rand_reads = args.rand_reads
    ds.check()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _, fstype, _ = fs_of(workdir)
    if fstype in ("tmpfs", "ramfs") and not args.allow_tmpfs:
        raise SystemExit(f"{workdir} is on {fstype}; use a directory on a disk (--workdir)")
    facts = machine_facts(workdir)
    facts["dccfs_tree"] = tree_state()
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "mode": "quick" if args.quick else "full", "targets": names, "machine": facts,
                    "dataset": {"models": ds.models, "ckpts": ds.ckpts, "small_copies": ds.small_copies,
                                "rand_reads": ds.rand_reads},
                    "read_ahead_kb": args.read_ahead_kb, "dccfs_config": args.dccfs_config,
                    "passthrough_args": args.passthrough_arg}
    log.info("machine: %s", facts)
    log.info("loading %s with safetensors", ds.models)
    state_dicts = load_state_dicts(ds)
    rels = ds.small_files()

    clear_workdir(workdir, names)
    targets = make_targets(names, workdir, args)
    dropped: list[bool] = []
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    try:
        for t in targets:
            if t.daemon is not None:
                t.daemon.start()
                log.info("%s mounted (pid %d)", t.name, t.daemon.pid)
            if t.name == "dccfs":
                stats = dccfs_stats(t.root)
                if stats:
                    cache = stats["cache"]
                    t.dccfs_budget = int(cache["t0_bytes"]) + int(cache["dirty_bytes"])

        log.info("== sequential writes (each file to every target in turn)")
        seq_write(targets, ds, state_dicts)
        del state_dicts

        log.info("== cold sequential read (remount, drop caches), then hot re-read")
        for t in targets:
            t.remount()
            dropped.append(drop_caches())
            seq_read(t, "read cold (seq 1 MiB)")
            seq_read(t, "read hot (seq 1 MiB)")

        log.info("== 4 KiB random reads (remount, drop caches), then the same offsets again")
        plan = rand_plan(targets[0], ds.rand_reads, args.seed)
        for t in targets:
            t.remount()
            dropped.append(drop_caches())
            rand_read(t, plan, "rand 4 KiB cold")
            rand_read(t, plan, "rand 4 KiB again")

        log.info("== small files: %d copies of %d files", ds.small_copies, len(rels))
        for t in targets:
            small_write(t, ds, rels)
        for t in targets:
            t.remount()
            dropped.append(drop_caches())
            small_read(t, ds, rels, "small files read cold")

        if not args.no_verify:
            log.info("== verifying every file against the first target (sha1, untimed)")
            ref = None
            for t in targets:
                d = digests(t)
                if ref is None:
                    ref = d
                elif d != ref:
                    bad = sorted(k for k in set(ref) | set(d) if ref.get(k) != d.get(k))
                    raise RuntimeError(f"{t.name}: {len(bad)} files differ from {targets[0].name}: {bad[:5]}")
            report["verified_files"] = len(ref or {})

        for t in targets:
            if t.name == "dccfs" and t.daemon is not None:
                t.dccfs_stats = dccfs_stats(t.root)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        for t in targets:
            if t.daemon is not None:
                try:
                    t.daemon.stop()
                except Exception:
                    log.exception("stopping %s", t.name)
        leftovers = [m for m, *_ in mountinfo() if m.startswith(str(workdir) + "/")]
        if leftovers:
            log.error("still mounted: %s", leftovers)
        if sys.exc_info()[0] is not None and not args.keep and not leftovers:
            for t in targets:
                shutil.rmtree(workdir / t.name, ignore_errors=True)

    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["drop_caches"] = all(dropped) if dropped else None
    for t in targets:
        seq = du(t.backing / "seq")
        small = du(t.backing / "small")
        total = du(t.backing, skip=STATE_DIRS)
        t.results["stored"] = {"seq": seq, "small": small, "all": total}
        t.results["peak_rss"] = t.daemon.peak_rss if t.daemon is not None else None
    report["results"] = {t.name: t.results for t in targets}
    report["dccfs"] = {t.name: {"budget": t.dccfs_budget, "stats": t.dccfs_stats}
                       for t in targets if t.name == "dccfs"}
    if not args.keep:
        for t in targets:
            shutil.rmtree(workdir / t.name, ignore_errors=True)
    return report


# -- reporting ---------------------------------------------------------------------------

WORKLOADS = ["write torch.save", "write save_file", "write ckpt copy", "write all (seq)",
             "read cold (seq 1 MiB)", "read hot (seq 1 MiB)", "rand 4 KiB cold", "rand 4 KiB again",
             "small files write", "small files read cold"]


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def targets_check(report: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met/missed) for the issue's goals; needs passthrough and dccfs."""
    res = report["results"]
    if "dccfs" not in res or "passthrough" not in res:
        return []
    d, p = res["dccfs"], res["passthrough"]

    def ratio(w):
        return d[w]["value"] / p[w]["value"]

    rows = []
    r = ratio("write all (seq)")
    stored = d["stored"]["seq"][0] / p["stored"]["seq"][0]
    rows.append(("seq checkpoint write >= 0.8x passthrough", f"{r:.2f}x", "met" if r >= 0.8 else "MISSED"))
    rows.append(("... while storing ~1/3 less (<= 0.70x stored)", f"{stored:.3f}x",
                 "met" if stored <= 0.70 else "MISSED"))
    for w, goal, label in (("read cold (seq 1 MiB)", 0.8, "cold read >= 0.8x passthrough"),
                           ("read hot (seq 1 MiB)", 1.0, "hot re-read >= 1.0x passthrough"),
                           ("rand 4 KiB cold", 0.8, "4 KiB random read IOPS >= 0.8x passthrough")):
        r = ratio(w)
        rows.append((label, f"{r:.2f}x", "met" if r >= goal else "MISSED"))
    budget = report["dccfs"]["dccfs"]["budget"]
    rss = d["peak_rss"]
    if budget and rss:
        limit = budget + RSS_SLACK
        rows.append((f"peak dccfs RSS <= budgets {_mb(budget)} MB + 200 MB", f"{_mb(rss)} MB",
                     "met" if rss <= limit else "MISSED"))
    return rows


def render(report: dict) -> str:
    res = report["results"]
    names = report["targets"]
    lines = [f"bench_fs {report['mode']} run, {report['date']}, {report['elapsed_s']} s; "
             f"page cache dropped before cold phases: {report['drop_caches']}; "
             f"read_ahead_kb: {report['read_ahead_kb'] or 'kernel default'}; "
             f"passthrough args: {' '.join(report['passthrough_args']) or 'none'}; "
             f"dccfs tree: {report['machine'].get('dccfs_tree')}", ""]
    head = ["workload", "unit"] + names
    pairs = []
    if "plain" in names:
        pairs += [(n, "plain") for n in names if n != "plain"]
    if "passthrough" in names and "dccfs" in names:
        pairs.append(("dccfs", "passthrough"))
    head += [f"{a}/{b}" for a, b in pairs]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for w in WORKLOADS:
        if not all(w in res[n] for n in names):
            continue
        vals = {n: res[n][w]["value"] for n in names}
        row = [w, res[names[0]][w]["unit"]] + [_fmt(vals[n]) for n in names]
        row += [_ratio(vals[a], vals[b]) for a, b in pairs]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| stored (backing dir) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in (("seq", "seq files"), ("small", "small files"), ("all", "all (excl. .dccfs)")):
        lines.append(f"| {label}: du MB (st_blocks*512) | "
                     + " | ".join(_mb(res[n]["stored"][key][0]) for n in names) + " |")
        lines.append(f"| {label}: apparent MB | "
                     + " | ".join(_mb(res[n]["stored"][key][1]) for n in names) + " |")
    lines.append("| daemon peak RSS MB (VmHWM) | "
                 + " | ".join(_mb(res[n]["peak_rss"]) if res[n]["peak_rss"] else "-" for n in names) + " |")
    checks = targets_check(report)
    if checks:
        lines += ["", "| target | measured | status |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in checks]
    return "\n".join(lines)


# -- the FUSE negotiation probe ------------------------------------------------------------

DCCFS_WITH_LIBFUSE_DEBUG = (
    "import sys, dccfs.daemon as d\n"
    "base = d.fuse_options\n"
    "d.fuse_options = lambda req: base(req) | {'debug'}  # dccfs itself filters -o debug out\n"
    "sys.argv[0] = 'dccfs'\n"
    "from dccfs.cli import main\n"
    "main()\n")
_REQ = re.compile(r"unique: (\d+), opcode: (\w+) \(\d+\), nodeid: \d+, insize: (\d+)")
_REPLY = re.compile(r"unique: (\d+), success, outsize: (\d+)")


def _request_sizes(text: str) -> dict:
    """Payload sizes of WRITE requests (insize - 80) and READ replies (outsize - 16) in a debug log."""
    reads, writes, sizes = set(), [], {}
    for line in text.splitlines():
        m = _REQ.search(line)
        if m:
            if m.group(2) == "WRITE":
                writes.append(int(m.group(3)) - 80)
            elif m.group(2) == "READ":
                reads.add(m.group(1))
            continue
        m = _REPLY.search(line)
        if m and m.group(1) in reads:
            sizes[m.group(1)] = int(m.group(2)) - 16
    hist: dict[str, dict[int, int]] = {"WRITE": {}, "READ": {}}
    for s in writes:
        hist["WRITE"][s] = hist["WRITE"].get(s, 0) + 1
    for s in sizes.values():
        hist["READ"][s] = hist["READ"].get(s, 0) + 1
    return hist


def probe(args) -> dict:
    """Mount each FUSE target with libfuse debug, print INIT, and log request sizes of one 4 MiB write/read."""
    workdir = Path(args.workdir).resolve() / "probe"
    out: dict = {}
    names = [n for n in args.targets.split(",") if n in ("passthrough", "dccfs")]
    for name in names:
        shutil.rmtree(workdir / name, ignore_errors=True)
        backing, mnt = workdir / name / "backing", workdir / name / "mnt"
        backing.mkdir(parents=True)
        mnt.mkdir()
        logp = workdir / name / "debug.log"
        if name == "dccfs":
            cmd = [sys.executable, "-c", DCCFS_WITH_LIBFUSE_DEBUG, "mount", "--foreground",
                   str(backing), str(mnt)]
        else:
            cmd = [sys.executable, str(REPO / "tools" / "passthrough.py"), "-f", "-o", "debug",
                   *args.passthrough_arg, str(backing), str(mnt)]
        daemon = Daemon(name, cmd, mnt, logp)
        phases = {}
        try:
            daemon.start()
            time.sleep(0.5)
            mark = logp.stat().st_size
            payload = os.urandom(4 * MIB)

            def phase(label):
                nonlocal mark
                time.sleep(0.3)
                text = logp.read_text(errors="replace")
                phases[label] = _request_sizes(text[mark:])
                mark = len(text)

            fd = os.open(mnt / "probe.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            written = os.write(fd, payload)
            os.fsync(fd)
            os.close(fd)
            phase(f"one os.write of 4 MiB (returned {written})")
            src = workdir / name / "src.bin"
            src.write_bytes(os.urandom(8 * MIB))
            shutil.copyfile(src, mnt / "copy.bin")
            phase("shutil.copyfile of an 8 MiB file (sendfile)")
            import torch
            from safetensors.torch import save_file
            tensors = {"w": torch.randn(2 * MIB)}  # 8 MiB of fp32
            torch.save(tensors, mnt / "t.pt")
            phase("torch.save of one 8 MiB tensor")
            save_file(tensors, str(mnt / "t.safetensors"))
            phase("safetensors save_file of one 8 MiB tensor")
            for ra in (None, 1024):
                label = "kernel default read_ahead_kb" if ra is None else f"read_ahead_kb={ra}"
                if ra is not None:
                    set_read_ahead_kb(mnt, ra)
                st = os.stat(mnt)
                with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb") as f:
                    label += f" (bdi says {f.read().strip()} KiB)"
                dropped = drop_caches()
                fd = os.open(mnt / "probe.bin", os.O_RDONLY)
                data = os.read(fd, 4 * MIB)
                os.close(fd)
                assert data == payload[:len(data)]
                phase(f"one os.read of 4 MiB after drop_caches={dropped}, {label} (returned {len(data)})")
        finally:
            daemon.stop()
        text = logp.read_text(errors="replace")
        init = []
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if "opcode: INIT" in line:
                for follow in lines[i: i + 16]:
                    init.append(follow)
                    if "outsize" in follow and "unique" in follow and follow is not line:
                        break
                break
        out[name] = {"libfuse": next((l for l in lines if l.startswith("FUSE library version")), "?"),
                     "init": init, "phases": phases}
        print(f"== {name}: {out[name]['libfuse']}")
        print("\n".join(init))
        for label, hist in phases.items():
            print(f"-- {label}")
            for op, h in hist.items():
                if h:
                    print(f"   {op}: " + ", ".join(f"{n} x {size} B" for size, n in sorted(h.items())))
        shutil.rmtree(workdir / name, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="minilm files only; about 2 minutes")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="comma-separated subset of plain,passthrough,dccfs (default: all)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--workdir", default=str(REPO / "build" / "bench_fs"),
                        help="where the targets' directories go; must be on a disk, not tmpfs "
                             "(default: build/bench_fs in the repository)")
    parser.add_argument("--corpus", default=str(REPO / ".corpus"), help="corpus root (default: .corpus)")
    parser.add_argument("--dccfs-config", metavar="TOML", help="pass -c TOML to dccfs mount")
    parser.add_argument("--passthrough-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for tools/passthrough.py, e.g. --passthrough-arg=--writeback-cache")
    parser.add_argument("--read-ahead-kb", type=int, metavar="KB",
                        help="set the FUSE mounts' bdi read_ahead_kb after every mount (root only; "
                             "default: leave the kernel's 128)")
    parser.add_argument("--small-copies", type=int, help="override the number of small-file copies")
    parser.add_argument("--rand-reads", type=int, help="override the number of 4 KiB random reads")
    parser.add_argument("--seed", type=int, default=1, help="random-read seed (default 1)")
    parser.add_argument("--no-verify", action="store_true", help="skip the untimed sha1 comparison")
    parser.add_argument("--keep", action="store_true", help="keep the targets' directories afterwards")
    parser.add_argument("--allow-tmpfs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-fuse", action="store_true",
                        help="instead: mount passthrough and dccfs with libfuse debug, print the INIT "
                             "negotiation and the request sizes of one 4 MiB write and read")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.probe_fuse:
        result = probe(args)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        return 0
    try:
        report = run(args)
    except KeyboardInterrupt:
        log.error("interrupted; everything this run mounted has been unmounted")
        return 130
    table = render(report)
    print(table)
    report["table"] = table
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str))
        log.info("wrote %s", args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
