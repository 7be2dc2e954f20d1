"""The memory plan: exact host-store terms, the verdict and suggestions, `train` refusing what
cannot fit, and the prediction against a real run's peak RSS."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from helpers import REPO, run_cli
from megastream.config import load_config
from megastream.machine import Machine
from megastream.memory import store_bytes
from megastream.model.layout import model_layout
from megastream.plan import make_plan
from megastream.presets import PRESETS
from megastream.store import HostStore

DEMO = REPO / "configs" / "demo.yaml"
BIG = REPO / "configs" / "qwen2.5-14b-24gb.yaml"


@pytest.mark.parametrize("compute,grad", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("master,states", [(True, "fp32"), (False, "bf16"), (False, "int8"), (True, "int8")])
@pytest.mark.parametrize("preset", ["tiny"])
def test_store_terms_are_what_the_store_allocates(preset, compute, grad, master, states):
    spec = PRESETS[preset]
    store = HostStore(model_layout(spec), compute, grad, pin=False, master=master, states=states)
    assert store_bytes(spec, compute, grad, master, states) == store.breakdown()


def test_tied_and_biased_shapes_too():
    spec = replace(PRESETS["qwen2.5-0.5b"], vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16)
    store = HostStore(model_layout(spec), torch.bfloat16, torch.bfloat16, pin=False, master=False, states="int8")
    assert store_bytes(spec, torch.bfloat16, torch.bfloat16, False, "int8") == store.breakdown()


def _machine(ram_gb: float, gpus=()) -> Machine:
    return Machine(hostname="test", cpu="test cpu", cores=16, ram_total=int(ram_gb * 1e9),
                   ram_available=int(ram_gb * 1e9 * 0.95), memlock_limit=None, gpus=list(gpus))


def test_14b_plan_per_mode_verdict_and_a_suggested_mode():
    cfg = load_config(BIG, ["optim.master=fp32", "optim.states=fp32"])  # full precision: ~245 GB
    p = make_plan(cfg, PRESETS["qwen2.5-14b"], runtime_bytes=int(0.3e9), host=_machine(128))
    assert p.budget.params == 14_770_033_664
    assert not p.fits_host and p.fits_gpu  # 24 GB cap, no GPU visible here: the cap is the budget
    assert p.budget.host["working"] == 2 * p.budget.params
    assert p.budget.host["master"] == 4 * p.budget.params
    assert p.modes["full"].host_total > 200e9 and p.modes["compact"].host_total < 100e9
    fits = [k for k, m in p.modes.items() if m.host_total <= p.ram_usable]
    assert fits == ["compact"] or fits == ["lean", "compact"]
    assert any("optim.states: int8" in s and "brings host RAM to" in s for s in p.suggestions), p.suggestions
    js = p.to_json()
    for key in ("params", "host_bytes_total", "gpu_bytes_total", "host_bytes_per_param", "fits_host", "fits_gpu",
                "predicted_step_s"):
        assert key in js
    assert js["host_bytes_total"] == sum(js["host_bytes"].values())
    assert js["predicted_step_s"] > 0


def test_gpu_budget_suggestions():
    cfg = load_config(BIG, ["engine.gpu_memory_gb=12", "train.micro_batch_size=8", "train.grad_accum=2"])
    p = make_plan(cfg, PRESETS["qwen2.5-14b"], runtime_bytes=int(0.3e9), host=_machine(256))
    assert not p.fits_gpu
    assert any("engine.activations: host" in s or "micro_batch_size" in s for s in p.suggestions), p.suggestions
    host = make_plan(load_config(BIG, ["engine.activations=host"]), PRESETS["qwen2.5-14b"], int(0.3e9), _machine(256))
    dev = make_plan(load_config(BIG), PRESETS["qwen2.5-14b"], int(0.3e9), _machine(256))
    moved = dev.budget.gpu["boundary checkpoints"] - host.budget.gpu["boundary checkpoints"]
    assert moved > 0 and host.budget.host["offloaded checkpoints"] == dev.budget.gpu["boundary checkpoints"]


def test_plan_cli_table_and_json():
    proc = run_cli("plan", str(BIG), check=False)
    assert proc.returncode in (0, 1), proc.stderr  # 1: does not fit this machine
    out = proc.stdout
    for text in ("host RAM", "optimizer states", "gradient staging", "GPU memory", "boundary checkpoints",
                 "optimizer modes", "full", "lean", "compact", "verdict:", "predicted step"):
        assert text in out, text
    js = json.loads(run_cli("plan", str(BIG), "--json", check=False).stdout)
    assert js["params"] == 14_770_033_664 and js["device"] == "cuda"
    assert js["fits"] == (proc.returncode == 0)


def test_train_refuses_a_run_that_cannot_fit(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", str(DEMO), "--set", "model.preset=qwen2.5-32b", "--set", "engine.device=cpu",
                   "--set", f"output.dir={out}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "host RAM" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # refused before anything was allocated or written


def test_plan_predicts_demo_peak_rss_within_10_percent(tmp_path):
    from megastream import ops

    ops.have_ext()  # build the C++ ops here if needed: a child's peak RSS would count the compiler's
    sets = ["--set", "train.steps=6", "--set", "train.warmup_steps=0", "--set", "output.progress=false",
            "--set", f"output.dir={tmp_path / 'run'}"]
    # Its own process: the plan counts the planning process's RSS as the runtime term.
    planned = json.loads(run_cli("plan", str(DEMO), "--json", *sets, isolate=True).stdout)["host_bytes_total"]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    # The training process reports its own high-water mark (VmHWM) when the CLI returns; getrusage of
    # a child would include this (large) pytest process, which Linux carries across fork and exec.
    code = ("import sys; from megastream.cli import main; from megastream.machine import peak_rss; "
            "rc = main(sys.argv[1:]); print('PEAK', peak_rss()); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "train", str(DEMO), *sets], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.split("PEAK")[-1])
    assert abs(planned - peak) <= 0.10 * peak, (planned / 1e9, peak / 1e9)


# ---- the predicted step on a GPU: the engine's schedule, not the roofline -----------------------------
def _first_h200_run(clip: str = "global"):
    """The first H200 run's megastream:full row (qwen2.5-3b, 4 x 2 x 1024 tokens, measured 1.123 s a
    step) with that machine's rates: H2D / D2H 55.1 / 55.2 GB/s, bf16 matmul 768 TFLOP/s, host 104
    GB/s, the full-mode optimizer at that bandwidth (28 B/param: 0.269 ns; the run's probe timed
    0.171 over 16M params, partly in cache), attention at 300 TFLOP/s (the run's probe timed a
    launch-bound 1k-token row)."""
    import dataclasses
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import argparse

    import throughput as tp

    from megastream.memory import budget
    from megastream.plan import Rates

    a = argparse.Namespace(model="qwen2.5-3b", seq_len=1024, micro_batch_size=4, grad_accum=2, gpu_memory_gb=24.0,
                           activations="device", device="cuda", docs_per_row=1)
    cfg = tp.megastream_config(a, "full")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, clip=clip))
    spec = PRESETS["qwen2.5-3b"]
    rates = Rates(h2d_gbps=55.1, d2h_gbps=55.2, matmul_tflops=768.0, host_gbps=104.1,
                  attention_tflops={"masked": 300.0, "causal": 300.0}, optimizer_ns_per_param={"full": 28 / 104.1})
    return cfg, spec, budget(cfg, spec, "cuda", torch.bfloat16, torch.bfloat16, 0), rates


@pytest.mark.parametrize("clip", ["global", "previous"])
def test_plan_predicts_the_step_as_the_engine_overlaps_it(clip, monkeypatch):
    """On a GPU the host optimizer overlaps only part of the step -- the next forward (optim.clip: global)
    or the backward (previous) -- so `plan` predicts the engine's schedule, not the roofline (every term
    overlapped with every other). The first H200 run: the roofline said 0.83 s (0.74 of the measured
    1.123 s), the schedule says 1.07 s (0.95), inside the issue's 15%."""
    from megastream.plan import render, roofline, schedule

    cfg, spec, b, rates = _first_h200_run(clip)
    roof, sc = roofline(cfg, spec, b, rates), schedule(cfg, spec, b, rates)
    assert roof.bound == "optimizer" and roof.step_s == pytest.approx(b.params * 28 / 104.1e9)
    assert sc.opt_s == roof.optimizer_s and sc.head_s > 0 and sc.bwd_s > 0 and sc.tail_s > 0
    if clip == "global":
        assert sc.step_s == pytest.approx(max(sc.opt_s, sc.fwd_s) + sc.head_s + sc.bwd_s + sc.tail_s)
        assert abs(sc.step_s / 1.123 - 1) <= 0.15 < abs(roof.step_s / 1.123 - 1)
        assert sc.bound == "optimizer" and "next forward" in sc.overlap
    else:  # each unit's update as its gradient lands: the optimizer hides under the backward where it can
        assert sc.step_s == pytest.approx(sc.fwd_s + sc.head_s + max(sc.bwd_s, sc.opt_s) + sc.tail_s)
        assert "backward" in sc.overlap
        assert sc.step_s < schedule(*_first_h200_run("global")).step_s
    # never faster than every term overlapped: compute, the copies, the optimizer
    assert sc.step_s >= roof.step_s and sc.step_s >= roof.compute_s and sc.step_s >= roof.h2d_s

    monkeypatch.setattr("megastream.plan.rates_for", lambda device_type, compute=None: rates)  # plan with these rates
    p = make_plan(cfg, spec, runtime_bytes=int(0.3e9), host=_machine(256))
    js = p.to_json()
    assert js["predicted_step_s"] == pytest.approx(sc.step_s) and js["roofline"]["step_s"] == pytest.approx(roof.step_s)
    assert js["schedule"]["overlap"] == sc.overlap and js["predicted_tokens_per_s"] == pytest.approx(8192 / sc.step_s)
    text = render(p)
    assert f"all terms overlapped: {roof.step_s:.3f} s (optimizer-bound); as the engine runs them" in text
    assert f"predicted step {sc.step_s:.3f} s ({sc.bound}-bound)" in text


def test_on_the_cpu_the_prediction_is_the_roofline():
    """The CPU's cores run compute and optimizer both: the roofline already adds its terms (and LoRA has no
    host optimizer to schedule), so the schedule is the roofline's step there."""
    from megastream.plan import roofline, schedule

    cfg = load_config(DEMO)
    p = make_plan(cfg, PRESETS["tiny"], runtime_bytes=int(0.3e9), host=_machine(64))
    assert p.device_type == "cpu" and p.schedule.step_s == p.roofline.step_s
    assert p.to_json()["predicted_step_s"] == p.roofline.step_s
    assert schedule(cfg, p.spec, p.budget, p.rates).step_s == roofline(cfg, p.spec, p.budget, p.rates).step_s
