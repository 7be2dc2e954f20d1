"""Faults a user hits, through the real command line (megastream.cli.main in a fresh interpreter):
Ctrl-C during a save, --overwrite of an earlier run, a metrics.jsonl cut short, a full disk, and
non-finite values in the files a run loads. Faults are injected by patching one function in the
child before main() runs (a signal raised while a save writes, a small free-space figure, an
ENOSPC from a write), so every test is deterministic and nothing fills a real disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from helpers import REPO, make_hf_model, read_metrics, run_cli, write_config, write_ids


def _args(out, steps=3, save_every=0, *more):
    return ["demo", "--set", f"train.steps={steps}", "--set", "train.warmup_steps=1", "--set",
            "train.micro_batch_size=2", "--set", "train.grad_accum=1", "--set", "output.progress=false",
            "--set", f"output.save_every={save_every}", "--set", f"output.dir={out}", *more]


def _cli(*args, patch: str = "") -> subprocess.CompletedProcess:
    """`megastream ARGS` with `patch` (Python source) run in the child first."""
    code = f"import sys\n{patch}\nfrom megastream.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def _during_save(name: str, body: str) -> str:
    """Run `body` (may use `path`) when a save of output.dir/<name> writes its model weights."""
    return ("import errno, os, signal\nimport megastream.checkpoint as ck\n_real = ck.write_safetensors\n"
            "def _write(path, *a, **k):\n"
            f"    if path.parent.name.startswith('.{name}.tmp-'):\n        {body}\n"
            "    return _real(path, *a, **k)\nck.write_safetensors = _write\n")


def _ctrl_c_during_save(name: str, times: int) -> str:
    return _during_save(name, f"[signal.raise_signal(signal.SIGINT) for _ in range({times})]")


def _ctrl_c_in_step(n: int) -> str:
    """A Ctrl-C while the n-th step of this process runs."""
    return ("import signal\nimport megastream.engine.engine as em\n_step, _n = em.Engine.step, [0]\n"
            "def _s(self, *a, **k):\n    _n[0] += 1\n"
            f"    if _n[0] == {n}:\n        signal.raise_signal(signal.SIGINT)\n"
            "    return _step(self, *a, **k)\nem.Engine.step = _s\n")


def _hidden(out) -> list[str]:
    """Hidden entries (temporaries) beside and in output.dir; the token cache beside it is no temporary."""
    beside = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".") and p.name != ".megastream-cache")
    return beside + sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def _interrupted(proc, *needles):
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-3000:])
    assert "megastream: interrupted:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:  # the handler's note is on stdout, the exit message on stderr
        assert n in proc.stdout + proc.stderr, (n, proc.stdout[-2000:], proc.stderr[-3000:])


def _user_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "megastream: error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-3000:])


def _step_of(ckpt) -> int:
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


# ---- 3.1 Ctrl-C during a save ------------------------------------------------------------------------

def test_ctrl_c_during_the_final_save_lets_it_complete(tmp_path):
    """Before: the handler was gone by the final save, so the run died with neither final/ nor a checkpoint."""
    out = tmp_path / "run"
    proc = _cli(*_args(out), patch=_ctrl_c_during_save("final", 1))
    _interrupted(proc, "finishing the save of final/", "is complete")
    assert load_file(out / "final" / "model.safetensors") and (out / "final" / "config.json").is_file()
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3] and _hidden(out) == []


def test_ctrl_c_twice_during_the_final_save_of_a_run_without_checkpoints_still_completes_it(tmp_path):
    """No checkpoint on disk: abandoning final/ would lose the whole run, so a second Ctrl-C there is
    answered with a note and the save completes."""
    out = tmp_path / "run"
    proc = _cli(*_args(out), patch=_ctrl_c_during_save("final", 2))
    _interrupted(proc, "no checkpoint to fall back on", "is complete")
    assert load_file(out / "final" / "model.safetensors") and _hidden(out) == []
    assert not list(out.glob("checkpoint-*"))


def test_ctrl_c_in_the_last_step_then_again_during_final_save_leaves_a_checkpoint(tmp_path):
    """A run with no checkpoint, stopped in its last step: checkpoint-<last> is written first, so the
    second Ctrl-C (aborting final/) leaves something --resume finishes. Before: nothing was left."""
    out = tmp_path / "run"
    proc = _cli(*_args(out), patch=_ctrl_c_in_step(3) + _ctrl_c_during_save("final", 1))
    _interrupted(proc, "aborted", "checkpoint-3 is the last checkpoint", "--resume")
    assert not (out / "final").exists() and _hidden(out) == []
    assert _step_of(out / "checkpoint-3") == 3

    proc = run_cli(*_args(out), "--resume")
    assert "at step 3; all steps are done, writing final/ only" in proc.stdout
    assert load_file(out / "final" / "model.safetensors") and [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_ctrl_c_twice_during_the_final_save_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _cli(*_args(out, 3, 2), patch=_ctrl_c_during_save("final", 2))
    _interrupted(proc, "aborted", "checkpoint-2 is the last checkpoint")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.yaml", "metrics.jsonl"]
    assert _hidden(out) == []
    run_cli(*_args(out, 3, 2), "--resume")
    assert (out / "final" / "model.safetensors").is_file() and [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_ctrl_c_during_a_checkpoint_save_completes_it_and_twice_aborts_it(tmp_path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    proc = _cli(*_args(once, 4, 2), patch=_ctrl_c_during_save("checkpoint-2", 1))
    _interrupted(proc, "stopped after step 2 of 4")
    assert _step_of(once / "checkpoint-2") == 2 and _hidden(once) == []

    proc = _cli(*_args(twice, 4, 2), patch=_ctrl_c_during_save("checkpoint-4", 2))
    _interrupted(proc, "aborted", "checkpoint-2 is the last checkpoint")
    assert _step_of(twice / "checkpoint-2") == 2 and not (twice / "checkpoint-4").exists() and _hidden(twice) == []


# ---- 3.2 --overwrite -----------------------------------------------------------------------------------

def test_overwrite_removes_the_old_run_whole(tmp_path):
    """Before: the old run's checkpoint-*/ stayed, and a later --resume continued the old run."""
    out = tmp_path / "run"
    run_cli(*_args(out, 4, 2))
    run_cli(*_args(out, 2, 0), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "final", "metrics.jsonl"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2] and _hidden(out) == []  # nothing left to --resume


