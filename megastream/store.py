"""The host store: where the model lives between steps.

Every kind of per-parameter state is one large flat arena, and each unit (embed, layer i, head;
see model/layout.py) is a contiguous slice of it:

  working  compute dtype  the copy streamed to the device (pinned: it crosses PCIe every pass)
  master   fp32           the weights the optimizer updates (optim.master: fp32); aliases `working`
                          when computing in fp32; absent with optim.master: none, where the bf16
                          working copy is the weights (updated with stochastic rounding)
  m, v     fp32 | bf16 | int8 (+ one fp32 scale per 256-element block each)   AdamW moments
  grad     grad dtype     gradient staging, written by D2H copies (pinned); layers and head only
  embed_grad fp32         the embedding's gradient, accumulated on the host (pinned)

A frozen base (LoRA, trainable=False) holds the working copy only: no master, moments or staging.
A quantized frozen base (quant="int8" | "nf4") holds each layer's 2-D projections quantized instead
(adapters/quant.py's flat buffers, in `packed`: per layer [projections quantized | norms and biases
in the compute dtype], 16-byte aligned); the working arena then holds the embedding and head only.
A layer's tensors are written (load or init) into a full-precision staging buffer (`weights_of`),
then packed by `finish_unit` (quantized there) and the staging freed: peak memory is the quantized
store plus the layers being read.

Model state in host bytes per parameter (bf16 compute): 2 + 4 + 8 = 14 (full precision),
2 + 4 = 6 (no master, bf16 states), 2 + 2 + 8/256 = 4.03 (no master, int8 states); gradient
staging adds 2 (bf16) or 4 (fp32). State slices start on 256-element boundaries (int8 blocks).
Pinned arenas are registered with cudaHostRegister (pinned_zeros): torch's pinned allocator would
round every allocation up to a power of two (a 28 GB arena would take 32 GB) and pinning per tensor
is slow.
"""

from __future__ import annotations

import mmap
import os
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from megastream import cuda
from megastream.model.layout import UnitLayout


def pinned_zeros(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, Callable[[], None]]:
    """A zero-filled host tensor, page-locked in place for as long as it lives, and its `release`.

    Its memory is an anonymous mmap (page-aligned, zero pages: no rounding up, unlike torch's pinned
    allocator, which would give a 28 GB arena 32 GB) registered with cudaHostRegister. The
    registration ends (`release`, at most once) when the caller says so, or by a finalizer when the
    last tensor viewing the memory is freed, before its pages are unmapped. Registering memory that
    torch's allocator owns could not promise that: an arena freed while still registered (a store
    never closed, an exception) leaves a stale registration at addresses the next allocation may
    reuse, and then cudaHostRegister there fails (CUDA error 712, already registered) and copies
    through it fail ('invalid argument'). If registering fails, the fallback is torch's pinned
    allocator (with its rounding) and a warning."""
    if numel == 0:
        return torch.zeros(0, dtype=dtype), _no_release
    nbytes = numel * dtype.itemsize
    buf = mmap.mmap(-1, nbytes)  # anonymous, private, zero-filled
    # The tensors hold a numpy array, which holds the mmap. The finalizer watches the array: when the
    # last view dies, numpy clears the array's weak references before it lets go of the mmap, so the
    # registration ends while the pages are still mapped. (A finalizer on the mmap itself would run
    # after CPython's munmap.)
    owner = np.frombuffer(buf, dtype=np.uint8)
    t = torch.from_numpy(owner).view(dtype)
    ptr = t.data_ptr()
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
    if err == 0:
        release = weakref.finalize(owner, _unregister, ptr)
        release.atexit = False  # at exit the driver releases it with the process
        return t, release
    # The failed call also set this thread's CUDA last error, which the next checked kernel launch
    # would report as its own failure: clear it before the fallback's first use of the device.
    cuda.clear_last_error()
    warnings.warn(f"cudaHostRegister of {nbytes / 1e9:.2f} GB failed (CUDA error {err}); falling back to "
                  "torch's pinned allocator, which rounds each arena up to a power of two", stacklevel=2)
    del t, owner, buf
    return torch.zeros(numel, dtype=dtype).pin_memory(), _no_release


def _no_release() -> None:  # what a tensor that is not registered needs to release
    pass


