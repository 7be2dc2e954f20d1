"""The generic path (model.implementation: hf, megastream/hf/): a transformers decoder layer streamed
like any unit and called functionally on views of its buffer. Through the real CLI, on the CPU in
float32, against transformers + clip_grad_norm_ + torch.optim.AdamW (as tests/test_parity.py does
for the native path), and against the native path itself."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import make_hf_model, padded_rows, read_metrics, rel_err, run_cli, write_config, write_ids
from test_parity import ACCUM, LR, MB, MIN_LR, SEQ, STEPS, WARMUP, WD, _lr, _rows

transformers = pytest.importorskip("transformers")

LOSS_TOL, UPDATE_TOL = 1e-4, 5e-3


def _config(tmp_path, model_dir, data, out, impl="hf", clip=0.5, pack=False, steps=STEPS, **extra) -> str:
    return str(write_config(tmp_path / f"{out}.yaml", {
        "model": {"path": str(model_dir), "implementation": impl},
        "data": {"path": str(data), "seq_len": SEQ, "shuffle": False, "pack": pack},
        "train": {"steps": steps, "micro_batch_size": MB, "grad_accum": ACCUM, "lr": LR, "warmup_steps": WARMUP,
                  "schedule": "cosine", "min_lr": MIN_LR, "weight_decay": WD, "grad_clip": clip, "seed": 0},
        "optim": {"betas": [0.9, 0.95], "eps": 1e-8},
        "engine": {"device": "cpu", "dtype": "float32", "loss_chunk_tokens": 7},  # several head chunks
        "output": {"dir": str(tmp_path / out), "progress": False, **extra},
    }))


def _reference(model, rows, clip: float):
    """Plain PyTorch training of the transformers model on the same padded rows, in file order; a
    model that asks for its router's load-balancing loss (output_router_logits) gets coef * aux_loss
    of each micro-batch, averaged over the step's micro-batches."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    coef = model.config.router_aux_loss_coef if getattr(model.config, "output_router_logits", False) else None
    losses, norms = [], []
    for step in range(STEPS):
        mbs = [rows[(step * ACCUM + k) * MB:(step * ACCUM + k + 1) * MB] for k in range(ACCUM)]
        n_tok = sum(len(r) - 1 for mb in mbs for r in mb)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in mbs:
            ids, labels = padded_rows(mb, SEQ)
            out = model(input_ids=ids)
            logits = out.logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_tok
            if coef is not None:
                loss = loss + coef * out.aux_loss / ACCUM
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        for g in opt.param_groups:
            g["lr"] = _lr(step)
        opt.step()
        losses.append(total)
        norms.append(float(norm))
    return losses, norms


