"""The tools around training: `plot`, TensorBoard scalars, per-step telemetry, `env`, `probe`."""

import json

import pytest

from helpers import REPO, read_metrics, run_cli

DEMO_ARGS = ["--set", "train.steps=8", "--set", "train.warmup_steps=2", "--set", "output.progress=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tools") / "run"
    val = REPO / "megastream" / "demo" / "corpus.jsonl"
    run_cli("demo", *DEMO_ARGS, "--set", f"output.dir={out}", "--set", "output.tensorboard=true",
            "--set", f"data.val_path={val}", "--set", "train.eval_every=4")
    return out


def test_metrics_carry_host_memory(run):
    recs = read_metrics(run)
    assert len(recs) == 8
    for r in recs:
        assert 0.1 < r["host_rss_gb"] <= r["host_peak_rss_gb"] < 8
        assert r["skipped_steps"] == 0
    assert [r["step"] for r in recs if "eval_loss" in r] == [4, 8]


def test_plot_writes_a_png(run, tmp_path):
    proc = run_cli("plot", str(run))
    png = run / "metrics.png"
    assert str(png) in proc.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # four panels of lines, not an empty canvas
    from PIL import Image  # matplotlib depends on pillow

    img = Image.open(png)
    assert img.size == (1200, 800)
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # curves, text and anti-aliasing, not a blank figure


def test_plot_errors(tmp_path):
    proc = run_cli("plot", str(tmp_path), check=False)
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_tensorboard_scalars(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "host_rss_gb", "eval_loss"):
        assert tag in tags
    loss = [e.value for e in acc.Scalars("loss")]
    assert loss == pytest.approx([r["loss"] for r in read_metrics(run)], rel=1e-6)


def test_env_and_version():
    out = run_cli("env").stdout
    assert "torch " in out and "C++ ops" in out and "RAM:" in out and "locked-memory limit" in out
    assert run_cli("--version").stdout.startswith("megastream ")


def test_probe_caches_what_plan_uses(tmp_path, monkeypatch):
    import megastream.probe as probe
    from megastream.config import load_config
    from megastream.plan import make_plan
    from megastream.presets import PRESETS

    monkeypatch.setattr(probe, "_cache_file", lambda: tmp_path / "probe.json")
    monkeypatch.setattr(probe, "measure_host_bandwidth", lambda *a: 12.5)
    monkeypatch.setattr(probe, "measure_matmul", lambda device, dtype, **k: 0.25 if dtype == torch.float32 else 0.025)
    monkeypatch.setattr(probe, "measure_attention",
                        lambda device, dtype, masked, seq=1024, head_dim=64, **k: (0.01 if masked else 0.05) * (
                            1 if seq == 1024 else seq / 2048 * head_dim / 128))
    monkeypatch.setattr(probe, "measure_gemm", lambda device, dtype, rows, width: 0.25 * width / 2048)
    monkeypatch.setattr(probe, "time_optimizer", lambda n, master, states, repeats, g: n * 1e-9)  # 1 ns/param
    import torch

    rec = probe.run_probe(torch.device("cpu"), log=lambda *a: None)
    probe.save_probe(rec)
    cached = json.loads((tmp_path / "probe.json").read_text())
    assert list(cached.values())[0]["host_gbps"] == 12.5
    p = make_plan(load_config(REPO / "configs" / "demo.yaml"), PRESETS["tiny"])
    assert p.rates.matmul_tflops == 0.25 and "megastream probe" in p.rates.source
    assert p.rates.attention_tflops == {"masked": 0.01, "causal": 0.05}
    assert p.rates.matmul_by_width == {"128": 0.25 / 16, "512": 0.25 / 4, "2048": 0.25}
    assert p.rates.attention_by_shape["masked"]["2048,128"] == 0.01
    assert p.rates.attention_by_shape["masked"]["512,32"] == pytest.approx(0.01 / 16)

    # a bf16 run on this CPU: every compute rate at the probe's measured bf16 / fp32 matmul ratio
    bf16 = make_plan(load_config(REPO / "configs" / "demo.yaml", ["engine.dtype=bfloat16"]), PRESETS["tiny"])
    assert list(cached.values())[0]["bf16_matmul_ratio"] == pytest.approx(0.1)
    assert bf16.rates.matmul_tflops == pytest.approx(0.025) and "bf16 at 0.100x" in bf16.rates.source
    assert bf16.rates.attention_tflops == pytest.approx({"masked": 0.001, "causal": 0.005})
    assert bf16.rates.matmul_by_width["2048"] == pytest.approx(0.025)
    assert bf16.roofline.step_s > 5 * p.roofline.step_s
    assert any("bf16 matmuls run at 0.10x float32's rate" in w for w in bf16.warnings), bf16.warnings
    assert not any("bf16" in w for w in p.warnings)
    del cached[next(iter(cached))]["bf16_matmul_ratio"]  # a probe from before it measured bf16
    (tmp_path / "probe.json").write_text(json.dumps(cached))
    old = make_plan(load_config(REPO / "configs" / "demo.yaml", ["engine.dtype=bfloat16"]), PRESETS["tiny"])
    assert old.rates.matmul_tflops == 0.25 and "bf16 unmeasured on this CPU" in old.rates.source
    from megastream.machine import cpu_flags

    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())  # then no warning without a measurement
    assert any("no native bf16" in w for w in old.warnings) == (not native), old.warnings


