"""One open file handle: its file and flags, and which of the file's store failures it has reported."""
from __future__ import annotations

import os
from dataclasses import dataclass

from dccfs.chunkfile import ContainerFile
from dccfs.handles_plain import RawFile, writable
from dccfs.inodes import Inode


@dataclass
class Handle:
    number: int
    inode: Inode
    file: ContainerFile | RawFile
    flags: int
    opened_seq: int = 0  # the file's error_seq at this handle's open
    error_seq: int = 0  # the file's error_seq at this handle's last report (at its open: what was reported)

    @property
    def writable(self) -> bool:
        return writable(self.flags)

    async def commit(self, durable: bool, if_changed: bool = False) -> None:
        """Commit the file (fsync, close), then report the failed stores since this handle's open or last
        report, once, and lost writes (refused from the writeback cache) since its open, every time:
        per handle, since a reader's close used up the writer's error (found by review: the writer's
        close, or its fsync retried, then returned 0 for a file missing data)."""
        file = self.file
        if not isinstance(file, ContainerFile):
            await file.commit(durable)
            return
        try:
            if file.has_changes or not if_changed:
                await file.commit(durable)
        except OSError:
            self.error_seq = file.reported_seq = file.error_seq  # reported by this very error
            raise
        if self.error_seq != file.error_seq or self.opened_seq < file.lost_at_seq:
            self.error_seq = file.reported_seq = file.error_seq
            raise file.failure_error()

    @property
    def appends(self) -> bool:
        return bool(self.flags & os.O_APPEND)