def _load_saved(path):
    """What megastream saved, as transformers loads it (the user's way), parameters by module name."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def check_against_transformers(tmp_path, model, model_dir, clip=0.5, rows=None):
    """Train the saved model with megastream's generic path and with the plain reference; compare
    every step's loss and grad norm, and every parameter's update."""
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = rows or _rows(model.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    data = write_ids(tmp_path / "train.jsonl", rows)
    run_cli("train", _config(tmp_path, model_dir, data, "run", clip=clip))

    ref_losses, ref_norms = _reference(model, rows, clip)
    got = read_metrics(tmp_path / "run")
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for m, loss, norm in zip(got, ref_losses, ref_norms):
        assert abs(m["loss"] - loss) <= LOSS_TOL * abs(loss), (m["step"], m["loss"], loss)
        assert abs(m["grad_norm"] - norm) <= LOSS_TOL * norm, (m["step"], m["grad_norm"], norm)
    if clip > 0:
        assert all(n > clip for n in ref_norms), "clipping must be active in this test"

    saved = _load_saved(tmp_path / "run" / "final")
    ref = {n: p.detach() for n, p in model.named_parameters()}
    assert set(saved) == set(ref)
    pad = model.get_input_embeddings().padding_idx
    if pad is not None:  # nn.Embedding(padding_idx): the lookup gives that row no gradient
        name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        err = rel_err(saved[name][pad] - initial[name][pad], ref[name][pad] - initial[name][pad])
        assert err <= UPDATE_TOL, ("padding row", err)
    worst = 0.0
    for name, p in ref.items():
        update = p - initial[name]
        if update.norm() == 0:  # e.g. a padding row's only parameter: nothing moved either way
            assert saved[name].equal(p), name
            continue
        err = rel_err(saved[name] - initial[name], update)
        worst = max(worst, err)
        assert err <= UPDATE_TOL, (name, err)
    return got, worst


# ---- step 1: Llama and Qwen2 through the generic path ------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generic_llama_qwen2_match_transformers_and_native(tmp_path, kind):
    model_dir = tmp_path / "model"
    model = make_hf_model(kind, model_dir, max_shard_size="20KB" if kind == "llama" else None)  # llama: sharded
    got, _ = check_against_transformers(tmp_path, model, model_dir)

    rows = _rows(model.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    run_cli("train", _config(tmp_path, model_dir, tmp_path / "train.jsonl", "native", impl="native"))
    native = read_metrics(tmp_path / "native")
    assert len(rows) == STEPS * ACCUM * MB
    for a, b in zip(got, native):  # the same functions, op for op: equal to rounding
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a["loss"], b["loss"])
    wa, wb = _safetensors(tmp_path / "run" / "final"), _safetensors(tmp_path / "native" / "final")
    assert wa.keys() == wb.keys()
    assert max(rel_err(wa[k], wb[k]) for k in wa) <= 2e-5  # AdamW amplifies rounding of tiny gradients
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["architectures"] == json.loads((model_dir / "config.json").read_text())["architectures"]


def _safetensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _packed_docs(vocab: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, SEQ - 2, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_generic_packed_rows_equal_native(tmp_path):
    """Packed rows (several documents per row, positions restarting, attention kept within each
    document): the generic path's masks come from transformers' own mask builders, and give what the
    native path's document mask gives."""
    model_dir = tmp_path / "model"
    model = make_hf_model("llama", model_dir)
    data = write_ids(tmp_path / "docs.jsonl", _packed_docs(model.config.vocab_size, 40, seed=3))
    for impl in ("hf", "native"):
        run_cli("train", _config(tmp_path, model_dir, data, impl, impl=impl, pack="bfd"))
    a, b = read_metrics(tmp_path / "hf"), read_metrics(tmp_path / "native")
    assert min(m["fill"] for m in a) > 0.7  # several documents per row
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(y["loss"]), (x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * y["grad_norm"]
    wa, wb = _safetensors(tmp_path / "hf" / "final"), _safetensors(tmp_path / "native" / "final")
    assert max(rel_err(wa[k], wb[k]) for k in wa) <= 2e-5  # AdamW amplifies rounding of tiny gradients


def test_generic_save_load_round_trip_and_exact_resume(tmp_path):
    """final/ loads in transformers with the same logits as megastream's weights, loads back into the
    generic path; a run resumed from checkpoint-2 equals the straight run bit for bit."""
    model_dir = tmp_path / "model"
    model = make_hf_model("qwen2", model_dir)
    data = write_ids(tmp_path / "train.jsonl", _rows(model.config.vocab_size, 4 * ACCUM * MB, seed=2))
    run_cli("train", _config(tmp_path, model_dir, data, "straight", steps=4, save_every=2))
    straight = tmp_path / "straight"
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")
    (resumed / "metrics.jsonl").write_text("".join((straight / "metrics.jsonl").read_text().splitlines(True)[:2]))
    cfg = _config(tmp_path, model_dir, data, "resumed", steps=4, save_every=2)
    proc = run_cli("train", cfg, "--resume")
    assert "at step 2" in proc.stdout
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    wa, wb = _safetensors(straight / "final"), _safetensors(resumed / "final")
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)

    # final/ loads in transformers as the user would, and starts a generic run of its own
    loaded = transformers.AutoModelForCausalLM.from_pretrained(straight / "final", dtype=torch.float32)
    ids = torch.tensor([_rows(model.config.vocab_size, 1, seed=5)[0][:SEQ]])
    assert torch.isfinite(loaded(input_ids=ids).logits).all()
    for name, p in loaded.named_parameters():
        assert p.detach().equal(wa[name]), name
    run_cli("train", _config(tmp_path, straight / "final", data, "again", steps=1))
    assert read_metrics(tmp_path / "again")[0]["loss"] == pytest.approx(a[-1]["loss"], rel=0.5)


