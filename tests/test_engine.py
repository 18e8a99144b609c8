"""Engine services without a mount: a failing codec costs ratio, never the chunk."""
from __future__ import annotations

import logging

from dccfs.codecs import ChunkHints, decode_chunk
from dccfs.config import Config
from dccfs.engine import Engine


def test_a_codec_error_falls_back_to_zstd(tmp_path, caplog):
    engine = Engine(Config(), str(tmp_path))
    raw = bytes(range(256)) * 4096
    with caplog.at_level(logging.ERROR, logger="dccfs.engine"):
        encoded, _ = engine.encode(raw, ChunkHints(codec="no-such-codec"))
    assert decode_chunk(encoded.codec_id, encoded.params, encoded.payload, len(raw)) == raw
    assert len(encoded.payload) < len(raw)
    assert engine.stats.codec_failures == 1
    assert engine.stats.snapshot()["errors"]["codec"] == 1
    assert "storing it with zstd instead" in caplog.text
