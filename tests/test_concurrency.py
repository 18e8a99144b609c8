"""Several processes mutate one shared tree under a mount at the same time.

Four forked workers create, write, rename, link, unlink, mkdir, rmdir and rename
directories in a shared tree for a few seconds. Every file is written whole under a
temporary name in the worker's private staging directory with a unique, self-describing content (worker, sequence number,
length and a digest of the body) and then renamed into place; each worker logs every
content it completed and the last content it put at each path. Workers also read
random files while the others work: any file they can open must hold one complete content.

Afterwards, and again after unmount and remount: the tree walks without errors, every
listed name can be lstat-ed (also below renamed directories), and every file holds a
complete content some worker wrote. The daemon's descriptors (/proc/PID/fd) are counted
before and after: after the kernel drops its dentry and inode caches, the count is back
to the start plus a small slack, and no descriptor points at a deleted file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import struct
import time

import pytest

pytestmark = pytest.mark.mount

WORKERS = 4
SECONDS = float(os.environ.get("DCCFS_CONCURRENCY_S", "4"))
TOP_DIRS = 3
NAMES = 6
FD_SLACK = 8
MIN_OPS = 150
HARD_LIMIT_S = 90
# errnos that racing namespace operations legitimately produce
RACE_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR,
               errno.EINVAL, errno.EXDEV}
MAGIC = b"DCCT"
HEADER = struct.Struct("<4sIIQ32s")  # magic, worker, seq, body length, sha256(body)


def make_content(rng: random.Random, worker: int, seq: int) -> bytes:
    n = rng.choice([0, rng.randint(1, 100), rng.randint(1, 70_000), rng.randint(200_000, 700_000)])
    body = rng.randbytes(n) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * n
    return HEADER.pack(MAGIC, worker, seq, n, hashlib.sha256(body).digest()) + body


def content_ok(data: bytes) -> bool:
    if len(data) < HEADER.size:
        return False
    magic, _, _, n, digest = HEADER.unpack_from(data)
    body = data[HEADER.size:]
    return magic == MAGIC and len(body) == n and hashlib.sha256(body).digest() == digest


def worker_main(root: str, worker: int, seed: int, seconds: float, log_path: str) -> None:
    rng = random.Random(seed)
    written = []  # sha256 of every complete content this worker wrote
    last = {}     # path -> sha256 of the last content this worker renamed into it
    errors = []
    counts: dict[str, int] = {}

    def rel_dir() -> str:
        top = f"d{rng.randrange(TOP_DIRS)}"
        if rng.random() < 0.5:
            return f"{top}/s{rng.randrange(3)}"
        return top

    def rel_file() -> str:
        return f"{rel_dir()}/f{rng.randrange(NAMES)}"

    def do(name, fn, *args):
        try:
            fn(*args)
            counts[name] = counts.get(name, 0) + 1
        except OSError as exc:
            if exc.errno not in RACE_ERRNOS:
                errors.append(f"{name}{args}: {exc!r}")

    def write_file():
        dest = rel_file()
        seq = len(written)
        data = make_content(rng, worker, seq)
        # staged in a private directory nobody renames, then renamed across directories
        tmp = f"stage{worker}/.tmp-{worker}-{seq}"
        fd = os.open(os.path.join(root, tmp), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:1 << 20]):]
        finally:
            os.close(fd)
        digest = hashlib.sha256(data).hexdigest()
        written.append(digest)
        try:
            os.rename(os.path.join(root, tmp), os.path.join(root, dest))
        except OSError:
            os.unlink(os.path.join(root, tmp))
            raise
        last[dest] = digest

    def read_file():
        path = os.path.join(root, rel_file())
        try:
            with open(path, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            return
        if not content_ok(data):
            errors.append(f"read {path}: {len(data)} bytes that are not one complete content")

    ops = [
        ("write", write_file, 30),
        ("read", read_file, 15),
        ("rename", lambda: os.rename(os.path.join(root, rel_file()), os.path.join(root, rel_file())), 10),
        ("link", lambda: os.link(os.path.join(root, rel_file()), os.path.join(root, rel_file())), 8),
        ("unlink", lambda: os.unlink(os.path.join(root, rel_file())), 10),
        ("mkdir", lambda: os.mkdir(os.path.join(root, f"d{rng.randrange(TOP_DIRS)}/s{rng.randrange(3)}")), 6),
        ("rmdir", lambda: os.rmdir(os.path.join(root, f"d{rng.randrange(TOP_DIRS)}/s{rng.randrange(3)}")), 4),
        ("dirrename", lambda: os.rename(os.path.join(root, f"d{rng.randrange(TOP_DIRS)}/s{rng.randrange(3)}"),
                                        os.path.join(root, f"d{rng.randrange(TOP_DIRS)}/s{rng.randrange(3)}")), 5),
        ("listdir", lambda: os.listdir(os.path.join(root, rel_dir())), 6),
    ]
    table = [(name, fn) for name, fn, weight in ops for _ in range(weight)]
    # at least MIN_OPS operations however slow the machine, at most HARD_LIMIT_S seconds
    started = time.monotonic()
    done = 0
    while (time.monotonic() - started < seconds or done < MIN_OPS) \
            and time.monotonic() - started < HARD_LIMIT_S:
        name, fn = rng.choice(table)
        do(name, fn)
        done += 1
    with open(log_path, "w") as f:
        json.dump({"written": written, "last": last, "errors": errors, "counts": counts}, f)


def daemon_fds(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


def settled_fds(pid: int) -> list[str]:
    """The daemon's descriptors after the kernel has forgotten every cached inode."""
    for _ in range(3):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
        except OSError:
            break
        time.sleep(0.3)
    previous = None
    for _ in range(50):
        now = daemon_fds(pid)
        if previous is not None and len(now) == len(previous):
            return now
        previous = now
        time.sleep(0.1)
    return previous


