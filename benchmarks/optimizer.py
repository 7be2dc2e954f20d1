"""The host optimizer step, side by side on the same machine: the best plain-PyTorch pipeline
against each megastream mode (csrc/adamw.cpp), with the memory bandwidth measured in the same run.

    python benchmarks/optimizer.py                       # 275M (one Qwen2.5-14B layer) and 4M params
    python benchmarks/optimizer.py --sizes 46.8e6 --json out.json
    MEGASTREAM_CPU_ISA=avx2 python benchmarks/optimizer.py   # force a path (torch follows, see below)

The torch pipeline is what a user would write with stock PyTorch: cast the bf16 gradient to fp32,
`torch.optim.AdamW(fused=True)` on fp32 weights/moments, copy the fp32 weights to the bf16 working
copy. Logical bytes per parameter (each input read once, each output written once):

    torch pipeline                     2+4 (cast) + 16+12 (AdamW) + 4+2 (copy)   = 40
    master fp32, states fp32           g 2 + p,m,v 12 read + p,m,v 12 + working 2 = 28
    master fp32, states bf16           2 + 4+2+2 + 4+2+2 + 2                      = 20
    no master (bf16 + SR), states bf16 2 + 2+2+2 + 2+2+2                          = 14
    no master (bf16 + SR), states int8 2 + 2+1+1 + 2+1+1 (+ 2 fp32 scales / 256)  ~ 10

GB/s is those bytes over the time. Two bandwidths are measured before and after the timings, each
the median of 5 runs over 1 GiB fp32 arrays, and the larger of the two measurements counts: a plain
copy (`dst.copy_(src)`: bytes read + written) and an in-place triad (`a.add_(b, alpha=0.5)`: 8
read + 4 written per element, the optimizer's read-modify-write pattern). A copy also makes the CPU
read each destination line before writing it, traffic that it does not count, so a kernel that
updates in place can exceed 100% of it.

Each mode is timed in --repeats rounds, each round one torch step then one step of the mode on
buffers that stay allocated (after one warm-up step each), so both see the same machine state;
the table gives medians and the range of the rounds' ratios. On a shared machine other processes
slow both, the compute-bound modes more: the 1-minute load average at the start and the end is
printed and recorded.

The C++ ops run on the widest instruction-set path the CPU has (megastream.ops.cpu_isa()), or the
one MEGASTREAM_CPU_ISA forces. torch's baseline must then run on the same ISA: its kernels pick
theirs from ATEN_CPU_CAPABILITY, read when torch is imported, so with MEGASTREAM_CPU_ISA set and
ATEN_CPU_CAPABILITY not, this script re-executes itself with ATEN_CPU_CAPABILITY set to match
(avx512 -> avx512, avx2 -> avx2, scalar -> default), and refuses a mismatched pair.
"""

from __future__ import annotations

import os
import sys

_ATEN_FOR = {"avx512": "avx512", "avx2": "avx2", "scalar": "default"}


def _torch_on_the_same_isa() -> None:
    """Before torch is imported: make ATEN_CPU_CAPABILITY follow MEGASTREAM_CPU_ISA."""
    isa = os.environ.get("MEGASTREAM_CPU_ISA", "").strip().lower()
    if isa in ("", "auto"):
        return
    if isa not in _ATEN_FOR:
        raise SystemExit(f"MEGASTREAM_CPU_ISA={isa!r}: expected one of {', '.join(_ATEN_FOR)}")
    want, have = _ATEN_FOR[isa], os.environ.get("ATEN_CPU_CAPABILITY")
    if have is None:
        os.environ["ATEN_CPU_CAPABILITY"] = want
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if not have.strip().lower().startswith(want):
        raise SystemExit(f"MEGASTREAM_CPU_ISA={isa} but ATEN_CPU_CAPABILITY={have}: torch's baseline must run on "
                         f"the same instruction set (ATEN_CPU_CAPABILITY={want}, or leave it unset)")


_torch_on_the_same_isa()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from megastream import ops  # noqa: E402
from megastream.machine import cpu_flags, cpu_name  # noqa: E402
from megastream.ops import reference as R  # noqa: E402
from megastream.probe import timeit  # noqa: E402

