"""Delta-base pin records on disk: `.dccfs/refs/<pin>/<dependent>`, holding the base end read and a path.

docs/format.md describes them; dccfs.pins keeps them current in a mount, dccfs.offline_pins
checks them offline. Pure file operations under the backing directory; knows nothing of FUSE.
"""
from __future__ import annotations

import os

from dccfs.format import Header
from dccfs.syscalls import fsync_dir

STATE_DIR = ".dccfs"
REFS_DIR = os.path.join(STATE_DIR, "refs")
BASES_DIR = os.path.join(STATE_DIR, "bases")
# A record: its base end in decimal, then a newline and its dependent's path (PATH_MAX at most).
RECORD_MAX = 32 + 4096


def container_name(file_id: bytes, generation: int) -> str:
    """How pins and records name a container: the file id and generation of its header."""
    return f"{file_id.hex()}-{generation}"


def header_name(header: Header) -> str:
    return container_name(header.file_id, header.generation)


def is_managed(backing_root: str, pin: str) -> bool:
    """Whether the pin has a refs directory, i.e. its dependents are recorded (this version)."""
    return os.path.isdir(os.path.join(backing_root, REFS_DIR, pin))


def write_record(backing_root: str, pin: str, dependent: str, base_end: int | None = None,
                 where: str | None = None) -> None:
    """Record durably that container `dependent` may hold deltas naming `pin`, reading records of
    it that end at or before file offset base_end (its last commit when the dependent opened it;
    None: unknown), and that it was last seen at path `where` below the backing root (None: keep
    what the record says). Callers hold delta.PIN_LOCK, so no pin is freed between the record
    and its first use."""
    refs = os.path.join(backing_root, REFS_DIR)
    pin_dir = os.path.join(refs, pin)
    made = []
    for directory in (refs, pin_dir):
        try:
            os.mkdir(directory, 0o700)
            made.append(directory)
        except FileExistsError:
            pass
    path = os.path.join(pin_dir, dependent)
    existed = os.path.lexists(path)
    recorded_end, recorded_where = read_record(backing_root, pin, dependent)
    # The furthest end any of its writers read; a record without one (older versions, fsck)
    # stays without: nothing says what its dependent read.
    end = recorded_end
    if base_end is not None and (not existed or recorded_end is not None):
        end = max(base_end, recorded_end or 0)
    where = where if where is not None else recorded_where
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if (end, where) != (recorded_end, recorded_where):
            text = ("" if end is None else str(end)) + ("" if where is None else "\n" + where)
            os.ftruncate(fd, 0)
            os.pwrite(fd, os.fsencode(text), 0)
            os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(pin_dir)
    for directory in reversed(made):
        fsync_dir(os.path.dirname(directory))


def read_record(backing_root: str, pin: str, dependent: str) -> tuple[int | None, str | None]:
    """(base end, path) a record holds: the end is None when it holds none (made by an older
    version, or by fsck --repair) or cannot be read; the path None when it names none."""
    try:
        with open(os.path.join(backing_root, REFS_DIR, pin, dependent), "rb") as f:
            text = f.read(RECORD_MAX)
    except OSError:
        return None, None
    end, newline, where = text.partition(b"\n")
    return (int(end) if end.isdigit() else None), (os.fsdecode(where) if newline and where else None)


def read_base_end(backing_root: str, pin: str, dependent: str) -> int | None:
    return read_record(backing_root, pin, dependent)[0]


def torn_tail_may_go(backing_root: str, pin: str, committed_end: int) -> bool:
    """Whether bytes past committed_end of a container with other links can be cut: it is not a
    delta base (the links are a user's), or every dependent recorded reads only records that end
    at or before committed_end (what a killed writer appended later, none of them can name)."""
    if not os.path.lexists(os.path.join(backing_root, BASES_DIR, pin)):
        return True
    records = read_records(backing_root).get(pin)
    if records is None:  # a pin of an older version: its dependents are not known
        return False
    ends = [read_base_end(backing_root, pin, dependent) for dependent in records]
    return all(end is not None and end <= committed_end for end in ends)


def remove_record(backing_root: str, pin: str, dependent: str) -> None:
    try:
        os.unlink(os.path.join(backing_root, REFS_DIR, pin, dependent))
    except FileNotFoundError:
        pass


def read_records(backing_root: str) -> dict[str, list[str]]:
    """pin name -> dependents recorded for it (the refs directories as they are)."""
    refs = os.path.join(backing_root, REFS_DIR)
    try:
        pins = os.listdir(refs)
    except FileNotFoundError:
        return {}
    records = {}
    for pin in pins:
        try:
            records[pin] = os.listdir(os.path.join(refs, pin))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return records
