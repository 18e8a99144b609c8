"""Chunk access traces: libCacheSim oracleGeneral binary and CSV writer/reader."""
from __future__ import annotations

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


def is_csv_path(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".csv")


class TraceWriter:
    """Appends chunk requests to a trace file; thread-safe, buffered, O(1) per record.

    The format follows the file name: '*.csv' writes CSV, anything else oracleGeneral
    binary with next_access_vtime = -1 (run fill_next_access() offline to set it).
    """

    def __init__(self, path: str | os.PathLike, *, csv_format: bool | None = None, truncate: bool = True):
        """Open (create) the trace file; truncate=False leaves emptying it to start(), for a
        caller that must first close another writer of the same file."""
        self.path = os.fspath(path)
        self.csv_format = is_csv_path(path) if csv_format is None else csv_format
        self._lock = threading.Lock()
        self._buffer = bytearray()
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
        self._file = os.fdopen(fd, "wb")
        self.records = 0
        if self.csv_format:
            self._buffer += (",".join(CSV_HEADER) + "\n").encode()

    def start(self) -> None:
        """Empty the file opened with truncate=False (nothing has been recorded yet)."""
        with self._lock:
            self._file.flush()
            if stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):  # (not /dev/null, /dev/full)
                os.ftruncate(self._file.fileno(), 0)
                self._file.seek(0)

    def record(self, time_s: float, obj_id: int, size: int, is_write: bool) -> None:
        """Append one request; the disk write happens only when 64 KiB are buffered."""
        if self.csv_format:
            line = f"{time_s:.6f},{obj_id},{size},{'w' if is_write else 'r'}\n".encode()
        else:
            # u32 seconds as libCacheSim expects; clamped so a bad clock cannot raise here.
            line = _ORACLE_RECORD.pack(min(max(int(time_s), 0), 0xFFFFFFFF), obj_id, size, -1)
        with self._lock:
            if self._file is None:
                raise ValueError("TraceWriter is closed")
            self._buffer += line
            self.records += 1
            if len(self._buffer) >= _FLUSH_BYTES:
                self._write_buffer()

    def _write_buffer(self) -> None:
        self._write_buffer_to(self._file)

    def _write_buffer_to(self, file) -> None:
        file.write(self._buffer)
        self._buffer.clear()

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._write_buffer()
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            file, self._file = self._file, None
            try:
                self._write_buffer_to(file)
            finally:
                self._buffer.clear()
                file.close()  # closes even when its own flush raises

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
