"""The bench_fs FUSE probe: mount with libfuse debug, print INIT and the request sizes of single writes and reads."""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

from bench_common import MIB, REPO, Daemon, drop_caches, set_read_ahead_kb


DCCFS_WITH_LIBFUSE_DEBUG = (
    "import sys, dccfs.daemon as d\n"
    "base = d.fuse_options\n"
    "d.fuse_options = lambda req: base(req) | {'debug'}  # dccfs itself filters -o debug out\n"
    "sys.argv[0] = 'dccfs'\n"
    "from dccfs.cli import main\n"
    "main()\n")
_REQ = re.compile(r"unique: (\d+), opcode: (\w+) \(\d+\), nodeid: \d+, insize: (\d+)")
_REPLY = re.compile(r"unique: (\d+), success, outsize: (\d+)")


def _request_sizes(text: str) -> dict:
    """Payload sizes of WRITE requests (insize - 80) and READ replies (outsize - 16) in a debug log."""
    reads, writes, sizes = set(), [], {}
    for line in text.splitlines():
        m = _REQ.search(line)
        if m:
            if m.group(2) == "WRITE":
                writes.append(int(m.group(3)) - 80)
            elif m.group(2) == "READ":
                reads.add(m.group(1))
            continue
        m = _REPLY.search(line)
        if m and m.group(1) in reads:
            sizes[m.group(1)] = int(m.group(2)) - 16
    hist: dict[str, dict[int, int]] = {"WRITE": {}, "READ": {}}
    for s in writes:
        hist["WRITE"][s] = hist["WRITE"].get(s, 0) + 1
    for s in sizes.values():
        hist["READ"][s] = hist["READ"].get(s, 0) + 1
    return hist


def probe(args) -> dict:
    """Mount each FUSE target with libfuse debug, print INIT, and log request sizes of one 4 MiB write/read."""
    workdir = Path(args.workdir).resolve() / "probe"
    out: dict = {}
    names = [n for n in args.targets.split(",") if n in ("passthrough", "dccfs")]
    for name in names:
        shutil.rmtree(workdir / name, ignore_errors=True)
        backing, mnt = workdir / name / "backing", workdir / name / "mnt"
        backing.mkdir(parents=True)
        mnt.mkdir()
        logp = workdir / name / "debug.log"
        if name == "dccfs":
            cmd = [sys.executable, "-c", DCCFS_WITH_LIBFUSE_DEBUG, "mount", "--foreground",
                   str(backing), str(mnt)]
        else:
            cmd = [sys.executable, str(REPO / "tools" / "passthrough.py"), "-f", "-o", "debug",
                   *args.passthrough_arg, str(backing), str(mnt)]
        daemon = Daemon(name, cmd, mnt, logp)
        phases = {}
        try:
            daemon.start()
            time.sleep(0.5)
            mark = logp.stat().st_size
            payload = os.urandom(4 * MIB)

            def phase(label):
                nonlocal mark
                time.sleep(0.3)
                text = logp.read_text(errors="replace")
                phases[label] = _request_sizes(text[mark:])
                mark = len(text)

            fd = os.open(mnt / "probe.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            written = os.write(fd, payload)
            os.fsync(fd)
            os.close(fd)
            phase(f"one os.write of 4 MiB (returned {written})")
            src = workdir / name / "src.bin"
            src.write_bytes(os.urandom(8 * MIB))
            shutil.copyfile(src, mnt / "copy.bin")
            phase("shutil.copyfile of an 8 MiB file (sendfile)")
            import torch
            from safetensors.torch import save_file
            tensors = {"w": torch.randn(2 * MIB)}  # 8 MiB of fp32
            torch.save(tensors, mnt / "t.pt")
            phase("torch.save of one 8 MiB tensor")
            save_file(tensors, str(mnt / "t.safetensors"))
            phase("safetensors save_file of one 8 MiB tensor")
            for ra in (None, 1024):
                label = "kernel default read_ahead_kb" if ra is None else f"read_ahead_kb={ra}"
                if ra is not None:
                    set_read_ahead_kb(mnt, ra)
                st = os.stat(mnt)
                with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb") as f:
                    label += f" (bdi says {f.read().strip()} KiB)"
                dropped = drop_caches()
                fd = os.open(mnt / "probe.bin", os.O_RDONLY)
                data = os.read(fd, 4 * MIB)
                os.close(fd)
                assert data == payload[:len(data)]
                phase(f"one os.read of 4 MiB after drop_caches={dropped}, {label} (returned {len(data)})")
        finally:
            daemon.stop()
        text = logp.read_text(errors="replace")
        init = []
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if "opcode: INIT" in line:
                for follow in lines[i: i + 16]:
                    init.append(follow)
                    if "outsize" in follow and "unique" in follow and follow is not line:
                        break
                break
        out[name] = {"libfuse": next((l for l in lines if l.startswith("FUSE library version")), "?"),
                     "init": init, "phases": phases}
        print(f"== {name}: {out[name]['libfuse']}")
        print("\n".join(init))
        for label, hist in phases.items():
            print(f"-- {label}")
            for op, h in hist.items():
                if h:
                    print(f"   {op}: " + ", ".join(f"{n} x {size} B" for size, n in sorted(h.items())))
        shutil.rmtree(workdir / name, ignore_errors=True)
    return out