HP = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
MODES = [  # name, master fp32?, states, logical bytes per parameter, host bytes per parameter (model state)
    ("fp32-master+fp32-states", True, "fp32", 28, 14),
    ("fp32-master+bf16-states", True, "bf16", 20, 10),
    ("bf16-sr+bf16-states", False, "bf16", 14, 6),
    ("bf16-sr+int8-states", False, "int8", 10 + 8 / 256, 4 + 8 / 256),
]
TORCH_BYTES, TORCH_HOST_BYTES = 40, 14
_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16",
          "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_info() -> tuple[str, list[str]]:
    """The CPU model and which of the vector extensions that matter here it reports."""
    flags = cpu_flags()
    return cpu_name(), [f for f in _FLAGS if f in flags]


def copy_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> float:
    """GB/s of dst.copy_(src) over fp32 arrays: bytes read + bytes written over the time."""
    src, dst = torch.rand(nbytes // 4), torch.empty(nbytes // 4)
    return 2 * nbytes / timeit(lambda: dst.copy_(src), repeats) / 1e9


def triad_bandwidth(nbytes: int = 2**30, repeats: int = 5) -> float:
    """GB/s of an in-place triad over two fp32 arrays (8 bytes read and 4 written per element)."""
    a, b = torch.rand(nbytes // 4), torch.rand(nbytes // 4)
    return 3 * nbytes / timeit(lambda: a.add_(b, alpha=0.5), repeats) / 1e9


def _rand(n: int, dtype: torch.dtype, scale: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) * 2 - 1).mul_(scale).to(dtype)


def torch_step(n: int, g: torch.Generator):
    """The stock-PyTorch pipeline on its own buffers, as a callable."""
    param = torch.nn.Parameter(_rand(n, torch.float32, 0.05, g))
    grad_bf16 = _rand(n, torch.bfloat16, 1e-3, g)
    param.grad = grad32 = torch.empty(n)
    working = torch.empty(n, dtype=torch.bfloat16)
    opt = torch.optim.AdamW([param], fused=True, lr=HP["lr"], weight_decay=HP["weight_decay"], eps=HP["eps"],
                            betas=(HP["beta1"], HP["beta2"]))

    def step():
        grad32.copy_(grad_bf16)  # bf16 -> fp32 gradient cast
        opt.step()  # fused AdamW on fp32 weights and moments
        working.copy_(param.detach())  # fp32 -> bf16 working copy

    return step


def mode_step(n: int, master: bool, states: str, g: torch.Generator):
    """One megastream mode's fused step on its own buffers (bf16 gradients), as a callable."""
    w = _rand(n, torch.float32 if master else torch.bfloat16, 0.05, g)
    grad = _rand(n, torch.bfloat16, 1e-3, g)
    working = torch.empty(n, dtype=torch.bfloat16) if master else None
    if states == "int8":  # a fresh optimizer's state (all zero); the warm-up step fills the codes
        nblk = (n + R.BLOCK - 1) // R.BLOCK
        m, v = torch.zeros(n, dtype=torch.int8), torch.zeros(n, dtype=torch.uint8)
        ms, vs = torch.zeros(nblk), torch.zeros(nblk)
    else:
        dt = torch.float32 if states == "fp32" else torch.bfloat16
        m, v, ms, vs = _rand(n, dt, 1e-4, g), _rand(n, dt, 1e-8, g).abs_(), None, None
    counter = iter(range(1, 10**9))

    def step():
        ops.adamw_step(w, grad, m, v, ms, vs, working, n_decay=n, step=next(counter), key=7, use_ext=True,
                       grad_scale=1.0, **HP)

    return step


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_size(n: int, repeats: int, g: torch.Generator) -> dict[str, dict]:
    """Per mode: the mode's and torch's time in each round (torch first, then the mode)."""
    base = torch_step(n, g)
    base()  # warm-up: page faults, thread pools
    out = {}
    for name, master, states, _, _ in MODES:
        step = mode_step(n, master, states, g)
        step()
        rounds = [(_seconds(base), _seconds(step)) for _ in range(repeats)]
        out[name] = {"torch": [t for t, _ in rounds], "mode": [s for _, s in rounds]}
        del step
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[275e6, 4e6],
                    help="parameters per buffer (default: one Qwen2.5-14B layer, and a small one)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (torch step, mode step) per mode")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    a = ap.parse_args()
    try:
        if not ops.have_ext():
            raise SystemExit("the C++ ops could not be built here; nothing to benchmark against")
    except ops.CpuIsaError as e:
        raise SystemExit(str(e)) from None
    g = torch.Generator().manual_seed(0)
    cpu, flags = cpu_info()
    isa, aten = ops.cpu_isa(), torch.backends.cpu.get_cpu_capability()
    print(f"{cpu} ({', '.join(flags) or 'no vector flags'}), {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, ATen {aten}); megastream ops: {isa} path")
    load = [os.getloadavg()[0]]
    bw = [(copy_bandwidth(), triad_bandwidth())]  # again at the end: the larger of the two counts
    results = []
    for size in a.sizes:
        n = int(size)
        print(f"timing {n / 1e6:.1f}M parameters ...", flush=True)
        results.append((n, bench_size(n, a.repeats, g)))
    bw.append((copy_bandwidth(), triad_bandwidth()))
    load.append(os.getloadavg()[0])
    copy_bw, triad_bw = max(c for c, _ in bw), max(t for _, t in bw)
    print(f"memory bandwidth: copy {bw[0][0]:.1f} / {bw[1][0]:.1f} GB/s, in-place triad {bw[0][1]:.1f} / {bw[1][1]:.1f} "
          f"GB/s (start / end; the fractions use the larger); load average {load[0]:.2f} / {load[1]:.2f}")
    meta = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_isa": isa, "aten_cpu_capability": aten, "date": time.strftime("%Y-%m-%d"),
            "torch_version": torch.__version__, "copy_gbps": copy_bw, "triad_gbps": triad_bw,
            "copy_gbps_start_end": [c for c, _ in bw], "triad_gbps_start_end": [t for _, t in bw],
            "loadavg_start_end": load, "repeats": a.repeats}
    rows = []
    for n, res in results:
        t_torch_all = [t for r in res.values() for t in r["torch"]]
        entries = [("torch-pipeline", t_torch_all, [1.0], TORCH_BYTES, TORCH_HOST_BYTES)]
        for name, _, _, bpp, host_bpp in MODES:
            r = res[name]
            entries.append((name, r["mode"], [t / s for t, s in zip(r["torch"], r["mode"])], bpp, host_bpp))
        print(f"\n{n / 1e6:.1f}M parameters, {isa} path")
        print(f"{'mode':<26}{'B/param':>8}{'ns/param':>10}{'GB/s':>7}{'% copy':>8}{'% triad':>8}"
              f"{'vs torch':>9}{'(range)':>13}")
        for name, times, ratios, bpp, host_bpp in entries:
            ns = statistics.median(times) / n * 1e9
            gbps = bpp / ns
            row = {"mode": name, "params": n, "ns_per_param": ns,
                   "ns_per_param_range": [min(times) / n * 1e9, max(times) / n * 1e9], "bytes_per_param": bpp,
                   "gbps": gbps, "pct_of_copy_bandwidth": 100 * gbps / copy_bw,
                   "pct_of_triad_bandwidth": 100 * gbps / triad_bw, "speedup_vs_torch": statistics.median(ratios),
                   "speedup_range": [min(ratios), max(ratios)], "host_bytes_per_param": host_bpp}
            rows.append(dict(row, **meta))
            rng = f"{min(ratios):.2f}-{max(ratios):.2f}" if name != "torch-pipeline" else ""
            print(f"{name:<26}{bpp:>8.1f}{ns:>10.3f}{gbps:>7.1f}{row['pct_of_copy_bandwidth']:>7.0f}%"
                  f"{row['pct_of_triad_bandwidth']:>7.0f}%{row['speedup_vs_torch']:>8.2f}x{rng:>13}")
    print("\nOther processes on the machine slow both sides of each round, the compute-bound modes more: the load "
          "average is recorded.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
