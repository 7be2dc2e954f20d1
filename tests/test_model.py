"""The pure model functions, loaded through the same loader users run, against transformers."""

import json

import pytest
import torch

from helpers import LLAMA_KW, make_hf_model, rel_err
from megastream.checkpoint import load_hf_weights
from megastream.errors import CheckpointError
from megastream.model.layout import count_params, model_layout
from megastream.model.llama import block, logits, rope_inv_freq, rope_tables
from megastream.model.spec import ModelSpec
from megastream.presets import PRESETS
from megastream.store import HostStore


def _load(path):
    spec = ModelSpec.from_dir(path)
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)
    load_hf_weights(store, spec, path)
    return spec, store


def _forward(spec, store, ids):
    units = [u.views(store.weights_of(i)) for i, u in enumerate(store.units)]
    x = units[0]["embed"][ids]
    rope = rope_tables(spec, torch.arange(ids.shape[1]), torch.float32)
    for i in range(spec.num_layers):
        x = block(x, units[i + 1], rope, spec)
    head_w = units[0]["embed"] if spec.tie_word_embeddings else units[-1]["lm_head"]
    return logits(x, units[-1]["norm"], head_w, spec)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_logits_match_transformers(tmp_path, kind):
    model = make_hf_model(kind, tmp_path)
    spec, store = _load(tmp_path)
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = _forward(spec, store, ids)
    assert rel_err(got, ref) < 1e-5


def test_llama3_rope_scaling_is_applied(tmp_path):
    make_hf_model("llama", tmp_path)
    spec = ModelSpec.from_dir(tmp_path)
    assert spec.rope_scaling["rope_type"] == "llama3" and spec.rope_theta == 500000.0
    plain = ModelSpec(**{**spec.to_dict(), "rope_scaling": None})
    scaled, unscaled = rope_inv_freq(spec), rope_inv_freq(plain)
    assert not torch.allclose(scaled, unscaled)  # the logits test above therefore covers the scaling
    torch.testing.assert_close(scaled[-1], unscaled[-1] / LLAMA_KW["rope_scaling"]["factor"])


def test_transformers_v4_config_layout_is_read():
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1234.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8}}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.rope_theta == 1234.0 and spec.rope_scaling["factor"] == 2.0
    assert spec.num_kv_heads == 2 and spec.head_dim == 4


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        ModelSpec.from_dir(tmp_path)
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(CheckpointError, match="rope type 'yarn'"):
        ModelSpec.from_hf_config(cfg)


def test_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_model("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    spec = ModelSpec.from_dir(tmp_path)
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)

    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(f))
    with pytest.raises(CheckpointError, match="missing tensor.*model.norm.weight"):
        load_hf_weights(store, spec, tmp_path)

    save_file({**tensors, "model.norm.weight": torch.ones(5)}, str(f))
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*shape \(5,\)"):
        load_hf_weights(store, spec, tmp_path)

    f.write_bytes(f.read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf_weights(store, spec, tmp_path)


def test_preset_shapes():
    """Per-layer sizes from DESIGN.md."""
    def per_layer(name):
        return model_layout(PRESETS[name])[1].numel

    assert per_layer("qwen2.5-14b") == pytest.approx(275e6, rel=0.01)
    assert per_layer("qwen2.5-7b") == pytest.approx(233e6, rel=0.01)
    assert per_layer("llama-3.1-8b") == pytest.approx(218e6, rel=0.01)
    assert per_layer("qwen2.5-1.5b") == pytest.approx(46.8e6, rel=0.01)
    assert count_params(PRESETS["qwen2.5-14b"]) == pytest.approx(14.77e9, rel=0.01)
    assert count_params(PRESETS["llama-3.1-8b"]) == pytest.approx(8.03e9, rel=0.01)


def test_qwen3_and_mistral_specs(tmp_path):
    make_hf_model("qwen3", tmp_path / "q3")
    q3 = ModelSpec.from_dir(tmp_path / "q3")
    assert q3.qk_norm and q3.qkv_bias and q3.o_bias and q3.head_dim == 16  # head_dim != hidden/heads
    names = [e.hf_name for e in model_layout(q3)[1].entries]
    assert "model.layers.0.self_attn.q_norm.weight" in names and "model.layers.0.self_attn.o_proj.bias" in names
    make_hf_model("mistral", tmp_path / "mi")
    mi = ModelSpec.from_dir(tmp_path / "mi")
    assert mi.sliding_window == 48 and not mi.qk_norm and not mi.qkv_bias


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_gradients_match_transformers(tmp_path, kind):
    """Every parameter's gradient from one engine step (layer-major, recompute, chunked head) equals
    transformers' autograd gradient of the same token-mean loss."""
    import torch.nn.functional as F

    from megastream.config import Config, EngineConfig, TrainConfig
    from megastream.engine.engine import Engine, MicroBatch
    from megastream.model.layout import hf_names

    model = make_hf_model(kind, tmp_path)
    spec, store = _load(tmp_path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (4, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)
    logits_ = model(input_ids=ids).logits
    F.cross_entropy(logits_.reshape(-1, spec.vocab_size), labels.reshape(-1), ignore_index=-100).backward()

    cfg = Config(train=TrainConfig(grad_clip=0.0), engine=EngineConfig(loss_chunk_tokens=7))
    engine = Engine(spec, store, cfg, torch.device("cpu"))
    engine.step([MicroBatch(ids[:2], labels[:2]), MicroBatch(ids[2:], labels[2:])], lr=1e-9)
    engine.close()  # without clipping the staged gradients are left as computed
    names = hf_names(spec)
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        u, e = names[name]
        got = store.grad_of(u)[e.offset:e.offset + e.numel].view(e.shape)
        assert rel_err(got, p.grad) <= 1e-4, name
