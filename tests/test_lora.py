"""LoRA over a frozen, streamed base: the engine's adapter gradients against plain autograd, the run
against transformers + peft + torch.optim.AdamW, and what a LoRA run writes (final/, checkpoints,
the merged model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import assert_close_normwise, fp_tol, padded_rows, random_micro_batches

from megastream.adapters.lora import LoraAdapters, lora_slots
from megastream.config import LORA_TARGETS, Config, EngineConfig, LoraConfig, TrainConfig
from megastream.engine.engine import Engine
from megastream.engine.loss import IGNORE
from megastream.model.layout import model_layout
from megastream.model.llama import Adapter, block, rms_norm, rope_tables
from megastream.model.spec import ModelSpec
from megastream.store import HostStore

RANK, ALPHA = 4, 8.0


def _spec(tied: bool) -> ModelSpec:
    return ModelSpec(architecture="Qwen2ForCausalLM" if tied else "LlamaForCausalLM", vocab_size=40,
                     hidden_size=24, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=6,
                     qkv_bias=tied, tie_word_embeddings=tied, torch_dtype="float32")


_batches = random_micro_batches


def _setup(spec, targets=LORA_TARGETS, dropout=0.0, clip=0.0, wd=0.0, chunk=5, activations="device"):
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False, trainable=False)
    store.init_random(0.2, seed=3)
    ad = LoraAdapters(spec, targets, rank=RANK, alpha=ALPHA, dropout=dropout, rslora=False,
                      device=torch.device("cpu"), seed=0)
    ad.params.copy_(torch.randn(ad.numel, generator=torch.Generator().manual_seed(7)) * 0.3)  # A and B non-zero
    cfg = Config(train=TrainConfig(grad_clip=clip, weight_decay=wd),
                 engine=EngineConfig(loss_chunk_tokens=chunk, activations=activations),
                 lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=dropout, target_modules=targets))
    return store, ad, Engine(spec, store, cfg, torch.device("cpu"), adapters=ad)


def _plain_lora_grads(spec, store, ad, mbs, step=1):
    """Whole-model autograd, micro-batch by micro-batch, over the frozen base and leaf adapters
    (dropout masks as the engine draws them); token-mean loss over the step."""
    views = [unit.views(store.weights_of(u)) for u, unit in enumerate(store.units)]
    params = ad.params.clone().requires_grad_()
    n_tok = sum(int((mb.labels != IGNORE).sum()) for mb in mbs)
    total = 0.0
    for k, mb in enumerate(mbs):
        B, S = mb.input_ids.shape
        rope = rope_tables(spec, torch.arange(S), torch.float32)
        x = views[0]["embed"][mb.input_ids]
        for i in range(spec.num_layers):
            lora = {}
            for s in ad.by_layer[i]:
                a = params[s.offset:s.offset + s.a_numel].view(s.a_shape)
                b = params[s.offset + s.a_numel:s.offset + s.numel].view(s.b_shape)
                lora[s.key] = Adapter(a, b, ad.scale)
                if ad.dropout > 0:  # the masks the engine draws, once here (forward and recompute there)
                    keep = ad.dropout_mask(step, i, k, s.key, (B, S, s.a_shape[1]))
                    lora[s.key] = Adapter(a, b, ad.scale, keep, ad.keep_scale)
            x = block(x, views[i + 1], rope, spec, None, lora)
        head = views[-1]
        w = views[0]["embed"] if spec.tie_word_embeddings else head["lm_head"]
        logits = F.linear(rms_norm(x, head["norm"], spec.rms_norm_eps), w)
        loss = F.cross_entropy(logits.reshape(-1, spec.vocab_size), mb.labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum") / n_tok
        loss.backward()
        total += float(loss.detach())
    return total, params.grad


@pytest.mark.parametrize("tied,targets,dropout",
                         [(False, LORA_TARGETS, 0.0), (True, LORA_TARGETS, 0.0), (False, ("q_proj", "down_proj"), 0.3),
                          (False, ("o_proj", "up_proj"), 0.0)],
                         ids=["untied-all", "tied+bias-all", "two-targets-dropout", "no-down-adapter"])
def test_adapter_grads_match_plain_autograd(tied, targets, dropout):
    spec = _spec(tied)
    store, ad, engine = _setup(spec, targets, dropout)
    before = store.working.clone()
    mbs = _batches(spec, M=3, B=2, S=9)
    ref_loss, ref_grad = _plain_lora_grads(spec, store, ad, mbs)
    stats = engine.step(mbs, lr=1e-6)
    engine.close()
    n = sum(mb.input_ids.numel() for mb in mbs) * spec.intermediate_size
    assert stats.loss == pytest.approx(ref_loss, rel=fp_tol(torch.float32, n))
    assert_close_normwise(ad.grad, ref_grad, n, msg="adapter gradients")
    assert stats.grad_norm == pytest.approx(float(ref_grad.norm()), rel=fp_tol(torch.float32, n))
    assert torch.equal(store.working, before), "the base must stay frozen"
    assert {s.module.rpartition(".")[2] for s in ad.slots} == set(targets)
    assert len(ad.slots) == len(targets) * spec.num_layers


def test_frozen_base_holds_and_moves_nothing_it_does_not_need():
    """No master, moments or gradient staging on the host; no gradient buffers on the device; the
    head crosses once per run and the first layers stay resident from one step's backward into the
    next step's forward."""
    spec = _spec(False)
    store, ad, engine = _setup(spec)
    assert engine.grads is None
    b = store.breakdown()
    assert b["working"] == store.numel * 4 and "master" not in b
    assert b["optimizer states"] == 0 and b["gradient staging"] == 0
    copies = []
    wait = engine.weights.before_copy
    engine.weights.before_copy = lambda u: (copies.append(u), wait(u))
    head = spec.num_layers + 1
    seen = []
    for step in range(3):
        copies.clear()
        engine.step(_batches(spec, M=2, B=1, S=6, seed=step), lr=1e-3)
        seen.append(list(copies))
    engine.eval_loss(_batches(spec, M=1, B=1, S=6, seed=9))  # an evaluation between steps
    copies.clear()
    engine.step(_batches(spec, M=2, B=1, S=6, seed=3), lr=1e-3)
    seen.append(list(copies))
    engine.close()
    # 0: the embedding rows' wait (the step's rows gathered on the host, not the table copied)
    assert seen[0] == [0, 1, 2, 3, head, 1], seen  # forward 1..L, head, backward L-2..1
    assert seen[1] == seen[2] == [0, 3, 1], seen  # units 1, 2 and the head are still resident
    assert seen[3] == [0, 1, 2, 3, 1], seen  # it ended on the last layers: this forward copies all of them


