"""benchmarks/throughput.py: the attainable bound from given rates, the parent process never touching
CUDA, rows that cannot run fairly reported as not-run, per-row timeouts with a polled VmHWM, and the
harness end to end on the CPU (the GPU head-to-head runs the same code with --device cuda)."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import throughput as tp  # noqa: E402

from megastream.memory import budget  # noqa: E402
from megastream.plan import Rates, roofline  # noqa: E402
from megastream.presets import PRESETS  # noqa: E402


def _args(**kw):
    a = dict(model="qwen2.5-0.5b", seq_len=1024, micro_batch_size=4, grad_accum=4, gpu_memory_gb=24.0,
             activations="device", device="cuda", steps=2, warmup=1, profile=False, profile_steps=3, dry_run=False,
             allow_reference_ops=False, host_ram_gb=1000.0, logs=None, jobs=1)
    a.update(kw)
    return argparse.Namespace(**a)


def _rates(**kw):
    r = dict(h2d_gbps=50.0, d2h_gbps=40.0, matmul_tflops=600.0, host_gbps=100.0,
             attention_tflops={"masked": 100.0, "causal": 300.0},
             optimizer_ns_per_param={"full": 0.3, "lean": 0.2, "compact": 0.25})
    r.update(kw)
    return Rates(**r)


def _budget(a, mode):
    cfg = tp.megastream_config(a, mode)
    dt = torch.bfloat16 if a.device == "cuda" else torch.float32
    return cfg, PRESETS[a.model], budget(cfg, PRESETS[a.model], a.device, dt, dt, 0)


def test_attainable_bound_by_hand_on_a_gpu():
    """max(T_opt, T_fwd) + T_head + T_bwd + tail, each term recomputed here from the rates."""
    from megastream.model.layout import model_layout

    a = _args()
    cfg, spec, b = _budget(a, "full")
    r = _rates()
    got = tp.attainable_bound(cfg, spec, b, r)
    units = model_layout(spec)
    nl = sum(u.numel for u in units[1:-1])
    T, S, H, V = b.tokens_per_step, a.seq_len, spec.hidden_size, spec.vocab_size
    attn = 2 * spec.num_layers * T * S * spec.num_heads * spec.head_dim
    c_fwd = 2 * nl * T / 600e12 + attn / 300e12  # rows are unpacked: the causal attention rate
    c_bwd = 6 * nl * T / 600e12 + 3 * attn / 300e12
    fwd = max(c_fwd, (nl + V * H) * 2 / 50e9)
    bwd = max(c_bwd, nl * 2 / 50e9, (nl * 2 + V * H * 4) / 40e9)  # qwen2.5-0.5b ties its embeddings: fp32 D2H
    opt = b.params * 0.3e-9
    tail = max(u.numel for u in units[1:-1]) * 2 / 40e9 + T * H * 2 / 40e9 + (V * H * 4 + T * H * 8) / 100e9
    assert got.opt_s == pytest.approx(opt) and got.fwd_s == pytest.approx(fwd) and got.bwd_s == pytest.approx(bwd)
    assert got.head_s == pytest.approx(6 * V * H * T / 600e12) and got.tail_s == pytest.approx(tail)
    assert got.step_s == pytest.approx(max(opt, fwd) + got.head_s + bwd + tail)
    assert got.bound == ("optimizer" if opt > fwd else "forward")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("regime", ["compute", "h2d", "optimizer"])
def test_attainable_bound_is_never_below_the_ideal_roofline(device, regime):
    rates = {"compute": _rates(h2d_gbps=1000.0, d2h_gbps=1000.0, matmul_tflops=5.0),
             "h2d": _rates(h2d_gbps=2.0, d2h_gbps=2.0),
             "optimizer": _rates(optimizer_ns_per_param={"full": 50.0, "lean": 40.0, "compact": 45.0})}[regime]
    a = _args(device=device, model="qwen2.5-1.5b", gpu_memory_gb=0.0)
    for mode in ("full", "lean", "compact"):
        cfg, spec, b = _budget(a, mode)
        ideal = roofline(cfg, spec, b, rates)
        att = tp.attainable_bound(cfg, spec, b, rates)
        assert att.step_s >= ideal.step_s * (1 - 1e-9), (mode, att, ideal)
        if device == "cuda" and regime == "optimizer":
            assert att.bound == "optimizer" and att.step_s == pytest.approx(
                att.opt_s + att.head_s + att.bwd_s + att.tail_s)


def _canned(a, system, tmp, timeout):
    """Stand-in for a row's subprocess (what the worker would write)."""
    if system == "roofline":
        return {"status": "ok", "wall_s": 10.0, "timeout_s": timeout, "device": "NVIDIA H200",
                "torch_version": "2.11.0+cu130", "h2d_gbps": 50.0,
                "d2h_gbps": 45.0, "matmul_tflops": 700.0, "matmul_dtype": "bfloat16", "host_gbps": 120.0,
                "attention_tflops": {"masked": 100.0, "causal": 400.0},
                "optimizer_ns_per_param": {"full": 0.4, "lean": 0.3, "compact": 0.35}}
    step = {"megastream:full": 2.0, "megastream:lean": 1.5, "megastream:compact": 1.6, "fsdp2": 8.0}[system]
    r = {"status": "ok", "step_times_s": [step, step * 1.1, step * 0.9], "losses": [12.0, 11.9, 11.8],
         "peak_host_bytes": int(50e9), "peak_host_source": "VmHWM", "peak_gpu_bytes": int(20e9),
         "data_sha256": "same", "wall_s": 30.0, "timeout_s": timeout}
    if system.startswith("megastream:"):
        r.update(ops_built=True, cpu_isa="avx512")
    return r


