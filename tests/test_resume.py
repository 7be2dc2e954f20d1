"""Stop and resume without losing a step: through the real CLI, a run killed while saving a
checkpoint resumes from the previous one and ends with the same losses and weights, bit for bit."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import REPO, read_metrics, run_cli

BASE = ["--set", "train.steps=6", "--set", "train.warmup_steps=2", "--set", "train.micro_batch_size=4",
        "--set", "output.save_every=2", "--set", "output.progress=false"]
# bf16 rows of 32 tokens: bf16 matmuls are ~9x slower than fp32 on a CPU without AVX-512-BF16
MODES = {"full-fp32": [], "compact-int8-sr": ["--set", "optim.master=none", "--set", "optim.states=int8",
                                              "--set", "engine.dtype=bfloat16", "--set", "data.seq_len=32"]}


def _crash_during_save(out, step, extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), MEGASTREAM_TEST_CRASH_DURING_SAVE=str(step))
    proc = subprocess.run([sys.executable, "-m", "megastream", "demo", *BASE, *extra, "--set", f"output.dir={out}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]  # died inside the save of checkpoint-<step>


def _weights(run):
    return load_file(run / "final" / "model.safetensors")


@pytest.mark.parametrize("mode", list(MODES))
def test_killed_during_save_then_resumed_equals_straight_run(tmp_path, mode):
    extra = MODES[mode]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_cli("demo", *BASE, *extra, "--set", f"output.dir={straight}")

    _crash_during_save(broken, 4, extra)
    names = sorted(p.name for p in broken.iterdir())
    assert "checkpoint-2" in names and "checkpoint-4" not in names and "final" not in names
    assert any(n.startswith(".checkpoint-4.tmp-") for n in names)  # the half-written one, never renamed
    assert json.loads((broken / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2

    proc = run_cli("demo", *BASE, *extra, "--set", f"output.dir={broken}", "--resume")
    assert "resuming from" in proc.stdout and "at step 2" in proc.stdout
    assert not any(p.name.startswith(".") for p in broken.iterdir())  # the stale temp dir is cleaned up

    a, b = read_metrics(straight), read_metrics(broken)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    wa, wb = _weights(straight), _weights(broken)
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    for step in (2, 4, 6):  # the resumable state itself is identical too
        for f in (straight / f"checkpoint-{step}" / "optimizer").iterdir():
            sa, sb = load_file(f), load_file(broken / f"checkpoint-{step}" / "optimizer" / f.name)
            assert all(sa[k].equal(sb[k]) for k in sa), (step, f.name)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_cli("demo", *BASE, "--set", "output.save_every=1", "--set", "output.keep_last=2", "--set", f"output.dir={out}")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_resume_errors(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("demo", *BASE, "--set", f"output.dir={out}", "--resume", check=False)
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr, proc.stderr

    run_cli("demo", *BASE, "--set", f"output.dir={out}")
    proc = run_cli("demo", *BASE, "--set", "optim.states=bf16", "--set", f"output.dir={out}",
                   "--resume", str(out / "checkpoint-2"), check=False)
    assert proc.returncode == 2 and "optim.states=fp32" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli("demo", *BASE, "--set", f"output.dir={out}", "--resume", check=False)
    assert proc.returncode == 2 and "is at step 6" in proc.stderr and "train.steps" in proc.stderr

    layer = out / "checkpoint-4" / "optimizer" / "layer.0.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])
    proc = run_cli("demo", *BASE, "--set", f"output.dir={out}", "--resume", str(out / "checkpoint-4"), check=False)
    assert proc.returncode == 2 and "layer.0.safetensors" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_finishes_the_step_saves_and_resumes(tmp_path, sig, code):
    import signal
    import time

    out = tmp_path / "run"
    args = ["demo", "--set", "train.steps=30", "--set", "train.warmup_steps=2", "--set", "train.micro_batch_size=2",
            "--set", "train.grad_accum=1", "--set", "output.progress=false", "--set", f"output.dir={out}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "megastream", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "megastream: interrupted: stopped after step" in err and "--resume" in err and "Traceback" not in err
    done = len(read_metrics(out))
    assert 3 <= done < 30
    assert json.loads((out / f"checkpoint-{done}" / "trainer_state.json").read_text())["step"] == done

    run_cli(*args, "--resume")
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == list(range(1, 31)) and (out / "final" / "model.safetensors").exists()