def test_update_is_torch_adamw_with_clipping_and_decay():
    """The device AdamW equals torch.optim.AdamW after clip_grad_norm_, step for step."""
    spec = _spec(False)
    store, ad, engine = _setup(spec, clip=0.05, wd=0.1)
    p = ad.params.clone().requires_grad_()
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    raw = []
    update = ad.adamw
    ad.adamw = lambda **kw: (raw.append(ad.grad.clone()), update(**kw))  # the gradient before clipping
    for step in range(3):
        mbs = _batches(spec, M=2, B=2, S=7, seed=step)
        stats = engine.step(mbs, lr=1e-2)
        p.grad = raw[-1]
        norm = torch.nn.utils.clip_grad_norm_([p], 0.05)
        assert float(norm) == pytest.approx(stats.grad_norm, rel=1e-6) and stats.grad_norm > 0.05
        opt.step()
        assert_close_normwise(ad.params, p.detach(), 64, msg=f"step {step}")
    engine.close()


def test_offloaded_activations_give_the_same_steps():
    spec = _spec(True)
    runs = []
    for mode in ("device", "host"):
        store, ad, engine = _setup(spec, dropout=0.2, clip=0.5, activations=mode)
        losses = [engine.step(_batches(spec, M=2, B=2, S=7, seed=s), lr=1e-2).loss for s in range(2)]
        engine.close()
        runs.append((losses, ad.params.clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_nonfinite_step_is_skipped_whole():
    spec = _spec(False)
    store, ad, engine = _setup(spec, clip=1.0)
    engine.step(_batches(spec, M=1, B=2, S=7), lr=1e-2)
    before = (ad.params.clone(), ad.exp_avg.clone(), engine.adam_steps)
    ad.params[5] = float("nan")
    stats = engine.step(_batches(spec, M=1, B=2, S=7, seed=1), lr=1e-2)
    assert stats.skipped and engine.adam_steps == before[2]
    assert torch.equal(ad.exp_avg, before[1])
    engine.close()


def test_eval_has_no_dropout_and_no_lora_path_is_unchanged():
    spec = _spec(False)
    store, ad, engine = _setup(spec, dropout=0.5)
    mbs = _batches(spec, M=2, B=2, S=7)
    loss, _ = engine.eval_loss(mbs)
    ref = _plain_lora_grads(spec, store, _no_dropout(ad), mbs)[0]
    assert loss == pytest.approx(ref, rel=1e-5)
    engine.close()
    # block without adapters is bit-identical to block with an empty adapter set
    x = torch.randn(2, 5, spec.hidden_size)
    w = store.units[1].views(store.working_of(1))
    rope = rope_tables(spec, torch.arange(5), torch.float32)
    assert torch.equal(block(x, w, rope, spec), block(x, w, rope, spec, None, {}))


def test_dropout_masks_are_repeatable_draws_at_the_configured_rate():
    """A keep mask is 1 / 0 in the compute dtype, drawn again identically for the recompute, another for
    another projection, dropping lora.dropout (rounded to 1/65536) of the inputs."""
    ad = LoraAdapters(_spec(False), LORA_TARGETS, rank=RANK, alpha=ALPHA, dropout=0.05, rslora=False,
                      device=torch.device("cpu"), seed=0)
    shape = (4, 256, 512)
    m = ad.dropout_mask(7, 2, 1, "q", shape)
    assert m.dtype == torch.float32 and m.shape == shape and set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m, ad.dropout_mask(7, 2, 1, "q", shape))
    assert not torch.equal(m, ad.dropout_mask(7, 2, 1, "k", shape))
    assert torch.equal(ad.dropout_mask(7, 2, 1, "q", shape, torch.bfloat16).float(), m)
    p, n = ad.drop_threshold / 65536, m.numel()
    assert abs(p - 0.05) < 1 / 65536 and ad.keep_scale == pytest.approx(1 / (1 - p))
    assert abs(n - m.sum().item() - p * n) < 5 * math.sqrt(p * (1 - p) * n)  # binomial: 5 sigma


def _no_dropout(ad):
    clone = LoraAdapters(ad.spec, ad.targets, rank=ad.rank, alpha=ad.alpha, dropout=0.0, rslora=ad.rslora,
                         device=ad.device, seed=ad.seed)
    clone.params.copy_(ad.params)
    return clone


def test_default_init_is_peft_kaiming_a_and_zero_b():
    spec = _spec(False)
    ad = LoraAdapters(spec, LORA_TARGETS, rank=RANK, alpha=ALPHA, dropout=0.0, rslora=True,
                      device=torch.device("cpu"), seed=5)
    ad.init_default()
    t = ad.tensors()
    for s in ad.slots:
        a, b = t[s.module + ".lora_A"], t[s.module + ".lora_B"]
        bound = 1 / math.sqrt(s.a_shape[1])
        assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound and not b.any()
    again = LoraAdapters(spec, LORA_TARGETS, rank=RANK, alpha=ALPHA, dropout=0.0, rslora=True,
                         device=torch.device("cpu"), seed=5)
    again.init_default()
    assert torch.equal(again.params, ad.params)  # seeded by train.seed
    assert ad.scale == pytest.approx(ALPHA / math.sqrt(RANK))
    assert [s.module for s in lora_slots(spec, ("o_proj",), 2)] == [f"model.layers.{i}.self_attn.o_proj"
                                                                     for i in range(spec.num_layers)]


# ---- the run against transformers + peft + torch.optim.AdamW ---------------------------------------
from pathlib import Path  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from helpers import make_hf_model, read_metrics, rel_err, run_cli, write_config, write_ids  # noqa: E402
from test_parity import ACCUM, LR, MB, MIN_LR, SEQ, STEPS, WARMUP, WD, _lr, _rows  # noqa: E402

CLIP = 0.2


def _peft_model(kind: str, tmp_path: Path, dropout: float = 0.0, modules_to_save=None):
    """A tiny random HF model (saved in fp32) under a peft LoRA adapter with non-zero A and B
    (init_lora_weights=False), `modules_to_save` trained in full, the adapter saved with save_pretrained."""
    import peft

    base = make_hf_model(kind, tmp_path / "model")
    torch.manual_seed(11)
    pcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(LORA_TARGETS),
                           init_lora_weights=False, task_type="CAUSAL_LM", modules_to_save=modules_to_save)
    pm = peft.get_peft_model(base, pcfg)
    pm.save_pretrained(tmp_path / "init")
    return pm


