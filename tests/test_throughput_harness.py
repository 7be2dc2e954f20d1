"""benchmarks/throughput.py: the attainable bound from given rates, the parent process never touching
CUDA, rows that cannot run fairly reported as not-run, per-row timeouts with a polled VmHWM, and the
harness end to end on the CPU (the GPU head-to-head runs the same code with --device cuda)."""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import throughput as tp  # noqa: E402

from megastream.memory import budget  # noqa: E402
from megastream.plan import Rates, roofline, schedule  # noqa: E402
from megastream.presets import PRESETS  # noqa: E402


def _args(**kw):
    a = dict(model="qwen2.5-0.5b", seq_len=1024, micro_batch_size=4, grad_accum=4, gpu_memory_gb=24.0,
             activations="device", device="cuda", steps=2, warmup=1, profile=False, profile_steps=3, dry_run=False,
             allow_reference_ops=False, host_ram_gb=1000.0, logs=None, jobs=1, docs_per_row=1)
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


@pytest.mark.parametrize("embedding", ["device", "host"])
def test_attainable_bound_by_hand_on_a_gpu(embedding):
    """max(T_opt, T_fwd) + T_head + T_bwd + tail, each term recomputed here from the rates, with the
    embedding on the device (the default on CUDA) and on the host."""
    import dataclasses

    from megastream.model.layout import model_layout

    a = _args()
    cfg, spec, _ = _budget(a, "full")
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, embedding=embedding))
    b = budget(cfg, spec, "cuda", torch.bfloat16, torch.bfloat16, 0)
    assert b.embedding == embedding
    r = _rates()
    got = schedule(cfg, spec, b, r)
    units = model_layout(spec)
    nl = sum(u.numel for u in units[1:-1])
    T, S, H, V = b.tokens_per_step, a.seq_len, spec.hidden_size, spec.vocab_size
    attn = 2 * spec.num_layers * T * S * spec.num_heads * spec.head_dim
    # the layers' projections (norms and biases are elementwise: not counted), 2 FLOPs per weight per
    # token a pass: forward 1, recompute + backward 3; rows are unpacked: the causal attention rate
    H, I, qd, kd = spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    proj = spec.num_layers * (2 * H * qd + 2 * H * kd + 3 * H * I)
    c_fwd = 2 * proj * T / 600e12 + attn / 300e12
    c_bwd = 6 * proj * T / 600e12 + 3 * attn / 300e12
    fwd = max(c_fwd, (nl + V * H) * 2 / 50e9)  # qwen2.5-0.5b ties its embeddings: the table is the head's
    max_layer = max(u.numel for u in units[1:-1])
    if embedding == "host":
        bwd = max(c_bwd, nl * 2 / 50e9, (nl * 2 + V * H * 4) / 40e9)  # the tied head's gradient: fp32 D2H
        tail = max_layer * 2 / 40e9 + T * H * 2 / 40e9 + (V * H * 4 + T * H * 8) / 100e9
    else:  # the tied head's gradient waits for the embedding's rows and crosses with them, fp32, last
        bwd = max(c_bwd, nl * 2 / 50e9, nl * 2 / 40e9)
        tail = max_layer * 2 / 40e9 + V * H * 4 / 40e9
    opt = b.params * 0.3e-9
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
        att = schedule(cfg, spec, b, rates)
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



def test_the_json_is_rewritten_after_every_row(monkeypatch, tmp_path):
    """A harness stopped before its end (an outer timeout: the first H200 run lost every row so) keeps
    the rows it finished: the JSON, marked partial, is rewritten after each row; the last write is whole."""
    out = tmp_path / "h2h.json"
    seen = []

    def spawn(a, system, tmp, timeout):
        if out.exists():
            doc = json.loads(out.read_text())
            seen.append((system, [r["name"] for r in doc["systems"]], "partial" in doc, doc["rates"]["h2d_gbps"]))
        return _canned(a, system, tmp, timeout)

    monkeypatch.setattr(tp, "_spawn", spawn)
    monkeypatch.setattr(tp.importlib.util, "find_spec", lambda name: None)
    assert tp.main(["--model", "qwen2.5-0.5b", "--host-ram-gb", "1000", "--systems", "megastream:lean", "fsdp2",
                    "--json", str(out)]) == 0
    assert seen[-1][0] == "fsdp2" and "megastream:lean" in seen[-1][1] and "fsdp2" not in seen[-1][1]
    assert seen[-1][2] and seen[-1][3] == 50.0  # partial, with the rates a later --rates-from reads
    doc = json.loads(out.read_text())
    assert "partial" not in doc and "fsdp2" in [r["name"] for r in doc["systems"]] and doc["headline"]


