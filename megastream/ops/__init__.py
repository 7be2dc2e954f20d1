"""Host ops (the optimizer, NF4 quantization codes): the C++ build of csrc/adamw.cpp when it can be
had, else the pure-PyTorch reference (megastream.ops.reference), with one warning.

The extension is compiled on first use with torch.utils.cpp_extension (-O3 -fopenmp, no
-march=native) into ~/.cache/megastream/ (or $MEGASTREAM_CACHE), keyed by the sources, the compiler
flags, the torch version and the machine architecture, so later runs load it in milliseconds and
one cache serves every x86-64 CPU. The build holds one kernel per instruction-set path ("avx512",
"avx2", "scalar"), chosen at load from the CPU's features, widest first; `cpu_isa()` says which one
runs ("reference" when the fallback does). MEGASTREAM_CPU_ISA=avx512|avx2|scalar forces a path and
caps `supported_cpu_isas()` (an error if the CPU lacks it), `set_cpu_isa()` switches at run time
(the tests run every path the machine has). All paths give bit-identical results.
MEGASTREAM_NO_EXT=1 forces the fallback.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import psutil
import torch

from megastream.errors import MegastreamError
from megastream.ops import reference

_CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
_SRC = _CSRC / "adamw.cpp"
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]
ISAS = ("avx512", "avx2", "scalar")  # widest first
_state: dict = {}


class CpuIsaError(MegastreamError, RuntimeError):
    """MEGASTREAM_CPU_ISA or set_cpu_isa named a path that is unknown or that this CPU cannot run
    (the CLI prints the message without a traceback)."""


def _env_isa() -> str | None:
    """MEGASTREAM_CPU_ISA, checked: None when unset or "auto"."""
    v = os.environ.get("MEGASTREAM_CPU_ISA", "").strip().lower()
    if v in ("", "auto"):
        return None
    if v not in ISAS:
        raise CpuIsaError(f"MEGASTREAM_CPU_ISA={v!r}: expected one of {', '.join(ISAS)} (or auto)")
    return v


def _sources_digest() -> bytes:
    h = hashlib.sha1()
    for p in sorted([_SRC, *_CSRC.glob("*.h")]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.digest()


def _build() -> bool:
    if os.environ.get("MEGASTREAM_NO_EXT"):
        return False
    if not _SRC.is_file():
        warnings.warn(f"megastream: C++ ops source {_SRC} not found (install from a source checkout with "
                      "`pip install -e .`); using the slower pure-PyTorch optimizer", stacklevel=3)
        return False
    try:
        from torch.utils.cpp_extension import load

        key = hashlib.sha1(_sources_digest() + " ".join(_CFLAGS).encode() + torch.__version__.encode()
                           + platform.machine().encode()).hexdigest()[:12]
        root = Path(os.environ.get("MEGASTREAM_CACHE", Path.home() / ".cache" / "megastream"))
        name = f"megastream_ops_{key}"
        lib = root / f"ops-{key}" / f"{name}.so"
        if lib.is_file():
            torch.ops.load_library(str(lib))
        else:
            _build_into(root, key, name, lambda d: load(
                name=name, sources=[str(_SRC)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(_CSRC)], build_directory=str(d), is_python_module=False, verbose=False))
        return hasattr(torch.ops.megastream, "adamw_step")
    except Exception as e:  # no compiler, no ninja, a build error: fall back, once, loudly
        lines = str(e).strip().splitlines()
        why = next((line.strip() for line in lines if "error:" in line), lines[-1] if lines else "")
        warnings.warn(f"megastream: could not build the C++ optimizer ops ({type(e).__name__}: {why}); using the "
                      "slower pure-PyTorch fallback", stacklevel=3)
        return False


def _build_into(root: Path, key: str, name: str, build) -> None:
    """Build (and load) in a directory of this process's own, then rename it to ops-<key>/. No lock
    is shared: torch's build lock is a file that a build killed mid-way (Ctrl-C on a first run)
    leaves behind, after which every later start waits on it forever. Concurrent first runs each
    build; the first rename wins; a directory without the library is never taken for a build."""
    final = root / f"ops-{key}"
    for old in root.glob(".ops-*.tmp-*"):  # left by builds whose process is gone
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = root / f".ops-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)  # compiles, then loads tmp/<name>.so into this process
        if final.exists() and not (final / f"{name}.so").is_file():
            shutil.rmtree(final, ignore_errors=True)  # a half-built directory (older megastream, a crash)
        try:
            tmp.rename(final)
        except OSError:
            pass  # another process renamed its build first: the same sources and flags
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loaded library stays mapped


def have_ext() -> bool:
    """True when the compiled ops are loaded (building them on first call). Raises when
    MEGASTREAM_CPU_ISA names a path that is unknown or that this CPU cannot run."""
    if "ext" not in _state:
        env = _env_isa()
        ok = _build()
        if ok and env is not None:
            _set_ext_isa(env, "MEGASTREAM_CPU_ISA")
        _state["ext"] = ok
    return _state["ext"]


def _cpu_isas() -> list[str]:
    return list(torch.ops.megastream.cpu_isas())


def _set_ext_isa(isa: str, what: str) -> str:
    have = _cpu_isas()
    if isa not in have:
        raise CpuIsaError(f"{what}={isa}: this CPU cannot run the {isa} path of the C++ optimizer ops "
                           f"({'AVX-512 F/BW/DQ/VL' if isa == 'avx512' else 'AVX2, FMA and F16C'} missing; "
                           f"it can run: {', '.join(have)})")
    return torch.ops.megastream.set_cpu_isa(isa)


def cpu_isa() -> str:
    """The instruction-set path the ops run on: "avx512", "avx2", "scalar", or "reference" (the
    pure-PyTorch fallback)."""
    return torch.ops.megastream.cpu_isa() if have_ext() else "reference"


def describe_cpu_isa() -> str:
    """One line for `megastream env`: the path in use, what chose it, what this CPU has."""
    if not have_ext():
        return "reference (the pure-PyTorch fallback)"
    env = _env_isa()
    why = f"forced by MEGASTREAM_CPU_ISA={env}" if env else "the widest this CPU has"
    return f"{cpu_isa()} ({why}; this CPU can run: {', '.join(_cpu_isas())})"


def supported_cpu_isas() -> list[str]:
    """The paths this CPU can run, widest first, capped by MEGASTREAM_CPU_ISA when it is set (so
    MEGASTREAM_CPU_ISA=avx2 on an AVX-512 machine behaves as an AVX2 one); [] without the C++ ops."""
    if not have_ext():
        return []
    have = _cpu_isas()
    env = _env_isa()
    return have if env is None else [i for i in have if ISAS.index(i) >= ISAS.index(env)]


def set_cpu_isa(isa: str | None) -> str:
    """Switch the ops to `isa` ("avx512", "avx2", "scalar"), or back to the default with None or
    "auto" (MEGASTREAM_CPU_ISA's path, else the widest). Returns the active path. Process-wide: not
    for use while another thread runs an op."""
    if not have_ext():
        raise RuntimeError("the compiled megastream ops are not available (cpu_isa() is 'reference')")
    if isa is None or isa == "auto":
        env = _env_isa()
        return torch.ops.megastream.set_cpu_isa("auto") if env is None else _set_ext_isa(env, "MEGASTREAM_CPU_ISA")
    if isa not in ISAS:
        raise CpuIsaError(f"unknown CPU instruction-set path {isa!r}: expected one of {', '.join(ISAS)}")
    allowed = supported_cpu_isas()
    if isa in _cpu_isas() and isa not in allowed:
        raise CpuIsaError(f"set_cpu_isa({isa!r}): MEGASTREAM_CPU_ISA={_env_isa()} limits the C++ optimizer ops to "
                          f"{', '.join(allowed)}")
    return _set_ext_isa(isa, "set_cpu_isa")


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


def nf4_codes(x: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, out: torch.Tensor, *,
              use_ext: bool | None = None) -> None:
    """out <- the packed 4-bit NF4 codes of x's blocks of 64 (their absmaxes `absmax`, the 16 values
    `table` in x's dtype; megastream/adapters/quant.py): the C++ op (csrc/nf4.h) for CPU tensors when
    built, else torch ops (any device). Both give the same bytes."""
    if x.device.type == "cpu" and _use_ext(use_ext):
        torch.ops.megastream.nf4_codes(x.contiguous(), absmax, table, out)
    else:
        reference.nf4_codes(x, absmax, table, out)
