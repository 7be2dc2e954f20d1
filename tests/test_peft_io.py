"""megastream.adapters.peft_io against peft itself: files peft writes are read tensor for tensor,
files megastream writes load into peft.PeftModel with no missing or unexpected keys and the same
logits, and every bad lora.init / lora.* value is refused with a message naming the fix."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from megastream.adapters import peft_io  # noqa: E402
from megastream.adapters.peft_io import (LINEAR_TARGETS, adapter_shapes, load_adapter, resolve_targets,  # noqa: E402
                                         save_adapter, scaling)
from megastream.errors import CheckpointError, ConfigError  # noqa: E402
from megastream.model.spec import ModelSpec  # noqa: E402

R, ALPHA = 4, 8
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 17]])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def spec(base) -> ModelSpec:
    return ModelSpec.from_dir(base)


def _base_model(base):
    return transformers.AutoModelForCausalLM.from_pretrained(base).eval()


def _peft_adapter(base, out: Path, seed=1, **lora):
    """An adapter trained by 'peft' (random, nonzero B): its directory and its logits on IDS."""
    torch.manual_seed(seed)
    kw = dict(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
              task_type="CAUSAL_LM")
    kw.update(lora)
    pm = peft.get_peft_model(_base_model(base), peft.LoraConfig(**kw))
    with torch.no_grad():  # modules_to_save start as copies of the base: make them differ
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(out)
    pm.eval()
    with torch.no_grad():
        logits = pm(IDS).logits
    return out, logits


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    return _peft_adapter(base, tmp_path_factory.mktemp("peft") / "adapter")


def _peft_load(base, d: Path):
    """PeftModel.from_pretrained(base, d), asserting peft warns about nothing missing, and the
    explicit load result has no missing or unexpected keys; returns the model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(_base_model(base), d)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    result = model.load_adapter(d, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.set_adapter("default")
    return model.eval()


def _save_like(d: Path, tensors, cfg, base_name="base-model"):
    return save_adapter(d, tensors, rank=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                        targets=cfg["target_modules"], rslora=cfg["use_rslora"], base_model_name_or_path=base_name,
                        modules_to_save=cfg["modules_to_save"])


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ---- shapes, targets, scaling ----------------------------------------------------------------------
def test_resolve_targets(spec):
    assert resolve_targets("all-linear", spec) == LINEAR_TARGETS
    assert resolve_targets(["v_proj", "q_proj", "q_proj"], spec) == ("q_proj", "v_proj")
    assert resolve_targets("o_proj", spec) == ("o_proj",)
    with pytest.raises(ConfigError, match=r"'qkv_proj'.*Qwen2ForCausalLM.*q_proj, k_proj, v_proj, o_proj, "
                                          r"gate_proj, up_proj, down_proj"):
        resolve_targets(["q_proj", "qkv_proj"], spec)
    with pytest.raises(ConfigError, match="lora.train_extra"):
        resolve_targets(["lm_head"], spec)
    with pytest.raises(ConfigError, match="empty"):
        resolve_targets([], spec)


def test_scaling_and_bad_rank(spec):
    assert scaling(32, 16, False) == 2.0
    assert scaling(32, 16, True) == 8.0
    for bad in (0, -4, 2.5, True, None):
        with pytest.raises(ConfigError, match=r"lora.rank must be a positive integer"):
            scaling(16, bad, False)
        with pytest.raises(ConfigError, match=r"lora.rank"):
            adapter_shapes(spec, ["q_proj"], bad)


def test_adapter_shapes_match_peft_all_linear(base, spec, tmp_path):
    d, _ = _peft_adapter(base, tmp_path / "a", target_modules="all-linear")
    cfg = json.loads((d / "adapter_config.json").read_text())
    # peft 0.21 expands all-linear to every matched module's full path (lm_head excluded)
    assert {t.rpartition(".")[2] for t in cfg["target_modules"]} == set(LINEAR_TARGETS)
    saved = load_file(d / "adapter_model.safetensors")
    shapes = adapter_shapes(spec, resolve_targets("all-linear", spec), R)
    assert len(shapes) == 2 * 7
    want = {}
    for path, (a, b) in shapes.items():
        want[f"base_model.model.{path}.lora_A.weight"] = a
        want[f"base_model.model.{path}.lora_B.weight"] = b
    assert {k: tuple(v.shape) for k, v in saved.items()} == want
    assert shapes["model.layers.1.self_attn.k_proj"] == ((R, 64), (2 * 16, R))
    assert shapes["model.layers.0.mlp.down_proj"] == ((R, 96), (64, R))
    tensors, lcfg = load_adapter(d, spec, rank=R, targets="all-linear")
    assert lcfg["target_modules"] == list(LINEAR_TARGETS) and len(tensors) == 28


# ---- round trips through peft ----------------------------------------------------------------------
def test_load_reads_peft_tensors(peft_dir, spec):
    d, _ = peft_dir
    tensors, cfg = load_adapter(d, spec, rank=R, targets=["q_proj", "v_proj", "down_proj"], log=pytest.fail)
    saved = load_file(d / "adapter_model.safetensors")
    assert len(tensors) == len(saved) == 2 * 3 * 2
    for k, t in tensors.items():
        assert torch.equal(t, saved[f"base_model.model.{k}.weight"])
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["modules_to_save"]) == (R, ALPHA, False, None)


