"""Realistic data for bench_cache: real corpus tensors reshuffled into safetensors files with digit-free names."""
from __future__ import annotations

import logging
import os
import random
import string
from pathlib import Path

log = logging.getLogger(__name__)


def letters(i: int) -> str:
    """a, b, ..., z, ba, bb, ...: file names without digits (keeps the delta codec's series detection off)."""
    out = ""
    while True:
        out = string.ascii_lowercase[i % 26] + out
        i //= 26
        if i == 0:
            return out


class TensorStream:
    """Endless realistic tensor data: real fp32 corpus tensors, shuffled, scaled, cast; one variant per pass."""

    def __init__(self, corpus: Path, sources: list[str], seed: int):
        from safetensors.torch import load_file
        self.tensors = []
        for name in sources:
            path = corpus / "real" / f"{name}.safetensors"
            if path.exists():
                sd = load_file(str(path))
                self.tensors = [(k, v.flatten()) for k, v in sd.items() if v.is_floating_point() and v.numel()]
                log.info("realistic data from %s (%d tensors, %.0f M parameters)", path.name, len(self.tensors),
                         sum(v.numel() for _, v in self.tensors) / 1e6)
                break
        if not self.tensors:
            raise SystemExit(f"none of {sources} in {corpus}/real (make corpus / make corpus-full)")
        self.rng = random.Random(seed)
        self.variant = -1
        self.queue: list = []

    def _refill(self) -> None:
        self.variant += 1
        order = list(self.tensors)
        self.rng.shuffle(order)
        scale = 1.0 + 0.0137 * (self.variant + 1)
        self.queue = [(f"{k}.v{self.variant}", v, scale) for k, v in order]

    def file_dict(self, nbytes: int, dtype) -> dict:
        """Tensors of `dtype` adding up to nbytes (the last one cut to fit)."""
        out, have, elem = {}, 0, dtype.itemsize
        while have < nbytes:
            if not self.queue:
                self._refill()
            name, t, scale = self.queue.pop(0)
            want = (nbytes - have) // elem
            if want <= 0:
                break
            if t.numel() > want:
                self.queue.insert(0, (name + ".tail", t[want:], scale))
                t = t[:want]
            out[name] = (t * scale).to(dtype).contiguous()
            have += t.numel() * elem
        return out


def write_set(stream: TensorStream, root: Path, prefix: str, files: int, total: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        dtype = torch.bfloat16 if i % 2 == 0 else torch.float16
        path = root / f"{prefix}_{letters(i)}.safetensors"
        save_file(stream.file_dict(total // files, dtype), str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        paths.append(path)
    return paths
