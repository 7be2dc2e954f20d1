"""Data at real scale: the token cache against the loader it replaced, side by side in one run.

For each data size (a deterministic random text .jsonl built from the demo corpus's words):
- first preparation: megastream <= 0.1's in-memory loader (`load_jsonl` of commit 24c038d, read from
  git) against building the token cache (`megastream prepare`), each in its own process, with its
  wall time and peak RSS (VmHWM);
- second start: opening the cache and packing it, up to the first micro-batch (the data time before
  the first step);
- training: `megastream train` of the demo model for a few steps, peak RSS against the same run on
  1 MB of data, and `megastream plan`'s data term against the measured difference.

    python benchmarks/data.py                      # 1 MB and 100 MB (about 5 min on 2 cores)
    python benchmarks/data.py --sizes-mb 1 100 1000 --no-old --json out.json   # + 1 GB, cache only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "megastream" / "demo"
OLD_COMMIT = "24c038d"  # the last commit with the in-memory loader (megastream/data.py)
TRAIN_SETS = ["train.steps=3", "train.warmup_steps=0", "output.progress=false", "data.seq_len=512",
              "train.micro_batch_size=4", "train.grad_accum=2"]


def make_text(path: Path, mb: int, seed: int = 0) -> Path:
    """~mb MB of {"text": ...} rows: words of the demo corpus drawn at random, 20-2000 words a row."""
    if path.exists() and abs(path.stat().st_size - mb * 1e6) < 0.05 * mb * 1e6:
        return path
    words = re.findall(r"\S+", " ".join(json.loads(line)["text"] for line in open(DEMO / "corpus.jsonl")))
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        written = 0
        while written < mb * 1e6:
            n = int(min(2000, max(20, rng.lognormvariate(5.0, 1.0))))
            line = json.dumps({"text": " ".join(rng.choices(words, k=n))}) + "\n"
            f.write(line)
            written += len(line)
    tmp.rename(path)
    return path


def child(code: str, timeout: float = 3600) -> dict:
    """Run `code` in a fresh interpreter that prints one JSON line last; add its VmHWM."""
    wrapped = code + "\nfrom megastream.machine import peak_rss\nimport json as _j\nprint(_j.dumps({**RESULT, 'vm_hwm': peak_rss()}))"
    r = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def old_loader(data: Path, work: Path) -> dict:
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:megastream/data.py"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    mod = work / "old_loader.py"
    mod.write_text(src)
    return child(f"""
import sys, time; sys.path.insert(0, {str(work)!r})
from megastream.tokenizer import load_tokenizer, DEMO_TOKENIZER
import old_loader
t0 = time.perf_counter()
ds = old_loader.load_jsonl({str(data)!r}, 512, 2048, lambda: load_tokenizer(DEMO_TOKENIZER), "truncate", True)
RESULT = {{"seconds": time.perf_counter() - t0, "rows": len(ds)}}
""")


def config(data: Path, work: Path, name: str) -> Path:
    cfg = (DEMO / "demo.yaml").read_text().replace("path: corpus.jsonl", f"path: {data}")
    cfg = cfg.replace("dir: runs/demo", f"dir: {work / 'runs' / name}")
    path = work / f"{name}.yaml"
    path.write_text(cfg)
    return path


def prepare(cfg: Path) -> dict:
    """`megastream prepare` in its own process: (build or open) + pack; wall time and VmHWM."""
    sets = ", ".join(repr(s) for s in TRAIN_SETS)
    return child(f"""
import time, json, io, contextlib
from megastream.config import load_config
from megastream.data.loader import load_dataset, summary
from megastream.resolve import model_spec
cfg = load_config({str(cfg)!r}, [{sets}])
t0 = time.perf_counter()
ds = load_dataset(cfg, model_spec(cfg).vocab_size, log=lambda m: None)
ds.batch(ds.step_rows(0, cfg.train.grad_accum, cfg.train.micro_batch_size, True, 0)[0])
RESULT = {{"seconds": time.perf_counter() - t0, **summary(cfg, ds)}}
""")


def train_peak(cfg: Path) -> dict:
    sets = ", ".join(repr(s) for s in TRAIN_SETS)
    return child(f"""
