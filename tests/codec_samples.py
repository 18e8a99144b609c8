"""Sample float tensors for the codec tests: seeded normal weights in bf16, fp16, fp32 and fp64."""
from __future__ import annotations

import numpy as np

NP_FLOAT = {"f16": np.float16, "f32": np.float32, "f64": np.float64}


def weights(n: int, dtype: str, seed: int = 0) -> bytes:
    vals = np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)
    if dtype == "bf16":
        return (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return vals.astype(NP_FLOAT[dtype]).tobytes()
