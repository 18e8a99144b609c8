"""Real-mount tests with the ML frameworks themselves: torch.save/load (zip, legacy, mmap), safetensors
(save_file, load_file, safe_open slices), transformers from_pretrained/save_pretrained, and the stored size of
real checkpoints. Every loaded tensor must be bit-identical to the original (compared as raw bytes).

The numpy, mmap-write, atomic-save and tree-copy tests live in test_framework_tools.py.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch a model hub: everything loads from local directories
os.environ["TRANSFORMERS_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

pytestmark = [pytest.mark.mount, pytest.mark.warm_up]
log = logging.getLogger(__name__)

SENTENCES = [
    "dccfs stores every regular file compressed.",
    "Reads must return exactly the bytes that were written.",
    "A checkpoint holds the model weights and the AdamW optimizer state.",
    "short",
]
MAX_RATIO = 0.8


# ---------------------------------------------------------------------------------------------- helpers

def raw_bytes(t: "torch.Tensor") -> "torch.Tensor":
    """The tensor's elements as a flat uint8 tensor (reads every byte, also through an mmap)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(got, want, where: str = "obj") -> None:
    """Recursively compare nested checkpoints; tensors must match in dtype, shape and every byte."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got)} is not a tensor"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.equal(raw_bytes(got), raw_bytes(want)), f"{where}: bytes differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {type(got)} is not a dict"
        assert list(got) == list(want), f"{where}: keys differ"
        for key in want:
            assert_bit_identical(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bit_identical(g, w, f"{where}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


def stored_ratio(mount, rel: str) -> float:
    """Backing container size / logical size of a file written through the mount."""
    logical = (mount.mnt / rel).stat().st_size
    stored = (mount.backing / rel).stat().st_size
    assert logical > 0
    return stored / logical


def embed(model, tokenizer) -> "torch.Tensor":
    """Mean-pooled sentence embeddings (sentence-transformers pooling) of SENTENCES."""
    enc = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def release_mmaps() -> None:
    """Drop tensors/arrays that may still map a file on the mount, so that it can unmount cleanly."""
    gc.collect()


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def minilm(corpus):
    """The MiniLM model and tokenizer loaded once from the corpus, with reference embeddings."""
    transformers = pytest.importorskip("transformers")
    src = corpus / "models" / "minilm"
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(src, local_files_only=True).eval()
    return {"dir": src, "model": model, "tokenizer": tokenizer, "embeddings": embed(model, tokenizer)}


@pytest.fixture(scope="module")
def checkpoint(minilm):
    """A fine-tuning checkpoint: MiniLM after two AdamW steps on every parameter, as a trainer saves it
    (model state_dict plus optimizer state, ~270 MB). Like in any short fine-tune, the exp_avg/exp_avg_sq rows of
    word embeddings whose tokens never occurred are zero; every other moment is dense fp32.
    """
    torch.manual_seed(0)
    model = copy.deepcopy(minilm["model"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    enc = minilm["tokenizer"](SENTENCES, padding=True, return_tensors="pt")
    for _ in range(2):
        opt.zero_grad()
        out = model(**enc).last_hidden_state
        loss = (out[:, 0] - out[:, 1:].mean(1)).pow(2).mean()
        loss.backward()
        opt.step()
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "step": 2,
        "loss": float(loss.detach()),
        "config": {"lr": 1e-4, "name": "minilm-ft"},
    }
    return state


# ---------------------------------------------------------------------------------------------- torch

@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_save_load_checkpoint(make_mount, checkpoint, fmt, caplog):
    """torch.save of state_dict + AdamW state, reloaded after a remount (and with mmap=True for zip)."""
    caplog.set_level(logging.INFO, logger=__name__)
    mount = make_mount()
    path = mount.mnt / "ckpt" / f"step2-{fmt}.pt"
    path.parent.mkdir()
    torch.save(checkpoint, path, _use_new_zipfile_serialization=(fmt == "zip"))
    # Loaded back before the remount (the kernel and the daemon's caches) ...
    assert_bit_identical(torch.load(path, weights_only=True), checkpoint)
    mount.remount()
    # ... and after it, decoded from the stored container.
    size = path.stat().st_size
    ratio = stored_ratio(mount, f"ckpt/step2-{fmt}.pt")
    log.info("torch.save %s checkpoint (model + AdamW state): logical %d B, stored/logical = %.4f",
             fmt, size, ratio)
    print(f"torch.save {fmt}: logical {size} B, stored/logical = {ratio:.4f}")
    assert_bit_identical(torch.load(path, weights_only=True), checkpoint)
    if fmt == "zip":
        loaded = torch.load(path, weights_only=True, mmap=True)
        assert_bit_identical(loaded, checkpoint)
        del loaded
        release_mmaps()
    else:
        with pytest.raises(RuntimeError):  # torch only maps zip checkpoints; the legacy format must say so
            torch.load(path, weights_only=True, mmap=True)


def test_torch_checkpoint_stored_smaller(make_mount, checkpoint, caplog):
    """A torch.save checkpoint with optimizer state is stored below MAX_RATIO of its logical size."""
    caplog.set_level(logging.INFO, logger=__name__)
    mount = make_mount()
    torch.save(checkpoint, mount.mnt / "ckpt.pt")
    mount.remount()
    ratio = stored_ratio(mount, "ckpt.pt")
    log.info("torch.save checkpoint stored/logical = %.4f (limit %.2f)", ratio, MAX_RATIO)
    print(f"torch.save checkpoint stored/logical = {ratio:.4f}")
    assert ratio < MAX_RATIO
    assert_bit_identical(torch.load(mount.mnt / "ckpt.pt", weights_only=True), checkpoint)


# ---------------------------------------------------------------------------------------------- safetensors

def _random_slices(shape, rng, count):
    for _ in range(count):
        index = []
        for dim in shape:
            a = int(rng.integers(0, dim))
            b = int(rng.integers(a + 1, dim + 1))
            index.append(slice(a, b))
        yield tuple(index)


def test_safetensors_save_load_and_slices(make_mount, checkpoint):
    """save_file/load_file round trip, and safe_open(...).get_slice with random slices (an mmap of the file)."""
    tensors = dict(checkpoint["model"])
    # Mixed dtypes in one file: the codec must split them by the header's offsets.
    tensors["extra.bf16"] = checkpoint["model"]["encoder.layer.0.attention.self.query.weight"].to(torch.bfloat16)
    tensors["extra.f16"] = checkpoint["model"]["encoder.layer.1.output.dense.weight"].to(torch.float16)
    tensors["extra.i64"] = torch.arange(1000, dtype=torch.int64) * 7919
    tensors["extra.scalar"] = torch.tensor(3.25)
    mount = make_mount()
    path = mount.mnt / "model.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt", "step": "2"})
    mount.remount()
    loaded = safetensors_torch.load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name in tensors:
        assert_bit_identical(loaded[name], tensors[name], name)
    del loaded
    rng = np.random.default_rng(1234)
    names = sorted(tensors)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "2"}
        assert sorted(f.keys()) == names
        for name in rng.choice(names, size=40):
            want = tensors[name]
            sl = f.get_slice(name)
            assert list(sl.get_shape()) == list(want.shape)
            if want.dim() == 0:
                assert_bit_identical(f.get_tensor(name), want, name)
                continue
            for index in _random_slices(want.shape, rng, 3):
                assert_bit_identical(sl[index], want[index], f"{name}{index}")
        for name in rng.choice(names, size=10):
            assert_bit_identical(f.get_tensor(name), tensors[name], name)
    release_mmaps()


def test_bf16_safetensors_stored_smaller(make_mount, checkpoint, caplog):
    """A bf16 safetensors file written with save_file is stored below MAX_RATIO of its logical size."""
    caplog.set_level(logging.INFO, logger=__name__)
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    mount = make_mount()
    safetensors_torch.save_file(bf16, mount.mnt / "model-bf16.safetensors")
    mount.remount()
    ratio = stored_ratio(mount, "model-bf16.safetensors")
    log.info("bf16 safetensors stored/logical = %.4f (limit %.2f)", ratio, MAX_RATIO)
    print(f"bf16 safetensors stored/logical = {ratio:.4f}")
    assert ratio < MAX_RATIO
    loaded = safetensors_torch.load_file(mount.mnt / "model-bf16.safetensors")
    assert_bit_identical(dict(sorted(loaded.items())), dict(sorted(bf16.items())))


# ---------------------------------------------------------------------------------------------- transformers

def test_transformers_from_pretrained_and_sharded_save_pretrained(make_mount, minilm):
    """AutoModel/AutoTokenizer.from_pretrained from the mount after a remount; save_pretrained with 20MB shards;
    identical tensors and bit-identical mean-pooled embeddings every time."""
    transformers = pytest.importorskip("transformers")
    want_state = minilm["model"].state_dict()
    want_emb = minilm["embeddings"]
    mount = make_mount()
    shutil.copytree(minilm["dir"], mount.mnt / "minilm")
    mount.remount()

    def check(model_dir, tokenizer_dir):
        model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        assert_bit_identical(model.state_dict(), want_state, str(model_dir))
        assert_bit_identical(embed(model, tokenizer), want_emb, "embeddings")
        return model

    model = check(mount.mnt / "minilm", mount.mnt / "minilm")
    for name in ("config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"):
        assert (mount.mnt / "minilm" / name).read_bytes() == (minilm["dir"] / name).read_bytes(), name

    out = mount.mnt / "out"
    model.save_pretrained(out, max_shard_size="20MB")
    del model
    release_mmaps()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4, shards  # ~90 MB of fp32 weights in 20 MB shards
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert set(index["weight_map"]) == set(want_state)
    mount.remount()
    check(out, mount.mnt / "minilm")
    # Each shard, read directly, holds exactly the original tensors it names.
    for shard in shards:
        part = safetensors_torch.load_file(out / shard)
        for name, tensor in part.items():
            assert index["weight_map"][name] == shard
            assert_bit_identical(tensor, want_state[name], f"{shard}:{name}")
    del part
    release_mmaps()
