"""Overlap evidence: profile a few engine steps (torch.profiler, CUDA activity) and summarise the
GPU timeline — how much of the step the compute kernels keep the GPU busy, and how much of the
H2D / D2H copy time runs hidden under compute.

    summary = profile_steps(engine, mbs, lr, steps=3)
    summary["compute_busy_fraction"], summary["h2d_hidden_fraction"], summary["d2h_hidden_fraction"]

The analysis works on the Chrome trace torch.profiler exports (kernel and memcpy events with
their stream and [start, end) times), so it is plain interval arithmetic, tested without a GPU.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _overlap(a: list[tuple[float, float]], b_union: list[tuple[float, float]]) -> float:
    """Total length of the intervals in `a` (merged first) covered by `b_union`."""
    total, j = 0.0, 0
    for s, e in _union(a):
        while j < len(b_union) and b_union[j][1] <= s:
            j += 1
        k = j
        while k < len(b_union) and b_union[k][0] < e:
            total += min(e, b_union[k][1]) - max(s, b_union[k][0])
            k += 1
    return total


def summarize_trace(events: list[dict], copy_bytes: set[int] | None = None) -> dict:
    """Chrome-trace events -> busy and hidden fractions. Kernels are compute ("cat": "kernel");
    copies are "gpu_memcpy" events, H2D or D2H by name. With `copy_bytes`, only the copies of those
    sizes (the trace's args.bytes) count as copies: one kind of copy (e.g. the activation offload's,
    one micro-batch's layer input each) apart from the rest (weights, gradients)."""
    kernels, h2d, d2h = [], [], []
    for ev in events:
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        span = (float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]))
        cat, name = ev.get("cat", ""), ev.get("name", "")
        if cat == "kernel":
            kernels.append(span)
        elif cat == "gpu_memcpy" and (copy_bytes is None or ev.get("args", {}).get("bytes") in copy_bytes):
            if "HtoD" in name:
                h2d.append(span)
            elif "DtoH" in name:
                d2h.append(span)
    if not kernels:
        raise ValueError("the trace has no CUDA kernels: was the profiler run with CUDA activity on a GPU?")
    busy = _union(kernels)
    everything = _union(kernels + h2d + d2h)
    wall = everything[-1][1] - everything[0][0]
    out = {"gpu_span_s": wall * 1e-6, "compute_busy_s": _length(busy) * 1e-6,
           "compute_busy_fraction": _length(busy) / wall}
    for name, copies in (("h2d", h2d), ("d2h", d2h)):
        t = _length(_union(copies))
        out[f"{name}_s"] = t * 1e-6
        out[f"{name}_hidden_s"] = _overlap(copies, busy) * 1e-6
        out[f"{name}_hidden_fraction"] = _overlap(copies, busy) / t if t else 1.0
    return out


def profile_steps(engine, mbs, lr: float, steps: int = 3, trace_path: str | Path | None = None,
                  copy_bytes: set[int] | None = None) -> dict:
    """Run `steps` engine steps under torch.profiler (after one untraced warm-up step) and summarise
    the GPU timeline (`copy_bytes`: as summarize_trace takes it). Optionally keeps the Chrome trace at
    `trace_path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine.step(mbs, lr)
    engine.worker.wait_all()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step(mbs, lr)
        engine.worker.wait_all()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(trace_path) if trace_path else Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    out = summarize_trace(events, copy_bytes)
    out["steps"] = steps
    return out