import time
from megastream.cli import main
t0 = time.perf_counter()
rc = main(["train", {str(cfg)!r}, "--overwrite", *[a for s in [{sets}] for a in ("--set", s)]])
RESULT = {{"rc": rc, "seconds": time.perf_counter() - t0}}
""")


def plan_data(cfg: Path) -> int:
    args = [a for s in TRAIN_SETS for a in ("--set", s)]
    r = subprocess.run([sys.executable, "-m", "megastream", "plan", str(cfg), "--json", *args], capture_output=True,
                       text=True, cwd=REPO)
    return json.loads(r.stdout)["host_bytes"]["data"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--no-old", action="store_true", help="skip the old loader (it needs ~100x the data in RAM)")
    ap.add_argument("--work", default=None, help="directory for the generated data and caches (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    from megastream.machine import cpu_name

    work = Path(args.work or tempfile.mkdtemp(prefix="megastream-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
           "train_settings": TRAIN_SETS, "sizes": {}}
    base = None
    for mb in args.sizes_mb:
        data = make_text(work / f"text-{mb}mb.jsonl", mb)
        cfg = config(data, work, f"{mb}mb")
        row: dict = {"data_bytes": data.stat().st_size}
        if not args.no_old and mb > 1:
            row["old_loader"] = old_loader(data, work)
        cache_root = work / "runs" / ".megastream-cache"
        for p in cache_root.glob("*"):  # a cold first preparation
            import shutil
            shutil.rmtree(p)
        row["first_prepare"] = prepare(cfg)
        row["second_start"] = prepare(cfg)
        row["train"] = train_peak(cfg)
        row["plan_data_bytes"] = plan_data(cfg)
        if "old_loader" in row and "seconds" in row["old_loader"]:
            row["speedup_first_preparation"] = row["old_loader"]["seconds"] / row["first_prepare"]["seconds"]
        # what the data holds while training: the cache index, the layout, the permutation and its
        # int64 source, a step's micro-batches; the plan's data term predicts this
        ts = dict(a.split("=") for a in TRAIN_SETS if a.startswith("train.") and "_" in a)
        held = row["second_start"].get("host_bytes_in_training", 0)
        held += 8 * row["second_start"].get("packed_rows", 0) + 32 * 512 * int(ts["train.micro_batch_size"]) * int(
            ts["train.grad_accum"])
        row["data_held_bytes"] = held
        row["plan_over_held"] = row["plan_data_bytes"] / held if held else None
        if base is None:
            base = row
        else:
            row["train_peak_minus_1mb_gb"] = (row["train"]["vm_hwm"] - base["train"]["vm_hwm"]) / 1e9
            row["plan_data_minus_1mb_gb"] = (row["plan_data_bytes"] - base["plan_data_bytes"]) / 1e9
        out["sizes"][f"{mb}MB"] = row
        print(json.dumps({f"{mb}MB": row}, indent=1), flush=True)
    print("\nsize    old s  first s  x    2nd start s  fill   train peak GB (+ vs 1 MB)  plan data GB (+ vs 1 MB)"
          "  plan / held")
    for name, r in out["sizes"].items():
        old = r.get("old_loader", {}).get("seconds")
        print(f"{name:<7} {old or float('nan'):6.1f} {r['first_prepare'].get('seconds', float('nan')):7.1f} "
              f"{r.get('speedup_first_preparation', float('nan')):4.1f} {r['second_start'].get('seconds', float('nan')):10.2f}"
              f"   {r['second_start'].get('fill', float('nan')):.3f}  {r['train'].get('vm_hwm', 0) / 1e9:6.3f} "
              f"({r.get('train_peak_minus_1mb_gb', 0):+.3f})          {r['plan_data_bytes'] / 1e9:6.3f} "
              f"({r.get('plan_data_minus_1mb_gb', 0):+.3f})   {r.get('plan_over_held') or float('nan'):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
