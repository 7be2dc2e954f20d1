"""The CUDA path: streams, pinned arenas, device-accumulated gradients. Skipped without CUDA."""

import math

import pytest
import torch

from megastream.config import Config, EngineConfig, TrainConfig
from megastream.engine.engine import Engine
from megastream.model.layout import model_layout
from megastream.presets import PRESETS
from megastream.store import HostStore
from helpers import assert_close_normwise
from test_engine import _batches, _spec

pytestmark = pytest.mark.gpu


def _run(spec, device, dtype, mbs, steps=1, pin=False, clip=0.0):
    store = HostStore(model_layout(spec), dtype, dtype, pin=pin)
    store.init_random(0.2, seed=3)
    cfg = Config(train=TrainConfig(grad_clip=clip, weight_decay=0.1), engine=EngineConfig(loss_chunk_tokens=5))
    engine = Engine(spec, store, cfg, torch.device(device))
    stats = [engine.step(mbs, lr=1e-3) for _ in range(steps)]
    engine.close()
    return store, stats


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_cuda_fp32_matches_cpu(tied, clip):
    """Same steps on cuda (streams, pinned arenas, device grad accumulation, overlapped updates)
    and on the CPU, in fp32: same losses, gradient norms and weights."""
    spec = _spec(tied)
    mbs = _batches(spec, M=3, B=2, S=9)
    cpu_store, cpu_stats = _run(spec, "cpu", torch.float32, mbs, steps=3, clip=clip)
    gpu_store, gpu_stats = _run(spec, "cuda", torch.float32, mbs, steps=3, pin=True, clip=clip)
    assert gpu_store.working.is_pinned() and gpu_store.grad.is_pinned() and gpu_store.embed_grad.is_pinned()
    for a, b in zip(cpu_stats, gpu_stats):
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    # Norm-wise (an element-wise check failed on the first H200 run: one of 20,568 elements off by
    # 1.3e-4 relative): each weight's gradient sums over the step's tokens, each term an H-long dot
    # product, so n = tokens * hidden terms, in fp32.
    assert_close_normwise(gpu_store.master, cpu_store.master, n_terms=3 * 2 * 9 * spec.hidden_size)
    gpu_store.close()


def test_cuda_bf16_tracks_fp32():
    spec = _spec(False)
    mbs = _batches(spec, M=2, B=2, S=16)
    _, ref = _run(spec, "cpu", torch.float32, mbs, steps=4)
    store, got = _run(spec, "cuda", torch.bfloat16, mbs, steps=4, pin=True)
    assert store.grad.dtype == torch.bfloat16 and store.working.dtype == torch.bfloat16
    for a, b in zip(ref, got):
        assert b.loss == pytest.approx(a.loss, rel=2e-2)
    store.close()


def test_1b_preset_peak_gpu_memory():
    """A 1B-shaped model (llama-3.2-1b) trains a step with peak GPU memory near what the design
    predicts: two layer slots, two fp32 layer accumulators, the head (tied) and its fp32 gradient,
    activations and one logits chunk -- far below the 2.5 GB its bf16 weights alone would take."""
    spec = PRESETS["llama-3.2-1b"]
    store = HostStore(model_layout(spec), torch.bfloat16, torch.bfloat16, pin=True)
    store.init_random(0.02, seed=0)
    cfg = Config(train=TrainConfig(grad_clip=1.0))
    engine = Engine(spec, store, cfg, torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    from megastream.engine.engine import MicroBatch

    mbs = []
    for _ in range(2):
        ids = torch.randint(0, spec.vocab_size, (2, 512), generator=g)
        mbs.append(MicroBatch(ids, torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)))
    torch.cuda.reset_peak_memory_stats()
    stats = [engine.step(mbs, lr=1e-5) for _ in range(2)]
    engine.close()
    peak = torch.cuda.max_memory_allocated()
    layer = model_layout(spec)[1].numel
    head = spec.vocab_size * spec.hidden_size
    predicted = 2 * layer * 2 + 2 * layer * 4 + head * 2 + head * 4
    print(f"llama-3.2-1b peak GPU memory {peak / 2**30:.2f} GiB (weights+grads buffers {predicted / 2**30:.2f} GiB)")
    # At init the logits of a row are ~N(0, s^2) with s^2 = std^2 * H (the final norm's output has unit
    # RMS; tied rows have std 0.02), so the loss on uniform random targets is ~ln V + s^2 / 2 = 12.17
    # (a 2-layer cut of this model gives 12.14 on the CPU in fp32). The second step sees the same batch
    # after one AdamW step, whose first update is a sign step of every one of 1.2B weights: the loss
    # drops (10.86 on the first H200 run), so it is only checked to be lower.
    assert stats[0].loss == pytest.approx(math.log(spec.vocab_size) + 0.02**2 * spec.hidden_size / 2, abs=0.25)
    assert stats[1].loss < stats[0].loss
    assert peak < predicted + 1.5 * 2**30
    store.close()


