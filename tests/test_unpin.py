"""A delta whose base loses its last name is stored again without it and the pin freed, through a real mount."""
from __future__ import annotations

import json
import os

import pytest
from test_delta_mount import dccfs, series  # noqa: F401 (series is a fixture)
from test_pins import (assert_fsck_clean, forced, pins_of, steps, two_steps, wait_no_pins,  # noqa: F401
                       wait_until, write)

pytestmark = pytest.mark.mount


def file_row(mount, path) -> dict:
    rows = json.loads(dccfs("stats", "--json", "--files", path, mount.mnt).stdout)
    return rows[0]


def unpin_rewrites(mount) -> int:
    return json.loads(dccfs("stats", "--json", mount.mnt).stdout)["stats"]["unpin_rewrites"]


def test_a_delta_whose_base_is_deleted_becomes_keyframes_and_frees_the_base(make_mount, steps, tmp_path):
    mount = make_mount("unpin", *forced(tmp_path, unpin_rewrite=True))
    step10, step20 = two_steps(mount, steps)
    assert len(pins_of(mount)) == 1 and file_row(mount, step20).get("delta_of")
    os.unlink(step10)
    wait_no_pins(mount)
    assert unpin_rewrites(mount) == 1
    row = file_row(mount, step20)
    assert not row.get("delta_of"), row
    assert step20.read_bytes() == steps[1]
    mount.remount()
    assert step20.read_bytes() == steps[1]
    assert "delta chunks stored again as keyframes" in mount.log_text()
    mount.stop()
    assert_fsck_clean(mount)


def only_pinned(mount) -> int:
    """Pinned bases that no visible name links any more."""
    return json.loads(dccfs("stats", "--json", mount.mnt).stdout)["stats"]["delta_bases"]["only_pinned"]


def test_a_rotating_run_keeps_no_base_that_only_its_pin_holds(make_mount, steps, tmp_path):
    """save_total_limit=2: save a step, then delete the oldest. Without the rewrite, step 10 stayed
    pinned beside step 20 (its delta) and step 30 (a keyframe: 20 is as deep as delta_chain
    allows); now step 20 becomes a delta of step 30, the newest keyframe, and step 10 goes."""
    mount = make_mount("unpin-rotate", *forced(tmp_path, unpin_rewrite=True))
    run = mount.mnt / "run"
    run.mkdir()
    kept = []
    for k in range(1, 7):
        path = run / f"step-{k * 10}.safetensors"
        write(path, steps[(k - 1) % len(steps)])
        kept.append(path)
        if len(kept) > 2:
            os.unlink(kept.pop(0))
        wait_until(lambda: only_pinned(mount) == 0, f"no base held only by its pin after step {k * 10}")
        assert len(pins_of(mount)) <= 1
        older, newer = (file_row(mount, p) for p in kept) if len(kept) == 2 else (None, None)
        if older is not None:
            # one keyframe and one delta of it, whichever way round
            assert bool(older.get("delta_of")) != bool(newer.get("delta_of")), (older, newer)
    for k, path in zip((5, 6), kept):
        assert path.read_bytes() == steps[(k - 1) % len(steps)]
    assert unpin_rewrites(mount) >= 1 and "stored again as deltas of run/step-" in mount.log_text()
    mount.stop()
    assert_fsck_clean(mount)


def test_a_dependent_renamed_in_its_directory_or_with_it_is_found(make_mount, steps, tmp_path):
    """A temporary renamed to its final name, and a directory renamed (tmp-checkpoint-20/ to
    checkpoint-20/), after the deltas were written."""
    mount = make_mount("unpin-renamed", *forced(tmp_path, unpin_rewrite=True))
    step10, step20 = two_steps(mount, steps)
    renamed = step20.with_name("final.safetensors")
    os.rename(step20, renamed)
    os.unlink(step10)
    wait_no_pins(mount)
    assert renamed.read_bytes() == steps[1]

    (mount.mnt / "tmp-checkpoint-10").mkdir()
    (mount.mnt / "tmp-checkpoint-20").mkdir()
    base = mount.mnt / "tmp-checkpoint-10" / "model.safetensors"
    dependent = mount.mnt / "tmp-checkpoint-20" / "model.safetensors"
    write(base, steps[0])
    write(dependent, steps[1])
    assert len(pins_of(mount)) == 1
    os.rename(mount.mnt / "tmp-checkpoint-20", mount.mnt / "checkpoint-20")
    os.unlink(base)
    wait_no_pins(mount)
    assert (mount.mnt / "checkpoint-20" / "model.safetensors").read_bytes() == steps[1]
    mount.stop()
    assert_fsck_clean(mount)


def test_a_dependent_moved_out_of_reach_keeps_its_base_pinned_until_it_goes(make_mount, steps, tmp_path):
    mount = make_mount("unpin-moved", *forced(tmp_path, unpin_rewrite=True))
    step10, step20 = two_steps(mount, steps)
    (mount.mnt / "far" / "away").mkdir(parents=True)
    moved = mount.mnt / "far" / "away" / "x.safetensors"
    os.rename(step20, moved)
    os.unlink(step10)
    wait_until(lambda: "is no longer at" in mount.log_text(), "the search given up")
    mount.remount()
    assert len(pins_of(mount)) == 1 and unpin_rewrites(mount) == 0
    assert moved.read_bytes() == steps[1]
    os.unlink(moved)
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


