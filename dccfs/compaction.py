"""Compaction: rewrite a container without its dead records, then swap it in with one rename.

Overwritten chunks leave dead records in the append-only log. When the dead bytes
outweigh the live ones, the live records are copied verbatim (no re-encoding) into a
temporary file in BACKING/.dccfs/tmp under the same file id with the header's
generation bumped (cached records are named by id, generation and offset),
closed by one full index, fsynced, given the original's metadata, and renamed over
the original. A crash before the rename leaves a stray temporary that the next mount
removes; after it, the compacted file is complete. See docs/commit-protocol.md.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import replace

from dccfs.container import Container, pread_exact, pwrite_all, pwritev_all, record_blocks
from dccfs.format import (
    FORMAT_VERSION, HEADER_SIZE, INDEX_BLOCKS, INDEX_FULL, RECORD_HEADER_SIZE, RecordHeader, chunk_record_header,
    pack_index, trailer_record,
)

log = logging.getLogger(__name__)

# Compacting costs a full copy of the live bytes; only do it when it frees a lot.
MIN_GARBAGE_BYTES = 4 << 20
MIN_GARBAGE_FRACTION = 0.5
COPY_BATCH = 8 << 20


def garbage_bytes(container: Container) -> int:
    return container.end - container.live_bytes


def worth_compacting(container: Container) -> bool:
    garbage = garbage_bytes(container)
    return garbage >= MIN_GARBAGE_BYTES and garbage >= MIN_GARBAGE_FRACTION * container.live_bytes


class RecordRewriter:
    """What the rewrite callbacks of write_compacted share: the replacement record of a chunk
    encoded another way, the counts of what they replaced, and what the swap-in asks of them
    (dccfs/handles_rewrite.py)."""

    # The copy names the pins the file's records name: its records are carried over.
    carries_pin_records = True
    what = "re-encoding"  # for the log

    def __init__(self):
        self.replaced = 0
        self.bytes_before = 0
        self.bytes_after = 0

    def pays(self) -> bool:
        """Whether the copy is worth swapping in for what it stores (asked after the copy)."""
        return True

    def done(self, stats) -> None:
        """The copy was swapped in: count and log it."""

    def abandoned(self, copy_name: str) -> None:
        """The copy was thrown away."""

    def replacement(self, idx: int, head, record: bytes, encoded) -> list[bytes]:
        """The parts of chunk idx's new record (same raw length and checksum as head's)."""
        self.replaced += 1
        self.bytes_before += len(record)
        self.bytes_after += RECORD_HEADER_SIZE + len(encoded.params) + len(encoded.payload)
        new_head = chunk_record_header(idx, encoded.codec_id, len(encoded.params),
                                       len(encoded.payload), head.b, head.c)
        return [new_head.pack(), encoded.params, encoded.payload]


def _replacement_blocks(parts: list[bytes]) -> tuple[tuple[int, ...], int]:
    """The block table of a replacement record given in parts."""
    record = memoryview(b"".join(parts))
    head = RecordHeader.unpack(record)
    params = bytes(record[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + head.params_len])
    return record_blocks(head.sub, params, record[RECORD_HEADER_SIZE + head.params_len:], head.b)


def write_compacted(source: Container, tmp_path: str, rewrite=None, stop=None) -> int:
    """Write the compacted copy of source to tmp_path (fsynced); return its size.

    rewrite(idx, record), when given, returns the parts of a replacement record for a
    live chunk (the same raw bytes, encoded another way), or None to copy it verbatim.
    stop, a threading.Event, abandons the copy (ECANCELED) when set."""
    fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        index, size, _ = source.snapshot()
        # the copy is written in this dccfs's format version (it only adds to version 1)
        pwrite_all(fd, replace(source.header.next_generation(), version=FORMAT_VERSION).pack(), 0)
        end = HEADER_SIZE
        entries = {}
        for idx in sorted(index):
            if stop is not None and stop.is_set():
                raise OSError(errno.ECANCELED, "the mount is stopping")
            loc = index[idx]
            source.check_loc(idx, loc)  # ChunkError (an OSError): the copy is abandoned
            record = pread_exact(source.fd, loc.length, loc.offset)
            if len(record) != loc.length:
                raise OSError(errno.EIO, f"{source.path}: chunk {idx} record is truncated")
            parts = rewrite(idx, record) if rewrite is not None else None
            blocks = loc.blocks, loc.block_shift
            if parts is None:
                parts = [record]
            else:
                blocks = _replacement_blocks(parts)
            pwritev_all(fd, parts, end)
            length = sum(len(p) for p in parts)
            entries[idx] = (end, length) + blocks
            end += length
        kind = INDEX_FULL | (INDEX_BLOCKS if any(e[2] for e in entries.values()) else 0)
        blob = pack_index(kind, size, 0, entries) + trailer_record(size, end)
        pwrite_all(fd, blob, end)
        end += len(blob)
        copy_metadata(source.fd, fd)
        os.fsync(fd)
        return end
    except BaseException:
        os.unlink(tmp_path)
        raise
    finally:
        os.close(fd)


def copy_metadata(source_fd: int, target_fd: int) -> None:
    """Owner, mode, extended attributes and times of source onto target. The owner goes
    first: a chown clears the set-user-ID and set-group-ID bits, root's chown included."""
    st = os.fstat(source_fd)
    os.fchown(target_fd, st.st_uid, st.st_gid)
    os.fchmod(target_fd, st.st_mode & 0o7777)
    names = os.listxattr(source_fd)
    for name in os.listxattr(target_fd):
        if name not in names:
            os.removexattr(target_fd, name)
    for name in names:
        os.setxattr(target_fd, name, os.getxattr(source_fd, name))
    os.utime(target_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def clean_stale_temporaries(tmp_dir: str) -> None:
    """Remove compaction temporaries a crash left behind (never visible through the mount)."""
    for name in os.listdir(tmp_dir):
        if name.endswith(".compact"):
            log.info("removing stale compaction temporary %s", name)
            os.unlink(os.path.join(tmp_dir, name))


def swap_in(tmp_path: str, source_fd: int, backing_fd_path: str, expected_key: tuple[int, int],
            expected_size: int, mtime_ns: int | None = None) -> int | None:
    """Rename the compacted file over the original if the original is still exactly the file
    that was copied; return an O_PATH descriptor of the new file, or None (temp removed).

    Runs on the FUSE thread with no await, so no request can rename, reopen or change the
    file between the check and the rename. The metadata is copied again here: a chmod,
    chown or setxattr served while the copy was fsynced went to the original only.
    mtime_ns, when given, replaces the original's mtime.
    """
    try:
        path = os.readlink(backing_fd_path)
        if path.endswith(" (deleted)"):
            raise OSError(errno.ESTALE, "the file was deleted while it was being compacted")
        st = os.stat(path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != expected_key \
                or st.st_nlink != 1 or st.st_size != expected_size:
            raise OSError(errno.ESTALE, "the file changed while it was being compacted")
        tmp_fd = os.open(tmp_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            copy_metadata(source_fd, tmp_fd)
            if mtime_ns is not None:
                os.utime(tmp_fd, ns=(os.fstat(tmp_fd).st_atime_ns, mtime_ns))
        finally:
            os.close(tmp_fd)
        os.rename(tmp_path, path)
    except OSError as exc:
        log.info("compaction skipped: %s", exc)
        os.unlink(tmp_path)
        return None
    return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
