"""Where a mount's control socket lives (by its path and by its device), and the client's side: find it, its peer, one request."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import struct
import time

from dccfs.mountinfo import find_mount

log = logging.getLogger(__name__)

STARTUP_WAIT_S = 3.0  # how long a client waits for the socket of a mount that has just started

USER_SOCKET_DIR = "/tmp/dccfs-{uid}"


def _socket_dirs(uid: int | None = None) -> list[str]:
    """Where control sockets live: short paths, since AF_UNIX paths stop at 107 bytes."""
    return ["/run/dccfs", USER_SOCKET_DIR.format(uid=os.getuid() if uid is None else uid)]


def trusted_socket_dir(directory: str, owner: int) -> bool:
    """A directory only its owner (or root) can change: in a shared /tmp another user could
    have made it first, writable, and swapped the socket for their own."""
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid in (0, owner) and not st.st_mode & 0o022


def socket_path(mountpoint: str, for_server: bool = False) -> str:
    """One socket per mount, named by the mountpoint, so it is found from the mountpoint alone
    and several nodes can share a backing directory. Root finds a user's mount too."""
    if for_server:
        tag = _socket_tag(os.path.realpath(mountpoint))
        uid = os.getuid()
        for directory in _socket_dirs():
            try:
                os.makedirs(directory, mode=0o755 if directory.startswith("/run/") else 0o700, exist_ok=True)
            except OSError:
                continue
            if not trusted_socket_dir(directory, uid):
                log.warning("%s is writable by other users or owned by another; not used for the "
                            "control socket", directory)
                continue
            if os.access(directory, os.W_OK):
                return os.path.join(directory, f"{tag}.sock")
        raise OSError(f"no writable directory for the control socket among {_socket_dirs()}")
    entry = find_mount(mountpoint)
    if entry is None:
        return mount_socket_path(os.path.realpath(mountpoint), None)
    return mount_socket_path(entry.mountpoint, entry.owner_uid)


def mount_socket_path(target: str, owner_uid: int | None) -> str:
    """The client's socket path for the mount at target, a path as the kernel's mount table
    gives it, of a mount owned by owner_uid: no stat of the mountpoint, which never returns
    while the mount's daemon hangs (`dccfs umount` must not hang with it)."""
    name = f"{_socket_tag(target)}.sock"
    found = _find_socket(name, owner_uid)
    return found if found is not None else os.path.join(_owner_dirs(owner_uid)[0], name)


def device_socket_path(device: str, owner_uid: int | None) -> str | None:
    """The second name a daemon gives its socket once mounted: by the mount's device (major:minor
    in the mount table), which every path of the mount shares, a bind mount's too, and which
    stays when the path the socket is named after is unmounted. None when there is none."""
    return _find_socket(device_socket_name(device), owner_uid)


def device_socket_name(device: str) -> str:
    return f"dev-{device.replace(':', '-')}.sock"


def _owner_dirs(owner_uid: int | None) -> list[str]:
    """The socket directories of a daemon run by owner_uid, the one it chose first: the first it
    could write, root /run/dccfs, a user /tmp/dccfs-UID; so a stale socket of an earlier mount
    in the other directory hides nothing."""
    owner = os.getuid() if owner_uid is None else owner_uid
    directories = _socket_dirs(owner)
    return directories if owner == 0 else directories[::-1]


def _find_socket(name: str, owner_uid: int | None) -> str | None:
    owner = os.getuid() if owner_uid is None else owner_uid
    for directory in _owner_dirs(owner):
        path = os.path.join(directory, name)
        if os.path.exists(path) and trusted_socket_dir(directory, owner):
            return path
    return None


def _socket_tag(target: str) -> str:
    return hashlib.sha1(os.fsencode(target)).hexdigest()[:16]


def peer_pid(path: str) -> int:
    """The pid of the process listening on the control socket at path. The kernel completes a
    connection to a stopped or hung daemon's socket too (its listen backlog), unless the backlog
    is full: BlockingIOError. FileNotFoundError: no socket; ConnectionRefusedError: nobody listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]


def request(mountpoint: str, payload: dict, timeout: float = 10.0, locate=None) -> dict:
    """Client side: send one request to the daemon serving mountpoint, whose socket path locate()
    gives when the caller has a way without a stat of the mountpoint (dccfs.umount.socket_locator).
    TimeoutError when the daemon sends nothing for timeout seconds."""
    deadline = time.monotonic() + STARTUP_WAIT_S
    while True:
        path = locate() if locate is not None else socket_path(mountpoint)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
            sock.close()
            # A mount that has just started may not have its socket yet; a full backlog (EAGAIN:
            # a flood of connections the daemon is still refusing) drains in moments.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        except BaseException:
            sock.close()
            raise
    with sock:
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    if not data:
        raise OSError(f"the daemon closed the control connection ({path}) without answering")
    return json.loads(data)
