import gc
import os
import platform
import time

# As megastream/__init__.py does before torch loads (tests run the CLI in this process too).
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores on CI: keep torch from oversubscribing them when tests run subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (each over the 60 s budget of the default run)")


def pytest_report_header(config):
    """The CPU and the vector paths in use, so a failure on another machine can be read."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = " ".join(f for f in _ISA_FLAGS if f in flags) or "none of avx2/avx512/amx"
    forced = {k: os.environ[k] for k in ("MEGASTREAM_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
              if k in os.environ}
    from megastream import ops

    return [f"cpu: {model}, {os.cpu_count()} cores; {isa}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}" + (f"; forced {forced}" if forced else ""),
            f"megastream C++ ops: {ops.describe_cpu_isa()}, ready in {_OPS_READY_S:.1f} s"]


_OPS_READY_S = 0.0


def pytest_sessionstart(session):
    """Build (or load) the C++ ops once, before any test: a first build takes tens of seconds and
    would otherwise land on whichever test happens to run first."""
    global _OPS_READY_S
    from megastream import ops

    t = time.perf_counter()
    ops.have_ext()
    _OPS_READY_S = time.perf_counter() - t


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_marked(request, monkeypatch):
    """Tests without the gpu marker run on the CPU even on a GPU machine: `engine.device: auto`
    would otherwise pick CUDA and bf16, where fp32 CPU tolerances do not hold. In this process
    torch.cuda.is_available() answers False; CLI subprocesses see no GPU. gpu tests state their
    device and dtype themselves."""
    if "gpu" in request.keywords:
        yield
        # Nothing a GPU test leaves (a memory cap, tensors held by a failed test's traceback) reaches the
        # next: on the first H200 run, one test's 1.5 GB cap made four later tests run out of memory.
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield
