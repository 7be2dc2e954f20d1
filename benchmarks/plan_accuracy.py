"""How close is `megastream plan` to what a run really takes? For each case: the plan's host total
(`megastream plan --json`, its own process) next to the peak RSS of `megastream train` on the same
config (another process, which reports its own peak, VmHWM, when it ends), and the plan's predicted
step time next to the median measured step (the first, warm-up step excluded). The prediction uses
this machine's `megastream probe` record (run first when there is none, or with --probe).

    python benchmarks/plan_accuracy.py                    # demo + a 1B-class preset (about 5 min on 2 cores)
    python benchmarks/plan_accuracy.py --cases demo-seq512 demo-seq4096 --json out.json   # step time

Cases train a few steps on the bundled demo corpus; the preset cases run on the CPU in bf16 with
the lean mode so that a 1B model fits a 24 GB machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megastream.machine import cpu_name
from megastream.probe import cached_probe

DEMO = Path(__file__).resolve().parent.parent / "megastream" / "demo" / "demo.yaml"
_PRESET = ["data.seq_len=256", "train.micro_batch_size=2", "train.grad_accum=2", "train.steps=3",
           "train.warmup_steps=0", "train.lr=1e-5", "train.min_lr=0"]
CASES = {
    "demo": ["train.steps=20", "train.warmup_steps=0"],
    # step time: the same 8192 tokens per step in short rows and in long ones (attention-heavy)
    "demo-seq512": ["train.steps=4", "train.warmup_steps=0", "data.seq_len=512", "train.micro_batch_size=8",
                    "train.grad_accum=2"],
    "demo-seq4096": ["train.steps=4", "train.warmup_steps=0", "data.seq_len=4096", "train.micro_batch_size=1",
                     "train.grad_accum=2"],
    "demo-compact-save": ["train.steps=6", "train.warmup_steps=0", "optim.master=none", "optim.states=int8",
                          "output.save_every=3"],
    "qwen2.5-0.5b-full": ["model.preset=qwen2.5-0.5b", *_PRESET],
    "llama-3.2-1b-lean-bf16": ["model.preset=llama-3.2-1b", *_PRESET, "engine.dtype=bfloat16", "optim.master=none",
                               "optim.states=bf16"],
}


def _sets(items: list[str]) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


def run_case(name: str, sets: list[str], workdir: Path) -> dict:
    sets = [*sets, f"output.dir={workdir / name}", "output.progress=false"]
    plan = subprocess.run([sys.executable, "-m", "megastream", "plan", str(DEMO), "--json", *_sets(sets)],
                          capture_output=True, text=True, check=False)
    if plan.returncode not in (0, 1):
        raise SystemExit(f"plan failed for {name}:\n{plan.stderr}")
    p = json.loads(plan.stdout)
    # The training process reports its own high-water mark (VmHWM) as the CLI returns. getrusage of
    # a child would also count the parent it was forked from, which Linux carries across exec.
    code = ("import sys; from megastream.cli import main; from megastream.machine import peak_rss; "
            "rc = main(sys.argv[1:]); print('PEAK', peak_rss()); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "train", str(DEMO), "--overwrite", *_sets(sets)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"train failed for {name}:\n{proc.stderr[-3000:]}")
    peak = int(proc.stdout.split("PEAK")[-1])
    steps = [json.loads(line)["step_time_s"] for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    measured_step = statistics.median(steps[1:] if len(steps) > 1 else steps)
    return {"case": name, "params": p["params"], "planned_host_bytes": p["host_bytes_total"],
            "measured_peak_rss_bytes": peak, "ratio": p["host_bytes_total"] / peak,
            "predicted_step_s": p["predicted_step_s"], "measured_step_s": measured_step,
            "step_ratio": p["predicted_step_s"] / measured_step, "tokens_per_step": p["tokens_per_step"],
            "planned_components": p["host_bytes"], "sets": sets[:-2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--probe", action="store_true", help="measure this machine's rates again first")
    a = ap.parse_args()
    if a.probe or cached_probe("cpu") is None:
        subprocess.run([sys.executable, "-m", "megastream", "probe"], check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.cases:
            r = run_case(name, CASES[name], Path(tmp))
            rows.append(r)
            print(f"{name:<26} {r['params'] / 1e6:9.1f}M params  planned {r['planned_host_bytes'] / 1e9:7.2f} GB  "
                  f"measured peak RSS {r['measured_peak_rss_bytes'] / 1e9:7.2f} GB  "
                  f"plan/measured {r['ratio']:.3f}  step predicted {r['predicted_step_s']:.3f} s, measured "
                  f"{r['measured_step_s']:.3f} s, ratio {r['step_ratio']:.2f}", flush=True)
    meta = {"device": f"CPU: {cpu_name()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
            "torch_version": torch.__version__, "probe": cached_probe("cpu")}
    if a.json:
        Path(a.json).write_text(json.dumps({**meta, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
