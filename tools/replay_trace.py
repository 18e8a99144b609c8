#!/usr/bin/env python3
"""Replay chunk traces against dccfs.policies and libCacheSim at several cache sizes."""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dccfs.config import CacheConfig  # noqa: E402
from dccfs.policies import POLICY_NAMES, belady, make_policy, simulate  # noqa: E402
from dccfs.trace import read_trace, write_oracle_general  # noqa: E402

log = logging.getLogger(__name__)

# libCacheSim policies run for reference. WTinyLFU is left out: in byte mode 0.3.5 allocates
# ~58 bytes of sketch per byte of cache (GBs here); our 'wtinylfu' matches it in count mode.
LIBCACHESIM_POLICIES = ("LRU", "ARC", "S3FIFO", "Sieve", "TwoQ", "LIRS", "GDSF")


def parse_sizes(text: str, working_set: int) -> list[tuple[str, int]]:
    """'1%,5%' are fractions of the working set; plain numbers (with K/M/G) are bytes."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if item.endswith("%"):
            sizes.append((item, int(working_set * float(item[:-1]) / 100)))
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(item[-1:].upper(), 1)
        number = item[:-1] if scale > 1 else item
        sizes.append((item, int(float(number) * scale)))
    return sizes


def load(path: Path):
    records = list(read_trace(path))
    ids = [r[1] for r in records]
    sizes = [r[2] for r in records]
    writes = [r[3] for r in records]
    first_size = {}
    for obj_id, size in zip(ids, sizes):
        first_size.setdefault(obj_id, size)
    return ids, sizes, writes, sum(first_size.values())


def libcachesim_results(ids, sizes, capacity: int, names) -> dict[str, tuple[float, float]]:
    try:
        import libcachesim as lcs
    except ImportError:
        return {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.oracleGeneral.bin"
        write_oracle_general(path, np.zeros(len(ids)), np.array(ids, dtype=np.uint64),
                             np.array(sizes, dtype=np.uint32))
        for name in names:
            reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
            obj_miss, byte_miss = getattr(lcs, name)(capacity).process_trace(reader)
            results[f"lcs:{name}"] = (1 - byte_miss, 1 - obj_miss)
    return results


def replay(path: Path, size_spec: str, policies, lcs_names) -> tuple[list[str], dict]:
    ids, sizes, writes, working_set = load(path)
    columns = parse_sizes(size_spec, working_set)
    table: dict[str, list[tuple[float, float]]] = {}
    for _, capacity in columns:
        row: dict[str, tuple[float, float]] = {}
        for spec in policies:
            name, _, param_text = spec.partition(":")
            params = dict(p.split("=") for p in param_text.split(";") if p)
            params = {k: _parse_value(v) for k, v in params.items()}
            result = simulate(make_policy(name, capacity, **params), zip(ids, sizes, writes))
            row[spec] = (result.byte_hit_ratio, result.object_hit_ratio)
        row.update(libcachesim_results(ids, sizes, capacity, lcs_names))
        bound = belady(zip(ids, sizes), capacity)
        row["belady"] = (bound.byte_hit_ratio, bound.object_hit_ratio)
        for name, ratios in row.items():
            table.setdefault(name, []).append(ratios)
    header = f"{path.name}: {len(ids)} requests, working set {working_set / 2**20:.0f} MiB"
    return [header] + [label for label, _ in columns], table


def _parse_value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def format_table(columns: list[str], table: dict) -> str:
    """Byte / object hit ratio in %, '*' marks the best online policy per column."""
    header, labels = columns[0], columns[1:]
    lines = [header, f"{'policy':34s}" + "".join(f"{label + ' byte/obj':>22s}" for label in labels)]
    online = [n for n in table if n != "belady"]
    best = [max(online, key=lambda n: table[n][i][0]) for i in range(len(labels))]
    for name, ratios in table.items():
        cells = []
        for i, (byte_hit, obj_hit) in enumerate(ratios):
            mark = "*" if best[i] == name else " "
            cells.append(f"{100 * byte_hit:6.2f}{mark}/{100 * obj_hit:6.2f}")
        lines.append(f"{name:34s}" + "".join(f"{c:>22s}" for c in cells))
    return "\n".join(lines)


def format_margins(columns: list[str], table: dict, default: str) -> str:
    """The default policy's byte hit ratio minus the best libCacheSim policy's, per column,
    with the share of that policy's gap to Belady the default closes (the issue's target)."""
    rivals = [n for n in table if n.startswith("lcs:")]
    if default not in table or not rivals:
        return ""
    cells = []
    for i, label in enumerate(columns[1:]):
        best = max(rivals, key=lambda n: table[n][i][0])
        ours, theirs = table[default][i][0], table[best][i][0]
        gap = table["belady"][i][0] - theirs
        share = f" ({100 * (ours - theirs) / gap:.0f} % of gap)" if ours > theirs and gap > 0 else ""
        cells.append(f"{label}: {100 * (ours - theirs):+.2f} pp vs {best[4:]}{share}")
    return f"{default} vs best libCacheSim: " + "; ".join(cells)


def plot(results, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (columns, table) in zip(axes[0], results):
        labels = columns[1:]
        for name, ratios in table.items():
            style = "k--" if name == "belady" else ("-" if name.startswith("lcs:") else "-o")
            ax.plot(labels, [100 * r[0] for r in ratios], style, label=name, markersize=3)
        ax.set_title(columns[0].split(":")[0])
        ax.set_xlabel("cache size (of working set)")
        ax.set_ylabel("byte hit ratio %")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("traces", nargs="+", type=Path, help="CSV or oracleGeneral traces")
    parser.add_argument("--sizes", default="1%,5%,10%,25%",
                        help="comma list: %% of working set (unique bytes) or bytes (K/M/G)")
    parser.add_argument("--policies", default=",".join(POLICY_NAMES),
                        help="comma list of name[:param=value;...] from dccfs.policies")
    parser.add_argument("--libcachesim", default=",".join(LIBCACHESIM_POLICIES),
                        help="libCacheSim class names ('' for none)")
    parser.add_argument("--plot", type=Path, help="write a PNG of byte hit ratio vs size")
    parser.add_argument("--default", default=CacheConfig().policy,
                        help="policy spec whose margin over the best libCacheSim policy is "
                             "printed under each table (default: the mount's default policy)")
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    lcs_names = [n for n in args.libcachesim.split(",") if n]
    results = []
    for path in args.traces:
        started = time.time()
        columns, table = replay(path, args.sizes, policies, lcs_names)
        results.append((columns, table))
        print(format_table(columns, table))
        margins = format_margins(columns, table, args.default)
        if margins:
            print(margins)
        print(f"({time.time() - started:.0f} s)\n", flush=True)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
