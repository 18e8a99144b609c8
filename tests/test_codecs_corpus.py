"""Corpus files (if .corpus exists) round-trip bit-exact in 256 KiB chunks with sniffed hints."""
from pathlib import Path

import pytest

from dccfs.codecs import ChunkHints, decode_chunk, encode_chunk, sniff_layout

CORPUS = Path(__file__).resolve().parent.parent / ".corpus"
CHUNK = 256 * 1024
FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "MANIFEST.tsv") if CORPUS.is_dir() else []
FAST_BYTES = 6 << 20  # the default run checks the head of each file; -m slow checks them whole


def check(path: Path, limit: int | None) -> None:
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(1 << 20)
        layout = sniff_layout(prefix, size)
        fh.seek(0)
        off = 0
        while limit is None or off < limit:
            raw = fh.read(CHUNK)
            if not raw:
                break
            hints = layout.hints_for(off, raw) if layout else ChunkHints()
            enc = encode_chunk(raw, hints)
            assert decode_chunk(enc.codec_id, enc.params, enc.payload, len(raw)) == raw, (path, off)
            off += len(raw)


@pytest.mark.skipif(not FILES, reason="no .corpus")
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_head_roundtrip(path):
    check(path, FAST_BYTES)


@pytest.mark.slow
@pytest.mark.skipif(not FILES, reason="no .corpus")
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_whole_roundtrip(path):
    check(path, None)
