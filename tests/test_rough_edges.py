"""Issue 11, 3.5 and 3.8: --set values and the file's values that depend on them, one error for one
mistake, the JSON error message, eos_token_id in a preset's config.json, the progress bar at 60
columns and its ETA, and the summary after --resume."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from helpers import REPO, read_metrics, run_cli, write_config

DEMO = REPO / "configs" / "demo.yaml"
# A few small steps of the demo: 4 sequences of 128 tokens each.
QUICK = ["--set", "train.steps=3", "--set", "train.micro_batch_size=4", "--set", "train.grad_accum=1"]


# ------------------------------------------------------------------ 3.5: --set and the file's values


def test_readme_example_file_values_follow_the_set_ones():
    """The README's `--set train.lr=3e-5 --set train.steps=10` on the demo config (lr 3e-3, min_lr
    3e-4, warmup 20): min_lr keeps its ratio, warmup is capped at the run, one note each."""
    from megastream.config import load_config

    notes = []
    cfg = load_config(DEMO, ["train.lr=3e-5", "train.steps=10"], log=notes.append)
    assert cfg.train.lr == 3e-5 and cfg.train.steps == 10
    assert cfg.train.min_lr == pytest.approx(3e-6, rel=1e-12)
    assert cfg.train.warmup_steps == 10
    assert len(notes) == 2
    assert "train.min_lr 0.0003 (from demo.yaml) follows train.lr 0.003 -> 3e-05" in notes[0]
    assert "train.warmup_steps 20 (from demo.yaml) capped at train.steps=10" in notes[1]
    # min_lr follows lr up as well as down; a warmup that fits the run is left alone
    cfg = load_config(DEMO, ["train.lr=1e-2", "train.steps=40"], log=notes.append)
    assert cfg.train.min_lr == pytest.approx(1e-3) and cfg.train.warmup_steps == 20
    # nothing set on the command line: the file as written, no note
    notes.clear()
    cfg = load_config(DEMO, [], log=notes.append)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps) == (3e-3, 3e-4, 20) and notes == []


def test_readme_example_runs_through_the_cli(tmp_path):
    proc = run_cli("train", str(DEMO), "--set", "train.lr=3e-5", "--set", "train.steps=2", *QUICK[2:],
                   "--set", f"output.dir={tmp_path / 'run'}", "--set", "output.progress=false")
    assert proc.returncode == 0
    assert "megastream: note: train.min_lr 0.0003 (from demo.yaml) follows train.lr" in proc.stderr
    assert "megastream: note: train.warmup_steps 20 (from demo.yaml) capped at train.steps=2" in proc.stderr
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]
    import yaml

    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert resolved["min_lr"] == pytest.approx(3e-6) and resolved["warmup_steps"] == 2
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run")]
    assert lrs == pytest.approx([1.5e-5, 3e-5])  # warmup over the whole (2-step) run, up to the set lr


@pytest.mark.parametrize("sets,file_train,key", [
    (["train.lr=3e-5", "train.min_lr=1e-4"], None, "train.min_lr"),  # both on the command line
    (["train.steps=10", "train.warmup_steps=11"], None, "train.warmup_steps"),
    (["train.min_lr=1e-2"], None, "train.min_lr"),  # above the file's lr: lr never follows
    (["train.warmup_steps=200"], None, "train.warmup_steps"),  # beyond the file's steps: steps never follow
    ([], {"lr": 1e-4, "min_lr": 1e-3}, "train.min_lr"),  # both in the user's own file
    ([], {"steps": 5, "warmup_steps": 6}, "train.warmup_steps"),
], ids=["cli-lr", "cli-warmup", "cli-min-lr-above-file-lr", "cli-warmup-beyond-file-steps", "file-lr",
        "file-warmup"])
def test_contradictions_the_user_wrote_are_errors(tmp_path, sets, file_train, key):
    from megastream.config import load_config
    from megastream.errors import ConfigError

    path = DEMO
    if file_train is not None:
        path = write_config(tmp_path / "run.yaml", {"model": {"preset": "tiny"},
                                                    "data": {"path": str(REPO / "megastream/demo/corpus.jsonl")},
                                                    "train": file_train})
    notes = []
    with pytest.raises(ConfigError) as ei:
        load_config(path, sets, log=notes.append)
    assert key in str(ei.value) and notes == []


def test_set_preset_replaces_the_files_model_path(tmp_path):
    from megastream.config import load_config

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    path = write_config(tmp_path / "run.yaml", {"model": {"path": "model"},
                                                "data": {"path": str(REPO / "megastream/demo/corpus.jsonl")}})
    notes = []
    cfg = load_config(path, ["model.preset=tiny"], log=notes.append)
    assert cfg.model.preset == "tiny" and cfg.model.path is None
    assert len(notes) == 1 and "model.path" in notes[0] and "replaced by model.preset tiny" in notes[0]
    cfg = load_config(DEMO, [f"model.path={model}"], log=notes.append)
    assert cfg.model.path == str(model) and cfg.model.preset is None


# ------------------------------------------------------------------ 3.8: one error for one mistake


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("  - ")]


def test_negative_lr_is_one_error_through_the_cli(tmp_path):
    proc = run_cli("demo", "--set", "train.lr=-1", "--set", f"output.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert _error_lines(proc.stderr) == ["  - train.lr: must be > 0, got -1.0"], proc.stderr
    assert not (tmp_path / "run").exists()
    # the same mistake in a file, next to a min_lr that is fine
    cfg = write_config(tmp_path / "run.yaml", {"model": {"preset": "tiny"},
                                               "data": {"path": str(REPO / "megastream/demo/corpus.jsonl")},
                                               "train": {"lr": -1e-4, "min_lr": 1e-5, "steps": 0,
                                                         "warmup_steps": 2}})
    proc = run_cli("train", str(cfg), check=False)
    assert proc.returncode == 2
    assert _error_lines(proc.stderr) == ["  - train.steps: must be >= 1, got 0",
                                         "  - train.lr: must be > 0, got -0.0001"], proc.stderr


def test_bad_json_line_message_reads_once(tmp_path):
    """JSON's "Unterminated string starting at" used to become "... starting at at column 10"."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "cut short')  # the last line cut mid-string
    cfg = write_config(tmp_path / "run.yaml", {"model": {"preset": "tiny"}, "data": {"path": str(data)},
                                               "output": {"dir": str(tmp_path / "run")}})
    proc = run_cli("train", str(cfg), check=False)
    assert proc.returncode != 0
    assert f"{data}:2: not valid JSON (Unterminated string starting at column 10)" in proc.stderr, proc.stderr
    assert "at at" not in proc.stderr