def check_tree(root: str, valid: set[str]) -> dict[str, str]:
    """Walk root; every entry must lstat; every file must hold a complete written content."""
    found = {}

    def fail(exc):
        raise exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))  # listed means stat-able
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            assert not name.startswith(".tmp-"), f"{rel}: a temporary file survived its rename"
            with open(path, "rb") as f:
                data = f.read()
            digest = hashlib.sha256(data).hexdigest()
            assert content_ok(data) and digest in valid, \
                f"{rel}: {len(data)} bytes that no worker wrote as a whole"
            found[rel] = digest
    return found


def test_concurrent_namespace_and_content(make_mount, tmp_path):
    mount = make_mount("cc")
    root = mount.mnt / "t"
    root.mkdir()
    for i in range(TOP_DIRS):
        (root / f"d{i}").mkdir()
    for w in range(WORKERS):
        (root / f"stage{w}").mkdir()
    before = settled_fds(mount.pid)
    seed = random.SystemRandom().randrange(1 << 30)
    print(f"concurrency seed={seed}")
    ctx = multiprocessing.get_context("fork")
    procs = []
    for w in range(WORKERS):
        p = ctx.Process(target=worker_main,
                        args=(str(root), w, seed + w, SECONDS, str(tmp_path / f"w{w}.json")))
        p.start()
        procs.append(p)
    try:
        for p in procs:
            p.join(HARD_LIMIT_S + 120)
            assert p.exitcode == 0, f"worker {p.pid} exited with {p.exitcode} (seed={seed})"
    finally:
        for p in procs:  # only our own workers, by PID
            if p.is_alive():
                p.kill()
                p.join()
    logs = [json.loads((tmp_path / f"w{w}.json").read_text()) for w in range(WORKERS)]
    errors = [e for log in logs for e in log["errors"]]
    assert not errors, f"seed={seed}: unexpected errors:\n" + "\n".join(errors[:20])
    valid = {d for log in logs for d in log["written"]}
    counts = {}
    for log in logs:
        for k, v in log["counts"].items():
            counts[k] = counts.get(k, 0) + v
    print("operations:", counts)
    assert counts.get("write", 0) > 50 and counts.get("rename", 0) > 5, counts

    found = check_tree(str(root), valid)
    # a path last written by exactly one worker and never touched again by a namespace
    # op cannot be checked more precisely, because other workers rename and link into it;
    # the rule that holds is: what is there is some complete content.
    after = settled_fds(mount.pid)
    print(f"daemon descriptors: {len(before)} before, {len(after)} after the workload")
    deleted = [t for t in after if t.endswith("(deleted)")]
    assert not deleted, f"the daemon holds descriptors of deleted files: {deleted[:10]}"
    assert len(after) <= len(before) + FD_SLACK, \
        f"descriptor leak: {len(before)} before, {len(after)} after:\n" + "\n".join(sorted(after)[:40])

    mount.remount()
    assert check_tree(str(root), valid) == found, "the tree changed across unmount and remount"
    # directories renamed by the workers: walk again from a fresh mount, by descriptor
    for dirpath, dirnames, filenames in os.walk(root):
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in dirnames + filenames:
                os.stat(name, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)


def test_listed_entries_stat_during_directory_renames(make_mount):
    """One process renames directories back and forth while another lists and stats inside."""
    mount = make_mount("cc2")
    root = mount.mnt
    for d in ("a", "b"):
        (root / d / "sub").mkdir(parents=True)
        for i in range(20):
            (root / d / "sub" / f"f{i}").write_bytes(b"x" * i)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()

    def renamer():
        i = 0
        while not stop.is_set():
            src, dst = ("a", "c") if i % 2 == 0 else ("c", "a")
            os.rename(root / src, root / dst)
            i += 1
        os._exit(0)

    p = ctx.Process(target=renamer)
    p.start()
    problems = []
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for top in ("a", "b", "c"):
                try:
                    fd = os.open(root / top / "sub", os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    continue
                try:
                    for name in os.listdir(fd):
                        try:
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                            assert st.st_size == int(name[1:])
                        except OSError as exc:
                            problems.append(f"{top}/sub/{name}: {exc!r}")
                finally:
                    os.close(fd)
    finally:
        stop.set()
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    assert p.exitcode == 0
    assert not problems, problems[:10]
