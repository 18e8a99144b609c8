"""Delta-base pins freed online through a real mount: deletes, renames, links, overwrites, compactions, chains."""
from __future__ import annotations

import os
import time

import pytest
from test_delta_mount import dccfs, series  # noqa: F401 (series is a fixture)

pytestmark = pytest.mark.mount

# An upper bound for the registry's worker (a syncfs and a few unlinks) on a busy machine;
# the wait ends as soon as the state is reached.
FREE_WAIT_S = 60


@pytest.fixture(scope="module")
def steps(series):
    """Three consecutive checkpoints as safetensors bytes (the third one step after the second)."""
    import torch
    from safetensors.torch import save
    gen = torch.Generator().manual_seed(1)
    third = {k: (v - 1e-4 * torch.randn(v.shape, generator=gen) * v.abs().mean()).contiguous()
             if v.is_floating_point() else v for k, v in series[1].items()}
    return save(series[0]), save(series[1]), save(third)


def forced(tmp_path, extra: str = "", unpin_rewrite: bool = False):
    config = tmp_path / "pins.toml"
    # Force deltas: by default they only run while the encoders keep up with the writer. These
    # tests follow pins while their bases are deleted: a rewrite of the dependent as keyframes
    # would free them at once (tests/test_unpin.py), so it is off unless asked for.
    unpin = f"delta_unpin_rewrite = {str(unpin_rewrite).lower()}\n"
    config.write_text(unpin + extra + '[[rule]]\nglob = "*"\ndelta = true\n')
    return "-c", str(config)


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def pins_of(mount) -> list[str]:
    try:
        return sorted(n for n in os.listdir(mount.backing / ".dccfs" / "bases") if not n.endswith(".tmp"))
    except FileNotFoundError:
        return []


def records_of(mount) -> dict[str, list[str]]:
    refs = mount.backing / ".dccfs" / "refs"
    try:
        return {pin: sorted(os.listdir(refs / pin)) for pin in os.listdir(refs)}
    except FileNotFoundError:
        return {}


def wait_until(condition, what: str):
    deadline = time.monotonic() + FREE_WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {FREE_WAIT_S} s: {what}"
        time.sleep(0.05)


def wait_no_pins(mount) -> None:
    wait_until(lambda: not pins_of(mount) and not records_of(mount), "every pin freed")
    # Nor does the daemon keep a freed pin open (its blocks would stay allocated).
    fd_dir = f"/proc/{mount.pid}/fd"
    wait_until(lambda: not any(".dccfs/bases/" in _readlink(os.path.join(fd_dir, n))
                               for n in os.listdir(fd_dir)), "no descriptor of a freed pin")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def two_steps(mount, steps, directory="run"):
    (mount.mnt / directory).mkdir(exist_ok=True)
    paths = [mount.mnt / directory / f"step-{n}.safetensors" for n in (10, 20)]
    for data, path in zip(steps, paths):
        write(path, data)
    return paths


def assert_fsck_clean(mount) -> None:
    result = dccfs("fsck", mount.backing)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no file references" not in result.stdout and "stale" not in result.stdout, result.stdout