# ---- memory plan, GPU cap, activation offload (issues 5 and 6) ---------------------------------
def _preset_cfg(tmp_path, *sets):
    from helpers import REPO
    from megastream.config import load_config

    return load_config(REPO / "configs" / "demo.yaml",
                       ["model.preset=qwen2.5-0.5b", "engine.device=cuda", "data.seq_len=512",
                        "train.micro_batch_size=4", "train.grad_accum=2", "train.steps=3", "train.warmup_steps=0",
                        "train.lr=1e-5", "train.min_lr=0", "output.progress=false", f"output.dir={tmp_path / 'run'}",
                        *sets])


@pytest.mark.parametrize("activations", ["device", "host"])
def test_plan_predicts_gpu_peak_within_15_percent(tmp_path, activations):
    from megastream.memory import CUDA_CONTEXT_DEVICE
    from megastream.plan import make_plan
    from megastream.resolve import model_spec
    from megastream.train import train

    cfg = _preset_cfg(tmp_path, f"engine.activations={activations}")
    planned = make_plan(cfg, model_spec(cfg)).budget.gpu_total - CUDA_CONTEXT_DEVICE  # allocator bytes only
    recs = train(cfg, log=lambda *a: None)
    peak = max(r["gpu_peak_gb"] for r in recs) * 1e9
    print(f"{activations}: planned {planned / 1e9:.2f} GB, measured peak {peak / 1e9:.2f} GB")
    assert abs(planned - peak) <= 0.15 * peak


def test_activation_offload_on_gpu_is_exact_and_smaller(tmp_path):
    from megastream.train import train

    dev = train(_preset_cfg(tmp_path / "d", "engine.activations=device"), log=lambda *a: None)
    host = train(_preset_cfg(tmp_path / "h", "engine.activations=host"), log=lambda *a: None)
    assert [r["loss"] for r in dev] == [r["loss"] for r in host]
    assert max(r["gpu_peak_gb"] for r in host) < max(r["gpu_peak_gb"] for r in dev)


def test_activation_offload_overlaps_compute():
    """The offload (D2H) and bring-back (H2D) copies run mostly under compute kernels.

    At layers wide enough for the GPU to be busy: 4 layers of Qwen2.5-7B's widths (a 32k vocabulary), 4k
    tokens a micro-batch, where a layer's forward (~2 TFLOP, ~3 ms on an H200) outlasts its 29 MB copy
    (~0.5 ms at 55 GB/s). On the first H200 run this test used qwen2.5-0.5b: its kernels were so short that
    the GPU waited on kernel launches (compute busy 24% of the step) and only 5-8% of the copies' time fell
    under a kernel, which says nothing about the schedule."""
    import dataclasses

    from megastream.engine.engine import MicroBatch
    from megastream.profiling import profile_steps

    spec = dataclasses.replace(PRESETS["qwen2.5-7b"], num_layers=4, vocab_size=32768)
    store = HostStore(model_layout(spec), torch.bfloat16, torch.bfloat16, pin=True, master=False, states="bf16")
    store.init_random(0.02, seed=0)
    engine = Engine(spec, store, Config(engine=EngineConfig(activations="host")), torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(4):
        ids = torch.randint(0, spec.vocab_size, (2, 2048), generator=g)
        mbs.append(MicroBatch(ids, torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)))
    # only the checkpoints' copies (one micro-batch's layer input each, 29 MB), not the weights' or the
    # gradients' (which wait for the host optimizer at a step's start, with the GPU idle)
    s = profile_steps(engine, mbs, 1e-5, steps=2, copy_bytes={2 * 2048 * spec.hidden_size * 2})
    engine.close()
    store.close()
    print(s)
    assert s["d2h_s"] > 0 and s["h2d_s"] > 0  # the offload's copies were found in the trace
    assert s["d2h_hidden_fraction"] > 0.5 and s["h2d_hidden_fraction"] > 0.5


def test_gpu_memory_cap_gives_a_clear_error(tmp_path):
    from helpers import REPO, run_cli

    proc = run_cli("train", str(REPO / "configs" / "demo.yaml"), "--set", "model.preset=qwen2.5-0.5b",
                   "--set", "engine.device=cuda", "--set", "engine.gpu_memory_gb=1.5", "--set", "data.seq_len=512",
                   "--set", "train.warmup_steps=0", "--set", "train.min_lr=0", "--set", "train.lr=1e-5",
                   "--set", f"output.dir={tmp_path / 'run'}", "--force", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ran out of memory" in proc.stderr and "engine.gpu_memory_gb" in proc.stderr
    assert "Traceback" not in proc.stderr
