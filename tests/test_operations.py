"""Operating a mount: CLI errors and help, config validation, stats, tune, mount -t, fstab helper."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dccfs.cli import main as cli
from dccfs.config import ConfigError, load_config, parse_size
from dccfs.daemon import READ_AHEAD_KB
from dccfs.mount_helper import translate
from dccfs.mountinfo import MountEntry, read_mountinfo

DCCFS = [sys.executable, "-m", "dccfs.cli"]


def dccfs(*args, **kw):
    return subprocess.run([*DCCFS, *map(str, args)], capture_output=True, text=True, **kw)


@contextlib.contextmanager
def cli_mount(backing, mnt, *options):
    """`dccfs mount [options] backing mnt` for the body of a with block, unmounted with
    `dccfs umount` after it (lazily if that fails, and then the test fails too)."""
    result = dccfs("mount", *options, backing, mnt)
    assert result.returncode == 0, result.stderr
    try:
        yield
    finally:
        result = dccfs("umount", mnt)
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["mount", "umount", "stats", "tune", "cat", "fsck", "pack", "unpack"])
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_sizes_and_config_errors(tmp_path):
    assert parse_size("8G") == 8 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("64k") == 64 << 10
    cases = {
        "[cache]\npolicy = 'lfu'\n": 'policy "lfu" is not one of',
        "[cache]\nt0_bytes = '12 parsecs'\n": "is not a size",
        "bogus = 1\n": 'unknown key "bogus"',
        "[[rule]]\nglob = 'a[b'\n": "unbalanced brackets",
        "[[rule]]\nglob = ']abc['\n": "the ']' at position 0 closes no '['",  # counts matched: was accepted
        "[[rule]]\nglob = '*.[!]'\n": "the '[' at position 2 is never closed",
        "[cache]\nreadahead_chunks = '8'\n": 'readahead_chunks must be an integer 0..256, got "8"',  # was 8
        "[[rule]]\nglob = '[z-a]*.bin'\n": "the empty range 'z-a'",  # matched nothing
        "chunk_size = '100KiB'\n": "power of two",
        "[cache]\ncolour = 'red'\n": 'unknown key "colour"',
        "not toml [": "not valid TOML",
        "[cache]\nt0_bytes = '64ib'\n": "needs a unit",  # was 64 bytes
        "[cache]\ndirty_bytes = '0.3'\n": "whole number of bytes",  # was 0
        "[cache]\nt0_bytes = '99999999999999999999999'\n": "too large",  # was rounded by a float
        "[cache]\nt0_bytes = 9223372036854775808\n": "too large",
        "[[rule]]\nglob = '*'\nlevel = true\n": "level must be an integer -7..22, got true",  # was level 1
        b"[cache]\npolicy = '\xff'\n": "not UTF-8",  # was a UnicodeDecodeError traceback
        "[cache]\nt0_bytes = '64KiB'\n": "less than one chunk (256KiB), so T0 would hold nothing",  # was accepted
        "chunk_size = '64KiB'\n[cache]\nt0_bytes = 4096\n": "less than one chunk (64KiB)",
    }
    for text, message in cases.items():
        path = tmp_path / "c.toml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert message in str(exc.value) and str(path) in str(exc.value)
    path = tmp_path / "ok.toml"
    path.write_text("[cache]\npolicy='arc'\nt0_bytes='64MiB'\n[[rule]]\nglob='*.log'\ncodec='lz4'\n"
                    "[[rule]]\nglob='*.[ch]'\ncodec='zstd'\n[[rule]]\nglob='[]]x[!]]'\ncodec='store'\n")
    config = load_config(path)
    assert config.cache.policy == "arc" and config.rule_for("x/y.log").codec == "lz4"
    assert config.rule_for("src/a.h").codec == "zstd" and config.rule_for("]xy").codec == "store"


def test_fstab_option_translation():
    assert translate(["/b", "/m", "-o", "rw,allow_other,config=/etc/d.toml,shared,noauto,x-systemd.automount"]) \
        == ["mount", "--config", "/etc/d.toml", "--shared", "-o", "allow_other", "/b", "/m"]
    assert translate(["/b", "/m", "-o", "no_warm_up"]) == ["mount", "--no-warm-up", "/b", "/m"]


@pytest.mark.mount
def test_mount_errors_are_precise(tmp_path, mounted):
    (tmp_path / "mnt-full").mkdir()
    (tmp_path / "mnt-full" / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        ((tmp_path / "nope", tmp_path / "empty"), "does not exist"),
        ((mounted.backing, tmp_path / "mnt-full"), "is not empty"),
        ((tmp_path / "empty", mounted.mnt), "already a mount point"),
        ((mounted.backing, tmp_path / "missing-mnt"), "mkdir -p"),
    ]
    for (backing, mnt), message in cases:
        result = dccfs("mount", backing, mnt)
        assert result.returncode == 1, result
        assert message in result.stderr, result.stderr
    result = dccfs("mount", "-c", tmp_path / "none.toml", tmp_path / "empty", tmp_path / "empty")
    assert result.returncode == 1 and "cannot read config" in result.stderr
    # budgets past the machine's memory: the daemon would be killed long before T0 filled (found by review)
    (tmp_path / "huge.toml").write_text("[cache]\nt0_bytes = '64TiB'\n")
    (tmp_path / "mnt-empty").mkdir()
    result = dccfs("mount", "-c", tmp_path / "huge.toml", tmp_path / "empty", tmp_path / "mnt-empty")
    assert result.returncode == 1 and "huge.toml: [cache]: t0_bytes + dirty_bytes = 67109120 MiB is more than " \
        "this machine's memory" in result.stderr, result.stderr


@pytest.mark.mount
def test_stats_and_tune_on_a_live_mount(mounted):
    data = os.urandom(1 << 20) + bytes(1 << 20)
    (mounted.mnt / "d").mkdir()
    (mounted.mnt / "d" / "f").write_bytes(data)
    assert (mounted.mnt / "d" / "f").read_bytes() == data
    stats = json.loads(dccfs("stats", "--json", mounted.mnt).stdout)
    assert stats["stats"]["tiers"]["t0"]["resident_bytes"] > 0
    assert stats["stats"]["memory"]["resident_bytes"] > stats["stats"]["tiers"]["t0"]["resident_bytes"]
    assert stats["cache"]["policy"] == "wtinylfu"
    human = dccfs("stats", mounted.mnt)
    assert human.returncode == 0 and "cache tiers" in human.stdout and "heap trims" in human.stdout
    files = json.loads(dccfs("stats", "--json", "--files", "d", mounted.mnt).stdout)
    assert files[0]["path"] == "d/f" and files[0]["logical"] == len(data)
    tuned = dccfs("tune", mounted.mnt, "policy=arc", "t0_bytes=32MiB", "readahead_chunks=2")
    assert tuned.returncode == 0, tuned.stderr
    assert json.loads(tuned.stdout)["policy"] == "arc"
    assert (mounted.mnt / "d" / "f").read_bytes() == data
    bad = dccfs("tune", mounted.mnt, "policy=fifo")
    assert bad.returncode == 1 and "not one of" in bad.stderr
    bad = dccfs("tune", mounted.mnt, "colour=red")
    assert bad.returncode == 1 and "unknown key" in bad.stderr
    for digits in ("\u0668", "\u00b2"):  # Arabic-Indic eight, superscript two: str.isdigit() took both
        bad = dccfs("tune", mounted.mnt, f"readahead_chunks={digits}")
        assert bad.returncode == 1 and "readahead_chunks must be an integer 0..256" in bad.stderr, bad.stderr
    bad = dccfs("tune", mounted.mnt, "t0_bytes=4KiB", "policy=lru")
    assert bad.returncode == 1 and "less than one chunk" in bad.stderr, bad.stderr
    bad = dccfs("tune", mounted.mnt, "dirty_bytes=64TiB", "policy=lru")
    assert bad.returncode == 1 and "t0_bytes + dirty_bytes" in bad.stderr and "memory" in bad.stderr, bad.stderr
    assert json.loads(dccfs("stats", "--json", mounted.mnt).stdout)["cache"]["policy"] == "arc"


@pytest.mark.mount
def test_stats_count_decodes_per_codec(mounted):
    """A chunk read from disk counts under its codec: real bf16 weights under tensor, a text file under zstd."""
    weights = Path(__file__).resolve().parents[1] / ".corpus" / "real" / "minilm_bf16.safetensors"
    if not weights.exists():
        pytest.skip("corpus not built (make corpus)")
    shutil.copyfile(weights, mounted.mnt / "model.safetensors")
    text = b"".join(b"line %d of a log that compresses\n" % i for i in range(50_000))
    (mounted.mnt / "notes.txt").write_bytes(text)
    mounted.remount()
    assert (mounted.mnt / "model.safetensors").read_bytes() == weights.read_bytes()
    assert (mounted.mnt / "notes.txt").read_bytes() == text
    decode = json.loads(dccfs("stats", "--json", mounted.mnt).stdout)["stats"]["decode"]
    assert "all" not in decode and {"tensor", "zstd"} <= set(decode), decode
    tensor = decode["tensor"]
    assert tensor["chunks"] > 0 and tensor["bytes_in"] > tensor["bytes_out"] > 0 and tensor["seconds"] > 0


@pytest.mark.mount
def test_tune_refuses_other_uid(mounted):
    # Imported before the fork: pytest's process may have threads (other tests' engines), and an
    # import in a forked child can find the import lock held by a thread that no longer exists.
    from dccfs.control_socket import request
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become uid 65534 and try to tune
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            reply = request(str(mounted.mnt), {"cmd": "tune", "set": {"policy": "lru"}})
        except BaseException as exc:
            reply = {"ok": None, "error": repr(exc)}
        os.write(write_end, json.dumps(reply).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        reply = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert reply["ok"] is False and "permission denied: uid 65534" in reply["error"], reply
    assert json.loads(dccfs("stats", "--json", mounted.mnt).stdout)["cache"]["policy"] == "wtinylfu"


@pytest.mark.mount
def test_mount_t_fuse_dccfs_and_umount(tmp_path):
    helper = os.path.join(os.path.dirname(sys.executable), "mount.fuse.dccfs")
    if not os.path.exists("/sbin/mount.fuse.dccfs") or os.path.realpath("/sbin/mount.fuse.dccfs") != helper:
        pytest.skip("mount.fuse.dccfs is not linked into /sbin (make setup does it as root)")
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "fuse.dccfs", str(backing), str(mnt), "-o", "allow_other"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    try:
        (mnt / "f").write_bytes(b"hello" * 1000)
        assert (mnt / "f").read_bytes() == b"hello" * 1000
        stats = json.loads(dccfs("stats", "--json", mnt).stdout)
        assert stats["ok"]
    finally:
        result = dccfs("umount", mnt)
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mnt)
    assert (backing / "f").stat().st_size < 5000


@pytest.mark.mount
def test_daemonised_mount_and_clean_umount(tmp_path):
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    with cli_mount(backing, mnt):
        with open(mnt / "big", "wb") as f:
            f.write(os.urandom(8 << 20))
    log = (backing / ".dccfs" / "dccfs.log").read_text()
    assert "mounted" in log and "unmounted" in log
    assert "ERROR" not in log


@pytest.mark.mount
def test_stats_files_refuses_a_sibling_of_the_backing_directory(mounted):
    """The 'outside the mount' check compared string prefixes: /x/m-backing-other passed
    as inside /x/m-backing."""
    from dccfs.control_socket import request
    sibling = mounted.backing.parent / (mounted.backing.name + "-other")
    sibling.mkdir()
    (sibling / "not-in-the-mount").write_bytes(b"x" * 100)
    reply = request(str(mounted.mnt), {"cmd": "files", "path": f"../{sibling.name}"})
    assert reply["ok"] is False and "outside the mount" in reply["error"], reply
    reply = request(str(mounted.mnt), {"cmd": "files", "path": ".dccfs/bases"})
    assert reply["ok"] is False and "dccfs's own state" in reply["error"], reply


def test_control_socket_dirs_other_users_can_change_are_not_trusted(tmp_path):
    """In a shared /tmp another user could make /tmp/dccfs-<uid> first, writable, and swap
    the daemon's socket for their own: such a directory is used by neither side."""
    from dccfs.control_socket import trusted_socket_dir
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    assert trusted_socket_dir(str(mine), os.getuid())
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    assert not trusted_socket_dir(str(open_dir), os.getuid())
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    assert not trusted_socket_dir(str(theirs), 1000)  # another user's directory
    assert trusted_socket_dir(str(theirs), 65534)
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert not trusted_socket_dir(str(link), os.getuid())