def _lora_config(tmp_path: Path, rows, dropout: float = 0.0, train=None, output=None, name="run.yaml",
                 **lora) -> Path:
    data = write_ids(tmp_path / "train.jsonl", rows)
    return write_config(tmp_path / name, {
        "model": {"path": str(tmp_path / "model")},
        "data": {"path": str(data), "seq_len": SEQ, "shuffle": False, "pack": False},
        "train": {"steps": STEPS, "micro_batch_size": MB, "grad_accum": ACCUM, "lr": LR, "warmup_steps": WARMUP,
                  "schedule": "cosine", "min_lr": MIN_LR, "weight_decay": WD, "grad_clip": CLIP, "seed": 0,
                  **(train or {})},
        "optim": {"betas": [0.9, 0.95], "eps": 1e-8},
        "engine": {"device": "cpu", "dtype": "float32", "loss_chunk_tokens": 7},
        "output": {"dir": str(tmp_path / "run"), "progress": False, **(output or {})},
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": dropout, "init": str(tmp_path / "init"), **lora},
    })


def _lora_run(tmp_path: Path, rows, dropout: float = 0.0, **lora) -> Path:
    run_cli("train", str(_lora_config(tmp_path, rows, dropout, **lora)))
    return tmp_path / "run"


def _peft_reference(pm, rows, step_hook=None):
    """Plain training of the peft model: trainable parameters only, all weight-decayed, clip_grad_norm_
    over them, token-mean loss over the step, the same rows in file order."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    pm.train()
    losses, norms = [], []
    for step in range(STEPS):
        mbs = [rows[(step * ACCUM + k) * MB:(step * ACCUM + k + 1) * MB] for k in range(ACCUM)]
        n_tok = sum(len(r) - 1 for mb in mbs for r in mb)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k, mb in enumerate(mbs):
            if step_hook is not None:
                step_hook(step + 1, k)
            ids, labels = padded_rows(mb, SEQ)
            logits = pm(input_ids=ids).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_tok
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        for g in opt.param_groups:
            g["lr"] = _lr(step)
        opt.step()
        losses.append(total)
    return losses, norms


def _adapter_params(pm) -> dict[str, torch.Tensor]:
    """peft's trainable tensors under their saved names (no adapter name; a module to save by its own
    weight's name, as save_pretrained writes it)."""
    return {n.replace(".modules_to_save.default", "").replace(".default", ""): p.detach().clone()
            for n, p in pm.named_parameters() if p.requires_grad}


