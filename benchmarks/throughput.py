"""Head-to-head training throughput on one GPU: megastream vs DeepSpeed ZeRO-3 offload vs FSDP2
offload, same model shape, tokens per step, sequence length and GPU memory cap, in one invocation.

    python benchmarks/throughput.py --model qwen2.5-7b --seq-len 1024 --micro-batch-size 4 \\
        --grad-accum 4 --gpu-memory-gb 24 --systems megastream:lean megastream:compact deepspeed fsdp2 \\
        --json benchmarks/results/<date>-<device>-qwen2.5-7b.json

Each system runs in its own subprocess (a crash, a GPU OOM or the kernel's OOM killer is a result,
not the end of the benchmark). Per system: tokens/s (median of the timed steps after warm-up), model
TFLOP/s (6 * N * tokens/s: no credit for recompute), MFU against the bf16 matmul rate measured in
this run, peak GPU memory (torch allocator), peak host RSS, the spread of step times, and a status:
ok | oom-gpu | oom-host | error (with its message).

The same run measures megastream's roofline inputs (pinned H2D/D2H bandwidth, bf16 matmul rate, host
memory bandwidth, the fused optimizer's rate per mode) and prints each megastream mode's bound
(DESIGN.md) and the fraction of it achieved.

Baselines, both on the `transformers` model of the same shape with gradient checkpointing, bf16
compute, the same micro-batch and accumulation:
  deepspeed  ZeRO stage 3, offload_param and offload_optimizer to pinned CPU memory, DeepSpeedCPUAdam
             (chosen by DeepSpeed for an offloaded AdamW), gradient clipping 1.0
  fsdp2      fully_shard per decoder layer and the root, CPUOffloadPolicy(pin_memory=True),
             MixedPrecisionPolicy(bf16 params, fp32 reduce), CPU torch.optim.AdamW(fused=True),
             clip_grad_norm_ 1.0

`--device cpu` runs the harness end to end on the CPU with a small preset (a smoke test of the
baselines' setup code; no offload policies there, DeepSpeed reports that it needs CUDA).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ---- workers (one per subprocess) ------------------------------------------------------------------
def _cap_gpu(a) -> None:
    import torch

    if a.device == "cuda" and a.gpu_memory_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_memory_gb * 1e9 / total), 0)


def _batches(a, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (a.micro_batch_size, a.seq_len), generator=g) for _ in range(a.grad_accum)]


def _timed(a, step) -> dict:
    """Run warm-up + timed steps of `step()` (which must end synchronised); per-step seconds."""
    times = []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    return {"step_times_s": times}


def megastream_config(a, mode: str):
    """The megastream Config a run of this harness uses for `mode` (full | lean | compact)."""
    from megastream.config import build_config
    from megastream.resolve import MODES

    master, states = MODES[mode]
    return build_config({
        "model": {"preset": a.model}, "data": {"path": str(REPO / "megastream" / "demo" / "corpus.jsonl"),
                                               "seq_len": a.seq_len, "pack": False},
        "train": {"micro_batch_size": a.micro_batch_size, "grad_accum": a.grad_accum, "lr": 1e-5, "grad_clip": 1.0},
        "optim": {"master": master, "states": states},
        "engine": {"device": a.device, "gpu_memory_gb": a.gpu_memory_gb, "activations": a.activations,
                   "dtype": "bfloat16"},
    })


def worker_megastream(a, mode: str) -> dict:
    import torch

    from megastream.engine.engine import Engine, MicroBatch
    from megastream.resolve import model_spec
    from megastream.train import build_model, cap_gpu_memory

    cfg = megastream_config(a, mode)
    device = torch.device(a.device)
    cap_gpu_memory(cfg, device)
    spec = model_spec(cfg)
    t0 = time.perf_counter()
    model = build_model(cfg, spec, device)
    init_s = time.perf_counter() - t0
    engine = Engine(spec, model.store, cfg, device)
    mbs = [MicroBatch(ids, torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1))
           for ids in _batches(a, spec.vocab_size)]

    def step():
        engine.step(mbs, 1e-5)  # ends with a device sync (loss, norm); updates overlap the next forward

    out = _timed(a, step)
    engine.worker.wait_all()
    if a.device == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    if a.profile and a.device == "cuda":
        from megastream.profiling import profile_steps

        out["overlap"] = profile_steps(engine, mbs, 1e-5, steps=2)
    engine.close()
    model.store.close()
    out.update(params=model.store.numel, init_s=init_s)
    return out


def _hf_config(a):
    import transformers

    from megastream.presets import PRESETS

    d = PRESETS[a.model].to_hf_config("bfloat16")
    d.pop("architectures", None)
    d.pop("torch_dtype", None)
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    cfg.use_cache = False
    return cfg


def _dist_env() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)


def worker_deepspeed(a) -> dict:
    if a.device != "cuda":
        raise RuntimeError("DeepSpeed ZeRO-3 offload needs CUDA")
    import deepspeed
    import torch
    import transformers

    _dist_env()
    _cap_gpu(a)
    deepspeed.init_distributed(dist_backend="nccl")
    ds = {
        "train_micro_batch_size_per_gpu": a.micro_batch_size, "gradient_accumulation_steps": a.grad_accum,
        "bf16": {"enabled": True}, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                              "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "overlap_comm": True, "contiguous_gradients": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.0}},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    hf = _hf_config(a)
    t0 = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=ds, remote_device="cpu", pin_memory=True, dtype=torch.bfloat16):
        model = transformers.AutoModelForCausalLM.from_config(hf, torch_dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    init_s = time.perf_counter() - t0
    batches = [b.cuda() for b in _batches(a, hf.vocab_size)]

    def step():
        for ids in batches:  # DeepSpeed steps the optimizer at the accumulation boundary
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        torch.cuda.synchronize()

    out = _timed(a, step)
    out.update(params=sum(p.ds_numel for p in model.parameters()), init_s=init_s,
               peak_gpu_bytes=torch.cuda.max_memory_allocated())
    return out


def worker_fsdp2(a) -> dict:
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    _dist_env()
    cuda = a.device == "cuda"
    _cap_gpu(a)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(0)
    hf = _hf_config(a)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf, torch_dtype=torch.float32)  # fp32 master on the host
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    if cuda:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if cuda:  # buffers (rotary inv_freq) are not FSDP's: put them where compute runs
        for mod in model.modules():
            for name, buf in list(mod.named_buffers(recurse=False)):
                mod.register_buffer(name, buf.cuda(), persistent=False)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                fused=True)
        fused = True
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        fused = False
    init_s = time.perf_counter() - t0
    batches = [b.to(a.device) for b in _batches(a, hf.vocab_size)]

    def step():
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    out = _timed(a, step)
    out.update(params=sum(p.numel() for p in model.parameters()), init_s=init_s, fused_adamw=fused)
    if cuda:
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    dist.destroy_process_group()
    return out


def worker_roofline(a) -> dict:
    import torch

    from megastream.probe import run_probe

    cuda = a.device == "cuda"
    rec = run_probe(torch.device(a.device), log=lambda *_: None, optimizer_params=(64 if cuda else 4) * 2**20,
                    host_bytes=2**30 if cuda else 2**28)
    return {"h2d_gbps": 0.0, "d2h_gbps": 0.0} | rec


def run_worker(a) -> None:
    """Subprocess entry: run one system, write its result (or its failure) as JSON to a.out."""
    res: dict = {"status": "ok"}
    try:
        if a.worker == "roofline":
            res.update(worker_roofline(a))
        elif a.worker.startswith("megastream:"):
            res.update(worker_megastream(a, a.worker.split(":", 1)[1]))
        elif a.worker == "deepspeed":
            res.update(worker_deepspeed(a))
        elif a.worker == "fsdp2":
            res.update(worker_fsdp2(a))
        else:
            raise ValueError(f"unknown system {a.worker}")
    except BaseException as e:  # classify, never crash the harness
        import torch

        text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        oom_gpu = isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e)
        res = {"status": "oom-gpu" if oom_gpu else "oom-host" if isinstance(e, MemoryError) else "error",
               "message": text[:500], "traceback": traceback.format_exc()[-3000:]}
    res["peak_host_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(a.out).write_text(json.dumps(res))


# ---- the harness -----------------------------------------------------------------------------------
def _spawn(a, system: str, tmp: Path) -> dict:
    out = tmp / f"{system.replace(':', '_')}.json"
    cmd = [sys.executable, __file__, "--worker", system, "--out", str(out)] + a.passthrough
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "error", "message": f"timed out after {a.timeout} s"}
    if out.exists():
        res = json.loads(out.read_text())
    elif proc.returncode in (-9, 137):  # SIGKILL without a result: the kernel's OOM killer
        res = {"status": "oom-host", "message": "killed (SIGKILL), most likely by the kernel's OOM killer"}
    else:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        res = {"status": "error", "message": tail[0][:500]}
    res["wall_s"] = time.perf_counter() - t
    if res["status"] != "ok" and proc.stderr:
        res["stderr_tail"] = proc.stderr[-2000:]
    return res


def _device_name(device: str) -> str:
    import torch

    from megastream.probe import device_name

    return device_name(torch.device(device))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-7b", help="a megastream preset (megastream/presets.py)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per system")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gpu-memory-gb", type=float, default=24.0, help="cap per process (0: the whole GPU)")
    ap.add_argument("--activations", choices=["device", "host"], default="device", help="megastream only")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--systems", nargs="+", default=["megastream:lean", "megastream:compact", "deepspeed", "fsdp2"])
    ap.add_argument("--profile", action="store_true", help="also profile megastream's overlap (torch.profiler)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per system")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        run_worker(a)
        return 0
    a.passthrough = ["--model", a.model, "--seq-len", str(a.seq_len), "--micro-batch-size", str(a.micro_batch_size),
                     "--grad-accum", str(a.grad_accum), "--steps", str(a.steps), "--warmup", str(a.warmup),
                     "--gpu-memory-gb", str(a.gpu_memory_gb), "--activations", a.activations, "--device", a.device]
    if a.profile:
        a.passthrough.append("--profile")

    import torch

    from megastream.memory import budget
    from megastream.model.layout import count_params
    from megastream.plan import Rates, roofline
    from megastream.presets import PRESETS

    spec = PRESETS[a.model]
    n = count_params(spec)
    tokens = a.micro_batch_size * a.grad_accum * a.seq_len
    print(f"{a.model}: {n / 1e9:.2f}B params | {tokens} tokens/step = {a.micro_batch_size} x {a.grad_accum} x "
          f"{a.seq_len} | GPU cap {a.gpu_memory_gb:g} GB | {_device_name(a.device)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        roof = _spawn(a, "roofline", Path(tmp))
        if roof["status"] != "ok":
            print(f"roofline measurement failed: {roof.get('message')}")
            return 1
        print(f"roofline inputs: H2D {roof['h2d_gbps']:.1f} GB/s, D2H {roof['d2h_gbps']:.1f} GB/s, bf16 matmul "
              f"{roof['matmul_tflops']:.1f} TFLOP/s, host {roof['host_gbps']:.1f} GB/s, optimizer "
              + ", ".join(f"{k} {v:.2f}" for k, v in roof["optimizer_ns_per_param"].items()) + " ns/param", flush=True)
        rates = Rates(h2d_gbps=roof["h2d_gbps"], d2h_gbps=roof["d2h_gbps"], matmul_tflops=roof["matmul_tflops"],
                      host_gbps=roof["host_gbps"], optimizer_ns_per_param=roof["optimizer_ns_per_param"],
                      source="measured in this run")
        systems = []
        for system in a.systems:
            r = _spawn(a, system, Path(tmp))
            row = {"name": system, "status": r["status"], "message": r.get("message"),
                   "peak_host_gb": r.get("peak_host_bytes", 0) / 1e9 or None,
                   "peak_gpu_gb": r["peak_gpu_bytes"] / 1e9 if "peak_gpu_bytes" in r else None}
            if r["status"] == "ok":
                times = r["step_times_s"]
                med = statistics.median(times)
                row.update(tokens_per_s=tokens / med, step_s=med, step_times_s=times,
                           step_spread=max(abs(t / med - 1) for t in times),
                           tflops=6 * n * tokens / med / 1e12, init_s=r.get("init_s"))
                row["mfu"] = row["tflops"] / roof["matmul_tflops"]
                if system.startswith("megastream:"):
                    cfg = megastream_config(a, system.split(":", 1)[1])
                    b = budget(cfg, spec, a.device, torch.bfloat16, torch.bfloat16, 0)
                    bound = roofline(cfg, spec, b, rates)
                    row.update(bound_s=bound.step_s, bound=bound.bound, achieved_fraction=bound.step_s / med)
                    if "overlap" in r:
                        row["overlap"] = r["overlap"]
            else:
                row.update(tokens_per_s=None, tflops=None, mfu=None)
            systems.append(row)
            _print_row(row)
    _print_ratios(systems)
    if a.json:
        mega = [s for s in systems if s.get("bound_s")]
        best = max(mega, key=lambda s: s["tokens_per_s"]) if mega else None
        doc = {"device": _device_name(a.device), "date": datetime.date.today().isoformat(),
               "torch_version": torch.__version__, "model": a.model, "params": n, "tokens_per_step": tokens,
               "seq_len": a.seq_len, "micro_batch_size": a.micro_batch_size, "grad_accum": a.grad_accum,
               "gpu_memory_gb": a.gpu_memory_gb, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               "systems": systems,
               "roofline": {"h2d_gbps": roof["h2d_gbps"], "d2h_gbps": roof["d2h_gbps"],
                            "matmul_tflops": roof["matmul_tflops"], "host_gbps": roof["host_gbps"],
                            "optimizer_ns_per_param": roof["optimizer_ns_per_param"],
                            "bound_s": best["bound_s"] if best else None,
                            "achieved_fraction": best["achieved_fraction"] if best else None}}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=2))
    return 0


def _print_row(r: dict) -> None:
    mem = (f"GPU {r['peak_gpu_gb']:.1f} GB, " if r.get("peak_gpu_gb") else "") + \
        (f"host {r['peak_host_gb']:.1f} GB" if r.get("peak_host_gb") else "")
    if r["status"] != "ok":
        print(f"  {r['name']:<20} {r['status']}: {r.get('message')} ({mem})", flush=True)
        return
    line = (f"  {r['name']:<20} {r['tokens_per_s']:10,.0f} tok/s  {r['tflops']:7.1f} TFLOP/s  MFU {r['mfu']:6.1%}  "
            f"step {r['step_s']:.2f} s (spread {r['step_spread']:.0%})  {mem}")
    if "bound_s" in r:
        line += f"  | bound {r['bound_s']:.2f} s ({r['bound']}), {r['achieved_fraction']:.0%} of it"
    if "overlap" in r:
        o = r["overlap"]
        line += (f"\n      overlap: compute busy {o['compute_busy_fraction']:.0%} of the GPU timeline; H2D "
                 f"{o['h2d_hidden_fraction']:.0%} hidden, D2H {o['d2h_hidden_fraction']:.0%} hidden")
    print(line, flush=True)


def _print_ratios(systems: list[dict]) -> None:
    ok = {s["name"]: s for s in systems if s["status"] == "ok"}
    mega = [s for n, s in ok.items() if n.startswith("megastream:")]
    if not mega:
        return
    best = max(mega, key=lambda s: s["tokens_per_s"])
    for base in ("deepspeed", "fsdp2"):
        if base in ok:
            print(f"{best['name']} / {base}: {best['tokens_per_s'] / ok[base]['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    sys.exit(main())