def test_a_row_keeps_the_result_it_wrote_before_its_timeout(monkeypatch, tmp_path):
    """A megastream row writes its timed steps' result before its profile: killed during the profile, the
    row keeps them (the first H200 run's 14B row was profiling at its timeout and lost its steps)."""
    fake = tmp_path / "worker.py"
    fake.write_text("import json, sys, time\n"
                    "out = sys.argv[sys.argv.index('--out') + 1]\n"
                    "open(out, 'w').write(json.dumps({'status': 'ok', 'step_times_s': [1.0]}))\n"
                    "time.sleep(60)\n")
    monkeypatch.setattr(tp, "__file__", str(fake))
    a = _args(device="cpu", model="tiny")
    a.passthrough = []
    r = tp._spawn(a, "megastream:full", tmp_path, timeout=2.0)
    assert r["status"] == "ok" and r["step_times_s"] == [1.0] and "2 s timeout" in r["timed_out"]
    assert r["wall_s"] < 20
    row = tp._row(_args(), "megastream:full", dict(r, peak_gpu_bytes=9_190_000_000), 3e9, 8192,
                  {"matmul_tflops": 768.0}, None)
    assert row["tokens_per_s"] == 8192.0 and row["timed_out"] == r["timed_out"]  # the JSON says so
    assert row["peak_gpu_bytes"] == 9_190_000_000  # exact bytes (the first run kept only 9.19 GB)


def test_a_failing_profiler_costs_the_overlap_figures_not_the_row(tmp_path, capsys):
    """The profile after a megastream row's timed steps (CUDA only): the steps are written first, and a
    profiler that raises (CUPTI missing, say) leaves the row ok with overlap_error saying why."""
    a = _args(out=str(tmp_path / "row.json"))
    out = {"step_times_s": [1.0]}

    def broken():
        assert json.loads((tmp_path / "row.json").read_text())["step_times_s"] == [1.0]  # written already
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore")

    tp._profile_into(a, out, broken)
    assert out["overlap_error"] == "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED\nmore" and "overlap" not in out
    assert "(RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" in capsys.readouterr().out
    tp._profile_into(a, out := {"step_times_s": [1.0]}, lambda: {"busy": 0.9})
    assert out["overlap"] == {"busy": 0.9} and "overlap_error" not in out


