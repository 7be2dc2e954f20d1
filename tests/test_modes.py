"""The lean memory modes train like full precision: the demo config through the real CLI, in
full precision (fp32), lean (bf16 weights with stochastic rounding, bf16 moments) and compact
(bf16 weights, int8 moments), same steps, same data.

Sized by work, not by one CPU's speed: bf16 matmuls on a CPU without AVX-512-BF16 run ~9x slower
than fp32 and cost milliseconds per call even when tiny, so the runs are short (20 steps of one
micro-batch of 4 x 32 tokens, ~230 matmuls a step) at a learning rate high enough for the loss to
fall well within them."""

import re

import pytest

from helpers import read_metrics, run_cli

STEPS = 20
COMMON = ["--set", f"train.steps={STEPS}", "--set", "train.lr=1e-2", "--set", "train.min_lr=1e-3",
          "--set", "train.warmup_steps=3", "--set", "data.seq_len=32", "--set", "train.micro_batch_size=4",
          "--set", "train.grad_accum=1", "--set", "output.progress=false"]
MODES = {  # name: (optim.master, optim.states, engine.dtype, model-state bytes per parameter)
    "full": ("fp32", "fp32", "float32", 12.0),  # fp32 compute: the working copy is the master
    "lean": ("none", "bf16", "bfloat16", 6.0),
    "compact": ("none", "int8", "bfloat16", 4.03),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, (master, states, dtype, _) in MODES.items():
        d = tmp_path_factory.mktemp(name) / "run"
        proc = run_cli("demo", *COMMON, "--set", f"optim.master={master}", "--set", f"optim.states={states}",
                       "--set", f"engine.dtype={dtype}", "--set", f"output.dir={d}")
        out[name] = (read_metrics(d), proc.stdout)
    return out


def _final(metrics):  # mean of the last 5 steps: one step's loss is noisy
    return sum(m["loss"] for m in metrics[-5:]) / 5


@pytest.mark.parametrize("mode", ["lean", "compact"])
def test_lean_modes_reach_full_precision_loss(runs, mode):
    full, got = _final(runs["full"][0]), _final(runs[mode][0])
    assert got < runs[mode][0][0]["loss"] - 0.5, "the loss must fall"
    assert abs(got - full) <= 0.02 * full, (mode, got, full)


@pytest.mark.parametrize("mode", list(MODES))
def test_startup_prints_host_bytes_per_param(runs, mode):
    stdout = runs[mode][1]
    m = re.search(r"host ([\d.]+) GB planned .*?: ([\d.]+) B/param of model state", stdout)
    assert m, stdout
    assert float(m.group(2)) == pytest.approx(MODES[mode][3], abs=0.01)
    assert "C++ ops on" in stdout