def test_parent_never_initialises_cuda_and_writes_both_bounds(monkeypatch, tmp_path, capsys):
    """The parent computes budgets and bounds and spawns rows without a CUDA call (the device's name
    comes from the roofline child), labels every row, puts full vs full at the head, and reports a
    baseline it cannot build (no deepspeed here) as not-run, with no subprocess."""
    def boom(*args, **kw):
        raise AssertionError("the harness's parent process initialised CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", boom)
    monkeypatch.setattr(torch.cuda, "init", boom)
    monkeypatch.setattr(tp, "_spawn", _canned)
    monkeypatch.setattr(tp.importlib.util, "find_spec", lambda name: None)  # no deepspeed
    out = tmp_path / "h2h.json"
    assert tp.main(["--model", "qwen2.5-3b", "--micro-batch-size", "4", "--grad-accum", "2",
                    "--host-ram-gb", "1000", "--timeouts", "fsdp2=77", "--json", str(out)]) == 0
    assert not torch.cuda.is_initialized()
    doc = json.loads(out.read_text())
    assert doc["device"] == "NVIDIA H200" and doc["tokens_per_step"] == 4 * 2 * 1024
    rows = {s["name"]: s for s in doc["systems"]}
    assert list(rows) == tp.ALL_SYSTEMS
    assert rows["deepspeed"]["status"] == "not-run" and "not installed" in rows["deepspeed"]["message"]
    assert rows["fsdp2"]["timeout_s"] == 77 and rows["megastream:full"]["timeout_s"] == 1800
    for name, want in (("megastream:full", 14.0), ("megastream:lean", 6.0), ("megastream:compact", 4.03),
                       ("deepspeed", 14), ("fsdp2", 12)):
        assert rows[name]["state_bytes_per_param"] == pytest.approx(want, abs=0.02), name
        assert rows[name]["precision"]
    assert "fp32 master" in rows["megastream:full"]["precision"] and rows["megastream:full"]["same_arithmetic_as_headline"]
    assert not rows["megastream:lean"]["same_arithmetic_as_headline"]
    full = rows["megastream:full"]
    assert full["ops_built"] is True and full["cpu_isa"] == "avx512"
    for key in ("ideal", "attainable"):
        assert full[f"{key}_fraction"] == pytest.approx(full[f"{key}_s"] / full["step_s"])
        assert doc["bounds"]["megastream:full"][key]["step_s"] == pytest.approx(full[f"{key}_s"])
    assert full["attainable_s"] >= full["ideal_s"]
    assert doc["headline"]["megastream:full / fsdp2"] == pytest.approx(4.0)
    assert doc["headline"]["megastream:full / deepspeed"] is None
    assert doc["data"]["identical_for_all_systems"] and doc["data"]["sha256"] == "same"
    text = capsys.readouterr().out
    assert "megastream:full / fsdp2: 4.00x tokens/s (same arithmetic: the headline)" in text
    assert "megastream:lean / fsdp2" in text and "attainable" in text