def test_pin_stays_while_needed_and_goes_with_its_last_dependent(make_mount, steps, tmp_path):
    mount = make_mount("pins", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    pins = pins_of(mount)
    assert len(pins) == 1
    assert list(records_of(mount)) == pins and len(records_of(mount)[pins[0]]) == 1
    os.unlink(step10)
    mount.remount()  # the unmount finishes the registry's work: the pin must still be there
    assert pins_of(mount) == pins
    assert step20.read_bytes() == steps[1]
    os.unlink(step20)
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


def test_open_unlinked_dependent_stays_readable_until_its_close(make_mount, steps, tmp_path):
    mount = make_mount("pins-open", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    mount.remount()  # nothing of step 20 in the kernel's page cache
    with open(step20, "rb") as f:
        os.unlink(step10)
        os.unlink(step20)
        assert f.read() == steps[1]
        assert len(pins_of(mount)) == 1
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


def test_dependent_renamed_elsewhere_then_base_then_dependent_deleted(make_mount, steps, tmp_path):
    mount = make_mount("pins-rename", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    (mount.mnt / "kept" / "deeper").mkdir(parents=True)
    moved = mount.mnt / "kept" / "deeper" / "final.safetensors"
    os.rename(step20, moved)
    os.unlink(step10)
    mount.remount()
    assert len(pins_of(mount)) == 1
    assert moved.read_bytes() == steps[1]
    os.unlink(moved)
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


def test_dependent_with_a_second_hard_link(make_mount, steps, tmp_path):
    mount = make_mount("pins-link", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    other = mount.mnt / "run" / "best.safetensors"
    os.link(step20, other)
    os.unlink(step10)
    os.unlink(step20)
    mount.remount()
    assert len(pins_of(mount)) == 1
    assert other.read_bytes() == steps[1]
    os.unlink(other)
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


def test_overwriting_a_dependent_in_place_frees_its_base(make_mount, steps, tmp_path):
    mount = make_mount("pins-trunc", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    os.unlink(step10)
    write(step20, b"not a checkpoint any more\n" * 1000)  # O_TRUNC: reset in place, a new file id
    wait_no_pins(mount)
    assert step20.read_bytes() == b"not a checkpoint any more\n" * 1000
    mount.stop()
    assert_fsck_clean(mount)


def test_atomic_save_over_a_dependent_frees_its_base(make_mount, steps, tmp_path):
    mount = make_mount("pins-replace", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    os.unlink(step10)
    tmp = mount.mnt / "run" / "notes.tmp"
    write(tmp, b"saved atomically\n" * 1000)
    os.replace(tmp, step20)
    wait_no_pins(mount)
    assert step20.read_bytes() == b"saved atomically\n" * 1000
    mount.stop()
    assert_fsck_clean(mount)


def test_a_chain_is_freed_bottom_up(make_mount, steps, tmp_path):
    mount = make_mount("pins-chain", *forced(tmp_path, "delta_chain = 2\n"))
    (mount.mnt / "run").mkdir()
    paths = [mount.mnt / "run" / f"step-{n}.safetensors" for n in (10, 20, 30)]
    for data, path in zip(steps, paths):
        write(path, data)
    assert len(pins_of(mount)) == 2  # step 10 for step 20, step 20 for step 30
    os.unlink(paths[0])
    os.unlink(paths[1])
    mount.remount()
    assert len(pins_of(mount)) == 2  # step 30 needs step 20, which needs step 10
    assert paths[2].read_bytes() == steps[2]
    os.unlink(paths[2])
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


def test_deltas_after_close_record_the_rewritten_file_and_free_its_pin(make_mount, steps, tmp_path):
    from test_redelta import keyframes_then_deltas, wait_for_pass
    mount = make_mount("pins-later", *keyframes_then_deltas(tmp_path))
    step10, step20 = two_steps(mount, steps)
    assert wait_for_pass(mount) > 0
    pins = pins_of(mount)
    assert len(pins) == 1
    # The swapped-in copy (the next generation) has its record; the replaced file's goes.
    wait_until(lambda: len(records_of(mount).get(pins[0], [])) == 1, "one record left")
    assert records_of(mount)[pins[0]][0].endswith("-1")
    os.unlink(step10)
    mount.remount()
    assert pins_of(mount) == pins
    assert step20.read_bytes() == steps[1]
    os.unlink(step20)
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


def test_compaction_of_a_dependent_carries_its_records_over(make_mount, steps, tmp_path):
    mount = make_mount("pins-compact", *forced(tmp_path))
    step10, step20 = two_steps(mount, steps)
    (pin, (first,)), = records_of(mount).items()
    os.unlink(step10)  # the rewrites below are keyframes: step 20's first chunk stays a delta
    tail = steps[1][1 << 20:]
    for _ in range(6):
        with open(step20, "r+b") as f:  # dead records pile up until a close compacts the file
            f.seek(1 << 20)
            f.write(tail)
        if records_of(mount).get(pin) != [first]:
            break
    wait_until(lambda: records_of(mount).get(pin, [""])[0].endswith("-1"), "the copy's record alone")
    assert records_of(mount) == {pin: [first[:-1] + "1"]}
    mount.remount()
    assert pins_of(mount) == [pin]
    assert step20.read_bytes() == steps[1]
    os.unlink(step20)
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


@pytest.fixture(scope="module")
def noisy_steps(series):
    """Three checkpoints with a random tensor that changes from the first to the second and
    then stays: the second file stores it as keyframes, which the third could use."""
    import torch
    from safetensors.torch import save
    noise = [torch.randint(0, 256, (2 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
             for s in (1, 2)]
    return tuple(save({**weights, "noise": n}) for weights, n in
                 ((series[0], noise[0]), (series[1], noise[1]), (series[0], noise[1])))


def test_no_delta_against_a_file_that_is_a_delta_with_the_default_chain(make_mount, noisy_steps, tmp_path):
    """With delta_chain 1 a file never takes deltas of a delta file, not even of its keyframe
    chunks: the pin would keep that file and its own base, then the next file this one."""
    from test_delta_mount import stored_ratio
    mount = make_mount("pins-depth", *forced(tmp_path))
    (mount.mnt / "run").mkdir()
    paths = [mount.mnt / "run" / f"step-{n}.safetensors" for n in (10, 20, 30)]
    for data, path in zip(noisy_steps, paths):
        write(path, data)
    rows = [stored_ratio(mount, f"run/{p.name}") for p in paths]
    assert rows[1]["codecs"].get("delta", 0) > 0, rows[1]
    assert "delta" not in rows[2]["codecs"], rows[2]
    assert len(pins_of(mount)) == 1
    os.unlink(paths[0])
    os.unlink(paths[1])
    wait_no_pins(mount)
    assert paths[2].read_bytes() == noisy_steps[2]
    mount.stop()
    assert_fsck_clean(mount)


def test_a_writer_that_truncates_and_writes_again_records_the_new_file_id(make_mount, steps, tmp_path):
    mount = make_mount("pins-rewrite", *forced(tmp_path))
    (mount.mnt / "run").mkdir()
    step10, step20 = (mount.mnt / "run" / f"step-{n}.safetensors" for n in (10, 20))
    write(step10, steps[0])
    with open(step20, "wb") as f:
        f.write(steps[1])
        f.flush()
        os.fsync(f.fileno())
        first = records_of(mount)
        f.seek(0)
        f.truncate(0)  # a reset in place: a new file id, the old one's record goes
        f.write(steps[1])
    (pin, (old,)), = first.items()
    wait_until(lambda: len(records_of(mount)[pin]) == 1 and records_of(mount)[pin] != [old],
               "only the new file id's record")
    os.unlink(step10)
    mount.remount()
    assert step20.read_bytes() == steps[1]
    os.unlink(step20)
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)


def test_a_torn_tail_of_a_linked_container_may_go_only_past_every_dependents_end(tmp_path):
    """What a record says a dependent reads of its base decides whether bytes past the base's
    last commit can be cut (a killed writer's) or may be records a dependent names."""
    from dccfs.pin_records import BASES_DIR, REFS_DIR, torn_tail_may_go, write_record
    pin = "ab" * 16 + "-0"
    assert torn_tail_may_go(str(tmp_path), pin, 1000)  # no pin: the links are a user's
    (tmp_path / BASES_DIR).mkdir(parents=True)
    (tmp_path / BASES_DIR / pin).write_bytes(b"")
    assert not torn_tail_may_go(str(tmp_path), pin, 1000)  # an older version's pin: unknown readers
    write_record(str(tmp_path), pin, "cd" * 16 + "-1", 900)
    write_record(str(tmp_path), pin, "ef" * 16 + "-0", 1000)
    assert torn_tail_may_go(str(tmp_path), pin, 1000)
    assert not torn_tail_may_go(str(tmp_path), pin, 999)
    write_record(str(tmp_path), pin, "ef" * 16 + "-0", 5000)  # it read a later commit too
    assert not torn_tail_may_go(str(tmp_path), pin, 1000) and torn_tail_may_go(str(tmp_path), pin, 5000)
    write_record(str(tmp_path), pin, "ef" * 16 + "-0", 2000)  # the furthest end stays
    assert torn_tail_may_go(str(tmp_path), pin, 5000) and not torn_tail_may_go(str(tmp_path), pin, 4999)
    (tmp_path / REFS_DIR / pin / ("12" * 16 + "-0")).write_bytes(b"")  # made by fsck --repair
    assert not torn_tail_may_go(str(tmp_path), pin, 10**9)


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_a_pinned_base_overwritten_in_place_keeps_the_pin_its_old_records_name(make_mount, steps, tmp_path, how):
    """Step 20 is a delta of step 10 and the pinned base of step 30 (chain 3). Truncating or overwriting it in
    place leaves its old records, which step 30 reads by offset and which name step 10's pin: neither its close
    nor fsck --repair may free that pin (found by review: step 30 read EIO)."""
    mount = make_mount("pins-overwritten-base", *forced(tmp_path, "delta_chain = 3\n"))
    (mount.mnt / "run").mkdir()
    paths = [mount.mnt / "run" / f"step-{n}.safetensors" for n in (10, 20, 30)]
    for data, path in zip(steps, paths):
        write(path, data)
    before = pins_of(mount)
    assert len(before) == 2
    os.unlink(paths[0])
    if how == "truncate":
        os.truncate(paths[1], 1000)
        expected = steps[1][:1000]
    else:
        fd = os.open(paths[1], os.O_WRONLY)
        try:
            os.pwrite(fd, steps[2][: 3 << 20], 0)
        finally:
            os.close(fd)
        expected = steps[2][: 3 << 20] + steps[1][3 << 20:]
    assert paths[1].read_bytes() == expected
    mount.remount()
    # (an overwrite may also pin a base of its own for its new chunks)
    assert set(before) <= set(pins_of(mount))
    assert paths[2].read_bytes() == steps[2]
    mount.stop()
    assert_fsck_clean(mount)
    result = dccfs("fsck", "--repair", mount.backing)
    assert result.returncode == 0, result.stdout + result.stderr
    mount.start()
    assert paths[1].read_bytes() == expected
    assert paths[2].read_bytes() == steps[2]


def test_a_pinned_base_written_in_place_takes_no_base_that_leads_back_to_it(make_mount, steps, tmp_path):
    """Step 20 is a delta of step 10 and the pinned base of step 30 (chain 3). Overwritten in place, it must not
    take step 30 as its base: the two pins would need each other, and neither would ever be freed (found by
    review N: both stayed after every file was deleted)."""
    mount = make_mount("pins-cycle", *forced(tmp_path, "delta_chain = 3\n"))
    (mount.mnt / "run").mkdir()
    paths = [mount.mnt / "run" / f"step-{n}.safetensors" for n in (10, 20, 30)]
    for data, path in zip(steps, paths):
        write(path, data)
    fd = os.open(paths[1], os.O_WRONLY)
    try:
        os.pwrite(fd, steps[2], 0)
    finally:
        os.close(fd)
    assert paths[1].read_bytes() == steps[2]
    assert paths[2].read_bytes() == steps[2]
    for path in paths:
        os.unlink(path)
    wait_no_pins(mount)
    mount.stop()
    assert_fsck_clean(mount)
