"""The one CUDA runtime call torch does not bind: cudaGetLastError.

A failed runtime call (e.g. cudaHostRegister) also leaves its error as this host thread's "last
error"; torch reads that after every kernel launch (C10_CUDA_KERNEL_LAUNCH_CHECK) and would blame
the next, innocent kernel. `torch.cuda.cudart()` binds no cudaGetLastError, so it is called through
ctypes on the libcudart torch itself loaded (found in /proc/self/maps): a libcudart loaded
separately would be another runtime instance, with its own last-error state.
"""

from __future__ import annotations

import ctypes
import re

_LIBCUDART = re.compile(r"libcudart(-[0-9a-f]+)?\.so(\.\d+)*")  # libcudart.so.13, or a wheel's libcudart-1a2b.so.12
_lib: ctypes.CDLL | None = None


def find_libcudart(maps: str = "/proc/self/maps") -> str | None:
    """Path of the libcudart mapped into this process, or None (a CPU build of torch, a static
    runtime, not Linux)."""
    try:
        with open(maps) as f:
            for line in f:
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                if len(fields) == 6 and _LIBCUDART.fullmatch(fields[5].rstrip("\n").rsplit("/", 1)[-1]):
                    return fields[5].rstrip("\n")
    except OSError:
        pass
    return None


def _cudart() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        path = find_libcudart()
        if path is not None:
            try:
                _lib = ctypes.CDLL(path)  # already loaded: dlopen returns torch's instance
            except OSError:
                return None
    return _lib


def clear_last_error() -> int | None:
    """Read and reset this thread's CUDA runtime last error (cudaGetLastError). Returns the code
    cleared (0: there was none), or None where no CUDA runtime is loaded. Never raises."""
    lib = _cudart()
    if lib is None:
        return None
    try:
        return int(lib.cudaGetLastError())
    except (AttributeError, OSError):
        return None
