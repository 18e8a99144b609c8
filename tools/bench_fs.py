"""Filesystem benchmark: the same real-data workloads on a plain directory, a Python passthrough mount and dccfs."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (REPO, Daemon, drop_caches, du, fs_of, fusermount_unmount,  # noqa: E402
                          machine_facts, mountinfo, set_read_ahead_kb, tree_state)
from bench_fs_probe import probe  # noqa: E402
from bench_fs_report import render  # noqa: E402
from bench_fs_workloads import (DataSet, Target, digests, load_state_dicts, rand_plan,  # noqa: E402
                                rand_read, seq_read, seq_write, small_read, small_write)

log = logging.getLogger("bench_fs")

ALL_TARGETS = ("plain", "passthrough", "dccfs")
STATE_DIRS = (".dccfs",)


def dccfs_stats(mnt: Path) -> dict | None:
    result = subprocess.run([sys.executable, "-m", "dccfs.cli", "stats", "--json", str(mnt)],
                            capture_output=True, text=True, cwd=str(REPO), timeout=60)
    if result.returncode != 0:
        log.warning("dccfs stats failed: %s", result.stderr.strip())
        return None
    return json.loads(result.stdout)


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
    for mnt, fstype in ((e.mountpoint, e.fstype) for e in mountinfo()):
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
                                "rand_reads": ds.rand_reads, "rand_files": args.rand_files,
                                "rand_settle_s": args.rand_settle},
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
        plan = rand_plan(targets[0], ds.rand_reads, args.seed, args.rand_files)
        for t in targets:
            t.remount()
            if args.rand_settle:
                time.sleep(args.rand_settle)  # the mount's codec warm-up ends meanwhile
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
    parser.add_argument("--rand-settle", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long after the remount before the random reads (default 0: right after it, "
                             "while a dccfs mount still loads its codec kernels; 20 measures a settled mount)")
    parser.add_argument("--rand-files", metavar="GLOB",
                        help="random reads only in the written files whose name matches GLOB, e.g. 'mpnet_*' for "
                             "the weights alone (default: every file, picked in proportion to its size)")
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
