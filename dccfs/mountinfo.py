"""The kernel's table of mounts (/proc/self/mountinfo), and finding a path's entry without a stat of any mount root."""
from __future__ import annotations

import os
import re
import stat
from typing import NamedTuple

# The kernel writes a space, tab, newline or backslash in a path as \040, \011, \012, \134.
_ESCAPE = re.compile(r"\\([0-7]{3})")


class MountEntry(NamedTuple):
    mountpoint: str
    fstype: str
    source: str
    device: str  # major:minor, which names the mount's bdi in /sys/class/bdi
    # A FUSE mount's owner (its user_id= option): known without a stat of the mountpoint,
    # which never returns while the mount's daemon hangs.
    owner_uid: int | None = None


def unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    out = []
    # Paths are bytes to the kernel: decoded as os.fsdecode does, so that a mount elsewhere
    # with a name that is not UTF-8 neither raises nor fails to compare with our own paths.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            fields = left.split()
            # An empty source is printed as nothing between two spaces.
            fstype, source, *rest = right.split(" ", 2)
            owner = next((o[8:] for o in rest[0].split(",") if o.startswith("user_id=")), "") if rest else ""
            out.append(MountEntry(unescape(fields[4]), unescape(fstype), unescape(source), fields[2],
                                  int(owner) if owner.isdigit() else None))
    return out


def find_mount(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount table's entry of the mount whose root path is, symlinks resolved. No mount root is
    stat'ed on the way: that asks the mount's daemon, and never returns (not even to Ctrl-C)
    while a FUSE daemon hangs or is stopped."""
    entries = read_mountinfo() if entries is None else entries
    by_path = {e.mountpoint: e for e in entries}
    absolute = os.path.abspath(path)
    if absolute in by_path:
        return by_path[absolute]
    # Unnormalised: a '..' after a symlink climbs from where the link leads, as in realpath.
    joined = path if path.startswith("/") else os.path.join(os.getcwd(), path)
    return by_path.get(resolve_outside_mounts(joined, set(by_path)))


def resolve_outside_mounts(path: str, mount_roots: set[str]) -> str:
    """os.path.realpath, except that a path in mount_roots is taken as it is, never lstat'ed (a
    mount root is a directory, not a symlink). Components that do not exist are kept as they are."""
    pending = [p for p in path.split("/") if p]
    resolved = "/"
    links = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, name)
        if candidate in mount_roots:
            resolved = candidate
            continue
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:
            is_link = False
        if not is_link:
            resolved = candidate
            continue
        links += 1
        if links > 40:  # the kernel's limit: a loop of links
            return candidate
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = "/"
        pending = [p for p in target.split("/") if p] + pending
    return resolved
