"""Where a LoRA step's time goes against full fine-tuning's, op by op (issue 15: <= 0.75x on the CPU).

    python benchmarks/lora_step_breakdown.py [--json PATH]

Times, in CPU seconds of one thread (the minimum of 7 runs, so that a shared machine's neighbours
count little), every matmul a step of benchmarks/lora_step.py's default shape runs (wide-512: hidden
512, MLP 1408, vocab 8192, 4 layers; 2 micro-batches of 4 x 256 tokens; rank 16 on all seven
projections, dropout 0.05), as the engine issues them: full fine-tuning's forward, recompute, input
and weight gradients, and the head's three; LoRA's forward, recompute without the down projection's
base GEMM, input gradients, the head's two, then the adapters' own matmuls and the dropout masks (drawn
in forward and recompute, applied in forward, recompute and backward). What is not here (attention,
norms, RoPE, SiLU, the loss's softmax, copies) is the same work in both steps: the step time
(lora_step.py) minus these.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def cpu_time(fn, n: int = 7) -> float:
    fn()
    best = []
    for _ in range(n):
        t = time.process_time()
        fn()
        best.append(time.process_time() - t)
    return min(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    M, H, I, V, L, MB, r, p = 1024, 512, 1408, 8192, 4, 2, 16, 0.05  # M: tokens per micro-batch
    proj = {"q": (H, H), "k": (H, 256), "v": (H, 256), "o": (H, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
    fwd = dx = dw = down_fwd = ad_f = ad_b = drop_draw = drop_apply = 0.0
    g = torch.Generator().manual_seed(0)
    for key, (n_in, n_out) in proj.items():  # (in, out)
        x, w, dy = torch.randn(M, n_in), torch.randn(n_out, n_in), torch.randn(M, n_out)
        f = cpu_time(lambda: F.linear(x, w))
        fwd, dx, dw = fwd + f, dx + cpu_time(lambda: dy @ w), dw + cpu_time(lambda: dy.t() @ x)
        down_fwd = f if key == "down" else down_fwd
        a, b, y, pr = torch.randn(r, n_in), torch.randn(n_out, r), torch.randn(M, n_out), torch.randn(M, r)
        ad_f += cpu_time(lambda: y.addmm_(F.linear(x, a), b.t(), alpha=2.0))
        ad_b += cpu_time(lambda: (dy @ b, dy.t() @ pr, pr @ a, pr.t() @ x))  # d(p), d(B), d(x A^T)/dx, d(A)
        n, keep = M * n_in, torch.empty(M, n_in)
        drop_draw += cpu_time(lambda: torch.ge(torch.empty((n + 3) // 4, dtype=torch.int64).random_(
            -2**63, None, generator=g).view(torch.int16)[:n].view(M, n_in), -29000, out=keep))
        drop_apply += cpu_time(lambda: x * keep)
    h, wv, dz = torch.randn(M, H), torch.randn(V, H), torch.randn(M, V)
    hf, hdx, hdw = cpu_time(lambda: F.linear(h, wv)), cpu_time(lambda: dz @ wv), cpu_time(lambda: dz.t() @ h)
    n = L * MB  # (layer, micro-batch) pairs
    res = {"full: base GEMMs (forward, recompute, dX, dW; head forward, dX, dW)": n * (2 * fwd + dx + dw)
           + MB * (hf + hdx + hdw),
           "lora: base GEMMs (forward, recompute less down's, dX; head forward, dX)": n * (2 * fwd - down_fwd + dx)
           + MB * (hf + hdx),
           "lora: adapter GEMMs (forward twice, backward)": n * (2 * ad_f + ad_b),
           "lora: dropout masks drawn (forward, recompute)": n * 2 * drop_draw,
           "lora: dropout applied (forward, recompute, backward)": n * 3 * drop_apply}
    for k, v in res.items():
        print(f"{v:7.3f} s CPU  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch_version": torch.__version__, "cpu_s": res}, f,
                      indent=2)


if __name__ == "__main__":
    main()
