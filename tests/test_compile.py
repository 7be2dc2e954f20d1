"""engine.compile: the native layer function under torch.compile trains as the eager one does, to
fp32 rounding (inductor fuses and reorders the elementwise work). The training comparison is marked
slow: compiling the forward and the backward's recompute takes minutes on 2 cores."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import fp_tol, read_metrics, rel_err, run_cli

ARGS = ["--set", "train.steps=3", "--set", "train.micro_batch_size=2", "--set", "train.warmup_steps=1",
        "--set", "output.progress=false", "--set", "data.seq_len=64"]


@pytest.mark.slow
def test_compiled_layers_train_as_eager_ones(tmp_path):
    for name, on in (("eager", "false"), ("compiled", "true")):
        run_cli("demo", *ARGS, "--set", f"engine.compile={on}", "--set", f"output.dir={tmp_path / name}")
    tol = fp_tol(torch.float32, 2 * 2 * 64)  # a gradient element sums the step's tokens
    for a, b in zip(read_metrics(tmp_path / "compiled"), read_metrics(tmp_path / "eager")):
        assert abs(a["loss"] - b["loss"]) <= tol * abs(b["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= tol * b["grad_norm"], (a["grad_norm"], b["grad_norm"])
    wa = load_file(tmp_path / "compiled" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "eager" / "final" / "model.safetensors")
    assert max(rel_err(wa[k], wb[k]) for k in wb) <= tol


def test_compile_wires_the_compiled_layer_into_forward_and_backward(monkeypatch):
    """torch.compile stood in by a counting wrapper (the default run keeps this one: no compiling, the
    wiring only): the forward and the backward's recompute both call the compiled layer function."""
    import dataclasses

    from megastream.config import Config
    from megastream.engine.engine import Engine, MicroBatch
    from megastream.model.layout import model_layout
    from megastream.presets import PRESETS
    from megastream.store import HostStore

    calls = []

    def fake_compile(fn, **kw):
        def wrapped(*a, **k):
            calls.append(torch.is_grad_enabled())
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch, "compile", fake_compile)
    spec = PRESETS["tiny"]
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)
    store.init_random(0.02, seed=0)
    cfg = Config()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, device="cpu", compile=True))
    engine = Engine(spec, store, cfg, torch.device("cpu"))
    ids = torch.randint(0, spec.vocab_size, (1, 8))
    engine.step([MicroBatch(ids, torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1))], lr=1e-3)
    engine.close()
    L = spec.num_layers
    assert calls == [False] * L + [True] * L  # forward without grad, backward's recompute with it

