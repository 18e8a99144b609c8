"""Human-readable tables (rich) and JSON for `dccfs stats`."""
from __future__ import annotations

import json
import logging
import sys

import click
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)


def _console() -> Console:
    """A terminal's width on a terminal; piped or captured, wide enough that no path or figure is
    cut to fit 80 columns (two paths cut to the same prefix read alike)."""
    return Console() if sys.stdout.isatty() else Console(width=1000)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def print_stats(reply: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    stats, cache = reply["stats"], reply["cache"]
    console = _console()
    console.print(f"policy {cache['policy']}, t0 budget {_mib(cache['t0_bytes'])}, dirty budget "
                  f"{_mib(cache['dirty_bytes'])}, readahead {cache['readahead_chunks']} chunks, "
                  f"write_admit {cache['write_admit']}, trace {cache['trace']}, "
                  f"up {stats['uptime_s']} s")
    tiers = Table(title="cache tiers")
    for col in ("tier", "hits", "misses", "hit ratio", "resident", "admitted", "refused", "evictions"):
        tiers.add_column(col, justify="right")
    for name, t in stats["tiers"].items():
        tiers.add_row(name, str(t["hits"]), str(t["misses"]), f"{t['hit_ratio']:.3f}",
                      _mib(t["resident_bytes"]), str(t["admissions"]), str(t["refused"]), str(t["evictions"]))
    console.print(tiers)
    codecs = Table(title="codecs")
    for col in ("direction", "codec", "chunks", "raw", "stored", "ratio", "MB/s (1 thread)"):
        codecs.add_column(col, justify="right")
    for direction in ("encode", "decode"):
        for name, c in stats[direction].items():
            codecs.add_row(direction, name, str(c["chunks"]), _mib(c["bytes_in"]), _mib(c["bytes_out"]),
                           f"{c['ratio']:.3f}", f"{c['mb_per_s']:.0f}")
    console.print(codecs)
    lat = Table(title="latency (bucket upper bounds)")
    for col in ("op", "count", "p50 ms", "p90 ms", "p99 ms"):
        lat.add_column(col, justify="right")
    for op, row in stats["latency"].items():
        lat.add_row(op, str(row["count"]), str(row["p50_ms"]), str(row["p90_ms"]), str(row["p99_ms"]))
    console.print(lat)
    d, e = stats["dirty"], stats["errors"]
    console.print(f"dirty {_mib(d['bytes'])} of {_mib(d['budget'])}, writer stalls {d['writer_stalls']}; "
                  f"readahead chunks {stats['readahead_chunks']}, block reads {stats.get('block_reads', 0)}; "
                  f"errors: checksum {e['checksum']}, "
                  f"handler {e['handler']}, codec {e.get('codec', 0)}")
    b = stats.get("delta_bases")
    if b:
        console.print(f"delta bases pinned {b['pinned']}, of which {b['only_pinned']} "
                      f"({_mib(b['only_pinned_bytes'])}) no visible name holds: kept for the files "
                      f"that are deltas of them")
    m = stats.get("memory")
    if m:
        console.print(f"resident {_mib(m['resident_bytes'])}; heap trims {m['heap_trims']}, "
                      f"{_mib(m['heap_trimmed_bytes'])} given back; T0 shed {_mib(m.get('t0_shed_bytes', 0))}")


def print_files(rows: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="stored files")
    for col in ("path", "kind", "logical", "stored", "ratio", "codecs (chunks)"):
        table.add_column(col, justify="left" if col in ("path", "kind", "codecs (chunks)") else "right")
    for row in rows:
        codecs = ", ".join(f"{k} {v}" for k, v in sorted(row.get("codecs", {}).items()))
        if row.get("delta_of"):
            codecs += f" (delta of {', '.join(b[:8] for b in row['delta_of'])})"
        ratio = row.get("ratio")
        table.add_row(row["path"], row["kind"], _mib(row.get("logical")), _mib(row["stored"]),
                      "-" if ratio is None else f"{ratio:.3f}", codecs)
    _console().print(table)
