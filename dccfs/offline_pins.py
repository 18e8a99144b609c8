"""fsck's check of delta-base pins and their reference records (.dccfs/bases, .dccfs/refs) against what the deltas name."""
from __future__ import annotations

import logging
import os
import shutil

from dccfs.container import ContainerError
from dccfs.delta_bases import BASES_DIR, every_record_base
from dccfs.inspect import describe_tree
from dccfs.pin_records import REFS_DIR, read_records, remove_record, write_record

log = logging.getLogger(__name__)


def check_pins(backing: str, repair: bool, report, damaged_files: int = 0, unused_out: list | None = None) -> int:
    """Report pins no file references, records naming containers that no longer exist
    (stale: they keep a pin until fsck --repair), and deltas whose managed pin has no
    record for them (missing: the mount could free a pin they need). --repair adds the
    missing records and removes the rest, and does nothing while any file cannot be fully
    read (such a file may name any pin). Returns how many problems remain that could let a
    mount free a pin a file needs (missing records, copied dependents)."""
    pinned = pinned_names(backing, report)
    records = read_records(backing)
    _report_odd_refs(backing, report)
    if not pinned and not records:
        return 0
    rows = describe_tree(backing)
    if damaged_files or unreadable_rows(rows):
        # A chunk that does not decode may hold a damaged base reference naming another pin:
        # with one such file, the pins and records say nothing reliable (found by review:
        # --repair removed the real pin of a file whose reference had one flipped bit).
        report(f"pins and their records left as they are: {damaged_files or 'some'} file(s) cannot be "
               "fully read, and a damaged file may need any of them")
        return 0
    try:
        referenced = referenced_pins(backing, rows, pinned)
    except PinsUnsure as exc:
        report(f"pins and their records left as they are: {exc}")
        return 0
    unused = sorted(n for n in pinned if n not in referenced)
    if unused_out is not None and not repair:
        unused_out.extend(unused)  # (the summary must not call them kept for their dependents)
    existing = {f"{row['file_id']}-{row['generation']}" for row in rows if row.get("kind") == "container"}
    existing.update(pinned)
    needs = {(pin, f"{row['file_id']}-{row['generation']}") for row in rows for pin in row.get("delta_of", ())}
    needs.update((pin, name) for name, bases in referenced.items() if name in pinned for pin in bases)
    missing = sorted((pin, dependent) for pin, dependent in needs
                     if pin in records and pin in pinned and dependent not in records[pin])
    stale = sorted((pin, dependent) for pin, dependents in records.items() for dependent in dependents
                   if dependent not in existing or pin not in pinned)
    copies = _copied_dependents(rows, records)
    for path, other in copies:
        report(f"{path}: DUPLICATE: the same file id and generation as {other} (a copy made in "
               "the backing directory, not through a mount), and it holds deltas: deleting either "
               "through a mount can free the pin the other needs; copy it through a mount instead")
    refs = os.path.join(backing, REFS_DIR)
    for pin, dependent in missing:
        where = os.path.join(refs, pin, dependent)
        if repair:
            write_record(backing, pin, dependent)
            report(f"{where}: added the missing record of a file whose deltas name this pin")
        else:
            report(f"{where}: MISSING RECORD: a file's deltas name this pin without a record, so "
                   "a mount could free the pin it needs (fsck --repair adds it)")
    for pin, dependent in stale:
        where = os.path.join(refs, pin, dependent)
        if not os.path.isfile(where):
            report(f"{where}: not a record (a {_kind(where)}): left as it is; remove it by hand")
        elif repair:
            remove_record(backing, pin, dependent)
            report(f"{where}: removed a stale record (no such file any more)")
        else:
            report(f"{where}: a stale record: no such file any more (fsck --repair removes it)")
    for pin in unused:
        path = os.path.join(backing, BASES_DIR, pin)
        if repair:
            os.unlink(path)
            shutil.rmtree(os.path.join(refs, pin), ignore_errors=True)
            report(f"{path}: removed a delta base that no file references any more")
        else:
            report(f"{path}: a delta base that no file references any more "
                   "(fsck --repair removes it)")
    if repair:
        for pin in records:
            if pin not in pinned:
                try:
                    os.rmdir(os.path.join(refs, pin))  # empty now: its records were stale
                except OSError as exc:
                    log.warning("%s: cannot remove: %s", os.path.join(refs, pin), exc)
    return len(copies) + (0 if repair else len(missing))


