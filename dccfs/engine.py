"""Services shared by every open file: worker threads, chunk cache, dirty budget, stats, config."""
from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from typing import Callable

import trio
import xxhash

from dccfs.cache import ChunkCache
from dccfs.codecs import ChunkHints, EncodedChunk, codec_name, encode_chunk
from dccfs.config import Config
from dccfs.delta import PIN_LOCK
from dccfs.delta_bases import BASES_DIR, BaseStore, store_for_path, warm_up_delta_kernels
from dccfs.memory import release_compiler_pages
from dccfs.pins import PinRegistry
from dccfs.stats import MountStats

log = logging.getLogger(__name__)


# Encodes waiting per core before the chooser drops to its cheapest codec.
# effort 0 (no block cuts, no method 7) once this many encodes per core wait. At 4 a torch.save of the corpus
# checkpoint went 95% cheap on this 2-core VM and was stored at 0.5434-0.5446 (issue 3's limit through the mount:
# 0.545); 16 stored it at 0.5405-0.5418, but tools/bench_fs.py then wrote its torch.save files at 78 instead of 270
# MB/s (0.77x instead of 0.92x the passthrough for all writes) and peaked 67 MB higher in RSS, past issue 5's
# limits (2026-12-05): 4 stays
BACKLOG_CHEAP_FACTOR = 4
# ...but never more than a quarter of the 1 MiB chunks the dirty budget holds: every waiting encode holds a dirty
# chunk, so on many cores (or a small budget) 16 per core could never be reached and effort 0 would never come
BACKLOG_CHEAP_BUDGET_SHARE = 4


class DirtyBudget:
    """Bytes of written-but-unencoded chunks across all files; writers wait when it is full."""

    def __init__(self, limit: int, stats: MountStats):
        self.limit = limit
        self.used = 0
        self._stats = stats
        self._released = trio.Event()
        self._pressure_hooks: list[Callable[[], None]] = []
        stats.dirty_budget = limit

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._stats.dirty_budget = limit
        self._released.set()
        self._released = trio.Event()

    def on_pressure(self, hook: Callable[[], None]) -> None:
        self._pressure_hooks.append(hook)

    async def reserve(self, nbytes: int, check: Callable[[], None] | None = None) -> None:
        """Wait until nbytes fit; a single request larger than the budget passes alone.

        check() runs before each wait and may raise: a writer whose chunks cannot be
        stored (ENOSPC, EIO) gets that error instead of waiting for a release that
        never comes."""
        stalled = False
        while self.used and self.used + nbytes > self.limit:
            if check is not None:
                check()
            if not stalled:
                self._stats.writer_stalls += 1
                stalled = True
            for hook in self._pressure_hooks:
                hook()
            await self._released.wait()
        self.used += nbytes
        self._stats.dirty_bytes = self.used

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        self._stats.dirty_bytes = self.used
        # Wake every waiter; each re-checks and the next release gets a fresh event.
        self._released.set()
        self._released = trio.Event()


# the warm-up goes on once no read has arrived for this long
WARM_UP_QUIET_S = 0.05


class _WarmUpStopped(Exception):
    """The mount is stopping: the warm-up ends at its next sample."""


