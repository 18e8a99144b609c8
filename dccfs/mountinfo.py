"""The kernel's table of mounts (/proc/self/mountinfo), with its octal escapes undone."""
from __future__ import annotations

import re
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
