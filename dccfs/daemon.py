"""The daemon's trio main loop: FUSE session, background nursery, signals and clean shutdown."""
from __future__ import annotations

import logging
import os
import signal

import pyfuse3
import trio

from dccfs.engine import Engine
from dccfs.fs import DccfsOperations

log = logging.getLogger(__name__)

# 1 MiB writes let one request fill most of a chunk; the kernel caps this at its
# max_pages (256 pages = 1 MiB on current kernels). See docs/performance.md.
FUSE_TUNING = ("max_read=1048576",)


def fuse_options(req) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"default_permissions", f"fsname={req.backing}", "subtype=dccfs"}
    for opt in req.fuse_options:
        if opt in ("debug", "nonempty"):
            continue
        options.add(opt)
    return options


async def _main(ops: DccfsOperations, engine: Engine, control) -> None:
    async with trio.open_nursery() as nursery:
        engine.nursery = nursery
        nursery.start_soon(_stop_on_signals, ops, nursery)
        if control is not None:
            nursery.start_soon(control.serve)
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
        finally:
            with trio.CancelScope(shield=True):
                await ops.shutdown()
        nursery.cancel_scope.cancel()


async def _stop_on_signals(ops: DccfsOperations, nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: committing open files and stopping", signum)
            with trio.CancelScope(shield=True):
                await ops.shutdown()
            pyfuse3.terminate()
            return


def serve(backing: str, mountpoint: str, req, on_mounted) -> None:
    engine = Engine(req.config, backing)
    root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    ops = DccfsOperations(backing, root_fd, engine)
    control = None
    try:
        from dccfs.control import ControlServer
        control = ControlServer(backing, mountpoint, ops, engine, req)
    except ImportError:
        control = None
    pyfuse3.init(ops, mountpoint, fuse_options(req))
    unmount = True
    try:
        on_mounted()
        trio.run(_main, ops, engine, control)
    except BaseException:
        log.exception("the FUSE main loop failed")
        raise
    finally:
        try:
            pyfuse3.close(unmount=unmount)
        finally:
            if control is not None:
                control.close()
            ops.inodes.close_all()
