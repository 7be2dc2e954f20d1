"""Non-finite steps: an injected NaN/inf skips the whole update (counted and logged), K in a row
stop the run, and non-finite weights are never written to a checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

import megastream.engine.engine as engine_mod
from helpers import REPO, read_metrics
from megastream.config import load_config
from megastream.errors import CheckpointError, TrainingError
from megastream.train import train

DEMO = REPO / "configs" / "demo.yaml"


def _cfg(out, *sets):
    return load_config(DEMO, ["train.steps=4", "train.warmup_steps=0", "train.schedule=constant",
                              "train.micro_batch_size=4", "train.grad_accum=2", "output.progress=false",
                              f"output.dir={out}", *sets])


def _poison(monkeypatch, steps: set[int], what: str):
    """Make the head return a NaN loss ("loss") or an infinite d(hidden) with a finite loss ("grad")
    in the given 1-based steps."""
    real_step, real_head = engine_mod.Engine.step, engine_mod.head_loss_and_grad
    state = {"step": 0}

    def head(*a, **k):
        loss, dy = real_head(*a, **k)
        if state["step"] in steps:
            if what == "loss":
                return loss * float("nan"), dy
            dy = dy.clone()
            dy.view(-1)[0] = float("inf")
        return loss, dy

    def step(self, *a, **k):
        state["step"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(engine_mod, "head_loss_and_grad", head)
    monkeypatch.setattr(engine_mod.Engine, "step", step)


@pytest.mark.parametrize("what,clip", [("loss", "1.0"), ("grad", "0.0")])
def test_a_nonfinite_step_is_skipped_whole(tmp_path, monkeypatch, what, clip):
    """Step 4 poisoned: the final weights equal a clean 3-step run's, bit for bit (no unit was
    updated, with or without clipping), and the metrics count the skip."""
    clean = tmp_path / "clean"
    train(_cfg(clean, "train.steps=3", f"train.grad_clip={clip}"), log=lambda *a: None)
    _poison(monkeypatch, {4}, what)
    logs = []
    hurt = tmp_path / "hurt"
    train(_cfg(hurt, f"train.grad_clip={clip}"), log=logs.append)
    recs = read_metrics(hurt)
    assert [r.get("skipped", False) for r in recs] == [False, False, False, True]
    assert recs[-1]["skipped_steps"] == 1
    assert any("update skipped" in str(m) for m in logs)
    a, b = load_file(clean / "final" / "model.safetensors"), load_file(hurt / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 4}, "loss")
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="3 steps in a row"):
        train(_cfg(out, "train.max_nonfinite_steps=3"), log=lambda *a: None)
    assert [r.get("skipped", False) for r in read_metrics(out)] == [False, True, True, True]
    assert not (out / "final").exists()


def test_nonfinite_weights_are_never_saved(tmp_path, monkeypatch):
    """A checkpoint save with a NaN in the weights fails and leaves the earlier checkpoint intact."""
    import megastream.train as train_mod

    out = tmp_path / "run"
    real = train_mod._save_checkpoint
    calls = []

    def save(out_dir, step, adam_steps, cfg, model, toks, *args, **kw):
        if step == 4:
            model.store.weights_of(2)[5] = float("nan")
        calls.append(step)
        return real(out_dir, step, adam_steps, cfg, model, toks, *args, **kw)

    monkeypatch.setattr(train_mod, "_save_checkpoint", save)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        train(_cfg(out, "output.save_every=2"), log=lambda *a: None)
    assert calls == [2, 4]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "checkpoint-4").exists() and not list(out.glob(".checkpoint-4*"))