def _copied_dependents(rows: list[dict], records: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Containers that share a name (file id, generation) with another inode, and hold
    deltas naming a pin with records: records name containers, so they cannot tell the two
    apart. Hard links are one inode and are not copies."""
    first: dict[str, tuple[str, tuple[int, int]]] = {}
    copies = []
    for row in rows:
        if row.get("kind") != "container" or not any(pin in records for pin in row.get("delta_of", ())):
            continue
        name = f"{row['file_id']}-{row['generation']}"
        st = os.stat(row["path"])
        seen = first.setdefault(name, (row["path"], (st.st_dev, st.st_ino)))
        if seen[1] != (st.st_dev, st.st_ino):
            copies.append((row["path"], seen[0]))
    return copies


def unreferenced_bases(backing_root: str) -> list[str]:
    """Pinned base links that no container's delta chunk names any more, directly or
    through another pinned base (a chain: the base of a base is needed as long as its
    dependent is)."""
    bases_dir = os.path.join(backing_root, BASES_DIR)
    pinned = pinned_names(backing_root)
    if not pinned:
        return []
    rows = describe_tree(backing_root)
    if unreadable_rows(rows):
        return []
    try:
        referenced = referenced_pins(backing_root, rows, pinned)
    except PinsUnsure as exc:
        log.warning("not looking for unused delta bases: %s", exc)
        return []
    return [os.path.join(bases_dir, n) for n in sorted(pinned) if n not in referenced]


def pinned_names(backing_root: str, report=None) -> list[str]:
    """The pins: regular files in bases/ (a directory or a link there is no pin, found by review: --repair
    failed with IsADirectoryError on one); report(message) hears of anything else there."""
    bases = os.path.join(backing_root, BASES_DIR)
    try:
        names = os.listdir(bases)
    except FileNotFoundError:
        return []
    pins = []
    for name in names:
        path = os.path.join(bases, name)
        if name.endswith(".tmp"):
            continue
        if os.path.isfile(path) and not os.path.islink(path):
            pins.append(name)
        elif report is not None:
            report(f"{path}: not a delta base (a {_kind(path)}): left as it is; remove it by hand")
    return pins


def _report_odd_refs(backing_root: str, report) -> None:
    """Anything in refs/ that is no directory of records (found by review: a file there was taken silently
    for a pin made before records)."""
    refs = os.path.join(backing_root, REFS_DIR)
    for name in sorted(os.listdir(refs)) if os.path.isdir(refs) else ():
        path = os.path.join(refs, name)
        if os.path.islink(path) or not os.path.isdir(path):
            report(f"{path}: not a directory of records (a {_kind(path)}): its pin counts as one made before "
                   "records; remove it by hand")


def _kind(path: str) -> str:
    if os.path.islink(path):
        return "symlink"
    return "directory" if os.path.isdir(path) else "file" if os.path.isfile(path) else "special file"


def pinned_space(backing_root: str) -> dict:
    """The pinned delta bases, and those no visible name links any more: their space is
    held only for the files that are deltas of them (freed with the last of those)."""
    out = {"pinned": 0, "only_pinned": 0, "only_pinned_bytes": 0}
    for name in pinned_names(backing_root):
        try:
            st = os.stat(os.path.join(backing_root, BASES_DIR, name), follow_symlinks=False)
        except OSError:
            continue
        out["pinned"] += 1
        if st.st_nlink == 1:
            out["only_pinned"] += 1
            out["only_pinned_bytes"] += st.st_blocks * 512
    return out


def unreadable_rows(rows: list[dict]) -> list[str]:
    """Files whose records cannot all be read: they may name any pin, so while there is one
    no pin counts as unused (logged)."""
    unsure = [row["path"] for row in rows
              if row.get("kind") in ("damaged", "unreadable") or row.get("codecs", {}).get("damaged")]
    if unsure:
        log.warning("not looking for unused delta bases: %d file(s) cannot be fully read, "
                    "first %s", len(unsure), unsure[0])
    return unsure


def referenced_pins(backing_root: str, rows: list[dict], pinned: list[str]) -> dict[str, list[str]]:
    """The pins the rows' deltas name, directly or through other pins, each with the pins
    its own deltas name (empty for a keyframe base or a missing pin)."""
    bases_dir = os.path.join(backing_root, BASES_DIR)
    referenced: dict[str, list[str]] = {}
    todo = [name for row in rows for name in row.get("delta_of", ())]
    while todo:
        name = todo.pop()
        if name in referenced:
            continue
        referenced[name] = []
        if name in pinned:
            # Every record, not only the live ones: the dependents read a base's records by offset, and a chunk
            # of the base overwritten since keeps its old record, which may be a delta naming a pin the live
            # index no longer shows (found by review: --repair removed that pin, and the dependent read EIO).
            path = os.path.join(bases_dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    referenced[name] = sorted(every_record_base(fd, path))
                finally:
                    os.close(fd)
            except OSError as exc:
                reason = exc.strerror if isinstance(exc, ContainerError) else f"{path}: {exc.strerror or exc}"
                raise PinsUnsure(f"{reason}; a pinned base that cannot be fully read may need any pin") from exc
            todo.extend(referenced[name])
    return referenced


class PinsUnsure(Exception):
    """What the pins are needed for cannot be told: none of them may be removed."""
