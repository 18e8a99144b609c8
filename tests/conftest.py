"""Shared fixtures: real dccfs mounts, the built corpus, offline backing directories."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from mounting import Mount  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("DCCFS_CORPUS", REPO / ".corpus"))


def pytest_collection_modifyitems(config, items):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root and /dev/fuse")
        for item in items:
            if "mount" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def make_mount(tmp_path, request):
    """Factory for mounts; every mount is unmounted at teardown even when the test fails,
    and the test fails if a daemon logged an error it did not expect.

    The daemons skip the codec warm-up (--no-warm-up) unless the test is marked warm_up: the
    suite starts hundreds of them, most for a few seconds, and on a 2-core machine each one's
    seconds of warm-up took the CPU from the tests beside it."""
    mounts: list[Mount] = []
    warm_up = request.node.get_closest_marker("warm_up") is not None

    def factory(name: str = "m", *args: str, backing: Path | None = None, fd_limit: int | None = None) -> Mount:
        mount = Mount(backing or tmp_path / f"{name}-backing", tmp_path / f"{name}-mnt",
                      tmp_path / f"{name}.log", args, fd_limit, warm_up)
        mounts.append(mount)
        return mount.start()

    yield factory
    surprises = []
    for mount in mounts:
        mount.stop()
        surprises += mount.surprises()
    if surprises:
        pytest.fail("the daemon logged unexpected errors:\n" + "\n".join(surprises[:20]))


@pytest.fixture
def mounted(make_mount):
    return make_mount()


@pytest.fixture
def pm(make_mount):
    """A mount with allow_other and a world-writable sticky scratch directory /pub."""
    mount = make_mount("p", "-o", "allow_other")
    os.chmod(mount.mnt, 0o755)
    pub = mount.mnt / "pub"
    pub.mkdir()
    os.chmod(pub, 0o1777)
    return mount


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "models" / "minilm" / "model.safetensors").exists():
        pytest.skip(f"corpus not built at {CORPUS} (make corpus)")
    return CORPUS


@pytest.fixture
def backing(tmp_path):
    """An empty backing directory with its state directory, for the offline tools."""
    root = tmp_path / "backing"
    (root / ".dccfs" / "tmp").mkdir(parents=True)
    return root


@pytest.fixture
def runner():
    return CliRunner()
