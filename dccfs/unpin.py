"""A delta whose base lost its last name, stored again without it: find its file, and the rewrite of its chunks.

A rotating run (a Trainer with `save_total_limit=2`) deletes the oldest checkpoint while the
next one is still a delta of it: the pin then keeps a whole keyframe checkpoint alive for one
file, and the run holds two keyframes and a delta where it would hold two keyframes without
deltas. When the pin registry sees that only the pin is left of a base and one container
needs it (dccfs.pins), the mount rewrites that container in the background with every delta
chunk decoded (verified) and encoded again: as a delta of a newer, shallow file of its series
when that is smaller (the newest checkpoint, which the next save takes as its base too), else
as a keyframe, through the same copy, checks and swap-in as a compaction. The copy then names
no pin of the file's, and the registry frees the old base. Any delta chunk that cannot be
rewritten stops the pass, so a copy never holds a delta without its record. Knows nothing of
FUSE.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from functools import partial

from dccfs import compaction
from dccfs.chunkcoder import MAX_SNIFF_PREFIX, guarded_delta
from dccfs.codecs.delta import CODEC_DELTA
from dccfs.container import ChunkError, pread_exact
from dccfs.delta import DELTA_LAYOUTS, DeltaWriter
from dccfs.delta_candidates import COMPARE_BYTES
from dccfs.format import HEADER_SIZE, FormatError, Header, RecordHeader, checksum64
from dccfs.pin_records import BASES_DIR, STATE_DIR, header_name

log = logging.getLogger(__name__)

# Entries read while looking for a dependent that moved since its deltas were written.
MAX_SEARCHED = 256


def _header_of(backing_root: str, real_root: str, rel: str) -> Header | None:
    """The container header of the regular file at rel, reached through no symbolic link (its
    real path is real_root, the backing root's, joined with rel); None for anything else (a
    FIFO would block the open, a symlink lead anywhere)."""
    full = os.path.join(backing_root, rel)
    try:
        if os.path.realpath(full) != os.path.join(real_root, os.path.normpath(rel)):
            return None
        if not stat.S_ISREG(os.lstat(full).st_mode):
            return None
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOATIME)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # replaced between the lstat and the open
        return Header.unpack(pread_exact(fd, HEADER_SIZE, 0))
    except (OSError, FormatError):
        return None
    finally:
        os.close(fd)


def find_dependent(backing_root: str, name: str, hint: str) -> tuple[str, bool] | None:
    """(path below backing_root, superseded) of the container named name, last seen at hint:
    there, or moved within its directory (a temporary renamed to its final name), or its
    directory renamed beside itself (tmp-checkpoint-20/ to checkpoint-20/). superseded: what
    is there is a later generation of the same file (a compaction or rewrite swapped in, and
    a stop or a kill came before the old generation's records went). None when not found."""
    if hint.startswith(STATE_DIR + "/") or hint.startswith("/") or ".." in hint.split("/"):
        return None
    file_id_hex, _, generation = name.rpartition("-")
    directory, base = os.path.split(hint)
    candidates = [hint]
    for where in (directory, os.path.dirname(directory)):
        try:
            with os.scandir(os.path.join(backing_root, where)) as entries:
                for entry in entries:
                    rel = os.path.join(where, entry.name)
                    if rel == STATE_DIR or len(candidates) >= MAX_SEARCHED:
                        continue
                    if where == directory:
                        candidates.append(rel)
                    elif entry.is_dir(follow_symlinks=False):
                        candidates.append(os.path.join(rel, base))
        except OSError:
            continue
        if not directory:
            break
    later = None
    real_root = os.path.realpath(backing_root)
    for rel in dict.fromkeys(candidates):
        header = _header_of(backing_root, real_root, rel)
        if header is None or header.file_id.hex() != file_id_hex:
            continue
        if header_name(header) == name:
            return rel, False
        if generation.isdigit() and header.generation > int(generation) and later is None:
            later = rel
    return (later, True) if later is not None else None


class UnpinRewriter(compaction.RecordRewriter):
    """The rewrite callback of compaction.write_compacted that stores every delta chunk of a
    closed file against a newer base of its series when one is shallow and smaller, else as a
    keyframe; runs in a worker thread and counts what it replaced."""

    # The copy names no pin of the file's: its records are not carried over (handles_rewrite);
    # a newer base gets records for the copy from its DeltaWriter, before its first delta.
    carries_pin_records = False
    what = "keyframes for a deleted base"

    def __init__(self, file, pin: str, relpath: str, busy: frozenset = frozenset()):
        super().__init__()
        self.file = file
        self.pin = pin
        self.relpath = relpath
        # Backing (st_dev, st_ino) of the files the mount has open: no base for the copy, since
        # one still being written (an fsync commits half of it) would leave the copy's delta
        # half keyframes and its own deltas after close refused (found by review).
        self.busy = busy
        self.rebased = 0  # of the chunks replaced, those stored as deltas of a newer base
        self.pin_bytes: int | None = None  # what freeing the pin gives back (prepare)
        self.delta: DeltaWriter | None = None  # against the newer base (prepare)
        self.copy_name = header_name(file.container.header.next_generation())
        # The pass reached a verdict other than a swap (it would not pay, a chunk is unreadable):
        # not tried again in this mount. One stopped by a reopen or change has none.
        self.gave_up = False

    def prepare(self) -> None:
        """Sniff the file's layout from its first chunks (decoded), so that its chunks get the
        hints its writer's had, and look for a newer base; in a worker thread, before the copy."""
        container, engine = self.file.container, self.file.engine
        prefix = bytearray()
        idx = 0
        while idx in container.index and len(prefix) < MAX_SNIFF_PREFIX:
            prefix += container.read_chunk(idx) or b""
            idx += 1
        coder = self.file.coder
        coder.sniff_stored(bytes(prefix), container.size)
        self.pin_bytes = os.stat(os.path.join(engine.backing_root, BASES_DIR, self.pin)).st_blocks * 512
        rule, config = coder.rule, engine.config
        wanted = rule.delta if rule.delta is not None else config.delta
        if wanted and (coder.layout_kind in DELTA_LAYOUTS or rule.delta is True):
            # A rotating run deleted the oldest checkpoint: the newest one beside this file is
            # the base the next save will take too (a Trainer keeps a keyframe and a delta).
            self.delta = DeltaWriter.for_file(
                engine.backing_root, self.relpath, container.header.file_id, engine.cache,
                max_chain=config.delta_chain, prefix=bytes(prefix[:COMPARE_BYTES]),
                chunk_size=container.chunk_size)
            if self.delta is not None:
                st = os.fstat(self.delta.base.fd)
                if (st.st_dev, st.st_ino) in self.busy:
                    log.info("%s: its newest base %s is open in the mount; storing keyframes", self.relpath,
                             os.path.relpath(self.delta.base.path, engine.backing_root))
                    self.close()

    def close(self) -> None:
        """Let go of the newer base (its pin stays while the swapped-in copy needs it)."""
        if self.delta is not None:
            self.delta.close()
            self.delta = None

    def pays(self) -> bool:
        """Whether the copy grows the file by less than the pin frees (its base's chunks
        compress about as well as this file's, so this holds unless the two differ a lot)."""
        pays = self.pin_bytes is not None and self.bytes_after - self.bytes_before < self.pin_bytes
        self.gave_up = self.gave_up or not pays
        return pays

    def done(self, stats) -> None:
        stats.unpin_rewrites += 1
        how = "as keyframes"
        if self.rebased and self.delta is not None:
            base = os.path.relpath(self.delta.base.path, self.file.engine.backing_root)
            how = f"as deltas of {base}" if self.rebased == self.replaced else \
                f"{self.rebased} as deltas of {base} and the rest as keyframes"
        log.info("%s: %d delta chunks stored again %s (%d -> %d bytes): their base %s has no name "
                 "left, and its pin can go", self.file.container.path, self.replaced, how,
                 self.bytes_before, self.bytes_after, self.pin)

    def abandoned(self, copy_name: str) -> None:
        """The copy was thrown away: a later copy of the same name must record again."""
        if self.delta is not None:
            self.delta.forget_dependent(copy_name)

    def _encode(self, idx: int, raw: bytes):
        hints = self.file.coder.hints_for(idx, raw, effort=1)
        if self.delta is not None:
            encoded = guarded_delta(partial(self.delta.encode_now, idx, raw, hints, dependent=self.copy_name),
                                    self.file.engine.stats, self.file.container.path, idx, raw)
            if encoded is not None:
                self.rebased += 1
                return encoded, checksum64(raw)
        return self.file.engine.encode(raw, hints)

    def __call__(self, idx: int, record: bytes):
        try:
            head = RecordHeader.unpack(record)
        except FormatError as exc:
            raise OSError(errno.ESTALE, f"chunk {idx} changed under the pass: {exc}") from None
        if head.sub != CODEC_DELTA:
            return None
        container = self.file.container
        if os.fstat(container.fd).st_nlink > 1:
            # Pinned meanwhile as the base of a newer file: the swap would keep both versions.
            raise OSError(errno.ESTALE, "it became a delta base during the pass")
        if head.a != idx:
            raise OSError(errno.ESTALE, f"chunk {idx}'s record was overwritten under the pass")
        try:
            raw = container.decode_record(idx, record)  # verified against the record's checksum
        except ChunkError as exc:
            # Copied as it is, it would be a delta whose base the registry then frees.
            self.gave_up = True
            raise OSError(errno.ESTALE, f"a delta chunk cannot be read: {exc}") from None
        encoded, raw_sum = self._encode(idx, raw)
        if raw_sum != head.c:
            self.gave_up = True
            raise OSError(errno.EIO, f"chunk {idx} decoded to other bytes than it stored")
        return self.replacement(idx, head, record, encoded)
