"""pack and unpack: convert plain files to containers and back, atomically, keeping metadata."""
from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import click

from dccfs.codecs import encode_chunk, sniff_layout
from dccfs.config import Config, check_chunk_size, check_read_block_size
from dccfs.container import Container, ContainerError, pread_exact, pwrite_all
from dccfs.format import HEADER_SIZE, checksum64, looks_like_container
from dccfs.mount import STATE_DIR
from dccfs.syscalls import fsync_dir
from dccfs.offline_common import (
    TEMP_NAME, TEMP_PREFIX, TMP_SUBDIR, FoundFile, OfflineError, byte_progress, decoded_chunks,
    file_kind, find_backing_root, find_temps, inside_state_dir, is_stale_temp, offline_lock,
    walk_files,
)

log = logging.getLogger(__name__)

SNIFF_PREFIX = 8 << 20  # as much of a file as the layout sniffers get, like the mount's writer
ENCODE_WORKERS = max(1, min(8, os.cpu_count() or 1))


class SkipFile(Exception):
    """A file left as it is, for a reason worth telling the user."""


@dataclass
class ConvertTotals:
    converted: int = 0
    already: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    stale_removed: int = 0

    def summary(self, verb: str, already_what: str) -> str:
        line = (f"{verb}: {self.converted} files converted ({self.bytes_in} -> {self.bytes_out} "
                f"bytes), {self.already} {already_what}, {self.skipped} skipped, "
                f"{self.failed} failed")
        if self.stale_removed:
            line += f", {self.stale_removed} stale temp files of an interrupted run removed"
        return line


def run_pack(path: str, chunk_size: str | None, progress: bool, read_block_size: str | None = None) -> int:
    """Convert every plain file under path into a container; returns the exit status.

    Without chunk_size each file gets the chunk size a default mount gives a new file of
    that name (1 MiB for checkpoint and weight files, 256 KiB otherwise). read_block_size
    (text, as the config's) stores tensor chunks as blocks a small read decodes alone.
    Re-running after an interruption resumes: files that are already containers are skipped.
    """
    fixed = check_chunk_size(chunk_size, "--chunk-size").bit_length() - 1 if chunk_size else None
    block_size = check_read_block_size(read_block_size, "--read-block-size") if read_block_size is not None else 0
    defaults = Config()

    def convert(found: FoundFile, src: int, dst: int, advance) -> int:
        shift = fixed if fixed is not None else defaults.chunk_shift_for(os.path.basename(found.path))
        return _pack_into(found.path, src, dst, shift, advance, block_size)

    return _convert_tree(path, progress, "pack", "already containers", convert,
                         is_source=lambda kind: kind != "container")


def run_unpack(path: str, progress: bool) -> int:
    """Convert every container under path back into a plain file; returns the exit status."""
    def convert(found: FoundFile, src: int, dst: int, advance) -> int:
        return _unpack_into(found.path, src, dst, advance)

    return _convert_tree(path, progress, "unpack", "already plain", convert,
                         is_source=lambda kind: kind == "container")


class _Already(Exception):
    """Nothing to do: the file is already in the target form."""


def _convert_tree(path: str, progress: bool, verb: str, already_what: str, convert,
                  is_source: Callable[[str], bool]) -> int:
    if inside_state_dir(path):
        raise OfflineError(f"{path}: is inside {STATE_DIR}, dccfs's own state; nothing to {verb}")
    totals = ConvertTotals()
    with offline_lock(path, required=True):
        backing_root = find_backing_root(path)  # (made by the lock for a tree never mounted)
        tmp_dir = os.path.join(backing_root, STATE_DIR, TMP_SUBDIR) if backing_root else None
        totals.stale_removed = _remove_stale_temps(path, tmp_dir)
        files = list(walk_files(path))
        with byte_progress(progress, sum(f.st.st_size for f in files), verb) as advance:
            for found in files:
                _convert_one(found, tmp_dir, verb, convert, is_source, advance, totals)
    click.echo(totals.summary(verb, already_what))
    return 1 if totals.failed else 0


