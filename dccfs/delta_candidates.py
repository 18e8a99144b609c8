"""How a new checkpoint finds the earlier file of its series that may be its delta base."""
from __future__ import annotations

import os
import re
import stat
import struct

import numpy as np

from dccfs.codecs import CODEC_TENSOR
from dccfs.codecs.delta import CODEC_DELTA
from dccfs.container import ChunkError, Container, ContainerError, pread_exact
from dccfs.container_records import commit_from_trailer
from dccfs.format import HEADER_SIZE, RECORD_HEADER_SIZE, FormatError, Header, RecordHeader
from dccfs.pin_records import STATE_DIR

# Base files considered: siblings whose names differ only in digits (step-10 / step-20),
# in the same directory or in sibling directories; the same name first (rank 0's file of the
# last step, not rank 1's of this one), then newest first. At most MAX_LISTED of them, of
# which at most MAX_CANDIDATES whose first chunk holds tensors are decoded to see whether
# they resemble the new file: a transformers checkpoint with its tokenizer has more than
# eight newer files beside model.safetensors' temporary (found by review).
MAX_LISTED = 32
MAX_CANDIDATES = 8
MAX_SERIES_DIRS = 16
TENSOR_CODECS = (CODEC_TENSOR, CODEC_DELTA)
# A name says little (a temporary's nothing), so the base preferred is one that resembles
# the new file: its first chunk and the new file's first bytes share a prefix this long (a
# safetensors header, a torch zip's first entry), or this share of equal bytes at equal
# offsets (a raw tensor dump a small step apart), compared over at most COMPARE_BYTES. A
# transformers checkpoint directory has config.json written just before
# model.safetensors' temporary: as the newest file it was the base, and no chunk of the
# series was ever a delta (found 2026-12-06).
MIN_COMMON_PREFIX = 64
MIN_EQUAL_SHARE = 0.25
COMPARE_BYTES = 64 << 10


