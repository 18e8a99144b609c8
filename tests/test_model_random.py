"""Model-based random test: a seeded operation sequence on a real mount and a plain directory."""
from __future__ import annotations

import os
import random

import pytest

pytestmark = pytest.mark.mount

OPS = int(os.environ.get("DCCFS_MODEL_OPS", "2000"))
SEEDS = [int(s) for s in os.environ.get("DCCFS_MODEL_SEEDS", "1").split(",")]
NAMES = ["a", "b", "c", "sub/d", "sub/e"]
MAX_OFFSET = 1_500_000
MAX_WRITE = 700_000


class Pair:
    """The same file opened in the mount and in the reference directory."""

    def __init__(self, mnt_root, ref_root, name, flags):
        self.name = name
        self.fds = (os.open(mnt_root / name, flags, 0o644), os.open(ref_root / name, flags, 0o644))

    def close(self):
        for fd in self.fds:
            os.close(fd)


def _compare_fd(pair: Pair, context: str) -> None:
    sizes = [os.fstat(fd).st_size for fd in pair.fds]
    assert sizes[0] == sizes[1], f"{context}: size {sizes[0]} != reference {sizes[1]}"
    got = os.pread(pair.fds[0], sizes[1] + 10, 0)
    want = os.pread(pair.fds[1], sizes[1] + 10, 0)
    assert got == want, f"{context}: content differs (first diff at {_first_diff(got, want)})"


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _compare_trees(mnt, ref, context):
    for name in NAMES:
        m, r = mnt / name, ref / name
        assert m.exists() == r.exists(), f"{context}: {name} exists={m.exists()} vs {r.exists()}"
        if r.exists():
            assert m.stat().st_size == r.stat().st_size, f"{context}: {name} size"
            assert m.read_bytes() == r.read_bytes(), f"{context}: {name} content"
            assert m.stat().st_nlink == r.stat().st_nlink, f"{context}: {name} nlink"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_match_plain_directory(make_mount, tmp_path, seed):
    mount = make_mount("model")
    ref = tmp_path / "reference"
    (ref / "sub").mkdir(parents=True)
    (mount.mnt / "sub").mkdir()
    rng = random.Random(seed)
    open_pairs: dict[str, Pair] = {}
    orphans: list[Pair] = []
    payload = os.urandom(MAX_WRITE) + bytes(MAX_WRITE)

    def pair_for(name):
        if name not in open_pairs:
            open_pairs[name] = Pair(mount.mnt, ref, name, os.O_RDWR | os.O_CREAT)
        return open_pairs[name]

    def close_all():
        for pair in list(open_pairs.values()) + orphans:
            pair.close()
        open_pairs.clear()
        orphans.clear()

    try:
        for step in range(OPS):
            context = f"seed {seed} step {step}"
            name = rng.choice(NAMES)
            op = rng.choices(
                ["write", "read", "truncate", "fsync", "close", "rename", "unlink_open",
                 "link", "orphan_io", "remount"],
                weights=[30, 15, 8, 5, 8, 5, 3, 3, 4, 0.25])[0]
            if op == "write":
                pair = pair_for(name)
                off = rng.randrange(MAX_OFFSET)
                size = rng.randrange(1, MAX_WRITE)
                start = rng.randrange(len(payload) - size)
                for fd in pair.fds:
                    os.pwrite(fd, payload[start:start + size], off)
                _compare_fd(pair, context + f" write {name} off={off} size={size}")
            elif op == "read":
                pair = pair_for(name)
                off, size = rng.randrange(MAX_OFFSET + MAX_WRITE), rng.randrange(1, MAX_WRITE)
                got, want = (os.pread(fd, size, off) for fd in pair.fds)
                assert got == want, f"{context}: read {name} off={off} size={size}"
            elif op == "truncate":
                pair = pair_for(name)
                size = rng.randrange(MAX_OFFSET + MAX_WRITE)
                for fd in pair.fds:
                    os.ftruncate(fd, size)
                _compare_fd(pair, context + f" truncate {name} to {size}")
            elif op == "fsync" and name in open_pairs:
                os.fsync(open_pairs[name].fds[0])
            elif op == "close" and name in open_pairs:
                open_pairs.pop(name).close()
            elif op == "rename":
                target = rng.choice(NAMES)
                if (ref / name).exists() and target != name:
                    os.rename(mount.mnt / name, mount.mnt / target)
                    os.rename(ref / name, ref / target)
                    if name in open_pairs:
                        if target in open_pairs:
                            orphans.append(open_pairs.pop(target))
                        open_pairs[target] = open_pairs.pop(name)
                    elif target in open_pairs:
                        orphans.append(open_pairs.pop(target))
            elif op == "unlink_open" and name in open_pairs and (ref / name).exists():
                os.unlink(mount.mnt / name)
                os.unlink(ref / name)
                orphans.append(open_pairs.pop(name))
            elif op == "link":
                target = rng.choice(NAMES)
                if (ref / name).exists() and not (ref / target).exists():
                    os.link(mount.mnt / name, mount.mnt / target)
                    os.link(ref / name, ref / target)
            elif op == "orphan_io" and orphans:
                pair = rng.choice(orphans)
                off, size = rng.randrange(MAX_OFFSET), rng.randrange(1, 100_000)
                for fd in pair.fds:
                    os.pwrite(fd, payload[:size], off)
                _compare_fd(pair, context + " write to unlinked file")
            elif op == "remount":
                close_all()
                mount.remount()
                _compare_trees(mount.mnt, ref, context + " after remount")
            if step % 100 == 99:
                _compare_trees(mount.mnt, ref, context)
        close_all()
        _compare_trees(mount.mnt, ref, f"seed {seed} end")
        mount.remount()
        _compare_trees(mount.mnt, ref, f"seed {seed} end after remount")
    except AssertionError as exc:
        raise AssertionError(f"model test failed; rerun with DCCFS_MODEL_SEEDS={seed}: {exc}") from None
    finally:
        close_all()