# ---- step 2: dense models the native path does not have -------------------------------------------

_DENSE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    # alternating sliding-window (4 < seq_len) and global layers, attention and final logit soft-capping (set
    # low, so that they bend these small logits), embedding scale sqrt(hidden), (1 + w) norms, tied head
    "gemma2": ("Gemma2Config", dict(_DENSE, head_dim=16, sliding_window=4, attn_logit_softcapping=0.5,
                                    final_logit_softcapping=0.6, query_pre_attn_scalar=16)),
    # local (sliding, its own rope base) and global layers, q/k norms, embedding scale, tied head
    "gemma3": ("Gemma3TextConfig", dict(_DENSE, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                        layer_types=["sliding_attention", "full_attention"],
                                        final_logit_softcapping=0.7)),
    # fused qkv and gate_up projections, sliding window everywhere, untied head
    "phi3": ("Phi3Config", dict(_DENSE, sliding_window=5, tie_word_embeddings=False)),
    # q/k norms over all heads, norms after attention and MLP, untied head
    "olmo2": ("Olmo2Config", dict(_DENSE, tie_word_embeddings=False)),
}


def make_model(kind: str, path, seed: int = 0, **overrides):
    """A small random model of `kind`, saved with save_pretrained and loaded back from disk as a
    user's would be (the reference then trains that one)."""
    cls, kw = MODELS[kind]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**kw, **overrides}))
    with torch.no_grad():  # norms start at 0 or 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.float().save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("kind", list(MODELS))
def test_generic_dense_models_match_transformers(tmp_path, kind):
    model_dir = tmp_path / "model"
    model = make_model(kind, model_dir)
    rows = _rows(model.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    for r in rows:  # the padding token inside rows too, where it carries loss
        r[2] = model.config.pad_token_id
    _, worst = check_against_transformers(tmp_path, model, model_dir, rows=rows)
    assert worst > 0


# ---- step 3: mixtures of experts, streamed as whole layers ------------------------------------------

_MOE = dict(_DENSE, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
            tie_word_embeddings=False)
MODELS.update({
    # per-expert checkpoints (block_sparse_moe.experts.N.w1/w2/w3) loaded into transformers 5's fused experts
    "mixtral": ("MixtralConfig", dict(_MOE, num_local_experts=4)),
    # q/k norms, top-k probabilities renormalised, one dense layer among the sparse ones
    "qwen3_moe": ("Qwen3MoeConfig", dict(_MOE, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True,
                                         mlp_only_layers=[0], head_dim=16)),
})


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_generic_moe_matches_transformers_with_router_aux_loss(tmp_path, kind):
    """Whole MoE layers streamed as units; the router's load-balancing loss is added as transformers
    adds it (output_router_logits, router_aux_loss_coef): the losses, gradient norms and every update
    agree, and they would not without it (coef 0.5, so that it moves the weights measurably)."""
    model_dir = tmp_path / "model"
    model = make_model(kind, model_dir)
    names = set(load_file(model_dir / "model.safetensors"))
    assert any(".experts.0." in n for n in names) and not any(n.endswith("gate_up_proj") for n in names)
    got, _ = check_against_transformers(tmp_path, model, model_dir)
    saved = set(load_file(tmp_path / "run" / "final" / "model.safetensors"))
    assert saved == names  # saved back in the checkpoint's own (per-expert) layout

    # The same model stored with transformers 5's fused expert tensors loads, trains and saves alike.
    fused = tmp_path / "fused"
    transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).save_pretrained(
        fused, save_original_format=False)
    assert any(n.endswith("experts.gate_up_proj") for n in load_file(fused / "model.safetensors"))
    run_cli("train", _config(tmp_path, fused, tmp_path / "train.jsonl", "run_fused"))
    assert [m["loss"] for m in read_metrics(tmp_path / "run_fused")] == [m["loss"] for m in got]
    assert set(load_file(tmp_path / "run_fused" / "final" / "model.safetensors")) == set(
        load_file(fused / "model.safetensors"))

    # Without the aux loss the run differs: the test above is sensitive to it.
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "output_router_logits": False}))
    run_cli("train", _config(tmp_path, model_dir, tmp_path / "train.jsonl", "no_aux"))
    no_aux = read_metrics(tmp_path / "no_aux")
    assert all(abs(a["loss"] - b["loss"]) > 10 * LOSS_TOL * abs(a["loss"]) for a, b in zip(no_aux, got))