def name_pattern(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def looks_temporary(name: str) -> bool:
    """Atomic savers (safetensors, transformers, many trainers) write a hidden or *.tmp file
    and rename it into place, so its name says nothing about its series."""
    return name.startswith(".") or "tmp" in name.lower()


def series_dirs(backing_root: str, directory: str) -> list[tuple[int, str]]:
    """(rank, directory): directory itself (rank 0), and the directories that may hold
    earlier versions of its files: where the directory or its parent is named with digits
    (step-10/, iter_0000200/mp_rank_00/ in Megatron's layout), its siblings of the same
    pattern, the same path below them; where it looks temporary (a staging directory renamed
    into place when complete, such as transformers' tmp-checkpoint-N), any sibling. When
    both levels have digits the outer one counts the steps, so its siblings rank first (-2,
    then -1): iter_0000100/mp_rank_00 before iter_0000200/mp_rank_01, the other rank of
    this step. At most MAX_SERIES_DIRS per level, newest first."""
    parts = directory.split(os.sep) if directory else []
    out = [(0, directory)]
    for up in (1, 2):
        if len(parts) < up:
            break
        found = []
        above, dirname, below = parts[:-up], parts[-up], parts[len(parts) - up + 1:]
        temporary = looks_temporary(dirname)
        if name_pattern(dirname) == dirname and not temporary:
            continue
        parent = os.path.join(*above) if above else ""
        try:
            siblings = os.listdir(os.path.join(backing_root, parent) or ".")
        except OSError:
            continue
        for sibling in siblings:
            if sibling == dirname or (not parent and sibling == STATE_DIR) or not (
                    temporary or name_pattern(sibling) == name_pattern(dirname)):
                continue
            candidate = os.path.join(parent, sibling, *below)
            try:
                st = os.stat(os.path.join(backing_root, candidate), follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                found.append((-st.st_mtime_ns, candidate))
        found.sort()
        out += [(-up, d) for _, d in found[:MAX_SERIES_DIRS]]
    return out


def fixed_name(name: str) -> bool:
    """A name with no digits that is not a temporary: a file saved again and again under one
    name (Lightning's last.ckpt, a trainer's latest.pt, best.pt), each time a copy of the
    numbered checkpoint just written beside it."""
    return name_pattern(name) == name and not looks_temporary(name)


def find_base_candidates(backing_root: str, relpath: str) -> list[str]:
    """Container files that look like earlier versions of relpath (names that differ only in
    digits, or any file beside a temporary one, in series_dirs; beside a fixed name, also
    the numbered files of its extension in its own directory): the same name first, then by
    series_dirs' rank, then newest first."""
    directory, name = os.path.split(relpath)
    pattern = name_pattern(name)
    any_name = looks_temporary(name)
    suffix = os.path.splitext(name)[1] if fixed_name(name) else ""
    found = []
    for rank, rel_dir in series_dirs(backing_root, directory):
        full_dir = os.path.join(backing_root, rel_dir)
        try:
            entries = os.listdir(full_dir)
        except OSError:
            continue
        for entry in entries:
            if entry == name and rel_dir == directory:
                continue
            if looks_temporary(entry):
                continue
            if not any_name and name_pattern(entry) != pattern and not (
                    suffix and rel_dir == directory and entry.endswith(suffix) and not fixed_name(entry)):
                # (a fixed name's sibling is a numbered file: another fixed name is rewritten
                # in place each time, and as a base its pin would keep every old version)
                continue
            full = os.path.join(full_dir, entry)
            try:
                st = os.stat(full, follow_symlinks=False)
            except OSError:
                continue
            # lstat only: a symlink is never a base (its target may be outside the backing
            # directory or on another filesystem, where the pin cannot be a hard link)
            if st.st_size > HEADER_SIZE and stat.S_ISREG(st.st_mode):
                found.append((entry != name, rank, -st.st_mtime_ns, full))
    found.sort()
    return [path for *_, path in found[:MAX_LISTED]]


def open_base(path: str, exclude_file_id: bytes, chunk_size: int | None = None) -> Container | None:
    """Open a candidate base read-only if it is a clean, committed container (of chunk_size,
    when given: chunk i is paired with chunk i of the base). Chain length is bounded per
    chunk (DeltaWriter.max_chain)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = pread_exact(fd, HEADER_SIZE, 0)
        header = Header.unpack(head)
        if header.file_id == exclude_file_id:
            raise FormatError("same file")
        if chunk_size is not None and header.chunk_size != chunk_size:
            raise FormatError("another chunk size")
        if commit_from_trailer(fd, os.fstat(fd).st_size) is None:
            # Being written (another rank's file of this step) or torn: not a base, and not
            # worth the recovery scan and its warning.
            raise FormatError("no trailer")
        container = Container.open(fd, path)
        if container.recovery.torn_tail or not container.index:
            raise FormatError("not a clean committed container")
        return container
    except (FormatError, ContainerError, OSError, struct.error):
        os.close(fd)
        return None


def first_chunk_codec(base: Container) -> int | None:
    """The codec id of the base's first chunk record (one small read), or None."""
    loc = base.index.get(0)
    if loc is None:
        return None
    try:
        return RecordHeader.unpack(pread_exact(base.fd, RECORD_HEADER_SIZE, loc.offset)).sub
    except (FormatError, OSError, struct.error):
        return None


def resembles(prefix: bytes | bytearray, base: Container) -> bool:
    """Whether base's first chunk looks like an earlier version of a file starting with prefix."""
    try:
        first = base.read_chunk(0)
    except (ChunkError, ContainerError, FormatError, OSError, ValueError):
        return False
    n = min(len(prefix), len(first or b""), COMPARE_BYTES)
    if n == 0:
        return False
    equal = np.frombuffer(prefix, np.uint8, n) == np.frombuffer(first, np.uint8, n)
    common = n if equal.all() else int(np.argmin(equal))
    return common >= min(MIN_COMMON_PREFIX, n) or float(equal.mean()) >= MIN_EQUAL_SHARE
