"""How a pyfuse3 handler fails: OSError as its errno, anything unexpected as EIO, its traceback logged."""
# Every handler of DccfsOperations (fs.py, fs_files.py) wears this, so the mount never dies on a request.
from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

log = logging.getLogger(__name__)


def guarded(fn):
    """Map OSError to its errno and anything unexpected to EIO, logging the traceback."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise _fuse_error(fn.__name__, exc) from None
        except ExceptionGroup as group:
            # A read of several chunks loads them in a nursery: one that fails arrives as a group
            # (it was logged as an unexpected error, with its errno lost to EIO).
            failed, rest = group.split(OSError)
            if rest is None:
                raise _fuse_error(fn.__name__, _first_leaf(failed)) from None
            self.engine.stats.handler_errors += 1
            log.exception("unexpected error in %s%r", fn.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            self.engine.stats.handler_errors += 1
            log.exception("unexpected error in %s%r", fn.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _fuse_error(handler: str, exc: OSError) -> pyfuse3.FUSEError:
    if exc.errno == errno.EIO:
        log.error("%s: %s", handler, exc)
    return pyfuse3.FUSEError(exc.errno or errno.EIO)


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
