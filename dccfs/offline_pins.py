"""fsck's check of delta-base pins and their reference records (.dccfs/bases, .dccfs/refs) against what the deltas name."""
from __future__ import annotations

import logging
import os
import shutil

from dccfs.delta import BASES_DIR, pinned_names, referenced_pins, unreadable_rows
from dccfs.pins import REFS_DIR, read_records, remove_record, write_record

log = logging.getLogger(__name__)


def check_pins(backing: str, repair: bool, report) -> int:
    """Report pins no file references, records naming containers that no longer exist
    (stale: they keep a pin until fsck --repair), and deltas whose managed pin has no
    record for them (missing: the mount could free a pin they need). --repair adds the
    missing records and removes the rest, and does nothing while any file cannot be fully
    read (such a file may name any pin). Returns how many missing records remain."""
    from dccfs.inspect import describe_tree
    pinned = pinned_names(backing)
    records = read_records(backing)
    if not pinned and not records:
        return 0
    rows = describe_tree(backing)
    if unreadable_rows(rows):
        return 0
    referenced = referenced_pins(backing, rows, pinned)
    unused = sorted(n for n in pinned if n not in referenced)
    existing = {f"{row['file_id']}-{row['generation']}" for row in rows if row.get("kind") == "container"}
    existing.update(pinned)
    needs = {(pin, f"{row['file_id']}-{row['generation']}") for row in rows for pin in row.get("delta_of", ())}
    needs.update((pin, name) for name, bases in referenced.items() if name in pinned for pin in bases)
    missing = sorted((pin, dependent) for pin, dependent in needs
                     if pin in records and pin in pinned and dependent not in records[pin])
    stale = sorted((pin, dependent) for pin, dependents in records.items() for dependent in dependents
                   if dependent not in existing or pin not in pinned)
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
        if repair:
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
    return 0 if repair else len(missing)
