"""The bench_cache report: Markdown tables of the hot re-read and scan-resistance phases, and the goal checks."""
from __future__ import annotations

from bench_common import MB, MIB

HOT_TARGET_RATIO = 0.9     # dccfs hot re-read >= 0.9x tmpfs
KEPT_TARGET = 0.9          # >= 90% of the hot set's hits kept during the scan


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(report: dict) -> str:
    p = report["params"]
    m = report["machine"]
    lines = [f"bench_cache {report['mode']} run, {report['date']}, {report['elapsed_s']} s; "
             f"{m.get('nproc')} cores, load average {m['loadavg_start'][0]:.1f} at start, "
             f"{m['loadavg_end'][0]:.1f} at end; dccfs tree {m.get('dccfs_tree')}; "
             f"default cache {report['default_cache']['policy']} {report['default_cache']['t0_bytes'] // MIB} MiB; "
             f"daemon peak RSS {report['peak_rss'] / MB:.0f} MB", ""]
    checks = []
    if "hot" in report:
        h = report["hot"]
        lines += [f"### 1. Hot re-read of {h['file']} ({h['bytes'] / MB:.1f} MB), 1 MiB reads, page cache dropped "
                  f"before each read", "",
                  f"write into the mount {h['write_mb_s']:.1f} MB/s; cold read after remount (fills T0) "
                  f"{h['cold_mb_s']:.1f} MB/s: T0 hits +{h['fill']['t0_hits']}, misses +{h['fill']['t0_misses']}, "
                  f"chunk decodes +{h['fill']['decodes']}, T0 resident {h['after_fill']['t0_resident'] / MIB:.0f} MiB;"
                  f" sha1 through the mount matches: {h['verified']}", "",
                  "The page-cache column is the same read repeated at once without a drop: the kernel keeps "
                  "the pages (dccfs opens files with keep_cache), so it is what a second load gets while the "
                  "kernel has not evicted them; the T0 column is what it gets after they were evicted.", "",
                  "| rep | dccfs MB/s (from T0) | dccfs MB/s (page cache kept) | tmpfs MB/s | T0/tmpfs | "
                  "page cache/tmpfs | T0 hits before → after | T0 misses before → after | decodes before → after |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(h["reps"]):
            b, a = r["t0_before"], r["t0_after"]
            lines.append(f"| {i + 1} | {r['dccfs_mb_s']:,.0f} | {r['page_cache_mb_s']:,.0f} | "
                         f"{r['tmpfs_mb_s']:,.0f} | {r['ratio']:.2f} | {r['page_cache_ratio']:.2f} | "
                         f"{b['t0_hits']} → {a['t0_hits']} | {b['t0_misses']} → {a['t0_misses']} | "
                         f"{b['decodes']} → {a['decodes']} |")
        lines.append(f"| median | {h['dccfs_median']:,.0f} | {h['page_cache_median']:,.0f} | "
                     f"{h['tmpfs_median']:,.0f} | {h['ratio_median']:.2f} | {h['page_cache_ratio_median']:.2f} "
                     "| | | |")
        lines.append("")
        checks.append((f"hot re-read from T0 >= {HOT_TARGET_RATIO}x tmpfs", f"{h['ratio_median']:.2f}x (median)",
                       "met" if h["ratio_median"] >= HOT_TARGET_RATIO else "MISSED"))
        checks.append((f"second read with the page cache kept >= {HOT_TARGET_RATIO}x tmpfs",
                       f"{h['page_cache_ratio_median']:.2f}x (median)",
                       "met" if h["page_cache_ratio_median"] >= HOT_TARGET_RATIO else "MISSED"))
        checks.append(("second read served from T0 (T0 misses and decodes unchanged)",
                       "yes" if h["from_t0"] else "no", "met" if h["from_t0"] else "MISSED"))
        if "mmap" in h:
            mm = h["mmap"]
            lines += ["The same model loaded the way safetensors loads it (mmap, copied out 1 MiB at a time): "
                      "two loads of the dccfs file after a drop (the first from T0, the second from the page "
                      "cache), and two of a fresh tmpfs copy.", "",
                      "| rep | dccfs first (T0) MB/s | dccfs second MB/s | tmpfs first MB/s | tmpfs second MB/s | "
                      "second/second |", "|---|---|---|---|---|---|"]
            for i, r in enumerate(mm["reps"]):
                lines.append(f"| {i + 1} | {r['dccfs_first']:,.0f} | {r['dccfs_second']:,.0f} | "
                             f"{r['tmpfs_first']:,.0f} | {r['tmpfs_second']:,.0f} | {r['ratio']:.2f} |")
            lines += [f"| median | {mm['dccfs_first_median']:,.0f} | {mm['dccfs_second_median']:,.0f} | "
                      f"{mm['tmpfs_first_median']:,.0f} | {mm['tmpfs_second_median']:,.0f} | "
                      f"{mm['ratio_median']:.2f} |", ""]
            checks.append((f"(also measured) second load through mmap >= {HOT_TARGET_RATIO}x tmpfs's",
                           f"{mm['ratio_median']:.2f}x (median)",
                           "met" if mm["ratio_median"] >= HOT_TARGET_RATIO else "MISSED"))
    if "scan" in report:
        sd = report["scan_data"]
        lines += [f"### 2. Scan resistance: hot set {p['hot_bytes'] / MB:.0f} MB ({len(sd['hot_files'])} files), "
                  f"scan {p['scan_bytes'] / MB:.0f} MB ({len(sd['scan_files'])} files) read once, "
                  f"t0_bytes {p['t0_bytes'] // MIB} MiB, one hot pass after every {p['t0_bytes'] // MIB} MiB "
                  f"of scan", "",
                  f"data: {sd['logical'] / MB:.0f} MB logical, {sd['stored'] / MB:.0f} MB stored "
                  f"({sd['stored'] / sd['logical']:.3f}), written at {sd['write_mb_s']:.1f} MB/s", "",
                  "T0 hit ratios count FUSE read requests (one per chunk a request touches); the chunk column "
                  "counts hot chunks that had to be decoded again, which is the stricter measure.", "",
                  "| policy | hot T0 hit ratio before scan | during scan (all hot passes) | worst pass | kept | "
                  "hot chunks decoded during scan | hot chunks kept | hot pass MB/s (median) | scan MB/s | "
                  "T0 evictions / refused | target (kept >= 90%) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in report["scan"]:
            kept = s["kept"]
            status = "met" if kept is not None and kept >= KEPT_TARGET else "MISSED"
            name = s["policy"] + (" (default)" if s["policy"] == report["default_cache"]["policy"] else "")
            lines.append(f"| {name} | {_pct(s['baseline']['hit_ratio'])} | {_pct(s['during_hit_ratio'])} "
                         f"({s['during_hits']}/{s['during_hits'] + s['during_misses']}) | {_pct(s['worst_round'])} | "
                         f"{_pct(kept)} | {s['during_decodes']} of {s['hot_chunks'] * len(s['rounds'])} | "
                         f"{_pct(s['chunk_hit_ratio'])} | "
                         f"{s['hot_mb_s_during']:,.0f} | {s['scan_mb_s']:,.0f} | "
                         f"{s['final']['t0_evictions']} / {s['final']['t0_refused']} | {status} |")
            checks.append((f"scan resistance, {name}: >= 90% of hot hits kept", _pct(kept), status))
        lines += ["", "Per hot pass (T0 hit ratio of the hot set after each scan step):", "",
                  "| policy | " + " | ".join(f"pass {i + 1}" for i in range(max(len(s["rounds"]) for s in report["scan"])))
                  + " |", "|---|" + "---|" * max(len(s["rounds"]) for s in report["scan"])]
        for s in report["scan"]:
            lines.append(f"| {s['policy']} | " + " | ".join(_pct(r["hot_hit_ratio"]) for r in s["rounds"]) + " |")
        lines.append("")
    lines += ["| target | measured | status |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in checks]
    return "\n".join(lines)
