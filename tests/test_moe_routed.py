"""Routed-expert streaming (engine.moe_streaming: routed, megastream/engine/experts.py): only the
experts the step's tokens route to cross PCIe, and the run equals whole-layer streaming. Through the
real CLI on the CPU in float32, with small Mixtral and Qwen3-MoE models built so that one expert of
every MoE layer gets no token in some steps (and tokens in others: its host gradient staging must
not keep a stale gradient)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import read_metrics, rel_err, run_cli, write_config, write_ids
from test_hf_generic import MODELS, _config
from test_parity import ACCUM, MB, SEQ

transformers = pytest.importorskip("transformers")

STEPS = 4
SHUNNED = 3  # the expert no token of a "low" step reaches


def _moe_model(kind: str, path):
    """A small MoE model whose router sends every token of the upper half of the vocabulary to
    expert SHUNNED and keeps every token of the lower half away from it: the embedding's first
    coordinate is +1 (upper half) or -1 (lower half), far larger than the others (~0.02), so after the
    norm it dominates every layer's router input, and the router's weight from it to expert SHUNNED
    is +2 (to the others ~0.02): that expert's logit is about +-16 against the others' ~+-0.2."""
    cls, kw = MODELS[kind]
    torch.manual_seed(0)
    # 4 layers: the backward pass prefetches layers 0, 1 (2, 3 are still resident from the forward pass)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**kw, "num_hidden_layers": 4}))
    V = model.config.vocab_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        emb = model.get_input_embeddings().weight
        emb[: V // 2, 0] = -1.0
        emb[V // 2:, 0] = 1.0
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.gate.weight[SHUNNED, 0] = 2.0
    model.float().save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _rows(V: int) -> list[list[int]]:
    """Steps 1 and 3 draw from the whole vocabulary, steps 2 and 4 from its lower half only."""
    g = torch.Generator().manual_seed(4)
    n = ACCUM * MB
    return [torch.randint(3, V if step % 2 == 0 else V // 2, (SEQ if i % 3 else SEQ - 4,), generator=g).tolist()
            for step in range(STEPS) for i in range(n)]


def _routing(model_dir, rows) -> list[set[int]]:
    """The experts each MoE layer's router chooses for `rows`, as transformers computes it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    moe = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    seen = [set() for _ in moe]
    for m, s in zip(moe, seen):
        m.register_forward_pre_hook(lambda mod, args, s=s: s.update(args[1].unique().tolist()))
    with torch.no_grad():
        for r in rows:
            model(input_ids=torch.tensor([r]))
    return seen


def _moe_config(tmp_path, model_dir, data, name, mode, val=None, **extra) -> str:
    """tests/test_hf_generic.py's run configuration, for STEPS steps, with engine.moe_streaming: `mode`
    (and an evaluation on `val` every other step)."""
    path = _config(tmp_path, model_dir, data, name, steps=STEPS, **extra)
    cfg = yaml.safe_load(open(path))
    cfg["engine"]["moe_streaming"] = mode
    if val is not None:
        cfg["data"]["val_path"], cfg["train"]["eval_every"] = str(val), 2
    write_config(tmp_path / f"{name}.yaml", cfg)
    return path