def _remove_stale_temps(path: str, tmp_dir: str | None) -> int:
    """Delete temp files of runs that were killed (their pid is gone); never anything else."""
    candidates: list[str] = []
    if tmp_dir and os.path.isdir(tmp_dir):
        candidates += [os.path.join(tmp_dir, n) for n in os.listdir(tmp_dir) if TEMP_NAME.match(n)]
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidates += list(find_temps(root)) if os.path.isdir(path) else [
        os.path.join(root, n) for n in os.listdir(root) if TEMP_NAME.match(n)]
    removed = 0
    for temp in candidates:
        if is_stale_temp(os.path.basename(temp)):
            try:
                os.unlink(temp)
            except FileNotFoundError:
                continue
            log.info("%s: removed a temp file left by an interrupted run", temp)
            removed += 1
    return removed


def _convert_one(found: FoundFile, tmp_dir: str | None, verb: str, convert, is_source,
                 advance, totals: ConvertTotals) -> None:
    done = 0

    def counted(n: int) -> None:
        nonlocal done
        done += n
        advance(n)

    try:
        out_bytes = _replace_atomically(found, tmp_dir, convert, is_source, counted)
    except _Already:
        totals.already += 1
    except SkipFile as exc:
        click.echo(f"{found.path}: skipped: {exc}", err=True)
        totals.skipped += 1
    except Exception as exc:  # one bad file must not stop a batch; the original is intact
        log.debug("%s: %s failed", found.path, verb, exc_info=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        click.echo(f"{found.path}: {verb} failed, original left intact: {reason}", err=True)
        totals.failed += 1
    else:
        totals.converted += 1
        totals.bytes_in += found.st.st_size
        totals.bytes_out += out_bytes
    advance(max(0, found.st.st_size - done))


def _replace_atomically(found: FoundFile, tmp_dir: str | None, convert, is_source,
                        advance) -> int:
    """Write the converted file to a temp, copy the metadata, fsync, rename over the original."""
    path = found.path
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(src)
        if not is_source(file_kind(src)):
            raise _Already()
        links = st.st_nlink - _pin_links(path, src, st)
        if links > 1:
            raise SkipFile(f"it has {links} hard links; replacing it would split them")
        parent = os.path.dirname(os.path.abspath(path))
        temp_dir = tmp_dir if tmp_dir and os.stat(tmp_dir).st_dev == st.st_dev else parent
        dst, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp",
                                     dir=temp_dir)
        try:
            try:
                out_bytes = convert(found, src, dst, advance)
                _copy_metadata(path, src, dst, st)
                os.fsync(dst)
            finally:
                os.close(dst)
            _check_unchanged(path, src, st)
            os.rename(temp, path)
        except BaseException:
            _unlink_quietly(temp)
            raise
    finally:
        os.close(src)
    fsync_dir(parent)
    return out_bytes


def _pin_links(path: str, src: int, st: os.stat_result) -> int:
    """1 when one of the links is dccfs's pin of a delta base (.dccfs/bases), else 0. That
    link is not the user's: it keeps the records for dependents after the name is replaced."""
    from dccfs.delta_bases import is_pinned_link
    from dccfs.format import FormatError, Header
    backing_root = find_backing_root(path)
    if st.st_nlink < 2 or backing_root is None:
        return 0
    try:
        return int(is_pinned_link(Header.unpack(pread_exact(src, HEADER_SIZE, 0)), backing_root, st))
    except (OSError, FormatError):
        return 0


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("%s: cannot remove temp file: %s", path, exc.strerror)


def _check_unchanged(path: str, src: int, before: os.stat_result) -> None:
    now = os.fstat(src)
    if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
            before.st_size, before.st_mtime_ns, before.st_ctime_ns):
        raise OSError(errno.EBUSY, "the file changed while it was being converted")
    if os.lstat(path).st_ino != before.st_ino:
        raise OSError(errno.EBUSY, "the path was replaced while it was being converted")


