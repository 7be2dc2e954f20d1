"""Step time, tokens/s and peak memory of megastream on a random-init preset.

    python benchmarks/step_time.py --preset llama-3.2-1b --seq-len 1024 --micro-batch 4 --grad-accum 4 --steps 6
    python benchmarks/step_time.py --preset tiny --device cpu --json out.json

Timed steps exclude the first (warm-up: allocator, kernels); reports the median. This measures
the engine as it stands; the head-to-head with other systems lives in benchmarks/throughput.py
once it exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psutil
import torch

from megastream.config import Config, EngineConfig, TrainConfig
from megastream.engine.engine import Engine, MicroBatch
from megastream.engine.loss import IGNORE
from megastream.model.layout import count_params, model_layout
from megastream.presets import PRESETS
from megastream.store import HostStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b", choices=list(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    a = ap.parse_args()

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    spec = PRESETS[a.preset]
    t0 = time.perf_counter()
    store = HostStore(model_layout(spec), dtype, dtype, pin=device.type == "cuda")
    store.init_random(spec.initializer_range, seed=0)
    init_s = time.perf_counter() - t0
    cfg = Config(train=TrainConfig(grad_clip=a.grad_clip), engine=EngineConfig())
    engine = Engine(spec, store, cfg, device)
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(a.grad_accum):
        ids = torch.randint(0, spec.vocab_size, (a.micro_batch, a.seq_len), generator=g)
        mbs.append(MicroBatch(ids, torch.cat([ids[:, 1:], torch.full((a.micro_batch, 1), IGNORE)], 1)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        losses.append(engine.step(mbs, lr=1e-5).loss)  # ends in a device sync
        times.append(time.perf_counter() - t)
    engine.close()
    tokens = a.micro_batch * a.grad_accum * a.seq_len
    med = statistics.median(times[1:] if len(times) > 1 else times)
    n = count_params(spec)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__, "preset": a.preset, "params": n, "dtype": str(dtype),
        "tokens_per_step": tokens, "step_time_s": med, "tokens_per_s": tokens / med,
        "model_tflops": 6 * n * tokens / med / 1e12, "init_s": init_s,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0,
        "peak_host_rss_gb": psutil.Process().memory_info().rss / 1e9, "host_store_gb": store.host_bytes() / 1e9,
        "step_times_s": times, "losses": losses,
    }
    print(f"{a.preset} on {result['device']}: {med:.3f} s/step, {result['tokens_per_s']:.0f} tokens/s, "
          f"{result['model_tflops']:.1f} model TFLOP/s, peak GPU {result['peak_gpu_gb']:.2f} GB, "
          f"host RSS {result['peak_host_rss_gb']:.1f} GB (store {result['host_store_gb']:.1f} GB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    store.close()


if __name__ == "__main__":
    main()
