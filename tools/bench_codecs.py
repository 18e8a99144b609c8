"""Benchmark dccfs chunk codecs against zstd-3 and ZipNN: ratio and single-thread MB/s (CPU time), plus the order-0 bound."""
from __future__ import annotations

import argparse
import ctypes
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import zstandard

from dccfs.codecs import ChunkHints, Segment, decode_chunk, encode_chunk, sniff_layout
from dccfs.codecs import fields, generic
from dccfs.codecs.tensor import plan_regions

log = logging.getLogger("bench_codecs")
CHUNK = 256 * 1024  # the chunk size when neither --chunk-kib nor the mount's default applies (chunks_with_hints)
ZIPNN_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process (a fixed 1 GiB mmap threshold, no trimming), so that
    neither codec's CPU time includes the page faults of fresh output buffers. With glibc's default, what a
    buffer costs depended on what ran before it in the process: ZipNN's bf16 compression of a 32 MiB window
    measured 707 MB/s in a fresh process, 935 MB/s with this or after an f16 file had moved glibc's dynamic
    threshold (2026-12-05); ours moved less. False where this is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))  # C ints


def mount_chunk(path: Path) -> int:
    """The chunk size a default mount stores this file with (dccfs.config: 1 MiB for tensor files)."""
    from dccfs.config import Config

    return 1 << Config().chunk_shift_for(path.name)


def chunks_with_hints(data: bytes, chunk: int | None = None):
    chunk = chunk or CHUNK
    layout = sniff_layout(data[: 1 << 20], len(data))
    out = []
    for off in range(0, len(data), chunk):
        raw = data[off : off + chunk]
        out.append((raw, layout.hints_for(off, raw) if layout else ChunkHints()))
    return layout, out


def bench_ours(data: bytes, chunks) -> tuple[float, float, float, Counter]:
    t0 = time.process_time()
    encoded = [encode_chunk(raw, hints) for raw, hints in chunks]
    t1 = time.process_time()
    dec_s = 0.0  # only decode_chunk is timed; the comparison with the original is not
    for (raw, _), enc in zip(chunks, encoded):
        ta = time.process_time()
        out = decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw))
        dec_s += time.process_time() - ta
        if out != raw:
            raise SystemExit("round-trip mismatch")
    stored = sum(len(e.params) + len(e.payload) for e in encoded)
    return stored / len(data), len(data) / (t1 - t0) / 1e6, len(data) / dec_s / 1e6, Counter(e.codec_id for e in encoded)


def bench_zstd3(data: bytes) -> tuple[float, float, float]:
    t0 = time.process_time()
    comp = zstandard.ZstdCompressor(level=3).compress(data)
    t1 = time.process_time()
    zstandard.ZstdDecompressor().decompress(comp, max_output_size=len(data))
    t2 = time.process_time()
    return len(comp) / len(data), len(data) / (t1 - t0) / 1e6, len(data) / (t2 - t1) / 1e6


def bench_zipnn(data: bytes, dtype: str) -> tuple[float, float, float] | None:
    try:
        import zipnn
    except ImportError:
        return None
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1)
    buf = bytearray(data)  # ZipNN reorders its input in place
    t0 = time.process_time()
    comp = z.compress(buf)
    t1 = time.process_time()
    out = z.decompress(comp)
    t2 = time.process_time()
    if bytes(out) != data:
        log.warning("zipnn round-trip mismatch")
    return len(comp) / len(data), len(data) / (t1 - t0) / 1e6, len(data) / (t2 - t1) / 1e6