# ---- what cannot be streamed this way says so ----------------------------------------------------------

def _bare_model_dir(path, config: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, path / "model.safetensors")
    return path


@pytest.mark.parametrize("impl", ["hf", "auto"])
@pytest.mark.parametrize("config,message", [
    ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": 64, "d_model": 16,
      "num_layers": 1, "num_heads": 2, "d_kv": 8, "d_ff": 32},
     r"T5ForConditionalGeneration is an encoder-decoder model; megastream streams decoder-only"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 64, "n_embd": 16, "n_layer": 1,
      "n_head": 2}, r"GPT2LMHeadModel cannot be streamed by megastream's generic path: it has no model.layers"),
], ids=["encoder-decoder", "no-layer-list"])
def test_unstreamable_models_are_refused_by_name(tmp_path, impl, config, message):
    model_dir = _bare_model_dir(tmp_path / "model", config)
    data = write_ids(tmp_path / "d.jsonl", [[1, 2, 3]])
    proc = run_cli("train", _config(tmp_path, model_dir, data, "run", impl=impl), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and __import__("re").search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "run").exists()


def test_custom_layer_signature_is_refused_by_name(tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    from megastream.errors import CheckpointError
    from megastream.hf import spec_from_dir

    model_dir = tmp_path / "model"
    make_hf_model("llama", model_dir)
    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", lambda self, hidden_states, rotary, mask: None)
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM cannot be streamed .* decoder layer LlamaDecoderLayer "
                                              r"has a custom signature forward\(hidden_states, rotary, mask\).*"
                                              r"position_embeddings, attention_mask is missing"):
        spec_from_dir(model_dir)


# ---- plan -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mixtral", "gemma2"])
def test_plan_counts_the_real_modules_parameters(tmp_path, kind):
    """`megastream plan` on the generic path sizes the host store from the transformers module's own
    parameters (fused experts; a tied head counted once), as the store that training allocates."""
    from megastream.config import load_config
    from megastream.model.layout import model_layout
    from megastream.resolve import model_spec
    from megastream.store import HostStore

    model = make_model(kind, tmp_path / "model")
    data = write_ids(tmp_path / "d.jsonl", [[1, 2, 3, 4, 5]] * 8)
    cfg = _config(tmp_path, tmp_path / "model", data, "run")
    plan = json.loads(run_cli("plan", cfg, "--json").stdout)
    assert plan["architecture"] == type(model).__name__
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    spec = model_spec(load_config(cfg))
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)
    for part, nbytes in store.breakdown().items():
        assert plan["host_bytes"][part] == nbytes, part


@pytest.mark.parametrize("kind", ["gemma2", "phi3"])
def test_packed_masks_equal_transformers_packing_by_positions(tmp_path, kind):
    """On packed rows the generic path's masks (document ids on top of transformers' own builders)
    are those transformers builds when it detects packing from restarting position_ids: for
    sliding-window and global layers, eager (Gemma 2: additive float) and sdpa (Phi-3: boolean)."""
    from transformers import masking_utils as mu

    from megastream.engine.engine import MicroBatch
    from megastream.hf import HFModel, spec_from_dir

    make_model(kind, tmp_path / "model")
    spec = spec_from_dir(tmp_path / "model")
    fns = HFModel(spec, torch.device("cpu"), torch.float32)
    lengths = [[5, 4, 3], [9, 3]]  # the last "document" of the first row is its padding tail (doc id -1)
    pos = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    docs = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])
    docs[0, 9:] = -1
    (_, ), (masks, ) = fns.attention_inputs([MicroBatch(pos * 0, pos * 0, pos, docs)])
    embeds = torch.empty(2, SEQ, 0)
    build = {"full_attention": mu.create_causal_mask, "sliding_attention": mu.create_sliding_window_causal_mask}
    assert set(masks) == set(fns.types) and len(set(masks)) == (2 if kind == "gemma2" else 1)
    for t, m in masks.items():
        ref = build[t](fns.parts.config, embeds, None, None, position_ids=pos)
        assert m.dtype == ref.dtype and m.equal(ref), t