@pytest.mark.mount
def test_relative_paths_of_a_daemonised_mount(tmp_path):
    """A daemon works from /, so relative BACKING, --log and --trace (and tune trace=) must be
    resolved before it forks: the fsname was the relative backing path, so `dccfs umount`
    from another directory could not find the pid file and returned without waiting for
    the daemon's commit; the log and trace were written to /rel.log and /rel.trace."""
    from dccfs.umount import daemon_pid
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    result = dccfs("mount", "--log", "rel.log", "--trace", "rel.trace", "b", "m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    mnt = tmp_path / "m"
    try:
        pid = int((tmp_path / "b" / ".dccfs" / "daemon.pid").read_text())
        assert daemon_pid(str(mnt)) == pid
        (mnt / "f").write_bytes(b"x" * 100000)
        assert (mnt / "f").read_bytes() == b"x" * 100000
        result = dccfs("tune", "m", "trace=tuned.trace", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["trace"] == str(tmp_path / "tuned.trace")
    finally:
        result = dccfs("umount", mnt, cwd="/")
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert result.returncode == 0, result.stderr
    assert "unmounted" in (tmp_path / "rel.log").read_text()
    assert (tmp_path / "rel.trace").exists() and (tmp_path / "tuned.trace").exists()
    assert not os.path.exists("/rel.log") and not os.path.exists("/tuned.trace")


def test_unwritable_log_or_trace_files_are_precise_errors(tmp_path):
    """A log or trace file that cannot be written fails the mount with its path and reason
    (the daemon had no log to say it in: a traceback, or "the daemon exited"), and a tune to
    a trace that cannot be opened is refused while the current trace goes on (it used to
    stop the current trace and answer "internal error")."""
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    for option in ("--log", "--trace"):
        result = dccfs("mount", option, str(tmp_path / "missing" / "x"), tmp_path / "b", tmp_path / "m")
        assert result.returncode == 1, result
        assert "missing/x" in result.stderr and "No such file or directory" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    mnt = tmp_path / "m"
    with cli_mount(tmp_path / "b", mnt, "--trace", str(tmp_path / "t.trace")):
        result = dccfs("tune", mnt, f"trace={tmp_path / 'missing' / 'y.trace'}")
        assert result.returncode == 1 and "No such file or directory" in result.stderr, result
        assert "internal error" not in result.stderr
        result = dccfs("tune", mnt)
        assert json.loads(result.stdout)["trace"] == str(tmp_path / "t.trace")


@pytest.mark.mount
def test_a_backing_path_with_commas_and_backslashes_mounts(tmp_path):
    """libfuse splits options at commas: the fsname (the backing path) used to end there,
    and the mount failed with "fuse_session_new() failed"."""
    backing, mnt = tmp_path / "a,b\\c" / "back", tmp_path / "m"
    backing.mkdir(parents=True)
    mnt.mkdir()
    with cli_mount(backing, mnt):
        (mnt / "f").write_bytes(b"x" * 100_000)
        assert (mnt / "f").read_bytes() == b"x" * 100_000
        assert dccfs("stats", mnt).returncode == 0
    assert (backing / "f").exists()


def test_mountinfo_paths_are_unescaped(tmp_path):
    table = tmp_path / "mountinfo"
    table.write_bytes(b"36 35 0:52 / /tmp/a\\040b\\011c\\134d rw,nosuid - fuse.dccfs /x\\040y rw,user_id=0\n"
                      b"37 35 0:53 / /tmp/\xff rw shared:1 - tmpfs  rw\n")
    assert read_mountinfo(str(table)) == [MountEntry("/tmp/a b\tc\\d", "fuse.dccfs", "/x y", "0:52", 0),
                                          MountEntry(os.fsdecode(b"/tmp/\xff"), "tmpfs", "", "0:53")]


def _sysfs_writable() -> bool:
    return any(e.mountpoint == "/sys" and os.access("/sys/class/bdi", os.W_OK) for e in read_mountinfo()) \
        and not os.statvfs("/sys").f_flag & os.ST_RDONLY


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0 or not _sysfs_writable(),
                    reason="raising a bdi's read_ahead_kb needs root and a writable /sys")
def test_a_mountpoint_with_a_space_gets_its_read_ahead_raised(tmp_path):
    """mountinfo writes a space as \\040: the daemon compared the raw field with the path,
    found no mount and kept the kernel's 128 KiB read-ahead, without a word in the log
    (cold delta reads through such a mount ran at about three quarters of the speed)."""
    backing, mnt = tmp_path / "back", tmp_path / "mount point"
    backing.mkdir()
    mnt.mkdir()
    with cli_mount(backing, mnt):
        device = next((e.device for e in read_mountinfo() if e.mountpoint == str(mnt)), None)
        assert device is not None, f"{mnt} is not in /proc/self/mountinfo"
        knob = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
        deadline = time.monotonic() + 10
        while knob.read_text().strip() != str(READ_AHEAD_KB):
            assert time.monotonic() < deadline, f"{knob} is {knob.read_text().strip()}"
            time.sleep(0.05)


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_a_read_only_backing_directory_is_a_precise_error(tmp_path):
    backing, mnt = tmp_path / "ro", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(backing)], check=True)
    try:
        result = dccfs("mount", backing, mnt)
    finally:
        subprocess.run(["umount", str(backing)], check=True)
    assert result.returncode == 1, result
    assert f"{backing}/.dccfs" in result.stderr and "Read-only file system" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.mount
def test_metrics_address_errors_come_before_the_fork_and_state_files_are_not_world_writable(tmp_path):
    import socket
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    for args in (("-f",), ()):
        result = dccfs("mount", *args, "--metrics", "foo", backing, mnt)
        assert result.returncode == 1 and "--metrics wants HOST:PORT" in result.stderr, result
        assert "Traceback" not in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        result = dccfs("mount", "--metrics", address, backing, mnt)
    assert result.returncode == 1, result
    assert f"--metrics {address}: cannot listen there" in result.stderr, result.stderr
    with cli_mount(backing, mnt):
        assert dccfs("tune", mnt, f"trace={tmp_path / 't.trace'}").returncode == 0
        for path in (backing / ".dccfs" / "daemon.pid", tmp_path / "t.trace"):
            assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_umount_takes_an_unreaped_daemon_for_exited():
    """A foreground daemon whose parent has not reaped it yet is a zombie, which os.kill(pid, 0)
    still finds; `dccfs umount` used to wait its full two minutes for it and fail (found by review)."""
    from dccfs.umount import _exited
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while not _exited(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _exited(child.pid)  # a zombie until the wait below
    finally:
        child.wait()
    assert not _exited(os.getpid())
