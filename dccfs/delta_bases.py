"""Delta base references and the store that opens pinned base containers and hands out their verified chunks."""
from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from dccfs.advice import record_runs, willneed
from dccfs.codecs.delta import CODEC_DELTA, delta_base_ref
from dccfs.container import ChunkError, Container, ContainerError, pread_exact
from dccfs.format import (HEADER_SIZE, MAX_CHUNK_SHIFT, MAX_FILE_OFFSET, REC_CHUNK, RECORD_HEADER_SIZE, FormatError,
                          Header, RecordHeader)

log = logging.getLogger(__name__)

# The longest chunk record: header, params (a u16 length) and a payload no longer than the
# largest chunk (a codec that cannot shrink a chunk stores it raw).
MAX_RECORD_BYTES = RECORD_HEADER_SIZE + 0xFFFF + (1 << MAX_CHUNK_SHIFT)

BASES_DIR = os.path.join(".dccfs", "bases")
_REF = struct.Struct("<16sIQQIQ")  # file id, generation, chunk index, offset, length, raw xxh3
# The config's delta_chain may not exceed this; a reader refuses deeper references, so a
# damaged or cyclic reference cannot make it walk further.
MAX_CHAIN = 16


@dataclass(frozen=True)
class BaseRef:
    file_id: bytes
    generation: int
    chunk_index: int
    offset: int
    length: int
    raw_sum: int
    # Deltas from this chunk down to a keyframe: 1 when the base chunk is a keyframe.
    # Packed as a 49th byte only when > 1, so chain-1 references keep their 48 bytes.
    depth: int = 1

    def pack(self) -> bytes:
        ref = _REF.pack(self.file_id, self.generation, self.chunk_index, self.offset,
                        self.length, self.raw_sum)
        return ref + bytes([self.depth]) if self.depth > 1 else ref

    @classmethod
    def unpack(cls, data: bytes) -> "BaseRef":
        if len(data) == _REF.size + 1:
            depth = data[-1]
            if not 2 <= depth <= MAX_CHAIN:
                raise ValueError(f"delta base reference has chain depth {depth}, "
                                 f"expected 2..{MAX_CHAIN}")
            return cls(*_REF.unpack(data[:-1]), depth)
        if len(data) != _REF.size:
            raise ValueError(f"delta base reference is {len(data)} bytes, expected {_REF.size} "
                             f"or {_REF.size + 1}")
        return cls(*_REF.unpack(data))

    @property
    def link_name(self) -> str:
        return f"{self.file_id.hex()}-{self.generation}"


def record_codec_and_base(fd: int, offset: int) -> tuple[int, str | None]:
    """The codec id of the chunk record at offset, and the pin its delta names (None for a keyframe), from
    the record's header and a delta's params alone; FormatError or ValueError for a record that says neither."""
    head = RecordHeader.unpack(pread_exact(fd, RECORD_HEADER_SIZE, offset))
    return head.sub, (_delta_pin(fd, head, offset) if head.sub == CODEC_DELTA else None)


def _delta_pin(fd: int, head: RecordHeader, offset: int) -> str:
    """The pin named by the params of the delta record at offset, whose header is head."""
    params = pread_exact(fd, head.params_len, offset + RECORD_HEADER_SIZE)
    return BaseRef.unpack(delta_base_ref(params)).link_name


def every_record_base(fd: int, path: str) -> set[str]:
    """The pins that any chunk record of the container in fd names up to its last commit, dead records
    (overwritten chunks) too: once the container is a pinned base, its dependents read its records by offset,
    whatever its index says now. ContainerError when a record within the last commit cannot be read, or when
    bytes follow the last commit: dependents read records by offset, so a damaged end (a commit recovered by
    scanning, found by review: fsck --repair then freed the pin the records past it named) hides what they need."""
    recovery = Container.open(fd, path).recovery
    if recovery.torn_tail:
        raise ContainerError(path, f"{recovery.torn_tail} bytes past its last commit may hold records that its "
                                   "dependents read")
    committed_end = recovery.committed_end
    named, offset = set(), HEADER_SIZE
    while offset < committed_end:
        try:
            head = RecordHeader.unpack(pread_exact(fd, RECORD_HEADER_SIZE, offset))
            if offset + head.total_len > committed_end:
                raise FormatError("the record runs past the last commit")
            if head.rtype == REC_CHUNK and head.sub == CODEC_DELTA:
                named.add(_delta_pin(fd, head, offset))
        except (FormatError, ValueError) as exc:
            raise ContainerError(path, f"record at offset {offset}: {exc}") from exc
        offset += head.total_len
    return named


