"""Real-mount tests of the I/O patterns ML tools use: numpy save + mmap load, writes through np.memmap, the
atomic save (write tmp, fsync, rename, fsync dir) under concurrent readers, and copying checkpoint trees in and
out with shutil.copytree and rsync -a (contents, modes and mtimes preserved). All comparisons are byte-exact.

The torch / safetensors / transformers tests live in test_frameworks.py.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mount
log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # the default chunk size: regions below straddle chunk boundaries on purpose


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights(rng: np.random.Generator, n: int, scale: float = 0.02) -> np.ndarray:
    """Float32 values shaped like trained weights (what the tensor codec sees in real checkpoints)."""
    return (rng.standard_normal(n, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def stored_ratio(mount, rel: str) -> float:
    return (mount.backing / rel).stat().st_size / (mount.mnt / rel).stat().st_size


# ---------------------------------------------------------------------------------------------- numpy

def test_numpy_save_and_mmap_load_random_slices(make_mount, caplog):
    """np.save of a ~64 MB array; after a remount np.load(mmap_mode='r') returns the same bytes everywhere."""
    caplog.set_level(logging.INFO, logger=__name__)
    rng = np.random.default_rng(7)
    arr = weights(rng, 4096 * 4096).reshape(4096, 4096)  # 64 MiB of float32
    arr[100:200] = 0.0  # a run of zeros and one of repeats, as in sparse / padded tensors
    arr[3000, :] = 1.5
    mount = make_mount()
    path = mount.mnt / "acts.npy"
    np.save(path, arr)
    mount.remount()
    ratio = stored_ratio(mount, "acts.npy")
    log.info("npy float32 ~N(0, 0.02) 64 MiB stored/logical = %.4f", ratio)
    print(f"npy stored/logical = {ratio:.4f}")
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap) and mm.dtype == arr.dtype and mm.shape == arr.shape
    for _ in range(200):
        r0 = int(rng.integers(0, 4096))
        r1 = int(rng.integers(r0 + 1, min(4096, r0 + 64) + 1))
        c0 = int(rng.integers(0, 4096))
        c1 = int(rng.integers(c0 + 1, 4097))
        assert mm[r0:r1, c0:c1].tobytes() == arr[r0:r1, c0:c1].tobytes(), (r0, r1, c0, c1)
    flat_mm, flat = mm.reshape(-1), arr.reshape(-1)
    for _ in range(200):  # 1-D windows, many across 256 KiB chunk boundaries
        a = int(rng.integers(0, flat.size))
        b = min(flat.size, a + int(rng.integers(1, 200_000)))
        assert flat_mm[a:b].tobytes() == flat[a:b].tobytes(), (a, b)
    assert sha(mm.tobytes()) == sha(arr.tobytes())
    del mm, flat_mm
    gc.collect()
    with open(path, "rb") as f:  # and plain read() of the whole file equals what np.save wrote
        assert np.lib.format.read_magic(f) == (1, 0)
        np.lib.format.read_array_header_1_0(f)
        assert f.read() == arr.tobytes()


def _modify_scattered(mm: np.ndarray, want: np.ndarray, rng: np.random.Generator) -> None:
    """The same scattered writes into the memmap and into the expected array."""
    n = want.size
    per_chunk = CHUNK // 4
    regions = [(0, 1), (n - 1, n), (per_chunk - 3, per_chunk + 5),  # first / last element, a chunk boundary
               (5 * per_chunk - 1000, 7 * per_chunk + 1000)]  # spans three chunks
    regions += [(a, a + int(rng.integers(1, 5000))) for a in rng.integers(0, n - 5000, size=40)]
    for a, b in regions:
        vals = weights(rng, b - a, scale=1.0)
        mm[a:b] = vals
        want[a:b] = vals
    idx = rng.choice(n, size=500, replace=False)  # single elements
    vals = weights(rng, idx.size, scale=3.0)
    mm[idx] = vals
    want[idx] = vals


def test_np_memmap_r_plus_scattered_writes(make_mount):
    """np.memmap(mode='r+') on a stored file: scattered writes, flush, close; read() sees them at once, and so
    does a fresh mount."""
    rng = np.random.default_rng(11)
    want = weights(rng, 3 * 1024 * 1024)  # 12 MiB: 48 chunks
    mount = make_mount()
    path = mount.mnt / "state.f32"
    path.write_bytes(want.tobytes())
    mount.remount()  # the memmap now maps a committed, compressed container
    mm = np.memmap(path, dtype=np.float32, mode="r+")
    assert mm.shape == want.shape and mm.tobytes() == want.tobytes()
    _modify_scattered(mm, want, rng)
    mm.flush()
    del mm
    gc.collect()
    assert path.stat().st_size == want.nbytes
    assert sha(path.read_bytes()) == sha(want.tobytes())
    mount.remount()
    assert sha(path.read_bytes()) == sha(want.tobytes())
    mm = np.memmap(path, dtype=np.float32, mode="r")
    assert mm.tobytes() == want.tobytes()
    del mm
    gc.collect()


def test_np_memmap_w_plus_new_file(make_mount):
    """np.memmap(mode='w+') creates a file through the mount (a hole, then page writes)."""
    rng = np.random.default_rng(12)
    mount = make_mount()
    path = mount.mnt / "new.f32"
    n = 3 * 1024 * 1024 + 17  # not a whole number of chunks or pages
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n,))
    want = np.zeros(n, dtype=np.float32)
    _modify_scattered(mm, want, rng)
    mm.flush()
    del mm
    gc.collect()
    assert path.stat().st_size == want.nbytes
    assert sha(path.read_bytes()) == sha(want.tobytes())
    mount.remount()
    assert sha(path.read_bytes()) == sha(want.tobytes())


def test_np_save_overwrites_in_place_longer_then_shorter(make_mount):
    """np.save over an existing file (open O_TRUNC) with a longer, then a shorter array: no stale tail."""
    rng = np.random.default_rng(13)
    mount = make_mount()
    path = mount.mnt / "w.npy"
    for n in (700_001, 1_300_000, 90_000, 0, 400_000):
        arr = weights(rng, n)
        np.save(path, arr)
        assert np.load(path).tobytes() == arr.tobytes()
    mount.remount()
    got = np.load(path)
    assert got.shape == arr.shape and got.tobytes() == arr.tobytes()
    assert path.stat().st_size == len(path.read_bytes())


# ---------------------------------------------------------------------------------------------- atomic save

def _versions(count: int) -> list[bytes]:
    """Complete files of different sizes and contents: a JSON header, weights and a trailer."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(count):
        body = weights(rng, 300_000 + 97_001 * i).tobytes()
        header = json.dumps({"version": i, "nbytes": len(body)}).encode().ljust(64)
        out.append(header + body + f"END{i:04d}".encode())
    return out