def _copy_metadata(path: str, src: int, dst: int, st: os.stat_result) -> None:
    """user.* xattrs, owner, mode, atime/mtime, in the order that keeps each step permitted."""
    try:
        names = os.listxattr(src)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        names = []
    for name in names:
        if name.startswith("user."):
            os.setxattr(dst, name, os.getxattr(src, name))
    mine = os.fstat(dst)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.fchown(dst, st.st_uid, st.st_gid)
        except PermissionError:
            raise SkipFile(f"cannot keep its owner {st.st_uid}:{st.st_gid} "
                           "(run as root or as the owner)") from None
    os.fchmod(dst, stat.S_IMODE(st.st_mode))  # after chown, which may clear set-id bits
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items on worker threads, results in order, at most 2*workers in flight."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dccfs-offline")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pack_into(path: str, src: int, dst: int, shift: int, advance, block_size: int = 0) -> int:
    size = os.fstat(src).st_size
    container = Container.create(dst, path, shift)
    cs = container.chunk_size
    try:
        layout = sniff_layout(pread_exact(src, min(size, SNIFF_PREFIX), 0), size)
    except Exception:  # a hint is an optimisation: never let it stop a pack
        log.debug("%s: layout sniffing failed", path, exc_info=True)
        layout = None

    def encode(idx: int):
        raw = pread_exact(src, min(cs, size - idx * cs), idx * cs)
        if len(raw) != min(cs, size - idx * cs):
            raise OSError(errno.EIO, f"file shrank while packing (short read at {idx * cs})")
        if raw.count(0) == len(raw):
            return idx, None, len(raw), 0  # all zeros: a hole, as the mount stores it
        hints = layout.hints_for(idx * cs, raw) if layout is not None else None
        if hints is not None and hints.segments and block_size:
            hints = replace(hints, block_size=block_size, block_seed=idx)
        return idx, encode_chunk(raw, hints), len(raw), checksum64(raw)

    done = 0
    for idx, encoded, raw_len, raw_sum in _ordered_map(encode, _data_chunks(src, size, cs), ENCODE_WORKERS):
        if encoded is not None:
            loc = container.append_chunk(idx, encoded, raw_len, raw_sum)
            container.read_chunk(idx, loc)  # verify from disk before the original goes away
        advance(raw_len)
        done += raw_len
    advance(size - done)  # the holes
    container.commit(size, durable=True)
    return container.end


def _data_chunks(fd: int, size: int, cs: int) -> list[int]:
    """The chunks that hold data, found with SEEK_DATA / SEEK_HOLE, so that the holes of a sparse file
    are not read (found by review: an 8 GiB file with one byte of data took 52 s); every chunk where
    the file system cannot tell."""
    chunks: list[int] = []
    pos = 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            first = max(start // cs, chunks[-1] + 1 if chunks else 0)
            chunks.extend(range(first, (end - 1) // cs + 1))
            pos = end
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no data past pos
            return list(range(-(-size // cs)))
    return chunks


def _unpack_into(path: str, src: int, dst: int, advance) -> int:
    try:
        container = Container.open(src, path)
    except ContainerError as exc:
        raise OfflineError(f"{path}: cannot read the container: {exc.reason}") from exc
    for start, raw, _ in decoded_chunks(container):
        if start == 0 and raw is not None and looks_like_container(raw[:HEADER_SIZE]):
            raise SkipFile("its content starts with a container header, so as a plain file "
                           "it would be read as a container")
        if raw:
            pwrite_all(dst, raw, start)
        loc = container.index.get(start // container.chunk_size)
        advance(loc.length if loc else 0)
    os.ftruncate(dst, container.size)  # holes and the tail stay sparse
    return container.size