def test_save_loads_in_peft_unchanged(base, peft_dir, spec, tmp_path):
    d, logits = peft_dir
    tensors, cfg = load_adapter(d, spec)
    ours = _save_like(tmp_path / "final", tensors, cfg)
    assert sorted(p.name for p in ours.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert list(tmp_path.iterdir()) == [ours]  # no temporary left behind
    ours_keys = load_file(ours / "adapter_model.safetensors")
    assert set(ours_keys) == set(load_file(d / "adapter_model.safetensors"))
    assert all("default" not in k for k in ours_keys)
    written = json.loads((ours / "adapter_config.json").read_text())
    assert (written["peft_type"], written["task_type"], written["base_model_name_or_path"]) == \
        ("LORA", "CAUSAL_LM", "base-model")
    lc = peft.LoraConfig.from_pretrained(ours)
    assert (lc.r, lc.lora_alpha, lc.use_rslora, lc.lora_dropout, lc.bias, lc.use_dora, lc.fan_in_fan_out) == \
        (R, ALPHA, False, 0.0, "none", False, False)
    model = _peft_load(base, ours)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=0)
    # and back: what we wrote reads as what we saved
    again, cfg2 = load_adapter(ours, spec, base_model_name_or_path="base-model", log=pytest.fail)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_rslora_scaling(base, spec, tmp_path):
    d, logits = _peft_adapter(base, tmp_path / "a", use_rslora=True, target_modules=["o_proj", "up_proj"])
    tensors, cfg = load_adapter(d, spec)
    assert cfg["use_rslora"] is True and cfg["target_modules"] == ["o_proj", "up_proj"]
    model = _peft_load(base, _save_like(tmp_path / "ours", tensors, cfg))
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    assert math.isclose(layer.scaling["default"], scaling(ALPHA, R, True)) and scaling(ALPHA, R, True) == 4.0
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=0)


def test_modules_to_save_round_trip(base, spec, tmp_path):
    d, logits = _peft_adapter(base, tmp_path / "a", modules_to_save=["embed_tokens", "lm_head"])
    saved = load_file(d / "adapter_model.safetensors")
    # peft saves a full module by its plain path, not "<module>.modules_to_save.<adapter>.weight"
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(saved)
    tensors, cfg = load_adapter(d, spec)
    assert cfg["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert torch.equal(tensors["lm_head"], saved["base_model.model.lm_head.weight"])
    assert torch.equal(tensors["model.embed_tokens"], saved["base_model.model.model.embed_tokens.weight"])
    ours = _save_like(tmp_path / "ours", tensors, cfg)
    assert set(load_file(ours / "adapter_model.safetensors")) == set(saved)
    model = _peft_load(base, ours)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=0)
    # bf16 tensors are written as bf16 and read back unchanged
    half = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    back, _ = load_adapter(_save_like(tmp_path / "bf16", half, cfg), spec)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], half[k]) for k in half)