def warm_up_codecs(pause=lambda: None) -> None:
    """Load (or compile) the numba kernels before the first request needs them: a cold
    kernel costs seconds, which would otherwise land on the first reader or writer.
    pause() runs before each sample (the mount's: it waits while reads arrive)."""
    import numpy as np
    from dccfs.codecs import Segment, decode_chunk
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(262144).astype(np.float32)  # a 1 MiB chunk: long streams take their own kernels
    # bf16 long enough for its symbol stream to take two parts (class 8's fused loop)
    long_bf16 = (rng.standard_normal(131072).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    for dtype, raw in (("f32", sample.tobytes()), ("f16", sample.astype(np.float16).tobytes()),
                       ("bf16", (sample.view(np.uint32) >> 16).astype(np.uint16).tobytes()),
                       ("bf16", long_bf16.tobytes())):
        for hints in (ChunkHints(segments=(Segment(0, len(raw), dtype),)), ChunkHints()):
            pause()
            encoded = encode_chunk(raw, hints)
            decode_chunk(encoded.codec_id, encoded.params, encoded.payload, len(raw))
    # Optimizer state: two f32 tensors of different scales, one with all-zero rows, which
    # takes the block, zero-masked and context kernels (2.5 s cold otherwise).
    moments = (sample * 1e-4).reshape(-1, 256)
    moments[::3] = 0.0
    state = np.concatenate([moments.ravel(), np.abs(sample) * 1e-8]).astype(np.float32).tobytes()
    half = len(state) // 2
    for effort in (1, 0):
        hints = ChunkHints(segments=(Segment(0, half, "f32"), Segment(half, half, "f32")), effort=effort)
        pause()
        encoded = encode_chunk(state, hints)
        decode_chunk(encoded.codec_id, encoded.params, encoded.payload, len(state))
    # A whole chunk of a torch.save: a zip header between weights of three scales. Its
    # long streams and joint classes take kernels the small samples above do not; loaded
    # lazily, they held the first checkpoint after a mount up by about 0.4 s of encoder
    # time (py-spy: numba's compiler lock and LLVM's bitcode parser in the encoders).
    # With it, an AdamW checkpoint's: second moments with a scale per row and zero rows, a
    # small tensor (short streams), all-zero and all-one tensors (constant planes).
    rows = np.abs(rng.standard_normal((256, 256))) * 10.0 ** rng.uniform(-10, -6, (256, 1))
    rows[::7] = 0.0
    tensors = [(rng.standard_normal(n) * scale).astype(np.float32)
               for n, scale in ((262144, 0.05), (8192, 0.02), (32704, 1.0))]
    tensors += [rows.astype(np.float32).ravel(), np.zeros(4096, np.float32), np.ones(65536, np.float32)]
    header = b"PK\x03\x04" + bytes(252)
    halves = np.split(tensors[0], 2)
    for width, group in itertools.product((4, 2), [[t] for t in tensors] + [halves, tensors]):
        # each tensor alone, two weights in one chunk (their class is gathered into a writable
        # copy: numba compiles read-only and writable arrays apart), all of them in one chunk
        parts = [t if width == 4 else (t.view(np.uint32) >> 16).astype(np.uint16) for t in group]
        dtype = "f32" if width == 4 else "bf16"
        raw, segments = b"", []
        for part in parts:
            segments.append(Segment(len(raw), part.nbytes, dtype))
            raw += part.tobytes() + header
        for effort in (1, 0):
            pause()
            encoded = encode_chunk(raw, ChunkHints(segments=tuple(segments), effort=effort))
            decode_chunk(encoded.codec_id, encoded.params, encoded.payload, len(raw))
    log.info("codec kernels ready in %.1f s", time.perf_counter() - started)


class Engine:
    def __init__(self, config: Config, backing_root: str):
        self.config = config
        self.backing_root = backing_root
        self.stats = MountStats()
        self.cache = ChunkCache(config.cache.policy, config.cache.t0_bytes,
                                config.cache.write_admit, self.stats.t0)
        self.cpu_limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        # For a thread started by a task that already holds a cpu_limiter token.
        self.held_cpu_limiter = trio.CapacityLimiter(math.inf)
        # Backing-file I/O gets its own threads so a slow disk cannot starve encoders.
        self.io_limiter = trio.CapacityLimiter(16)
        # Set at unmount: long background rewrites (compaction, deltas after close) stop
        # at their next record instead of holding the exit up; their temporaries go.
        self.stopping = threading.Event()
        self.dirty = DirtyBudget(config.cache.dirty_bytes, self.stats)
        self.bases = BaseStore(backing_root, cache=self.cache)
        # Frees delta-base pins once nothing needs them; not with --shared, where other
        # nodes write containers this mount never hears of.
        self.pins: PinRegistry | None = None
        if not config.shared:
            self.pins = PinRegistry(backing_root, PIN_LOCK)
            self.pins.on_freed = self._close_freed_base
        self.nursery: trio.Nursery | None = None
        self.trio_token: trio.lowlevel.TrioToken | None = None  # set with the nursery
        self.trace = None
        self.warm_up_threads: list[threading.Thread] = []

    def start_warm_up(self) -> None:
        """Load the codec kernels on two background threads, where the config asks for it. Called once the
        mount is up: a mount that fails waits for no kernel before it reports why."""
        if not self.config.warm_up or self.warm_up_threads:
            return
        delta_warm_up = threading.Thread(target=warm_up_delta_kernels, name="dccfs-delta-warm-up", daemon=True)
        for thread in (delta_warm_up, threading.Thread(
                target=self._warm_up, args=(delta_warm_up,), name="dccfs-warm-up", daemon=True)):
            thread.start()  # listed once started: end_warm_up joins only those
            self.warm_up_threads.append(thread)

    def _warm_up(self, delta_warm_up: threading.Thread) -> None:
        reads = 0

        def pause():
            # Reads that arrive while kernels load wait for the GIL behind the loading (the first cold
            # 4 KiB reads of a mount took 1.4 ms instead of 0.55, one-off loop): they load what they need
            # themselves, and the warm-up goes on once they stop.
            nonlocal reads
            while self.stats.read_latency.total != reads and not self.stopping.is_set():
                reads = self.stats.read_latency.total
                time.sleep(WARM_UP_QUIET_S)
            if self.stopping.is_set():
                raise _WarmUpStopped

        try:
            warm_up_codecs(pause)
        except _WarmUpStopped:
            log.info("codec warm-up stopped: the daemon is exiting")
            return
        except Exception:
            log.exception("codec warm-up failed; kernels will load on first use")
            return
        delta_warm_up.join()
        log.info("compiler pages released after warm-up: %d MiB", release_compiler_pages() >> 20)

    def end_warm_up(self) -> None:
        """At exit: stop the warm-up at its next sample and wait for it. A thread still loading kernels
        when the interpreter exits ran into LLVM as it was torn down (SIGSEGV or SIGABRT after a clean
        unmount: 3 of 18 mounts unmounted 1-3 s after their start; tools/bench_mount_cycle.py met it first)."""
        self.stopping.set()
        for thread in self.warm_up_threads:
            # A sample loads from numba's cache in well under a second; one compiling (an empty cache)
            # can take a minute, and the exit waits for it rather than crash.
            thread.join()

    def _close_freed_base(self, pin: str) -> None:
        """A freed pin may be open in the mount's base store, and, for a pin that is itself a
        delta (a chain), in the backing directory's store its own chunks read their bases from."""
        self.bases.forget(pin)
        store = store_for_path(os.path.join(self.backing_root, BASES_DIR, pin))
        if store is not None:
            store.forget(pin)

    def encode_effort(self) -> int:
        """0 (cheapest codec) while encodes queue up behind the cores, so the codec never
        becomes the writer's bottleneck; 1 otherwise. Each chunk records what it used."""
        stats = self.cpu_limiter.statistics()
        reachable = max(1, (self.dirty.limit >> 20) // BACKLOG_CHEAP_BUDGET_SHARE)
        if stats.tasks_waiting >= min(BACKLOG_CHEAP_FACTOR * stats.total_tokens, reachable):
            self.stats.cheap_encodes += 1
            return 0
        return 1

    def encode(self, raw: bytes, hints: ChunkHints) -> tuple[EncodedChunk, int]:
        """Encode one chunk in a worker thread; returns the encoding and the raw checksum."""
        started = time.thread_time()  # this worker's CPU: the codec's single-thread speed
        try:
            encoded = encode_chunk(raw, hints)
        except Exception:
            # A codec bug must cost ratio, never data: store the chunk with plain zstd.
            self.stats.codec_failures += 1
            log.exception("encoding a %d-byte chunk failed (%s); storing it with zstd instead",
                          len(raw), hints)
            encoded = encode_chunk(raw, ChunkHints(codec="zstd", level=1))
        raw_sum = xxhash.xxh3_64_intdigest(raw)
        self.stats.count_codec("encode", codec_name(encoded.codec_id), len(raw),
                               len(encoded.params) + len(encoded.payload),
                               time.thread_time() - started)
        return encoded, raw_sum

    def record_access(self, key: tuple, size: int, is_write: bool) -> None:
        """Append a chunk request to the trace, when recording; ids are stable across runs."""
        trace = self.trace  # (a tune may swap it on a worker thread)
        if trace is not None:
            file_id, idx, offset = key
            obj_id = xxhash.xxh3_64_intdigest(file_id + idx.to_bytes(8, "little")
                                              + offset.to_bytes(8, "little"))
            try:
                trace.record(time.time(), obj_id, size, is_write)
            except ValueError:
                pass  # closed meanwhile by a tune's swap, which runs on a worker thread
            except OSError as exc:
                # A trace is advice: a full disk under it must not fail the read or write.
                if self.trace is trace:
                    self.trace = None
                log.warning("stopped recording the chunk access trace to %s: %s", trace.path, exc)
                # (its close may wait on the failing path: not on the thread that serves requests)
                threading.Thread(target=close_trace_quietly, args=(trace,), daemon=True).start()

    def start_background(self, fn, *args) -> None:
        """Run fn(*args) in the mount's nursery; errors are logged, never fatal to the mount."""
        async def guarded():
            try:
                await fn(*args)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("background task %s failed", getattr(fn, "__name__", fn))
        assert self.nursery is not None
        self.nursery.start_soon(guarded)

    def start_background_from_thread(self, fn, *args) -> None:
        """start_background from a thread that is not trio's; without waiting, and nothing
        once the mount is stopping."""
        def start() -> None:
            # An exception here would end trio's run: the mount's, not this task's.
            if self.stopping.is_set():
                return
            try:
                self.start_background(fn, *args)
            except Exception:
                log.exception("could not start background task %s", getattr(fn, "__name__", fn))
        token = self.trio_token
        if token is None or self.stopping.is_set():
            return
        try:
            token.run_sync_soon(start)
        except trio.RunFinishedError:
            pass


def close_trace_quietly(trace) -> None:
    """Close a TraceWriter; a last flush that fails is logged, never raised."""
    try:
        trace.close()
    except OSError as exc:
        log.warning("the chunk access trace %s lost its last records: %s", trace.path, exc)
