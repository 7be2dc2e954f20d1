"""Facts about this machine that decide whether a run fits: RAM, GPUs, the locked-memory limit.
Cheap to call (no CUDA context is created: GPU facts come from NVML)."""

from __future__ import annotations

import os
import platform
import resource
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import psutil


def cache_dir() -> Path:
    """Where megastream keeps built ops and probe results ($MEGASTREAM_CACHE, else ~/.cache/megastream)."""
    return Path(os.environ.get("MEGASTREAM_CACHE", Path.home() / ".cache" / "megastream"))


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    driver: str


@dataclass(frozen=True)
class Machine:
    hostname: str
    cpu: str
    cores: int
    ram_total: int
    ram_available: int
    memlock_limit: int | None  # bytes, None = unlimited
    gpus: list[Gpu] = field(default_factory=list)
    nvml_error: str | None = None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo), e.g. avx2, avx512_bf16, amx_bf16; empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next(line.split(":", 1)[1].split() for line in f
                                  if line.split(":", 1)[0].strip() in ("flags", "Features")))
    except (OSError, StopIteration):
        return frozenset()


def _nvml() -> tuple[list[Gpu], str | None]:
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no driver: a CPU-only machine
        return [], f"NVML unavailable ({e})"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append(Gpu(i, name.decode() if isinstance(name, bytes) else name,
                            int(pynvml.nvmlDeviceGetMemoryInfo(h).total), driver))
        return gpus, None
    finally:
        pynvml.nvmlShutdown()


@lru_cache(maxsize=1)
def _gpus() -> tuple[tuple[Gpu, ...], str | None]:
    gpus, err = _nvml()
    return tuple(gpus), err


def machine() -> Machine:
    vm = psutil.virtual_memory()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    gpus, err = _gpus()
    return Machine(hostname=platform.node(), cpu=cpu_name(), cores=os.cpu_count() or 1, ram_total=vm.total,
                   ram_available=vm.available, memlock_limit=None if soft == resource.RLIM_INFINITY else soft,
                   gpus=list(gpus), nvml_error=err)


def rss() -> int:
    """This process's resident set size, bytes."""
    return psutil.Process().memory_info().rss


def release_freed_memory() -> None:
    """Hand the heap memory that glibc malloc keeps after frees back to the kernel (malloc_trim). Loading
    and initialising a model frees many tensor-sized temporaries (a read tensor, a random-init piece, a
    layer staged for quantization): malloc keeps them for reuse, and the step's larger buffers, mapped
    anew, do not reuse them, so without this they stay in the RSS for the whole run (measured: 0.26 GB of
    a qwen2.5-0.5b NF4 LoRA run's 2.3 GB peak). A no-op where the C library has no malloc_trim."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def vm_hwm(pid: int | str = "self") -> int | None:
    """Peak resident set size of process `pid` (default: this one), bytes: VmHWM from
    /proc/<pid>/status, the high-water mark of that address space; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident set size so far, bytes: VmHWM. Not getrusage's ru_maxrss, which
    Linux carries across exec: a child forked from a large parent reports at least the parent's size
    (ru_maxrss only where /proc is missing)."""
    peak = vm_hwm()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
