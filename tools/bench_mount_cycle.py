"""What one short-lived mount costs: time to mount, first write, unmount to exit, and the daemon's CPU, with and without the codec warm-up."""
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
from bench_common import REPO, fusermount_unmount, is_mounted, machine_facts, tree_state  # noqa: E402

log = logging.getLogger("bench_mount_cycle")
MOUNT_WAIT_S = 60
# The directory below --workdir that each cycle empties: never --workdir itself, which may hold anything.
OWN_DIR = "bench_mount_cycle.tmp"


def one_cycle(workdir: Path, warm_up: bool, hold_s: float, tensor: bytes) -> dict:
    """Mount, write a small file and a tensor file, keep the mount until hold_s after the start, unmount; the
    daemon's CPU comes from wait4, so it counts every thread, the warm-up's included. workdir is this tool's
    own directory (OWN_DIR below --workdir), emptied each cycle."""
    backing, mnt = workdir / "backing", workdir / "mnt"
    shutil.rmtree(workdir, ignore_errors=True)
    backing.mkdir(parents=True)
    mnt.mkdir()
    cmd = [sys.executable, "-m", "dccfs.cli", "mount", "--foreground", *(() if warm_up else ("--no-warm-up",)),
           str(backing), str(mnt)]
    with open(workdir / "dccfs.log", "ab") as logf:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, cwd=str(REPO),
                                start_new_session=True)
    try:
        while not is_mounted(mnt):
            if proc.poll() is not None or time.perf_counter() - started > MOUNT_WAIT_S:
                raise RuntimeError(f"dccfs did not mount; see {workdir / 'dccfs.log'}")
            time.sleep(0.01)
        mounted = time.perf_counter()
        (mnt / "notes.txt").write_bytes(b"a small first file\n" * 50)
        first_write = time.perf_counter()
        (mnt / "w.safetensors").write_bytes(tensor)
        tensor_write = time.perf_counter()
        time.sleep(max(0.0, hold_s - (tensor_write - started)))
        unmount = time.perf_counter()
        fusermount_unmount(mnt)
        _, status, usage = os.wait4(proc.pid, 0)
        exited = time.perf_counter()
    except BaseException:
        fusermount_unmount(mnt)
        proc.kill()
        proc.wait()
        raise
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"dccfs exited with {os.waitstatus_to_exitcode(status)}; see {workdir / 'dccfs.log'}")
    return {"mount_s": mounted - started, "first_write_s": first_write - mounted,
            "tensor_write_s": tensor_write - first_write, "exit_s": exited - unmount,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def bf16_safetensors(n_values: int) -> bytes:
    """A one-tensor safetensors file of normal bf16 values (the layout the tensor codec recognises)."""
    import json

    import numpy as np

    values = (np.random.default_rng(0).standard_normal(n_values).astype(np.float32).view(np.uint32) >> 16)
    payload = values.astype(np.uint16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [n_values], "data_offsets": [0, len(payload)]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"),
                        help=f"where the tool makes (and empties, each cycle) its directory {OWN_DIR}")
    parser.add_argument("--rounds", type=int, default=5, help="cycles per mode, the modes interleaved")
    parser.add_argument("--hold", type=float, default=3.0,
                        help="seconds from the daemon's start to its unmount (a test's mount lives a few)")
    parser.add_argument("--tensor-mib", type=float, default=4.0, help="size of the bf16 tensor file written")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = args.workdir / OWN_DIR
    if is_mounted(workdir / "mnt"):
        parser.error(f"{workdir / 'mnt'} is mounted: unmount it first")
    tensor = bf16_safetensors(int(args.tensor_mib * (1 << 20)) // 2)
    results: dict[bool, list[dict]] = {True: [], False: []}
    try:
        for _ in range(args.rounds):
            for warm_up in (True, False):
                results[warm_up].append(one_cycle(workdir, warm_up, args.hold, tensor))
    finally:
        if is_mounted(workdir / "mnt"):
            fusermount_unmount(workdir / "mnt")
    log.info("machine: %s", machine_facts(workdir))
    log.info("tree: %s; %d rounds, hold %.1f s, tensor file %.1f MiB; medians", tree_state(), args.rounds,
             args.hold, args.tensor_mib)
    keys = ("mount_s", "first_write_s", "tensor_write_s", "exit_s", "cpu_s")
    log.info("%-14s %s", "", " ".join(f"{k:>15}" for k in keys))
    for warm_up, label in ((True, "warm-up"), (False, "--no-warm-up")):
        log.info("%-14s %s", label, " ".join(f"{statistics.median(r[k] for r in results[warm_up]):>15.2f}"
                                               for k in keys))


if __name__ == "__main__":
    main()
