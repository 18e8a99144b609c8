"""T0 cache benchmark through a real dccfs mount: hot re-read from RAM vs tmpfs, and scan resistance per policy.

Part 1 (hot re-read): write a real model into the mount, remount (cold), read it once (fills T0), drop the
kernel page cache (the FUSE mount's pages go too, so the next read reaches the daemon) and read it again.
The MB/s of that read is compared with reading the same file from a tmpfs after the same drop (tmpfs pages
cannot be dropped: that is the RAM baseline). T0 hits/misses and chunk decodes from `dccfs stats --json`
around the timed read show whether it was served from T0 (misses and decodes must not grow). Each rep
then reads the file once more without a drop: the kernel's page cache serves that one (dccfs opens files
with keep_cache), which is what a user's second load gets until the kernel evicts the pages. Then, per rep,
the same model is loaded the way safetensors loads it (mmap, copied out 1 MiB at a time) twice after a drop,
from dccfs (first from T0, second from the page cache) and from a fresh tmpfs copy.

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
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache_data import TensorStream, write_set  # noqa: E402
from bench_cache_dccfs import Watchdog, dccfs_cmd, export_rev, guarded_start, stats, use_dccfs_from  # noqa: E402
from bench_cache_phases import part_hot, part_scan  # noqa: E402
from bench_cache_report import render  # noqa: E402
from bench_common import (MB, MIB, REPO, Daemon, fs_of, fusermount_unmount, machine_facts,  # noqa: E402
                          mountinfo, tree_state)

log = logging.getLogger("bench_cache")

DEFAULT_POLICY = "wtinylfu"


def mode_params(quick: bool) -> dict:
    if quick:
        return {"model": "minilm_bf16", "source": ["minilm_fp32", "mpnet_fp32"],
                "hot_files": 2, "hot_bytes": 50 * MB, "scan_files": 5, "scan_bytes": 500 * MB,
                "t0_bytes": 100 * MIB}
    return {"model": "mpnet_bf16", "source": ["mpnet_fp32", "minilm_fp32"],
            "hot_files": 4, "hot_bytes": 200 * MB, "scan_files": 10, "scan_bytes": 2000 * MB,
            "t0_bytes": 400 * MIB}


def clear_workdir(workdir: Path) -> None:
    prefix = str(workdir.resolve()) + "/"
    for mnt, fstype in ((e.mountpoint, e.fstype) for e in mountinfo()):
        if mnt.startswith(prefix):
            log.warning("unmounting %s (%s), left mounted by an earlier run of this tool", mnt, fstype)
            if fstype.startswith("fuse"):
                fusermount_unmount(mnt)
            else:
                subprocess.run(["umount", mnt], capture_output=True)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)


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
    dccfs_src = None
    if args.dccfs_rev:
        dccfs_src = export_rev(args.dccfs_rev, REPO / "build" / "bench_cache_src")
        use_dccfs_from(dccfs_src)
        log.info("dccfs from %s (git archive of %s)", dccfs_src, args.dccfs_rev)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    workdir = Path(args.workdir).resolve()
    clear_workdir(workdir)
    if fs_of(workdir)[1] in ("tmpfs", "ramfs"):
        raise SystemExit(f"{workdir} is on a RAM filesystem; use a directory on a disk")
    facts = machine_facts(workdir)
    facts["dccfs_tree"] = (tree_state() if dccfs_src is None
                           else f"git archive {dccfs_src.name} ({args.dccfs_rev})")
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
