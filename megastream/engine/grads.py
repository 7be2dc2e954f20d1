"""Gradients: accumulated on the device in fp32 across all micro-batches of a step, then copied
to the pinned host staging arena once per unit per step on the d2h stream.

Two layer accumulators alternate, so the D2H copy of layer i overlaps the backward of layer i-1.
Each unit's gradient L2 norm is taken on the device as it finishes (no extra host pass for
clipping). The embedding's gradient (engine.embedding, resolve.embedding_path) is built on the device
(`device`): the rows' gradient is scatter-added into the head accumulator, once the head's gradient has
left it (untied) or on top of the lm_head's (tied: the same table), then normed and copied to the host
once, like any unit; or on the host (`host`): each micro-batch's rows' gradient is copied back and
scatter-added into host memory (tied: after the lm_head's gradient is copied there), then normed there.

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
    def __init__(self, store: HostStore, device: torch.device, streams: Streams, *, tied: bool,
                 device_embed: bool = False):
        self.store = store
        self.streams = streams
        self.tied = tied
        self.device_embed = device_embed  # engine.embedding: device (the gradient built in head_acc)
        self.head_unit = len(store.units) - 1
        n_layer = max(u.numel for u in store.units[1:-1])
        self.acc = [torch.zeros(n_layer, dtype=torch.float32, device=device) for _ in range(2)]
        self.acc_free = [DONE, DONE]  # the D2H copy of the buffer's previous contents has finished
        self.turn = 0
        self.n_vocab_w = store.units[0].numel
        self.head_acc = torch.zeros(self.n_vocab_w + store.units[-1].entries[-1].numel, dtype=torch.float32,
                                    device=device)
        self.head_free = DONE
        self.hidden = store.full_units[0].entries[0].shape[-1]
        self.embed_span = self.n_vocab_w  # head_acc[:embed_span] is zeroed before the rows' gradient (untied)
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
        # Tied: the lm_head part belongs to the embedding: kept here for its rows' gradient (device), or
        # copied to the host, where they are added (host).
        w, norm = self.head_acc[:self.n_vocab_w], self.head_acc[self.n_vocab_w:]
        done = self._to_host(self.head_unit, norm, self.store.grad_of(self.head_unit))
        if self.device_embed:
            return done
        ready = self.streams.record(self.streams.compute)
        with self.streams.on(self.streams.d2h):
            self.streams.wait(self.streams.d2h, ready)
            # D2H: V*H*4 bytes (d2h stream), overwriting the host embedding gradient
            self.store.embed_grad.copy_(w, non_blocking=True)
            self.d2h_bytes += w.numel() * 4
            self.tied_ready = self.head_free = self.streams.record(self.streams.d2h)
        return done

    # ---- embedding -------------------------------------------------------------------------------
    def begin_embed(self) -> None:
        """Call once per step before anything writes the embedding gradient."""
        if not self.tied and not self.device_embed:
            self.store.embed_grad.zero_()  # host memset: V*H*4 bytes

    def embed_backward(self, ids: list[torch.Tensor], dxs: list[torch.Tensor]):
        """Scatter-add d(loss)/d(embedding output) into the embedding's gradient and norm it (norms[0],
        norms_host[0]); returns the event of the gradient's landing in store.embed_grad."""
        if not self.device_embed:
            return self._embed_backward_host(ids, dxs)
        acc = self.head_acc
        if not self.tied:  # the head's gradient has left the accumulator: the embedding's takes its place
            self.streams.wait(self.streams.compute, self.head_free)
            acc[:self.embed_span].zero_()
        g = acc[:self.n_vocab_w].view(-1, self.hidden)
        for i, dx in zip(ids, dxs):
            # H2D: the token ids, 8 bytes each (pageable); the rows' gradient is added on the device
            g.index_add_(0, i.reshape(-1).to(g.device, non_blocking=True), dx.reshape(-1, self.hidden).float())
        self.head_free = done = self._embed_to_host(acc)
        return done

    def _embed_to_host(self, acc: torch.Tensor) -> "torch.cuda.Event":
        """Norm the embedding's gradient (acc's first V*H elements) and start its copy to the host."""
        return self._to_host(0, acc[:self.n_vocab_w], self.store.embed_grad)

    def _embed_backward_host(self, ids: list[torch.Tensor], dxs: list[torch.Tensor]):
        self.tied_ready.synchronize()  # sync point: the tied lm_head gradient is on the host
        g = self.store.embed_grad.view(-1, self.hidden)
        for i, dx in zip(ids, dxs):
            # D2H: tokens*H*itemsize bytes (sync copy, small)
            g.index_add_(0, i.reshape(-1).cpu(), dx.reshape(-1, self.hidden).float().cpu())
        self.norms[0] = self.norms_host[0] = ops.accumulate_sqnorm(self.store.embed_grad) ** 0.5  # one pass
        return DONE

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
