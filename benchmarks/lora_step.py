"""A LoRA step against a full fine-tuning step of the same model and tokens (issue 15: <= 0.75x on the CPU).

    python benchmarks/lora_step.py                       # a 4-layer Llama of width 512, CPU, rank 16 on all seven
    python benchmarks/lora_step.py --preset tiny         # the demo's width-128 model (rank 16 is 1/8 of its width)
    python benchmarks/lora_step.py --preset llama-3.2-1b --seq-len 1024 --micro-batch 2 --grad-accum 2

The full step is forward + recompute + input and weight gradients + head and embedding gradients +
the host AdamW over every parameter; the LoRA step drops the weight gradients, the D2H copies and
the host optimizer, and adds the adapters' small matmuls and their AdamW on the device. The modes run
in `--rounds` alternating rounds (full, lora, lora, full, ...) of `--steps` timed steps after one
warm-up step each, so that both see the same machine; a full step's time includes its host update
(on the CPU the update competes with the next forward for the same cores anyway). Prints the median
step times (wall and CPU) and their ratios. One thread by default: on a shared machine, OpenMP's
barriers make multi-threaded timings of a step of many small ops (LoRA's) depend on the neighbours
more than on the code, and CPU time then measures the work itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import time

import torch

from megastream.adapters.lora import LoraAdapters
from megastream.config import LORA_TARGETS, Config, EngineConfig, LoraConfig, TrainConfig
from megastream.engine.engine import Engine, MicroBatch
from megastream.engine.loss import IGNORE
from megastream.model.layout import count_params, model_layout
from megastream.model.spec import ModelSpec
from megastream.presets import PRESETS

# The default: the demo's tiny model widened to 512 (rank 16 is then 1/32 of the width, as 128 is of
# a 4096-wide 8B model), small enough for a few full fine-tuning steps on a 2-core CPU.
SHAPES: dict[str, ModelSpec] = {
    "wide-512": dataclasses.replace(PRESETS["tiny"], hidden_size=512, intermediate_size=1408, num_heads=8,
                                    num_kv_heads=4, head_dim=64, vocab_size=8192),
    "wide-1024": dataclasses.replace(PRESETS["tiny"], hidden_size=1024, intermediate_size=2816, num_heads=16,
                                     num_kv_heads=8, head_dim=64, vocab_size=8192, num_layers=2),
    # Llama-3.2-1B's widths (2048 / 5632, head_dim 128), one layer: matmuls take the share of the step
    # they take in the models LoRA is used on (the non-matmul work per token grows with the width, the
    # matmuls with its square)
    "wide-2048": dataclasses.replace(PRESETS["tiny"], hidden_size=2048, intermediate_size=5632, num_heads=16,
                                     num_kv_heads=8, head_dim=128, vocab_size=8192, num_layers=1),
    **PRESETS,
}
from megastream.store import HostStore


def _timed_step(engine: Engine, mbs: list[MicroBatch]) -> tuple[float, float]:
    """(wall, CPU) seconds of one step: CPU time of every thread of the process (the host optimizer's too)."""
    t, c = time.perf_counter(), time.process_time()
    engine.step(mbs, lr=1e-5)  # ends in a device sync
    engine.worker.wait_all()  # full fine-tuning: the host updates belong to the step
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wide-512", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    spec = SHAPES[a.preset]
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(a.grad_accum):
        ids = torch.randint(0, spec.vocab_size, (a.micro_batch, a.seq_len), generator=g)
        mbs.append(MicroBatch(ids, torch.cat([ids[:, 1:], torch.full((a.micro_batch, 1), IGNORE)], 1)))
    lora = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=a.dropout)
    pin = device.type == "cuda"

    stores, adapters = {}, None
    for mode in ("full", "lora"):
        stores[mode] = HostStore(model_layout(spec), dtype, dtype, pin=pin, trainable=mode == "full")
        stores[mode].init_random(spec.initializer_range, seed=0)
    adapters = LoraAdapters(spec, LORA_TARGETS, rank=a.rank, alpha=lora.alpha, dropout=a.dropout, rslora=False,
                            device=device, seed=0)
    adapters.init_default()
    times = {"full": [], "lora": []}  # (wall, cpu) per timed step
    for r in range(a.rounds):  # full, lora, lora, full, ...: both modes see the same (shared, drifting) machine
        for mode in ("full", "lora")[::1 if r % 2 == 0 else -1]:
            cfg = Config(train=TrainConfig(grad_clip=1.0, weight_decay=0.0), engine=EngineConfig(),
                         lora=lora if mode == "lora" else None)
            engine = Engine(spec, stores[mode], cfg, device, adapters=adapters if mode == "lora" else None)
            steps = [_timed_step(engine, mbs) for _ in range(a.steps + 1)]
            times[mode] += steps[1:]  # the first is warm-up
            engine.close()  # its optimizer thread (and that thread's OpenMP team) ends here
    for store in stores.values():
        store.close()

    med = {m: [statistics.median(t[j] for t in times[m]) for j in (0, 1)] for m in times}  # [wall, cpu]
    tokens = a.micro_batch * a.grad_accum * a.seq_len
    ratio_wall, ratio_cpu = (med["lora"][j] / med["full"][j] for j in (0, 1))
    # the fastest step of each mode: a neighbour on a shared machine only ever slows a step down (on SMT
    # siblings it inflates CPU time too), so the minima are the least disturbed estimate of the work
    least = {m: [min(t[j] for t in times[m]) for j in (0, 1)] for m in times}
    ratio_cpu_min = least["lora"][1] / least["full"][1]
    from megastream.machine import cpu_name

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
              # 1-minute load average before and after: other processes on a shared machine stretch
              # wall times (the CPU times measure the work itself)
              "load_avg_1min": [load_before[0], os.getloadavg()[0]],
              "torch_version": torch.__version__, "threads": torch.get_num_threads(), "preset": a.preset,
              "params": count_params(spec), "dtype": str(dtype), "tokens_per_step": tokens, "rank": a.rank,
              "dropout": a.dropout, "adapter_params": adapters.numel, "rounds": a.rounds,
              "full_step_s": med["full"][0], "lora_step_s": med["lora"][0], "ratio": ratio_wall,
              "full_step_cpu_s": med["full"][1], "lora_step_cpu_s": med["lora"][1], "ratio_cpu": ratio_cpu,
              "full_step_cpu_min_s": least["full"][1], "lora_step_cpu_min_s": least["lora"][1],
              "ratio_cpu_min": ratio_cpu_min,
              "step_times_s": {m: [t[0] for t in v] for m, v in times.items()},
              "step_cpu_s": {m: [t[1] for t in v] for m, v in times.items()}}
    print(f"{a.preset} on {result['device']} ({result['threads']} thread(s)), {tokens} tokens/step, medians of "
          f"{len(times['full'])} steps: full fine-tuning {med['full'][0]:.3f} s/step ({med['full'][1]:.3f} s CPU), "
          f"LoRA r={a.rank} on all seven projections {med['lora'][0]:.3f} s/step ({med['lora'][1]:.3f} s CPU); "
          f"ratio {ratio_wall:.2f} (CPU time {ratio_cpu:.2f}; "
          f"fastest steps' CPU time {ratio_cpu_min:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
