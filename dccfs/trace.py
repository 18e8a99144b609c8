"""Chunk access traces: libCacheSim oracleGeneral binary and CSV writer/reader."""
from __future__ import annotations

import collections
import csv
import errno
import io
import logging
import os
import stat
import struct
import threading
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)

# libCacheSim oracleGeneral: per request u32 timestamp (s), u64 obj_id, u32 obj_size (bytes),
# i64 next_access_vtime (1-based index of the next request to the same object, -1 = never).
ORACLE_GENERAL_DTYPE = np.dtype([("time", "<u4"), ("obj_id", "<u8"), ("size", "<u4"),
                                 ("next_access_vtime", "<i8")])
_ORACLE_RECORD = struct.Struct("<IQIq")
# CSV alternative: a header line, then one request per line, e.g. "12.503,4711,262144,r".
# time is seconds (float), op is r (read) or w (write). The binary format has no op field,
# so only CSV traces preserve is_write.
CSV_HEADER = ("time", "obj_id", "size", "op")
_FLUSH_BYTES = 1 << 16
# Buffers waiting for the writer thread: past 4 MiB a trace file that cannot keep up loses records
# (counted, and logged at close) rather than growing the daemon.
_MAX_PENDING = 64
# How long close() waits for the writer thread: a hung trace file (a stopped FUSE daemon, an NFS
# server gone) must not hold up an unmount (found by review: the daemon kept its mount lock).
CLOSE_WAIT_S = 10.0


def is_csv_path(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".csv")


class TraceWriter:
    """Appends chunk requests to a trace file; thread-safe, buffered, O(1) per record.

    The format follows the file name: '*.csv' writes CSV, anything else oracleGeneral
    binary with next_access_vtime = -1 (run fill_next_access() offline to set it).
    Full buffers are written by a thread of the writer's own: a slow or hung trace file
    (NFS, another FUSE mount) never holds up the requests that record into it.
    """

    def __init__(self, path: str | os.PathLike, *, csv_format: bool | None = None, truncate: bool = True):
        """Open (create) the trace file; truncate=False leaves emptying it to start(), for a
        caller that must first close another writer of the same file."""
        self.path = os.fspath(path)
        self.csv_format = is_csv_path(path) if csv_format is None else csv_format
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # for buffers handed over, and written
        self._buffer = bytearray()
        self._buffered = 0  # records in _buffer
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()  # (bytes, records)
        self._writing = False
        self._closing = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._abandoned = False  # close() stopped waiting: the thread closes the file when it can
        # 0644 whatever the umask: the daemon runs with umask 0 (the kernel applies the
        # caller's umask to the files created through the mount). O_NONBLOCK: a FIFO without
        # a reader fails (ENXIO) instead of blocking the daemon until one comes.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
                     | (os.O_TRUNC if truncate else 0), 0o644)
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "a trace must go to a file, not a pipe or socket", self.path)
        os.set_blocking(fd, True)
        self._fd: int | None = fd
        self.records = 0
        self.dropped = 0  # records lost because the file could not keep up
        if self.csv_format:
            self._buffer += (",".join(CSV_HEADER) + "\n").encode()

    def start(self) -> None:
        """Empty the file opened with truncate=False (nothing has been recorded yet)."""
        with self._lock:
            if stat.S_ISREG(os.fstat(self._fd).st_mode):  # (not /dev/null, /dev/full)
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)

    def record(self, time_s: float, obj_id: int, size: int, is_write: bool) -> None:
        """Append one request; every 64 KiB the writer thread gets the buffer. Raises the
        OSError that stopped the writer thread, if one did."""
        if self.csv_format:
            line = f"{time_s:.6f},{obj_id},{size},{'w' if is_write else 'r'}\n".encode()
        else:
            # u32 seconds as libCacheSim expects; clamped so a bad clock cannot raise here.
            line = _ORACLE_RECORD.pack(min(max(int(time_s), 0), 0xFFFFFFFF), obj_id, size, -1)
        with self._lock:
            if self._fd is None or self._closing:
                raise ValueError("TraceWriter is closed")
            if self._error is not None:
                raise OSError(self._error.errno, self._error.strerror, self.path)
            self._buffer += line
            self._buffered += 1
            self.records += 1
            if len(self._buffer) >= _FLUSH_BYTES:
                self._hand_over(bounded=True)

    def _hand_over(self, bounded: bool) -> None:
        """Give the buffer to the writer thread (lock held). Bounded: past _MAX_PENDING buffers
        waiting, its records are dropped and counted, so a stalled file costs records, not RSS."""
        if not self._buffer:
            return
        if bounded and len(self._pending) >= _MAX_PENDING:
            self.dropped += self._buffered
        else:
            self._pending.append((bytes(self._buffer), self._buffered))
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_pending, args=(self._fd,),
                                                name="dccfs-trace", daemon=True)
                self._thread.start()
            self._changed.notify_all()
        self._buffer.clear()
        self._buffered = 0

    def _write_pending(self, fd: int) -> None:
        """The writer thread: writes the buffers handed over, in order, until closed or a write fails."""
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    if self._abandoned:
                        os.close(fd)
                    return
                (block, _), self._writing = self._pending.popleft(), True
            try:
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as exc:
                with self._lock:
                    self._error = exc
                    self._pending.clear()
                    self._writing = False
                    self._changed.notify_all()
                    if self._abandoned:
                        os.close(fd)
                return
            with self._lock:
                self._writing = False
                self._changed.notify_all()

    def flush(self) -> None:
        """Write everything recorded so far (waits for the writer thread)."""
        with self._lock:
            if self._fd is None:
                return
            self._hand_over(bounded=False)
            while (self._pending or self._writing) and self._error is None:
                self._changed.wait()
            if self._error is not None:
                raise OSError(self._error.errno, self._error.strerror, self.path)

    def discard(self) -> None:
        """Close without writing what is buffered (a trace never started: not even its CSV header)."""
        with self._lock:
            self._buffer.clear()
            self._buffered = 0
        self.close()

    def close(self) -> None:
        """Write what is left, stop the writer thread and close the file; raises a write's OSError
        (the file is closed all the same). Idempotent."""
        with self._lock:
            if self._fd is None or self._closing:
                return
            self._hand_over(bounded=False)
            self._closing = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(CLOSE_WAIT_S)
            with self._lock:
                if thread.is_alive():
                    self.dropped += sum(records for _, records in self._pending)
                    self._pending.clear()
                    self._abandoned = True
                    self._fd = None
                    log.warning("%s: the trace file took no write for %.0f s; its last records are dropped, "
                                "and it is closed once its write returns", self.path, CLOSE_WAIT_S)
                    return
        with self._lock:
            fd, self._fd = self._fd, None
            error = self._error
        os.close(fd)
        if self.dropped:
            log.warning("%s: %d records of the trace were dropped: the file could not keep up",
                        self.path, self.dropped)
        if error is not None:
            raise OSError(error.errno, error.strerror, self.path)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_oracle_general(path: str | os.PathLike) -> np.ndarray:
    """The whole binary trace as a structured array with ORACLE_GENERAL_DTYPE fields."""
    return np.fromfile(os.fspath(path), dtype=ORACLE_GENERAL_DTYPE)


