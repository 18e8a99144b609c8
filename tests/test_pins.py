"""Delta-base pins freed online through a real mount: deletes, renames, links, overwrites, chains, crashes."""
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


def forced(tmp_path, extra: str = ""):
    config = tmp_path / "pins.toml"
    # Force deltas: by default they only run while the encoders keep up with the writer.
    config.write_text(extra + '[[rule]]\nglob = "*"\ndelta = true\n')
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
