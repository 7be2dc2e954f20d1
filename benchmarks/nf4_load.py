"""NF4 quantize-at-load (lora.base_dtype: nf4) on the CPU: megastream.ops.nf4_codes's C++ op against
the torch ops it replaces, side by side in one run, on one weight of a given shape.

    python benchmarks/nf4_load.py                                  # a bf16 8192 x 8192 weight
    python benchmarks/nf4_load.py --rows 8192 --cols 29568 --json out.json   # Qwen2.5-72B's MLP width

Both paths give the same bytes (checked here, and in tests/test_quant.py); the rounds alternate the
two paths so that a shared machine's load falls on both alike. Prints the median ns per parameter of
each whole quantize() call (block absmaxes, double quantization and the codes) and their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from megastream import ops
from megastream.adapters.quant import quantize
from megastream.machine import cpu_name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--rounds", type=int, default=3, help="calls of each path (alternating)")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    if not ops.have_ext():
        raise SystemExit("nf4_load.py: megastream's C++ ops are not built here: nothing to compare")
    w = (torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(getattr(torch, a.dtype))
    times: dict[str, list[float]] = {"torch": [], "c++": []}
    data = {}
    for _ in range(a.rounds):
        for path, ext in (("torch", False), ("c++", True)):
            t = time.perf_counter()
            data[path] = quantize(w, "nf4", use_ext=ext).data
            times[path].append(time.perf_counter() - t)
    if not torch.equal(data["torch"], data["c++"]):
        raise SystemExit("nf4_load.py: the two paths gave different codes")
    ns = {k: statistics.median(v) / w.numel() * 1e9 for k, v in times.items()}
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
              "torch_version": torch.__version__, "threads": torch.get_num_threads(), "shape": [a.rows, a.cols],
              "dtype": a.dtype, "ns_per_param": ns, "speedup": ns["torch"] / ns["c++"], "times_s": times,
              "same_codes": True}
    print(f"NF4 quantize of a {a.dtype} {a.rows} x {a.cols} weight on {result['machine']} ({result['threads']} "
          f"threads): torch {ns['torch']:.1f} ns/param, C++ {ns['c++']:.1f} ns/param ({result['speedup']:.1f}x), "
          "same codes")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
