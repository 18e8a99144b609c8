"""Counters of a live mount: cache tiers, codecs, latencies, errors and write back-pressure."""
from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import asdict, dataclass, field

from dccfs.memory import resident_bytes

log = logging.getLogger(__name__)

# Log-spaced latency buckets from 10 us to 10 s: percentiles within a bucket's width
# are good enough to tell a cache hit from a disk read from a stall.
LATENCY_BUCKETS_S = tuple(10 ** (e / 4) * 1e-5 for e in range(0, 25))


@dataclass
class TierStats:
    name: str
    hits: int = 0
    misses: int = 0
    admissions: int = 0
    refused: int = 0
    evictions: int = 0
    resident_bytes: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class CodecStats:
    chunks: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_out / self.bytes_in if self.bytes_in else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / self.seconds / 1e6 if self.seconds else 0.0


class LatencyHistogram:
    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total += 1

    def percentile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-th quantile (0 when empty)."""
        if not self.total:
            return 0.0
        rank = q * self.total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return LATENCY_BUCKETS_S[min(i, len(LATENCY_BUCKETS_S) - 1)]
        return LATENCY_BUCKETS_S[-1]


@dataclass
class MountStats:
    t0: TierStats = field(default_factory=lambda: TierStats("t0"))
    disk: TierStats = field(default_factory=lambda: TierStats("t2"))
    encode: dict[str, CodecStats] = field(default_factory=dict)
    decode: dict[str, CodecStats] = field(default_factory=dict)
    checksum_errors: int = 0
    handler_errors: int = 0
    codec_failures: int = 0
    writer_stalls: int = 0
    dirty_bytes: int = 0
    dirty_budget: int = 0
    readahead_chunks: int = 0
    block_reads: int = 0  # small reads served by decoding one block of a chunk (codec 3), not the chunk
    compactions: int = 0
    deltas_after_close: int = 0  # chunks the pass after close stored as deltas
    unpin_rewrites: int = 0  # files stored again without their base, so that a deleted base's pin went
    cheap_encodes: int = 0
    heap_trims: int = 0
    heap_trimmed_bytes: int = 0
    t0_shed_bytes: int = 0  # chunk bytes T0 gave back to keep RSS under its ceiling
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.read_latency = LatencyHistogram()
        self.write_latency = LatencyHistogram()
        self._lock = threading.Lock()

    def count_codec(self, table: str, codec: str, raw: int, stored: int, seconds: float) -> None:
        with self._lock:
            entry = getattr(self, table).setdefault(codec, CodecStats())
            entry.chunks += 1
            entry.bytes_in += raw
            entry.bytes_out += stored
            entry.seconds += seconds

    def snapshot(self) -> dict:
        with self._lock:
            tiers = {}
            for tier in (self.t0, self.disk):
                row = asdict(tier)
                row["hit_ratio"] = round(tier.hit_ratio, 4)
                tiers[tier.name] = row

            def codec_rows(table):
                return {name: {**asdict(s), "ratio": round(s.ratio, 4),
                               "mb_per_s": round(s.mb_per_s, 1)} for name, s in table.items()}

            def latency(h):
                return {"count": h.total, **{f"p{int(q * 100)}_ms": round(h.percentile(q) * 1e3, 3)
                                             for q in (0.5, 0.9, 0.99)}}
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "tiers": tiers,
                "encode": codec_rows(self.encode),
                "decode": codec_rows(self.decode),
                "latency": {"read": latency(self.read_latency), "write": latency(self.write_latency)},
                "errors": {"checksum": self.checksum_errors, "handler": self.handler_errors,
                           "codec": self.codec_failures},
                "dirty": {"bytes": self.dirty_bytes, "budget": self.dirty_budget,
                          "writer_stalls": self.writer_stalls},
                "readahead_chunks": self.readahead_chunks,
                "block_reads": self.block_reads,
                "compactions": self.compactions,
                "deltas_after_close": self.deltas_after_close,
                "unpin_rewrites": self.unpin_rewrites,
                "cheap_encodes": self.cheap_encodes,
                "memory": {"resident_bytes": resident_bytes() or 0, "heap_trims": self.heap_trims,
                           "heap_trimmed_bytes": self.heap_trimmed_bytes,
                           "t0_shed_bytes": self.t0_shed_bytes},
            }
