"""Unmounting: the mount's own daemon found without touching the mountpoint, asked first, then waited for."""
from __future__ import annotations

import os
import shlex
import subprocess
import time

from dccfs.control_socket import device_socket_path, mount_socket_path, peer_pid, request
from dccfs.mount import PID_FILE, STATE_DIR, MountError
from dccfs.mountinfo import MountEntry, find_mount, read_mountinfo

UMOUNT_WAIT_S = 120
# How long a plain unmount waits for the daemon to answer before it calls it stopped or hung.
ANSWER_WAIT_S = 10.0
# How long a full backlog on the control socket may last before the daemon counts as stuck.
BACKLOG_WAIT_S = 3.0


def socket_locator(entry: MountEntry, entries: list[MountEntry] | None = None):
    """A function giving the current socket path of the daemon serving entry's mount, looked up again
    at each call (a mount that is still starting has none yet): its socket's device name, which every
    path of the mount shares (a bind mount's too); else the name of entry's path or of another path
    of the same device (a daemon from before the device names)."""
    entries = read_mountinfo() if entries is None else entries
    paths = [entry] + [e for e in entries if e.device == entry.device and e != entry]

    def locate() -> str:
        by_device = device_socket_path(entry.device, entry.owner_uid)
        if by_device is not None:
            return by_device
        for other in paths:
            path = mount_socket_path(other.mountpoint, other.owner_uid)
            if os.path.exists(path):
                return path
        return mount_socket_path(entry.mountpoint, entry.owner_uid)
    return locate


def daemon_pid(mountpoint: str) -> int | None:
    """The pid of the daemon serving mountpoint: the peer of its control socket, exact per mount
    (in --shared mode every node's daemon writes the backing directory's one pid file); None when
    the socket refuses (the daemon died); the pid file when there is no socket to ask."""
    entry = find_mount(mountpoint)
    if entry is None:
        return None
    state, pid = probe(entry)
    return pid if state in ("listening", "dead") else pid_file_pid(entry.source)


def probe(entry: MountEntry, entries: list[MountEntry] | None = None) -> tuple[str, int | None]:
    """(state, pid) of the daemon behind entry's control socket, without a stat under the mountpoint:
    'listening' (pid from the socket's peer: a stopped or hung daemon too, its kernel completes the
    connection), 'dead' (refused: nobody listens), 'stuck' (a backlog that stays full, or a connection
    that times out: a daemon that accepts nothing), or 'unknown' (no socket: a daemon that could not
    make one)."""
    deadline = time.monotonic() + BACKLOG_WAIT_S
    while True:
        try:
            return "listening", peer_pid(socket_locator(entry, entries)())
        except ConnectionRefusedError:
            return "dead", None
        except BlockingIOError:  # EAGAIN: the backlog is full; a live daemon drains it in moments
            if time.monotonic() > deadline:
                return "stuck", None
            time.sleep(0.1)
        except TimeoutError:
            return "stuck", None
        except OSError:
            return "unknown", None


def pid_file_pid(backing: str) -> int | None:
    """The pid the last daemon to mount backing wrote (any node's, with --shared)."""
    try:
        with open(os.path.join(backing, STATE_DIR, PID_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _state_of(pid: int) -> bytes | None:
    """The process state letter of /proc/PID/stat (b'T' stopped, b'Z' zombie), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _exited(pid: int) -> bool:
    """Whether the daemon is gone. A foreground daemon whose parent has not reaped it yet is a
    zombie that os.kill(pid, 0) still finds: it has finished all the same."""
    return _gone(pid, _state_of(pid))


def _gone(pid: int, state: bytes | None) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return True
    return state in (None, b"Z", b"X")


def _not_answering(mountpoint: str, pid: int | None, waited: str) -> MountError:
    who = f"its daemon (pid {pid})" if pid is not None else "its daemon"
    return MountError(f"cannot unmount {mountpoint}: {who} {waited} (stopped or hung, or another process "
                      f"holds every connection), so it would never commit; nothing was unmounted. `dccfs umount --lazy "
                      f"{shlex.quote(mountpoint)}` detaches the mount now; writes the daemon has not "
                      f"committed are lost if it never resumes")


def _check_answers(mountpoint: str, entry: MountEntry, entries: list[MountEntry], pid: int) -> None:
    """MountError for a daemon that listens on its control socket but does not answer (stopped
    or hung): a plain unmount waits for the daemon to commit, which it never would."""
    try:
        request(entry.mountpoint, {"cmd": "stats"}, timeout=ANSWER_WAIT_S, locate=socket_locator(entry, entries))
    except TimeoutError:
        raise _not_answering(mountpoint, pid, f"has not answered for {ANSWER_WAIT_S:g}s") from None
    except BlockingIOError:  # the backlog stayed full (request waits for it to drain)
        raise _not_answering(mountpoint, pid, "takes no connection on its control socket") from None
    except (OSError, ValueError):
        pass  # gone since (it exits at the unmount anyway), or a daemon that answers otherwise


def run_umount(mountpoint: str, lazy: bool = False) -> None:
    entries = read_mountinfo()
    entry = find_mount(mountpoint, entries)
    if entry is None or entry.fstype != "fuse.dccfs":
        # as stats and tune: another FUSE filesystem's daemon is not ours to wait for
        raise MountError(f"{mountpoint} is not a dccfs mount")
    if entry.owner_uid is not None and os.getuid() not in (0, entry.owner_uid):
        raise MountError(f"cannot unmount {mountpoint}: it was mounted by uid {entry.owner_uid}, and only "
                         f"that user or root may unmount it")
    # The socket names this mount's own daemon, also for --lazy (the pid file is any node's with
    # --shared).
    state, pid = probe(entry, entries)
    if not lazy:
        if state == "stuck":
            raise _not_answering(mountpoint, pid, "takes no connection on its control socket")
        if state == "listening":
            _check_answers(mountpoint, entry, entries, pid)
    if state == "unknown":
        pid = pid_file_pid(entry.source)
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [entry.mountpoint]
    try:
        result = subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed (apt-get install fuse3)") from None
    if result.returncode != 0:
        reason = result.stderr.strip() or f"fusermount3 exited with {result.returncode}"
        if "busy" in reason.lower():
            reason += " (files are open on it: close them, or use --lazy)"
        raise MountError(f"cannot unmount {mountpoint}: {reason}")
    if pid is None or any(e.device == entry.device for e in read_mountinfo()):
        return  # the daemon died, or serves the mount's other paths (a bind mount) on
    deadline = time.monotonic() + UMOUNT_WAIT_S
    while time.monotonic() < deadline:
        state = _state_of(pid)
        if _gone(pid, state):
            return
        if state == b"T":  # only --lazy gets here with a stopped daemon
            raise MountError(f"unmounted {mountpoint}, but daemon pid {pid} is stopped: it commits and exits "
                             f"once it runs again (kill -CONT {pid})")
        time.sleep(0.05)
    raise MountError(f"unmounted {mountpoint}, but daemon pid {pid} has not exited after {UMOUNT_WAIT_S}s: "
                     f"still committing, or hung")