def _check_against_reference(run: Path, pm, init: dict, ref_losses, ref_norms):
    got = read_metrics(run)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for m, loss, norm in zip(got, ref_losses, ref_norms):
        assert abs(m["loss"] - loss) <= 1e-4 * abs(loss), (m["loss"], loss)
        assert abs(m["grad_norm"] - norm) <= 1e-4 * norm, (m["grad_norm"], norm)
    assert all(n > CLIP for n in ref_norms), "clipping must be active in this test"
    saved = load_file(run / "final" / "adapter_model.safetensors")
    ref = _adapter_params(pm)
    assert set(saved) == set(ref) == set(init)
    upd = torch.cat([(saved[k] - init[k]).reshape(-1) for k in sorted(ref)])
    ref_upd = torch.cat([(ref[k] - init[k]).reshape(-1) for k in sorted(ref)])
    assert ref_upd.norm() > 1e-3 * torch.cat([t.reshape(-1) for t in init.values()]).norm(), "training must move"
    assert rel_err(upd, ref_upd) <= 5e-3, rel_err(upd, ref_upd)
    for k in ref:
        assert rel_err(saved[k] - init[k], ref[k] - init[k]) <= 5e-2, k  # every tensor moved the same way


@pytest.mark.parametrize("kind", ["llama", "qwen2"], ids=["llama", "qwen2-tied-bias"])
def test_lora_run_matches_transformers_peft_adamw(tmp_path, kind):
    pm = _peft_model(kind, tmp_path)
    init = _adapter_params(pm)
    rows = _rows(pm.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    run = _lora_run(tmp_path, rows)
    _check_against_reference(run, pm, init, *_peft_reference(pm, rows))


@pytest.mark.parametrize("kind,extra", [("llama", ["embed_tokens", "lm_head"]), ("qwen2", ["lm_head"])],
                         ids=["llama-embed+head", "qwen2-tied-head"])
def test_train_extra_matches_peft_modules_to_save(tmp_path, kind, extra):
    """lora.train_extra trains the named modules in full, as peft's modules_to_save does (with tied
    embeddings: a copy of the head, the embedding stays frozen), from a lora.init that has them; final/
    loads in peft with every tensor in place and gives megastream's logits."""
    import peft
    import transformers

    pm = _peft_model(kind, tmp_path, modules_to_save=extra)
    init = _adapter_params(pm)
    assert {k for k in init if ".lora_" not in k} == {"base_model.model." + ("lm_head.weight" if m == "lm_head"
                                                                            else "model.embed_tokens.weight")
                                                      for m in extra}
    rows = _rows(pm.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    merge = not pm.config.tie_word_embeddings  # refused with tied embeddings (the trained copy breaks the tie)
    run = _lora_run(tmp_path, rows, train_extra=extra, merge=merge)
    _check_against_reference(run, pm, init, *_peft_reference(pm, rows))

    final = run / "final"
    assert sorted(json.loads((final / "adapter_config.json").read_text())["modules_to_save"]) == sorted(extra)
    saved = load_file(final / "adapter_model.safetensors")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, final)
    trained = {n.replace(".modules_to_save.default", "").replace(".default", ""): p
               for n, p in loaded.named_parameters() if "lora_" in n or "modules_to_save" in n}
    assert set(trained) == set(saved)  # nothing missing, nothing unexpected
    assert all(torch.equal(trained[k].detach(), saved[k]) for k in saved)
    ids = torch.tensor([rows[1], rows[2]])
    loaded.eval()
    with torch.no_grad():
        want = loaded(input_ids=ids).logits
    assert rel_err(_megastream_logits(tmp_path / "model", final, ids), want) <= 1e-5
    if merge:  # the trained modules replace the base's in merged/
        merged = transformers.AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
        with torch.no_grad():
            assert rel_err(merged(input_ids=ids).logits, want) <= 1e-5


def _keep(step: int, layer: int, mb: int, key: str, shape) -> torch.Tensor:
    """An injected dropout mask (True: kept): a function of where it applies, p = 0.25."""
    g = torch.Generator().manual_seed(hash((step, layer, mb, key)) % (1 << 31))
    return torch.rand(shape, generator=g) >= 0.25


def test_lora_dropout_with_an_injected_mask_matches_peft(tmp_path, monkeypatch):
    """Dropout applies to the input of A, per target, in training only: with the same masks
    injected on both sides (peft's lora_dropout modules replaced), the runs agree."""
    pm = _peft_model("llama", tmp_path, dropout=0.25)
    init = _adapter_params(pm)
    rows = _rows(pm.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    calls = []

    def engine_mask(self, step, layer, mb, key, shape, dtype):
        calls.append((step, layer, mb, key))
        return _keep(step, layer, mb, key, shape).to(dtype)

    monkeypatch.setattr(LoraAdapters, "dropout_mask", engine_mask)
    run = _lora_run(tmp_path, rows, dropout=0.25)
    # forward and backward recompute each ask for every (step, layer, micro-batch, target) once
    assert len(calls) == 2 * STEPS * pm.config.num_hidden_layers * ACCUM * len(LORA_TARGETS)

    where = {}

    class Injected(torch.nn.Module):
        def __init__(self, layer, key):
            super().__init__()
            self.layer, self.key = layer, key

        def forward(self, x):
            step, mb = where["now"]
            return x * _keep(step, self.layer, mb, self.key, tuple(x.shape)) / 0.75  # as nn.Dropout(0.25) scales

    for i, layer in enumerate(pm.base_model.model.model.layers):
        for mod in (*[getattr(layer.self_attn, t) for t in ("q_proj", "k_proj", "v_proj", "o_proj")],
                    *[getattr(layer.mlp, t) for t in ("gate_proj", "up_proj", "down_proj")]):
            key = next(n for n, m in layer.named_modules() if m is mod).rpartition(".")[2].split("_")[0]
            mod.lora_dropout["default"] = Injected(i, key)
    ref = _peft_reference(pm, rows, step_hook=lambda step, mb: where.__setitem__("now", (step, mb)))
    _check_against_reference(run, pm, init, *ref)


# ---- what a LoRA run writes ------------------------------------------------------------------------
def _megastream_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of base + adapter through megastream's own model functions and loaders."""
    from megastream.adapters.peft_io import load_adapter
    from megastream.checkpoint import load_hf_weights

    spec = ModelSpec.from_dir(model_dir)
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False, trainable=False)
    load_hf_weights(store, spec, model_dir)
    tensors, acfg = load_adapter(adapter_dir, spec)
    ad = LoraAdapters(spec, tuple(acfg["target_modules"]), rank=acfg["r"], alpha=acfg["lora_alpha"], dropout=0.0,
                      rslora=acfg["use_rslora"], device=torch.device("cpu"), seed=0,
                      extra=tuple(acfg["modules_to_save"] or ()))
    ad.load(tensors)
    views = [unit.views(store.weights_of(u)) for u, unit in enumerate(store.units)]
    rope = rope_tables(spec, torch.arange(ids.shape[1]), torch.float32)
    x = ad.embed_rows(ids, torch.float32) if ad.trains("embed_tokens") else views[0]["embed"][ids]
    for i in range(spec.num_layers):
        x = block(x, views[i + 1], rope, spec, None, ad.layer(i, torch.float32))
    w = views[0]["embed"] if spec.tie_word_embeddings else views[-1]["lm_head"]
    if ad.trains("lm_head"):
        w = ad.head_weight(torch.float32)
    return F.linear(rms_norm(x, views[-1]["norm"], spec.rms_norm_eps), w)


def test_final_loads_in_peft_and_merged_in_transformers(tmp_path):
    import peft
    import transformers

    pm = _peft_model("qwen2", tmp_path)
    rows = _rows(pm.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    run = _lora_run(tmp_path, rows, merge=True, rslora=True, alpha=6.0)
    names = sorted(p.name for p in run.iterdir())
    assert names == ["config.yaml", "final", "merged", "metrics.jsonl"], names
    final = run / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in final.iterdir()}
    saved = load_file(final / "adapter_model.safetensors")

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, final)
    lora_params = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(lora_params) == set(saved)  # every key loaded, none left at its init
    assert all(torch.equal(lora_params[k].detach(), saved[k]) for k in saved)
    assert loaded.peft_config["default"].use_rslora and loaded.peft_config["default"].lora_alpha == 6.0

    ids = torch.tensor([rows[1], rows[2]])  # two full-length rows
    loaded.eval()
    with torch.no_grad():
        want = loaded(input_ids=ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
        got_merged = merged(input_ids=ids).logits
        base_only = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
        plain = base_only(input_ids=ids).logits
    assert rel_err(want, plain) > 1e-2, "the adapter must change the output"
    assert rel_err(_megastream_logits(tmp_path / "model", final, ids), want) <= 1e-5
    assert rel_err(got_merged, want) <= 1e-5


@pytest.mark.parametrize("extra", [[], ["embed_tokens", "lm_head"]], ids=["adapters", "train-extra"])
def test_resume_is_bit_exact_with_dropout(tmp_path, extra):
    """Stopped after checkpoint-2 and resumed, a LoRA run (dropout on; with lora.train_extra too) ends
    exactly as the straight run."""
    import shutil

    pm = _peft_model("llama", tmp_path, modules_to_save=extra or None)
    rows = _rows(pm.config.vocab_size, 4 * ACCUM * MB, seed=2)
    steps = {"steps": 4}
    straight = _lora_run(tmp_path, rows, dropout=0.2, train=steps, output={"save_every": 2}, train_extra=extra)
    # PCIe, as the step counts it: the base's layers in (the plan's figure once warm), nothing back
    planned = json.loads(run_cli("plan", str(straight / "config.yaml"), "--json").stdout)["lora"]
    recs = [m for m in read_metrics(straight) if "h2d_bytes" in m]
    assert len(recs) == 4 and all(m["d2h_bytes"] == 0 == planned["d2h_bytes_per_step"] for m in recs)
    assert recs[0]["h2d_bytes"] > planned["h2d_bytes_per_step"] > 0  # the first step copies every unit
    assert all(m["h2d_bytes"] == planned["h2d_bytes_per_step"] for m in recs[1:])
    ck = straight / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_state.safetensors",
            "trainer_state.json"} <= {p.name for p in ck.iterdir()}
    assert not any(p.suffix == ".safetensors" and p.name.startswith("model") for p in ck.iterdir())  # no base

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ck, resumed / "checkpoint-2")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (straight / "metrics.jsonl").read_text().splitlines()[:2]))
    cfg = _lora_config(tmp_path, rows, dropout=0.2, train=steps, output={"save_every": 2, "dir": str(resumed)},
                       name="resume.yaml", train_extra=extra)
    proc = run_cli("train", str(cfg), "--resume")
    assert "at step 2" in proc.stdout
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]
    for rel in ("final/adapter_model.safetensors", "checkpoint-4/lora_state.safetensors"):
        wa, wb = load_file(straight / rel), load_file(resumed / rel)
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), rel

    # a LoRA checkpoint is not resumed as full fine-tuning, nor the other way round
    from test_cli_errors import _user_error

    full = write_config(tmp_path / "full.yaml", {k: v for k, v in yaml.safe_load(cfg.read_text()).items()
                                                 if k != "lora"})
    _user_error(run_cli("train", str(full), "--resume", str(resumed / "checkpoint-2"), check=False),
                "is a LoRA checkpoint")
    if extra:  # nor without the modules it trains in full
        other = _lora_config(tmp_path, rows, dropout=0.2, train=steps, output={"dir": str(resumed)},
                             name="no-extra.yaml", train_extra=[])
        _user_error(run_cli("train", str(other), "--resume", str(resumed / "checkpoint-2"), check=False),
                    "lora.train_extra")


