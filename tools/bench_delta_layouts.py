#!/usr/bin/env python3
"""Framework checkpoint layouts through a real mount: what the backing directory holds with deltas and without."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, fusermount_unmount, wait_until_settled  # noqa: E402

log = logging.getLogger("dccfs.bench_delta_layouts")
DCCFS = [sys.executable, "-m", "dccfs.cli"]
CONFIGS = {"keyframes": "delta = false\n", "default": ""}
# --timed-saves: what storing a dependent again after its base's deletion (dccfs/unpin.py) costs
# the saves that follow it, against the same flow with that rewrite off.
TIMED_CONFIGS = {"no-unpin": "delta_unpin_rewrite = false\n", "default": ""}


def _torch_save(obj, path: Path) -> None:
    import torch
    torch.save(obj, str(path))


def _bytes_of(obj) -> bytes:
    """torch.save into memory, as Lightning's checkpoint IO does before it writes the file."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def plain(run: Path, n: int, state: dict, kept: list) -> None:
    """A numbered series: ckpt_N.pt."""
    _torch_save(state, run / f"ckpt_{n}.pt")


def lightning(run: Path, n: int, state: dict, kept: list) -> None:
    """ModelCheckpoint(save_top_k=2, save_last=True): epoch=E-step=S.ckpt, then last.ckpt, the oldest removed."""
    data = _bytes_of({"epoch": n, "global_step": state["step"], "state_dict": state["model"],
                      "optimizer_states": [state["optimizer"]]})
    name = f"epoch={n}-step={state['step']}.ckpt"
    for target in (name, "last.ckpt"):
        with open(run / target, "wb") as f:
            f.write(data)
    kept.append(run / name)
    if len(kept) > 2:
        kept.pop(0).unlink()


def fairseq(run: Path, n: int, state: dict, kept: list) -> None:
    """checkpointN.pt through a .tmp rename, copied over checkpoint_last.pt, the oldest removed."""
    tmp = run / f"checkpoint{n}.pt.tmp"
    _torch_save(state, tmp)
    os.replace(tmp, run / f"checkpoint{n}.pt")
    shutil.copyfile(run / f"checkpoint{n}.pt", run / "checkpoint_last.pt")
    kept.append(run / f"checkpoint{n}.pt")
    if len(kept) > 2:
        kept.pop(0).unlink()


