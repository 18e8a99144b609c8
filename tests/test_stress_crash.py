"""Crash matrix: kill -9 the daemon at random points of three workloads, then check everything.

A forked client runs one workload through the mount and journals, outside the mount,
what it is about to do ("intent") and what returned ("done"). The test sleeps a random
0.05-1.5 s, kills the daemon with SIGKILL, remounts, and checks against the journal:

- sequential: one file written in 1 MiB blocks with an fsync every few blocks; after the
  crash it is a prefix of the stream at least as long as the last completed fsync;
- random: random pwrite/ftruncate over a base file with an fsync after every few ops;
  after the crash the file equals the state at the last completed fsync or a state at a
  later journaled op (a commit can only cover whole requests), never a mix;
- renames: small self-describing files written to a temporary name, fsynced, closed
  and renamed into place, plus renames and unlinks among the names; after the crash the
  directory equals the journal's model with or without the one in-flight operation.

Every file found after a crash is recorded and must be bit-exact at every later kill
point. After each check the mount is stopped and `dccfs fsck` must pass (with --repair
if the crash left a torn tail, and then again without). make test runs three kill points
(one per workload); make stress runs 60 (DCCFS_CRASH_POINTS scales it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.mount

BLOCK = 1 << 20
STRESS_POINTS = int(os.environ.get("DCCFS_CRASH_POINTS", "60"))
CLIENT_MAX_S = 20
SEQ_MAX_BLOCKS = 48


# -- deterministic data --------------------------------------------------------------------

def block_data(seed: int, i: int, n: int = BLOCK) -> bytes:
    rng = random.Random(seed * 1_000_003 + i)
    if i % 3 == 2:
        return bytes([rng.randrange(256)]) * n  # compressible blocks too
    return rng.randbytes(n)


MAGIC = b"DCRS"
HEADER = struct.Struct("<4sQ32s")


def small_content(seed: int, i: int) -> bytes:
    rng = random.Random(seed * 7_919 + i)
    body = rng.randbytes(rng.randint(0, 40_000))
    return HEADER.pack(MAGIC, len(body), hashlib.sha256(body).digest()) + body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- client workloads (run in a forked child; journal to a file outside the mount) -----------

class Journal:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **rec):
        self.f.write(json.dumps(rec) + "\n")


def read_journal(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


def client_sequential(mnt, name, seed, j: Journal):
    fd = os.open(os.path.join(mnt, name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    j(op="created")
    i = 0
    every = random.Random(seed).choice([1, 2, 4, 8])
    while True:
        if i == SEQ_MAX_BLOCKS:  # bounded, so checking and fsck stay quick
            j(op="close", phase="intent", length=i * BLOCK)
            os.close(fd)
            j(op="fsync", phase="done", length=i * BLOCK)
            time.sleep(CLIENT_MAX_S)
            return
        os.write(fd, block_data(seed, i))
        i += 1
        if i % every == 0:
            j(op="fsync", phase="intent", length=i * BLOCK)
            os.fsync(fd)
            j(op="fsync", phase="done", length=i * BLOCK)


def client_random(mnt, name, seed, j: Journal, reopen: bool = False):
    rng = random.Random(seed)
    base_len = rng.randint(1, 3 * BLOCK)
    path = os.path.join(mnt, name)
    with open(path, "wb") as f:
        f.write(block_data(seed, 0, base_len))
    j(op="base", phase="done", length=base_len)
    fd = os.open(path, os.O_RDWR)
    k = 1
    while True:
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.15:
                size = rng.randint(0, 4 * BLOCK)
                j(op="truncate", phase="intent", size=size)
                os.ftruncate(fd, size)
            else:
                off = rng.randint(0, 4 * BLOCK)
                n = rng.randint(1, 600_000)
                j(op="write", phase="intent", off=off, n=n, k=k)
                os.pwrite(fd, block_data(seed, k, n), off)
                k += 1
        j(op="fsync", phase="intent")
        os.fsync(fd)
        j(op="fsync", phase="done")
        if reopen:
            # Each last close of a file full of overwritten records may compact it
            # (copy live records, rename over): kill points land in compactions too.
            os.close(fd)
            fd = os.open(path, os.O_RDWR)


def client_compaction(mnt, name, seed, j: Journal):
    client_random(mnt, name, seed, j, reopen=True)


def client_renames(mnt, name, seed, j: Journal):
    rng = random.Random(seed)
    d = os.path.join(mnt, name)
    os.mkdir(d)
    j(op="mkdir", phase="done")
    names = [f"n{i}" for i in range(12)]
    present: set[str] = set()
    i = 0
    while True:
        r = rng.random()
        if r < 0.5 or not present:
            tmp = f"tmp{i}"
            dest = rng.choice(names)
            j(op="write", phase="intent", tmp=tmp, i=i)
            fd = os.open(os.path.join(d, tmp), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, small_content(seed, i))
            os.fsync(fd)
            os.close(fd)
            j(op="write", phase="done", tmp=tmp, i=i)
            j(op="rename", phase="intent", src=tmp, dst=dest)
            os.rename(os.path.join(d, tmp), os.path.join(d, dest))
            j(op="rename", phase="done", src=tmp, dst=dest)
            present.add(dest)
            i += 1
        elif r < 0.85:
            src, dst = rng.choice(sorted(present)), rng.choice(names)
            j(op="rename", phase="intent", src=src, dst=dst)
            os.rename(os.path.join(d, src), os.path.join(d, dst))
            j(op="rename", phase="done", src=src, dst=dst)
            if src != dst:
                present.discard(src)
                present.add(dst)
        else:
            victim = rng.choice(sorted(present))
            j(op="unlink", phase="intent", name=victim)
            os.unlink(os.path.join(d, victim))
            j(op="unlink", phase="done", name=victim)
            present.discard(victim)


CLIENTS = {"sequential": client_sequential, "random": client_random, "renames": client_renames,
           "compaction": client_compaction}


def run_client(kind, mnt, name, seed, journal_path) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            j = Journal(journal_path)
            import signal
            signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
            signal.alarm(int(CLIENT_MAX_S) + 30)
            try:
                CLIENTS[kind](str(mnt), name, seed, j)
            except OSError as exc:
                # the daemon died under us: ENOTCONN/ECONNABORTED are the expected ends
                if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT):
                    j(op="client-error", error=repr(exc), errno=exc.errno, t=time.monotonic())
                    code = 2
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    return pid


# -- checks after a crash ----------------------------------------------------------------------

def check_sequential(mnt, name, seed, journal) -> bytes:
    done = [r["length"] for r in journal if r.get("op") == "fsync" and r.get("phase") == "done"]
    durable = done[-1] if done else 0
    path = mnt / name
    if not path.exists():
        assert not any(r.get("op") == "created" for r in journal), f"{name}: created, then vanished"
        return None
    got = path.read_bytes()
    assert len(got) >= durable, f"{name}: {len(got)} bytes, but {durable} were fsynced"
    want = b"".join(block_data(seed, i) for i in range(-(-len(got) // BLOCK)))[:len(got)]
    assert got == want, f"{name}: {len(got)} bytes that are not a prefix of what was written"
    return got


def check_random(mnt, name, seed, journal) -> bytes:
    path = mnt / name
    base = [r for r in journal if r.get("op") == "base"]
    if not base:
        # killed while writing the base file: it may be missing, empty or the whole base
        if not path.exists():
            return None
        got = path.read_bytes()
        base_len = random.Random(seed).randint(1, 3 * BLOCK)  # as client_random draws it
        assert got == block_data(seed, 0, base_len)[:len(got)], \
            f"{name}: the unfinished base file holds bytes that were never written"
        return got
    model = bytearray(block_data(seed, 0, base[0]["length"]))
    allowed = [bytes(model)]  # states a commit may have captured, from the last fsync on
    for rec in journal[journal.index(base[0]) + 1:]:
        if rec["op"] == "write" and rec["phase"] == "intent":
            off, n = rec["off"], rec["n"]
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + n] = block_data(seed, rec["k"], n)
            allowed.append(bytes(model))
        elif rec["op"] == "truncate":
            size = rec["size"]
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
            allowed.append(bytes(model))
        elif rec["op"] == "fsync" and rec["phase"] == "done":
            allowed = [bytes(model)]
    got = path.read_bytes()
    assert got in allowed, (f"{name}: {len(got)} bytes match neither the last fsynced state nor "
                            f"a later one (sizes allowed {[len(a) for a in allowed]})")
    return got


def check_renames(mnt, name, seed, journal) -> dict:
    d = mnt / name
    if not any(r.get("op") == "mkdir" for r in journal):
        return {}
    model: dict[str, str] = {}   # name -> sha of content
    pending = None
    for rec in journal:
        if rec.get("phase") == "intent":
            pending = rec
            continue
        if rec.get("phase") != "done":
            continue
        pending = None
        if rec["op"] == "write":
            model[rec["tmp"]] = sha(small_content(seed, rec["i"]))
        elif rec["op"] == "rename" and rec["src"] != rec["dst"]:
            model[rec["dst"]] = model.pop(rec["src"])
        elif rec["op"] == "unlink":
            model.pop(rec["name"])
    after = dict(model)
    if pending is not None:
        if pending["op"] == "rename" and pending["src"] != pending["dst"] and pending["src"] in after:
            after[pending["dst"]] = after.pop(pending["src"])
        elif pending["op"] == "unlink":
            after.pop(pending["name"], None)
    found = {}
    for entry in os.listdir(d):
        found[entry] = sha((d / entry).read_bytes())
    if pending is not None and pending["op"] == "write":
        tmp = pending["tmp"]
        if tmp in found:  # in flight: the new file may be absent, empty or complete
            assert found[tmp] in (sha(b""), sha(small_content(seed, pending["i"]))), \
                f"{name}/{tmp}: an in-flight file holds bytes that were never written"
            del found[tmp]
    assert found in (model, after), (f"{name}: directory {sorted(found)} is neither the journal's "
                                     f"{sorted(model)} nor {sorted(after)} (in flight: {pending})")
    return found


CHECKS = {"sequential": check_sequential, "random": check_random, "renames": check_renames,
          "compaction": check_random}


def fsck(backing, *args):
    return subprocess.run([sys.executable, "-m", "dccfs.cli", "fsck", "-q", *args, str(backing)],
                          capture_output=True, text=True)


def crash_matrix(make_mount, tmp_path, kinds: list[str], master_seed: int):
    mount = make_mount("kx")
    mount.expect_errors = True  # a killed daemon and torn tails may be logged
    rng = random.Random(master_seed)
    durable: dict[str, str] = {}  # path below the mount -> sha256 found after its crash
    repairs = 0
    for point, kind in enumerate(kinds):
        seed = rng.randrange(1 << 30)
        name = f"{kind}-{point}"
        delay = rng.uniform(0.05, 1.5)
        journal_path = tmp_path / f"journal-{point}.jsonl"
        where = f"crash point {point} ({kind}, seed={seed}, master seed={master_seed}, kill after {delay:.2f}s)"
        pid = run_client(kind, mount.mnt, name, seed, journal_path)
        time.sleep(delay)
        killed_at = time.monotonic()
        mount.kill()
        waited = time.monotonic()
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() - waited > 60:
                os.kill(pid, 9)  # our own client, by PID
                os.waitpid(pid, 0)
                pytest.fail(f"{where}: the client hung after the daemon died")
            time.sleep(0.02)
        journal = read_journal(journal_path)
        # A close (FUSE flush) reports writeback that the kill cut short as EIO: the kernel
        # keeps only the page cache's AS_EIO flag for it. So an EIO after the kill is one
        # more expected end; before the kill, EIO means the daemon failed a request.
        errors = [r for r in journal if r.get("op") == "client-error"
                  and not (r.get("errno") == errno.EIO and r.get("t", 0) >= killed_at)]
        assert not errors, f"{where}: the client failed before the kill: {errors}"
        mount.start()
        try:
            found = CHECKS[kind](mount.mnt, name, seed, journal)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        for path, digest in durable.items():
            now = sha((mount.mnt / path).read_bytes())
            assert now == digest, f"{where}: {path}, intact after an earlier crash, has changed"
        if isinstance(found, bytes):
            durable[name] = sha(found)
        elif isinstance(found, dict):
            durable.update({f"{name}/{k}": v for k, v in found.items()})
        mount.stop()
        result = fsck(mount.backing)
        if result.returncode != 0:
            repairs += 1
            repaired = fsck(mount.backing, "--repair")
            assert repaired.returncode == 0, f"{where}: fsck --repair failed:\n{repaired.stdout}{repaired.stderr}"
            again = fsck(mount.backing)
            assert again.returncode == 0, f"{where}: fsck after repair:\n{again.stdout}{again.stderr}"
        mount.start()
        print(f"{where}: checked in {time.monotonic() - waited:.1f}s after the kill")
    for path, digest in durable.items():
        assert sha((mount.mnt / path).read_bytes()) == digest, f"{path} changed by the final fsck"
    print(f"crash matrix: {len(kinds)} kill points, {len(durable)} files checked, "
          f"{repairs} needed fsck --repair (master seed {master_seed})")


def test_crash_points_fast(make_mount, tmp_path):
    """Four kill points in make test, one per workload."""
    seed = int(os.environ.get("DCCFS_CRASH_SEED", "0")) or random.SystemRandom().randrange(1 << 30)
    crash_matrix(make_mount, tmp_path, ["sequential", "random", "renames", "compaction"], seed)


@pytest.mark.stress
def test_crash_matrix_stress(make_mount, tmp_path):
    seed = int(os.environ.get("DCCFS_CRASH_SEED", "0")) or random.SystemRandom().randrange(1 << 30)
    kinds = [list(CLIENTS)[i % len(CLIENTS)] for i in range(STRESS_POINTS)]
    crash_matrix(make_mount, tmp_path, kinds, seed)
