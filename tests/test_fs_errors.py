"""How a handler's failure reaches the kernel (dccfs/fs_errors.py): its errno, or EIO for a bug."""
from __future__ import annotations

import errno
import logging
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from dccfs.fs_errors import guarded
from dccfs.stats import MountStats


class Handlers:
    def __init__(self):
        self.engine = SimpleNamespace(stats=MountStats())

    @guarded
    async def read(self, failure):
        raise failure


def errno_of(failure) -> tuple[int, int]:
    handlers = Handlers()
    with pytest.raises(pyfuse3.FUSEError) as raised:
        trio.run(handlers.read, failure)
    return raised.value.errno, handlers.engine.stats.handler_errors


def test_an_oserror_keeps_its_errno():
    assert errno_of(OSError(errno.ENOSPC, "full")) == (errno.ENOSPC, 0)


def test_a_group_of_oserrors_from_a_nursery_keeps_the_first_errno(caplog):
    """A read of several chunks loads them in a nursery, whose failure is a group: it was logged as
    an unexpected error, with a traceback, and its errno lost to EIO."""
    nested = ExceptionGroup("loads", [ExceptionGroup("inner", [OSError(errno.EIO, "chunk 8: damaged")]),
                                      OSError(errno.ENOENT, "gone")])
    with caplog.at_level(logging.ERROR, logger="dccfs.fs_errors"):
        assert errno_of(nested) == (errno.EIO, 0)
    assert "unexpected" not in caplog.text and "chunk 8: damaged" in caplog.text


def test_a_bug_is_eio_and_counted(caplog):
    with caplog.at_level(logging.CRITICAL):
        assert errno_of(KeyError("bug")) == (errno.EIO, 1)
        assert errno_of(ExceptionGroup("loads", [OSError(errno.EIO, "x"), KeyError("bug")])) == (errno.EIO, 1)
