"""The dccfs command line: mount, umount, stats, tune, warm-up and the offline tools (cat, fsck, pack, unpack)."""
from __future__ import annotations

import atexit
import gc
import logging
import sys
from dataclasses import replace

import click

from dccfs.config import ConfigError, load_config

log = logging.getLogger(__name__)


def _fail(message: str) -> None:
    click.echo(f"dccfs: {message}", err=True)
    sys.exit(1)


def _split_options(values: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return tuple(out)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """dccfs: a FUSE filesystem that stores every file compressed, with tensor-aware codecs
    for model weights and a tiered chunk cache.

    Mount it over a backing directory; everything written through the mount point is stored
    in per-file containers in the backing directory, and reads return exactly the bytes written.
    """
    # The interpreter's last collections at exit walk every object numba and LLVM made: half a
    # second of each exit here (a daemon's after its unmount, each fsck) to free memory that the
    # exit frees anyway. Frozen objects are skipped; files and logs are closed as before.
    atexit.register(gc.freeze)


@main.command()
@click.argument("backing", type=click.Path())
@click.argument("mountpoint")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground and log to stderr "
              "(default: run as a daemon, log to BACKING/.dccfs/dccfs.log).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML config file ([cache], [[rule]]); default: built-in defaults.")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="FUSE mount options, e.g. allow_other; 'debug' raises the log level.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False),
              help="Log file (default: BACKING/.dccfs/dccfs.log when daemonised, stderr in the foreground).")
@click.option("--shared", is_flag=True, help="The backing directory is shared with other nodes: "
              "no kernel caching, close-to-open consistency (default: off).")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics there (default: off).")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False),
              help="Record the chunk access trace to this file: libCacheSim's oracleGeneral "
                   "binary format, or CSV for a name ending in .csv (default: off).")
@click.option("--no-warm-up", "no_warm_up", is_flag=True,
              help="Do not load the codec kernels in the background at mount; each loads on its first "
                   "use (same as warm_up = false; for short-lived mounts that read or write little).")
def mount(backing, mountpoint, foreground, config_path, options, log_file, shared, metrics, trace_file,
          no_warm_up):
    """Mount BACKING on MOUNTPOINT."""
    from dccfs.mount import MountError, MountRequest, run_mount
    from dccfs.memory import memory_limit
    try:
        config = load_config(config_path)
        # Only with a config file (then also the default budgets it does not set): a mount with no
        # file keeps working on a machine smaller than the defaults' 1.25 GiB.
        if config_path is not None:
            config.check_budgets_fit(f"{config.source}: [cache]", memory_limit())
    except ConfigError as exc:
        _fail(str(exc))
    # the flags can only turn on --shared and turn off the warm-up that the config file set
    config = replace(config, shared=config.shared or shared, warm_up=config.warm_up and not no_warm_up)
    opts = _split_options(options)
    req = MountRequest(backing, mountpoint, config, opts, foreground, log_file,
                       debug="debug" in opts, metrics=metrics, trace=trace_file)
    try:
        sys.exit(run_mount(req))
    except MountError as exc:
        _fail(str(exc))


@main.command()
@click.argument("mountpoint")
@click.option("-z", "--lazy", is_flag=True, help="Detach now even if files are open, or if the daemon "
              "hangs (default: off).")
def umount(mountpoint, lazy):
    """Unmount MOUNTPOINT after every open file is committed; waits for the daemon to finish."""
    from dccfs.mount import MountError
    from dccfs.umount import run_umount
    try:
        run_umount(mountpoint, lazy)
    except MountError as exc:
        _fail(str(exc))


def _control(mountpoint: str, payload: dict) -> dict:
    import shlex
    from dccfs.control_socket import request
    from dccfs.mountinfo import find_mount
    from dccfs.umount import socket_locator
    entry = find_mount(mountpoint)
    if entry is None or entry.fstype != "fuse.dccfs":
        _fail(f"{mountpoint} is not a dccfs mount")
    try:
        reply = request(entry.mountpoint, payload, locate=socket_locator(entry))
    except TimeoutError:
        _fail(f"the daemon of {mountpoint} has not answered (stopped or hung; `dccfs umount --lazy "
              f"{shlex.quote(mountpoint)}` detaches the mount)")
    except OSError as exc:
        _fail(f"cannot reach the daemon of {mountpoint}: {exc.strerror or exc} (if it died: "
              f"dccfs umount {shlex.quote(mountpoint)}, then mount it again)")
    if not reply.get("ok"):
        _fail(reply.get("error", "the daemon refused the request"))
    return reply


@main.command()
@click.argument("mountpoint")  # a plain string: click stats a Path, which blocks on a hung mount
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--files", "files_path", metavar="PATH", default=None,
              help="Instead: per-file stored size, ratio and codecs under PATH (relative to the mount).")
