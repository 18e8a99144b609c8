"""Delta after close through a real mount: keyframes a writer left behind become deltas in the background."""
from __future__ import annotations

import json
import os
import time

import pytest
from test_delta_mount import dccfs, series  # noqa: F401 (series is a fixture)

pytestmark = pytest.mark.mount

# How long a test waits for the background pass; it takes well under a second for these
# files on an idle machine, but make test shares two cores with the whole suite.
PASS_WAIT_S = 120


@pytest.fixture(scope="module")
def checkpoints(series):
    """The two checkpoints of test_delta_mount's series, as safetensors bytes."""
    from safetensors.torch import save
    return save(series[0]), save(series[1])


def keyframes_then_deltas(tmp_path):
    config = tmp_path / "later.toml"
    config.write_text("delta_during_write = false\n")
    return "-c", str(config)


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def deltas_after_close(mount) -> int:
    return json.loads(dccfs("stats", "--json", mount.mnt).stdout)["stats"]["deltas_after_close"]


def file_row(mount, rel):
    return json.loads(dccfs("stats", "--json", "--files", rel, mount.mnt).stdout)[0]


def wait_for_pass(mount) -> int:
    deadline = time.monotonic() + PASS_WAIT_S
    while (done := deltas_after_close(mount)) == 0:
        assert time.monotonic() < deadline, "no delta after close within the wait"
        time.sleep(0.1)
    return done


def test_a_checkpoint_written_as_keyframes_becomes_a_delta_after_close(make_mount, checkpoints, tmp_path):
    mount = make_mount("later", *keyframes_then_deltas(tmp_path))
    (mount.mnt / "run").mkdir()
    write(mount.mnt / "run" / "step-10.safetensors", checkpoints[0])
    write(mount.mnt / "run" / "step-20.safetensors", checkpoints[1])
    assert wait_for_pass(mount) > 0
    first, second = (file_row(mount, f"run/step-{n}.safetensors") for n in (10, 20))
    assert "delta" not in first["codecs"]
    assert second["codecs"].get("delta", 0) > 0, second
    assert second["ratio"] < first["ratio"] * 0.8, (first["ratio"], second["ratio"])
    assert (mount.mnt / "run" / "step-20.safetensors").read_bytes() == checkpoints[1]
    mount.remount()
    for n, data in zip((10, 20), checkpoints):
        assert (mount.mnt / "run" / f"step-{n}.safetensors").read_bytes() == data
    os.unlink(mount.mnt / "run" / "step-10.safetensors")  # the base stays pinned
    mount.remount()
    assert (mount.mnt / "run" / "step-20.safetensors").read_bytes() == checkpoints[1]
    mount.stop()
    result = dccfs("fsck", "-q", mount.backing)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kill9_during_the_pass_leaves_the_keyframe_file_intact(make_mount, checkpoints, tmp_path):
    mount = make_mount("later-crash", *keyframes_then_deltas(tmp_path))
    write(mount.mnt / "step-10.safetensors", checkpoints[0])
    tmp_dir = mount.backing / ".dccfs" / "tmp"
    write(mount.mnt / "step-20.safetensors", checkpoints[1])
    # Kill while the rewritten copy is on its way (if the pass wins the race, the test
    # still checks a crash after it).
    deadline = time.monotonic() + PASS_WAIT_S
    while not any(n.endswith(".compact") for n in os.listdir(tmp_dir)) \
            and deltas_after_close(mount) == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    mount.expect_errors = True
    mount.kill()
    mount.start()
    for n, data in zip((10, 20), checkpoints):
        assert (mount.mnt / f"step-{n}.safetensors").read_bytes() == data
    assert not any(n.endswith(".compact") for n in os.listdir(tmp_dir))
    mount.stop()
    result = dccfs("fsck", "--repair", "-q", mount.backing)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_file_rewritten_during_the_pass_keeps_its_new_content(make_mount, checkpoints, tmp_path):
    mount = make_mount("later-rewrite", *keyframes_then_deltas(tmp_path))
    write(mount.mnt / "step-10.safetensors", checkpoints[0])
    target = mount.mnt / "step-20.safetensors"
    write(target, checkpoints[1])
    newer = checkpoints[1][: len(checkpoints[1]) // 2] + os.urandom(1 << 20)
    write(target, newer)  # most likely while the pass of the first content runs
    assert target.read_bytes() == newer
    deadline = time.monotonic() + PASS_WAIT_S
    while any(n.endswith(".compact") for n in os.listdir(mount.backing / ".dccfs" / "tmp")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert target.read_bytes() == newer
    mount.remount()
    assert target.read_bytes() == newer
    assert (mount.mnt / "step-10.safetensors").read_bytes() == checkpoints[0]


def test_an_unmount_during_the_pass_keeps_the_keyframes(make_mount, checkpoints, tmp_path):
    """The pass stops at its next record when the mount stops; the file stays as written."""
    mount = make_mount("later-umount", *keyframes_then_deltas(tmp_path))
    write(mount.mnt / "step-10.safetensors", checkpoints[0])
    write(mount.mnt / "step-20.safetensors", checkpoints[1])
    mount.stop()
    assert "Traceback" not in mount.log_text()
    mount.start()
    for n, data in zip((10, 20), checkpoints):
        assert (mount.mnt / f"step-{n}.safetensors").read_bytes() == data
    assert not any(n.endswith(".compact") for n in os.listdir(mount.backing / ".dccfs" / "tmp"))
    mount.stop()
    # Either the pass was done and step 20 needs its base, or it stayed keyframes and the pin went with
    # its record: no pin is left that no file references.
    from test_pins import assert_fsck_clean
    assert_fsck_clean(mount)


@pytest.fixture(scope="module")
def keyframe_cases(series):
    """Second checkpoints that stay keyframes after close, each with its first checkpoint: one with the same
    header and unrelated weights (no delta is smaller, so the pass stores none), and a small one with too few
    put-off chunks for the pass to run."""
    import torch
    from safetensors.torch import save
    gen = torch.Generator().manual_seed(2)
    unrelated = {k: torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v
                 for k, v in series[1].items()}
    small, total = [], 0
    for k in series[0]:
        if total + series[0][k].numel() * series[0][k].element_size() > 2_500_000:
            continue
        small.append(k)
        total += series[0][k].numel() * series[0][k].element_size()
    return {"unrelated": (save(series[0]), save(unrelated)),
            "small": (save({k: series[0][k] for k in small}), save({k: series[1][k] for k in small}))}


@pytest.mark.parametrize("case", ["unrelated", "small"])
def test_a_file_left_as_keyframes_does_not_keep_its_base_pinned(make_mount, keyframe_cases, case, tmp_path):
    """Putting off a chunk's delta pins the base for the file; when the file ends up with no delta after all,
    its record goes at its close and the pin with it (it stayed until fsck --repair)."""
    from test_pins import assert_fsck_clean, wait_no_pins
    first, second = keyframe_cases[case]
    mount = make_mount("later-keyframes", *keyframes_then_deltas(tmp_path))
    write(mount.mnt / "step-10.safetensors", first)
    write(mount.mnt / "step-20.safetensors", second)
    wait_no_pins(mount)
    assert "delta" not in file_row(mount, "step-20.safetensors")["codecs"]
    mount.remount()
    for n, data in zip((10, 20), (first, second)):
        assert (mount.mnt / f"step-{n}.safetensors").read_bytes() == data
    mount.stop()
    assert_fsck_clean(mount)