def chain_reaches(backing_root: str, base: Container, file_id: bytes, depth: int = MAX_CHAIN) -> bool:
    """Whether the deltas of base's live records, or those of the pinned bases they name (every record of
    those, up to depth levels), name a container with file_id: a file written in place while it is itself a
    pinned base must not take such a base, or the two pins would need each other and neither could ever go
    (found by review). True as well when a record on the way cannot be read."""
    prefix = file_id.hex() + "-"
    try:
        named = {pin for loc in base.index.values() if (pin := record_codec_and_base(base.fd, loc.offset)[1])}
        seen: set[str] = set()
        for _ in range(depth):
            if any(pin.startswith(prefix) for pin in named):
                return True
            seen |= named
            further: set[str] = set()
            for pin in named:
                fd = os.open(os.path.join(backing_root, BASES_DIR, pin), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    further |= every_record_base(fd, pin)
                finally:
                    os.close(fd)
            named = further - seen
            if not named:
                return False
        return True
    except (OSError, FormatError, ValueError):
        return True


def base_link_path(backing_root: str, file_id: bytes, generation: int) -> str:
    return os.path.join(backing_root, BASES_DIR, f"{file_id.hex()}-{generation}")


def is_pinned_link(header: Header, backing_root: str, st: os.stat_result) -> bool:
    """Whether the container with this header and fstat st is linked as its own delta base pin: one
    of its links is then dccfs's, not a user's hard link."""
    try:
        pinned = os.stat(base_link_path(backing_root, header.file_id, header.generation), follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (pinned.st_dev, pinned.st_ino) == (st.st_dev, st.st_ino)


# How many base chunks a store remembers having decoded once (keys only, about 100 bytes each).
SEEN_BASE_CHUNKS = 4096
# How many base chunks ahead of a reader moving forward through a base are advised (WILLNEED).
BASE_ADVISE_CHUNKS = 32


class BaseStore:
    """Opens pinned base containers by reference and hands out their verified chunks,
    from the chunk cache when one is given and holds them (the base file was read).

    A base chunk decoded for a delta read goes into the cache only when it is asked for a
    second time: chunk i of a delta names chunk i of its base, so one read of one dependent
    uses each base chunk once, and caching it at once doubled the memory (and the page
    faults) of every delta read. A chunk that several dependents share, or that a re-read
    asks for again after T0 dropped the dependent's chunk, is hot and stays (docs/delta.md)."""

    def __init__(self, backing_root: str, cache=None):
        self.backing_root = backing_root
        self.cache = cache
        self._open: dict[str, Container] = {}
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple, None] = OrderedDict()  # decoded once, not cached
        # Per open base: the last base chunk read, and the chunk index advised up to.
        self._last_read: dict[str, int] = {}
        self._advised_to: dict[str, int] = {}

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
                # Dependents read a base's records by offset, each checked by its own checksum:
                # a damaged index of the base's own later commits hides none of them.
                container = Container.open(fd, path, damaged_ok=True)
            except (ContainerError, OSError):
                os.close(fd)
                raise
            # Chunks of a base that is itself a delta find their own bases here too.
            container.base_store = self
            self._open[ref.link_name] = container
            return container

    def forget(self, link_name: str) -> None:
        """Close a pin this store holds open: it was freed, and its blocks return to the
        filesystem only once no descriptor is left."""
        with self._lock:
            container = self._open.pop(link_name, None)
            self._last_read.pop(link_name, None)
            self._advised_to.pop(link_name, None)
        if container is not None:
            os.close(container.fd)

    def read_base_chunk(self, ref: BaseRef) -> bytes:
        """The base chunk's raw bytes, verified against the checksum the delta recorded.
        A base chunk that is itself a delta must be one of depth ref.depth - 1 (a keyframe
        for depth 1), so a read walks at most ref.depth records."""
        key = (ref.file_id + ref.generation.to_bytes(4, "little"), ref.chunk_index, ref.offset)
        if self.cache is not None:
            raw = self.cache.get(key)
            if raw is not None:
                return raw
        container = self.container_for(ref)
        if not (RECORD_HEADER_SIZE <= ref.length <= MAX_RECORD_BYTES
                and HEADER_SIZE <= ref.offset <= MAX_FILE_OFFSET - ref.length):
            # A damaged reference must not make one read ask for gigabytes (or overflow pread).
            raise ChunkError(container.path, ref.chunk_index,
                             f"delta base reference names a record of {ref.length} bytes "
                             f"at offset {ref.offset}")
        self._advise_ahead(container, ref)
        record = pread_exact(container.fd, ref.length, ref.offset)
        try:
            head = RecordHeader.unpack(record)
        except FormatError as exc:
            raise ChunkError(container.path, ref.chunk_index, f"delta base record: {exc}") from exc
        # decode_record checks the decoded bytes against the record's checksum, so comparing
        # that checksum with the one the delta recorded verifies them without hashing twice.
        if head.c != ref.raw_sum:
            raise ChunkError(container.path, ref.chunk_index, "delta base chunk does not match")
        raw = container.decode_record(ref.chunk_index, record, chain_left=ref.depth - 1)
        if self.cache is not None and self._seen_before(key):
            self.cache.put(key, raw)
        return raw

    def _advise_ahead(self, container: Container, ref: BaseRef) -> None:
        """Ask the kernel to read the next base records of a reader moving forward through this
        base. The read-ahead of the delta file advises its own records only, and the decode
        threads pread base records out of order, which defeats the base file's own read-ahead:
        every base record was a cold read on the critical path (a delta cold read took 0.1 s
        longer than with the base file already in the page cache). A base chunk read far from
        the previous one is a jump: a random reader gets no advice, and one that starts over
        (a second read of the dependent) gets a new window from there. One reader per base is
        followed: two dependents of one base read at once look like jumps to each other."""
        name, idx = ref.link_name, ref.chunk_index
        with self._lock:
            last = self._last_read.get(name)
            self._last_read[name] = idx
            if last is None or abs(idx - last) > BASE_ADVISE_CHUNKS:
                self._advised_to[name] = idx + 1
                return
            advised_to = self._advised_to.get(name, 0)
            if idx + BASE_ADVISE_CHUNKS // 2 < advised_to:
                return
            start, end = max(advised_to, idx), idx + BASE_ADVISE_CHUNKS
            self._advised_to[name] = end
        locs = [loc for loc in map(container.index.get, range(start, end)) if loc is not None]
        willneed(container.fd, record_runs(locs), container.path)

    def _seen_before(self, key: tuple) -> bool:
        """Whether this base chunk was decoded before (and so is worth caching); remembers it
        otherwise, forgetting the oldest keys beyond SEEN_BASE_CHUNKS."""
        with self._lock:
            if key in self._seen:
                del self._seen[key]
                return True
            self._seen[key] = None
            if len(self._seen) > SEEN_BASE_CHUNKS:
                self._seen.popitem(last=False)
            return False

    def close(self) -> None:
        with self._lock:
            for container in self._open.values():
                os.close(container.fd)
            self._open.clear()
            self._last_read.clear()
            self._advised_to.clear()


def warm_up_delta_kernels() -> None:
    """Load the delta decode kernels (the mount's warm-up, beside the keyframe codecs') so the
    first delta read does not wait for them."""
    from dccfs.codecs.delta import warm_up
    try:
        warm_up()
    except Exception:
        log.exception("delta kernel warm-up failed; they will load on first use")


_stores: dict[str, BaseStore] = {}
_stores_lock = threading.Lock()


def store_for_path(path: str) -> BaseStore | None:
    """The base store of the backing directory holding path (walks up to the .dccfs that
    holds bases/; a directory named .dccfs below the root is user data)."""
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isdir(os.path.join(directory, BASES_DIR)):
            with _stores_lock:
                return _stores.setdefault(directory, BaseStore(directory))
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent
