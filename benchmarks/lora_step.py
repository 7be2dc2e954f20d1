"""A LoRA step against a full fine-tuning step of the same model and tokens (issue 15: <= 0.75x on the CPU).

    python benchmarks/lora_step.py                       # a 4-layer Llama of width 512, CPU, rank 16 on all seven
    python benchmarks/lora_step.py --preset tiny         # the demo's width-128 model (rank 16 is 1/8 of its width)
    python benchmarks/lora_step.py --preset llama-3.2-1b --seq-len 1024 --micro-batch 2 --grad-accum 2
    python benchmarks/lora_step.py --preset wide-2048 --rounds 4 --steps 1   # Llama-3.2-1B's widths, one layer
    # on a GPU: QLoRA of four of Qwen2.5-72B's layers under a 24 GB cap, the GPU peak against the plan's
    python benchmarks/lora_step.py --device cuda --preset qwen2.5-72b --layers 4 --modes lora --base-dtype nf4 \
        --seq-len 4096 --micro-batch 1 --grad-accum 1 --gpu-memory-gb 24 --rounds 1 --steps 3

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


def _plan_budget(spec: ModelSpec, a, lora: LoraConfig | None):
    """megastream plan's memory budget of this run on cuda (its GPU peak, and the loss chunk it sizes
    into the free GPU memory, which the engine then uses as `megastream train` does)."""
    from megastream.config import DataConfig
    from megastream.plan import make_plan

    cfg = Config(data=DataConfig(seq_len=a.seq_len),
                 train=TrainConfig(micro_batch_size=a.micro_batch, grad_accum=a.grad_accum, grad_clip=1.0),
                 engine=EngineConfig(device="cuda", gpu_memory_gb=a.gpu_memory_gb), lora=lora)
    return make_plan(cfg, spec).budget


def _planned_gpu_bytes(b) -> int:
    """The plan's peak allocator bytes (its GPU figure minus the CUDA context, outside the allocator)."""
    from megastream.memory import CUDA_CONTEXT_DEVICE

    return b.gpu_total - CUDA_CONTEXT_DEVICE


