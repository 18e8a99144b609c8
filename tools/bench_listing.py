"""One directory of many files listed and stat'ed through a mount: the time, and the descriptors the daemon holds, for this tree and optionally another commit."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, drop_caches, fusermount_unmount, is_mounted, machine_facts, tree_state  # noqa: E402

log = logging.getLogger("bench_listing")
MOUNT_WAIT_S = 60
UNMOUNT_WAIT_S = 60


def make_files(directory: Path, count: int) -> None:
    """count small plain files in directory (a mount serves plain files as they are), made once."""
    if directory.is_dir() and sum(1 for _ in os.scandir(directory)) == count:
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for i in range(count):
        (directory / f"f{i}").write_bytes(b"%d" % i)


def baseline_tree(rev: str, workdir: Path) -> Path:
    """dccfs/ of commit rev, unpacked under workdir, to import instead of this tree's."""
    where = workdir / f"tree-{rev}"
    if not (where / "dccfs").is_dir():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "dccfs"], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def measure(label: str, tree: Path | None, workdir: Path, rounds: int) -> list[dict]:
    backing, mnt = workdir / "backing", workdir / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    # cwd: not the repository, whose dccfs/ would come first on sys.path for python -m
    with open(workdir / f"{label}.log", "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "dccfs.cli", "mount", "--foreground", "--no-warm-up",
                                 str(backing), str(mnt)], stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                cwd=str(workdir), env=env, start_new_session=True)
    rows = []
    try:
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label}: dccfs did not mount; see {workdir / f'{label}.log'}")
            time.sleep(0.05)
        with open(f"/proc/{proc.pid}/limits") as f:
            limit = next(line.split()[3] for line in f if line.startswith("Max open files"))
        for number in range(rounds):
            drop_caches()
            started = time.perf_counter()
            error, entries = "", 0
            try:
                with os.scandir(mnt / "big") as listing:
                    for entry in listing:
                        entry.stat(follow_symlinks=False)
                        entries += 1
            except OSError as exc:
                error = exc.strerror or str(exc)
            rows.append({"target": label, "round": number + 1, "entries": entries,
                         "seconds": time.perf_counter() - started, "error": error,
                         "descriptors": len(os.listdir(f"/proc/{proc.pid}/fd")), "limit": limit})
    finally:
        fusermount_unmount(mnt)
        try:
            proc.wait(UNMOUNT_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="files in the one directory (default 100000)")
    parser.add_argument("--rounds", type=int, default=2, help="listings, each after a drop of the caches (default 2)")
    parser.add_argument("--baseline", metavar="REV", help="also measure the dccfs/ of this commit, e.g. f9164ed")
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "bench_listing",
                        help="where the backing directory and mount go (default build/bench_listing)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.geteuid() != 0:
        parser.error("needs root: it drops the kernel's caches before each listing")
    args.workdir.mkdir(parents=True, exist_ok=True)
    make_files(args.workdir / "backing" / "big", args.files)
    log.info("%s; tree %s", machine_facts(args.workdir), tree_state())
    rows = measure("this tree", None, args.workdir, args.rounds)
    if args.baseline:
        rows += measure(args.baseline, baseline_tree(args.baseline, args.workdir), args.workdir, args.rounds)
    log.info("%-10s %5s %8s %8s %12s %7s  %s", "target", "round", "entries", "seconds", "descriptors", "limit",
             "error")
    for row in rows:
        log.info("%-10s %5d %8d %8.2f %12d %7s  %s", row["target"], row["round"], row["entries"], row["seconds"],
                 row["descriptors"], row["limit"], row["error"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