def stats(mountpoint, as_json, files_path):
    """Show a live mount's cache, codec, latency and error figures."""
    from dccfs.report import print_files, print_stats
    if files_path is not None:
        import os
        rel = os.path.relpath(os.path.realpath(os.path.join(mountpoint, files_path)),
                              os.path.realpath(mountpoint)) if not os.path.isabs(files_path) else \
            os.path.relpath(os.path.realpath(files_path), os.path.realpath(mountpoint))
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            _fail(f"{files_path} is outside the mount {mountpoint}")
        if not os.path.lexists(os.path.join(mountpoint, rel)):
            _fail(f"{files_path}: no such file or directory in {mountpoint}")
        reply = _control(mountpoint, {"cmd": "files", "path": "" if rel == "." else rel})
        print_files(reply["files"], as_json)
    else:
        reply = _control(mountpoint, {"cmd": "stats"})
        print_stats(reply, as_json)


@main.command()
@click.argument("mountpoint")
@click.argument("settings", nargs=-1, metavar="KEY=VALUE...")
def tune(mountpoint, settings):
    """Change cache settings on a live mount without remounting.

    Keys: policy (lru, arc, s3fifo, sieve, wtinylfu), t0_bytes (e.g. 2GiB), dirty_bytes,
    readahead_chunks, write_admit (hot, low, bypass), trace (a file path, or off).
    With no KEY=VALUE, prints the current settings. Only root or the mount owner may tune.
    """
    import json
    changes = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"expected KEY=VALUE, got {item!r}")
        changes[key.strip()] = value.strip()
    if changes.get("trace") not in (None, "off", "", "none"):
        import os
        changes["trace"] = os.path.abspath(changes["trace"])  # the daemon works from /
    reply = _control(mountpoint, {"cmd": "tune", "set": changes} if changes else {"cmd": "stats"})
    click.echo(json.dumps(reply["cache"], indent=2))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def cat(paths):
    """Decode backing-directory files to stdout, without a mount (plain files pass through).

    Exits 1 when a container has bytes past its last commit: what was printed is its last
    commit, as the mount shows it, and `dccfs fsck` tells whether a crash or damage left them."""
    from dccfs.offline import OfflineError, write_decoded
    out = sys.stdout.buffer
    left_out = False
    for path in paths:
        try:
            torn = write_decoded(path, out)
        except OfflineError as exc:
            _fail(str(exc))
        if torn:
            left_out = True
            click.echo(f"dccfs cat: {path}: printed its last commit; {torn} bytes past it were left out "
                       "(run dccfs fsck)", err=True)
    if left_out:
        sys.exit(1)


@main.command()
@click.argument("backing", type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True, help="Cut torn tails left by a crash, remove pinned delta "
              "bases no file needs any more and stale pin records, and add missing pin records "
              "(default: report only).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def fsck(backing, repair, quiet):
    """Verify every container and chunk checksum under BACKING; exit 1 if anything is damaged."""
    from dccfs.offline import run_fsck
    sys.exit(run_fsck(backing, repair, progress=not quiet))


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--chunk-size", default=None, help="Chunk size of new containers (default: what a mount "
              "gives a new file of that name: 1MiB for checkpoint and weight files, else 256KiB).")
@click.option("--read-block-size", default=None, help="Store tensor chunks as blocks of this size that a small "
              "read decodes alone, e.g. 128KiB, for weights read at random (mmap); 0, the default, stores chunks "
              "whole (the config key read_block_size, docs/operations.md).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def pack(path, chunk_size, read_block_size, quiet):
    """Convert plain files under PATH (in a backing directory, unmounted) into containers, atomically."""
    from dccfs.offline import OfflineError, run_pack
    try:
        sys.exit(run_pack(path, chunk_size, progress=not quiet, read_block_size=read_block_size))
    except (OfflineError, ConfigError) as exc:
        _fail(str(exc))


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def unpack(path, quiet):
    """Convert containers under PATH back into plain files, atomically (the reverse of pack)."""
    from dccfs.offline import OfflineError, run_unpack
    try:
        sys.exit(run_unpack(path, progress=not quiet))
    except OfflineError as exc:
        _fail(str(exc))


@main.command("warm-up")
def warm_up():
    """Load the codec kernels, compiling into numba's cache those not there yet.

    A mount does this in the background at its start (unless warm_up = false). Run it once after installing or
    upgrading dccfs (a machine image, a container build): the first time it compiles for about
    2-3 minutes on 2 cores, and the first mount's reads and writes then never wait for the
    compiler. Exit 1 if numba cannot cache kernels here (set NUMBA_CACHE_DIR).
    """
    import time

    from dccfs.codecs import _jit
    from dccfs.codecs.delta import warm_up as warm_up_delta
    from dccfs.engine import warm_up_codecs
    click.echo("dccfs: loading the codec kernels (compiling them the first time takes minutes)", err=True)
    started = time.monotonic()
    warm_up_codecs()
    warm_up_delta()
    if _jit.cache_unavailable():
        _fail("numba cannot cache the codec kernels here, so every process compiles them again: "
              "set NUMBA_CACHE_DIR to a writable directory")
    click.echo(f"dccfs: codec kernels ready in {time.monotonic() - started:.1f} s", err=True)


if __name__ == "__main__":
    main()