def _unregister(ptr: int) -> None:
    """Undo pinned_zeros' registration. Host waits for the device first: an H2D copy out of the memory
    or a D2H copy into it may still be in flight, and must not outlive the registration."""
    torch.cuda.synchronize()  # (the memory was registered through torch's CUDA runtime: CUDA is up)
    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err:
        cuda.clear_last_error()  # as in pinned_zeros: not for the next kernel launch to report
        warnings.warn(f"cudaHostUnregister failed (CUDA error {err})", stacklevel=2)


STATE_DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
                "int8": (torch.int8, torch.uint8)}
BLOCK = 256  # elements per int8 quantisation block (csrc/adamw.cpp kBlock)
_INIT_PIECE = 1 << 22  # elements per independently seeded piece of a random init


class HostStore:
    def __init__(self, units: list[UnitLayout], compute_dtype: torch.dtype, grad_dtype: torch.dtype,
                 pin: bool, master: bool = True, states: str = "fp32", trainable: bool = True,
                 quant: str | None = None, rotating_grads: bool = False):
        """`rotating_grads` (optim.clip: previous): gradient staging is the head's slice and two slots of
        the largest layer, used by layers of alternating parity (a layer's update consumes its gradient
        before the layer two further down the backward lands there), not one slice per unit."""
        if quant is not None and trainable:
            raise ValueError("a quantized store is a frozen base (trainable=False)")
        self.units = units
        self.full_units = units  # the units as the model sees them (a ShardedStore holds slices of them)
        self.quant = quant
        self.compute_dtype = compute_dtype
        self.grad_dtype = grad_dtype
        self.states = states
        self.trainable = trainable
        master = master and trainable
        sizes = [u.numel for u in units]
        self._pin_arenas = pin
        self._releases: list[Callable[[], None]] = []  # the pinned arenas' registrations (close ends them)
        self._plan_packing(quant)
        wsizes = [0 if u in self.packing else s for u, s in enumerate(sizes)]  # packed layers: not in `working`
        self.offsets = [sum(wsizes[:i]) for i in range(len(wsizes) + 1)]
        padded = [-(-n // BLOCK) * BLOCK for n in sizes]
        self.state_offsets = [sum(padded[:i]) for i in range(len(padded) + 1)]
        n = self.offsets[-1]
        n_embed = sizes[0]
        self.numel = sum(sizes)

        arena = self._arena
        aliased = compute_dtype == torch.float32
        self.working = arena(n, compute_dtype)
        self.master = (self.working if aliased else torch.zeros(n, dtype=torch.float32)) if master else None
        m_dtype, v_dtype = STATE_DTYPES[states]
        ns = self.state_offsets[-1] if trainable else 0
        self.m = torch.zeros(ns, dtype=m_dtype)
        self.v = torch.zeros(ns, dtype=v_dtype)
        n_blocks = ns // BLOCK if states == "int8" else 0
        self.m_scale = torch.zeros(n_blocks, dtype=torch.float32)
        self.v_scale = torch.zeros(n_blocks, dtype=torch.float32)
        # Gradient staging for units 1.. (the embedding accumulates separately, in fp32).
        self.rotating = rotating_grads and trainable
        self._slot = max(sizes[1:-1]) if self.rotating else 0
        self.grad = arena((2 * self._slot + sizes[-1] if self.rotating else n - n_embed) if trainable else 0,
                          grad_dtype)
        self.embed_grad = arena(n_embed if trainable else 0, torch.float32)

    def _arena(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Zeros; page-locked when the store pins (what crosses PCIe: working, packed, grad, embed_grad),
        allocated pinned from the start: never a second copy (a 72B NF4 base's packed arena is ~40 GB)."""
        if not self._pin_arenas:
            return torch.zeros(numel, dtype=dtype)
        t, release = pinned_zeros(numel, dtype)
        self._releases.append(release)
        return t

    def _plan_packing(self, quant: str | None) -> None:
        """packing[u]: (entry, byte offset, bytes, quantized) for each tensor of a packed layer."""
        from megastream.adapters.quant import packed_nbytes

        self.packing: dict[int, list[tuple]] = {}
        self.packed_offsets = [0]
        self._staging: dict[int, torch.Tensor] = {}
        item = self.compute_dtype.itemsize
        for u, unit in enumerate(self.units):
            if quant is None or not unit.name.startswith("layer."):
                continue
            rows, off = [], 0
            for e in sorted(unit.entries, key=lambda e: not e.decay):  # quantized first: each 16-byte aligned
                try:  # a 2-D projection, or a 3-D stack of experts quantized expert by expert
                    nb = packed_nbytes(e.shape, quant) if e.decay else e.numel * item
                except ValueError as err:
                    raise ValueError(f"{unit.name}.{e.key}: {err}") from None
                rows.append((e, off, nb, e.decay))
                off += nb
            self.packing[u] = rows
            self.packed_offsets.append(self.packed_offsets[-1] + -(-off // 16) * 16)
        self._packed_index = {u: k for k, u in enumerate(self.packing)}
        self.packed = self._arena(self.packed_offsets[-1], torch.uint8)

    def packed_of(self, u: int) -> torch.Tensor:
        """Layer u's quantized host buffer (uint8): what one H2D copy streams."""
        k = self._packed_index[u]
        lo = self.packed_offsets[k]
        return self.packed[lo:lo + sum(r[2] for r in self.packing[u])]

    def finish_unit(self, u: int) -> None:
        """Pack (quantize) unit u's staged full-precision weights into `packed` and free the staging."""
        from megastream.adapters.quant import pack

        flat = self._staging.pop(u, None)
        if flat is None:
            return
        dst, views = self.packed_of(u), self.units[u].views(flat)
        for e, off, nb, q in self.packing[u]:
            if q:
                pack(views[e.key], self.quant, dst[off:off + nb])
            else:
                dst[off:off + nb].view(self.compute_dtype).copy_(views[e.key].reshape(-1))

    def unpack(self, u: int, src: torch.Tensor, out: torch.Tensor) -> None:
        """Dequantize layer u's packed buffer `src` (a copy of packed_of(u), on any device) into `out`,
        the layer's flat layout in the compute dtype, on `out`'s device (no host sync)."""
        from megastream.adapters.quant import unpack

        views = self.units[u].views(out)
        for e, off, nb, q in self.packing[u]:
            if q:
                unpack(src[off:off + nb], e.shape, self.quant, views[e.key])
            else:
                views[e.key].view(-1).copy_(src[off:off + nb].view(self.compute_dtype))

    @property
    def weights(self) -> torch.Tensor:
        """The arena the optimizer updates: the fp32 master, or the working copy without one."""
        return self.master if self.master is not None else self.working

    def close(self) -> None:
        """Unregister the pinned arenas now (each waits for the device first: see _unregister); they
        stay usable as ordinary host memory. Without close, a finalizer does it when they are freed."""
        for release in self._releases:
            release()
        self._releases.clear()

    # ---- per-unit slices (views, no copies) --------------------------------------------------
    def _slice(self, arena: torch.Tensor, u: int) -> torch.Tensor:
        return arena[self.offsets[u]:self.offsets[u + 1]]

    def working_of(self, u: int) -> torch.Tensor:
        return self._slice(self.working, u)

    def weights_of(self, u: int) -> torch.Tensor:
        """Unit u's weights; for a packed layer, its full-precision staging buffer (see finish_unit)."""
        if u in self.packing:
            if u not in self._staging:
                self._staging[u] = torch.zeros(self.units[u].numel, dtype=self.compute_dtype)
            return self._staging[u]
        return self._slice(self.weights, u)

    def states_of(self, u: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(m, v, m_scale, v_scale) of unit u; the scales are None unless states are int8."""
        lo, n = self.state_offsets[u], self.units[u].numel
        m, v = self.m[lo:lo + n], self.v[lo:lo + n]
        if self.states != "int8":
            return m, v, None, None
        b0, b1 = lo // BLOCK, -(-(lo + n) // BLOCK)
        return m, v, self.m_scale[b0:b1], self.v_scale[b0:b1]

    def grad_of(self, u: int) -> torch.Tensor:
        if u == 0:
            return self.embed_grad
        if self.rotating:  # layers of one parity share a slot; the head has its own, after them
            lo = (u % 2) * self._slot if u < len(self.units) - 1 else 2 * self._slot
            return self.grad[lo:lo + self.units[u].numel]
        lo, hi = self.offsets[u] - self.offsets[1], self.offsets[u + 1] - self.offsets[1]
        return self.grad[lo:hi]

    def sync_working(self) -> None:
        """working <- master, for all units (after load or init); packs what is still staged."""
        for u in list(self._staging):
            self.finish_unit(u)
        if self.master is not None and self.working is not self.master:
            self.working.copy_(self.master)

    def breakdown(self) -> dict[str, int]:
        """Host bytes held, by component (the names megastream.memory.store_bytes uses)."""
        def nbytes(*ts):
            return sum(t.numel() * t.element_size() for t in ts)

        out = {"working": nbytes(self.working, self.packed)}
        if self.master is not None and self.master is not self.working:
            out["master"] = nbytes(self.master)
        out["optimizer states"] = nbytes(self.m, self.v, self.m_scale, self.v_scale)
        out["gradient staging"] = nbytes(self.grad, self.embed_grad)
        return out

    def host_bytes(self) -> int:
        return sum(self.breakdown().values())

    def state_bytes_per_param(self) -> float:
        """Persistent model state per parameter: weights, master and moments (no staging)."""
        b = self.breakdown()
        return (b["working"] + b.get("master", 0) + b["optimizer states"]) / self.numel

    # ---- initialisation ----------------------------------------------------------------------
    def init_random(self, std: float, seed: int, threads: int | None = None) -> None:
        """Random init as transformers does: N(0, std) matrices, unit norms, zero biases.
        Drawn in fp32 whatever the storage dtype, so every optimizer mode starts from the same model.
        Matrices are drawn in 4M-element pieces, each from its own generator seeded by (seed, unit,
        tensor, piece), on a thread pool: the values do not depend on the thread count, and a 14B
        model initialises in seconds on 16 cores instead of minutes on one."""
        n = threads or min(32, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=n) as pool:  # normal_ and copy_ release the GIL
            for u in range(len(self.units)):  # a unit at a time: a packed layer is quantized before the next
                self._init_unit(u, std, seed, pool)
                self.finish_unit(u)
        self.sync_working()

    def _init_unit(self, u: int, std: float, seed: int, pool: ThreadPoolExecutor) -> None:
        jobs = []
        for unit in (self.units[u],):
            views = unit.views(self.weights_of(u))
            for k, e in enumerate(unit.entries):
                t = views[e.key].view(-1)
                if e.decay:
                    jobs += [(t[lo:lo + _INIT_PIECE], (seed, u, k, lo // _INIT_PIECE))
                             for lo in range(0, t.numel(), _INIT_PIECE)]
                elif e.key.endswith("_b"):
                    t.zero_()
                else:
                    t.fill_(1.0)

        list(pool.map(lambda job: init_piece_into(job[0], job[1], std), jobs))

    def unit_range(self, u: int) -> tuple[int, int]:
        """The elements [lo, hi) of unit u (in the whole unit's flat layout) this store holds."""
        return 0, self.units[u].numel

    def write_entry(self, u: int, offset: int, flat: torch.Tensor) -> None:
        """Unit u's elements [offset, offset + flat.numel()) <- flat (dtype cast here): a tensor as read
        from a checkpoint. A ShardedStore keeps the part in its shard."""
        self.weights_of(u)[offset:offset + flat.numel()].copy_(flat)


def _piece_generator(key: tuple[int, ...]) -> torch.Generator:
    h = 0
    for part in key:  # a fixed mix (Python's hash() is not promised to stay the same)
        h = (h * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return torch.Generator().manual_seed(h)


def init_piece(key: tuple[int, ...], n: int, std: float) -> torch.Tensor:
    """The N(0, std) values (fp32) of one piece of a random init, from a generator seeded by `key`
    (seed, unit, tensor, piece): the same values wherever and however the piece is drawn."""
    return torch.empty(n, dtype=torch.float32).normal_(0.0, std, generator=_piece_generator(key))


def init_piece_into(dst: torch.Tensor, key: tuple[int, ...], std: float) -> torch.Tensor:
    """dst <- init_piece(key, dst.numel(), std). A contiguous fp32 destination is drawn into in place
    (normal_ gives a view the values it gives a fresh tensor), so a random init of an fp32 store
    allocates no 16 MB temporary per piece for malloc to keep."""
    if dst.dtype == torch.float32 and dst.is_contiguous():
        return dst.normal_(0.0, std, generator=_piece_generator(key))
    return dst.copy_(init_piece(key, dst.numel(), std))