def _check(a) -> None:
    """--check: what a run of these arguments would hold, without a GPU (the acceptance script's dry run)."""
    spec = SHAPES[a.preset] if not a.layers else dataclasses.replace(SHAPES[a.preset], num_layers=a.layers)
    lora = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=a.dropout, base_dtype=a.base_dtype)
    for mode in a.modes:
        line = f"{a.preset} ({spec.num_layers} layers, {count_params(spec) / 1e9:.2f}B params) {mode}"
        if a.device.startswith("cuda"):
            gb = _planned_gpu_bytes(_plan_budget(spec, a, lora if mode == "lora" else None)) / 1e9
            line += f": planned GPU peak {gb:.2f} GB" + (f" (cap {a.gpu_memory_gb:g} GB)" if a.gpu_memory_gb else "")
            if a.gpu_memory_gb and gb > a.gpu_memory_gb:
                raise SystemExit(f"{line}: over the cap")
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wide-512", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None,
                    help="keep only this many of the preset's layers (a 72B layer's widths on a short stack)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--base-dtype", default="auto", choices=["auto", "int8", "nf4"],
                    help="the LoRA run's frozen base: the compute dtype, or quantized (QLoRA)")
    ap.add_argument("--gpu-memory-gb", type=float, default=0.0, help="cap the process's GPU memory (cuda)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (0: torch's default; default: 1 on the CPU, torch's default on cuda, where "
                         "the full step's host AdamW needs the cores)")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    ap.add_argument("--check", action="store_true",
                    help="check the arguments and print the plan's GPU bytes per mode, run nothing (any machine)")
    a = ap.parse_args()
    if a.check:
        return _check(a)
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    threads = a.threads if a.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if a.gpu_memory_gb and device.type == "cuda":
        from megastream.train import limit_gpu_memory

        limit_gpu_memory(a.gpu_memory_gb, device)
    load_before = os.getloadavg()

    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    spec = SHAPES[a.preset]
    if a.layers:
        spec = dataclasses.replace(spec, num_layers=a.layers)
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(a.grad_accum):
        ids = torch.randint(0, spec.vocab_size, (a.micro_batch, a.seq_len), generator=g)
        mbs.append(MicroBatch(ids, torch.cat([ids[:, 1:], torch.full((a.micro_batch, 1), IGNORE)], 1)))
    quant = None if a.base_dtype == "auto" else a.base_dtype
    lora = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=a.dropout, base_dtype=a.base_dtype)
    pin = device.type == "cuda"

    stores, adapters, init_s = {}, None, {}
    for mode in a.modes:
        t = time.perf_counter()
        stores[mode] = HostStore(model_layout(spec), dtype, dtype, pin=pin, trainable=mode == "full",
                                 quant=quant if mode == "lora" else None)
        stores[mode].init_random(spec.initializer_range, seed=0)
        init_s[mode] = time.perf_counter() - t  # random init (and, for a quantized base, quantizing it)
        # progress, flushed: a run stopped at its timeout (gpu_acceptance.sh) shows how far it got
        print(f"init {mode}: {init_s[mode]:.1f} s (host store, random weights"
              + (f", {quant} quantization" if quant and mode == "lora" else "") + ")", flush=True)
    adapters = LoraAdapters(spec, LORA_TARGETS, rank=a.rank, alpha=lora.alpha, dropout=a.dropout, rslora=False,
                            device=device, seed=0)
    adapters.init_default()
    plans = {m: _plan_budget(spec, a, lora if m == "lora" else None) for m in a.modes} if device.type == "cuda" else {}
    times = {m: [] for m in a.modes}  # (wall, cpu) per timed step
    gpu_peak = {}
    for r in range(a.rounds):  # full, lora, lora, full, ...: both modes see the same (shared, drifting) machine
        for mode in a.modes[::1 if r % 2 == 0 else -1]:
            cfg = Config(train=TrainConfig(grad_clip=1.0, weight_decay=0.0), engine=EngineConfig(),
                         lora=lora if mode == "lora" else None)
            chunk = None  # the CPU: the automatic loss chunk, as `megastream train` there
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                chunk = plans[mode].chunk_tokens
            engine = Engine(spec, stores[mode], cfg, device, adapters=adapters if mode == "lora" else None,
                            chunk_tokens=chunk)
            steps = [_timed_step(engine, mbs) for _ in range(a.steps + 1)]
            times[mode] += steps[1:]  # the first is warm-up
            engine.close()  # its optimizer thread (and that thread's OpenMP team) ends here
            if device.type == "cuda":
                gpu_peak[mode] = max(gpu_peak.get(mode, 0), torch.cuda.max_memory_allocated(device))
            print(f"round {r + 1}/{a.rounds} {mode}: steps " + ", ".join(f"{w:.3f}" for w, _ in steps)
                  + " s (the first a warm-up)", flush=True)
            # what is measured so far, in case the run is stopped before its end (rewritten at the end)
            _write(a, {"partial": "written after each mode's steps; the whole result replaces it at the end",
                       "preset": a.preset, "layers": spec.num_layers, "init_s": init_s,
                       "step_times_s": {m: [t[0] for t in v] for m, v in times.items()},
                       "gpu_peak_bytes": gpu_peak})
    host_store = {m: sum(s.breakdown().values()) for m, s in stores.items()}
    for store in stores.values():
        store.close()
    tokens = a.micro_batch * a.grad_accum * a.seq_len
    from megastream.machine import cpu_name

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
              "torch_version": torch.__version__, "threads": torch.get_num_threads(), "preset": a.preset,
              "layers": spec.num_layers, "params": count_params(spec), "dtype": str(dtype), "tokens_per_step": tokens,
              "rank": a.rank, "dropout": a.dropout, "base_dtype": a.base_dtype, "adapter_params": adapters.numel,
              "rounds": a.rounds, "init_s": init_s, "host_store_bytes": host_store,
              "gpu_memory_gb": a.gpu_memory_gb or None,
              "step_times_s": {m: [t[0] for t in v] for m, v in times.items()},
              "step_cpu_s": {m: [t[1] for t in v] for m, v in times.items()}}
    for mode in a.modes:
        wall = statistics.median(t[0] for t in times[mode])
        result[f"{mode}_tokens_per_s"] = tokens / wall
        if device.type == "cuda":
            planned = _planned_gpu_bytes(plans[mode])
            result[f"{mode}_gpu_peak_bytes"], result[f"{mode}_planned_gpu_bytes"] = gpu_peak[mode], planned
            result[f"{mode}_loss_chunk_tokens"] = plans[mode].chunk_tokens
            print(f"{mode}: {tokens / wall:,.0f} tokens/s, GPU peak {gpu_peak[mode] / 1e9:.2f} GB allocated, "
                  f"planned {planned / 1e9:.2f} GB ({planned / gpu_peak[mode]:.2f}x), host store "
                  f"{host_store[mode] / 1e9:.2f} GB, init {init_s[mode]:.1f} s")
    if len(a.modes) < 2:
        return _write(a, result)
    result["load_avg_1min"] = [load_before[0], os.getloadavg()[0]]  # other processes stretch wall times

    med = {m: [statistics.median(t[j] for t in times[m]) for j in (0, 1)] for m in times}  # [wall, cpu]
    ratio_wall, ratio_cpu = (med["lora"][j] / med["full"][j] for j in (0, 1))
    # the fastest step of each mode: a neighbour on a shared machine only ever slows a step down (on SMT
    # siblings it inflates CPU time too), so the minima are the least disturbed estimate of the work
    least = {m: [min(t[j] for t in times[m]) for j in (0, 1)] for m in times}
    ratio_cpu_min = least["lora"][1] / least["full"][1]
    result.update({"full_step_s": med["full"][0], "lora_step_s": med["lora"][0], "ratio": ratio_wall,
                   "full_step_cpu_s": med["full"][1], "lora_step_cpu_s": med["lora"][1], "ratio_cpu": ratio_cpu,
                   "full_step_cpu_min_s": least["full"][1], "lora_step_cpu_min_s": least["lora"][1],
                   "ratio_cpu_min": ratio_cpu_min})
    print(f"{a.preset} on {result['device']} ({result['threads']} thread(s)), {tokens} tokens/step, medians of "
          f"{len(times['full'])} steps: full fine-tuning {med['full'][0]:.3f} s/step ({med['full'][1]:.3f} s CPU), "
          f"LoRA r={a.rank} on all seven projections {med['lora'][0]:.3f} s/step ({med['lora'][1]:.3f} s CPU); "
          f"ratio {ratio_wall:.2f} (CPU time {ratio_cpu:.2f}; fastest steps' CPU time {ratio_cpu_min:.2f})")
    _write(a, result)


def _write(a, result: dict) -> None:
    """Whole or not at all: a temp file, then a rename."""
    if a.json:
        tmp = f"{a.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