# ---- bad lora.init ---------------------------------------------------------------------------------
def test_init_disagreeing_with_config(peft_dir, spec):
    d, _ = peft_dir
    with pytest.raises(ConfigError, match=r"lora.init.*adapts q_proj, v_proj, down_proj but lora.target_modules "
                                          r"is q_proj, k_proj.*lora.target_modules to \['q_proj', 'v_proj', "
                                          r"'down_proj'\]"):
        load_adapter(d, spec, targets=["q_proj", "k_proj"])
    with pytest.raises(ConfigError, match=r"lora.init.*r=4.*lora.rank is 16.*lora.rank: 4"):
        load_adapter(d, spec, rank=16)
    with pytest.raises(ConfigError, match="lora.rank must be a positive integer"):
        load_adapter(d, spec, rank=0)
    with pytest.raises(ConfigError, match="'gate'"):
        load_adapter(d, spec, targets=["gate"])


def test_init_from_another_base(peft_dir, spec, tmp_path):
    d, _ = peft_dir
    cfg = json.loads((d / "adapter_config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes())
    (other / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="org/other-model")))
    logged = []
    load_adapter(other, spec, base_model_name_or_path="/models/mine", log=logged.append)
    assert len(logged) == 1 and "org/other-model" in logged[0] and "/models/mine" in logged[0] \
        and "warning" in logged[0]
    logged.clear()
    load_adapter(other, spec, base_model_name_or_path="org/other-model/", log=logged.append)
    assert logged == []
    # shapes: a wider model refuses, naming the key and both shapes
    wide = replace(spec, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: tensor base_model\.model\.model\.layers"
                                              r"\.0\.mlp\.down_proj\.lora_A\.weight has shape \(4, 96\) but this model "
                                              r".* needs \(4, 128\).*another base model.*'org/other-model'"):
        load_adapter(other, wide, log=lambda m: None)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) base_model\.model\.model\.layers\.2\..*3 layers"):
        load_adapter(other, replace(spec, num_layers=3), log=lambda m: None)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) base_model\.model\.model\.layers\.1\."):
        load_adapter(other, replace(spec, num_layers=1), log=lambda m: None)


def _adapter_with(src: Path, dst: Path, **cfg_changes) -> Path:
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(dict(cfg, **cfg_changes)))
    return dst


@pytest.mark.parametrize("changes, error", [
    (dict(peft_type="IA3"), r"peft_type is 'IA3', not 'LORA'"),
    (dict(task_type="SEQ_CLS"), r"task_type is 'SEQ_CLS', not 'CAUSAL_LM'"),
    (dict(use_dora=True), r"DoRA \(use_dora\), which megastream does not train"),
    (dict(rank_pattern={"q_proj": 8}), r"per-module ranks"),
    (dict(layers_to_transform=[0]), r"some layers only"),
    (dict(target_modules=["q_proj", "lm_head"]), r"adapts lm_head; megastream trains LoRA on q_proj"),
    (dict(modules_to_save=["score"]), r"modules_to_save names 'score'"),
    (dict(r=0), r"'r' is 0, not a positive integer"),
    (dict(r=8), r"q_proj.lora_A.weight has rank 4 but .*adapter_config.json says r=8"),
])
def test_bad_adapter_config(peft_dir, spec, tmp_path, changes, error):
    d = _adapter_with(peft_dir[0], tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=error) as e:
        load_adapter(d, spec)
    assert str(d) in str(e.value) and "lora.init" in str(e.value)


def test_task_type_none_and_regex_targets(peft_dir, spec, tmp_path):
    # peft's own default LoraConfig has no task_type; a regex target_modules is read from the tensors
    d = _adapter_with(peft_dir[0], tmp_path / "a", task_type=None, target_modules=r".*\.(q_proj|v_proj|down_proj)")
    tensors, cfg = load_adapter(d, spec)
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"] and len(tensors) == 12


