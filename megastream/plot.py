"""`megastream plot RUN_DIR`: one PNG of a run's metrics.jsonl — loss (train and eval), learning
rate, tokens/s and memory (host RSS, GPU peak) against the step."""

from __future__ import annotations

import json
from pathlib import Path

from megastream.errors import DataError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass a run's output.dir (the directory holding metrics.jsonl)")
    recs = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except ValueError:
            if i == len(lines):  # a run killed mid-write: skip its torn last line
                continue
            raise DataError(f"{path}:{i}: not valid JSON; the file is corrupt") from None
    if not recs:
        raise DataError(f"{path} holds no steps yet")
    return recs


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    out = Path(output) if output else Path(run_dir) / "metrics.png"

    def series(key):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    a = ax[0][0]
    a.plot(*series("loss"), label="train loss", lw=1)
    xs, ys = series("eval_loss")
    if xs:
        a.plot(xs, ys, "o-", label="eval loss", ms=4)
    skipped = [r["step"] for r in recs if r.get("skipped")]
    if skipped:
        for s in skipped:
            a.axvline(s, color="red", alpha=0.3, lw=1)
        a.plot([], [], color="red", alpha=0.3, label=f"skipped step ({len(skipped)})")
    a.set(title="loss", xlabel="step", ylabel="token-mean cross-entropy")
    a.legend()
    a = ax[0][1]
    a.plot(*series("lr"), color="tab:green")
    a.set(title="learning rate", xlabel="step")
    a.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    a = ax[1][0]
    a.plot(*series("tokens_per_s"), color="tab:purple", lw=1)
    a.set(title="throughput", xlabel="step", ylabel="tokens/s")
    a.set_ylim(bottom=0)
    a = ax[1][1]
    for key, label in (("host_rss_gb", "host RSS"), ("host_peak_rss_gb", "host peak RSS"),
                       ("gpu_peak_gb", "GPU peak (allocated)"), ("gpu_reserved_gb", "GPU reserved")):
        xs, ys = series(key)
        if xs:
            a.plot(xs, ys, label=label)
    a.set(title="memory", xlabel="step", ylabel="GB")
    a.set_ylim(bottom=0)
    if a.lines:
        a.legend()
    fig.suptitle(f"{Path(run_dir).resolve().name}: {len(recs)} steps")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
