#!/usr/bin/env python3
"""Checkpoint series through a real mount: keyframes vs deltas, stored bytes and MB/s side by side."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import wait_until_settled  # noqa: E402

log = logging.getLogger("dccfs.bench_delta_mount")
REPO = Path(__file__).resolve().parent.parent
DCCFS = [sys.executable, "-m", "dccfs.cli"]
# The delta rule forces deltas (the default tries them only while encoders keep up) and
# keeps the 1 MiB chunks a default mount gives checkpoint files, as the keyframe mode has:
# a rule without chunk_size would fall back to 256 KiB and compare chunk sizes instead.
MODES = {
    "keyframe": 'delta = false\n',
    "delta": '[[rule]]\nglob = "*"\ndelta = true\nchunk_size = "1MiB"\n',
    # Keyframes while writing, deltas by the background pass after the last close.
    "after close": 'delta_during_write = false\n[[rule]]\nglob = "*"\ndelta = true\n'
                   'chunk_size = "1MiB"\n',
    # No config: deltas while the encoders keep up, the rest after close.
    "default": '',
}
SETTLE_S = 5


def run(*args: str) -> None:
    subprocess.run([*DCCFS, *args], check=True, capture_output=True)


def drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_all(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - started


def daemon_cpu_s(backing: Path) -> float:
    """User + system CPU seconds of the daemon serving backing so far."""
    pid = int((backing / ".dccfs" / "daemon.pid").read_text())
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold_reads(work: Path, name: str, reps: int) -> dict[str, list[tuple[float, float]]]:
    """(wall s, daemon CPU s) of reps cold reads of one file per mode, the modes interleaved: each read
    gets a fresh mount, SETTLE_S for the kernel warm-up and a page-cache drop. The order alternates
    from one round to the next: the first read of a round came out about 15% slower than the
    second, whichever tree or mode it was (two trees side by side, either order, 8 rounds)."""
    results: dict[str, list[tuple[float, float]]] = {"keyframe": [], "delta": []}
    for rep in range(reps):
        for mode in (("keyframe", "delta") if rep % 2 == 0 else ("delta", "keyframe")):
            rows = results[mode]
            backing, mnt = work / mode / "backing", work / mode / "mnt"
            run("mount", "-c", str(work / f"{mode}.toml"), str(backing), str(mnt))
            try:
                time.sleep(SETTLE_S)
                drop_caches()
                cpu = daemon_cpu_s(backing)
                wall = read_all(mnt / "run" / name)
                rows.append((wall, daemon_cpu_s(backing) - cpu))
            finally:
                subprocess.run([*DCCFS, "umount", str(mnt)], capture_output=True)
    return results


def bench_mode(mode: str, files: list[Path], work: Path, newest_first: bool = False) -> list[dict]:
    backing, mnt = work / mode / "backing", work / mode / "mnt"
    shutil.rmtree(work / mode, ignore_errors=True)
    backing.mkdir(parents=True)
    mnt.mkdir(parents=True)
    config = work / f"{mode}.toml"
    config.write_text(MODES[mode])
    rows = []
    run("mount", "-c", str(config), str(backing), str(mnt))
    try:
        (mnt / "run").mkdir()
        for src in files:
            data = src.read_bytes()
            started = time.perf_counter()
            with open(mnt / "run" / src.name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            seconds = time.perf_counter() - started
            rows.append({"file": src.name, "size": len(data), "write_s": seconds})
            if mode in ("after close", "default"):
                stored = backing / "run" / src.name
                rows[-1]["pass_s"] = wait_until_settled(backing, lambda: stored.stat().st_size)
        run("umount", str(mnt))
        run("mount", "-c", str(config), str(backing), str(mnt))
        # A fresh mount loads its codec kernels in the background (seconds when numba's
        # cache is cold); that start-up cost would land on whichever file is read first.
        time.sleep(SETTLE_S)
        dropped = drop_caches()
        for row in (rows[::-1] if newest_first else rows):
            row["read_s"] = read_all(mnt / "run" / row["file"])
            row["stored"] = (backing / "run" / row["file"]).stat().st_size
            row["cold"] = dropped
        for row in rows:  # after every timed read, so that checking one file cannot warm another
            with open(mnt / "run" / row["file"], "rb") as f, open(files[0].parent / row["file"], "rb") as g:
                row["exact"] = f.read() == g.read()
    finally:
        subprocess.run([*DCCFS, "umount", str(mnt)], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=REPO / ".corpus")
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "bench_delta_mount")
    parser.add_argument("--ext", default="safetensors,pt", help="checkpoint formats (default: both)")
    parser.add_argument("--steps", default="10,20,30", help="checkpoints to write, in order (default: 10,20,30)")
    parser.add_argument("--newest-first", action="store_true",
                        help="read the files newest first, so a delta's base chunks are not in the "
                             "chunk cache yet (default: in the order written)")
    parser.add_argument("--reps", type=int, default=6,
                        help="then read the last file cold this many more times per mode, keyframe and delta "
                             "mounts interleaved, and report median wall and daemon CPU; the read-speed target "
                             "is judged on this median (default: 6, an even number for the alternating order; 0 skips it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = sys.stdout
    for ext in args.ext.split(","):
        steps = [int(n) for n in args.steps.split(",")]
        files = [args.corpus / "ckpt" / f"minilm_ft_step{n:02d}.{ext}" for n in steps]
        if not all(f.exists() for f in files):
            raise SystemExit(f"{files[0].parent} lacks the series: python ../shared/corpus/build_corpus.py "
                             f"{args.corpus} --checkpoints")
        results = {mode: bench_mode(mode, files, args.workdir, args.newest_first) for mode in MODES}
        order = "newest first" if args.newest_first else "in the order written"
        out.write(f"\n.{ext} series written in order through one mount per mode "
                  f"(fsync per file; remount, {SETTLE_S} s for kernel warm-up, page-cache drop, then read {order})\n")
        out.write("| file | mode | stored/logical | write MB/s | pass after close s | cold read MB/s | bit-exact |\n")
        out.write("|---|---|---|---|---|---|---|\n")
        for i, src in enumerate(files):
            for mode in MODES:
                row = results[mode][i]
                pass_s = f"{row['pass_s']:.1f}" if "pass_s" in row else "-"
                out.write(f"| {src.name} | {mode} | {row['stored'] / row['size']:.4f} | "
                          f"{row['size'] / row['write_s'] / 1e6:.0f} | {pass_s} | "
                          f"{row['size'] / row['read_s'] / 1e6:.0f} | {row['exact']} |\n")
        last_key, last_delta = results["keyframe"][-1], results["delta"][-1]
        # One read per mode, minutes apart: a keyframe read alone moved between 0.29 and 0.40 s on
        # this machine, so the target is judged on the median of the interleaved reads below.
        stored = last_delta['stored'] / last_delta['size']
        # The target is for step30 written after step20 (its base then a keyframe); with the default
        # steps and delta_chain 1, step20 is a delta of step10 and step30 is stored as keyframes.
        judged = (f"target <= 0.34: {'met' if stored <= 0.34 else 'MISSED'}" if steps[-2:] == [20, 30]
                  else "the target <= 0.34 is judged with --steps 20,30")
        out.write(f"{files[-1].name}: delta/keyframe cold read speed "
                  f"{last_key['read_s'] / last_delta['read_s']:.2f}x (one read per mode), stored "
                  f"{stored:.4f} ({judged})\n")
        later = results["after close"][-1]
        out.write(f"{files[-1].name} with its deltas after close: written at "
                  f"{last_key['write_s'] / later['write_s']:.2f}x the keyframe speed, stored "
                  f"{later['stored'] / later['size']:.4f} after a {later['pass_s']:.1f} s pass\n")
        if args.reps:
            reads = cold_reads(args.workdir, files[-1].name, args.reps)
            med = {mode: (statistics.median(w for w, _ in rows), statistics.median(c for _, c in rows))
                   for mode, rows in reads.items()}
            speed = med['keyframe'][0] / med['delta'][0]
            out.write(f"{files[-1].name}, {args.reps} cold reads per mode, interleaved: median wall "
                      f"{med['keyframe'][0]:.3f} s keyframe, {med['delta'][0]:.3f} s delta "
                      f"({speed:.2f}x, target >= 0.7: {'met' if speed >= 0.7 else 'MISSED'}); median daemon "
                      f"CPU {med['keyframe'][1]:.2f} s keyframe, {med['delta'][1]:.2f} s delta; per read "
                      f"delta/keyframe speed "
                      + " ".join(f"{k[0] / d[0]:.2f}" for k, d in zip(reads["keyframe"], reads["delta"])) + "\n")
        else:
            out.write(f"{files[-1].name}: read-speed target not judged (--reps 0)\n")
        # The same ratio inside one mount (the first file written has no earlier version, so
        # it is all keyframes): less exposed to load that changes between the two mounts.
        first = results["delta"][0]
        if len(files) > 1 and not args.newest_first:  # newest first, the base reads warm it
            speed = (last_delta["size"] / last_delta["read_s"]) / (first["size"] / first["read_s"])
            out.write(f"within the delta mount: {files[-1].name} read at {speed:.2f}x the speed of "
                      f"{files[0].name} (keyframes)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