def test_a_harness_stopped_by_sigterm_ends_its_running_row(tmp_path):
    """An outer timeout's SIGTERM to the harness ends the row it is running (its own session, out of the
    signal's reach otherwise): on the first H200 run an orphaned row kept the GPU and the cores busy
    under the next step's measurements."""
    worker = tmp_path / "worker.py"
    worker.write_text("import os, sys, time\n"
                      f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
                      "time.sleep(120)\n")
    harness = (f"import argparse, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import throughput as tp\n"
               f"tp.__file__ = {str(worker)!r}\n"
               "a = argparse.Namespace(passthrough=[], logs=None)\n"
               "with tp._rows_stop_with_the_harness():\n"
               f"    tp._spawn(a, 'megastream:full', __import__('pathlib').Path({str(tmp_path)!r}), 120.0)\n")
    proc = subprocess.Popen([sys.executable, "-c", harness])
    pid_file = tmp_path / "pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the row never started"
        time.sleep(0.1)
    row = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while Path(f"/proc/{row}").exists() and "Z" not in Path(f"/proc/{row}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the row outlived the harness"
        time.sleep(0.1)

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
    """Real subprocesses: the headline row, a baseline, DeepSpeed's not-run; identical data (rows of 4
    documents: megastream's document mask, transformers' position_ids and 4-D mask); VmHWM."""
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu",
                           "--model", "tiny", "--seq-len", "32", "--micro-batch-size", "2", "--grad-accum", "2",
                           "--docs-per-row", "4",
                           "--steps", "1", "--warmup", "0", "--systems", "fsdp2", "deepspeed",
                           "megastream:full+clip-previous", "megastream:full+flex", "--jobs", "2",
                           "--logs", str(tmp_path / "logs"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for key in ("device", "date", "torch_version", "model", "tokens_per_step", "systems", "roofline", "rates",
                "bounds", "headline", "data", "setup"):
        assert key in doc
    assert doc["tokens_per_step"] == 2 * 2 * 32
    systems = {s["name"]: s for s in doc["systems"]}
    assert list(systems)[:3] == ["megastream:full", "fsdp2", "deepspeed"]  # the headline row is always there
    for name in ("megastream:full", "fsdp2"):
        s = systems[name]
        assert s["status"] == "ok", s
        for key in ("tokens_per_s", "tflops", "mfu", "peak_host_gb", "state_bytes_per_param"):
            assert s[key] > 0
        assert "VmHWM" in s["peak_host_source"] and s["precision"]
        assert (tmp_path / "logs" / f"{name.replace(':', '_')}.log").exists()
    full = systems["megastream:full"]
    assert full["ideal_fraction"] > 0 and full["attainable_fraction"] > 0 and full["ops_built"] in (True, False)
    assert doc["data"]["identical_for_all_systems"] and doc["data"]["sha256"] and doc["data"]["docs_per_row"] == 4
    assert systems["megastream:full"]["loss_tokens"] == systems["fsdp2"]["loss_tokens"] == 2 * 2 * (32 - 4)
    assert systems["megastream:full"]["config"]["data.pack"] == "bfd"
    assert systems["deepspeed"]["status"] == "not-run" and "CUDA" in systems["deepspeed"]["message"]
    assert "megastream:full / fsdp2:" in proc.stdout and "bounds megastream:full" in proc.stdout
    # variant rows (what gpu_acceptance.sh's parts 3 and 4 time on the GPU): clip-previous runs here and
    # has its before/after ratio; flex is not-run on the CPU with megastream's own reason (as varlen is:
    # tests/test_varlen_attention.py checks its refusal)
    var = systems["megastream:full+clip-previous"]
    assert var["status"] == "ok" and var["config"]["optim.clip"] == "previous"
    assert doc["variants"]["full+clip-previous / full"]["ratio"] > 0 and "full+clip-previous / full = " in proc.stdout
    row = systems["megastream:full+flex"]
    assert row["status"] == "not-run" and "CPU" in row["message"], row
    assert doc["variants"]["full+flex / full"]["ratio"] is None and any(u.startswith("compile") for u in doc["unmeasured"])


def test_the_fsdp2_row_builds_its_model_on_meta_as_transformers_would():
    """The FSDP2 row builds its fp32 model without memory and fills it (transformers' own init draws each
    weight on the host's serial generator: about a minute for 3B): same parameters, tying and rotary
    buffers as transformers' build, the same init statistics, and, given the same weights, the same
    logits -- so the row trains the model the others do."""
    import transformers

    hf = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=1e6, use_cache=False)
    hf._attn_implementation = "sdpa"
    shards = []
    meta = tp.build_fp32_hf(hf, shards.append, storage="cpu", draw_on="cpu")
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    assert shards == [meta]  # sharded before it had storage
    assert meta.lm_head.weight is meta.model.embed_tokens.weight  # tied as transformers ties
    got, want = dict(meta.named_parameters()), dict(ref.named_parameters())
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    for name, buf in ref.named_buffers():  # computed at construction, kept through to_empty
        assert torch.equal(dict(meta.named_buffers())[name], buf), name
    for name, p in got.items():
        if name.endswith("bias"):
            assert not p.any(), name
        elif p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # N(0, 0.02): the sample std of >= 4096 draws is within 5% of it
            assert p.std().item() == pytest.approx(hf.initializer_range, rel=0.05), name
    meta.load_state_dict(ref.state_dict())
    ids = torch.randint(0, hf.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(meta(input_ids=ids).logits, ref(input_ids=ids).logits)


# ---- step-feature variants and packed rows ----------------------------------------------------------
def test_variant_names_parse_and_bad_ones_are_refused(capsys):
    assert tp.parse_system("megastream:full") == ("megastream:full", ())
    assert tp.parse_system("fsdp2") == ("fsdp2", ())
    assert tp.parse_system("megastream:lean+clip-previous+flex") == ("megastream:lean", ("clip-previous", "flex"))
    assert tp.variant_settings("megastream:full+flex+compile") == {"engine.attention": "flex", "engine.compile": True}
    for bad, says in (("megastream:full+bogus", "unknown variant 'bogus'"),
                      ("megastream:huge", "unknown megastream mode"), ("megastream:full+flex+flex", "named twice"),
                      ("deepspeed+flex", "unknown row"), ("megastream", "unknown row")):
        with pytest.raises(ValueError, match=says):
            tp.parse_system(bad)
        with pytest.raises(SystemExit) as e:  # argparse: a usage error, before anything runs
            tp.main(["--systems", bad, "--check"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert says in err
        if "twice" not in says:  # the error lists what is allowed
            assert "full, lean, compact" in err and "flex, clip-previous, compile" in err and "fsdp2" in err
    # --timeouts and --warmups take variant rows; a bad name there is refused the same way
    a = argparse.Namespace(timeouts=["megastream:full+flex=90", "roofline=10"])
    assert tp._timeouts(a) == {"megastream:full+flex": 90.0, "roofline": 10.0}
    with pytest.raises(SystemExit, match="unknown variant 'flx'"):
        tp._timeouts(argparse.Namespace(timeouts=["megastream:full+flx=90"]))
    with pytest.raises(SystemExit, match="expected NAME=SECONDS"):
        tp._timeouts(argparse.Namespace(timeouts=["megastream:full+flex=soon"]))
    assert tp._per_row(["megastream:full+compile=2"], "--warmups", "STEPS", int) == {"megastream:full+compile": 2}


def test_every_variant_is_a_megastream_setting_and_reaches_its_config():
    """Each VARIANTS key is a field of megastream's Config (adding a feature is one line, checked
    here), the modes are megastream's, and a variant row's config carries its settings over its base's."""
    import dataclasses

    from megastream.config import Config
    from megastream.resolve import MODES

    assert set(tp.MODES) == set(MODES)
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    for name, settings in tp.VARIANTS.items():
        for key in settings:
            section, field = key.split(".")
            assert field in {f.name for f in dataclasses.fields(sections[section])}, (name, key)
    a = _args()
    base = tp.megastream_config(a, "lean")
    for name, settings in tp.VARIANTS.items():
        cfg = tp.megastream_config(a, f"lean+{name}")
        for key, value in settings.items():
            assert tp._get(cfg, key) == value != tp._get(base, key), (name, key)
        assert (cfg.optim.master, cfg.optim.states) == (base.optim.master, base.optim.states)
    both = tp.megastream_config(a, "full+flex+clip-previous")
    assert both.engine.attention == "flex" and both.optim.clip == "previous" and not both.engine.compile
    assert tp._label("megastream:full+flex+clip-previous", "cuda") == (
        tp.LABELS["megastream:full"] + "; engine.attention: flex, optim.clip: previous")
    assert tp._label("megastream:full+compile", "cuda").endswith("; engine.compile: true")
    # packed rows: megastream's config packs (its bound uses the masked attention rate), one document a row does not
    assert tp.megastream_config(_args(docs_per_row=4), "full").data.pack == "bfd" and base.data.pack is False


def test_variant_settings_reach_the_worker(tmp_path):
    """The worker (in process: one tiny step on the CPU) trains with the variant's settings and reports
    the config it ran; flex, which megastream refuses on the CPU, is not-run there, with megastream's reason."""
    a = _args(device="cpu", model="tiny", seq_len=32, micro_batch_size=2, grad_accum=1, steps=1, warmup=0,
              gpu_memory_gb=0.0, allow_reference_ops=True, docs_per_row=4)
    out = tp.worker_megastream(a, "full+clip-previous")
    assert out["config"]["optim.clip"] == "previous" and out["config"]["engine.attention"] == "sdpa"
    assert out["config"]["data.pack"] == "bfd" and out["loss_tokens"] == 2 * (32 - 4)
    assert out["data_sha256"] == tp._digest(tp._batches(a, PRESETS["tiny"].vocab_size))
    assert len(out["step_times_s"]) == 1
    with pytest.raises(tp.NotRun, match="FlexAttention has no backward"):
        tp.worker_megastream(a, "full+flex")
    assert "FlexAttention has no backward" in tp._precheck(a, "megastream:full+flex", 10**6)
    assert tp._precheck(_args(), "megastream:full+flex", 10**6) is None  # on a GPU it runs


def _canned_variants(a, system, tmp, timeout):
    steps = {"megastream:full+flex": 1.6, "megastream:full+clip-previous": 1.0, "megastream:lean+compile": 1.0}
    if system in steps:
        r = _canned(a, "megastream:full", tmp, timeout)
        r["step_times_s"] = [steps[system]] * 3
        return r
    if system == "megastream:full+flex+clip-previous":
        return {"status": "timeout", "message": f"timed out after {timeout:g} s (its own timeout)", "wall_s": timeout,
                "timeout_s": timeout}
    return _canned(a, system, tmp, timeout)


def test_variant_rows_print_their_ratio_to_their_base_row(monkeypatch, tmp_path, capsys):
    """full+flex / full and the like, from the rows' tokens/s; a variant whose pair did not both run
    says why and is listed as unmeasured with every feature no row tried; variant rows are labelled
    with their settings and never set against the baselines."""
    monkeypatch.setattr(tp, "_spawn", _canned_variants)
    monkeypatch.setattr(tp.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "v.json"
    rows = ["megastream:full", "megastream:full+flex", "megastream:full+clip-previous",
            "megastream:full+flex+clip-previous", "megastream:lean+compile", "fsdp2"]
    assert tp.main(["--model", "qwen2.5-3b", "--seq-len", "256", "--docs-per-row", "8", "--host-ram-gb", "1000",
                    "--systems", *rows, "--timeouts", "megastream:full+flex+clip-previous=45",
                    "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "full+flex / full = 1.25x tokens/s (engine.attention: flex)" in text  # 2.0 s / 1.6 s
    assert "full+clip-previous / full = 2.00x tokens/s (optim.clip: previous)" in text
    assert "full+flex+clip-previous / full: no ratio (megastream:full+flex+clip-previous timeout)" in text
    assert "lean+compile / lean: no ratio (megastream:lean not in this run)" in text
    assert "full+flex / fsdp2" not in text and "megastream:full / fsdp2: 4.00x" in text
    doc = json.loads(out.read_text())
    v = doc["variants"]
    assert v["full+flex / full"]["ratio"] == pytest.approx(1.25) and v["full+flex / full"]["step_s"] == [1.6, 2.0]
    assert v["full+flex+clip-previous / full"]["ratio"] is None
    assert set(doc["headline"]) == {"megastream:full / deepspeed", "megastream:full / fsdp2"}
    un = "\n".join(doc["unmeasured"])
    assert "full+flex+clip-previous / full" in un and "timeout" in un and "lean+compile / lean" in un
    assert "unmeasured step features:" in text
    named = {s["name"]: s for s in doc["systems"]}
    flex = named["megastream:full+flex"]
    assert flex["settings"] == {"engine.attention": "flex"} and flex["base"] == "megastream:full"
    assert flex["precision"].endswith("engine.attention: flex") and not flex["same_arithmetic_as_headline"]
    assert named["megastream:full+flex+clip-previous"]["timeout_s"] == 45
    assert doc["data"]["docs_per_row"] == 8 and doc["data"]["loss_tokens_per_row"] == 256 - 8

    # a run without flex in any row lists it as unmeasured
    monkeypatch.setattr(tp, "_spawn", _canned_variants)
    tp.main(["--model", "qwen2.5-3b", "--host-ram-gb", "1000", "--systems", "megastream:full+clip-previous",
             "--json", str(out)])
    assert any(u.startswith("flex (engine.attention: flex): no row") for u in json.loads(out.read_text())["unmeasured"])


def test_docs_per_row_are_the_same_documents_for_every_system():
    """Seeded boundaries, >= 2 tokens a document, the same ids as with one document a row; megastream's
    micro-batch (its packed data path's positions, document ids, targets) and the transformers one
    (position_ids, a 4-D document mask, shifted labels) describe the same documents; the digest covers
    the boundaries."""
    from megastream.model.llama import document_mask

    a1, a4 = _args(seq_len=64, micro_batch_size=3, grad_accum=2), _args(seq_len=64, micro_batch_size=3, grad_accum=2,
                                                                          docs_per_row=4)
    one, four = tp._batches(a1, 100), tp._batches(a4, 100)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(one, four))  # the same token ids
    assert all(c.shape == (3, 0) for _, c in one)
    again = tp._batches(a4, 100)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(four, again))  # seeded: every worker draws the same
    assert not torch.equal(four[0][1], four[1][1])
    for ids, cuts in four:
        edges = torch.cat([torch.zeros(3, 1, dtype=torch.long), cuts, torch.full((3, 1), 64)], 1)
        assert cuts.shape == (3, 3) and (edges.diff(dim=1) >= 2).all()
        mb, hf = tp._megastream_batch(ids, cuts), tp._hf_batch(ids, cuts, "cpu")
        assert torch.equal(hf["position_ids"], mb.positions)
        assert torch.equal(hf["attention_mask"], document_mask(mb.doc_ids))
        for r in range(3):
            starts = [0, *cuts[r].tolist()]
            assert mb.positions[r, starts].tolist() == [0] * 4 and mb.doc_ids[r, starts].tolist() == [0, 1, 2, 3]
        # the same targets: megastream's labels are already shifted, transformers' are shifted in the model
        assert torch.equal(mb.labels[:, :-1], hf["labels"][:, 1:])
        assert int((mb.labels != -100).sum()) == tp._hf_loss_tokens([hf]) == 3 * (64 - 4)
    plain = tp._megastream_batch(*one[0])
    assert plain.positions is None and plain.doc_ids is None and "attention_mask" not in tp._hf_batch(*one[0], "cpu")
    # the digest: the ids alone with one document a row (as before --docs-per-row), the boundaries with more
    import hashlib

    assert tp._digest(one) == hashlib.sha256(b"".join(i.numpy().tobytes() for i, _ in one)).hexdigest()
    d2 = tp._digest(tp._batches(_args(seq_len=64, micro_batch_size=3, grad_accum=2, docs_per_row=2), 100))
    assert len({tp._digest(one), tp._digest(four), d2}) == 3
    with pytest.raises(ValueError, match="between 1 and seq_len / 2"):
        tp._batches(_args(seq_len=64, docs_per_row=33), 100)
    with pytest.raises(SystemExit):
        tp.main(["--seq-len", "64", "--docs-per-row", "33", "--check"])


def test_the_transformers_document_mask_is_attention_within_each_document():
    """The baselines' packed rows: a transformers model given _hf_batch's position_ids and 4-D mask
    computes, on every document, what it computes on that document alone."""
    import transformers

    a = _args(model="tiny", seq_len=32, micro_batch_size=2, grad_accum=1, docs_per_row=4)
    hf = tp._hf_config(a)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32).eval()
    (ids, cuts), = tp._batches(a, hf.vocab_size)
    with torch.no_grad():
        packed = model(**tp._hf_batch(ids, cuts, "cpu")).logits
        for r in range(2):
            edges = [0, *cuts[r].tolist(), 32]
            for s, e in zip(edges, edges[1:]):
                alone = model(input_ids=ids[r:r + 1, s:e]).logits[0]
                torch.testing.assert_close(packed[r, s:e], alone, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(packed, model(input_ids=ids).logits, atol=1e-2)  # the mask does something
