"""Gradients: accumulated on the device in fp32 across all micro-batches of a step, then copied
to the pinned host staging arena once per unit per step on the d2h stream.

Two layer accumulators alternate, so the D2H copy of layer i overlaps the backward of layer i-1.
Each unit's gradient L2 norm is taken on the device as it finishes (no extra host pass for
clipping); the embedding's gradient is accumulated and normed on the host.

With routed-expert streaming (`partial`, engine/experts.py) a mixture-of-experts layer's gradient
crosses in parts: the non-expert part and the routed experts' slices; an unrouted expert's gradient
is exactly zero, and its host staging is zeroed on the host instead. `d2h_bytes` counts every byte
copied device -> host.
"""

from __future__ import annotations

import torch

from megastream import ops
from megastream.engine.streams import DONE, Streams
from megastream.store import HostStore


class GradStager:
    def __init__(self, store: HostStore, device: torch.device, streams: Streams, *, tied: bool):
        self.store = store
        self.streams = streams
        self.tied = tied
        self.head_unit = len(store.units) - 1
        n_layer = max(u.numel for u in store.units[1:-1])
        self.acc = [torch.zeros(n_layer, dtype=torch.float32, device=device) for _ in range(2)]
        self.acc_free = [DONE, DONE]  # the D2H copy of the buffer's previous contents has finished
        self.turn = 0
        self.n_vocab_w = store.units[0].numel
        self.head_acc = torch.zeros(self.n_vocab_w + store.units[-1].entries[-1].numel, dtype=torch.float32,
                                    device=device)
        self.head_free = DONE
        self.norms = torch.zeros(len(store.units), dtype=torch.float32, device=device)
        self.tied_ready = DONE  # the tied lm_head gradient has landed in embed_grad
        self.partial = None  # engine.experts.RoutedExperts: what to copy of a MoE layer's gradient (None: all)
        self.norms_only = False  # a pass that only norms the gradients (optim.clip: previous, first step)
        # each unit's norm on the host, landed with its gradient (an update can check it without a device sync)
        self.norms_host = torch.zeros(len(store.units), dtype=torch.float32, pin_memory=streams.cuda)
        self.d2h_bytes = 0  # copied so far (the engine reports it per step)

    # ---- layers ----------------------------------------------------------------------------------
    def begin(self, u: int) -> torch.Tensor:
        """A zeroed fp32 device accumulator for unit `u`."""
        b = self.turn
        self.turn ^= 1
        self.streams.wait(self.streams.compute, self.acc_free[b])
        acc = self.acc[b][:self.store.units[u].numel]
        acc.zero_()
        self._buf = b
        return acc

    def finish(self, u: int, acc: torch.Tensor) -> "torch.cuda.Event":
        """Norm the accumulated gradient and start its copy to the host; returns the copy's event."""
        parts = self.partial.d2h(u) if self.partial is not None else None
        self.acc_free[self._buf] = done = self._to_host(u, acc, self.store.grad_of(u), parts)
        return done

    # ---- head ------------------------------------------------------------------------------------
    def begin_head(self) -> torch.Tensor:
        self.streams.wait(self.streams.compute, self.head_free)
        self.head_acc.zero_()
        return self.head_acc

    def finish_head(self) -> "torch.cuda.Event":
        if not self.tied:
            self.head_free = done = self._to_host(self.head_unit, self.head_acc, self.store.grad_of(self.head_unit))
            return done
        # Tied: the lm_head part belongs to the embedding, whose gradient is summed on the host.
        w, norm = self.head_acc[:self.n_vocab_w], self.head_acc[self.n_vocab_w:]
        done = self._to_host(self.head_unit, norm, self.store.grad_of(self.head_unit))
        ready = self.streams.record(self.streams.compute)
        with self.streams.on(self.streams.d2h):
            self.streams.wait(self.streams.d2h, ready)
            # D2H: V*H*4 bytes (d2h stream), overwriting the host embedding gradient
            self.store.embed_grad.copy_(w, non_blocking=True)
            self.d2h_bytes += w.numel() * 4
            self.tied_ready = self.head_free = self.streams.record(self.streams.d2h)
        return done

    # ---- embedding (host) ------------------------------------------------------------------------
    def begin_embed(self) -> None:
        """Call once per step before anything writes the embedding gradient."""
        if not self.tied:
            self.store.embed_grad.zero_()  # host memset: V*H*4 bytes

    def embed_backward(self, ids: list[torch.Tensor], dxs: list[torch.Tensor]) -> float:
        """Scatter-add d(loss)/d(embedding output) into the host gradient; returns its L2 norm."""
        self.tied_ready.synchronize()  # sync point: the tied lm_head gradient is on the host
        g = self.store.embed_grad.view(-1, dxs[0].shape[-1])
        for i, dx in zip(ids, dxs):
            # D2H: tokens*H*itemsize bytes (sync copy, small)
            g.index_add_(0, i.reshape(-1).cpu(), dx.reshape(-1, dx.shape[-1]).float().cpu())
        return ops.accumulate_sqnorm(self.store.embed_grad) ** 0.5  # one vectorised pass

    # ---- common ----------------------------------------------------------------------------------
    def _to_host(self, u: int, acc: torch.Tensor, host: torch.Tensor, parts=None):
        """`parts`: (ranges to copy, device ranges to zero, host ranges to zero), or None: all of it."""
        if self.norms_only:
            self.norms[u] = torch.linalg.vector_norm(acc)
            return DONE
        if parts is not None:
            for a, b in parts[1]:  # unrouted experts: zero already, unless a kernel left them unwritten
                acc[a:b].zero_()
            for a, b in parts[2]:  # host memset: an earlier step's gradient of experts unrouted now
                host[a:b].zero_()  # (the optimizer finished with it: this step's forward waited for it)
        self.norms[u] = torch.linalg.vector_norm(acc)
        src = acc if host.dtype == acc.dtype else acc.to(host.dtype)  # cast on the device: half the D2H bytes
        ready = self.streams.record(self.streams.compute)
        with self.streams.on(self.streams.d2h):
            self.streams.wait(self.streams.d2h, ready)
            if parts is None:
                # D2H: numel * itemsize bytes into the pinned staging arena (d2h stream)
                host.copy_(src, non_blocking=True)
                self.d2h_bytes += src.numel() * host.element_size()
            for a, b in parts[0] if parts is not None else ():
                # D2H: (b - a) * itemsize bytes, one routed part of a MoE layer's gradient (d2h stream)
                host[a:b].copy_(src[a:b], non_blocking=True)
                self.d2h_bytes += (b - a) * host.element_size()
            # D2H: 4 bytes, the unit's norm, landing with its gradient
            self.norms_host[u:u + 1].copy_(self.norms[u:u + 1], non_blocking=True)
            done = self.streams.record(self.streams.d2h)
        if src is not acc and self.streams.cuda:
            src.record_stream(self.streams.d2h)  # keep the cast temp alive until the copy ends
        return done