def plane_bound(chunks) -> float:
    """Order-0 entropy of byte planes per chunk (float regions split by byte position, the rest as bytes)."""
    bits = 0.0
    total = 0
    for raw, hints in chunks:
        arr = np.frombuffer(raw, np.uint8)
        by_class: dict[int, list[np.ndarray]] = {}
        pos = 0
        for length, cls in plan_regions(len(raw), hints.segments):
            by_class.setdefault(cls, []).append(arr[pos : pos + length])
            pos += length
        for cls, parts in by_class.items():
            data = np.concatenate(parts)
            width = fields.CLASSES[cls][0]
            planes = np.empty((width, data.size // width), np.uint8)
            fields._split_planes(data, width, planes)
            bits += sum(generic.order0_bits(p) * p.size for p in planes)
        total += len(raw)
    return bits / 8 / max(total, 1)


def side_by_side(paths: list[Path], window_mib: int, offset_mib: int, passes: int, chunk_kib: int | None) -> None:
    """Single-thread MB/s of ours vs ZipNN on the same window of each file, passes interleaved, best of N.

    Timed in process CPU time (both are single-threaded): on this shared 2-core machine wall-clock time moved by
    2x with the other engineers' load (ZipNN's own decode: 554-1229 MB/s wall, 1483-1627 MB/s CPU in one run)."""
    import zipnn

    log.info("| file | chunk | window | ours ratio | zipnn ratio | ours comp MB/s | zipnn comp MB/s | comp × | "
             "ours dec MB/s | zipnn dec MB/s | dec × |")
    log.info("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        whole = path.read_bytes()
        chunk = chunk_kib << 10 if chunk_kib else mount_chunk(path)
        start = min(offset_mib << 20, max(len(whole) - (window_mib << 20), 0)) // chunk * chunk
        data = whole[start : start + (window_mib << 20)]
        layout = sniff_layout(whole[: 1 << 20], len(whole))
        if layout is not None:
            # a torch zip layout learns where storages start from the local headers of the chunks it sees, as a
            # mount's writer shows it every chunk in order: the chunks before the window too (else a window past
            # the first storages was only probed: zero runs of optimizer state went to zstd)
            for o in range(0, start, chunk):
                layout.hints_for(o, whole[o : o + chunk])
        chunks = [(data[o : o + chunk], layout.hints_for(start + o, data[o : o + chunk]) if layout else ChunkHints())
                  for o in range(0, len(data), chunk)]
        dtypes = Counter(seg.dtype for _, h in chunks for seg in h.segments)
        z = zipnn.ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPE.get(
            dtypes.most_common(1)[0][0] if dtypes else "bf16", "bfloat16"), threads=1)
        best = [float("inf")] * 4
        for _ in range(passes):
            t0 = time.process_time()
            enc = [encode_chunk(raw, hints) for raw, hints in chunks]
            t1 = time.process_time()
            for (raw, _), e in zip(chunks, enc):
                decode_chunk(e.codec_id, e.params, e.payload, len(raw))
            t2 = time.process_time()
            # ZipNN reorders its input in place: a fresh copy, made outside both timers (until 2026-12-04 the
            # copy of the whole window was counted in our decode time, ~40% of it for 32 MiB windows)
            buf = bytearray(data)
            t2b = time.process_time()
            zc = z.compress(buf)
            t3 = time.process_time()
            z.decompress(zc)
            t4 = time.process_time()
            for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2b, t4 - t3)):
                best[k] = min(best[k], dt)
        ours = sum(len(e.params) + len(e.payload) for e in enc) / len(data)
        mbs = [len(data) / b / 1e6 for b in best]
        log.info("| %s | %d KiB | %d MiB at %d MiB | %.4f | %.4f | %.0f | %.0f | %.2f | %.0f | %.0f | %.2f |",
                 path.name, chunk >> 10, len(data) >> 20, start >> 20, ours, len(zc) / len(data), mbs[0], mbs[2], mbs[0] / mbs[2],
                 mbs[1], mbs[3], mbs[1] / mbs[3])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--side-by-side", action="store_true",
                    help="only compare single-thread speed (CPU time) with ZipNN on a window of each file "
                         "(best of --passes)")
    ap.add_argument("--window-mib", type=int, default=48)
    ap.add_argument("--offset-mib", type=int, default=0)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--chunk-kib", type=int, default=None,
                    help="chunk size in KiB (default: what a default mount uses for the file's name, "
                         "1024 for *.safetensors, *.pt and other tensor files, else 256)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc as it is (by default the tool makes it keep freed memory, so that "
                         "page faults of fresh buffers do not enter either codec's time)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if not args.default_malloc:
        log.info("malloc: %s", "keeps freed memory (mallopt)" if keep_freed_memory() else "default (no glibc mallopt)")
    # load (or compile) the numba kernels of every path before timing: encoders and decoders per float dtype
    # 1 MiB, as the mount's chunks: the two-part streams and their loops only run on chunks that long
    warm = np.random.default_rng(0).normal(0, 0.05, 262144).astype(np.float32).tobytes()
    # (bf16 twice: the f32 bytes read as bf16 spread over every exponent, which keeps class 1; real weights take
    # class 8 and its fused loop)
    bf16 = (np.frombuffer(warm, np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    for dtype, data in (("bf16", warm), ("bf16", bf16 + bf16), ("f16", warm), ("f32", warm)):
        for n in (len(data), 4096):
            enc = encode_chunk(data[:n], ChunkHints(segments=(Segment(0, n, dtype),)))
            decode_chunk(enc.codec_id, enc.params, enc.payload, n)
    # and the checkpoint paths: blocks (two tensors), zero-masked rows, method 7 (rows with their own scale)
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 1e-3, (512, 384)) * np.exp(rng.normal(0, 2, (512, 1)))
    rows[rng.random(512) < 0.5] = 0
    ckpt = np.concatenate([rng.normal(0, 0.05, 65536), rows.reshape(-1)]).astype(np.float32).tobytes()
    segs = (Segment(0, 262144, "f32"), Segment(262144, len(ckpt) - 262144, "f32"))
    enc = encode_chunk(ckpt, ChunkHints(segments=segs))
    decode_chunk(enc.codec_id, enc.params, enc.payload, len(ckpt))
    enc = encode_chunk(ckpt[262144:], ChunkHints(segments=(Segment(0, len(ckpt) - 262144, "f32"),)))
    decode_chunk(enc.codec_id, enc.params, enc.payload, len(ckpt) - 262144)
    if args.side_by_side:
        side_by_side(args.files, args.window_mib, args.offset_mib, args.passes, args.chunk_kib)
        return 0
    rows = []
    for path in args.files:
        data = path.read_bytes()
        chunk = args.chunk_kib << 10 if args.chunk_kib else mount_chunk(path)
        layout, chunks = chunks_with_hints(data, chunk)
        dtypes = Counter()
        for _, hints in chunks:
            for seg in hints.segments:
                dtypes[seg.dtype] += seg.length
        main_dtype = dtypes.most_common(1)[0][0] if dtypes else "bf16"
        ours = bench_ours(data, chunks)
        z3 = bench_zstd3(data)
        zn = bench_zipnn(data, ZIPNN_DTYPE.get(main_dtype, "bfloat16"))
        bound = plane_bound(chunks)
        log.info(
            "%s: %d bytes, %d KiB chunks, layout %s, dtype %s, codecs %s",
            path.name, len(data), chunk >> 10, layout.kind if layout else "-", main_dtype, dict(ours[3]),
        )
        log.info("  ours   ratio %.4f  comp %7.0f MB/s  dec %7.0f MB/s", *ours[:3])
        log.info("  zstd-3 ratio %.4f  comp %7.0f MB/s  dec %7.0f MB/s", *z3)
        if zn:
            log.info("  zipnn  ratio %.4f  comp %7.0f MB/s  dec %7.0f MB/s", *zn)
        log.info("  order-0 byte-plane bound %.4f", bound)
        rows.append((path.name, len(data), chunk, ours, z3, zn, bound))
    log.info("")
    log.info("| file | size | chunk | ours ratio | ours comp MB/s | ours dec MB/s | zstd-3 ratio | zipnn ratio | "
             "zipnn comp MB/s | zipnn dec MB/s | plane bound |")
    log.info("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, size, chunk, ours, z3, zn, bound in rows:
        zn_cells = "%.4f | %.0f | %.0f" % zn if zn else "- | - | -"
        log.info("| %s | %d | %d KiB | %.4f | %.0f | %.0f | %.4f | %s | %.4f |", name, size, chunk >> 10, *ours[:3],
                 z3[0], zn_cells, bound)
    return 0


if __name__ == "__main__":
    sys.exit(main())
