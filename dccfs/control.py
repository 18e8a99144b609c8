"""The control channel of a live mount: a Unix socket for stats and tune, checked by peer uid.

Protocol: the client sends one JSON object per line and gets one JSON object back.
  {"cmd": "stats"}                      -> {"ok": true, "stats": {...}, "cache": {...}}
  {"cmd": "tune", "set": {"key": val}}  -> {"ok": true, "cache": {...}}
  {"cmd": "files", "path": "rel/path"}  -> {"ok": true, "files": [...]}
Only root and the user who mounted may connect (SO_PEERCRED), whatever the socket mode.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import asdict, replace

import trio

from dccfs.config import ConfigError, check_cache_value
from dccfs.offline_pins import pinned_space
from dccfs.mount import MountError
from dccfs.own_files import STATE_DIR, is_within, own_file_problem
from dccfs.control_socket import device_socket_name, socket_path
from dccfs.memory import memory_limit
from dccfs.mountinfo import read_mountinfo

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 16
MAX_CONNECTIONS = 32  # served at once; more wait in the listen backlog
REQUEST_TIMEOUT_S = 10.0  # to send a whole request line
ACCEPT_RETRY_S = 0.5  # after accept() failed (out of descriptors): retry, never give up
REFUSAL_LOG_EVERY_S = 60.0  # one warning per minute for refused peers, with their count
REFUSED_DRAIN_S = 1.0  # how long a refused peer's request is read (and dropped) after the reply
TUNABLE = ("policy", "t0_bytes", "dirty_bytes", "readahead_chunks", "write_admit", "trace")
# How long a tune waits for its trace file to open; less than the client's 10 s, so that the client
# gets the reason. A path on a file system that does not answer (a hung NFS server, a stopped FUSE
# daemon) held the tune lock for as long, and every later tune waited behind it (found by review).
TRACE_OPEN_TIMEOUT_S = 5.0


def peer_uid(sock) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlServer:
    def __init__(self, backing: str, mountpoint: str, ops, engine, req):
        self.ops = ops
        self.engine = engine
        self.owner_uid = os.getuid()
        self.mountpoint = os.path.realpath(mountpoint)
        self.path = socket_path(mountpoint, for_server=True)
        self._sock = None
        self._sock_ino: int | None = None
        self.device_path: str | None = None
        self.device: str | None = None  # the mount's "major:minor", once mounted
        # One tune at a time: two swapping traces at once each closed the other's old writer, and
        # the one swapped out unseen was never closed (found by review: leaked writers).
        self._tuning = trio.Lock()
        self._refused = 0
        self._refusal_logged_at = float("-inf")
        if req.trace:
            self.set_trace(self.open_trace(req.trace))
        if req.metrics:
            from dccfs.metrics import serve_metrics
            try:
                serve_metrics(req.metrics, engine)
            except ValueError as exc:
                raise MountError(str(exc)) from None

    async def serve(self) -> None:
        try:
            await self._serve()
        except Exception:
            # Without its control channel the mount still serves files.
            log.exception("the control socket %s failed; stats and tune are unavailable", self.path)

    async def _serve(self) -> None:
        # Bound and listening under a temporary name, then renamed into place: a client
        # that finds the socket never connects between bind and listen (ECONNREFUSED).
        staging = f"{self.path}.{os.getpid()}.tmp"
        if os.path.lexists(staging):
            os.unlink(staging)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(staging)
        os.chmod(staging, 0o666)  # access is decided by peer uid, not by the mode
        sock.listen(16)
        os.rename(staging, self.path)
        self._sock = sock
        self._sock_ino = os.stat(self.path).st_ino
        await trio.to_thread.run_sync(self._name_by_device)
        slots = trio.Semaphore(MAX_CONNECTIONS)
        failing = False
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:
                    slots.release()
                    # Out of descriptors (EMFILE), for one: a flood of connections must not
                    # leave the mount without stats and tune until a remount (found by review).
                    if not failing:
                        log.warning("control socket: accept failed (%s); retrying", exc.strerror or exc)
                        failing = True
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                failing = False
                nursery.start_soon(self._handle_guarded, conn, slots)

    async def _handle_guarded(self, conn, slots) -> None:
        held = True

        def free_slot() -> None:
            nonlocal held
            if held:
                held = False
                slots.release()

        # A broken client must never take the mount down with it.
        try:
            await self._handle(conn, free_slot)
        except Exception:
            log.exception("control connection failed")
        finally:
            free_slot()

    def _note_refusal(self, uid: int) -> None:
        """Warn about refused peers at most once a minute: any local user can connect."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning("control: refused uid %d (only root and uid %d may control this mount; %d refused "
                        "since the last warning)", uid, self.owner_uid, self._refused)
            self._refused = 0
            self._refusal_logged_at = now

    async def _handle(self, conn, free_slot) -> None:
        refused = False
        with conn:
            try:
                uid = peer_uid(conn)
                if uid not in (0, self.owner_uid):
                    # Answered before reading anything: another user's connections hold no slot
                    # for longer than this reply takes.
                    refused = True
                    self._note_refusal(uid)
                    reply = {"ok": False, "error": f"permission denied: uid {uid} is neither root "
                                                   f"nor the mount owner (uid {self.owner_uid})"}
                else:
                    data = b""
                    with trio.move_on_after(REQUEST_TIMEOUT_S):
                        while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                            more = await conn.recv(4096)
                            if not more:
                                break
                            data += more
                    if not data:
                        return  # a probe for the daemon's pid (peer_pid): nothing to answer
                    if not data.endswith(b"\n") and len(data) >= MAX_REQUEST:
                        raise ValueError(f"the request is longer than {MAX_REQUEST >> 10} KiB")
                    reply = await self._serve_request(json.loads(data))
            except (ValueError, ConfigError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except OSError as exc:  # a trace file that cannot be opened, for one
                reply = {"ok": False, "error": f"{exc.filename or 'control'}: {exc.strerror or exc}"}
            except Exception as exc:
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {exc}"}
            out = memoryview(json.dumps(reply).encode() + b"\n")
            try:
                while out:
                    sent = await conn.send(out)
                    out = out[sent:]
                if refused:
                    # Closed with the client's request unread, the socket would make the client's
                    # send fail (EPIPE) or lose the reply (ECONNRESET): read it, briefly, out of slot.
                    free_slot()
                    with trio.move_on_after(REFUSED_DRAIN_S):
                        drained = 0
                        while drained < MAX_REQUEST and (more := await conn.recv(4096)):
                            drained += len(more)
            except OSError:
                pass

    async def _serve_request(self, request) -> dict:
        if not isinstance(request, dict):
            raise ValueError("a request is a JSON object, e.g. {\"cmd\": \"stats\"}")
        if request.get("cmd") in ("files", "stats"):
            # They read the disk (every chunk header of the files; the pinned bases): keep that
            # off the FUSE thread.
            return await trio.to_thread.run_sync(self.dispatch, request)
        if request.get("cmd") == "tune":
            async with self._tuning:
                return await self._tune(request)
        return self.dispatch(request)

    async def _tune(self, request) -> dict:
        """A tune request: checked, then its trace set (on worker threads), then the rest."""
        changes = request.get("set") or {}
        if not isinstance(changes, dict):
            raise ValueError("tune's 'set' is a JSON object of key: value")
        new_cache = self.checked(changes)  # before the trace file is touched (found by review)
        target = str(changes.get("trace", "off"))
        # Opened, emptied and the old one closed in a worker: the path may be slow, or lead into
        # this very mount, whose requests the trio thread must go on serving meanwhile (found by
        # review: a hang).
        trace = None if _trace_off(target) else await self._open_trace_in_time(target)
        if "trace" in changes:
            try:
                await trio.to_thread.run_sync(self.set_trace, trace)
            except BaseException:
                if trace is not None:
                    trace.discard()
                raise
        return self.tune(changes, new_cache)

    async def _open_trace_in_time(self, target: str):
        """open_trace on a worker thread, given up after TRACE_OPEN_TIMEOUT_S; a writer the
        abandoned thread opens later is discarded there."""
        lock, late = threading.Lock(), {"abandoned": False, "trace": None}

        def open_or_discard():
            trace = self.open_trace(target)
            with lock:
                if late["abandoned"]:
                    trace.discard()
                    log.info("trace file %s opened after its tune gave up on it: closed", target)
                    return None
                late["trace"] = trace
            return trace

        with trio.move_on_after(TRACE_OPEN_TIMEOUT_S):
            return await trio.to_thread.run_sync(open_or_discard, abandon_on_cancel=True)
        with lock:
            late["abandoned"] = True
            opened = late["trace"]
        if opened is not None:  # opened just as the wait ended
            opened.discard()
        raise ValueError(f"the trace file {target} did not open within {TRACE_OPEN_TIMEOUT_S:g} s: its file "
                         "system does not answer; nothing was changed")

    def dispatch(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "stats":
            stats = self.engine.stats.snapshot()
            stats["delta_bases"] = pinned_space(self.ops.backing_root)
            return {"ok": True, "stats": stats, "cache": self.cache_settings()}
        if cmd == "files":
            return {"ok": True, "files": self.describe_files(request.get("path") or "")}
        raise ValueError(f"unknown command {cmd!r} (stats, tune, files)")

    def describe_files(self, relpath: str) -> list[dict]:
        from dccfs.inspect import describe_tree
        root = os.path.realpath(os.path.join(self.ops.backing_root, relpath.lstrip("/")))
        if not is_within(root, self.ops.backing_root):
            raise ValueError(f"{relpath} is outside the mount")
        if is_within(root, os.path.join(self.ops.backing_root, STATE_DIR)):
            raise ValueError(f"{relpath} is dccfs's own state, not a file of the mount")
        rows = describe_tree(root)
        for row in rows:
            row["path"] = os.path.relpath(row["path"], self.ops.backing_root)
        return rows

    def cache_settings(self) -> dict:
        settings = asdict(self.engine.config.cache)
        settings["trace"] = getattr(self.engine.trace, "path", "off")
        return settings

    def checked(self, changes: dict):
        """The cache settings after changes, every key and value checked (ConfigError)."""
        unknown = [k for k in changes if k not in TUNABLE]
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} (tunable: {', '.join(TUNABLE)})")
        checked = {k: check_cache_value(k, v, f"tune {k}", from_text=True) for k, v in changes.items() if k != "trace"}
        new_cache = replace(self.engine.config.cache, **checked)
        tuned = replace(self.engine.config, cache=new_cache)
        tuned.check_t0_fits("tune t0_bytes")
        if "t0_bytes" in checked or "dirty_bytes" in checked:
            tuned.check_budgets_fit("tune", memory_limit())
        return new_cache

    def tune(self, changes: dict, new_cache) -> dict:
        """Apply checked changes (checked(), under the tune lock; the trace, if named, is set already)."""
        engine = self.engine
        cache = engine.config.cache
        if new_cache.policy != cache.policy or new_cache.t0_bytes != cache.t0_bytes \
                or new_cache.write_admit != cache.write_admit:
            engine.cache.reconfigure(new_cache.policy, new_cache.t0_bytes,
                                     new_cache.write_admit if new_cache.write_admit != cache.write_admit else None)
        if new_cache.dirty_bytes != cache.dirty_bytes:
            engine.dirty.set_limit(new_cache.dirty_bytes)
        engine.config = replace(engine.config, cache=new_cache)
        log.info("tuned: %s", changes)
        return {"ok": True, "cache": self.cache_settings()}

    def open_trace(self, target: str):
        """A TraceWriter for target, not yet emptied (set_trace does that once the trace being
        recorded is closed: it may be the same file). Blocking: called in a worker thread, or
        before the mount starts."""
        from dccfs.trace import TraceWriter
        if not os.path.isabs(target):
            raise ValueError(f"the trace file must be an absolute path, got {target!r}")
        problem = own_file_problem("trace file", target, self.ops.backing_root, self.mountpoint)
        if problem is None and self.device is not None:
            # A bind mount of this mount, or of a file in it, passes the path checks (found by review:
            # the daemon then waited on itself, past kill -9).
            for candidate in (target, os.path.dirname(os.path.realpath(target))):
                try:
                    st = os.stat(candidate)
                except FileNotFoundError:
                    continue
                if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" == self.device:
                    problem = f"the trace file {target} is on this mount (through another path to it)"
                break
        if problem:
            raise ValueError(problem)
        return TraceWriter(target, truncate=False)

    def set_trace(self, new) -> None:
        """Replace the trace being recorded by new (from open_trace; None stops recording)."""
        from dccfs.engine import close_trace_quietly
        if self.engine.trace is not None:
            old, self.engine.trace = self.engine.trace, None
            close_trace_quietly(old)
        if new is not None:
            # Emptied only now: a restart on the same file would otherwise get the old writer's
            # last buffer written over it (found by review: thousands of zero records).
            new.start()
            self.engine.trace = new
            log.info("recording the chunk access trace to %s", new.path)

    def _name_by_device(self) -> None:
        """Link the socket under the mount's device name too (device_socket_path): the mount is in
        the table by now, since the control socket starts after the FUSE mount."""
        entry = next((e for e in read_mountinfo() if e.mountpoint == self.mountpoint), None)
        if entry is None:
            log.warning("%s is not in the mount table: its control socket has no device name", self.mountpoint)
            return
        self.device = entry.device
        path = os.path.join(os.path.dirname(self.path), device_socket_name(entry.device))
        staging = f"{path}.{os.getpid()}.tmp"
        try:
            if os.path.lexists(staging):
                os.unlink(staging)
            os.link(self.path, staging)
            os.rename(staging, path)  # over a stale one of a killed daemon whose device number this is now
            self.device_path = path
        except OSError as exc:
            log.warning("control socket: no device name %s: %s", path, exc.strerror or exc)

    def close(self) -> None:
        from dccfs.engine import close_trace_quietly
        if self.engine.trace is not None:
            close_trace_quietly(self.engine.trace)
        for path in (self.path, self.device_path):
            try:
                # Only our own socket: a daemon outliving a lazy unmount must not remove the socket
                # of the mount that came after it (found by review).
                if path and self._sock_ino is not None and os.stat(path).st_ino == self._sock_ino:
                    os.unlink(path)
            except OSError:
                pass


def _trace_off(target: str) -> bool:
    return target in ("off", "", "none")
