"""Prometheus exposition of a live mount's figures (prometheus-client), behind --metrics.

Metric names are documented in docs/operations.md; every value is read from
MountStats.snapshot() at scrape time, so there is one source of truth.
"""
from __future__ import annotations

import logging
import socket

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)


class MountCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        snap = self.engine.stats.snapshot()
        tiers = snap["tiers"]

        def per_tier(name, kind, doc, field):
            family = kind(name, doc, labels=["tier"])
            for tier, row in tiers.items():
                family.add_metric([tier], row[field])
            return family
        yield per_tier("dccfs_cache_hits", CounterMetricFamily, "Chunk requests served by the tier", "hits")
        yield per_tier("dccfs_cache_misses", CounterMetricFamily, "Chunk requests the tier missed", "misses")
        yield per_tier("dccfs_cache_evictions", CounterMetricFamily, "Chunks evicted", "evictions")
        yield per_tier("dccfs_cache_refused", CounterMetricFamily, "Admissions refused", "refused")
        yield per_tier("dccfs_cache_resident_bytes", GaugeMetricFamily, "Bytes resident", "resident_bytes")
        for direction in ("encode", "decode"):
            bytes_in = CounterMetricFamily(f"dccfs_{direction}_raw_bytes", f"Raw bytes {direction}d",
                                           labels=["codec"])
            bytes_out = CounterMetricFamily(f"dccfs_{direction}_stored_bytes",
                                            f"Stored bytes {direction}d", labels=["codec"])
            seconds = CounterMetricFamily(f"dccfs_{direction}_seconds", f"CPU seconds spent to {direction}",
                                          labels=["codec"])
            for codec, row in snap[direction].items():
                bytes_in.add_metric([codec], row["bytes_in"])
                bytes_out.add_metric([codec], row["bytes_out"])
                seconds.add_metric([codec], row["seconds"])
            yield bytes_in
            yield bytes_out
            yield seconds
        latency = GaugeMetricFamily("dccfs_request_latency_seconds", "Latency percentile bucket bounds",
                                    labels=["op", "quantile"])
        for op, row in snap["latency"].items():
            for q in ("p50", "p90", "p99"):
                latency.add_metric([op, q], row[f"{q}_ms"] / 1e3)
        yield latency
        yield CounterMetricFamily("dccfs_checksum_errors", "Chunks that failed verification",
                                  value=snap["errors"]["checksum"])
        yield CounterMetricFamily("dccfs_handler_errors", "Unexpected handler exceptions answered with EIO",
                                  value=snap["errors"]["handler"])
        yield CounterMetricFamily("dccfs_codec_failures", "Chunks whose codec failed; stored with zstd instead",
                                  value=snap["errors"]["codec"])
        yield GaugeMetricFamily("dccfs_dirty_bytes", "Written chunks not yet encoded",
                                value=snap["dirty"]["bytes"])
        yield GaugeMetricFamily("dccfs_dirty_budget_bytes", "Dirty budget", value=snap["dirty"]["budget"])
        yield CounterMetricFamily("dccfs_writer_stalls", "Writes that waited for the dirty budget",
                                  value=snap["dirty"]["writer_stalls"])
        yield GaugeMetricFamily("dccfs_resident_bytes", "Resident memory of the daemon",
                                value=snap["memory"]["resident_bytes"])
        yield CounterMetricFamily("dccfs_heap_trimmed_bytes", "Freed heap memory given back to the kernel",
                                  value=snap["memory"]["heap_trimmed_bytes"])
        yield CounterMetricFamily("dccfs_t0_shed_bytes", "T0 chunk bytes dropped to keep RSS under budgets + allowance",
                                  value=snap["memory"]["t0_shed_bytes"])


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a --metrics HOST:PORT (an empty host is 127.0.0.1); ValueError if bad."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics wants HOST:PORT with a port 1..65535, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str) -> None:
    """Fail now, with the reason, when the metrics endpoint could not listen there: the
    daemon binds it only after it has forked."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise ValueError(f"--metrics {address}: cannot listen there: "
                         f"{exc.strerror or exc}") from exc


def serve_metrics(address: str, engine) -> None:
    host, port = parse_address(address)
    REGISTRY.register(MountCollector(engine))
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ValueError(f"--metrics {address}: cannot listen there: {exc.strerror or exc}") from exc
    log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
