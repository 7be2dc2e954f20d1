"""The CUDA device is chosen once, with its index: torch.cuda calls such as
set_per_process_memory_fraction reject an index-less torch.device("cuda") (issue: every run with
engine.gpu_memory_gb set died at start). Checked on the CPU with torch.cuda mocked."""

from types import SimpleNamespace

import pytest
import torch
from torch._utils import _get_device_index

from megastream.config import Config, EngineConfig
from megastream.resolve import resolve_device
from megastream.train import cap_gpu_memory


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = []

    def set_fraction(fraction, device=None):
        # torch's own check, as torch.cuda.set_per_process_memory_fraction runs it (optional=False)
        calls.append((fraction, _get_device_index(device, optional=False)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80e9))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    return calls


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_cuda_device_carries_its_index(fake_cuda, device):
    d = resolve_device(Config(engine=EngineConfig(device=device)))
    assert d == torch.device("cuda", 1)


def test_memory_cap_on_the_resolved_device(fake_cuda):
    cfg = Config(engine=EngineConfig(device="cuda", gpu_memory_gb=24))
    cap_gpu_memory(cfg, resolve_device(cfg))
    assert fake_cuda == [(pytest.approx(0.3), 1)]
    with pytest.raises(ValueError):  # what every capped run hit before: the index-less device
        cap_gpu_memory(cfg, torch.device("cuda"))



def test_a_run_lifts_its_memory_cap_when_it_ends(fake_cuda, monkeypatch):
    """The allocator's fraction is per process: a run (failed or not) must not leave it to the next run
    in the same process. On the first H200 run, one test's 1.5 GB cap made four later tests run out of
    memory."""
    import megastream.train as T

    def fail(cfg, comm, device, *rest):
        T.cap_gpu_memory(cfg, device)
        raise RuntimeError("a step failed")

    monkeypatch.setattr(T, "join", lambda cfg: (None, torch.device("cuda", 1)))
    monkeypatch.setattr(T, "_train", fail)
    with pytest.raises(RuntimeError, match="a step failed"):
        T.train(Config(engine=EngineConfig(device="cuda", gpu_memory_gb=24)))
    assert fake_cuda == [(pytest.approx(0.3), 1), (1.0, 1)]

def test_cpu_stays_cpu():
    assert resolve_device(Config(engine=EngineConfig(device="cpu"))) == torch.device("cpu")