def test_missing_or_damaged_files(peft_dir, spec, tmp_path):
    with pytest.raises(CheckpointError, match=r"lora.init: .*nowhere is not a directory"):
        load_adapter(tmp_path / "nowhere", spec)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"has no adapter_config.json.*model.path"):
        load_adapter(empty, spec)
    (empty / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"adapter_config.json: not valid JSON"):
        load_adapter(empty, spec)
    (empty / "adapter_config.json").write_text((peft_dir[0] / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no adapter_model.safetensors.*lora.init: null"):
        load_adapter(empty, spec)
    (empty / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(empty, spec)
    # older peft's adapter_model.bin is read too
    (empty / "adapter_model.safetensors").unlink()
    torch.save(load_file(peft_dir[0] / "adapter_model.safetensors"), empty / "adapter_model.bin")
    tensors, _ = load_adapter(empty, spec)
    assert len(tensors) == 12


# ---- save: bad input and atomicity -----------------------------------------------------------------
def test_save_refuses_bad_input_and_keeps_existing(peft_dir, spec, tmp_path):
    tensors, cfg = load_adapter(peft_dir[0], spec)
    final = _save_like(tmp_path / "final", tensors, cfg)
    before = _snapshot(final)
    with pytest.raises(ConfigError, match="lora.rank must be a positive integer"):
        _save_like(final, tensors, dict(cfg, r=0))
    with pytest.raises(ValueError, match="expected \\(r, in\\) with r=8"):
        _save_like(final, tensors, dict(cfg, r=8))
    with pytest.raises(ConfigError, match=r"lora.train_extra: 'norm'"):
        _save_like(final, tensors, dict(cfg, modules_to_save=["norm"]))
    with pytest.raises(ValueError, match="no tensors for"):
        _save_like(final, tensors, dict(cfg, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="unexpected tensor"):
        _save_like(final, tensors, dict(cfg, target_modules=["q_proj", "v_proj"]))
    nan = dict(tensors)
    nan["model.layers.1.mlp.down_proj.lora_B"] = torch.full_like(nan["model.layers.1.mlp.down_proj.lora_B"], math.nan)
    with pytest.raises(CheckpointError, match=r"refusing to write the adapter .*final.*NaN"):
        _save_like(final, nan, cfg)
    assert _snapshot(final) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_save_is_atomic(peft_dir, spec, tmp_path, monkeypatch):
    tensors, cfg = load_adapter(peft_dir[0], spec)
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text('{"old": true}')
    (final / "adapter_model.safetensors").write_bytes(b"old weights")
    before = _snapshot(final)

    import megastream.checkpoint as ckpt
    real = ckpt.write_safetensors

    def dies_midway(path, *a, **k):
        Path(path).write_bytes(b"half a file")
        raise OSError("simulated I/O error")

    monkeypatch.setattr(ckpt, "write_safetensors", dies_midway)
    with pytest.raises(OSError, match="simulated"):
        _save_like(final, tensors, cfg)
    assert _snapshot(final) == before and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    monkeypatch.setattr(ckpt, "write_safetensors", real)

    def extra_fails(tmp):
        (tmp / "tokenizer.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_adapter(final, tensors, rank=R, alpha=ALPHA, dropout=0.0, targets=cfg["target_modules"], rslora=False,
                     base_model_name_or_path=None, extra=extra_fails)
    assert _snapshot(final) == before and sorted(p.name for p in tmp_path.iterdir()) == ["final"]

    # the last step, the rename into place, failing: the old directory is put back
    real_rename = peft_io.os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(peft_io.os, "rename", rename)
    with pytest.raises(OSError, match="rename failure"):
        _save_like(final, tensors, cfg)
    monkeypatch.undo()
    assert _snapshot(final) == before and sorted(p.name for p in tmp_path.iterdir()) == ["final"]

    # and a successful save replaces it, with extra files added before the rename
    save_adapter(final, tensors, rank=R, alpha=ALPHA, dropout=0.05, targets=cfg["target_modules"], rslora=False,
                 base_model_name_or_path=None, extra=lambda tmp: (tmp / "tokenizer.json").write_text("{}"))
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "tokenizer.json"]
    assert json.loads((final / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