def _read_csv(path: str) -> Iterator[tuple[float, int, int, bool]]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if not row or row[0] == "time":
                continue
            op = row[3].strip().lower() if len(row) > 3 else "r"
            if op not in ("r", "w"):
                raise ValueError(f"{path}: op must be r or w, got {row[3]!r}")
            yield float(row[0]), int(row[1]), int(row[2]), op == "w"


def read_trace(path: str | os.PathLike) -> Iterator[tuple[float, int, int, bool]]:
    """Yield (time_s, obj_id, size, is_write) from a CSV or oracleGeneral trace.

    Binary traces carry no op, so is_write is always False for them.
    """
    path = os.fspath(path)
    if is_csv_path(path):
        yield from _read_csv(path)
        return
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_ORACLE_RECORD.size * 65536)
            if not block:
                return
            if len(block) % _ORACLE_RECORD.size:
                raise ValueError(f"{path}: truncated oracleGeneral record")
            records = np.frombuffer(block, dtype=ORACLE_GENERAL_DTYPE)
            for t, obj_id, size in zip(records["time"].tolist(), records["obj_id"].tolist(),
                                       records["size"].tolist()):
                yield float(t), obj_id, size, False


def next_access_vtimes(obj_ids: np.ndarray) -> np.ndarray:
    """libCacheSim's next_access_vtime for each request: 1-based index of the next request
    to the same object, or -1. Vectorised: a stable sort groups each object's requests."""
    obj_ids = np.asarray(obj_ids)
    order = np.argsort(obj_ids, kind="stable")
    result = np.full(len(obj_ids), -1, dtype=np.int64)
    if len(order) > 1:
        same = obj_ids[order[:-1]] == obj_ids[order[1:]]
        result[order[:-1][same]] = order[1:][same] + 1
    return result


def fill_next_access(path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> None:
    """Offline pass that sets next_access_vtime in an oracleGeneral trace (in place by default)."""
    records = read_oracle_general(path)
    records["next_access_vtime"] = next_access_vtimes(records["obj_id"])
    records.tofile(os.fspath(out_path if out_path is not None else path))


def write_oracle_general(path: str | os.PathLike, times, obj_ids, sizes) -> None:
    """Write a complete trace from arrays, with next_access_vtime filled (for generators)."""
    records = np.zeros(len(obj_ids), dtype=ORACLE_GENERAL_DTYPE)
    records["time"] = np.asarray(times, dtype=np.uint32)
    records["obj_id"] = obj_ids
    records["size"] = sizes
    records["next_access_vtime"] = next_access_vtimes(records["obj_id"])
    records.tofile(os.fspath(path))


def write_csv(path: str | os.PathLike, times, obj_ids, sizes, is_write) -> None:
    """Write a complete CSV trace from arrays (the op column keeps reads and writes apart)."""
    out = io.StringIO()
    out.write(",".join(CSV_HEADER) + "\n")
    for t, o, s, w in zip(np.asarray(times).tolist(), np.asarray(obj_ids).tolist(),
                          np.asarray(sizes).tolist(), np.asarray(is_write).tolist()):
        out.write(f"{t:.6f},{o},{s},{'w' if w else 'r'}\n")
    with open(path, "w") as handle:
        handle.write(out.getvalue())
