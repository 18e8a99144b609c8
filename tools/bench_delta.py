"""Benchmark the checkpoint delta codec (codecs/delta.py) on consecutive checkpoints of one training run.

For each (new, base) pair both files are cut into chunks (1 MiB, as a mount stores checkpoints; --chunk) at the same offsets; chunk i of the new file is
delta-coded against chunk i of the base. Printed per pair: keyframe ratio (encode_chunk alone, hints from
sniff_layout(first 8 MiB).hints_for), delta ratio (per chunk the smaller of delta and keyframe, as the filesystem
stores it), how often each transform won, and single-threaded encode/decode MB/s of the delta path.

    .venv/bin/python tools/bench_delta.py                  # the minilm series in .corpus/ckpt
    .venv/bin/python tools/bench_delta.py --stride 8       # every 8th chunk (quick look)
    .venv/bin/python tools/bench_delta.py --no-scale       # without the scaled prediction (ratio vs decode speed)
    .venv/bin/python tools/bench_delta.py NEW BASE [NEW BASE ...]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from dccfs.codecs import ChunkHints, decode_chunk, encode_chunk, sniff_layout
from dccfs.codecs import delta

log = logging.getLogger("bench_delta")
CHUNK = 1 << 20
REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / ".corpus" / "ckpt"
TRANSFORM_NAMES = {delta.T_XOR: "xor", delta.T_SUB: "sub"}


def describe(enc, raw_len: int) -> str:
    """Name of the transform a delta chunk used (+scale when any region used the scaled prediction)."""
    transform, desc, _, _ = delta._parse(enc.params, raw_len)
    name = TRANSFORM_NAMES.get(transform, str(transform))
    if any(c is not None for _, _, c in desc):
        name += "+scale"
    return name


def bench_pair(new_path: Path, base_path: Path, stride: int = 1, chunk: int = CHUNK) -> dict:
    new = new_path.read_bytes()
    base = base_path.read_bytes()
    layout = sniff_layout(new[: 8 << 20], len(new))
    offsets = list(range(0, len(new), chunk))
    total = key_bytes = stored = 0
    enc_s = dec_s = key_dec_s = 0.0
    wins: Counter = Counter()
    for i, off in enumerate(offsets):
        raw = new[off : off + chunk]
        hints = layout.hints_for(off, raw) if layout else ChunkHints()  # torch-zip layouts learn from every chunk
        if i % stride:
            continue
        b = base[off : off + chunk]
        key = encode_chunk(raw, hints)
        key_size = len(key.params) + len(key.payload)
        started = time.perf_counter()
        decode_chunk(key.codec_id, key.params, key.payload, len(raw))
        key_dec_s += time.perf_counter() - started
        ref = f"{base_path.name}:{off}".encode()[-64:]
        t0 = time.perf_counter()
        enc = delta.encode_delta(raw, b, hints, ref)
        t1 = time.perf_counter()
        if enc is None:
            out = decode_chunk(key.codec_id, key.params, key.payload, len(raw))
            t2 = time.perf_counter()
            size = key_size
            wins["keyframe"] += 1
        else:
            if delta.delta_base_ref(enc.params) != ref:
                raise SystemExit("base_ref mismatch")
            out = delta.decode_delta(enc.params, enc.payload, len(raw), b)
            t2 = time.perf_counter()
            size = len(enc.params) + len(enc.payload)
            wins[describe(enc, len(raw))] += 1
        if out != raw:
            raise SystemExit(f"round-trip mismatch at offset {off} of {new_path}")
        enc_s += t1 - t0
        dec_s += t2 - t1
        total += len(raw)
        key_bytes += key_size
        stored += size
    return {
        "new": new_path.name, "base": base_path.name, "bytes": total,
        "keyframe": key_bytes / total, "delta": stored / total,
        "enc_mbs": total / enc_s / 1e6, "dec_mbs": total / dec_s / 1e6, "key_dec_mbs": total / key_dec_s / 1e6,
        "wins": wins,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="NEW BASE pairs (default: minilm step30/20 and 20/10)")
    ap.add_argument("--stride", type=int, default=1, help="bench every n-th chunk (layouts still see every chunk)")
    ap.add_argument("--chunk", type=int, default=CHUNK, help=f"chunk size in bytes (default {CHUNK})")
    ap.add_argument("--no-scale", action="store_true", help="encode without the scaled prediction")
    args = ap.parse_args(argv)
    if args.no_scale:
        import functools
        delta._transform = functools.partial(delta._transform, allow_scale=False)
    logging.basicConfig(level=logging.WARNING)
    if args.files:
        if len(args.files) % 2:
            ap.error("files come in NEW BASE pairs")
        pairs = list(zip(args.files[::2], args.files[1::2]))
    else:
        pairs = [(CKPT / f"minilm_ft_step{a}.{ext}", CKPT / f"minilm_ft_step{b}.{ext}")
                 for ext in ("safetensors", "pt") for a, b in ((30, 20), (20, 10))]
    # warm the numba kernels outside the timings
    import numpy as np

    rng = np.random.default_rng(0)
    for dtype, np_dtype in (("f32", np.float32), ("f16", np.float16)):
        old = rng.normal(0, 1, 4096).astype(np_dtype)
        for factor in (0.999, 0.9 ** 10):
            warm_new = (old * np_dtype(factor)).tobytes()
            hints = ChunkHints(segments=(delta.Segment(0, len(warm_new), dtype),))
            e = delta.encode_delta(warm_new, old.tobytes(), hints, b"w")
            if e is not None:
                delta.decode_delta(e.params, e.payload, len(warm_new), old.tobytes())
    # dec MB/s: the stored chunk (delta or keyframe) with its base already decoded, as from
    # the chunk cache; key dec MB/s: the keyframe of the same chunk, for comparison.
    print(f"{'new vs base':<52} {'MB':>6} {'keyframe':>9} {'delta':>7} {'enc MB/s':>9} {'dec MB/s':>9} "
          f"{'key dec MB/s':>13}  wins")
    for new_path, base_path in pairs:
        r = bench_pair(new_path, base_path, args.stride, args.chunk)
        wins = ", ".join(f"{k} {v}" for k, v in r["wins"].most_common())
        print(f"{r['new'] + ' vs ' + r['base']:<52} {r['bytes'] / 1e6:6.1f} {r['keyframe']:9.4f} {r['delta']:7.4f} "
              f"{r['enc_mbs']:9.1f} {r['dec_mbs']:9.1f} {r['key_dec_mbs']:13.1f}  {wins}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
