"""Delta-base pins after crashes, with older versions, --shared mounts and fsck: leaks at worst, never a lost base."""
from __future__ import annotations

import os
import time

import pytest
from test_delta_mount import dccfs, series  # noqa: F401 (series is a fixture)
from test_pins import (assert_fsck_clean, forced, pins_of, records_of, steps, two_steps,  # noqa: F401
                       wait_no_pins, wait_until, write)

pytestmark = pytest.mark.mount


def test_kill9_right_after_deletes_leaves_every_file_readable(make_mount, steps, tmp_path):
    mount = make_mount("pins-crash", *forced(tmp_path))
    kept_a = two_steps(mount, steps, "alpha")
    gone_b = two_steps(mount, steps, "beta")
    assert len(pins_of(mount)) == 2
    os.unlink(kept_a[0])
    for path in gone_b:
        os.unlink(path)
    mount.kill()
    mount.expect_errors = True  # the killed daemon's last lines are whatever they were
    mount.start()
    mount.expect_errors = False
    assert kept_a[1].read_bytes() == steps[1]
    mount.stop()
    result = dccfs("fsck", "--repair", mount.backing)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_fsck_clean(mount)
    mount.start()
    assert kept_a[1].read_bytes() == steps[1]
    assert len(pins_of(mount)) == 1 and len(records_of(mount)) == 1
    os.unlink(kept_a[1])
    wait_no_pins(mount)
    mount.stop()