def _safetensors(d):
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_routed_streaming_equals_whole_layers_and_moves_only_routed_experts(tmp_path, kind):
    model_dir = tmp_path / "model"
    model = _moe_model(kind, model_dir)
    cfg = model.config
    V, E = cfg.vocab_size, getattr(cfg, "num_local_experts", None) or cfg.num_experts
    rows = _rows(V)
    data = write_ids(tmp_path / "train.jsonl", rows)

    val = write_ids(tmp_path / "val.jsonl", rows[ACCUM * MB:3 * ACCUM * MB])  # an evaluation between steps too

    def run(name, mode, **extra):
        path = _moe_config(tmp_path, model_dir, data, name, mode, val=val, **extra)
        run_cli("train", path)
        return read_metrics(tmp_path / name), path

    whole, whole_cfg = run("whole", "whole")
    routed, routed_cfg = run("routed", "routed", save_every=1)

    # The same run: losses, gradient norms, evaluations and every saved weight (bit-identical in practice:
    # the routed tokens read the same numbers, and unrouted experts get a zero gradient either way).
    assert [m["step"] for m in routed if "eval_loss" in m] == [2, 4]
    for a, b in zip(routed, whole):
        assert ("eval_loss" in a) == ("eval_loss" in b)
        assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), rel=1e-6)
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * b["grad_norm"], (a["step"], a["grad_norm"],
                                                                                 b["grad_norm"])
    wa, wb = _safetensors(tmp_path / "routed" / "final"), _safetensors(tmp_path / "whole" / "final")
    assert wa.keys() == wb.keys()
    worst = max(rel_err(wa[k], wb[k]) for k in wa)
    assert worst <= 1e-6, worst

    # Whole-layer streaming moves what `plan` says: every layer twice (the last two once: they are still
    # resident when backward starts) and the head once in, every gradient once out.
    plan = json.loads(run_cli("plan", whole_cfg, "--json").stdout)["roofline"]
    assert all(m["h2d_bytes"] == plan["h2d_bytes_per_step"] for m in whole)
    assert all(m["d2h_bytes"] == plan["d2h_bytes_per_step"] for m in whole)

    # Routed: less by exactly the unrouted experts' bytes (in: twice for layers 0, 1, once for 2, 3, still
    # resident when backward starts; out: once), the routing being that of transformers on the weights
    # each step started from (the saved checkpoints).
    from megastream.config import load_config
    from megastream.engine.experts import unit_experts
    from megastream.model.layout import model_layout
    from megastream.resolve import model_spec

    units = model_layout(model_spec(load_config(routed_cfg)))
    moe = [(i, x.per_expert) for i, u in enumerate(units[1:-1]) if (x := unit_experts(u, E)) is not None]
    assert [i for i, _ in moe] == [i for i, m in enumerate(model.model.layers) if hasattr(m.mlp, "experts")]
    passes = [2, 2, 1, 1]
    n = ACCUM * MB
    for step, (r, w) in enumerate(zip(routed, whole)):
        start = model_dir if step == 0 else tmp_path / "routed" / f"checkpoint-{step}"
        seen = _routing(start, rows[step * n:(step + 1) * n])
        if step % 2:  # lower-half tokens only: the shunned expert gets none, in every MoE layer
            assert all(SHUNNED not in s for s in seen), (step + 1, seen)
        else:
            assert all(SHUNNED in s for s in seen), (step + 1, seen)
        unrouted = [(E - len(s)) * p * 4 for s, (_, p) in zip(seen, moe)]  # fp32 bytes per MoE layer
        assert w["h2d_bytes"] - r["h2d_bytes"] == sum(n * passes[i] for n, (i, _) in zip(unrouted, moe)), step + 1
        assert w["d2h_bytes"] - r["d2h_bytes"] == sum(unrouted), step + 1

    # plan's figure for routed streaming: the uniform-routing estimate 1 - (1 - k/E)^tokens of the expert bytes
    rp = json.loads(run_cli("plan", routed_cfg, "--json").stdout)["roofline"]
    k, T = cfg.num_experts_per_tok, SEQ * MB * ACCUM
    frac = 1 - (1 - k / E) ** T
    assert rp["routed_expert_fraction"] == pytest.approx(frac)
    experts = [p * E * 4 * (1 - frac) for _, p in moe]
    assert plan["h2d_bytes_per_step"] - rp["h2d_bytes_per_step"] == pytest.approx(
        sum(n * passes[i] for n, (i, _) in zip(experts, moe)), abs=2)
    assert plan["d2h_bytes_per_step"] - rp["d2h_bytes_per_step"] == pytest.approx(sum(experts), abs=2)


