"""--shared mode: several nodes mount one backing directory; writers of a file take turns.

Rules (docs/reliability.md): an open for writing takes an exclusive flock on the
container and holds it until this node's last handle closes, so two nodes never
append to one container at once (the second waits, up to WRITER_WAIT_S, then gets
EBUSY). Every open re-reads the container if another node committed since
(close-to-open consistency): the last writer to close wins, never a torn mix.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable

import trio

from dccfs.container import Container

log = logging.getLogger(__name__)

WRITER_WAIT_S = 60.0
POLL_S = 0.05


async def lock_for_writing(fd: int, path: str, held_here: Callable[[], bool] = lambda: False) -> bool:
    """Exclusive flock on the container, polled so the event loop keeps serving others. False, without
    the lock on fd, once held_here() says this node holds it on another descriptor meanwhile."""
    with trio.move_on_after(WRITER_WAIT_S):
        while True:
            if held_here():
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                await trio.sleep(POLL_S)
    raise OSError(errno.EBUSY, f"{path}: another node is writing this file "
                               f"(waited {WRITER_WAIT_S:.0f}s)")


async def reread(file, path: str) -> Container | None:
    """The container re-read when another node has committed to it since we read it, else None."""
    container = file.container
    # (an explicit mtime alone is no reason to keep a stale view: a touch on a reader's node then
    # had its next writer append over another node's records, found by review; the mtime is kept)
    if file.content_changed or file.inflight:
        return None
    if os.fstat(container.fd).st_size == container.end:
        return None
    fresh = await trio.to_thread.run_sync(Container.open, container.fd, path)
    log.debug("%s: re-read after another node's commit", path)
    return fresh
