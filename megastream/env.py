"""`megastream env`: what this installation and machine are, for bug reports and sanity checks."""

from __future__ import annotations

import platform
import sys

import torch

from megastream import __version__
from megastream.machine import cache_dir, machine


def env_lines() -> list[str]:
    from megastream import ops

    m = machine()
    lines = [f"megastream {__version__}", f"python {sys.version.split()[0]} ({platform.platform()})",
             f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU build)'}"
             f", torch.cuda.is_available() {torch.cuda.is_available()}"]
    for mod in ("safetensors", "tokenizers", "transformers", "pynvml", "matplotlib", "tensorboard"):
        try:
            v = __import__(mod).__version__
        except ImportError:
            v = "not installed"
        except AttributeError:
            v = "installed"
        lines.append(f"  {mod} {v}")
    ext = ops.have_ext()
    lines.append(f"C++ ops (csrc/adamw.cpp): {'built, in use' if ext else 'NOT built: using the PyTorch fallback'}"
                 f" (cache {cache_dir()})")
    lines.append(f"  CPU instruction-set path: {ops.describe_cpu_isa()}")
    lines.append(f"CPU: {m.cpu}, {m.cores} cores; torch threads {torch.get_num_threads()}")
    lines.append(f"RAM: {m.ram_total / 1e9:.1f} GB total, {m.ram_available / 1e9:.1f} GB available")
    memlock = "unlimited" if m.memlock_limit is None else f"{m.memlock_limit / 2**20:.0f} MiB"
    lines.append(f"locked-memory limit (ulimit -l): {memlock}")
    if m.gpus:
        lines.append(f"NVIDIA driver {m.gpus[0].driver}")
        for g in m.gpus:
            lines.append(f"  GPU {g.index}: {g.name}, {g.total_bytes / 1e9:.1f} GB")
    else:
        lines.append(f"GPUs: none ({m.nvml_error})")
    return lines


def print_env() -> int:
    print("\n".join(env_lines()))
    return 0
