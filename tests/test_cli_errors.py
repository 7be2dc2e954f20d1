"""The real command line (`python -m megastream`): user mistakes exit 2 with a one-paragraph
`megastream: error:` message and no traceback, and a failed run never damages an earlier one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import megastream
from helpers import REPO, run_cli, write_config, write_ids

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = ["--set", "train.steps=2", "--set", "train.warmup_steps=0", "--set", "train.micro_batch_size=2",
        "--set", "train.grad_accum=1", "--set", "output.progress=false", "--set", "engine.device=cpu"]


def _user_error(proc, *needles: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert err.startswith("megastream: error:"), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_unknown_key_exits_2_naming_the_key(tmp_path):
    data = write_ids(tmp_path / "train.jsonl", [[1, 2, 3]])
    cfg = write_config(tmp_path / "run.yaml", {"model": {"preset": "tiny"}, "data": {"path": str(data)},
                                               "train": {"learning_rate": 1e-3},
                                               "output": {"dir": str(tmp_path / "out")}})
    proc = run_cli("train", str(cfg), check=False, cwd=tmp_path)
    err = _user_error(proc, "train.learning_rate", "lr", str(cfg))
    assert not (tmp_path / "out").exists()  # nothing was started
    assert proc.stdout == "", proc.stdout
    assert len(err.splitlines()) < 10


def test_missing_config_file_exits_2(tmp_path):
    proc = run_cli("train", "no-such-config.yaml", check=False, cwd=tmp_path)
    _user_error(proc, "no-such-config.yaml", "does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_exits_2(tmp_path):
    proc = run_cli("train", DEMO, "--set", "engine.device=cuda", "--set", "output.dir=out", check=False, cwd=tmp_path)
    _user_error(proc, "engine.device", "cuda")
    assert not (tmp_path / "out").exists()


def test_version():
    proc = run_cli("--version", check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"megastream {megastream.__version__}"
    assert megastream.__version__ == "0.1.0"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A successful two-step demo run into `A`, and a snapshot of everything it wrote."""
    root = tmp_path_factory.mktemp("cli")
    run_cli("train", DEMO, "--set", "output.dir=A", *TINY, cwd=root)
    out = root / "A"
    snap = _snapshot(out)
    assert "metrics.jsonl" in snap and "config.yaml" in snap
    assert any(k.startswith("final/") and k.endswith(".safetensors") for k in snap), list(snap)
    assert len(snap["metrics.jsonl"][0].decode().splitlines()) == 2
    return root, snap


def test_rerun_into_a_finished_run_needs_overwrite(finished_run):
    root, snap = finished_run
    proc = run_cli("train", DEMO, "--set", "output.dir=A", *TINY, cwd=root, check=False)
    _user_error(proc, "output.dir", "--overwrite", "already holds a run")
    assert _snapshot(root / "A") == snap


def test_malformed_data_line_exits_2_and_keeps_the_earlier_run(finished_run):
    root, snap = finished_run
    bad = root / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n')
    # --overwrite: the data is checked (and found bad) before anything in A is replaced
    proc = run_cli("train", DEMO, "--set", "output.dir=A", "--set", "data.path=bad.jsonl", "--overwrite", *TINY,
                   cwd=root, check=False)
    _user_error(proc, "bad.jsonl:3", "not valid JSON")
    assert _snapshot(root / "A") == snap


def test_sequence_longer_than_mistral_sliding_window_is_refused(tmp_path):
    from helpers import make_hf_model

    make_hf_model("mistral", tmp_path / "model")  # sliding_window=48
    data = write_ids(tmp_path / "train.jsonl", [[1, 2, 3, 4]] * 4)
    cfg = write_config(tmp_path / "run.yaml", {"model": {"path": str(tmp_path / "model")},
                                               "data": {"path": str(data), "seq_len": 56},
                                               "output": {"dir": str(tmp_path / "out")}})
    proc = run_cli("train", str(cfg), check=False)
    _user_error(proc, "data.seq_len=56", "sliding_window=48", "data.seq_len <= 48")
    assert not (tmp_path / "out").exists()
