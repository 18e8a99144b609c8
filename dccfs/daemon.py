"""The daemon's trio main loop: FUSE session, background nursery, signals and clean shutdown."""
from __future__ import annotations

import logging
import os
import signal
import tempfile

import pyfuse3
import trio

from dccfs.engine import Engine
from dccfs.fs import DccfsOperations
from dccfs.memory import HeapTrimmer, tune_malloc
from dccfs.mountinfo import read_mountinfo

log = logging.getLogger(__name__)

# libfuse 3.14 negotiates max_readahead = 128 KiB, so a sequential reader arrives as
# 128 KiB READs, eight per 1 MiB chunk. The mount's bdi read_ahead_kb can be raised
# (root only), but only after the INIT reply: the kernel sets it to the negotiated
# value while processing that reply. docs/performance.md has the measurements.
READ_AHEAD_KB = 1024

# How long SIGTERM waits for the kernel to hand over the writes it still caches.
KERNEL_FLUSH_S = 30.0


def raise_read_ahead(mountpoint: str, kilobytes: int = READ_AHEAD_KB) -> None:
    """Set the FUSE connection's read_ahead_kb; found through mountinfo, because a stat of
    the mountpoint (realpath included) would wait for this very daemon. mountpoint is
    already resolved by the caller."""
    try:
        for entry in read_mountinfo():
            if entry.mountpoint == mountpoint:
                path = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
                with open(path, "w") as knob:
                    knob.write(str(kilobytes))
                log.info("read-ahead of %s set to %d KiB", mountpoint, kilobytes)
                return
    except (OSError, ValueError) as exc:  # ValueError: a line of the table we cannot parse
        log.info("kept the kernel's read-ahead (%s)", exc)
        return
    log.warning("kept the kernel's read-ahead: %s is not in /proc/self/mountinfo", mountpoint)


def fsname_option(backing: str) -> str:
    """The backing path as an fsname value: libfuse splits its options at commas and
    takes a backslash as an escape, so both are escaped (a path with a comma failed to
    mount otherwise). The kernel shows the unescaped path in mountinfo."""
    return backing.replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(req) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"default_permissions", f"fsname={fsname_option(req.backing)}", "subtype=dccfs"}
    for opt in req.fuse_options:
        if opt in ("debug", "nonempty"):
            continue
        options.add(opt)
    return options


async def _raise_read_ahead_after_init(ops: DccfsOperations, mountpoint: str) -> None:
    await ops.fuse_ready.wait()
    await trio.to_thread.run_sync(raise_read_ahead, mountpoint)


async def _main(ops: DccfsOperations, engine: Engine, control, mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        engine.nursery = nursery
        engine.trio_token = trio.lowlevel.current_trio_token()
        if engine.pins is not None and engine.config.delta_unpin_rewrite:
            engine.pins.offer_orphans()
        nursery.start_soon(_stop_on_signals, ops, mountpoint)
        if control is not None:
            nursery.start_soon(control.serve)
        nursery.start_soon(_raise_read_ahead_after_init, ops, mountpoint)
        trimmer = HeapTrimmer(lambda: engine.cache.used + engine.dirty.used, engine.stats,
                              budget_bytes=lambda: engine.cache.capacity + engine.dirty.limit,
                              shed=engine.cache.shed)
        nursery.start_soon(trimmer.run, engine.io_limiter)
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
        except* ConnectionAbortedError as aborted:
            # The kernel ended the connection (an abort through fusectl sets ECONNABORTED; twice this
            # came at a test's plain unmount, cause unknown): the mount is gone either way, and what is
            # open is committed below as at any unmount.
            log.warning("the kernel aborted the FUSE connection (%s); committing open files and exiting",
                        aborted.exceptions[0])
        finally:
            with trio.CancelScope(shield=True):
                await ops.shutdown()
        nursery.cancel_scope.cancel()


async def _stop_on_signals(ops: DccfsOperations, mountpoint: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: committing open files and stopping", signum)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(KERNEL_FLUSH_S):
                    await trio.to_thread.run_sync(_fsync_open_files, open_file_paths(ops, mountpoint),
                                                  abandon_on_cancel=True)
                await ops.shutdown()
            pyfuse3.terminate()
            return


def open_file_paths(ops: DccfsOperations, mountpoint: str) -> list[str]:
    """The current paths through the mount of the open files a shutdown must flush: every
    container, and every plain file open for writing."""
    from dccfs.handles import relpath_of
    paths = []
    for number in sorted(ops.handles.open_inodes()):
        try:
            rel = relpath_of(ops.inodes.get(number), ops.backing_root)
        except OSError:  # forgotten meanwhile
            continue
        if not rel.startswith(("<", "/")):  # an unlinked or unreachable file has no path
            paths.append(os.path.join(mountpoint, rel))
    return paths


def _fsync_open_files(paths: list[str]) -> None:
    """With the writeback cache the kernel may still hold dirty pages of an open file, which
    the daemon has never seen. An fsync through the mount makes the kernel send them (this
    daemon's main loop serves them meanwhile) and wait for the replies, and commits the
    file; the shutdown commit after it would otherwise miss them."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            log.info("%s: not flushed before stopping: %s", path, exc)
            continue
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("%s: flushing the kernel's cached writes failed: %s", path, exc)
        finally:
            os.close(fd)


def init_fuse(ops, mountpoint: str, options) -> None:
    """pyfuse3.init, keeping what libfuse writes to stderr for the error it raises: a daemon's
    stderr is /dev/null, and `-o bogus` failed with only "fuse_session_new() failed" while the
    reason ("fuse: unknown option(s): `-o bogus'") went nowhere (found by review F)."""
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as said:
            os.dup2(said.fileno(), 2)
            try:
                pyfuse3.init(ops, mountpoint, options)
            except RuntimeError as exc:
                said.seek(0)
                reason = said.read().decode(errors="replace").strip()
                if reason:
                    raise RuntimeError(f"{reason} ({exc})") from None
                raise
            finally:
                os.dup2(saved, 2)
            said.seek(0)
            for line in said.read().decode(errors="replace").splitlines():
                log.warning("libfuse: %s", line)
    finally:
        os.close(saved)


def serve(backing: str, mountpoint: str, req, on_mounted) -> None:
    tune_malloc()
    engine = Engine(req.config, backing)
    try:
        _serve(engine, backing, mountpoint, req, on_mounted)
    finally:
        engine.end_warm_up()


def _serve(engine: Engine, backing: str, mountpoint: str, req, on_mounted) -> None:
    root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    ops = DccfsOperations(backing, root_fd, engine)
    control = None
    try:
        from dccfs.control import ControlServer
        control = ControlServer(backing, mountpoint, ops, engine, req)
    except ImportError:
        control = None
    except OSError as exc:
        # No usable socket directory (another user made /tmp/dccfs-UID first, for one): the
        # files are served all the same (found by review: the mount failed).
        log.warning("no control socket, so no stats and tune for this mount: %s", exc)
        control = None
    init_fuse(ops, mountpoint, fuse_options(req))
    unmount = True
    try:
        engine.start_warm_up()
        on_mounted()
        trio.run(_main, ops, engine, control, mountpoint)
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
