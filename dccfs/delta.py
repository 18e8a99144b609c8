"""Checkpoint delta on the filesystem side: pick a base file, pin it, resolve base chunks.

The pure transform lives in dccfs.codecs.delta. A delta chunk names its base chunk by
a stable reference (base file id, generation, chunk index, record offset and length,
raw checksum), never by path. Before the first delta chunk against a base is written,
the base container is hard-linked as BACKING/.dccfs/bases/<file id>-<generation>;
that link keeps the base's records (append-only, never reset in place while linked)
readable after the base is renamed, overwritten or deleted through the mount.
The mount frees a pin once no container needs it (dccfs.pins); `dccfs fsck --repair`
removes the ones that leaked. Base references and the store that reads base chunks are in
dccfs.delta_bases.
"""
from __future__ import annotations

import logging
import os
import threading

from dccfs.container import ChunkError, Container, pread_exact
from dccfs.codecs import CodecError
from dccfs.codecs.delta import CODEC_DELTA, delta_base_ref
from dccfs.format import HEADER_SIZE, RECORD_HEADER_SIZE, FormatError, Header, RecordHeader
from dccfs.delta_candidates import (MAX_CANDIDATES, TENSOR_CODECS, find_base_candidates,  # noqa: F401
                                    first_chunk_codec, fixed_name, looks_temporary, name_pattern,
                                    open_base, resembles)
from dccfs import pin_records, pins
from dccfs.delta_bases import (BASES_DIR, MAX_CHAIN, BaseRef, BaseStore, base_link_path, chain_reaches,  # noqa: F401
                               store_for_path)
from dccfs.syscalls import AT_FDCWD, link_fd

log = logging.getLogger(__name__)

# Held while pinning, and by an overwrite (ContainerFile.truncate to 0) from its check that
# the container has one link to its reset in place: a pin in between would keep records
# that the reset then destroys.
PIN_LOCK = threading.Lock()


def pin_base(backing_root: str, base_fd: int, header: Header) -> str:
    """Hard-link the base container into .dccfs/bases (idempotent); returns the link path."""
    with PIN_LOCK:
        return _link_pin_locked(backing_root, base_fd, header)


def _link_pin_locked(backing_root: str, base_fd: int, header: Header) -> str:
    path = base_link_path(backing_root, header.file_id, header.generation)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    # The base's records too: with sync_on_close = false they may still be only in the page
    # cache when a dependent's deltas naming them are committed (found by review).
    os.fsync(base_fd)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    link_fd(base_fd, AT_FDCWD, os.fsencode(tmp))
    os.replace(tmp, path)
    # Durable before the first delta naming it is committed (that commit fsyncs only the
    # dependent's own file).
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


DELTA_LAYOUTS = ("safetensors", "torch-zip")

# A base is judged on this many delta attempts; none smaller than its keyframe and the file
# stops trying. A base can still be useless (a named file's fallback when none resembles
# it; a temporary took any file beside it until 2026-12-06, such as a torch.save of the same
# model beside a save_file), and each attempt costs about three keyframe encodes, the pass
# after close a full copy of the file (docs/delta.md "Giving up on a base").
PROBE_CHUNKS = 8


def record_depth(base: Container, loc) -> tuple[RecordHeader, int]:
    """A base record's header and its chain depth (0 for a keyframe)."""
    head = RecordHeader.unpack(pread_exact(base.fd, RECORD_HEADER_SIZE, loc.offset))
    if head.sub != CODEC_DELTA:
        return head, 0
    params = pread_exact(base.fd, head.params_len, loc.offset + RECORD_HEADER_SIZE)
    return head, BaseRef.unpack(delta_base_ref(params)).depth


def deepest_chunk(base: Container, bound: int) -> int:
    """The chain depth of base's deepest live chunk (0: keyframes only), reading record
    headers until one reaches bound; an unreadable one counts as too deep."""
    deepest = 0
    for loc in base.index.values():
        try:
            deepest = max(deepest, record_depth(base, loc)[1])
        except (FormatError, ValueError, CodecError, OSError):
            return bound
        if deepest >= bound:
            break
    return deepest


