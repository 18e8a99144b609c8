"""How one file's chunks are encoded: the rule, the sniffed layout's hints, the delta base.

A ChunkCoder belongs to one ContainerFile. Sniffing runs on the trio thread (once, on
the file's first chunks); the search for a delta base, hints_for and encode run in worker
threads.
"""
from __future__ import annotations

import logging
from functools import partial

import trio
import xxhash

from dccfs.codecs import ChunkHints, EncodedChunk, sniff_layout
from dccfs.config import Rule
from dccfs.delta import DELTA_LAYOUTS, DeltaWriter
from dccfs.delta_candidates import COMPARE_BYTES
from dccfs.engine import Engine

log = logging.getLogger(__name__)

# A safetensors header can exceed one chunk; sniffing waits for up to this much prefix.
MAX_SNIFF_PREFIX = 8 << 20


def guarded_delta(encode, stats, path: str, idx: int, raw: bytes) -> EncodedChunk | None:
    """encode() (a DeltaWriter's encode or encode_now for chunk idx of raw), counted in stats.
    None when no delta was smaller, or when it raised: a delta bug must cost ratio, never the
    chunk, so the caller stores a keyframe (logged, counted as a codec failure)."""
    try:
        encoded = encode()
    except Exception:
        stats.codec_failures += 1
        log.exception("%s: delta encoding of chunk %d failed; storing a keyframe", path, idx)
        return None
    if encoded is not None:
        stats.count_codec("encode", "delta", len(raw), len(encoded.params) + len(encoded.payload), 0.0)
    return encoded


