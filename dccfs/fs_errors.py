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
            if exc.errno == errno.EIO:
                log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            self.engine.stats.handler_errors += 1
            log.exception("unexpected error in %s%r", fn.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper
