"""How a new checkpoint finds the earlier file of its series that may be its delta base."""
from __future__ import annotations

import os
import re
import stat
import struct

import numpy as np

from dccfs.container import ChunkError, Container, ContainerError, pread_exact
from dccfs.format import HEADER_SIZE, FormatError, Header

# Base files considered: siblings whose names differ only in digits (step-10 / step-20),
# in the same directory or in sibling directories, newest first.
MAX_CANDIDATES = 8
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


def find_base_candidates(backing_root: str, relpath: str) -> list[str]:
    """Container files that look like earlier versions of relpath, newest first: names that
    differ only in digits, or any file beside a temporary one."""
    directory, name = os.path.split(relpath)
    pattern = name_pattern(name)
    any_name = looks_temporary(name)
    search_dirs = [directory]
    parent, dirname = os.path.split(directory)
    if dirname and name_pattern(dirname) != dirname:
        try:
            for sibling in os.listdir(os.path.join(backing_root, parent) or "."):
                if sibling != dirname and name_pattern(sibling) == name_pattern(dirname):
                    search_dirs.append(os.path.join(parent, sibling))
        except OSError:
            pass
    found = []
    for rel_dir in search_dirs:
        full_dir = os.path.join(backing_root, rel_dir)
        try:
            entries = os.listdir(full_dir)
        except OSError:
            continue
        for entry in entries:
            if entry == name and rel_dir == directory:
                continue
            if looks_temporary(entry) or (not any_name and name_pattern(entry) != pattern):
                continue
            full = os.path.join(full_dir, entry)
            try:
                st = os.stat(full, follow_symlinks=False)
            except OSError:
                continue
            # lstat only: a symlink is never a base (its target may be outside the backing
            # directory or on another filesystem, where the pin cannot be a hard link)
            if st.st_size > HEADER_SIZE and stat.S_ISREG(st.st_mode):
                found.append((st.st_mtime_ns, full))
    found.sort(reverse=True)
    return [path for _, path in found[:MAX_CANDIDATES]]


def open_base(path: str, exclude_file_id: bytes) -> Container | None:
    """Open a candidate base read-only if it is a clean, committed container. Chain length
    is bounded per chunk (DeltaWriter.max_chain)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = pread_exact(fd, HEADER_SIZE, 0)
        header = Header.unpack(head)
        if header.file_id == exclude_file_id:
            raise FormatError("same file")
        container = Container.open(fd, path)
        if container.recovery.torn_tail or not container.index:
            raise FormatError("not a clean committed container")
        return container
    except (FormatError, ContainerError, OSError, struct.error):
        os.close(fd)
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