class ChunkCoder:
    def __init__(self, engine: Engine, rule: Rule, path: str, chunk_size: int):
        self.engine = engine
        self.rule = rule
        self.path = path
        self.chunk_size = chunk_size
        self._layout = None
        self._settled = False
        self._delta: DeltaWriter | None = None
        self._base_search: trio.Event | None = None  # set once the search started by observe ends
        self._generation = 0  # of the content: reset starts a new one
        self._retired: list[DeltaWriter] = []
        self._closed = False

    @property
    def delta(self) -> DeltaWriter | None:
        """The file's delta writer, while it has a base."""
        return self._delta

    def renamed(self, path: str) -> None:
        self.path = path
        if self._delta is not None:
            self._delta.path = path

    @property
    def layout_kind(self) -> str | None:
        return self._layout.kind if self._layout is not None else None

    def reset(self) -> None:
        """The file starts over (truncated to zero, or re-read): sniff again, and look for a
        base again. The new content may copy another file than the old one did: fairseq
        copies each new checkpoint over checkpoint_last.pt, which kept the base its first
        version found, an older checkpoint, instead of the copy's own source (0.346 of its
        size instead of 0.0004)."""
        self._layout, self._settled = None, False
        self._generation += 1
        self._base_search = None  # one still running is for the old content; the new gets its own
        if self._delta is not None:
            # A pass after close may still hold it: closed with the file.
            self._retired.append(self._delta)
            self._delta = None

    def observe(self, dirty: dict[int, bytearray], size: int, file_id: bytes) -> None:
        """Sniff the layout from the file's leading dirty chunks, once it can be decided."""
        if self._settled or 0 not in dirty:
            return
        prefix = bytearray()
        idx = 0
        while idx in dirty and len(prefix) < MAX_SNIFF_PREFIX:
            prefix += dirty[idx]
            idx += 1
        self._sniff(bytes(prefix), size)
        # Settle once a layout is found, or when the prefix was all the file had to offer.
        if self._layout is not None or len(prefix) >= MAX_SNIFF_PREFIX or idx * self.chunk_size >= size:
            self._settled = True
            if self._layout is not None:
                log.debug("%s: detected %s layout", self.path, self._layout.kind)
                self._maybe_start_delta(file_id, prefix)

    def _sniff(self, prefix: bytes, size: int) -> None:
        try:
            self._layout = sniff_layout(prefix, size)
        except Exception:
            log.exception("%s: layout sniffing failed; chunks will be probed", self.path)
            self._layout = None

    def sniff_stored(self, prefix: bytes, size: int) -> None:
        """The layout of a closed file read back from its container, for a background rewrite's
        hints; no base search starts."""
        self._sniff(prefix, size)
        self._settled = True

    def _maybe_start_delta(self, file_id: bytes, prefix: bytearray) -> None:
        """Start looking for an earlier checkpoint of the same series, when enabled."""
        wanted = self.rule.delta if self.rule.delta is not None else self.engine.config.delta
        if not wanted or self._delta is not None or self._base_search is not None \
                or self.engine.config.shared:
            return
        if self._layout.kind not in DELTA_LAYOUTS and self.rule.delta is not True:
            return
        self._base_search = trio.Event()
        # Only the first COMPARE_BYTES are compared (delta_candidates.resembles).
        self.engine.start_background(self._find_base, file_id, bytes(prefix[:COMPARE_BYTES]),
                                     self._base_search, self._generation)

    async def _find_base(self, file_id: bytes, prefix: bytes, done: trio.Event, generation: int) -> None:
        # On a worker thread: it opens up to delta_candidates.MAX_LISTED files and decodes up
        # to MAX_CANDIDATES first chunks, 17-23 ms with a cold page cache, during which the
        # FUSE thread served nothing else when it ran there.
        config = self.engine.config
        writer = None
        try:
            writer = await trio.to_thread.run_sync(partial(
                DeltaWriter.for_file, self.engine.backing_root, self.path, file_id, self.engine.cache,
                always=self.rule.delta is True, max_chain=config.delta_chain,
                during_write=config.delta_during_write, prefix=prefix, chunk_size=self.chunk_size),
                limiter=self.engine.io_limiter)
        except OSError as exc:
            log.warning("%s: no delta base (%s); storing keyframes", self.path, exc)
        finally:
            if writer is not None and self._closed:
                writer.close()  # the file was closed while its base was looked for
            elif writer is not None and generation != self._generation:
                self._retired.append(writer)  # found for content a truncate has since thrown away
            elif writer is not None:
                self._delta = writer
            if self._base_search is done:
                self._base_search = None
            done.set()

    async def base_chosen(self) -> None:
        """Wait until a base search that observe started has ended: the file's first chunks
        are encoded against the base it finds, as when the search ran before them."""
        search = self._base_search
        if search is not None:
            await search.wait()

    def hints_for(self, idx: int, raw: bytes, effort: int | None = None, blocks: bool = True) -> ChunkHints:
        """The hints for encoding chunk idx; effort None asks the engine (the writer's
        backlog decides, and counts a cheap encode), a background pass gives 1. blocks: the
        container takes chunks of blocks (codec 3), which tensor chunks get."""
        rule = self.rule
        forced = None if rule.codec == "auto" else rule.codec
        if effort is None:
            effort = self.engine.encode_effort()
        if self._layout is not None and forced in (None, "tensor"):
            try:
                hints = self._layout.hints_for(idx * self.chunk_size, raw)
                block_size = rule.read_block_size
                if block_size is None:
                    block_size = self.engine.config.read_block_size
                return ChunkHints(hints.segments, forced or hints.codec, rule.level or hints.level,
                                  min(effort, hints.effort), block_size if blocks and hints.segments else 0, idx)
            except Exception:
                log.exception("%s: layout hints failed for chunk %d; probing", self.path, idx)
        return ChunkHints(codec=forced, level=rule.level, effort=effort)

    def encode(self, idx: int, raw: bytes, hints: ChunkHints) -> tuple[EncodedChunk, int]:
        """(encoding, xxh3-64 of raw): a delta when that is smaller, else a keyframe."""
        delta = self._delta
        encoded = None
        if delta is not None:
            encoded = guarded_delta(partial(delta.encode, idx, raw, hints), self.engine.stats, self.path,
                                    idx, raw)
        if encoded is None:
            return self.engine.encode(raw, hints)
        return encoded, xxhash.xxh3_64_intdigest(raw)

    def close(self) -> None:
        self._closed = True
        for writer in self._retired:
            writer.close()
        self._retired.clear()
        if self._delta is not None:
            self._delta.close()
            self._delta = None