def test_bad_lora_input_is_refused_and_overwrites_nothing(tmp_path):
    import peft

    from test_cli_errors import _snapshot, _user_error

    pm = _peft_model("llama", tmp_path)
    rows = _rows(pm.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    run = _lora_run(tmp_path, rows, train={"steps": 1})
    before = _snapshot(run)

    def refused(*needles, **kw):
        cfg = _lora_config(tmp_path, rows, name="bad.yaml", **kw)
        _user_error(run_cli("train", str(cfg), "--overwrite", check=False), *needles)
        assert _snapshot(run) == before

    refused("lora.target_modules", "'qproj'", "q_proj, k_proj", target_modules=["qproj", "v_proj"])
    refused("lora.target_modules", "'embed_tokens'", "lora.train_extra: [embed_tokens]",
            target_modules=["q_proj", "embed_tokens"])  # no adapter: trained in full, if at all
    refused("lora.rank", ">= 1", rank=0)
    refused("lora.rank is 8", "r=4", rank=8)  # the init adapter has r=4
    refused("lora.target_modules", "q_proj", target_modules=["q_proj", "v_proj"])  # it adapts all seven
    refused("lora.train_extra", "'embed'", "embed_tokens, lm_head", train_extra=["embed"])
    refused("lora.train_extra", "no module", "set lora.train_extra: []", train_extra=["lm_head"])  # init has none

    other = tmp_path / "other"  # an adapter of another model (Qwen2 shapes) on this Llama
    qwen = make_hf_model("qwen2", other / "model")
    peft.get_peft_model(qwen, peft.LoraConfig(r=RANK, target_modules=list(LORA_TARGETS))).save_pretrained(
        other / "adapter")
    refused("trained on another model", init=str(other / "adapter"))
    refused("is not a directory", init=str(tmp_path / "nowhere"))


def test_lora_config_keys_match_peft_io():
    from megastream.adapters.peft_io import EXTRA_MODULES, LINEAR_TARGETS
    from megastream.config import LORA_EXTRA

    assert LORA_TARGETS == LINEAR_TARGETS and LORA_EXTRA == tuple(EXTRA_MODULES)