# ------------------------------------------------------------------ 3.8: the demo's run


def _run_in_terminal(args: list[str], cols: int, cwd: Path) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal `cols` wide; return (exit code, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "megastream", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=600), shown.decode(errors="replace")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo, 3 short steps, checkpoint at 3, progress bar on a 61-column terminal."""
    cwd = tmp_path_factory.mktemp("demo")
    rc, shown = _run_in_terminal(["demo", *QUICK, "--set", "train.warmup_steps=0", "--set", "output.save_every=3",
                                  "--set", "output.dir=run"], 61, cwd)
    assert rc == 0, shown[-3000:]
    return cwd / "run", shown


def test_demo_config_json_names_the_tokenizers_eos(demo_run):
    import transformers
    from tokenizers import Tokenizer

    run, _ = demo_run
    eos = Tokenizer.from_file(str(REPO / "megastream" / "demo" / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert eos is not None
    for d in (run / "final", run / "checkpoint-3"):
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["eos_token_id"] == eos
        assert "bos_token_id" not in cfg  # the demo tokenizer has none (tokenizer_config: bos_token null)
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.generation_config.eos_token_id == eos  # what generate() stops at


def test_progress_bar_fits_60_columns_with_tokens_per_s_and_host_ram(demo_run):
    _, shown = demo_run
    bars = [s for s in re.split(r"[\r\n]+", shown) if re.search(r"\b\d/3\b", s)]
    assert bars, shown
    assert all(len(b) <= 60 for b in bars), bars  # tqdm leaves the last column free
    last = [b for b in bars if "3/3" in b][-1]
    assert re.search(r"[\d.]+k? tok/s", last) and re.search(r"host \d+\.\d GB", last), last
    assert last.startswith("step 3/3, loss ") and ", eta 00:00" in last, last


def _rec(**kw) -> dict:
    rec = {"step": 1, "loss": 10.1234, "tokens_per_s": 123456.0, "host_rss_gb": 123.4, "skipped_steps": 0}
    return rec | kw


def test_progress_bar_at_60_columns_rendered():
    """A large run on a GPU machine, rendered by the same bar the trainer uses into 60 columns: the
    tokens/s and host RAM fields are there in full, and the ETA."""
    from megastream.train import _ProgressBar

    out = io.StringIO()
    with _ProgressBar(10000, 9990, file=out, ncols=60) as bar:
        for _ in range(3):
            bar.step_done(_rec(gpu_peak_gb=21.3, gpu_util=97.0))
    lines = [s for s in re.split(r"[\r\n]+", out.getvalue()) if s.strip()]
    last = lines[-1]
    assert all(len(s) <= 60 for s in lines), lines
    assert "123k tok/s" in last and "host 123.4 GB" in last and "loss 10.123" in last, last
    # the demo's sizes: the ETA fits as well
    out = io.StringIO()
    with _ProgressBar(150, file=out, ncols=60, clock=iter(range(0, 1000, 2)).__next__) as bar:
        for _ in range(40):
            bar.step_done(_rec(loss=7.1234, tokens_per_s=10840.0, host_rss_gb=0.47))
    last = [s for s in re.split(r"[\r\n]+", out.getvalue()) if s.strip()][-1]
    assert last == "step 40/150, loss 7.123, 10.8k tok/s, host 0.5 GB, eta 03:40", last
    # wide: every field, and the bar
    out = io.StringIO()
    with _ProgressBar(100, file=out, ncols=200) as bar:
        bar.step_done(_rec(gpu_peak_gb=21.3, gpu_util=97.0, skipped_steps=2))
    last = [s for s in re.split(r"[\r\n]+", out.getvalue()) if s.strip()][-1]
    assert "GPU 21.3 GB" in last and "util 97%" in last and "skipped 2" in last and "|" in last, last


def test_eta_leaves_out_the_first_steps_warm_up():
    """First step 30 s (compilation, allocation), then 1 s a step: after 3 of 100 steps the ETA is
    97 s, not the ~1,100 s of averaging the warm-up in (tqdm's estimate after one step was 99 x 30 s)."""
    from megastream.train import _ProgressBar

    now = [0.0]
    out = io.StringIO()
    with _ProgressBar(100, file=out, ncols=80, clock=lambda: now[0]) as bar:
        now[0] += 30
        bar.step_done(_rec())
        assert bar.eta_s() is None  # nothing to go on yet: "eta ?"
        assert "eta ?" in out.getvalue().split("\r")[-1]
        for _ in range(2):
            now[0] += 1
            bar.step_done(_rec())
        assert bar.eta_s() == pytest.approx(97.0)
        assert "eta 01:37" in out.getvalue().split("\r")[-1]
    # a resumed run: its own first step is the warm-up too
    now[0] = 0.0
    with _ProgressBar(100, 50, file=io.StringIO(), ncols=80, clock=lambda: now[0]) as bar:
        now[0] += 20
        bar.step_done(_rec())
        now[0] += 2
        bar.step_done(_rec())
        assert bar.eta_s() == pytest.approx(2.0 * 48)


# ------------------------------------------------------------------ 3.8: the summary after --resume


def test_resume_summary_reports_the_runs_first_and_last_loss(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run[0], run)
    proc = run_cli("demo", *QUICK, "--set", "train.warmup_steps=0", "--set", "train.steps=5", "--set",
                   f"output.dir={run}", "--set", "output.progress=false", "--resume")
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert first != metrics[3]["loss"] and last != metrics[3]["loss"]
    assert (f"megastream: done, loss {first:.4f} (step 1) -> {last:.4f} (step 5); resumed at step 3; "
            in proc.stdout), proc.stdout


# ------------------------------------------------------------------ the top-level --help
def test_top_level_help_reads_as_written_and_its_examples_are_real(capsys):
    """`megastream --help`: a description and examples laid out as written (argparse used to reflow the
    module docstring's command table into one paragraph), every example a real command with real files."""
    from megastream.cli import EXAMPLES, _parser

    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert EXAMPLES in out and "Command line." not in out
    parser = _parser()
    for line in EXAMPLES.splitlines()[1:]:
        argv = line.strip().split("  ")[0].split()[1:]
        if argv[0] == "<command>":
            continue
        args = parser.parse_args(argv)  # the example parses as written
        if getattr(args, "config", None) and args.config != "config.yaml":
            assert (REPO / args.config).is_file(), line
