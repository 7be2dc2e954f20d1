"""LoRA and QLoRA on CUDA (issue 15's GPU checks): the same adapter steps as on the CPU, the packed
int8 / NF4 layers dequantized on the device bit for bit as on the host, and the plan's GPU peak
against the allocator's. Skipped without CUDA (`pytest -m gpu`, scripts/gpu_acceptance.sh)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import assert_close_normwise
from megastream.adapters.lora import LoraAdapters
from megastream.config import LORA_TARGETS, Config, EngineConfig, LoraConfig, TrainConfig
from megastream.engine.engine import Engine
from megastream.model.layout import model_layout
from megastream.presets import PRESETS
from megastream.store import HostStore
from test_gpu import _no_tf32, _preset_cfg  # noqa: F401 (an autouse fixture: fp32 matmuls stay fp32)
from test_lora import ALPHA, RANK, _batches, _spec

pytestmark = pytest.mark.gpu


def _lora_engine(spec, device: str, scheme: str | None):
    """A frozen fp32 base (quantized at `scheme`) with non-zero adapters, clipping and weight decay on."""
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=device == "cuda", trainable=False,
                      quant=scheme)
    store.init_random(0.2, seed=3)
    ad = LoraAdapters(spec, LORA_TARGETS, rank=RANK, alpha=ALPHA, dropout=0.0, rslora=False,
                      device=torch.device(device), seed=0)
    ad.params.copy_(torch.randn(ad.numel, generator=torch.Generator().manual_seed(7)) * 0.3)  # H2D on cuda
    cfg = Config(train=TrainConfig(grad_clip=0.5, weight_decay=0.1), engine=EngineConfig(loss_chunk_tokens=5),
                 lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=LORA_TARGETS))
    return store, ad, Engine(spec, store, cfg, torch.device(device), adapters=ad)


@pytest.mark.parametrize("scheme", [None, "nf4", "int8"], ids=["fp32-base", "nf4-base", "int8-base"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied+bias"])
def test_lora_cuda_fp32_matches_cpu(tied, scheme):
    """Three LoRA steps on cuda (the base streamed from pinned arenas, packed layers dequantized on the
    device, adapters and their AdamW on the device) and on the CPU: same losses, norms and adapters."""
    spec = _spec(tied)
    runs = [_lora_engine(spec, d, scheme) for d in ("cpu", "cuda")]
    for step in range(3):
        mbs = _batches(spec, M=2, B=2, S=9, seed=step)
        a, b = (eng.step(mbs, lr=1e-2) for _, _, eng in runs)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    # Tolerance: fp32 rounding of another summation order (cuBLAS vs the CPU's GEMMs), accumulated over
    # a micro-batch's tokens and the MLP width (the longest sums behind an adapter's gradient)
    n = 2 * 9 * spec.intermediate_size
    assert_close_normwise(runs[1][1].params.cpu(), runs[0][1].params, n_terms=n, msg="adapters after 3 steps")
    for store, _, eng in runs:
        eng.close()
        store.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_packed_layer_dequantizes_on_cuda_as_on_the_host(scheme, dtype):
    """What the engine streams (a layer's packed buffer) unpacks on the device to exactly the host's
    result: the dequantization is a table lookup and elementwise IEEE operations, no reduction."""
    spec = dataclasses.replace(PRESETS["qwen2.5-0.5b"], num_layers=1)
    store = HostStore(model_layout(spec), dtype, dtype, pin=True, trainable=False, quant=scheme)
    store.init_random(0.02, seed=0)
    u = next(iter(store.packing))
    n = store.units[u].numel
    host = torch.empty(n, dtype=dtype)
    store.unpack(u, store.packed_of(u), host)
    dev = torch.empty(n, dtype=dtype, device="cuda")
    store.unpack(u, store.packed_of(u).cuda(), dev)  # H2D: the packed bytes, as the engine's slot holds them
    assert torch.equal(dev.cpu(), host)
    store.close()


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_plan_predicts_lora_gpu_peak_within_15_percent(tmp_path, base):
    """`megastream train` of qwen2.5-0.5b with rank-16 adapters on all seven projections (bf16 or NF4
    base): the plan's allocator bytes against the measured peak (as test_gpu does for full fine-tuning)."""
    from megastream.memory import CUDA_CONTEXT_DEVICE
    from megastream.plan import make_plan
    from megastream.resolve import model_spec
    from megastream.train import train

    cfg = _preset_cfg(tmp_path, "lora.rank=16", "lora.alpha=32", f"lora.base_dtype={base}")
    planned = make_plan(cfg, model_spec(cfg)).budget.gpu_total - CUDA_CONTEXT_DEVICE  # allocator bytes only
    recs = train(cfg, log=lambda *a: None)
    peak = max(r["gpu_peak_gb"] for r in recs) * 1e9
    print(f"LoRA, {base} base: planned {planned / 1e9:.2f} GB, measured peak {peak / 1e9:.2f} GB")
    steps = [r for r in recs if "d2h_bytes" in r]
    assert steps and all(r["d2h_bytes"] == 0 < r["h2d_bytes"] for r in steps)  # the base goes in, nothing back
    assert abs(planned - peak) <= 0.15 * peak
