"""Runs in a child interpreter: decode chunk cases and report each outcome as one JSON line, so a crash or hang kills only the child."""
from __future__ import annotations

import faulthandler
import json
import os
import pickle
import struct
import sys
import tracemalloc

from dccfs.codecs import CodecError, decode_chunk
from dccfs.codecs.delta import CODEC_DELTA, decode_delta


def decode_one(codec_id, params, payload, raw_len, base) -> list:
    """[outcome, length or message, the type and text of the exception behind a CodecError, the most memory
    Python and numpy held during the decode beyond what they held before (tracemalloc: unlike the peak RSS,
    numba compiling a kernel on first use does not count)]."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        if codec_id == CODEC_DELTA:
            out = decode_delta(params, payload, raw_len, base)
        else:
            out = decode_chunk(codec_id, params, payload, raw_len)
        got = ["ok", len(out), "", ""]
    except CodecError as exc:
        cause = exc.__cause__
        got = ["CodecError", str(exc), type(cause).__name__ if cause else "", str(cause) if cause else ""]
    except Exception as exc:
        got = [type(exc).__name__, str(exc), "", ""]
    return got + [tracemalloc.get_traced_memory()[1] - before]


def report(got: list) -> None:
    sys.stdout.write(json.dumps(got) + "\n")
    sys.stdout.flush()


def warm_up() -> None:
    """Load (or compile) the decoding kernels before any case, as a mount does at its start: a cold compile takes
    minutes on a fresh clone (three times longer under tracemalloc) and must not read as a hanging case."""
    from dccfs.codecs.delta import warm_up as warm_up_delta
    from dccfs.engine import warm_up_codecs
    warm_up_codecs()
    warm_up_delta()


def decode_file(path: str, case_seconds: float) -> None:
    """Every case of a pickled list; a case still decoding after case_seconds ends the process (exit status 1,
    faulthandler's "Timeout" and the stack on stderr), a watchdog that fires even inside a compiled loop."""
    with open(path, "rb") as f:
        cases = pickle.load(f)
    for case in cases:
        faulthandler.dump_traceback_later(case_seconds, exit=True)
        got = decode_one(*case)
        faulthandler.cancel_dump_traceback_later()
        report(got)


def serve_stdin() -> None:
    """Cases sent one at a time on stdin (u32 length + pickle), until it closes."""
    while True:
        head = sys.stdin.buffer.read(4)
        if len(head) < 4:
            break
        report(decode_one(*pickle.loads(sys.stdin.buffer.read(struct.unpack("<I", head)[0]))))


if __name__ == "__main__":
    warm_up()
    tracemalloc.start()
    if len(sys.argv) > 1:
        decode_file(sys.argv[1], float(os.environ.get("DCCFS_CASE_SECONDS", "120")))
    else:
        serve_stdin()
