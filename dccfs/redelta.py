"""Delta after close: re-encode the keyframes a checkpoint writer left behind as deltas of its base.

While a file is written, DeltaWriter puts a chunk's delta off when the encoders are behind
the writer (a `cp` from the page cache always outruns them) or when the config says
`delta_during_write = false`; such chunks are stored as keyframes and remembered. After
the file's last close, when enough of them are left, the compaction machinery rewrites
the container in the background: every live record is copied, except that the put-off
keyframes are decoded (verified), encoded against the same chunk of the base and
replaced by the delta when it is smaller. The copy is swapped in with one rename under
the same checks as a compaction (docs/commit-protocol.md), so a crash or a reopen
during the pass leaves the keyframe file as it was.
"""
from __future__ import annotations

import errno
import logging
import os
from functools import partial

from dccfs import compaction
from dccfs.chunkcoder import guarded_delta
from dccfs.codecs.delta import CODEC_DELTA
from dccfs.container import ChunkError
from dccfs.format import FormatError, RecordHeader
from dccfs.pin_records import header_name

log = logging.getLogger(__name__)

# Rewriting copies the whole file: worth it only when a fair share of it can shrink.
MIN_DEFERRED_CHUNKS = 4
MIN_DEFERRED_FRACTION = 0.1


def deferred_chunks(file) -> int:
    """How many live chunks of this closed file were left as keyframes for the pass."""
    delta = file.coder.delta
    if delta is None or delta.base_changed or delta.given_up:
        return 0
    index = file.container.index
    return sum(1 for idx in list(delta.deferred) if idx in index)


def worth_redelta(file) -> bool:
    deferred = deferred_chunks(file)
    return deferred >= MIN_DEFERRED_CHUNKS and \
        deferred >= MIN_DEFERRED_FRACTION * len(file.container.index)


class Rewriter(compaction.RecordRewriter):
    """The rewrite callback of compaction.write_compacted for one file; runs in a worker
    thread and counts what it replaced."""

    what = "deltas after close"

    def __init__(self, file):
        super().__init__()
        self.file = file
        self.delta = file.coder.delta
        # Whether the copy is worth swapping in without any delta (dead records to drop).
        self.compacting = compaction.worth_compacting(file.container)
        # The copy's name (the next generation): its deltas' pin gets a record for it.
        self.copy_name = header_name(file.container.header.next_generation())

    def done(self, stats) -> None:
        if self.replaced:
            stats.deltas_after_close += self.replaced
            log.info("%s: %d chunks stored as deltas after close (%d -> %d bytes)",
                     self.file.container.path, self.replaced, self.bytes_before, self.bytes_after)

    def abandoned(self, copy_name: str) -> None:
        """The copy was thrown away: a later copy of the same name must record again."""
        self.delta.forget_dependent(copy_name)

    def __call__(self, idx: int, record: bytes):
        if self.delta.given_up and not self.replaced and not self.compacting:
            raise OSError(errno.ESTALE, "no delta against its base was smaller")
        if idx not in self.delta.deferred:
            return None
        if os.fstat(self.file.container.fd).st_nlink > 1:
            # Pinned meanwhile as the base of the next checkpoint: the swap would keep both
            # versions on disk (the pin holds the keyframes), so stop here.
            raise OSError(errno.ESTALE, "it became a delta base during the pass")
        if self.delta.base_changed and not self.replaced and not self.compacting:
            # The base is gone or changed (its pin failed): no delta can follow, and the
            # copy would be thrown away at the end.
            raise OSError(errno.ESTALE, "its delta base can no longer be pinned")
        try:
            head = RecordHeader.unpack(record)
        except FormatError:
            # The file was overwritten under the pass (O_TRUNC resets it in place): this
            # copy is stale and the swap will refuse it.
            return None
        if head.sub == CODEC_DELTA:
            return None
        if head.a != idx:
            # Another chunk's record at this offset: the file was overwritten under the pass
            # (O_TRUNC resets it in place), so this copy is stale and the swap will refuse it
            # (a warning that the record was damaged said otherwise: found by review).
            return None
        container = self.file.container
        try:
            raw = container.decode_record(idx, record)  # verified against the record's checksum
        except ChunkError as exc:
            log.warning("%s; copied as it is", exc)  # reads report it, as before the pass
            return None
        # Full effort: this runs after the writer is gone, which is the point of the pass.
        hints = self.file.coder.hints_for(idx, raw, effort=1)
        encoded = guarded_delta(partial(self.delta.encode_now, idx, raw, hints, dependent=self.copy_name),
                                self.file.engine.stats, container.path, idx, raw)
        return None if encoded is None else self.replacement(idx, head, record, encoded)
