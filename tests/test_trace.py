"""dccfs.trace: oracleGeneral/CSV round trips, next-access filling, thread-safe writer."""
import threading

import numpy as np
import pytest

from dccfs.trace import (TraceWriter, fill_next_access, next_access_vtimes, read_oracle_general,
                         read_trace)


def test_binary_round_trip_and_next_access(tmp_path):
    path = tmp_path / "t.oracleGeneral.bin"
    requests = [(1.9, 10, 4096, False), (2.0, 11, 100, True), (3.5, 10, 4096, False),
                (4.0, (1 << 40) + 5, 262144, False)]
    with TraceWriter(path) as writer:
        for request in requests:
            writer.record(*request)
    raw = read_oracle_general(path)
    assert raw.itemsize == 24 and len(raw) == 4
    assert raw["next_access_vtime"].tolist() == [-1, -1, -1, -1]  # the mount cannot know
    # The binary format has no op and stores whole seconds.
    assert list(read_trace(path)) == [(float(int(t)), o, s, False) for t, o, s, _ in requests]
    fill_next_access(path)
    # 1-based index of the next request to the same object, as libCacheSim writes it.
    assert read_oracle_general(path)["next_access_vtime"].tolist() == [3, -1, -1, -1]


def test_csv_round_trip_keeps_writes(tmp_path):
    path = tmp_path / "t.csv"
    writer = TraceWriter(path)
    writer.record(0.25, 7, 262144, True)
    writer.record(0.5, 7, 262144, False)
    writer.close()
    writer.close()  # idempotent
    assert path.read_text().splitlines()[0] == "time,obj_id,size,op"
    assert list(read_trace(path)) == [(0.25, 7, 262144, True), (0.5, 7, 262144, False)]
    with pytest.raises(ValueError):
        writer.record(1.0, 1, 1, False)


def test_csv_rejects_bad_op(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,obj_id,size,op\n1.0,2,3,x\n")
    with pytest.raises(ValueError):
        list(read_trace(path))


def test_next_access_matches_libcachesim_sample():
    from pathlib import Path
    records = read_oracle_general(Path(__file__).parent / "data" / "cloudPhysicsIO.oracleGeneral.bin")
    assert np.array_equal(next_access_vtimes(records["obj_id"]), records["next_access_vtime"])


def test_writer_is_thread_safe(tmp_path):
    path = tmp_path / "mt.oracleGeneral.bin"
    writer = TraceWriter(path)

    def worker(thread_id):
        for i in range(5000):
            writer.record(i, thread_id * 100_000 + i, 4096, False)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.flush()
    writer.close()
    ids = read_oracle_general(path)["obj_id"]
    assert len(ids) == 20_000 and len(set(ids.tolist())) == 20_000


@pytest.mark.mount
def test_a_trace_that_cannot_be_written_never_fails_reads(make_mount):
    """Recording is advice: a trace file on a full disk (here /dev/full) used to turn every
    read into ENOSPC once 64 KiB of records were buffered, since the failed buffer flush
    raised in the read's own request, and again at every later record."""
    import mmap
    import os

    from dccfs.control_socket import request
    m = make_mount()
    payload = os.urandom(1 << 20)
    (m.mnt / "f").write_bytes(payload)
    assert request(str(m.mnt), {"cmd": "tune", "set": {"trace": "/dev/full"}})["ok"]
    buf = mmap.mmap(-1, 4096)
    fd = os.open(m.mnt / "f", os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(4000):  # one READ and one trace record each; 24 bytes a record
            offset = (i * 4096) % len(payload)
            assert os.preadv(fd, [buf], offset) == 4096
            assert buf[:] == payload[offset:offset + 4096]
    finally:
        os.close(fd)
        buf.close()
    assert (m.mnt / "f").read_bytes() == payload
    assert request(str(m.mnt), {"cmd": "stats"})["cache"]["trace"] == "off"