def test_overwrite_never_deletes_what_the_run_did_not_write(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    _user_error(run_cli(*_args(out), "--overwrite", check=False), "notes.txt", "did not write")
    (out / "notes.txt").unlink()
    make_hf_model("llama", out / "final")  # training from the run's own final/: --overwrite would delete it
    data = write_ids(tmp_path / "ids.jsonl", [[1, 2, 3, 4, 5, 6, 7, 8]] * 4)
    cfg = write_config(tmp_path / "run.yaml", {"model": {"path": str(out / "final")},
                                               "data": {"path": str(data), "seq_len": 8},
                                               "train": {"steps": 2, "warmup_steps": 0, "micro_batch_size": 2,
                                                         "grad_accum": 1},
                                               "output": {"dir": str(out), "progress": False}})
    _user_error(run_cli("train", str(cfg), "--overwrite", check=False), "model.path", "inside it")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "final", "metrics.jsonl"]


# ---- 3.3 metrics.jsonl cut short -----------------------------------------------------------------------

def test_resume_drops_a_truncated_metrics_line_with_a_warning(tmp_path):
    """Before: --resume died with a JSONDecodeError traceback."""
    out = tmp_path / "run"
    run_cli(*_args(out, 3, 2))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2] + [lines[2][:len(lines[2]) // 2]]))  # killed mid-write
    proc = run_cli(*_args(out, 3, 2), "--resume")
    assert re.search(r"warning: .*metrics\.jsonl:3 is not a whole metrics record.*; dropped", proc.stdout), proc.stdout
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


# ---- 3.4 disk full -------------------------------------------------------------------------------------

def _check_disk_full(out, proc, *needles):
    _user_error(proc, str(out / "checkpoint-4"), *needles)
    assert re.search(r"the save needs [\d,]+ bytes \([\d.]+ GB\)", proc.stderr), proc.stderr
    assert _step_of(out / "checkpoint-2") == 2 and len(list((out / "checkpoint-2" / "optimizer").iterdir())) == 6
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.yaml", "metrics.jsonl"]
    assert _hidden(out) == []


def test_too_little_free_disk_refuses_the_save_before_it_starts(tmp_path):
    """Before: the save started anyway (and a real full disk gave a raw traceback)."""
    out = tmp_path / "run"
    small = ("import shutil\n_du = shutil.disk_usage\n"  # 4096 bytes free once checkpoint-2 is written
             f"shutil.disk_usage = lambda p: _du(p)._replace(free=4096) if os.path.isdir({str(out / 'checkpoint-2')!r})"
             " else _du(p)\n")
    proc = _cli(*_args(out, 4, 2), patch="import os\n" + small)
    _check_disk_full(out, proc, "not enough disk space to write", "4,096 bytes (0.00 GB) free")


def test_disk_full_mid_save_is_a_message_and_leaves_no_temporary(tmp_path):
    """Before: OSError [Errno 28] as a raw traceback."""
    out = tmp_path / "run"
    proc = _cli(*_args(out, 4, 2), patch=_during_save(
        "checkpoint-4", "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))"))
    _check_disk_full(out, proc, "the disk filled up while writing")


# ---- 3.6 non-finite values in loaded files -------------------------------------------------------------

def test_nonfinite_model_weights_are_refused_on_load(tmp_path):
    """Before: the run trained (skipping every step) and only the final save refused the weights."""
    src, out = tmp_path / "model", tmp_path / "out"
    make_hf_model("llama", src)
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    data = write_ids(tmp_path / "ids.jsonl", [[1, 2, 3, 4, 5, 6, 7, 8]] * 4)
    cfg = write_config(tmp_path / "run.yaml", {"model": {"path": str(src)}, "data": {"path": str(data), "seq_len": 8},
                                               "train": {"steps": 2, "warmup_steps": 0, "micro_batch_size": 2,
                                                         "grad_accum": 1},
                                               "output": {"dir": str(out), "progress": False}})
    proc = run_cli("train", str(cfg), check=False)
    _user_error(proc, str(src / "model.safetensors"), "'model.layers.1.mlp.up_proj.weight'", "1 NaN or infinite")
    assert not out.exists()


def test_nonfinite_optimizer_state_is_refused_on_resume(tmp_path):
    """Before: --resume loaded an infinite second moment and trained on (that weight frozen)."""
    out = tmp_path / "run"
    run_cli(*_args(out, 3, 2))
    f = out / "checkpoint-2" / "optimizer" / "layer.1.safetensors"
    state = load_file(f)
    state["exp_avg_sq"][7] = float("inf")
    save_file(state, str(f))
    before = (out / "metrics.jsonl").read_bytes(), (out / "final" / "model.safetensors").stat().st_mtime_ns
    proc = run_cli(*_args(out, 3, 2), "--resume", check=False)
    _user_error(proc, str(f), "'exp_avg_sq'", "NaN or infinite", "earlier checkpoint")
    assert before == ((out / "metrics.jsonl").read_bytes(), (out / "final" / "model.safetensors").stat().st_mtime_ns)
    assert torch.isinf(load_file(f)["exp_avg_sq"]).sum() == 1  # nothing rewritten
