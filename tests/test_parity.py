"""The correctness contract: `megastream train` equals the same run done the plain way with
transformers + clip_grad_norm_ + torch.optim.AdamW, on the CPU in float32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import make_hf_model, padded_rows, read_metrics, rel_err, run_cli, write_config, write_ids

STEPS, MB, ACCUM, SEQ = 3, 2, 2, 12
LR, MIN_LR, WARMUP, WD = 2e-3, 2e-4, 1, 0.1


def _lr(step: int) -> float:  # warmup then cosine, written out independently of megastream
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    p = (step - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * p))


def _rows(vocab: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = SEQ if i % 3 else SEQ - 4  # every third row short: padding excluded from the loss
        rows.append(torch.randint(0, vocab, (length,), generator=g).tolist())
    return rows


def _reference(model, rows, clip: float, previous: bool = False):
    """Plain PyTorch training of the transformers model on the same rows, in file order. `previous`
    (optim.clip: previous): each step's gradients are scaled by clip_grad_norm_'s coefficient of the
    previous step's norm (the first step's own), written out here."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    losses, norms, prev = [], [], None
    for step in range(STEPS):
        mbs = [rows[(step * ACCUM + k) * MB:(step * ACCUM + k + 1) * MB] for k in range(ACCUM)]
        n_tok = sum(len(r) - 1 for mb in mbs for r in mb)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in mbs:
            ids, labels = padded_rows(mb, SEQ)
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_tok
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf") if previous or clip <= 0 else clip)
        if previous:
            coef = min(1.0, clip / ((float(norm) if prev is None else prev) + 1e-6))
            for p in model.parameters():
                p.grad.mul_(coef)
            prev = float(norm)
        for g in opt.param_groups:
            g["lr"] = _lr(step)
        opt.step()
        losses.append(total)
        norms.append(float(norm))
    return losses, norms


@pytest.mark.parametrize("kind,clip,sharded", [("llama", 0.5, True), ("qwen2", 0.5, False), ("llama", 0.0, False),
                                               ("qwen3", 0.5, False), ("mistral", 0.5, False)],
                         ids=["llama-clip-sharded", "qwen2-tied-bias-clip", "llama-noclip", "qwen3-qknorm-bias",
                              "mistral"])
def test_train_matches_transformers_adamw(tmp_path, kind, clip, sharded):
    check_parity(tmp_path, kind, clip, sharded)


def check_parity(tmp_path, kind: str, clip: float, sharded: bool = False, engine: dict | None = None) -> None:
    """Train a tiny `kind` model through the CLI (`engine`: extra engine settings) and check every step's
    loss and gradient norm and every final weight against _reference."""
    model_dir = tmp_path / "model"
    model = make_hf_model(kind, model_dir, max_shard_size="20KB" if sharded else None)
    if sharded:
        assert (model_dir / "model.safetensors.index.json").exists()
    vocab = model.config.vocab_size
    rows = _rows(vocab, STEPS * ACCUM * MB, seed=1)
    data = write_ids(tmp_path / "train.jsonl", rows)
    cfg = write_config(tmp_path / "run.yaml", {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data), "seq_len": SEQ, "shuffle": False, "pack": False},  # padded rows, as the reference
        "train": {"steps": STEPS, "micro_batch_size": MB, "grad_accum": ACCUM, "lr": LR, "warmup_steps": WARMUP,
                  "schedule": "cosine", "min_lr": MIN_LR, "weight_decay": WD, "grad_clip": clip, "seed": 0},
        "optim": {"betas": [0.9, 0.95], "eps": 1e-8},
        "engine": {"device": "cpu", "dtype": "float32", "loss_chunk_tokens": 7,  # several head chunks
                   **(engine or {})},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    })
    run_cli("train", str(cfg))

    ref_losses, ref_norms = _reference(model, rows, clip)
    got = read_metrics(tmp_path / "run")
    assert [m["step"] for m in got] == [1, 2, 3]
    for m, loss, norm in zip(got, ref_losses, ref_norms):
        assert abs(m["loss"] - loss) <= 1e-4 * abs(loss), (m["loss"], loss)
        assert abs(m["grad_norm"] - norm) <= 1e-4 * norm, (m["grad_norm"], norm)
        assert m["lr"] == pytest.approx(_lr(m["step"] - 1), rel=1e-12)
    if clip > 0:
        assert all(n > clip for n in ref_norms), "clipping must be active in this test"

    final = tmp_path / "run" / "final"
    saved = {}
    for f in final.glob("*.safetensors"):
        saved.update(load_file(f))
    ref = dict(model.named_parameters())
    if model.config.tie_word_embeddings:
        ref.pop("lm_head.weight", None)
    assert set(saved) == set(ref)
    moved = 0.0
    for name, p in ref.items():
        assert rel_err(saved[name], p.detach()) <= 1e-4, name
        moved = max(moved, rel_err(saved[name], load_file_initial(model_dir, name)))
    assert moved > 1e-3, "training must have changed the weights"


def load_file_initial(model_dir, name):
    for f in model_dir.glob("*.safetensors"):
        t = load_file(f)
        if name in t:
            return t[name]
    raise KeyError(name)
