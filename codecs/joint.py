"""The joint classes: a bf16 element's exponent and top two mantissa bits as one byte symbol, the other six packed.

Class 8 codes bf16 elements so; class 9 codes the top half of each f32 element so (it is a bf16 element) and
stores the low 16 mantissa bits raw, as class 3 stores its two mantissa bytes where they carry ~8 bits each.

Why: on real bf16 weights the top mantissa bits depend on the exponent, and the rest carry ~8 bits per byte. One
rANS symbol per element (slot << 2 | mantissa bits 6..5) plus six raw bits codes 0.03-0.04 bits per element below
the two order-0 streams of class 1, and decodes one symbol per element instead of two. It needs the exponents of
the normal elements within a window of 62 values (slot = exponent - base + 1; slot 0 is exponent 0, slot 63
exponent 255), which real weights keep; a chunk that does not, whose six low bits are not near uniform (bf16
upcast from a narrower format), or whose sampled histograms say class 1 codes it smaller, stays in class 1
(docs/codecs.md, "Class 8").
"""
from __future__ import annotations

import numpy as np

from ._jit import njit
from .count16 import ROTATE, STEP
from .rans32c_plan import _entropy_bits

BLOCK = 64  # elements per packed block: 48 bytes (32 of nibbles, 16 of two-bit fields)
BLOCK_BYTES = 48
WINDOW = 62  # normal exponents base .. base + 61 take slots 1 .. 62
# six raw bits per element cost what they carry only if they are near uniform; below this sampled entropy (bits)
# class 1, which entropy-codes the whole sign|mantissa byte, is kept
MIN_LOW_BITS = 5.95
# class 9 needs both mantissa bytes of the low half near uniform (their sampled entropy, bits): class 3 codes them
# (rANS pays from ~7.99 bits), and a coded low half (weights rounded from a narrower format) stays in class 3
MIN_MANTISSA_BITS = 7.96
# the tests of the low bits look at about this many elements (all of a shorter class): enough for 64 and 256 bins
# (the Miller-Madow correction of a uniform byte's estimate is ~0.045 bits here, its spread well under 0.01)
LOW_SAMPLES = 1 << 12
LOW_RUN = 8
# below this many elements the comparison with class 1 counts the symbols and sign|mantissa bytes exactly
EXACT_LOW = 1 << 16
# fewer elements than this stay in class 1. Near it class 8 can still be a little larger (review: Gaussian weights
# of 4200 elements +0.6%, 6000 +0.2%; uniform values of 4096-8192 elements +0.3-1.0%), which the comparison with
# class 1 (entropies without the tables) does not see; left as is: such classes are a small part of any file
MIN_ELEMENTS = 4096
# f32 classes shorter than this stay in class 3: their symbol stream would be method 2 (one part, then a composing
# pass and a pass joining the low halves), which decoded 1.26-1.41x slower than class 3 for 4096-16383 elements
# and saved at most 0.6% of the bytes (found by review); from here on it is two-part method 6, the fused loop
MIN_ELEMENTS_WIDE = 16384


