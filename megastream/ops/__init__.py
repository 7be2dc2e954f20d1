"""Host optimizer ops: the C++ build of csrc/adamw.cpp when it can be had, else the pure-PyTorch
reference (megastream.ops.reference), with one warning.

The extension is compiled on first use with torch.utils.cpp_extension (-O3 -march=native -fopenmp)
into ~/.cache/megastream/ (or $MEGASTREAM_CACHE), keyed by the source, the compiler flags and this
CPU's instruction set, so later runs load it in milliseconds. MEGASTREAM_NO_EXT=1 forces the
fallback.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from megastream.ops import reference

_SRC = Path(__file__).resolve().parent.parent.parent / "csrc" / "adamw.cpp"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]
_state: dict = {}


_ISA_PREFIXES = ("avx", "sse", "ssse", "fma", "f16c", "amx", "bmi", "popcnt", "lzcnt", "movbe", "vnni", "asimd",
                 "sve", "neon")


def _cpu_signature() -> str:
    """The instruction-set flags -march=native compiles for. Only those: a VM's full flag list can
    change between runs (migration, mitigations) and would force needless rebuilds."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith(("flags", "Features"))).split(":", 1)[1].split()
    except (OSError, StopIteration, IndexError):
        return os.uname().machine
    return os.uname().machine + " " + " ".join(sorted(f for f in flags if f.startswith(_ISA_PREFIXES)))


def _build() -> bool:
    if os.environ.get("MEGASTREAM_NO_EXT"):
        return False
    if not _SRC.is_file():
        warnings.warn(f"megastream: C++ ops source {_SRC} not found (install from a source checkout with "
                      "`pip install -e .`); using the slower pure-PyTorch optimizer", stacklevel=3)
        return False
    try:
        from torch.utils.cpp_extension import load

        key = hashlib.sha1(_SRC.read_bytes() + " ".join(_CFLAGS).encode() + _cpu_signature().encode()
                           + torch.__version__.encode()).hexdigest()[:12]
        cache = Path(os.environ.get("MEGASTREAM_CACHE", Path.home() / ".cache" / "megastream")) / f"ops-{key}"
        cache.mkdir(parents=True, exist_ok=True)
        load(name=f"megastream_ops_{key}", sources=[str(_SRC)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(cache), is_python_module=False, verbose=False)
        return hasattr(torch.ops.megastream, "adamw_step")
    except Exception as e:  # no compiler, no ninja, a build error: fall back, once, loudly
        warnings.warn(f"megastream: could not build the C++ optimizer ops ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using the slower "
                      "pure-PyTorch fallback", stacklevel=3)
        return False


def have_ext() -> bool:
    """True when the compiled ops are loaded (building them on first call)."""
    if "ext" not in _state:
        _state["ext"] = _build()
    return _state["ext"]


_EMPTY = torch.empty(0)


def _use_ext(use_ext: bool | None) -> bool:
    if use_ext is None:
        return have_ext()
    if use_ext and not have_ext():
        raise RuntimeError("the compiled megastream ops were asked for but could not be built")
    return use_ext


def adamw_step(weights, grad, exp_avg, exp_avg_sq, m_scale=None, v_scale=None, working=None, *, n_decay: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               grad_scale: float = 1.0, key: int = 0, use_ext: bool | None = None) -> None:
    """One fused AdamW update of a unit's flat buffers, in place (see csrc/adamw.cpp for modes)."""
    ext = _use_ext(use_ext)
    m_scale = _EMPTY if m_scale is None else m_scale
    v_scale = _EMPTY if v_scale is None else v_scale
    working = _EMPTY if working is None else working
    fn = torch.ops.megastream.adamw_step if ext else reference.adamw_step
    fn(weights, grad, exp_avg, exp_avg_sq, m_scale, v_scale, working, n_decay, lr, beta1, beta2, eps,
       weight_decay, step, grad_scale, key & 0xFFFFFFFF)


def accumulate_sqnorm(dst: torch.Tensor, src: torch.Tensor | None = None, alpha: float = 1.0, *,
                      use_ext: bool | None = None) -> float:
    """dst += alpha * src (when given) and return ||dst||^2, in one pass."""
    ext = _use_ext(use_ext)
    if ext:
        return torch.ops.megastream.accumulate_sqnorm(dst, src, alpha)
    return reference.accumulate_sqnorm(dst, src, alpha)