def _trainer_dir(run: Path, state: dict, kept: list, shards: int) -> Path:
    from safetensors.torch import save_file
    directory = run / f"checkpoint-{state['step']}"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 384}))
    names = list(state["model"])
    per = -(-len(names) // shards)
    index = {}
    for s in range(shards):
        part = {k: state["model"][k].contiguous() for k in names[s * per:(s + 1) * per]}
        file = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / file), metadata={"format": "pt"})
        index.update({k: file for k in part})
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    _torch_save(state["optimizer"], directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": state["step"]}))
    kept.append(directory)
    if len(kept) > 2:
        shutil.rmtree(kept.pop(0))
    return directory


def trainer(run: Path, n: int, state: dict, kept: list) -> None:
    """transformers Trainer (save_total_limit=2): checkpoint-S/ with model.safetensors and optimizer.pt."""
    _trainer_dir(run, state, kept, 1)


def trainer_sharded(run: Path, n: int, state: dict, kept: list) -> None:
    """The same with the model in four safetensors shards and their index."""
    _trainer_dir(run, state, kept, 4)


FLOWS = {"plain": plain, "lightning": lightning, "fairseq": fairseq, "trainer": trainer,
         "trainer-sharded": trainer_sharded}


def tree_digests(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        out[str(path.relative_to(root))] = h.hexdigest()
    return out


def backing_bytes(backing: Path) -> int:
    """Bytes the backing directory holds, each hard link counted once (pins are links)."""
    seen = {}
    for path in backing.rglob("*"):
        st = path.lstat()
        if path.is_file() and not path.is_symlink():
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def run_flow(name: str, config: str, states: list[dict], work: Path, reference: dict[str, str],
             configs: dict[str, str], gap_s: float | None = None) -> dict:
    """One fresh mount: the flow's saves in order, each timed (the save and its closes; the mount
    commits at close). After each save: wait until the passes after close are done, or, with
    gap_s, that many seconds (a training step's time), whatever runs in the background."""
    base = work / f"{name}-{config}"
    shutil.rmtree(base, ignore_errors=True)
    backing, mnt = base / "backing", base / "mnt"
    backing.mkdir(parents=True)
    mnt.mkdir()
    config_file = base / "config.toml"
    config_file.write_text(configs[config])
    subprocess.run([*DCCFS, "mount", "-c", str(config_file), str(backing), str(mnt)], check=True)
    try:
        run, kept = mnt / "run", []
        run.mkdir()
        steps, seconds = [], []
        for n, state in enumerate(states):
            started = time.perf_counter()
            FLOWS[name](run, n, state, kept)
            seconds.append(time.perf_counter() - started)
            if gap_s is None:
                wait_until_settled(backing, lambda: backing_bytes(backing))
            else:
                time.sleep(gap_s)
            steps.append(backing_bytes(backing))
        wait_until_settled(backing, lambda: backing_bytes(backing))
        sizes = {str(p.relative_to(run)): (p.stat().st_size, (backing / "run" / p.relative_to(run)).stat().st_size)
                 for p in run.rglob("*") if p.is_file()}
        logical = sum(n for n, _ in sizes.values())
        exact = tree_digests(run) == reference
        log.info("%s, %s: %s", name, config, ", ".join(f"{rel} {stored / n:.3f}" for rel, (n, stored)
                                                      in sorted(sizes.items()) if n > 1 << 20))
    finally:
        subprocess.run([*DCCFS, "umount", str(mnt)], capture_output=True)
        fusermount_unmount(mnt)
    return {"logical": logical, "backing": backing_bytes(backing), "steps": steps, "exact": exact,
            "visible": backing_bytes(backing / "run"), "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=REPO / ".corpus")
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "bench_delta_layouts")
    parser.add_argument("--flows", default=",".join(FLOWS), help=f"any of {', '.join(FLOWS)} (default: all)")
    parser.add_argument("--steps", default="10,20,30",
                        help="steps of the corpus' fine-tuning series saved in order (default: 10,20,30)")
    parser.add_argument("--timed-saves", type=float, metavar="GAP_S",
                        help="instead: save each step GAP_S seconds after the last returned (0: back to back), "
                             "whatever runs in the background, and compare the save times with the rewrite "
                             "after a base's deletion on and off; give more steps than three, e.g. --steps "
                             "10,20,30,10,20,30 (a repeated step is saved as a new one)")
    parser.add_argument("--keep", action="store_true",
                        help="keep each flow's backing directory (and its .dccfs/dccfs.log) under --workdir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    files = [args.corpus / "ckpt" / f"minilm_ft_step{int(n):02d}.pt" for n in args.steps.split(",")]
    if not all(f.exists() for f in files):
        raise SystemExit(f"{files[0].parent} lacks the series: python ../shared/corpus/build_corpus.py "
                         f"{args.corpus} --checkpoints")
    loaded = {f: torch.load(str(f), weights_only=False) for f in dict.fromkeys(files)}
    states = [loaded[f] for f in files]
    if len(loaded) < len(files):  # a repeated step is saved as a new one (its own checkpoint-S/)
        states = [dict(state, step=10 * (i + 1)) for i, state in enumerate(states)]
    if args.timed_saves is not None and args.timed_saves < 0:
        parser.error("--timed-saves: GAP_S must be 0 or more")
    configs = TIMED_CONFIGS if args.timed_saves is not None else CONFIGS
    rows = []
    for name in args.flows.split(","):
        if name not in FLOWS:
            raise SystemExit(f"unknown flow {name!r}: one of {', '.join(FLOWS)}")
        ref_dir = args.workdir / f"{name}-reference"
        shutil.rmtree(ref_dir, ignore_errors=True)
        (ref_dir / "run").mkdir(parents=True)
        kept: list = []
        for n, state in enumerate(states):
            FLOWS[name](ref_dir / "run", n, state, kept)
        reference = tree_digests(ref_dir / "run")
        shutil.rmtree(ref_dir)
        results = {config: run_flow(name, config, states, args.workdir, reference, configs,
                                    gap_s=args.timed_saves) for config in configs}
        for config in configs if not args.keep else ():
            shutil.rmtree(args.workdir / f"{name}-{config}", ignore_errors=True)
        rows.append((name, results))
    out = sys.stdout
    if args.timed_saves is not None:
        out.write(f"\n{len(states)} steps saved {args.timed_saves:g} s apart, one fresh mount per flow and "
                  "configuration; seconds per save (its files written and closed), the rewrite after a base's "
                  "deletion off and on (the default)\n")
        out.write("| flow | seconds per save, rewrite off | seconds per save, default | total default/off | "
                  "backing default/off, settled | bit-exact |\n|---|---|---|---|---|---|\n")
        for name, res in rows:
            off, on = res["no-unpin"], res["default"]
            out.write(f"| {name} | {' '.join(f'{t:.2f}' for t in off['seconds'])} | "
                      f"{' '.join(f'{t:.2f}' for t in on['seconds'])} | "
                      f"{sum(on['seconds']) / sum(off['seconds']):.2f} | {on['backing'] / off['backing']:.3f} | "
                      f"{off['exact'] and on['exact']} |\n")
        return 0
    out.write(f"\n{len(states)} steps of {files[0].parent.name}/minilm_ft_step*.pt (model + AdamW state) saved "
              "as each framework does, one fresh mount per flow and configuration; backing = every byte the "
              "backing directory holds (pins included, hard links once), after the passes after close\n")
    out.write("| flow | logical MB (files left) | backing MB, keyframes | backing MB, default | "
              "default/keyframes | visible files MB, default | default/keyframes after each step | bit-exact |\n"
              "|---|---|---|---|---|---|---|---|\n")
    for name, res in rows:
        key, default = res["keyframes"], res["default"]
        per_step = " ".join(f"{d / k:.2f}" for d, k in zip(default["steps"], key["steps"]))
        out.write(f"| {name} | {default['logical'] / 1e6:.0f} | {key['backing'] / 1e6:.1f} | "
                  f"{default['backing'] / 1e6:.1f} | {default['backing'] / key['backing']:.3f} | "
                  f"{default['visible'] / 1e6:.1f} | {per_step} | {key['exact'] and default['exact']} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
