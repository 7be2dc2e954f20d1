"""engine.activations: host offloads the layer-boundary checkpoints and brings them back for
backward; the result must be bit-identical to keeping them on the device.

On the CPU the two runs are bit-identical as they stand. On CUDA, SDPA's backward (flash and
memory-efficient kernels accumulate with atomics) and cuBLAS (split-K reductions, workspace-dependent
algorithms) may sum in another order from run to run, so two runs of the same computation compare
bitwise only under torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG set."""

import contextlib
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, read_metrics
from megastream.config import load_config
from megastream.engine.activations import Checkpoints
from megastream.engine.streams import Streams
from megastream.train import train

DEMO = REPO / "configs" / "demo.yaml"
CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's documented setting for reproducible results across runs
DEVICES = {"cpu": ("engine.device=cpu", "engine.dtype=float32"),  # stated, not left to engine.device: auto
           "cuda": ("engine.device=cuda", "engine.dtype=bfloat16")}


@contextlib.contextmanager
def reproducible(device: str):
    """Deterministic algorithms on CUDA (the CPU needs none), restored afterwards."""
    if device != "cuda":
        yield
        return
    old_mode = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    old_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(True)  # not warn_only: an op without a deterministic kernel raises
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_mode[0], warn_only=old_mode[1])
        if old_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = old_env


def _run(out, device, mode, *sets):
    cfg = load_config(DEMO, ["train.steps=3", "train.warmup_steps=0", "train.micro_batch_size=4",
                             "train.grad_accum=3", "output.progress=false", f"output.dir={out}",
                             *DEVICES[device], f"engine.activations={mode}", *sets])
    with reproducible(device):
        train(cfg, log=lambda *a: None)
    return read_metrics(out), load_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("sets", [(), ("data.pack=false", "train.grad_clip=0")], ids=["packed", "unpacked-noclip"])
def test_host_offload_is_bit_identical(tmp_path, device, sets):
    m_dev, w_dev = _run(tmp_path / "dev", device, "device", *sets)
    m_host, w_host = _run(tmp_path / "host", device, "host", *sets)
    assert [(r["loss"], r["grad_norm"]) for r in m_dev] == [(r["loss"], r["grad_norm"]) for r in m_host]
    assert all(torch.equal(w_dev[k], w_host[k]) for k in w_dev)


def test_cuda_comparison_runs_deterministically_and_restores_the_mode(monkeypatch):
    """The CUDA run of the test above is compared under deterministic algorithms; the CPU run, and
    everything after either, under the mode as it was. (torch.use_deterministic_algorithms is
    recorded, not called: its first call imports torch._inductor, seconds on a small machine.)"""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode, warn_only=False: calls.append((mode, warn_only)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with reproducible("cpu"):
        assert calls == []
    with reproducible("cuda"):
        assert calls == [(True, False)]  # not warn_only: an op without a deterministic kernel raises
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    assert calls == [(True, False), (False, False)] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_checkpoints_round_trip_and_reuse_the_arena():
    ck = Checkpoints(torch.device("cpu"), Streams(torch.device("cpu")), "host")
    for step in range(2):
        xs = [torch.randn(2, 5, 8) + step, torch.randn(1, 5, 8)]
        ck.begin(3, xs)
        saved = {}
        for i in range(3):
            layer_in = [x * (i + 1) for x in xs]
            ck.save(i, layer_in)
            saved[i] = [x.clone() for x in layer_in]
        arena = ck._arena
        for i in reversed(range(3)):
            got = ck.take(i)
            ck.prefetch(i - 1)
            assert all(torch.equal(a, b) for a, b in zip(got, saved[i]))
        assert ck._arena is arena and arena.numel() == 3 * (80 + 40)
    ck.close()
