"""Describe stored files without a mount: logical and stored size, ratio, codecs per chunk."""
from __future__ import annotations

import logging
import os
from collections import Counter

from dccfs.codecs import codec_name
from dccfs.delta_bases import record_codec_and_base
from dccfs.container import Container, ContainerError, pread_exact
from dccfs.format import HEADER_SIZE, FormatError, looks_like_container
from dccfs.offline_common import is_state_dir

log = logging.getLogger(__name__)


def describe_file(path: str) -> dict:
    """One row for `dccfs stats --files`: what a backing file is and how well it is stored."""
    st = os.stat(path)
    row = {"path": path, "stored": st.st_size}
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not looks_like_container(pread_exact(fd, HEADER_SIZE, 0)):
            row.update(kind="plain", logical=st.st_size, ratio=1.0, codecs={})
            return row
        try:
            container = Container.open(fd, path)
        except ContainerError as exc:
            row.update(kind="damaged", logical=None, ratio=None, codecs={}, error=exc.reason)
            return row
        codecs: Counter = Counter()
        delta_of = set()
        for loc in container.index.values():
            try:
                # The header (and a delta's params) say all; the payload is never read.
                codec, pin = record_codec_and_base(fd, loc.offset)
                if pin is not None:
                    codecs["delta"] += 1
                    delta_of.add(pin)
                else:
                    codecs[codec_name(codec)] += 1
            except (FormatError, ValueError):
                codecs["damaged"] += 1
        holes = -(-container.size // container.chunk_size) - len(container.index)
        if holes > 0:
            codecs["hole"] = holes
        row.update(kind="container", logical=container.size, chunk_size=container.chunk_size,
                   ratio=round(st.st_size / container.size, 4) if container.size else 0.0,
                   codecs=dict(codecs), file_id=container.header.file_id.hex(),
                   generation=container.header.generation,
                   delta_of=sorted(delta_of))
        return row
    finally:
        os.close(fd)


def describe_tree(root: str) -> list[dict]:
    if os.path.isfile(root):
        return [describe_file(root)]
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_state_dir(dirpath, d))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                try:
                    rows.append(describe_file(path))
                except OSError as exc:
                    rows.append({"path": path, "kind": "unreadable", "stored": None, "logical": None,
                                 "ratio": None, "codecs": {}, "error": exc.strerror or str(exc)})
    return rows
