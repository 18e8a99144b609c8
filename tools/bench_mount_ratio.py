"""Issue 3's through-the-mount ratios: save real weights and a checkpoint into a fresh dccfs mount as frameworks do,
and print stored / logical size, write speed, cheap (effort 0) encodes and whether the tensors read back exactly."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import MB, REPO, Daemon  # noqa: E402

log = logging.getLogger("bench_mount_ratio")
LIMITS = {"save_file bf16": 0.665, "torch.save ckpt": 0.545}  # issue 3, "Through the mount"


def mount_stats(mnt: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dccfs.cli", "stats", "--json", str(mnt)], capture_output=True,
                         text=True, check=True, cwd=str(REPO)).stdout
    return json.loads(out)["stats"]


def one_run(workdir: Path, corpus: Path, name: str) -> tuple[float, float, int, int, bool]:
    """(stored / logical, MB/s including the final sync, cheap encodes, encodes, exact) of one file saved into a
    fresh mount."""
    import torch
    from safetensors.torch import load_file, save_file

    backing, mnt = workdir / "backing", workdir / "mnt"
    shutil.rmtree(workdir, ignore_errors=True)
    backing.mkdir(parents=True)
    daemon = Daemon("dccfs", [sys.executable, "-m", "dccfs.cli", "mount", "-f", str(backing), str(mnt)], mnt,
                    workdir / "dccfs.log")
    daemon.start()
    try:
        if name == "save_file bf16":
            tensors = load_file(corpus / "real" / "mpnet_bf16.safetensors")
            target = mnt / "mpnet_bf16.safetensors"
            started = time.perf_counter()
            save_file(tensors, target)
            os.sync()
            seconds = time.perf_counter() - started
            back = load_file(target)
            exact = back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
            del back  # its tensors map the file: the mount would stay busy
        else:
            ckpt = torch.load(corpus / "ckpt" / "minilm_ft_step20.pt", map_location="cpu", weights_only=True)
            target = mnt / "ckpt.pt"
            started = time.perf_counter()
            torch.save(ckpt, target)
            os.sync()
            seconds = time.perf_counter() - started
            back = torch.load(target, map_location="cpu", weights_only=True)
            exact = all(torch.equal(a, b) for a, b in zip(ckpt["model"].values(), back["model"].values())) \
                and str(back["optimizer"]) == str(ckpt["optimizer"])
        gc.collect()
        stats = mount_stats(mnt)
        logical = target.stat().st_size
        stored = (backing / target.name).stat().st_size
        encodes = sum(c.get("chunks", 0) for c in stats.get("encode", {}).values())
        return stored / logical, logical / seconds / MB, stats.get("cheap_encodes", 0), encodes, exact
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=REPO / ".corpus", help="corpus directory (default: .corpus)")
    ap.add_argument("--workdir", type=Path, default=REPO / "build" / "bench_mount_ratio",
                    help="scratch directory for the backing directory and the mountpoint (removed after)")
    ap.add_argument("--runs", type=int, default=3, help="fresh mounts per file (default 3)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for path in (args.corpus / "real" / "mpnet_bf16.safetensors", args.corpus / "ckpt" / "minilm_ft_step20.pt"):
        if not path.is_file():
            log.error("%s is missing: build the corpus first (make corpus-full)", path)
            return 2
    log.info("| file | run | stored / logical | limit | write MB/s | effort-0 encodes | read back exact |")
    log.info("|---|---|---|---|---|---|---|")
    worst = {}
    for name, limit in LIMITS.items():
        for run in range(1, args.runs + 1):
            ratio, mbs, cheap, encodes, exact = one_run(args.workdir, args.corpus, name)
            worst[name] = max(worst.get(name, 0.0), ratio)
            log.info("| %s | %d | %.4f | %.3f | %.0f | %d of %d | %s |", name, run, ratio, limit, mbs, cheap, encodes,
                     exact)
            if not exact:
                log.error("%s: the tensors read back differ", name)
                return 1
    for name, limit in LIMITS.items():
        log.info("%s: worst %.4f against %.3f: %s", name, worst[name], limit,
                 "met" if worst[name] <= limit else "MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
