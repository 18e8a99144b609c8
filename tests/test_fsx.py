"""fsx-style random I/O on one file through a real mount, checked against an in-memory model.

Operations: read, write (also past EOF, leaving holes), truncate (shrink and grow), mmap
read, mmap write (MAP_SHARED on the fd, then flush = msync), fsync, close and reopen.
After every operation the file size is compared with the model and the bytes the
operation touched (plus a margin) are read back and compared; the whole file is compared
every FULL_EVERY operations, after every reopen and at the end. On a mismatch the test
prints the seed, the operation index and the last operations, so a failure replays with
DCCFS_FSX_SEED=<seed>.

make test runs 10,000 operations split over {mmap on, off} x {64 KiB, 1 MiB chunks};
the stress variant runs 100,000 (DCCFS_FSX_OPS scales it).
"""
from __future__ import annotations

import mmap
import os
import random
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.mount

FAST_TOTAL_OPS = 10_000
STRESS_TOTAL_OPS = int(os.environ.get("DCCFS_FSX_OPS", "100000"))
FULL_EVERY = 64
COMBOS = [(use_mmap, chunk) for use_mmap in (False, True) for chunk in ("64KiB", "1MiB")]
CHUNK_BYTES = {"64KiB": 64 << 10, "1MiB": 1 << 20}


class FsxFailure(AssertionError):
    pass


