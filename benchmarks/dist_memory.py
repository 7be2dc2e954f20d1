"""Host RAM of a data-parallel node: 1 process vs N torchrun ranks of the same run, side by side.

    python benchmarks/dist_memory.py [--preset qwen2.5-0.5b] [--ranks 2] [--out benchmarks/results/X.json]

Each process's peak resident set (VmHWM, polled from /proc while it runs) against `plan`'s figures
for one process, one rank and the node. The target (issue "More than one GPU"): the node's ranks
together hold at most one process's RAM plus N x the per-rank working buffers (runtime, compute and
I/O buffers: what `plan` does not divide by N).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "megastream" / "demo" / "demo.yaml"


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peaks(cmd: list[str], env: dict) -> dict[int, int]:
    """Run `cmd`; the peak RSS of each python process in its tree (the launcher excluded when it has children)."""
    import psutil

    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    root = psutil.Process(p.pid)
    while p.poll() is None:
        try:
            kids = root.children(recursive=True)
        except psutil.Error:
            kids = []
        for proc in kids or [root]:
            peaks[proc.pid] = max(peaks.get(proc.pid, 0), _hwm(proc.pid))
        time.sleep(0.1)
    err = p.stderr.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{err[-3000:]}")
    return {k: v for k, v in peaks.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"dist-memory-{os.getpid()}"
    sets = ["--set", f"model.preset={a.preset}", "--set", "train.steps=2", "--set", "train.micro_batch_size=1",
            "--set", f"train.grad_accum={a.ranks}", "--set", "train.warmup_steps=1", "--set", "output.progress=false",
            "--set", "data.seq_len=128", "--set", f"data.cache_dir={work / 'cache'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    plan = json.loads(subprocess.run([sys.executable, "-m", "megastream", "plan", str(DEMO), *sets, "--json",
                                      "--ranks-per-node", str(a.ranks)], env=env, capture_output=True, text=True,
                                     ).stdout)["distributed"]
    one = _peaks([sys.executable, "-m", "megastream", "train", str(DEMO), *sets, "--set",
                  f"output.dir={work / 'one'}"], env)
    many = _peaks([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.ranks}",
                   "-m", "megastream", "train", str(DEMO), *sets, "--set", f"output.dir={work / 'many'}"], env)
    ranks = sorted(v for v in many.values() if v > 0.5 * max(many.values()) / a.ranks)[-a.ranks:]  # the workers
    single = max(one.values())
    # one process = buffers + S, a rank = buffers + S / n (S: the sharded model state)
    n, one_p, rank_p = a.ranks, plan["host_bytes_one_process"], plan["host_bytes_per_rank"]
    sharded = (one_p - rank_p) * n / (n - 1) if n > 1 else 0
    per_rank_buffers = one_p - sharded
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "cpu": _cpu(), "preset": a.preset, "ranks": a.ranks,
           "one_process_peak_bytes": single, "rank_peak_bytes": ranks, "node_peak_bytes": sum(ranks),
           "node_over_one_process": sum(ranks) / single,
           "plan_one_process_bytes": plan["host_bytes_one_process"], "plan_rank_bytes": plan["host_bytes_per_rank"],
           "plan_node_bytes": plan["host_bytes_per_node"],
           "per_rank_working_buffers_planned": per_rank_buffers,
           "target_node_bytes": single + a.ranks * per_rank_buffers,
           "meets_target": sum(ranks) <= single + a.ranks * per_rank_buffers}
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
