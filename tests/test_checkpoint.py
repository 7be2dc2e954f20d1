"""Saving in Hugging Face format: transformers loads it, shards and index, atomic replacement."""

import json

import pytest
import torch

from helpers import make_hf_model
from megastream import checkpoint
from megastream.checkpoint import load_hf_weights, save_hf
from megastream.model.layout import model_layout
from megastream.model.spec import ModelSpec
from megastream.presets import PRESETS
from megastream.store import HostStore


def _store(spec):
    return HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)


@pytest.mark.parametrize("kind,shard", [("llama", 5 * 2**30), ("qwen2", 30_000)], ids=["single", "sharded"])
def test_round_trip_through_transformers(tmp_path, kind, shard):
    import transformers

    src = tmp_path / "src"
    ref = make_hf_model(kind, src)
    (src / "tokenizer.json").write_text("{}")  # copied along like generation_config.json
    spec = ModelSpec.from_dir(src)
    store = _store(spec)
    load_hf_weights(store, spec, src)
    out = save_hf(tmp_path / "out", spec, store, "float32", source_config=json.loads((src / "config.json").read_text()),
                  copy_from=[src], shard_bytes=shard)
    files = sorted(p.name for p in out.iterdir())
    if shard < 2**20:
        assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    else:
        assert "model.safetensors" in files
    assert "tokenizer.json" in files and "generation_config.json" in files
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = dict(loaded.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(got[name], p), name


def test_preset_saves_a_loadable_config(tmp_path):
    import transformers

    spec = PRESETS["tiny"]
    store = _store(spec)
    store.init_random(0.02, seed=0)
    out = save_hf(tmp_path / "final", spec, store, "bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb.float(), store.weights_of(0).view(emb.shape).bfloat16().float())


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    spec = PRESETS["tiny"]
    store = _store(spec)
    store.init_random(0.02, seed=0)
    target = save_hf(tmp_path / "final", spec, store, "float32", shard_bytes=2**20)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = []

    def failing_save(path, tensors, dtype=None, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(path, tensors, dtype, **kw)

    real_save = checkpoint.write_safetensors
    monkeypatch.setattr(checkpoint, "write_safetensors", failing_save)
    store.master.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_hf(tmp_path / "final", spec, store, "float32", shard_bytes=2**20)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    monkeypatch.setattr(checkpoint, "write_safetensors", real_save)
    save_hf(tmp_path / "final", spec, store, "float32", shard_bytes=2**20)  # a later save replaces it
    assert {p.name: p.read_bytes() for p in target.iterdir()} != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [p.name for p in tmp_path.iterdir()
                                                                             if p.name.startswith(".final.tmp")]
