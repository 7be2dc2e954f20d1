"""The host store: where the model lives between steps.

Every kind of per-parameter state is one large flat arena, and each unit (embed, layer i, head;
see model/layout.py) is a contiguous slice of it:

  working  compute dtype  the copy streamed to the device (pinned: it crosses PCIe every pass)
  master   fp32           the weights the optimizer updates (aliases `working` when computing in fp32)
  m, v     fp32           AdamW moments
  grad     grad dtype     gradient staging, written by D2H copies (pinned); layers and head only
  embed_grad fp32         the embedding's gradient, accumulated on the host (pinned)

Host bytes per parameter: 2 + 4 + 8 (+ 2 or 4 staging) with bf16 compute, 4 + 8 (+ 4) in fp32.
Pinning uses cudaHostRegister on whole arenas: torch's pinned allocator would round every
allocation up to a power of two (a 28 GB arena would take 32 GB) and pinning per tensor is slow.
"""

from __future__ import annotations

import warnings

import torch

from megastream.model.layout import UnitLayout


def _pin(t: torch.Tensor) -> torch.Tensor:
    """Page-lock `t` in place (no copy, no rounding). Returns `t`, or a pinned copy as a fallback."""
    if t.numel() == 0:
        return t
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) == 0:
        return t
    warnings.warn(f"cudaHostRegister failed ({err}); falling back to torch's pinned allocator, "
                  "which rounds each arena up to a power of two", stacklevel=2)
    return t.pin_memory()


def _unpin(t: torch.Tensor) -> None:
    if t.numel():
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class HostStore:
    def __init__(self, units: list[UnitLayout], compute_dtype: torch.dtype, grad_dtype: torch.dtype,
                 pin: bool):
        self.units = units
        self.compute_dtype = compute_dtype
        self.grad_dtype = grad_dtype
        sizes = [u.numel for u in units]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        n = self.offsets[-1]
        n_embed = sizes[0]
        self.numel = n

        self.master = torch.zeros(n, dtype=torch.float32)
        self.m = torch.zeros(n, dtype=torch.float32)
        self.v = torch.zeros(n, dtype=torch.float32)
        aliased = compute_dtype == torch.float32
        self.working = self.master if aliased else torch.empty(n, dtype=compute_dtype)
        # Gradient staging for units 1.. (the embedding accumulates separately, in fp32).
        self.grad = torch.zeros(n - n_embed, dtype=grad_dtype)
        self.embed_grad = torch.zeros(n_embed, dtype=torch.float32)

        self._pinned: list[torch.Tensor] = []
        if pin:
            self.working = self._pin(self.working)
            if aliased:
                self.master = self.working
            self.grad = self._pin(self.grad)
            self.embed_grad = self._pin(self.embed_grad)

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        p = _pin(t)
        if p is t:
            self._pinned.append(t)
        return p

    def close(self) -> None:
        for t in self._pinned:
            _unpin(t)
        self._pinned.clear()

    # ---- per-unit slices (views, no copies) --------------------------------------------------
    def _slice(self, arena: torch.Tensor, u: int) -> torch.Tensor:
        return arena[self.offsets[u]:self.offsets[u + 1]]

    def working_of(self, u: int) -> torch.Tensor:
        return self._slice(self.working, u)

    def master_of(self, u: int) -> torch.Tensor:
        return self._slice(self.master, u)

    def moments_of(self, u: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._slice(self.m, u), self._slice(self.v, u)

    def grad_of(self, u: int) -> torch.Tensor:
        if u == 0:
            return self.embed_grad
        lo, hi = self.offsets[u] - self.offsets[1], self.offsets[u + 1] - self.offsets[1]
        return self.grad[lo:hi]

    def sync_working(self) -> None:
        """working <- master, for all units (after load or init)."""
        if self.working is not self.master:
            self.working.copy_(self.master)

    def host_bytes(self) -> int:
        arenas = {id(t): t for t in (self.master, self.m, self.v, self.working, self.grad, self.embed_grad)}
        return sum(t.numel() * t.element_size() for t in arenas.values())

    # ---- initialisation ----------------------------------------------------------------------
    def init_random(self, std: float, seed: int) -> None:
        """Random init as transformers does: N(0, std) matrices, unit norms, zero biases."""
        g = torch.Generator().manual_seed(seed)
        for u, unit in enumerate(self.units):
            views = unit.views(self.master_of(u))
            for e in unit.entries:
                t = views[e.key]
                if e.decay:
                    t.normal_(0.0, std, generator=g)
                elif e.key.endswith("_b"):
                    t.zero_()
                else:
                    t.fill_(1.0)
        self.sync_working()