class Fsx:
    def __init__(self, path, seed: int, chunk: int, use_mmap: bool, max_len: int):
        self.path = path
        self.seed = seed
        self.rng = random.Random(seed)
        self.chunk = chunk
        self.use_mmap = use_mmap
        self.max_len = max_len
        self.max_io = min(max_len // 2, 3 * chunk // 2)
        self.model = bytearray()
        self.log: list[str] = []
        self.index = 0
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
        ops = [("read", 20), ("write", 30), ("truncate", 8), ("fsync", 3), ("reopen", 3)]
        if use_mmap:
            ops += [("mapread", 10), ("mapwrite", 10)]
        self.ops = [name for name, weight in ops for _ in range(weight)]

    # -- helpers --------------------------------------------------------------------

    def fail(self, msg: str):
        tail = "\n  ".join(self.log[-25:])
        raise FsxFailure(f"fsx seed={self.seed} op #{self.index}: {msg}\n"
                         f"replay: DCCFS_FSX_SEED={self.seed}\nlast operations:\n  {tail}")

    def offset(self, limit: int) -> int:
        """Random offset below limit, often right at or next to a chunk boundary."""
        if limit <= 0:
            return 0
        if self.rng.random() < 0.3:
            boundary = self.rng.randrange(0, limit // self.chunk + 1) * self.chunk
            return max(0, min(limit - 1, boundary + self.rng.randint(-3, 3)))
        return self.rng.randrange(limit)

    def length(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randint(1, 64)
        if r < 0.8:
            return self.rng.randint(1, 8192)
        return self.rng.randint(1, self.max_io)

    def data(self, n: int) -> bytes:
        kind = self.rng.random()
        if kind < 0.15:
            return bytes(n)  # zeros: exercises the hole path
        if kind < 0.4:
            return bytes([self.rng.randrange(256)]) * n  # compressible
        return self.rng.randbytes(n)

    def read_exact(self, off: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            got = os.pread(self.fd, n - len(out), off + len(out))
            if not got:
                break
            out += got
        return bytes(out)

    def check_range(self, off: int, n: int, what: str) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self.fail(f"{what}: size {size}, model {len(self.model)}")
        lo = max(0, off - 4096)
        hi = min(len(self.model), off + n + 4096) if n else len(self.model)
        got = self.read_exact(lo, hi - lo + 10)
        want = bytes(self.model[lo:hi + 10])  # the extra 10: nothing readable past EOF
        if got != want:
            self.fail(f"{what}: bytes {lo}..{hi} differ from the model{self.diff(got, want, lo)}")

    def check_all(self, what: str) -> None:
        self.check_range(0, 0, what)

    @staticmethod
    def diff(got: bytes, want: bytes, base: int) -> str:
        if len(got) != len(want):
            return f" (read {len(got)} bytes, want {len(want)})"
        first = next(i for i in range(len(got)) if got[i] != want[i])
        return (f" (first difference at file offset {base + first}: got {got[first:first + 8].hex()},"
                f" want {want[first:first + 8].hex()})")

    # -- operations -------------------------------------------------------------------

    def op_read(self):
        off = self.offset(len(self.model) + 100)
        n = self.length()
        self.log.append(f"{self.index} read {off}+{n}")
        got = self.read_exact(off, n)
        want = bytes(self.model[off:off + n])
        if got != want:
            self.fail(f"read {off}+{n} differs{self.diff(got, want, off)}")
        return off, n

    def op_write(self):
        off = self.offset(min(self.max_len - 1, len(self.model) + self.chunk))
        n = min(self.length(), self.max_len - off)
        data = self.data(n)
        self.log.append(f"{self.index} write {off}+{n}")
        written = os.pwrite(self.fd, data, off)
        if written != n:
            self.fail(f"short write {written} of {n}")
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off:off + n] = data
        return off, n

    def op_truncate(self):
        size = self.offset(self.max_len)
        self.log.append(f"{self.index} truncate {len(self.model)} -> {size}")
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))
        return max(0, size - 100), 200

    def op_mapread(self):
        if not self.model:
            return self.op_read()
        off = self.offset(len(self.model))
        n = min(self.length(), len(self.model) - off)
        self.log.append(f"{self.index} mapread {off}+{n}")
        with mmap.mmap(self.fd, len(self.model), mmap.MAP_SHARED, mmap.PROT_READ) as m:
            got = m[off:off + n]
        want = bytes(self.model[off:off + n])
        if got != want:
            self.fail(f"mapread {off}+{n} differs{self.diff(got, want, off)}")
        return off, n

    def op_mapwrite(self):
        if not self.model:
            return self.op_write()
        off = self.offset(len(self.model))
        n = min(self.length(), len(self.model) - off)
        data = self.data(n)
        self.log.append(f"{self.index} mapwrite {off}+{n}")
        with mmap.mmap(self.fd, len(self.model)) as m:
            m[off:off + n] = data
            m.flush()
        self.model[off:off + n] = data
        return off, n

    def op_fsync(self):
        self.log.append(f"{self.index} fsync")
        os.fsync(self.fd)
        return 0, 0

    def op_reopen(self):
        self.log.append(f"{self.index} close+reopen")
        fd, self.fd = self.fd, -1
        os.close(fd)
        self.fd = os.open(self.path, os.O_RDWR)
        return 0, 0

    def run(self, nops: int) -> None:
        try:
            for self.index in range(nops):
                name = self.rng.choice(self.ops)
                off, n = getattr(self, f"op_{name}")()
                if name in ("reopen", "fsync") or self.index % FULL_EVERY == 0:
                    self.check_all(f"after {name}")
                else:
                    self.check_range(off, n, f"after {name}")
            self.index = nops
            self.check_all("at the end")
            self.op_reopen()
            self.check_all("after the final reopen")
        finally:
            if self.fd >= 0:
                try:
                    os.close(self.fd)
                except OSError:
                    pass  # a dead mount; the exception on its way out says why


def wait_released(mount, timeout_s: float = 60) -> None:
    """Wait until the daemon holds no open (non-O_PATH) descriptor of a regular file in the
    backing directory: every release, with its commit and compaction, has finished.
    FUSE sends release asynchronously after close(2); an unmount right after a close
    races with it (see test_unmount_right_after_a_compacting_release)."""
    backing = os.path.realpath(mount.backing)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = []
        for fd in os.listdir(f"/proc/{mount.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{mount.pid}/fd/{fd}")
                with open(f"/proc/{mount.pid}/fdinfo/{fd}") as f:
                    flags = int(next(l for l in f if l.startswith("flags:")).split()[1], 8)
            except (OSError, StopIteration):
                continue
            if target.startswith(backing + "/") and "/.dccfs/" not in target \
                    and not flags & 0o10000000:  # O_PATH
                busy.append(target)
        if not busy:
            return
        time.sleep(0.02)
    raise AssertionError(f"releases still running after {timeout_s}s: {busy}")


def config_for(tmp_path, chunk: str):
    path = tmp_path / f"fsx-{chunk}.toml"
    path.write_text(f'chunk_size = "{chunk}"\n')
    return path


def run_combo(make_mount, tmp_path, use_mmap: bool, chunk: str, nops: int, seed: int | None):
    if seed is None:
        seed = int(os.environ.get("DCCFS_FSX_SEED", "0")) or random.SystemRandom().randrange(1 << 30)
    mount = make_mount("fsx", "-c", str(config_for(tmp_path, chunk)))
    cs = CHUNK_BYTES[chunk]
    max_len = 8 * cs if cs < (1 << 20) else 3 * cs
    path = mount.mnt / "fsx.bin"
    print(f"fsx seed={seed} mmap={use_mmap} chunk={chunk} ops={nops}")
    started = time.monotonic()
    fsx = Fsx(path, seed, cs, use_mmap, max_len)
    # A request the daemon never answers blocks this process in an uninterruptible
    # wait; the watchdog kills the daemon (ours, by PID) so the test fails instead of hanging.
    limit = 120 + nops * 0.05
    fired = threading.Event()

    def watchdog():
        fired.set()
        mount.expect_errors = True
        os.kill(mount.pid, signal.SIGKILL)

    timer = threading.Timer(limit, watchdog)
    timer.start()
    try:
        fsx.run(nops)
        final = path.read_bytes()
    except OSError as exc:
        if fired.is_set():
            fsx.fail(f"hung for {limit:.0f}s (the watchdog killed the daemon): {exc!r}")
        raise
    finally:
        timer.cancel()
    wait_released(mount)
    mount.remount()
    after = path.read_bytes()
    if after != final:
        first = next((i for i, (x, y) in enumerate(zip(after, final)) if x != y), min(len(after), len(final)))
        fsx.fail(f"content changed across remount: {len(final)} bytes before, {len(after)} after, "
                 f"first difference at {first} (chunk {first // cs})")
    print(f"fsx seed={seed}: {nops} ops in {time.monotonic() - started:.1f}s")


@pytest.mark.parametrize("use_mmap,chunk", COMBOS,
                         ids=[f"{'mmap' if m else 'nommap'}-{c}" for m, c in COMBOS])
def test_fsx(make_mount, tmp_path, use_mmap, chunk):
    run_combo(make_mount, tmp_path, use_mmap, chunk, FAST_TOTAL_OPS // len(COMBOS), None)


@pytest.mark.stress
@pytest.mark.parametrize("use_mmap,chunk", COMBOS,
                         ids=[f"{'mmap' if m else 'nommap'}-{c}" for m, c in COMBOS])
def test_fsx_stress(make_mount, tmp_path, use_mmap, chunk):
    run_combo(make_mount, tmp_path, use_mmap, chunk, STRESS_TOTAL_OPS // len(COMBOS), None)


def test_unmount_right_after_a_compacting_release(make_mount, tmp_path):
    mount = make_mount("rel", "-c", str(config_for(tmp_path, "1MiB")))
    path = mount.mnt / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    rng = random.Random(1)
    for _ in range(3):  # rewrite the same 24 MiB: dead records make close compact the file
        last = rng.randbytes(24 << 20)
        os.pwrite(fd, last, 0)
        os.fsync(fd)
    os.close(fd)  # release: commit, then a compaction copying 24 MiB
    for _ in range(3):  # more releases queue behind the compacting one
        small = os.open(path, os.O_RDONLY)
        assert os.pread(small, 16, 0) == last[:16]
        os.close(small)
    mount.remount()  # at once
    assert path.read_bytes() == last
    errors = [l for l in mount.log_text().splitlines() if " ERROR " in l]
    mount.expect_errors = True  # reported by the assertion below instead
    assert not errors, "\n".join(errors[:5])