def test_a_dependent_open_when_its_base_goes_is_rewritten_after_its_close(make_mount, steps, tmp_path):
    mount = make_mount("unpin-open", *forced(tmp_path, unpin_rewrite=True))
    step10, step20 = two_steps(mount, steps)
    mount.remount()  # nothing of step 20 in the kernel's page cache; its path from the record
    with open(step20, "rb") as reader:
        os.unlink(step10)
        assert reader.read(1 << 20) == steps[1][:1 << 20]
        assert len(pins_of(mount)) == 1
        assert reader.read() == steps[1][1 << 20:]
    wait_no_pins(mount)
    assert unpin_rewrites(mount) == 1
    assert step20.read_bytes() == steps[1]
    mount.stop()
    assert_fsck_clean(mount)


def test_off_in_the_config_keeps_the_base_pinned(make_mount, steps, tmp_path):
    mount = make_mount("unpin-off", *forced(tmp_path, unpin_rewrite=False))
    step10, step20 = two_steps(mount, steps)
    os.unlink(step10)
    mount.remount()
    assert len(pins_of(mount)) == 1 and file_row(mount, step20).get("delta_of")
    mount.stop()
    assert_fsck_clean(mount)


def test_a_base_deleted_while_unmounted_is_freed_at_the_next_mount(make_mount, steps, tmp_path):
    mount = make_mount("unpin-offline", *forced(tmp_path, unpin_rewrite=True))
    step10, step20 = two_steps(mount, steps)
    mount.stop()
    os.unlink(mount.backing / "run" / step10.name)
    mount.start()
    wait_no_pins(mount)
    assert step20.read_bytes() == steps[1]
    mount.stop()
    assert_fsck_clean(mount)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_kill9_during_the_rewrite_loses_nothing(make_mount, steps, tmp_path, delay):
    """kill -9 while the dependent is copied as keyframes (or just before, or after): the file
    reads back exactly, fsck finds nothing, and the next mount finishes the job."""
    import time
    mount = make_mount(f"unpin-kill-{delay}", *forced(tmp_path, unpin_rewrite=True))
    step10, step20 = two_steps(mount, steps)
    os.unlink(step10)
    time.sleep(delay)
    mount.kill()
    mount.expect_errors = True
    result = dccfs("fsck", mount.backing)
    assert result.returncode == 0, result.stdout + result.stderr
    mount.start()
    mount.expect_errors = False
    assert step20.read_bytes() == steps[1]
    wait_no_pins(mount)
    assert step20.read_bytes() == steps[1]
    mount.stop()
    assert_fsck_clean(mount)


def test_the_search_opens_no_fifo_and_follows_no_symlink(make_mount, steps, tmp_path):
    """A FIFO where the search looks blocked its open for good (and the unmount with it); a
    symlinked directory on the recorded path matched, then the open through the mount failed
    (both found by review)."""
    mount = make_mount("unpin-fifo", *forced(tmp_path, unpin_rewrite=True))
    step10, step20 = two_steps(mount, steps)
    final = step20.with_name("step-20-final.safetensors")
    os.rename(step20, final)
    os.mkfifo(step20)
    os.unlink(step10)
    wait_no_pins(mount)
    assert final.read_bytes() == steps[1]
    os.unlink(step20)

    step10, step20 = two_steps(mount, steps, directory="linked")
    os.rename(mount.mnt / "linked", mount.mnt / "real")
    os.symlink("real", mount.mnt / "linked")
    os.unlink(mount.mnt / "real" / step10.name)
    wait_no_pins(mount)
    assert (mount.mnt / "real" / step20.name).read_bytes() == steps[1]
    mount.stop()
    assert_fsck_clean(mount)


def test_no_file_still_being_written_becomes_the_new_base(make_mount, steps, tmp_path):
    """step-40 open, half written and fsynced (a trailer, so a candidate): step 20 took it as its
    base, half of its chunks became keyframes, and step 40's deltas after close were refused
    (found by review)."""
    from dccfs.format import HEADER_SIZE, Header
    mount = make_mount("unpin-busy", *forced(tmp_path, "delta_during_write = false\n", unpin_rewrite=True))
    run = mount.mnt / "run"
    run.mkdir()
    paths = {n: run / f"step-{n}.safetensors" for n in (10, 20, 30, 40)}
    for n, data in zip((10, 20, 30), steps):
        write(paths[n], data)
        if n == 20:
            wait_until(lambda: file_row(mount, paths[20]).get("delta_of"), "step 20's deltas after close")
    with open(paths[40], "wb") as writer:
        writer.write(steps[0][:len(steps[0]) // 2])
        writer.flush()
        os.fsync(writer.fileno())
        with open(mount.backing / "run" / paths[40].name, "rb") as backing:
            busy_id = Header.unpack(backing.read(HEADER_SIZE)).file_id.hex()
        os.unlink(paths[10])
        wait_until(lambda: unpin_rewrites(mount) == 1, "step 20 stored again")
        assert busy_id not in file_row(mount, paths[20]).get("delta_of", [])
        writer.write(steps[0][len(steps[0]) // 2:])
    assert paths[20].read_bytes() == steps[1] and paths[40].read_bytes() == steps[0]
    wait_until(lambda: only_pinned(mount) == 0, "no base held only by its pin")
    # Step 40's own deltas after close: an unmount that stops that pass leaves the base its put-off
    # deltas pinned for fsck --repair (a known leak, docs/reliability.md "Not yet guaranteed"), which
    # is not what this test is about (it failed at times under load, 2026-12-07).
    wait_until(lambda: file_row(mount, paths[40]).get("delta_of"), "step 40's deltas after close")
    mount.stop()
    assert_fsck_clean(mount)