def test_routed_resume_is_exact(tmp_path):
    """A routed run resumed from checkpoint-2 (whose next step leaves an expert unrouted after a step
    that routed to it) equals the straight run bit for bit."""
    model_dir = tmp_path / "model"
    model = _moe_model("mixtral", model_dir)
    data = write_ids(tmp_path / "train.jsonl", _rows(model.config.vocab_size))

    def cfg(name):
        return _moe_config(tmp_path, model_dir, data, name, "routed", save_every=2)

    straight = tmp_path / "straight"
    run_cli("train", cfg("straight"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")
    (resumed / "metrics.jsonl").write_text("".join((straight / "metrics.jsonl").read_text().splitlines(True)[:2]))
    assert "at step 2" in run_cli("train", cfg("resumed"), "--resume").stdout
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [(m["loss"], m["grad_norm"], m["h2d_bytes"]) for m in a] == [(m["loss"], m["grad_norm"], m["h2d_bytes"])
                                                                          for m in b]
    wa, wb = _safetensors(straight / "final"), _safetensors(resumed / "final")
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_plan_expects_about_top_k_of_experts_at_small_batches(tmp_path):
    """`plan` for a Qwen3-30B-A3B shape (128 experts, top-8; no weights are read): with routed streaming
    and 2 tokens a step, 1 - (1 - 8/128)^2 = 12.1% of the expert bytes cross PCIe instead of all."""
    from safetensors.torch import save_file

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    save_file({"x": torch.zeros(1)}, model / "model.safetensors")
    data = write_ids(tmp_path / "d.jsonl", [[5, 6, 7]] * 4)
    plans = {}
    for mode in ("whole", "routed"):
        cfg = write_config(tmp_path / f"{mode}.yaml", {
            "model": {"path": str(model), "implementation": "hf"}, "data": {"path": str(data), "seq_len": 2},
            "train": {"micro_batch_size": 1, "grad_accum": 1}, "engine": {"device": "cuda", "moe_streaming": mode},
            "output": {"dir": str(tmp_path / "run")}})
        plans[mode] = json.loads(run_cli("plan", str(cfg), "--json", check=False).stdout)["roofline"]
    whole, routed = plans["whole"], plans["routed"]
    frac = 1 - (1 - 8 / 128) ** 2
    assert whole["routed_expert_fraction"] is None and routed["routed_expert_fraction"] == pytest.approx(frac)
    experts = 128 * (2 * 768 * 2048 + 2048 * 768) * 2  # per layer, bf16
    assert whole["h2d_bytes_per_step"] - routed["h2d_bytes_per_step"] == pytest.approx(
        (46 * 2 + 2) * experts * (1 - frac), abs=4)
    assert whole["d2h_bytes_per_step"] - routed["d2h_bytes_per_step"] == pytest.approx(48 * experts * (1 - frac), abs=4)
    assert routed["h2d_bytes_per_step"] / whole["h2d_bytes_per_step"] < 0.16


def test_expert_ranges_merge_consecutive_experts():
    """A unit's expert slices: per fused tensor, runs of consecutive experts as one copy each; the
    non-expert rest around them."""
    from megastream.engine.experts import unit_experts
    from megastream.model.layout import _unit

    unit = _unit("layer.0", [("attn.w", "a", (3, 2)), ("mlp.experts.gate_up_proj", "b", (4, 6, 2)),
                             ("mlp.experts.down_proj", "c", (4, 2, 3)), ("norm.weight", "d", (5,))])
    x = unit_experts(unit, 4)
    assert x.module == "mlp.experts" and x.tensors == ((6, 12), (54, 6)) and x.dense == ((0, 6), (78, 83))
    assert x.ranges({0, 1, 3}) == [(6, 30), (42, 54), (54, 66), (72, 78)]
    assert x.others({0, 1, 3}) == [(30, 42), (66, 72)]
    assert unit_experts(unit, 5) is None  # no 3-D parameter has 5 experts first
