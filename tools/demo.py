#!/usr/bin/env python3
"""The `make run` demo: mount, copy a real model in, remount, verify every byte, show the saving."""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

log = logging.getLogger("dccfs.demo")
DCCFS = [sys.executable, "-m", "dccfs.cli"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(*args: str) -> None:
    result = subprocess.run([*DCCFS, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dccfs {' '.join(args)} failed:\n{result.stderr}")


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=Path(".corpus"),
                        help="corpus built by ../shared/corpus/build_corpus.py (default: .corpus)")
    parser.add_argument("--demo-dir", type=Path, default=Path("demo"),
                        help="where backing/ and mnt/ are created (default: demo)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console = Console()
    model = args.corpus / "models" / "minilm"
    if not (model / "model.safetensors").exists():
        raise SystemExit(f"{model} is missing: build the corpus first (make corpus)")
    backing, mnt = (args.demo_dir / "backing").resolve(), (args.demo_dir / "mnt").resolve()
    if is_mounted(mnt):
        run("umount", str(mnt))
    if backing.exists():
        shutil.rmtree(backing)
    backing.mkdir(parents=True)
    mnt.mkdir(parents=True, exist_ok=True)

    console.print(f"[bold]mount[/] {backing} -> {mnt}")
    run("mount", str(backing), str(mnt))
    target = mnt / "minilm"
    console.print(f"[bold]copy[/] real MiniLM model ({model}) into the mount")
    shutil.copytree(model, target)
    console.print("[bold]remount[/] so every byte below is read back from the stored containers")
    run("umount", str(mnt))
    run("mount", str(backing), str(mnt))

    table = Table(title="MiniLM through dccfs (read back after remount, sha256 verified)")
    for column in ("file", "logical bytes", "stored bytes", "ratio", "sha256"):
        table.add_column(column, justify="right" if "bytes" in column or column == "ratio" else "left")
    total_logical = total_stored = 0
    failures = 0
    for source in sorted(p for p in model.rglob("*") if p.is_file()):
        rel = source.relative_to(model)
        through_mount = target / rel
        ok = sha256_of(through_mount) == sha256_of(source)
        failures += not ok
        logical = through_mount.stat().st_size
        stored = (backing / "minilm" / rel).stat().st_size
        total_logical += logical
        total_stored += stored
        table.add_row(str(rel), f"{logical:,}", f"{stored:,}", f"{stored / max(logical, 1):.3f}",
                      "[green]match[/]" if ok else "[red]MISMATCH[/]")
    table.add_row("[bold]total[/]", f"{total_logical:,}", f"{total_stored:,}",
                  f"{total_stored / total_logical:.3f}", "")
    console.print(table)
    saved = total_logical - total_stored
    console.print(f"saved {saved / 1e6:.1f} MB ({100 * saved / total_logical:.1f}%) on "
                  f"{total_logical / 1e6:.1f} MB")
    console.print("du shows the stored bytes, du --apparent-size the logical ones:")
    for flag in ([], ["--apparent-size"]):
        out = subprocess.run(["du", "-sh", *flag, str(target)], capture_output=True, text=True).stdout
        console.print(f"  du -sh {' '.join(flag)} -> {out.split()[0]}")
    if failures:
        console.print(f"[red]{failures} files did not verify[/]")
        return 1
    console.print(f"\nThe mount stays up at {mnt}. Unmount with:\n  .venv/bin/dccfs umount {mnt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