def test_rates_follow_the_model_shapes():
    """Narrow matmuls and short, small-head attention run below the big-shape rates: the roofline
    takes each matmul at the rate of its narrowest dimension and attention at the model's (seq,
    head_dim), interpolated in log-log between the probe's points and held beyond them."""
    from megastream.probe import attention_rate, gemm_rate, interp_loglog

    assert interp_loglog({100: 1.0, 10000: 100.0}, 1000) == pytest.approx(10.0)
    assert interp_loglog({100: 1.0, 10000: 100.0}, 10) == 1.0 and interp_loglog({100: 1.0}, 1e6) == 1.0
    by_width = {"128": 0.02, "2048": 0.08}
    assert gemm_rate(by_width, 512, 0.1) == pytest.approx(0.04) and gemm_rate({}, 512, 0.1) == 0.1
    shape = {"masked": {"512,32": 0.001, "512,128": 0.004, "2048,32": 0.004, "2048,128": 0.016}}
    assert attention_rate(shape, "masked", 1024, 64, 0.5) == pytest.approx(0.004)
    assert attention_rate(shape, "causal", 1024, 64, 0.5) == 0.5  # not measured: the single rate


def test_roofline_times_attention_at_its_own_rate():
    """Long packed rows: attention runs at the masked-SDPA rate, not the matmul rate (on a CPU the
    masked path is ~10x slower per FLOP, which made the seq-4096 estimate 16x too low)."""
    from dataclasses import replace

    from megastream.config import load_config
    from megastream.memory import budget
    from megastream.plan import Rates, roofline
    from megastream.presets import PRESETS

    import torch

    rates = Rates(h2d_gbps=0, d2h_gbps=0, matmul_tflops=0.1, host_gbps=20,
                  attention_tflops={"masked": 0.01, "causal": 0.04})
    spec = PRESETS["tiny"]
    base = load_config(REPO / "configs" / "demo.yaml")
    for pack, attn_rate in ((True, 0.01), (False, 0.04)):
        cfg = replace(base, data=replace(base.data, seq_len=4096, pack=pack))
        b = budget(cfg, spec, "cpu", torch.float32, torch.float32, 0)
        r = roofline(cfg, spec, b, rates)
        T, S, qd = b.tokens_per_step, 4096, spec.num_heads * spec.head_dim
        assert r.attention_flops == 8 * spec.num_layers * T * S * qd
        want = (r.flops - r.attention_flops) / 0.1e12 + r.attention_flops / (attn_rate * 1e12)
        assert r.compute_s == pytest.approx(want, rel=1e-12)
        assert r.attention_flops > 0.5 * r.flops  # at 4096 tokens the tiny model is attention-bound


def test_probe_measures_real_numbers():
    """The measuring functions themselves, at small sizes."""
    import torch

    from megastream.probe import measure_attention, measure_host_bandwidth, measure_matmul, time_optimizer

    assert measure_host_bandwidth(nbytes=2**24, repeats=2) > 0.1
    assert measure_matmul(torch.device("cpu"), torch.float32, n=256, repeats=2) > 1e-4
    assert measure_attention(torch.device("cpu"), torch.float32, masked=True, seq=128, repeats=1) > 1e-6
    assert time_optimizer(1 << 16, False, "int8", 2, torch.Generator().manual_seed(0)) > 0
