"""Offline tools on an unmounted backing directory: cat, fsck, and (from offline_convert) pack and unpack."""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field

import click

from dccfs.container import ChunkError, Container, ContainerError
from dccfs.format import HEADER_SIZE
from dccfs.offline_common import (
    OfflineError, byte_progress, chunk_byte_range, copy_plain, decoded_chunks, describe_range,
    FoundFile, file_kind, find_backing_root, find_temps, offline_lock, ratio, walk_files,
)
from dccfs.offline_convert import run_pack, run_unpack
from dccfs.delta_bases import BASES_DIR
from dccfs.offline_pins import check_pins, pinned_names, pinned_space
from dccfs.pin_records import header_name, torn_tail_may_go

log = logging.getLogger(__name__)

__all__ = ["OfflineError", "run_fsck", "run_pack", "run_unpack", "write_decoded"]

_ZERO_BLOCK = bytes(1 << 20)


def _write_zeros(out, length: int) -> None:
    while length > 0:
        step = min(length, len(_ZERO_BLOCK))
        out.write(memoryview(_ZERO_BLOCK)[:step])
        length -= step


def write_decoded(path: str, out) -> int:
    """Write the logical content of one backing file to a binary stream; returns how many
    bytes past the container's last commit were left out (0 for a clean file).

    A container is decoded chunk by chunk, every chunk verified, holes written as zeros;
    a plain file is copied unchanged. A file that starts with the container magic but has an
    invalid header is refused (the mount would show its raw bytes). On a damaged
    chunk the bytes before it have already been written, and OfflineError names the
    file, the chunk and its byte range. Bytes past the last commit (a write a crash
    interrupted, or a damaged end that hides later commits) are what the mount leaves out
    too; the caller says so, since the content written may then be older than expected.
    """
    try:
        # (O_NONBLOCK: a FIFO given by mistake is refused below instead of waiting for a writer)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise OfflineError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OfflineError(f"{path}: not a regular file; only files of a backing directory are decoded")
        kind = file_kind(fd)
        if kind == "damaged-header":
            raise OfflineError(f"{path}: starts with the container magic but its header is "
                               "invalid; refusing to print the raw container bytes")
        torn = 0
        if kind == "plain":
            copy_plain(fd, out)
        else:
            try:
                # a damaged end: the last commit that verifies, and the exit status says what was left out
                container = Container.open(fd, path, damaged_ok=True)
            except ContainerError as exc:
                raise OfflineError(f"{path}: cannot read the container: {exc.reason}") from exc
            for _, raw, length in decoded_chunks(container):
                if raw is None:
                    _write_zeros(out, length)
                else:
                    out.write(raw)
                    _write_zeros(out, length - len(raw))
            torn = container.recovery.torn_tail
        out.flush()
        return torn
    except OSError as exc:
        raise OfflineError(f"{path}: read failed: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


@dataclass
class FsckTotals:
    files: int = 0
    containers: int = 0
    plain: int = 0
    plain_bytes: int = 0
    logical: int = 0
    stored: int = 0
    damaged: int = 0
    torn: int = 0  # of the damaged: torn tails left for --repair (the files read back whole)
    repaired: int = 0
    unused_pins: list = field(default_factory=list)  # pins no file references, left (no --repair)
    hidden_bases: int = 0  # delta bases under no visible name, checked too (their containers are counted)

    def summary(self) -> str:
        hidden = f" and {self.hidden_bases} delta bases under no visible name" if self.hidden_bases else ""
        return (f"{self.files} files{hidden}: {self.containers} containers, {self.plain} plain "
                f"({self.plain_bytes} bytes); containers hold {self.logical} logical bytes in "
                f"{self.stored} stored bytes (ratio {ratio(self.logical, self.stored)}); "
                f"{self.damaged} damaged, {self.repaired} repaired")


def _report(message: str) -> None:
    click.echo(message)


def _cut_torn_tail(path: str, container: Container) -> str:
    """Truncate the bytes past the last commit; returns what was done. Touches nothing else."""
    rec = container.recovery
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size != rec.file_end:
            raise OSError(0, f"file changed size during fsck ({rec.file_end} -> {st.st_size})")
        os.ftruncate(fd, rec.committed_end)
        os.fsync(fd)
    finally:
        os.close(fd)
    return f"cut {rec.torn_tail} torn-tail bytes at offset {rec.committed_end}"


def _check_container(path: str, fd: int, repair: bool, totals: FsckTotals, advance, pinned: bool = False) -> bool:
    """Check one container; returns True when it is (now) clean. pinned: a delta base's pin, which
    its dependents read by offset, as they read a file with other links."""
    try:
        container = Container.open(fd, path, damaged_ok=True)
    except ContainerError as exc:
        _report(f"{path}: DAMAGED: cannot open the container: {exc.reason}")
        return False
    rec = container.recovery
    totals.containers += 1
    totals.logical += container.size
    totals.stored += rec.file_end
    clean = True
    if rec.damage:
        # Not what a crash leaves: cutting would destroy the commits past the damage (found by
        # review: --repair cut every intact record of a file whose index had one flipped bit).
        _report(f"{path}: DAMAGED: {rec.damage}; reads fail with EIO. Not repaired: the {rec.torn_tail} bytes "
                f"from offset {rec.committed_end} are kept; `dccfs cat` prints the last commit that verifies")
        clean = False
    elif rec.used_scan and rec.file_end > HEADER_SIZE:  # a bare header is a valid empty container
        _report(f"{path}: no valid trailer at the end; the last commit (ending at offset "
                f"{rec.committed_end}) was recovered by scanning")
    links = os.fstat(fd).st_nlink
    linked = links > 1 or pinned
    # (pins live in the .dccfs of the backing root, which fsck of a subdirectory finds above it)
    torn = rec.torn_tail and not rec.damage  # damage is reported above, and never cut
    root = find_backing_root(path) if torn and linked else None
    if torn and linked \
            and not (root and torn_tail_may_go(root, header_name(container.header), rec.committed_end)):
        # Linked: a delta base pin (or another name) holds these bytes too. Past the last commit
        # that verifies may lie committed records whose index was damaged, which dependents
        # read by offset: cutting them destroyed those files (found by review).
        _report(f"{path}: DAMAGED: {rec.torn_tail} bytes past the last commit that verifies (offsets "
                f"{rec.committed_end}-{rec.file_end - 1}), not cut: "
                + ("a delta base's pin" if pinned else f"the file has {links} links (a delta base)")
                + ", and its dependents may read those records")
        clean = False
    elif torn:
        if repair:
            try:
                _report(f"{path}: {_cut_torn_tail(path, container)}")
                totals.repaired += 1
                totals.stored -= rec.torn_tail  # the summary counts what the file holds now
            except OSError as exc:
                _report(f"{path}: DAMAGED: cannot cut the {rec.torn_tail}-byte torn tail: "
                        f"{exc.strerror or exc}")
                clean = False
        else:
            _report(f"{path}: TORN TAIL: {rec.torn_tail} bytes past the last commit (offsets "
                    f"{rec.committed_end}-{rec.file_end - 1}); run fsck --repair to cut them")
            totals.torn += 1
            clean = False
    checked = 0
    for idx in sorted(container.index):
        loc = container.index[idx]
        start, end = chunk_byte_range(container, idx)
        try:
            container.read_chunk(idx, check_blocks=True)
        except ChunkError as exc:
            _report(f"{path}: DAMAGED: chunk {idx} ({describe_range(start, end)}, record at "
                    f"offset {loc.offset}): {exc.reason}")
            clean = False
        checked += loc.length
        advance(loc.length)
    advance(max(0, rec.file_end - checked))
    return clean


def _check_file(path: str, st: os.stat_result, repair: bool, totals: FsckTotals, advance,
                pinned: bool = False) -> None:
    if pinned:
        totals.hidden_bases += 1
    else:
        totals.files += 1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        _report(f"{path}: DAMAGED: cannot open: {exc.strerror}")
        totals.damaged += 1
        advance(st.st_size)
        return
    try:
        kind = file_kind(fd)
        if kind == "container":
            clean = _check_container(path, fd, repair, totals, advance, pinned)
        else:
            totals.plain += 1
            totals.plain_bytes += st.st_size
            advance(st.st_size)
            clean = kind == "plain"
            if not clean:
                _report(f"{path}: DAMAGED: starts with the container magic but its header is "
                        "invalid (a container whose header was destroyed, or one torn while "
                        "being created); it reads as a plain file")
    except OSError as exc:
        _report(f"{path}: DAMAGED: read failed: {exc.strerror or exc}")
        clean = False
    finally:
        os.close(fd)
    if not clean:
        totals.damaged += 1


def run_fsck(backing: str, repair: bool, progress: bool) -> int:
    """Verify every container under backing (skipping .dccfs); returns the exit status:
    0 when everything is clean or was repaired, 1 when damage remains."""
    totals = FsckTotals()
    # fsck reports a recovered commit once per file itself; the scan's own warning came on top, once
    # for every open of the file (its name, its pin, its dependents' checks)
    scan_log = logging.getLogger("dccfs.container_records")
    level = scan_log.level
    scan_log.setLevel(logging.ERROR)
    try:
        _fsck_walk(backing, repair, progress, totals)
    except OfflineError as exc:
        click.echo(f"dccfs fsck: {exc}", err=True)
        return 1
    finally:
        scan_log.setLevel(level)
    for temp in find_temps(backing):
        _report(f"{temp}: a temp file left by an interrupted pack/unpack (re-run it; "
                "it removes the temp once its process is gone)")
    _report(totals.summary())
    pinned = pinned_space(find_backing_root(backing) or backing)
    if pinned["pinned"]:
        unused = len(totals.unused_pins)
        _report(f"{pinned['pinned']} delta bases pinned, {pinned['only_pinned']} of them "
                f"({pinned['only_pinned_bytes']} bytes) under no visible name: kept for the "
                "files that are deltas of them"
                + (f", except the {unused} that no file references any more (above)" if unused else ""))
    return 1 if totals.damaged else 0


def _fsck_walk(backing: str, repair: bool, progress: bool, totals: FsckTotals) -> None:
    with offline_lock(backing, required=repair):
        files = list(walk_files(backing))
        seen = {(f.st.st_dev, f.st.st_ino) for f in files}
        # The pins no visible name links: the deltas of other files read them (found by review:
        # they were never checked). Those a visible name links are checked under that name.
        hidden = [f for f in _pin_files(find_backing_root(backing) or backing)
                  if (f.st.st_dev, f.st.st_ino) not in seen]
        seen = set()
        with byte_progress(progress, sum(f.st.st_size for f in files + hidden), "fsck") as advance:
            for found, pinned in [(f, False) for f in files] + [(f, True) for f in hidden]:
                key = (found.st.st_dev, found.st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                _check_file(found.path, found.st, repair, totals, advance, pinned)
        # Under the same lock: a mount starting in between could pin a base for a file
        # it has not committed yet, which --repair would then remove.
        totals.damaged += check_pins(backing, repair, _report, damaged_files=totals.damaged - totals.torn,
                                     unused_out=totals.unused_pins)


def _pin_files(backing_root: str) -> list:
    """The delta-base pins under backing_root, as walk_files' FoundFile."""
    found = []
    for name in pinned_names(backing_root):
        path = os.path.join(backing_root, BASES_DIR, name)
        try:
            found.append(FoundFile(path, os.lstat(path)))
        except FileNotFoundError:
            continue
    return found
