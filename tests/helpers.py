"""Shared test fixtures: tiny Hugging Face models written with save_pretrained, data files, configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

LLAMA_KW = dict(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=64,
                tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                              "rope_theta": 500000.0})
QWEN3_KW = dict(vocab_size=72, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64,
               tie_word_embeddings=False, attention_bias=True)
MISTRAL_KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=64, sliding_window=48,
                  tie_word_embeddings=False)
QWEN2_KW = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=True)


def make_hf_model(kind: str, path: Path, seed: int = 0, max_shard_size=None):
    """A tiny random Llama / Qwen2 / Qwen3 / Mistral causal LM saved in fp32 with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_KW))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_KW))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_KW))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**MISTRAL_KW))
    with torch.no_grad():  # transformers inits biases to 0 and norms to 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.float()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return model


def write_ids(path: Path, rows: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path


def write_config(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path | None = None, check: bool = True,
            isolate: bool = False) -> subprocess.CompletedProcess:
    """`megastream ARGS` through the real entry point, megastream.cli.main: argument parsing, error
    messages and exit codes as a user sees them. In this process by default (a new interpreter
    costs seconds of imports per call, most of the suite's time on two cores); `isolate` runs
    `python -m megastream` in a child, for what needs its own process (signals, exits, peak RSS)."""
    if isolate:
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-m", "megastream", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
    else:
        proc = _run_in_process(list(args), cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"megastream {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _run_in_process(args: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import traceback

    from megastream.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    threads = torch.get_num_threads()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse errors, --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # as the interpreter would: a traceback and exit status 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)  # engine.threads must not leak into later tests
    return subprocess.CompletedProcess(["megastream", *args], code or 0, out.getvalue(), err.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fp_tol(dtype: torch.dtype, n_terms: int, k: float = 8.0) -> float:
    """Relative norm-wise tolerance for two computations of the same value that round differently
    (another summation order, blocking, vector width or CPU): k * eps(dtype) * sqrt(n), n the number
    of terms accumulated into each element. Rounding errors of a sum of n terms grow like sqrt(n) for
    random-signed errors (the worst case is n); k covers the few rounded operations per term. This is
    a bound from the dtype, never from what one CPU happened to round."""
    return k * torch.finfo(dtype).eps * math.sqrt(max(n_terms, 1))


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, n_terms: int, k: float = 8.0,
                          msg: str = "") -> None:
    """||actual - expected|| / ||expected|| <= fp_tol(dtype, n_terms, k). Norm-wise, not element-wise:
    element-wise relative checks break on elements near zero (e.g. gradients of barely-used rows),
    whose absolute error is set by the large elements they were summed with."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape, msg)
    tol = fp_tol(expected.dtype, n_terms, k)
    err = rel_err(actual, expected)
    assert err <= tol, f"{msg}: relative norm-wise error {err:.3g} > {tol:.3g} ({k:g} eps sqrt({n_terms}))"


def padded_rows(rows: list[list[int]], seq: int):
    """(input ids, next-token labels) of a reference micro-batch: each row padded to `seq` with 0,
    labels -100 on padding and on each row's last token."""
    import torch

    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    labels = torch.full((len(rows), seq), -100, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r)
        labels[j, :len(r) - 1] = torch.tensor(r[1:])
    return ids, labels


def random_micro_batches(spec, M: int, B: int, S: int, seed: int = 0) -> list:
    """M micro-batches of B random rows of S tokens, next-token labels, the first row's first 3
    labels ignored (so the loss-token count is not simply B * S)."""
    import torch

    from megastream.engine.engine import MicroBatch
    from megastream.engine.loss import IGNORE

    g = torch.Generator().manual_seed(seed)
    mbs = []
    for _ in range(M):
        ids = torch.randint(0, spec.vocab_size, (B, S), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((B, 1), IGNORE)], dim=1)
        labels[0, :3] = IGNORE
        mbs.append(MicroBatch(ids, labels))
    return mbs


def torchrun(*args: str, nproc: int = 2, env: dict | None = None, check: bool = True,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m megastream ARGS` (one thread per rank: 2 cores)."""
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megastream", *args]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-5000:]}")
    return proc
