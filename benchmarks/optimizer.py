"""The host optimizer step, side by side on the same buffers: the best plain-PyTorch pipeline
against each megastream mode (csrc/adamw.cpp), plus this machine's memory bandwidth.

    python benchmarks/optimizer.py                       # 275M (one Qwen2.5-14B layer) and 4M params
    python benchmarks/optimizer.py --sizes 46.8e6 --json out.json

The torch pipeline is what a user would write with stock PyTorch: cast the bf16 gradient to fp32,
`torch.optim.AdamW(fused=True)` on fp32 weights/moments, copy the fp32 weights to the bf16 working
copy. Logical bytes per parameter (each input read once, each output written once):

    torch pipeline                     2+4 (cast) + 16+12 (AdamW) + 4+2 (copy)   = 40
    master fp32, states fp32           g 2 + p,m,v 12 read + p,m,v 12 + working 2 = 28
    master fp32, states bf16           2 + 4+2+2 + 4+2+2 + 2                      = 20
    no master (bf16 + SR), states bf16 2 + 2+2+2 + 2+2+2                          = 14
    no master (bf16 + SR), states int8 2 + 2+1+1 + 2+1+1 (+ 2 fp32 scales / 256)  ~ 10

Bandwidth is an in-place triad over two 1 GiB arrays (bytes read + bytes written over time), the
same read-modify-write pattern as the optimizer. Each figure is the median of --repeats timed runs
after one warm-up; ratios compare runs taken in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from megastream import ops
from megastream.probe import measure_host_bandwidth as measure_bandwidth
from megastream.probe import time_optimizer
from megastream.probe import timeit as _timeit

HP = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
MODES = [  # name, master fp32?, states, logical bytes per parameter, host bytes per parameter (model state)
    ("fp32-master+fp32-states", True, "fp32", 28, 14),
    ("fp32-master+bf16-states", True, "bf16", 20, 10),
    ("bf16-sr+bf16-states", False, "bf16", 14, 6),
    ("bf16-sr+int8-states", False, "int8", 10 + 8 / 256, 4 + 8 / 256),
]


def _rand(n: int, dtype: torch.dtype, scale: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) * 2 - 1).mul_(scale).to(dtype)


def bench_torch(n: int, repeats: int, g: torch.Generator) -> float:
    p = _rand(n, torch.float32, 0.05, g)
    grad_bf16 = _rand(n, torch.bfloat16, 1e-3, g)
    grad32 = torch.empty(n)
    working = torch.empty(n, dtype=torch.bfloat16)
    param = torch.nn.Parameter(p)
    param.grad = grad32
    opt = torch.optim.AdamW([param], fused=True, **{k: v for k, v in HP.items() if k not in ("beta1", "beta2")},
                            betas=(HP["beta1"], HP["beta2"]))

    def step():
        grad32.copy_(grad_bf16)  # bf16 -> fp32 gradient cast
        opt.step()  # fused AdamW on fp32 weights and moments
        working.copy_(param.detach())  # fp32 -> bf16 working copy

    return _timeit(step, repeats)


def bench_mode(n: int, master: bool, states: str, repeats: int, g: torch.Generator) -> float:
    return time_optimizer(n, master, states, repeats, g, use_ext=True, **HP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[275e6, 4e6],
                    help="parameters per buffer (default: one Qwen2.5-14B layer, and a small one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    a = ap.parse_args()
    if not ops.have_ext():
        raise SystemExit("the C++ ops could not be built here; nothing to benchmark against")
    g = torch.Generator().manual_seed(0)
    bw = measure_bandwidth()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"memory bandwidth (in-place triad) {bw:.1f} GB/s")
    rows = []
    for size in a.sizes:
        n = int(size)
        t_torch = bench_torch(n, a.repeats, g)
        entries = [("torch-pipeline", t_torch, 40, 14)]
        for name, master, states, bpp, host_bpp in MODES:
            entries.append((name, bench_mode(n, master, states, a.repeats, g), bpp, host_bpp))
        print(f"\n{n / 1e6:.1f}M parameters")
        print(f"{'mode':<26}{'ns/param':>10}{'GB/s':>8}{'% of bw':>9}{'vs torch':>10}{'host B/param':>14}")
        for name, t, bpp, host_bpp in entries:
            ns = t / n * 1e9
            gbps = bpp / ns
            row = {"mode": name, "params": n, "ns_per_param": ns, "gbps": gbps, "pct_of_bandwidth": 100 * gbps / bw,
                   "speedup_vs_torch": t_torch / t, "bytes_per_param": bpp, "host_bytes_per_param": host_bpp}
            rows.append(row)
            print(f"{name:<26}{ns:>10.3f}{gbps:>8.1f}{row['pct_of_bandwidth']:>8.0f}%{row['speedup_vs_torch']:>9.2f}x"
                  f"{host_bpp:>14.2f}")
    if a.json:
        meta = {"device": f"CPU: {cpu}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                "torch_version": torch.__version__, "bandwidth_gbps": bw}
        with open(a.json, "w") as f:
            json.dump([dict(row, **meta) for row in rows], f, indent=2)


if __name__ == "__main__":
    main()