def _atomic_save(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


READER_SCRIPT = r"""
import collections, hashlib, json, os, sys
path, stop = sys.argv[1], sys.argv[2]
seen = collections.Counter()
while not os.path.exists(stop):
    with open(path, "rb") as f:
        seen[hashlib.sha256(f.read()).hexdigest()] += 1
print(json.dumps(seen))
"""


@pytest.mark.parametrize("reader", ["thread", "process"])
def test_atomic_save_rename_never_shows_a_partial_file(make_mount, tmp_path, reader):
    """write name.tmp, fsync, rename over name, fsync the directory; a concurrent reader that keeps opening
    name reads one complete version every time."""
    versions = _versions(5)
    digests = {sha(v): i for i, v in enumerate(versions)}
    mount = make_mount()
    ckdir = mount.mnt / "run"
    ckdir.mkdir()
    path = ckdir / "latest.ckpt"
    _atomic_save(path, versions[0])

    seen: dict[str, int] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    stop_file = tmp_path / "stop"

    def read_loop():
        try:
            while not stop.is_set():
                with open(path, "rb") as f:
                    digest = sha(f.read())
                seen[digest] = seen.get(digest, 0) + 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    if reader == "thread":
        worker = threading.Thread(target=read_loop, daemon=True)
        worker.start()
    else:
        proc = subprocess.Popen([sys.executable, "-c", READER_SCRIPT, str(path), str(stop_file)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rounds = 30
    try:
        for k in range(1, rounds + 1):
            _atomic_save(path, versions[k % len(versions)])
            time.sleep(0.01)
    finally:
        stop.set()
        stop_file.touch()
        if reader == "thread":
            worker.join(60)
        else:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            seen = json.loads(out)
    assert not errors, errors
    assert sum(seen.values()) >= 10, seen  # the reader really raced the writer
    partial = {d: n for d, n in seen.items() if d not in digests}
    assert not partial, f"{sum(partial.values())} of {sum(seen.values())} reads saw a partial/unknown file"
    log.info("reader %s: %d reads of versions %s", reader, sum(seen.values()),
             sorted(digests[d] for d in seen))
    final = versions[rounds % len(versions)]
    assert path.read_bytes() == final
    assert sorted(os.listdir(ckdir)) == ["latest.ckpt"]
    mount.remount()
    assert path.read_bytes() == final
    assert sorted(os.listdir(mount.backing / "run")) == ["latest.ckpt"]  # no stray temp containers


# ---------------------------------------------------------------------------------------------- tree copies

MTIME_BASE_NS = 1_700_000_000_123_456_789


def _build_checkpoint_dir(root: Path) -> None:
    """A trainer-style checkpoint directory: weights, optimizer/scheduler/rng state, json, a script, a
    tokenizer subdirectory and a 'latest' symlink; odd modes and nanosecond mtimes."""
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)
    x = torch.randn(16, 512)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    ck = root / "checkpoint-2"
    (ck / "tokenizer").mkdir(parents=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                ck / "model.safetensors")
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    torch.save(sched.state_dict(), ck / "scheduler.pt")
    torch.save({"python": np.random.get_state()[1][:8].tolist(), "torch": torch.get_rng_state()},
               ck / "rng_state.pth")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": [{"loss": 1.0}]}))
    (ck / "config.json").write_text(json.dumps({"in": 512, "hidden": 2048}))
    (ck / "tokenizer" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(30_000)))
    (ck / "train.sh").write_text("#!/bin/sh\nexec python train.py \"$@\"\n")
    (ck / "empty").write_bytes(b"")
    os.symlink("checkpoint-2", root / "latest")
    modes = {"optimizer.pt": 0o600, "rng_state.pth": 0o600, "train.sh": 0o755, "config.json": 0o444,
             "tokenizer/vocab.txt": 0o640, "empty": 0o664}
    for rel, mode in modes.items():
        os.chmod(ck / rel, mode)
    os.chmod(ck / "tokenizer", 0o750)
    # Children before parents, so that setting a file's time does not move its directory's mtime.
    entries = sorted((p for p in root.rglob("*") if not p.is_symlink()), key=lambda p: -len(p.parts))
    for i, p in enumerate(entries + [root]):
        t = MTIME_BASE_NS + i * 1_000_003_001
        os.utime(p, ns=(t - 7, t))


def _snapshot(root: Path) -> dict[str, tuple]:
    """rel path -> (kind, st_mode, st_mtime_ns, st_size, sha256) for files; dirs and links likewise."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else root
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir", stat.filemode(st.st_mode), st.st_mtime_ns)
            else:
                assert stat.S_ISREG(st.st_mode), rel
                snap[rel] = ("file", stat.filemode(st.st_mode), st.st_mtime_ns, st.st_size,
                             sha(Path(p).read_bytes()))
    return snap


def _assert_same_tree(got: Path, want: dict[str, tuple], what: str) -> None:
    snap = _snapshot(got)
    assert sorted(snap) == sorted(want), f"{what}: entries differ"
    diffs = [f"{rel}: {snap[rel]} != {want[rel]}" for rel in sorted(want) if snap[rel] != want[rel]]
    assert not diffs, f"{what}:\n" + "\n".join(diffs)


def test_copytree_checkpoint_into_and_out_of_mount(make_mount, tmp_path):
    src = tmp_path / "src"
    _build_checkpoint_dir(src)
    want = _snapshot(src)
    mount = make_mount()
    shutil.copytree(src, mount.mnt / "ckpt", symlinks=True)
    _assert_same_tree(mount.mnt / "ckpt", want, "copytree into the mount")
    mount.remount()
    _assert_same_tree(mount.mnt / "ckpt", want, "copytree into the mount, after a remount")
    shutil.copytree(mount.mnt / "ckpt", tmp_path / "out", symlinks=True)
    _assert_same_tree(tmp_path / "out", want, "copytree out of the mount")


def test_rsync_checkpoint_into_and_out_of_mount(make_mount, tmp_path):
    rsync = shutil.which("rsync")
    if rsync is None:
        pytest.skip("rsync is not installed (apt-get install rsync)")
    src = tmp_path / "src"
    _build_checkpoint_dir(src)
    want = _snapshot(src)
    mount = make_mount()
    dst = mount.mnt / "ckpt"

    def run(*args):
        res = subprocess.run([rsync, *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout

    run("-a", f"{src}/", f"{dst}/")
    _assert_same_tree(dst, want, "rsync -a into the mount")
    mount.remount()
    _assert_same_tree(dst, want, "rsync -a into the mount, after a remount")
    # rsync itself finds nothing to do, even comparing every file's checksum.
    assert run("-a", "--checksum", "--dry-run", "--itemize-changes", f"{src}/", f"{dst}/") == ""
    out = tmp_path / "out"
    run("-a", f"{dst}/", f"{out}/")
    _assert_same_tree(out, want, "rsync -a out of the mount")
    # An incremental rsync into the mount: one file changed (same size, new content) goes through rsync's
    # temp-file-and-rename path and lands intact.
    changed = src / "checkpoint-2" / "trainer_state.json"
    os.chmod(changed, 0o644)
    changed.write_text(changed.read_text().replace("1.0", "2.0"))
    os.utime(changed, ns=(MTIME_BASE_NS, MTIME_BASE_NS + 42))
    run("-a", f"{src}/", f"{dst}/")
    mount.remount()
    _assert_same_tree(dst, _snapshot(src), "incremental rsync -a into the mount")
