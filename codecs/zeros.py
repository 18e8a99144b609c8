"""Zero-masked float classes (5 bf16z, 6 f16z, 7 f32z): +0.0 elements leave the field streams, coded as runs."""
from __future__ import annotations

import logging

import numpy as np

from ._jit import njit
from .api import CodecError
from . import fields

log = logging.getLogger(__name__)

# base float class -> its zero-masked class (ids are part of the on-disk format, docs/codecs.md)
ZERO_CLASS = {fields.CLASS_BF16: fields.CLASS_BF16Z, fields.CLASS_F16: fields.CLASS_F16Z,
              fields.CLASS_F32: fields.CLASS_F32Z}
BASE_CLASS = {z: b for b, z in ZERO_CLASS.items()}
_UINT = {2: np.uint16, 4: np.uint32}
# masking is only tried when at least this share of a class's elements is +0.0 (optimizer state of embedding
# rows that saw no token in the step); below it the run list rarely pays for itself
MIN_ZERO_SHARE = 0.02


# _split_runs looks at blocks of this many elements first: a block of zeros inside a zero run, or of nonzero
# elements inside a nonzero run, is skipped or copied whole
RUN_BLOCK = 64


@njit(nogil=True, boundscheck=False)
def _split_runs(u, runs, out):
    """(run count, nonzero count): alternating run lengths of u == 0 and u != 0 into runs, starting with a zero run
    (possibly 0), and the nonzero elements into out. runs needs room for u.size + 2 values (the run boundaries)."""
    # branchless per element where a block changes (a branch per element mispredicts on scattered zeros), block
    # tests elsewhere: optimizer state masks whole embedding rows (one-off timings per 1 MiB of f32: 14 us for zeros,
    # 80 us for rows of 512, ~300 us for scattered zeros, against 150-2300 us for a branch per element)
    n = u.size
    if n == 0:
        return 0, 0
    runs[0] = 0
    k = 1
    m = 0
    prev = 1  # "in a zero run" before element 0, so a leading nonzero element closes an empty first run
    nblocks = n // RUN_BLOCK
    for blk in range(nblocks + 1):
        base = blk * RUN_BLOCK
        end = min(base + RUN_BLOCK, n)
        if end - base == RUN_BLOCK:
            lo = u[base]
            hi = u[base]
            for i in range(base + 1, end):
                lo = min(lo, u[i])
                hi = max(hi, u[i])
            if hi == 0 and prev == 1:
                continue
            if lo != 0 and prev == 0:
                for j in range(RUN_BLOCK):
                    out[m + j] = u[base + j]
                m += RUN_BLOCK
                continue
        for i in range(base, end):
            z = 1 if u[i] == 0 else 0
            runs[k] = i
            k += z ^ prev
            prev = z
            out[m] = u[i]
            m += 1 - z
    runs[k] = n
    for j in range(k):  # boundaries -> lengths
        runs[j] = runs[j + 1] - runs[j]
    return k, m


@njit(nogil=True)
def _put_varints(vals, n, out):
    pos = 0
    for i in range(n):
        v = vals[i]
        while v >= 0x80:
            out[pos] = (v & 0x7F) | 0x80
            pos += 1
            v >>= 7
        out[pos] = v
        pos += 1
    return pos


@njit(nogil=True)
def _get_varints(buf, runs):
    """Parse LEB128 values into runs; return the count, or -1 when one is truncated or longer than 5 bytes."""
    k = 0
    pos = 0
    while pos < buf.size:
        v = np.int64(0)
        shift = 0
        while True:
            if pos >= buf.size or shift > 28:
                return -1
            b = np.int64(buf[pos])
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if k >= runs.size:
            return -1
        runs[k] = v
        k += 1
    return k


@njit(nogil=True)
def _expand(src, runs, nruns, out):
    """Rebuild out from the nonzero elements src and the runs; 0, or -1 when the runs do not fit exactly."""
    i = 0
    s = 0
    for r in range(nruns):
        ln = runs[r]
        if ln < 0 or i + ln > out.size:
            return -1
        if r & 1:
            if s + ln > src.size:
                return -1
            for j in range(ln):
                out[i + j] = src[s + j]
            s += ln
        else:
            for j in range(ln):
                out[i + j] = 0
        i += ln
    if i != out.size or s != src.size:
        return -1
    return 0


def zeros_if_worth(data: np.ndarray, width: int) -> int:
    """The number of +0.0 elements if at least MIN_ZERO_SHARE of them are (a 1-in-16 sample rules out large
    classes first), else -1."""
    u = data.view(_UINT[width])
    n = u.size
    z16 = 0
    if n >= 1 << 16:
        sample = u[::16]
        z16 = sample.size - np.count_nonzero(sample)
        if _sample_rules_out(n, z16):
            return -1
    return worth(n, int(n - np.count_nonzero(u)), z16)


def _sample_rules_out(n: int, z16: int) -> bool:
    return n >= 1 << 16 and z16 < MIN_ZERO_SHARE * ((n + 15) >> 4) / 2


def worth(n: int, z: int, z16: int) -> int:
    """zeros_if_worth from counts: z of the n elements are +0.0, z16 of every 16th (from element 0)."""
    if _sample_rules_out(n, z16):
        return -1
    return z if z >= max(16, MIN_ZERO_SHARE * n) else -1


def split_zeros(data: np.ndarray, width: int) -> tuple[bytes, np.ndarray]:
    """(run list as varints, the nonzero elements as uint8) of a class's bytes."""
    u = data.view(_UINT[width])
    runs = np.empty(u.size + 2, np.int64)
    nz = np.empty(u.size, u.dtype)
    k, m = _split_runs(u, runs, nz)
    buf = np.empty(5 * k + 1, np.uint8)
    blen = _put_varints(runs, k, buf)
    return buf[:blen].tobytes(), nz[:m].view(np.uint8)


def max_runs_bytes(n: int) -> int:
    """The longest run list of n elements: at most n + 1 runs (split_zeros), each a varint of at most 5 bytes."""
    return 5 * (n + 1)


def parse_runs(runs_bytes: bytes, n: int) -> tuple[np.ndarray, int, int]:
    """(runs, count, nonzero elements) of a run list that must cover n elements."""
    # at most n + 1 runs (split_zeros): a longer list is refused, and the table stays O(n) whatever its bytes
    runs = np.empty(min(len(runs_bytes), n + 1), np.int64)
    k = _get_varints(np.frombuffer(runs_bytes, np.uint8), runs)
    if k < 0:
        raise CodecError("zero runs: malformed varint list")
    if int(runs[:k].sum()) != n:
        raise CodecError("zero runs do not cover the class's elements")
    return runs, k, int(runs[1:k:2].sum())


def expand(nonzero: np.ndarray, runs: np.ndarray, k: int, width: int, out: np.ndarray) -> None:
    """Write the class's bytes into out (uint8) from its nonzero elements (uint8) and runs."""
    t = _UINT[width]
    if _expand(nonzero.view(t), runs, k, out.view(t)) != 0:
        raise CodecError("zero runs do not match the decoded elements")
