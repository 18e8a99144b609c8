"""Checkpoint delta on the filesystem side: pick a base file, pin it, resolve base chunks.

The pure transform lives in dccfs.codecs.delta. A delta chunk names its base chunk by
a stable reference (base file id, generation, chunk index, record offset and length,
raw checksum), never by path. Before the first delta chunk against a base is written,
the base container is hard-linked as BACKING/.dccfs/bases/<file id>-<generation>;
that link keeps the base's records (append-only, never reset in place while linked)
readable after the base is renamed, overwritten or deleted through the mount.
`dccfs fsck --repair` removes links that no container references any more.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass

from dccfs.container import ChunkError, ChunkLoc, Container, ContainerError, pread_exact
from dccfs.format import HEADER_SIZE, FormatError, Header, checksum64
from dccfs.syscalls import AT_FDCWD, link_fd

log = logging.getLogger(__name__)

BASES_DIR = os.path.join(".dccfs", "bases")
_REF = struct.Struct("<16sIQQIQ")  # file id, generation, chunk index, offset, length, raw xxh3
DELTA_CODEC_ID = 32
# Base files considered: siblings whose names differ only in digits (step-10 / step-20),
# in the same directory or in sibling directories, newest first.
MAX_CANDIDATES = 8


@dataclass(frozen=True)
class BaseRef:
    file_id: bytes
    generation: int
    chunk_index: int
    offset: int
    length: int
    raw_sum: int

    def pack(self) -> bytes:
        return _REF.pack(self.file_id, self.generation, self.chunk_index, self.offset,
                         self.length, self.raw_sum)

    @classmethod
    def unpack(cls, data: bytes) -> "BaseRef":
        if len(data) != _REF.size:
            raise ValueError(f"delta base reference is {len(data)} bytes, expected {_REF.size}")
        return cls(*_REF.unpack(data))

    @property
    def link_name(self) -> str:
        return f"{self.file_id.hex()}-{self.generation}"


def name_pattern(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def base_link_path(backing_root: str, file_id: bytes, generation: int) -> str:
    return os.path.join(backing_root, BASES_DIR, f"{file_id.hex()}-{generation}")


class BaseStore:
    """Opens pinned base containers by reference and hands out their verified chunks."""

    def __init__(self, backing_root: str):
        self.backing_root = backing_root
        self._open: dict[str, Container] = {}
        self._lock = threading.Lock()

    def container_for(self, ref: BaseRef) -> Container:
        with self._lock:
            container = self._open.get(ref.link_name)
            if container is not None:
                return container
            path = base_link_path(self.backing_root, ref.file_id, ref.generation)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise OSError(errno.EIO, f"delta base {ref.link_name} is missing: {exc.strerror}") from exc
            try:
                container = Container.open(fd, path)
            except (ContainerError, OSError):
                os.close(fd)
                raise
            self._open[ref.link_name] = container
            return container

    def read_base_chunk(self, ref: BaseRef) -> bytes:
        """The base chunk's raw bytes, verified against the checksum the delta recorded."""
        container = self.container_for(ref)
        raw = container.read_chunk(ref.chunk_index, ChunkLoc(ref.offset, ref.length))
        if raw is None or checksum64(raw) != ref.raw_sum:
            raise ChunkError(container.path, ref.chunk_index, "delta base chunk does not match")
        return raw

    def close(self) -> None:
        with self._lock:
            for container in self._open.values():
                os.close(container.fd)
            self._open.clear()


def pin_base(backing_root: str, base_fd: int, header: Header) -> str:
    """Hard-link the base container into .dccfs/bases (idempotent); returns the link path."""
    path = base_link_path(backing_root, header.file_id, header.generation)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    link_fd(base_fd, AT_FDCWD, os.fsencode(tmp))
    os.replace(tmp, path)
    return path


def find_base_candidates(backing_root: str, relpath: str, exclude_file_id: bytes) -> list[str]:
    """Container files that look like earlier versions of relpath, newest first."""
    directory, name = os.path.split(relpath)
    pattern = name_pattern(name)
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
            if name_pattern(entry) != pattern:
                continue
            full = os.path.join(full_dir, entry)
            try:
                st = os.stat(full, follow_symlinks=False)
            except OSError:
                continue
            if st.st_size > HEADER_SIZE and os.path.isfile(full):
                found.append((st.st_mtime_ns, full))
    found.sort(reverse=True)
    return [path for _, path in found[:MAX_CANDIDATES]]


def open_keyframe_base(path: str, exclude_file_id: bytes) -> Container | None:
    """Open a candidate base read-only if it is a clean, committed container. Chain length
    is bounded per chunk: a base chunk that is itself a delta is never used as a base."""
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