def test_carry_over_gives_a_row_what_earlier_rows_left(monkeypatch, tmp_path):
    monkeypatch.setattr(tp, "_spawn", _canned)  # every row takes 30 s, the roofline 10 s
    monkeypatch.setattr(tp.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "h2h.json"
    assert tp.main(["--model", "qwen2.5-0.5b", "--host-ram-gb", "1000", "--systems", "deepspeed", "fsdp2",
                    "--timeouts", "roofline=20", "megastream:full=100", "fsdp2=77", "--carry-over",
                    "--json", str(out)]) == 0
    rows = {s["name"]: s for s in json.loads(out.read_text())["systems"]}
    assert rows["megastream:full"]["limit_s"] == 100 + (20 - 10)
    assert rows["fsdp2"]["timeout_s"] == 77 and rows["fsdp2"]["limit_s"] == 77 + (110 - 30)


def test_rows_the_host_cannot_hold_are_not_run():
    a = _args(model="qwen2.5-7b", host_ram_gb=128.0)
    n = sum(u.numel for u in __import__("megastream.model.layout", fromlist=["x"]).model_layout(PRESETS[a.model]))
    assert "host RAM" in tp._precheck(a, "megastream:full", n)  # ~16 B/param: 122 GB + runtime
    assert tp._precheck(a, "megastream:lean", n) is None
    assert "host RAM" in tp._precheck(a, "fsdp2", n)
    assert "needs CUDA" in tp._precheck(_args(device="cpu"), "deepspeed", n)


def test_megastream_without_its_ops_is_not_run(monkeypatch):
    """The pure-PyTorch optimizer is never timed in the C++ ops' place unless asked for."""
    from megastream import ops

    monkeypatch.setattr(ops, "have_ext", lambda: False)
    with pytest.raises(tp.NotRun, match="C\\+\\+ optimizer ops are not built"):
        tp.worker_megastream(_args(device="cpu", model="tiny"), "full")


def test_a_row_past_its_own_timeout_is_killed_with_its_peak_polled(tmp_path):
    a = _args(device="cpu", model="tiny", seq_len=32, micro_batch_size=2, grad_accum=2)
    a.passthrough = ["--device", "cpu", "--model", "tiny"]
    r = tp._spawn(a, "megastream:full", tmp_path, timeout=1.0)
    assert r["status"] == "timeout" and "1 s" in r["message"]
    assert r["peak_host_bytes"] > 10e6 and "polled" in r["peak_host_source"]
    assert r["wall_s"] < 10


def test_harness_end_to_end_on_the_cpu(tmp_path):
    """Real subprocesses: the headline row, a baseline, DeepSpeed's not-run; identical data; VmHWM."""
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu",
                           "--model", "tiny", "--seq-len", "32", "--micro-batch-size", "2", "--grad-accum", "2",
                           "--steps", "1", "--warmup", "0", "--systems", "fsdp2", "deepspeed", "--jobs", "2",
                           "--logs", str(tmp_path / "logs"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for key in ("device", "date", "torch_version", "model", "tokens_per_step", "systems", "roofline", "rates",
                "bounds", "headline", "data", "setup"):
        assert key in doc
    assert doc["tokens_per_step"] == 2 * 2 * 32
    systems = {s["name"]: s for s in doc["systems"]}
    assert list(systems) == ["megastream:full", "fsdp2", "deepspeed"]  # the headline row is always there
    for name in ("megastream:full", "fsdp2"):
        s = systems[name]
        assert s["status"] == "ok", s
        for key in ("tokens_per_s", "tflops", "mfu", "peak_host_gb", "state_bytes_per_param"):
            assert s[key] > 0
        assert "VmHWM" in s["peak_host_source"] and s["precision"]
        assert (tmp_path / "logs" / f"{name.replace(':', '_')}.log").exists()
    full = systems["megastream:full"]
    assert full["ideal_fraction"] > 0 and full["attainable_fraction"] > 0 and full["ops_built"] in (True, False)
    assert doc["data"]["identical_for_all_systems"] and doc["data"]["sha256"]
    assert systems["deepspeed"]["status"] == "not-run" and "CUDA" in systems["deepspeed"]["message"]
    assert "megastream:full / fsdp2:" in proc.stdout and "bounds megastream:full" in proc.stdout