def test_pins_of_older_versions_and_shared_mounts_are_left_to_fsck(make_mount, steps, tmp_path):
    import shutil
    mount = make_mount("pins-legacy", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    mount.stop()
    shutil.rmtree(mount.backing / ".dccfs" / "refs")  # as an older version left it: no records
    mount.start()
    pins = pins_of(mount)
    os.unlink(step10)
    newer = two_steps(mount, steps, "newer")  # a pin made now, with its record
    assert len(pins_of(mount)) == 2 and len(records_of(mount)) == 1
    os.unlink(step20)
    for path in newer:
        os.unlink(path)
    wait_until(lambda: pins_of(mount) == pins, "the new pin freed")
    mount.remount()
    assert pins_of(mount) == pins  # the old one is never freed online
    shared_pair = two_steps(mount, steps, "shared")
    mount.stop()
    held = pins_of(mount)
    assert len(held) == 2 and len(records_of(mount)) == 1
    # A --shared mount frees nothing: other nodes write containers it never hears of.
    shared = make_mount("pins-shared", "--shared", backing=mount.backing)
    for path in shared_pair:
        os.unlink(shared.mnt / "shared" / path.name)
    shared.stop()
    assert pins_of(mount) == held and len(records_of(mount)) == 1
    result = dccfs("fsck", mount.backing)
    assert "fsck --repair removes it" in result.stdout, result.stdout
    # (found by review: the summary called every pin without a visible name kept for its dependents)
    assert "except the 2 that no file references any more" in result.stdout, result.stdout
    result = dccfs("fsck", "--repair", mount.backing)
    assert result.returncode == 0 and "removed a delta base" in result.stdout, result.stdout
    assert pins_of(mount) == []
    assert_fsck_clean(mount)


def test_fsck_reports_and_repairs_stale_and_missing_records(make_mount, steps, tmp_path):
    mount = make_mount("pins-fsck", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    mount.stop()
    (pin, (dependent,)), = records_of(mount).items()
    refs = mount.backing / ".dccfs" / "refs" / pin
    os.unlink(refs / dependent)  # missing: the mount could free a pin step 20 needs
    (refs / ("0" * 32 + "-0")).touch()  # stale: no such container
    result = dccfs("fsck", mount.backing)
    assert result.returncode == 1
    assert "MISSING RECORD" in result.stdout and "stale record" in result.stdout, result.stdout
    assert sorted(os.listdir(refs)) == ["0" * 32 + "-0"]  # fsck alone changes nothing
    result = dccfs("fsck", "--repair", mount.backing)
    assert result.returncode == 0, result.stdout
    assert records_of(mount) == {pin: [dependent]}
    assert_fsck_clean(mount)
    mount.start()
    os.unlink(step10)
    os.unlink(step20)
    wait_no_pins(mount)
    mount.stop()


ROTATE_CLIENT = r"""
import os, sys
mnt, journal, first, sources = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
log = open(journal, "a", buffering=1)
k = first
while True:
    data = open(sources[(k - 1) % len(sources)], "rb").read()
    final = os.path.join(mnt, f"step-{k}.safetensors")
    with open(final + ".tmp", "wb") as f:  # an atomic save, as checkpoint writers do
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(final + ".tmp", final)
    log.write(f"done {k}\n")
    if k > 2:
        log.write(f"unlinking {k - 2}\n")
        os.unlink(os.path.join(mnt, f"step-{k - 2}.safetensors"))
        log.write(f"unlinked {k - 2}\n")
    k += 1
"""


def _crash_rotation(make_mount, steps, tmp_path, points: int, seed: int, unpin_rewrite: bool = False) -> None:
    import random
    import subprocess
    import sys
    rng = random.Random(seed)
    sources = []
    for i, data in enumerate(steps):
        sources.append(tmp_path / f"src-{i}")
        sources[-1].write_bytes(data)
    journal = tmp_path / "journal"
    journal.touch()
    mount = make_mount("pins-crash-rotation", *forced(tmp_path, unpin_rewrite=unpin_rewrite))
    (mount.mnt / "run").mkdir()
    next_step = 1
    for _ in range(points):
        client = subprocess.Popen([sys.executable, "-c", ROTATE_CLIENT, str(mount.mnt / "run"), str(journal),
                                   str(next_step), *map(str, sources)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 3.0))
        mount.kill()
        client.kill()  # it started by this test; its writes now fail anyway
        client.wait()
        done, unlinking, unlinked = set(), set(), set()
        for line in journal.read_text().splitlines():
            what, k = line.split()
            {"done": done, "unlinking": unlinking, "unlinked": unlinked}[what].add(int(k))
        next_step = max(done, default=0) + 1
        mount.expect_errors = True
        mount.start()
        mount.expect_errors = False
        for k in sorted(done - unlinked):
            path = mount.mnt / "run" / f"step-{k}.safetensors"
            if k in unlinking and not path.exists():
                continue
            assert path.read_bytes() == steps[(k - 1) % len(steps)], f"step {k} after a kill"
        for name in os.listdir(mount.mnt / "run"):
            if name.endswith(".tmp"):
                os.unlink(mount.mnt / "run" / name)  # a save the crash interrupted
        mount.stop()
        result = dccfs("fsck", "--repair", mount.backing)
        assert result.returncode == 0, result.stdout + result.stderr
        assert_fsck_clean(mount)
        mount.start()
    for name in os.listdir(mount.mnt / "run"):
        os.unlink(mount.mnt / "run" / name)
    wait_no_pins(mount)
    mount.stop()


@pytest.mark.parametrize("unpin_rewrite", [False, True], ids=["pins-kept", "keyframes-again"])
def test_kill9_during_a_rotating_run(make_mount, steps, tmp_path, unpin_rewrite):
    """Kills at random points of a run that saves a step and deletes the oldest; with the
    rewrite on (the default), some land while a dependent is stored again without its base."""
    _crash_rotation(make_mount, steps, tmp_path, points=2, seed=7, unpin_rewrite=unpin_rewrite)


@pytest.mark.stress
@pytest.mark.parametrize("unpin_rewrite", [False, True], ids=["pins-kept", "keyframes-again"])
def test_kill9_during_a_rotating_run_many_points(make_mount, steps, tmp_path, unpin_rewrite):
    _crash_rotation(make_mount, steps, tmp_path, points=int(os.environ.get("DCCFS_CRASH_POINTS", "30")),
                    seed=int(os.environ.get("DCCFS_SEED", "11")), unpin_rewrite=unpin_rewrite)


def test_fsck_reports_a_dependent_copied_behind_the_mount(make_mount, steps, tmp_path):
    import shutil
    mount = make_mount("pins-copy", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    mount.stop()
    shutil.copy2(mount.backing / "run" / step20.name, mount.backing / "run" / "backup.safetensors")
    result = dccfs("fsck", "--repair", mount.backing)
    assert result.returncode == 1 and "DUPLICATE" in result.stdout, result.stdout
    assert len(pins_of(mount)) == 1


def test_a_kill_during_a_write_to_a_linked_file_leaves_a_torn_tail_that_is_cut(make_mount):
    """A file with a second link (a delta base pin, or here a user's hard link) keeps bytes past
    its last commit only when they may be committed records behind a damaged index. What a killed
    writer leaves (whole chunk records, then one cut short) is cut like in any file, by the next
    write or by fsck --repair: the file stayed unwritable (EIO) and fsck could not clear it (found
    by review)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    mount = make_mount("linked-torn")
    mount.expect_errors = True  # the killed daemons' last lines are whatever they were
    content = os.urandom(1 << 20)
    (mount.mnt / "f.txt").write_bytes(content)
    os.link(mount.mnt / "f.txt", mount.mnt / "g.txt")
    backing = mount.backing / "f.txt"

    def append_and_kill():
        fd = os.open(mount.mnt / "f.txt", os.O_WRONLY | os.O_APPEND)
        size = backing.stat().st_size
        os.write(fd, os.urandom(2 << 20))  # eight 256 KiB chunks, stored as they fill
        assert libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), 1 | 2 | 4) == 0
        wait_until(lambda: backing.stat().st_size > size + (1 << 20), "the new chunk records appended")
        mount.kill()
        with pytest.raises(OSError):
            os.close(fd)

    for by in ("the next write", "fsck --repair"):
        append_and_kill()
        if by == "fsck --repair":
            result = dccfs("fsck", mount.backing)
            assert result.returncode == 1 and "TORN TAIL" in result.stdout, result.stdout
            assert "DAMAGED" not in result.stdout and "cannot be fully read" not in result.stdout, result.stdout
            result = dccfs("fsck", "--repair", mount.backing)
            assert result.returncode == 0, result.stdout + result.stderr
        mount.start()
        assert (mount.mnt / "g.txt").read_bytes() == content
        with open(mount.mnt / "f.txt", "ab") as f:
            f.write(b"more")
            f.flush()
            os.fsync(f.fileno())
        content += b"more"
        assert (mount.mnt / "g.txt").read_bytes() == content
    mount.stop()
    assert_fsck_clean(mount)


def test_fsck_checks_a_delta_base_under_no_visible_name(make_mount, steps, tmp_path):
    """A pin that no visible name links any more is a container its dependents' deltas read: fsck
    checks its chunks and names it (found by review: it was never checked)."""
    from dccfs.container import Container
    mount = make_mount("pins-hidden", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    os.unlink(step10)  # only the pin keeps it now
    mount.stop()
    [pin] = pins_of(mount)
    pin_path = mount.backing / ".dccfs" / "bases" / pin
    result = dccfs("fsck", mount.backing)
    assert result.returncode == 0 and "1 files and 1 delta bases under no visible name" in result.stdout, \
        result.stdout
    fd = os.open(pin_path, os.O_RDWR)
    try:
        loc = Container.open(fd, str(pin_path)).index[0]
        middle = loc.offset + loc.length // 2
        os.pwrite(fd, bytes([os.pread(fd, 1, middle)[0] ^ 0xFF]), middle)
    finally:
        os.close(fd)
    result = dccfs("fsck", mount.backing)
    assert result.returncode == 1 and f"{pin_path}: DAMAGED: chunk 0" in result.stdout, result.stdout