@njit(nogil=True, inline="always")
def _piece_bytes(m):
    return BLOCK_BYTES * (m // BLOCK) + m % BLOCK


@njit(nogil=True, inline="always")
def halves(n):
    """h = ceil(n / 2) and the length of stream 2 for n elements: the low bits of elements [0, h), then those of
    [h, n) (the halves are the symbol stream's method-6 parts)."""
    h = (n + 1) >> 1
    return h, _piece_bytes(h), _piece_bytes(h) + _piece_bytes(n - h)


def packed_bytes(n: int) -> int:
    """The length of stream 2 for n elements: per half 48 bytes for each whole block of 64 elements, then one
    byte per element."""
    return int(halves(n)[2])


@njit(nogil=True, boundscheck=False)
def _bounds(u):
    """(smallest, largest) exponent of the normal elements of u (1..254; (255, 0) when there is none), and the
    smallest and largest exponent of all. Selects on uint16, which LLVM vectorises."""
    lo = np.uint16(255)
    hi = np.uint16(0)
    mn = np.uint16(255)
    mx = np.uint16(0)
    for i in range(u.size):
        e = np.uint16((u[i] >> np.uint16(7)) & np.uint16(0xFF))
        normal = e != np.uint16(0) and e != np.uint16(255)
        lo = e if normal and e < lo else lo
        hi = e if normal and e > hi else hi
        mn = e if e < mn else mn
        mx = e if e > mx else mx
    return lo, hi, mn, mx


def plan(u: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(base exponent, mask of the 256 symbols u's elements can take), or None when the normal exponents span
    more than WINDOW values."""
    lo, hi, mn, mx = (int(v) for v in _bounds(u))
    if lo > hi:  # only zeros, denormals, infinities and NaNs
        base = 1
    elif hi - lo >= WINDOW:
        return None
    else:
        base = min(lo, 255 - WINDOW)  # base + 61 <= 254: every slot 1..62 names a normal exponent
    present = np.zeros(256, bool)
    if lo <= hi:
        present[(lo - base + 1) * 4 : (hi - base + 2) * 4] = True
    if mn == 0:
        present[0:4] = True
    if mx == 255:
        present[252:256] = True
    return base, present


@njit(nogil=True, inline="always")
def _low6(v):
    return ((v >> 10) & 0x20) | (v & 0x1F)  # sign << 5 | mantissa bits 4..0


@njit(nogil=True, boundscheck=False)
def _pack_piece(u, packed):
    """The six low bits of the elements u (one half) into packed, in the block layout (docs/codecs.md). uint16
    arithmetic throughout, so that LLVM vectorises the 16-element steps."""
    n = u.size
    nb = n // BLOCK
    f = np.uint16(15)
    one = np.uint16(1)
    for b in range(nb):
        ub = u[BLOCK * b : BLOCK * b + BLOCK]
        pb = packed[BLOCK_BYTES * b : BLOCK_BYTES * b + BLOCK_BYTES]
        for j in range(16):
            v0, v1, v2, v3 = ub[j], ub[16 + j], ub[32 + j], ub[48 + j]
            pb[j] = np.uint8((v0 & f) | ((v2 & f) << np.uint16(4)))
            pb[16 + j] = np.uint8((v1 & f) | ((v3 & f) << np.uint16(4)))
            # sign << 1 | mantissa bit 4 of each, at bits 0-1, 2-3, 4-5, 6-7
            t = ((v0 >> np.uint16(4)) & one) | ((v0 >> np.uint16(14)) & np.uint16(2))
            t |= (((v1 >> np.uint16(4)) & one) | ((v1 >> np.uint16(14)) & np.uint16(2))) << np.uint16(2)
            t |= (((v2 >> np.uint16(4)) & one) | ((v2 >> np.uint16(14)) & np.uint16(2))) << np.uint16(4)
            t |= (((v3 >> np.uint16(4)) & one) | ((v3 >> np.uint16(14)) & np.uint16(2))) << np.uint16(6)
            pb[32 + j] = np.uint8(t)
    for i in range(BLOCK * nb, n):
        packed[BLOCK_BYTES * nb + i - BLOCK * nb] = _low6(np.int64(u[i]))


@njit(nogil=True, boundscheck=False)
def _symbols_with(u, sym, off, extra):
    for i in range(u.size):
        t = (u[i] >> np.uint16(5)) & np.uint16(0x3FF)
        low = np.uint16(t < np.uint16(4))
        high = np.uint16(t >= np.uint16(1020))
        sym[i] = np.uint8(t - (off - low * off + high * extra))


@njit(nogil=True, boundscheck=False)
def symbols(u, base, sym):
    """sym[i] = slot << 2 | mantissa bits 6..5 of u[i]: bits 14..5 of the element minus 4 * (base - 1), or
    minus 0 (exponent 0) or 4 * 192 (exponent 255). uint16 arithmetic without branches, which LLVM vectorises
    (3x slower when the offsets are computed in the same function as the loop: they are arguments of the loop's)."""
    # (extra wraps: uint16 arithmetic)
    _symbols_with(u, sym, np.uint16(4 * (base - 1)), np.uint16(4 * 192 - 4 * (base - 1)))


@njit(nogil=True, boundscheck=False)
def split(u, sym, packed, sample, sm):
    """The six low bits of u into packed; a 1-in-8 sample of the symbols sym (symbols() wrote them; the phase
    rotating every ROTATE elements, as count16's) into sample, and 1 in 16 of class 1's sign|mantissa bytes
    into sm. Returns the +0.0 elements of the sample (count16's estimates are made from the same)."""
    n = u.size
    z = 0
    for blk in range(0, n, ROTATE):
        for i in range(blk + ((blk // ROTATE) & (STEP - 1)), min(blk + ROTATE, n), STEP):
            v = np.int64(u[i])
            sample[sym[i]] += 1
            z += v == 0
            if (i & 15) < STEP:  # every 16th element: 1 in 64 read 5 of 24 Gaussian classes just above
                sm[((v >> 8) & 0x80) | (v & 0x7F)] += 1  # EXACT_LOW as class 1's (found by review)
    h, pa, pn = halves(n)
    _pack_piece(u[:h], packed[:pa])
    _pack_piece(u[h:], packed[pa:pn])
    return z


@njit(nogil=True, boundscheck=False)
def sign_mantissa_histogram(u, out):
    """out[b] += the elements of u (uint16) whose class-1 sign|mantissa byte is b: every element, for classes too
    short to sample (numpy's expression for it held the GIL through three temporaries: an encoder of short
    classes, a chunk's 128 KiB blocks, did not scale across threads)."""
    for i in range(u.size):
        v = np.int64(u[i])
        out[((v >> 8) & 0x80) | (v & 0x7F)] += 1


@njit(nogil=True, boundscheck=False)
def sample_low(u, low6, m1, m0):
    """Histograms of the six low bits of the bf16 elements u (uint16), or of the f32 elements' top halves (uint32;
    then also of their low halves' two bytes, m1 and m0), from about LOW_SAMPLES elements: runs of LOW_RUN
    consecutive ones spread evenly over u (every element of a short u). A run holds every phase of data that
    repeats every few elements, and shares its cache lines: an f32 class is sampled before any pass has brought
    it into the cache, where one element per line cost ~50-70 us per MiB (one-off, 2026-12-06).
    Returns False, the histograms partial, when every 8th run (~512 elements of a u of LOW_SAMPLES or more; of a
    shorter one from 512 elements on) shows one sign only: the six low bits, of which the sign is one, cannot be
    near uniform (a checkpoint's second moments, all positive, are refused for the cost of those reads)."""
    step = max(LOW_RUN, u.size // (LOW_SAMPLES // LOW_RUN))
    runs = -(-u.size // step)  # (the last run may be short)
    top = 31 if u.itemsize == 4 else 15
    negative = 0
    seen = 0
    for first in (True, False):
        for k in range(runs):
            if ((k & 7) == 0) != first:
                continue
            for i in range(k * step, min(k * step + LOW_RUN, u.size)):
                v = np.int64(u[i])
                if first:
                    negative += (v >> top) & 1
                    seen += 1
                if u.itemsize == 4:
                    m1[(v >> 8) & 0xFF] += 1
                    m0[v & 0xFF] += 1
                    v >>= 16
                low6[_low6(v)] += 1
        if first and runs >= 64 and (negative == 0 or negative == seen):
            return False
    return True


@njit(nogil=True, boundscheck=False)
def every_32nd_exponent(u, out):
    """out[k] = the exponent of f32 element 32 k of u (uint32), for k < len(out)."""
    for k in range(out.size):
        out[k] = np.uint8((u[32 * k] >> np.uint32(23)) & np.uint32(0xFF))


@njit(nogil=True, boundscheck=False)
def split_wide(u, top, low):
    """Class 9: the top halves of the f32 elements u into top, their low halves into low (both uint16)."""
    for i in range(u.size):
        top[i] = np.uint16(u[i] >> np.uint32(16))
        low[i] = np.uint16(u[i] & np.uint32(0xFFFF))


@njit(nogil=True, boundscheck=False)
def merge_wide(top, low, u, start, end):
    """u[i] = top[i] << 16 | the low half in low[2i], low[2i + 1] (little-endian), for i in [start, end)."""
    for i in range(start, end):
        half = (np.uint32(low[2 * i + 1]) << np.uint32(8)) | np.uint32(low[2 * i])
        u[i] = (np.uint32(top[i]) << np.uint32(16)) | half


@njit(nogil=True, inline="always")
def _element(s, nib, two, bm1):
    """A bf16 element from its symbol, its four low mantissa bits and its sign << 1 | mantissa bit 4 (all
    uint32, bm1 = base - 1)."""
    slot = s >> np.uint32(2)
    e = slot + bm1
    e = np.uint32(0) if slot == np.uint32(0) else e
    e = np.uint32(255) if slot == np.uint32(63) else e
    return np.uint16((e << np.uint32(7)) | ((s & np.uint32(3)) << np.uint32(5))
                     | ((two & np.uint32(2)) << np.uint32(14)) | ((two & np.uint32(1)) << np.uint32(4)) | nib)


@njit(nogil=True, boundscheck=False)
def compose_piece(sym, packed, base, u, start):
    """The elements u[start:] of one half from their symbols sym[start:] and its packed low bits."""
    n = u.size
    nb = n // BLOCK
    bm1 = np.uint32(base - 1)
    f = np.uint32(15)
    t3 = np.uint32(3)
    first = -(-start // BLOCK)
    for i in range(start, min(BLOCK * first, n)):  # the rest of a block the caller's loop began
        b, r = i // BLOCK, i % BLOCK
        if b < nb:
            q, j = r >> 4, r & 15
            nib = (np.uint32(packed[BLOCK_BYTES * b + 16 * (q & 1) + j]) >> np.uint32(4 * (q >> 1))) & f
            two = (np.uint32(packed[BLOCK_BYTES * b + 32 + j]) >> np.uint32(2 * q)) & t3
        else:
            r6 = np.uint32(packed[BLOCK_BYTES * nb + i - BLOCK * nb])
            nib, two = r6 & f, (r6 >> np.uint32(4)) & t3
        u[i] = _element(np.uint32(sym[i]), nib, two, bm1)
    for b in range(first, nb):
        ub = u[BLOCK * b : BLOCK * b + BLOCK]
        sb = sym[BLOCK * b : BLOCK * b + BLOCK]
        pb = packed[BLOCK_BYTES * b : BLOCK_BYTES * b + BLOCK_BYTES]
        for j in range(16):
            a = np.uint32(pb[j])
            c = np.uint32(pb[16 + j])
            t = np.uint32(pb[32 + j])
            ub[j] = _element(np.uint32(sb[j]), a & f, t & t3, bm1)
            ub[16 + j] = _element(np.uint32(sb[16 + j]), c & f, (t >> np.uint32(2)) & t3, bm1)
            ub[32 + j] = _element(np.uint32(sb[32 + j]), a >> np.uint32(4), (t >> np.uint32(4)) & t3, bm1)
            ub[48 + j] = _element(np.uint32(sb[48 + j]), c >> np.uint32(4), t >> np.uint32(6), bm1)
    tail = packed[BLOCK_BYTES * nb :]
    for i in range(max(BLOCK * nb, start), n):
        r6 = np.uint32(tail[i - BLOCK * nb])
        u[i] = _element(np.uint32(sym[i]), r6 & f, (r6 >> np.uint32(4)) & t3, bm1)


@njit(nogil=True, boundscheck=False)
def compose(sym, packed, base, u, done):
    """The elements u of a class from their symbols and packed low bits, except the first done of each half
    (which the fused loop wrote)."""
    h, pa, pn = halves(u.size)
    compose_piece(sym[:h], packed[:pa], base, u[:h], done)
    compose_piece(sym[h:], packed[pa:pn], base, u[h:], done)


@njit(nogil=True)
def entropy(counts):
    """Order-0 entropy (bits per symbol) of a histogram, with the Miller-Madow correction (the plug-in estimate
    from a sample is biased low by about (values seen - 1) / (2 * samples * ln 2), more for wider alphabets).
    Compiled, as are the tests that call it: numpy reductions between the encoder's kernels cost more than
    their own time (tensor_fast._decode_fast has a measurement)."""
    total = 0
    seen = 0
    for c in counts:
        total += c
        seen += c > 0
    if total == 0:
        return 0.0
    return _entropy_bits(counts) / total + (seen - 1) / (2 * total * np.log(2))


@njit(nogil=True)
def low_bits_uniform(low6, m1, m0, wide):
    """Whether the sampled six low bits (and, wide: both bytes of the low half) are near uniform enough for the
    joint class (MIN_LOW_BITS, MIN_MANTISSA_BITS)."""
    if entropy(low6) < MIN_LOW_BITS:
        return False
    return not wide or min(entropy(m1), entropy(m0)) >= MIN_MANTISSA_BITS


@njit(nogil=True)
def beats_class_1(symbols, sm):
    """Whether the symbols plus six raw bits cost no more than class 1's two order-0 streams would (the exponent
    histogram is the symbols' folded by slot), within 0.02 bits per element, from histograms of the symbols and of
    class 1's sign|mantissa bytes (sampled or exact). Low bits that predict the top mantissa bits (found by
    review: synthetic, 21% larger than class 1) fail this; real weights pass by ~0.04."""
    exponents = np.zeros(64, np.int64)
    for s in range(256):
        exponents[s >> 2] += symbols[s]
    return entropy(symbols) + 6 <= entropy(exponents) + min(entropy(sm), 8.0) + 0.02
