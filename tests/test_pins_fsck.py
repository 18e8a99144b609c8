"""fsck --repair on delta-base pins a real mount left: a damaged pin with no visible name, junk in the state directory."""
from __future__ import annotations

import os

import pytest
from test_delta_mount import dccfs, series  # noqa: F401 (series is a fixture)
from test_pins import forced, pins_of, steps, write  # noqa: F401 (steps is a fixture)

from dccfs.delta_bases import every_record_base

pytestmark = pytest.mark.mount


def chain_of_three(make_mount, steps, tmp_path, name):
    """Steps 10 <- 20 <- 30 (each a delta of the one before, chain 3), then 10 and 20 deleted: two pins left
    with no visible name. Returns the stopped mount and step 20's pin (the one whose records name another)."""
    mount = make_mount(name, *forced(tmp_path, "delta_chain = 3\n"))
    (mount.mnt / "run").mkdir()
    paths = [mount.mnt / "run" / f"step-{n}.safetensors" for n in (10, 20, 30)]
    for data, path in zip(steps, paths):
        write(path, data)
    os.unlink(paths[0])
    os.unlink(paths[1])
    mount.stop()
    bases = mount.backing / ".dccfs" / "bases"
    middle = []
    for pin in pins_of(mount):
        fd = os.open(bases / pin, os.O_RDONLY)
        try:
            if every_record_base(fd, pin):
                middle.append(pin)
        finally:
            os.close(fd)
    assert len(pins_of(mount)) == 2 and len(middle) == 1
    return mount, bases / middle[0]


def test_repair_frees_no_pin_behind_a_damaged_end_of_a_pinned_base(make_mount, steps, tmp_path):
    """The end of step 20's pin (its trailer) is destroyed: the commit found by scanning ends before the records
    step 30 reads, which name step 10's pin. fsck must leave the pins as they are and say why (found by review:
    --repair removed step 10's pin, and step 30 read EIO)."""
    mount, middle = chain_of_three(make_mount, steps, tmp_path, "fsck-damaged-pin")
    size = middle.stat().st_size
    with open(middle, "r+b") as f:
        f.seek(size - 64)
        f.write(bytes(64))
    for args in (("fsck",), ("fsck", "--repair")):
        result = dccfs(*args, mount.backing)
        assert "pins and their records left as they are" in result.stdout + result.stderr, result.stdout
        # (named by the pin's own check since fsck checks pins under no visible name; before, by check_pins)
        assert f"{middle}: DAMAGED: " in result.stdout and "not cut: a delta base's pin" in result.stdout
        assert "no file references" not in result.stdout
    assert len(pins_of(mount)) == 2
    mount.start()
    assert (mount.mnt / "run" / "step-30.safetensors").read_bytes() == steps[2]


def test_repair_leaves_directories_in_the_state_directory_and_goes_on(make_mount, steps, tmp_path):
    """A directory where fsck expects a pin or a record, or a file where it expects a directory of records, is
    reported once and left, and the rest of the repair still happens (found by review: --repair stopped with
    IsADirectoryError, and the file passed silently)."""
    mount, middle = chain_of_three(make_mount, steps, tmp_path, "fsck-junk")
    (middle.parent / "junk").mkdir()
    (mount.backing / ".dccfs" / "refs" / middle.name / "junk").mkdir()
    stale = mount.backing / ".dccfs" / "refs" / middle.name / ("0" * 32 + "-0")
    stale.write_bytes(b"")
    (mount.backing / ".dccfs" / "refs" / ("f" * 32 + "-0")).write_bytes(b"")
    result = dccfs("fsck", "--repair", mount.backing)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in out, out
    assert out.count("junk: not a delta base (a directory): left as it is") == 1, out
    assert "junk: not a record (a directory): left as it is" in out
    assert f"{'f' * 32}-0: not a directory of records (a file)" in out
    assert "removed a stale record" in out and not stale.exists()
    mount.start()
    assert (mount.mnt / "run" / "step-30.safetensors").read_bytes() == steps[2]
