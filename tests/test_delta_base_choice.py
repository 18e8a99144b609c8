"""Which earlier file a new one takes as its delta base (dccfs/delta_candidates.py), and when it gives up on it."""
from __future__ import annotations

import os

import numpy as np
import pytest

from dccfs.codecs import ChunkHints, Segment, encode_chunk
from dccfs.container import Container
from dccfs.delta import PROBE_CHUNKS, DeltaWriter
from dccfs.format import checksum64

CHUNK_SHIFT = 16
N_CHUNKS = PROBE_CHUNKS + 6


def _weights(seed: int, scale: float) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, N_CHUNKS << (CHUNK_SHIFT - 2)).astype(np.float32).tobytes()


def _hints(raw: bytes, effort: int) -> ChunkHints:
    return ChunkHints(segments=(Segment(0, len(raw), "f32"),), effort=effort)


def _chunks(data: bytes):
    cs = 1 << CHUNK_SHIFT
    return [(idx, data[idx * cs:(idx + 1) * cs]) for idx in range(-(-len(data) // cs))]


@pytest.fixture
def backing(tmp_path):
    (tmp_path / ".dccfs").mkdir()
    (tmp_path / "run").mkdir()
    return tmp_path


def _store(backing, rel: str, data: bytes) -> None:
    path = os.path.join(backing, rel)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    container = Container.create(fd, path, CHUNK_SHIFT)
    for idx, raw in _chunks(data):
        container.append_chunk(idx, encode_chunk(raw, _hints(raw, 1)), len(raw), checksum64(raw))
    container.commit(len(data), durable=False)
    os.close(fd)


def _writer(backing, rel: str) -> DeltaWriter:
    """The writer a saver's temporary file gets: any file beside it is a candidate base."""
    fd = os.open(os.path.join(backing, rel), os.O_RDWR | os.O_CREAT, 0o644)
    container = Container.create(fd, os.path.join(backing, rel), CHUNK_SHIFT)
    os.close(fd)
    writer = DeltaWriter.for_file(str(backing), rel, container.header.file_id)
    assert writer is not None
    writer.dependent_key = "dependent"
    return writer


@pytest.mark.parametrize("effort", [1, 0])
def test_an_unrelated_base_is_given_up_after_the_probe(backing, effort):
    """Another model's weights beside a temporary file: PROBE_CHUNKS attempts, then keyframes
    without trying, and nothing left for the pass after close, even while the encoders are
    behind the writer (effort 0 puts deltas off)."""
    _store(backing, "run/other.bin", _weights(1, 0.05))
    writer = _writer(backing, "run/.tmp-save")
    try:
        results = [writer.encode(idx, raw, _hints(raw, effort)) for idx, raw in _chunks(_weights(2, 0.02))]
        assert results == [None] * N_CHUNKS
        assert writer.attempts == PROBE_CHUNKS
        assert writer.given_up
        assert not writer.deferred
    finally:
        writer.close()


def test_a_related_base_is_kept_and_deltas_are_put_off_under_backlog(backing):
    """The next step of a series: deltas in the probe, then, at effort 0, the rest put off for the pass."""
    base = _weights(1, 0.05)
    _store(backing, "run/step-10.bin", base)
    update = np.random.default_rng(3).normal(0, 1e-4, len(base) // 4).astype(np.float32)
    later = (np.frombuffer(base, np.float32) + update).astype(np.float32).tobytes()
    writer = _writer(backing, "run/.tmp-save")
    try:
        results = [writer.encode(idx, raw, _hints(raw, 0)) for idx, raw in _chunks(later)]
        assert all(r is not None for r in results[:PROBE_CHUNKS])
        assert results[PROBE_CHUNKS:] == [None] * (N_CHUNKS - PROBE_CHUNKS)
        assert not writer.given_up
        assert writer.deferred == set(range(PROBE_CHUNKS, N_CHUNKS))
    finally:
        writer.close()


def _container_of(backing, rel: str, data: bytes) -> Container:
    _store(backing, rel, data)
    path = os.path.join(backing, rel)
    return Container.open(os.open(path, os.O_RDONLY), path)


@pytest.mark.parametrize("base_data, resembling", [
    (b'{"hidden_size": 384, "step": 500}', False),          # config.json beside the new model
    (b"PK\x03\x04" + bytes(range(200)) * 50, False),        # a torch zip beside a safetensors file
    (b"HEADER" * 20 + b"\x01" * 9000, True),                # the same header, other data after it
    (None, True),                                           # raw f32 weights one small step earlier
])
def test_a_temporary_file_takes_only_a_base_that_resembles_it(backing, base_data, resembling):
    from dccfs.delta_candidates import resembles
    ours = b"HEADER" * 20 + b"\x02" * 9000
    if base_data is None:
        weights = np.frombuffer(_weights(1, 0.05), np.float32)
        ours = weights.tobytes()
        step = np.random.default_rng(4).normal(0, 1e-4, weights.size).astype(np.float32)
        base_data = (weights - step).astype(np.float32).tobytes()
    base = _container_of(backing, "run/base.bin", base_data)
    try:
        assert resembles(ours, base) is resembling
    finally:
        os.close(base.fd)


def test_a_base_of_another_chunk_size_or_still_being_written_is_not_taken(backing):
    """Chunk i is paired with chunk i of the base: a base cut into other chunks pairs other
    offsets (a `tempfile` name got 256 KiB chunks, its renamed successor 1 MiB). A file with
    no trailer is another writer's, unfinished."""
    from dccfs.delta_candidates import open_base
    data = _weights(1, 0.05)
    _store(backing, "run/step-10.bin", data)
    path = os.path.join(backing, "run/step-10.bin")
    assert open_base(path, b"x" * 16, 1 << CHUNK_SHIFT) is not None
    assert open_base(path, b"x" * 16, 1 << (CHUNK_SHIFT + 2)) is None
    fd = os.open(os.path.join(backing, "run/step-20.bin"), os.O_RDWR | os.O_CREAT, 0o644)
    unfinished = Container.create(fd, os.path.join(backing, "run/step-20.bin"), CHUNK_SHIFT)
    for idx, raw in _chunks(data)[:3]:
        unfinished.append_chunk(idx, encode_chunk(raw, _hints(raw, 1)), len(raw), checksum64(raw))
    os.close(fd)
    assert open_base(os.path.join(backing, "run/step-20.bin"), b"x" * 16, 1 << CHUNK_SHIFT) is None


def test_the_same_name_in_the_last_step_comes_before_newer_files_of_the_pattern(backing):
    """Per-rank files (DeepSpeed's zero_pp_rank_N, DCP's __N_0.distcp): the newest file of the
    pattern was the other rank's of this step, taken as the base when it resembled the new
    file enough (found by review with real DCP and DeepSpeed layouts)."""
    from dccfs.delta_candidates import find_base_candidates
    data = _weights(1, 0.05)
    files = ["global_step100/zero_pp_rank_0_optim_states.pt", "global_step100/zero_pp_rank_1_optim_states.pt",
             "global_step200/zero_pp_rank_1_optim_states.pt"]
    for n, rel in enumerate(files):
        os.makedirs(os.path.join(backing, os.path.dirname(rel)), exist_ok=True)
        _store(backing, rel, data)
        os.utime(os.path.join(backing, rel), ns=(10**18 + n * 10**9,) * 2)
    found = find_base_candidates(str(backing), "global_step200/zero_pp_rank_0_optim_states.pt")
    found = [os.path.relpath(p, backing) for p in found]
    assert found[0] == files[0] and sorted(found) == sorted(files)


@pytest.mark.parametrize("earlier, new", [
    ("iter_0000100/mp_rank_00/model_optim_rng.pt", "iter_0000200/mp_rank_00/model_optim_rng.pt"),  # Megatron
    ("checkpoint-100/model.safetensors", "tmp-checkpoint-200/model.safetensors"),  # a staging directory
    ("run/checkpoint-100/optimizer.pt", "run/tmpk2j4x9/optimizer.pt"),  # tempfile.mkdtemp, renamed when complete
])
def test_earlier_versions_are_found_where_layouts_put_them(backing, earlier, new):
    """The series' digits two levels up (Megatron), or a temporary directory renamed into place:
    no base was found, and no chunk of those series was ever a delta (found by review)."""
    from dccfs.delta_candidates import find_base_candidates
    os.makedirs(os.path.join(backing, os.path.dirname(earlier)), exist_ok=True)
    os.makedirs(os.path.join(backing, os.path.dirname(new)), exist_ok=True)
    _store(backing, earlier, _weights(1, 0.05))
    found = find_base_candidates(str(backing), new)
    assert [os.path.relpath(p, backing) for p in found] == [earlier]


def test_megatron_takes_its_own_rank_of_the_last_iteration(backing):
    """iter_N/mp_rank_RR: the other rank of this iteration has the same file name and is newer."""
    from dccfs.delta_candidates import find_base_candidates
    files = ["iter_0000100/mp_rank_00/model_optim_rng.pt", "iter_0000100/mp_rank_01/model_optim_rng.pt",
             "iter_0000200/mp_rank_01/model_optim_rng.pt"]
    for n, rel in enumerate(files):
        os.makedirs(os.path.join(backing, os.path.dirname(rel)), exist_ok=True)
        _store(backing, rel, _weights(1, 0.05))
        os.utime(os.path.join(backing, rel), ns=(10**18 + n * 10**9,) * 2)
    found = find_base_candidates(str(backing), "iter_0000200/mp_rank_00/model_optim_rng.pt")
    assert os.path.relpath(found[0], backing) == files[0]


def test_a_fixed_name_takes_only_a_sibling_of_its_extension_that_resembles_it(backing):
    """last.ckpt (no digits) looks at the numbered .ckpt files beside it, never at another extension,
    and takes one only when it resembles the new file: a numbered sibling is no series of a
    fixed name, so there is no fallback to the newest (it would store keyframes after
    delta.PROBE_CHUNKS tries)."""
    from dccfs.delta_candidates import find_base_candidates
    weights = _weights(1, 0.05)
    _store(backing, "run/epoch=3-step=400.ckpt", weights)
    _store(backing, "run/optimizer.pt", weights)
    # Another fixed name is rewritten in place: as a base its pin would keep each old version
    # (model.pt saved every epoch beside best_model.pt: found by review).
    _store(backing, "run/best.ckpt", weights)
    found = find_base_candidates(str(backing), "run/last.ckpt")
    assert [os.path.relpath(p, backing) for p in found] == ["run/epoch=3-step=400.ckpt"]
    fd = os.open(os.path.join(backing, "run/last.ckpt"), os.O_RDWR | os.O_CREAT, 0o644)
    file_id = Container.create(fd, os.path.join(backing, "run/last.ckpt"), CHUNK_SHIFT).header.file_id
    os.close(fd)
    alike = DeltaWriter.for_file(str(backing), "run/last.ckpt", file_id, prefix=weights[:1 << CHUNK_SHIFT],
                                 chunk_size=1 << CHUNK_SHIFT)
    assert alike is not None and os.path.basename(alike.base.path) == "epoch=3-step=400.ckpt"
    alike.close()
    unlike = DeltaWriter.for_file(str(backing), "run/last.ckpt", file_id,
                                  prefix=_weights(7, 3.0)[:1 << CHUNK_SHIFT], chunk_size=1 << CHUNK_SHIFT)
    assert unlike is None


def test_a_fixed_name_passes_over_a_sibling_with_deltas_behind_a_keyframe_first_chunk(backing):
    """delta_chain 1: last.ckpt's sibling epoch=1.ckpt is a delta file whose first chunk is a
    keyframe (its first tensor changed). Only that first chunk was looked at, so it was taken,
    and last.ckpt then stored keyframes ('its base has deltas 1 deep'; found by review)."""
    weights = _weights(1, 0.05)
    _store(backing, "run/epoch=0.ckpt", weights)
    step = np.random.default_rng(5).normal(0, 1e-4, len(weights) // 4).astype(np.float32)
    later = bytearray((np.frombuffer(weights, np.float32) + step).astype(np.float32).tobytes())
    later[:1 << CHUNK_SHIFT] = _weights(9, 2.0)[:1 << CHUNK_SHIFT]  # a first tensor that changed
    later = bytes(later)
    path = os.path.join(backing, "run/epoch=1.ckpt")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    container = Container.create(fd, path, CHUNK_SHIFT)
    writer = DeltaWriter.for_file(str(backing), "run/epoch=1.ckpt", container.header.file_id,
                                  chunk_size=1 << CHUNK_SHIFT)
    assert writer is not None and os.path.basename(writer.base.path) == "epoch=0.ckpt"
    writer.dependent_key = "epoch1"
    kinds = []
    for idx, raw in _chunks(later):
        encoded = writer.encode(idx, raw, _hints(raw, 1))
        kinds.append(encoded is not None)
        container.append_chunk(idx, encoded or encode_chunk(raw, _hints(raw, 1)), len(raw), checksum64(raw))
    container.commit(len(later), durable=False)
    writer.close()
    os.close(fd)
    assert not kinds[0] and all(kinds[1:]), kinds
    fd = os.open(os.path.join(backing, "run/last.ckpt"), os.O_RDWR | os.O_CREAT, 0o644)
    file_id = Container.create(fd, os.path.join(backing, "run/last.ckpt"), CHUNK_SHIFT).header.file_id
    os.close(fd)
    chosen = DeltaWriter.for_file(str(backing), "run/last.ckpt", file_id, prefix=later[:1 << CHUNK_SHIFT],
                                  chunk_size=1 << CHUNK_SHIFT)
    try:
        assert chosen is None or os.path.basename(chosen.base.path) != "epoch=1.ckpt"
    finally:
        if chosen is not None:
            chosen.close()