class DeltaWriter:
    """Encodes one file's chunks against the same chunks of its base, when that is smaller.

    Used from worker threads; the base is pinned (hard-linked) before the first delta
    record that names it is appended, so a crash can leave an unneeded link (removed by
    fsck --repair) but never a delta without its base.
    """

    def __init__(self, backing_root: str, base: Container, cache=None, always: bool = False,
                 max_chain: int = 1, during_write: bool = True):
        self.backing_root = backing_root
        self.base = base
        self.cache = cache
        # A base chunk that is a delta of depth max_chain (or more) is not used: such
        # chunks are stored as keyframes, which later files can start a new chain from.
        self.max_chain = max(1, min(max_chain, MAX_CHAIN))
        # Delta encoding tries several transforms per chunk (about 3x the CPU of a
        # keyframe). By default it runs only while the encoders keep up with the writer
        # (effort >= 1), so it never slows a save down; a rule with delta = true forces it.
        self.always = always
        # False: every chunk is written as a keyframe and left to the pass after close.
        self.during_write = during_write
        # Chunks written as keyframes only because the delta was put off (encoders behind
        # the writer, or during_write off): dccfs.redelta encodes them after the last close.
        self.deferred: set[int] = set()
        self.pinned = False
        self.path = "?"  # the file written, for the log (for_file sets it)
        self.attempts = 0  # delta encodes tried, smaller or not
        self.smaller_seen = False
        # No delta was smaller in the first PROBE_CHUNKS attempts: keyframes from then on,
        # and nothing is left for the pass after close.
        self.given_up = False
        # The base was overwritten in place (reset under a new file id) before it was
        # pinned: its records are gone, so no delta may name it.
        self.base_changed = False
        self.delta_chunks = 0
        self._lock = threading.Lock()
        # The name (file id and generation) of the container the writer's chunks go into;
        # ContainerFile sets it before each encode (an overwrite gives the file a new id).
        self.dependent_key: str | None = None
        self._recorded: set[str | None] = set()  # dependents with a record for the pin
        self._registry = pins.registry_for(backing_root)
        self._holds: str | None = None  # the pin this writer keeps from being freed
        self._base_depth: int | None = None  # the base's deepest chunk, once looked at

    @classmethod
    def for_file(cls, backing_root: str, relpath: str, file_id: bytes, cache=None,
                 always: bool = False, max_chain: int = 1,
                 during_write: bool = True, prefix: bytes | bytearray | None = None,
                 chunk_size: int | None = None) -> "DeltaWriter | None":
        """The writer for relpath against the first candidate base (find_base_candidates'
        order) that resembles prefix (the new file's first bytes), when given. Without one, a
        named file takes its first usable candidate (a name that differs only in digits is a
        series: the new file's header may well differ from its base's), a temporary name
        or a fixed one (fixed_name) none. A base of another chunk size is never taken."""
        name = os.path.basename(relpath)
        temporary = looks_temporary(name)
        fixed = fixed_name(name)
        bound = max(1, min(max_chain, MAX_CHAIN))
        fallback = None
        decoded = 0
        # Written in place while it is a pinned base itself: no base whose chain leads back to it.
        try:
            pinned_itself = bound > 1 and any(n.startswith(file_id.hex() + "-")
                                              for n in os.listdir(os.path.join(backing_root, BASES_DIR)))
        except FileNotFoundError:
            pinned_itself = False
        for path in find_base_candidates(backing_root, relpath):
            base = open_base(path, file_id, chunk_size)
            if base is None:
                continue
            if pinned_itself and chain_reaches(backing_root, base, file_id, bound):
                os.close(base.fd)
                continue
            alike = prefix is None
            if not alike and decoded < MAX_CANDIDATES and first_chunk_codec(base) in TENSOR_CODECS:
                decoded += 1
                alike = resembles(prefix, base)
            # A fixed name's siblings of its extension are taken only when they resemble it.
            sibling = fixed and os.path.basename(path) != name
            if alike and sibling and deepest_chunk(base, bound) >= bound:
                # last.ckpt copies the numbered file just written; when that one has deltas
                # as deep as delta_chain allows, it is too deep a base, and the keyframe it is
                # a delta of, when still there, comes later in the list. (Its first chunk
                # alone was looked at first: a file whose first tensor changed has a
                # keyframe there and deltas after it, found by review.)
                alike = False
            if alike:
                if fallback is not None:
                    os.close(fallback[1].fd)
                return cls._chosen(backing_root, relpath, path, base, cache, always, max_chain,
                                   during_write)
            if fallback is None and not temporary and not sibling:
                fallback = (path, base)
            else:
                os.close(base.fd)
            if decoded >= MAX_CANDIDATES and (fallback is not None or temporary):
                break  # the rest would only cost opens
        if fallback is not None:
            return cls._chosen(backing_root, relpath, *fallback, cache, always, max_chain, during_write)
        return None

    @classmethod
    def _chosen(cls, backing_root, relpath, path, base, cache, always, max_chain, during_write):
        log.info("%s: storing as a delta of %s", relpath, os.path.relpath(path, backing_root))
        writer = cls(backing_root, base, cache, always, max_chain, during_write)
        writer.path = relpath
        return writer

    def _usable_base_record(self, idx: int):
        """(location, record header, chain depth a delta on it would have) of the base's
        chunk idx, or None when there is none or the chain is as long as allowed. Once the
        base passed _base_is_shallow, no chunk of it is at the bound."""
        loc = self.base.index.get(idx)
        if loc is None or not self._base_is_shallow():
            return None
        try:
            head, depth = self._record_depth(loc)
        except (FormatError, ValueError, CodecError, OSError):
            return None
        return loc, head, depth + 1

    def _record_depth(self, loc) -> tuple[RecordHeader, int]:
        return record_depth(self.base, loc)

    def _base_is_shallow(self) -> bool:
        """Whether the base's deepest chunk is shallower than the bound. A pin keeps its whole
        container, and so the pins its deltas name: a file that took a delta of even one
        keyframe chunk of a delta file would keep that file and its own bases pinned, then
        the next file this one, and a rotating run would free none of them. So the bound
        holds per file too (delta_chain 1: only a base without deltas is used)."""
        with self._lock:
            if self._base_depth is None:
                self._base_depth = self._deepest_base_chunk()
                if self._base_depth >= self.max_chain:
                    log.info("%s: its base %s has deltas %d deep, as deep as delta_chain allows: "
                             "storing keyframes, which the next file can start a chain from",
                             self.path, os.path.relpath(self.base.path, self.backing_root),
                             self._base_depth)
            return self._base_depth < self.max_chain

    def _deepest_base_chunk(self) -> int:
        return deepest_chunk(self.base, self.max_chain)

    def _base_chunk(self, idx: int) -> tuple[bytes, BaseRef] | None:
        found = self._usable_base_record(idx)
        if found is None:
            return None
        loc, head, depth = found
        key = (self.base.cache_id, idx, loc.offset)
        raw = self.cache.get(key) if self.cache is not None else None
        if raw is None:
            try:
                raw = self.base.read_chunk(idx, loc)
            except ChunkError as exc:
                log.warning("delta base chunk unusable, storing a keyframe: %s", exc)
                return None
            if self.cache is not None:
                self.cache.put(key, raw)
        ref = BaseRef(self.base.header.file_id, self.base.header.generation, idx, loc.offset,
                      loc.length, head.c, depth)
        return raw, ref

    def encode(self, idx: int, raw: bytes, hints):
        """A delta EncodedChunk for chunk idx, or None when a keyframe is as small (or the
        delta is put off until after close: see deferred)."""
        if self.base_changed or self.given_up:
            return None
        judged = self.attempts >= PROBE_CHUNKS
        if not self.during_write or (hints.effort < 1 and not self.always and judged):
            # Pinned now, not when the pass gets to it: an atomic saver renames this file
            # over its base right after the close, and an unlinked base cannot be pinned.
            if self._usable_base_record(idx) is not None and self._pin(self.dependent_key):
                with self._lock:
                    self.deferred.add(idx)
            return None
        return self.encode_now(idx, raw, hints)

    def encode_now(self, idx: int, raw: bytes, hints, dependent: str | None = None):
        """encode without putting anything off: a delta, or None when a keyframe is as small.
        dependent names the container the delta goes into (default: the writer's)."""
        from dccfs.codecs.delta import encode_delta
        if self.base_changed or self.given_up:
            return None
        found = self._base_chunk(idx)
        if found is None:
            return None
        base_raw, ref = found
        encoded = encode_delta(raw, base_raw, hints, ref.pack())
        self._judge(encoded is not None)
        if encoded is None or not self._pin(dependent or self.dependent_key):
            return None
        with self._lock:
            self.delta_chunks += 1
        return encoded

    def _judge(self, smaller: bool) -> None:
        with self._lock:
            self.attempts += 1
            if smaller:
                self.smaller_seen = True
            elif self.attempts >= PROBE_CHUNKS and not self.smaller_seen and not self.always:
                if not self.given_up:
                    log.info("%s: %s is no delta base for it: no delta was smaller in %d "
                             "chunks; storing keyframes", self.path,
                             os.path.relpath(self.base.path, self.backing_root), self.attempts)
                self.given_up = True
                self.deferred.clear()

    def _pin(self, dependent: str | None) -> bool:
        """Pin the base for the container named dependent (the one the delta goes into),
        recording durably that it needs the pin; False when it cannot be, and from then on
        for this file."""
        with self._lock:
            if self.base_changed:
                return False
            if self.pinned and dependent in self._recorded:
                return True
            if dependent is None and self._registry is not None:
                # In a mount, only an encode that started before this writer existed has
                # no container name to record: that chunk is a keyframe, the next ones not.
                return False
            try:
                with PIN_LOCK:
                    pinned = self._pin_locked(dependent)
            except OSError as exc:
                # Gone or moved before the pin (deleted, compacted, renamed away): this
                # file stores keyframes, with one warning rather than one per chunk.
                log.warning("delta base of %s cannot be pinned (%s); storing keyframes",
                            os.path.basename(self.base.path), exc)
                pinned = False
            if not pinned:
                self.base_changed = True
                return False
            self.pinned = True
            self._recorded.add(dependent)
            return True

    def _pin_locked(self, dependent: str | None) -> bool:
        """The record first, then the link (both durable), under PIN_LOCK: the pin registry
        frees a pin only under that lock and only when its refs directory is empty."""
        name = pin_records.header_name(self.base.header)
        path = base_link_path(self.backing_root, self.base.header.file_id, self.base.header.generation)
        managed = pin_records.is_managed(self.backing_root, name)
        recorded = False
        if os.path.exists(path) and not managed:
            pass  # pinned by an older version: never freed online, so no record is needed
        elif dependent is None:
            if managed:
                log.warning("delta base %s: no dependent name to record; storing keyframes", name)
                return False
            # A writer used outside a mount names no dependent: a pin without records,
            # which only fsck --repair removes.
        else:
            # (the base's committed end: what a killed writer appends past it, no delta names)
            where = self.path if self.path != "?" else None
            pin_records.write_record(self.backing_root, name, dependent, self.base.recovery.committed_end, where)
            recorded = True
            if self._registry is not None:
                self._registry.noted(name, dependent, where)
        try:
            _link_pin_locked(self.backing_root, self.base.fd, self.base.header)
        except OSError:
            if recorded:
                pin_records.remove_record(self.backing_root, name, dependent)
            raise
        if not self.pinned and not self._pinned_base_is_unchanged(path):
            if recorded:
                pin_records.remove_record(self.backing_root, name, dependent)
            return False
        if self._registry is not None and not self._holds:
            self._registry.hold(name)
            self._holds = name
        return True

    def forget_dependent(self, dependent: str) -> None:
        """The container named dependent was thrown away (an abandoned copy): a later copy
        of the same name must record again."""
        with self._lock:
            self._recorded.discard(dependent)

    def _pinned_base_is_unchanged(self, path: str) -> bool:
        """Once pinned (two links), the base is never reset in place; before, it may have
        been (O_TRUNC through the mount), and then the chunks read from it (or from the
        cache under its old name) are not what the pin now holds. Such a pin is removed."""
        try:
            header = Header.unpack(pread_exact(self.base.fd, HEADER_SIZE, 0))
            if (header.file_id, header.generation) == (self.base.header.file_id,
                                                        self.base.header.generation):
                return True
        except FormatError:
            pass
        log.warning("delta base %s was overwritten before it was pinned; storing keyframes",
                    os.path.basename(path))
        st, pin = os.fstat(self.base.fd), os.stat(path)
        if (st.st_dev, st.st_ino) == (pin.st_dev, pin.st_ino):
            os.unlink(path)
        return False

    def close(self) -> None:
        os.close(self.base.fd)
        if self._holds is not None:
            self._registry.release(self._holds)
            self._holds = None


def unreferenced_bases(backing_root: str) -> list[str]:
    """Pinned base links that no container's delta chunk names any more (dccfs.offline_pins)."""
    from dccfs.offline_pins import unreferenced_bases as find_unreferenced
    return find_unreferenced(backing_root)
