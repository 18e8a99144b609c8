"""mount.fuse.dccfs: the helper that `mount -t fuse.dccfs` and /etc/fstab call.

mount(8) runs `mount.fuse.dccfs BACKING MOUNTPOINT -o opt,opt,...`. Options that mean
something to dccfs (config=, log=, shared, no_warm_up, metrics=, trace=) become CLI flags; options
that only mount(8) or systemd use are dropped; the rest go to FUSE (allow_other, ro, ...).
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

VALUE_OPTIONS = {"config": "--config", "log": "--log", "metrics": "--metrics", "trace": "--trace"}
FLAG_OPTIONS = {"shared": "--shared", "no_warm_up": "--no-warm-up"}
# Meaningful to mount(8), fstab or systemd, not to FUSE.
IGNORED = {"rw", "defaults", "auto", "noauto", "user", "users", "nouser", "_netdev", "nofail",
           "dev", "suid", "exec", "async", "relatime", "noatime"}


def translate(argv: list[str]) -> list[str]:
    """mount(8) arguments -> `dccfs mount` arguments."""
    positional, options = [], []
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options += next(args, "").split(",")
        elif arg.startswith("-o") and len(arg) > 2:
            options += arg[2:].split(",")
        elif arg in ("-n", "-s", "-v", "-f"):
            continue  # no mtab, sloppy, verbose, fake: nothing for dccfs to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.fuse.dccfs BACKING MOUNTPOINT [-o opt[,opt...]]")
    out = ["mount"]
    fuse_opts = []
    for opt in filter(None, (o.strip() for o in options)):
        key, sep, value = opt.partition("=")
        if key in VALUE_OPTIONS and sep:
            out += [VALUE_OPTIONS[key], value]
        elif key in FLAG_OPTIONS:
            out.append(FLAG_OPTIONS[key])
        elif key in IGNORED or key.startswith(("x-systemd.", "comment=", "x-")):
            continue
        else:
            fuse_opts.append(opt)
    if fuse_opts:
        out += ["-o", ",".join(fuse_opts)]
    return out + positional


def main() -> None:
    from dccfs.cli import main as cli_main
    sys.argv = ["dccfs", *translate(sys.argv[1:])]
    cli_main()


if __name__ == "__main__":
    main()
