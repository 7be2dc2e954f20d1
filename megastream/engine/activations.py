"""Layer-boundary checkpoints: each layer's input, kept from forward for its recompute in backward.

engine.activations: device  the checkpoints stay on the device (L * tokens * H * itemsize bytes)
engine.activations: host    each layer's checkpoint is copied to a pinned host arena on the offload
                            stream as soon as the layer's input exists, and its device memory is freed
                            once that copy is done; backward brings layer i-1's back on the h2d stream
                            while layer i computes. The device then holds about two layers' worth.

On the CPU both modes run the same code with synchronous copies (the host mode is tested there for
correctness: it must give bit-identical results).
"""

from __future__ import annotations

import torch

from megastream.engine.streams import DONE, Streams
from megastream.store import _no_release, pinned_zeros


class Checkpoints:
    def __init__(self, device: torch.device, streams: Streams, mode: str):
        self.device = device
        self.streams = streams
        self.offload = mode == "host"
        self._arena: torch.Tensor | None = None  # host (pinned on cuda), grown to the largest step seen
        self._release = _no_release  # ends a pinned arena's registration
        self._reset()

    def _reset(self) -> None:
        self._dev: dict[int, list[torch.Tensor]] = {}  # layer -> device tensors (kept, or brought back)
        self._host: dict[int, list[torch.Tensor]] = {}  # layer -> host views (offloaded)
        self._ready: dict[int, object] = {}  # layer -> event: its offload / bring-back copy has finished
        self._cursor = 0

    def begin(self, n_layers: int, xs: list[torch.Tensor]) -> None:
        """Start a step whose micro-batches' hidden states look like `xs`."""
        self._reset()
        if not self.offload:
            return
        need = n_layers * sum(x.numel() for x in xs)
        if self._arena is None or self._arena.numel() < need or self._arena.dtype != xs[0].dtype:
            self.close()
            if self.streams.cuda:  # page-locked, so the copies run at PCIe speed, async
                self._arena, self._release = pinned_zeros(need, xs[0].dtype)
            else:
                self._arena = torch.empty(need, dtype=xs[0].dtype)

    def save(self, i: int, xs: list[torch.Tensor]) -> None:
        """Keep layer i's inputs. Offloading: queue their D2H copies behind the compute that made them."""
        if not self.offload:
            self._dev[i] = xs
            return
        made = self.streams.record(self.streams.compute)
        views = []
        with self.streams.on(self.streams.offload):
            self.streams.wait(self.streams.offload, made)
            for x in xs:
                h = self._arena[self._cursor:self._cursor + x.numel()].view(x.shape)
                self._cursor += x.numel()
                # D2H: tokens * H * itemsize bytes per micro-batch into the pinned arena (offload stream)
                h.copy_(x, non_blocking=True)
                if self.streams.cuda:
                    x.record_stream(self.streams.offload)  # its memory is reused only after the copy
                views.append(h)
        self._host[i] = views
        self._ready[i] = self.streams.record(self.streams.offload)

    def prefetch(self, i: int) -> None:
        """Start bringing layer i's inputs back (h2d stream) unless they are on the device."""
        if not self.offload or i in self._dev or i < 0:
            return
        with self.streams.on(self.streams.h2d):
            self.streams.wait(self.streams.h2d, self._ready[i])  # the offload copy has landed
            # H2D: tokens * H * itemsize bytes per micro-batch (h2d stream), into memory of that stream
            self._dev[i] = [h.to(self.device, non_blocking=True) if self.streams.cuda else h.clone()
                            for h in self._host[i]]
            self._ready[i] = self.streams.record(self.streams.h2d)

    def take(self, i: int) -> list[torch.Tensor]:
        """Layer i's inputs, ready on the compute stream; forgotten here (the caller frees them)."""
        if self.offload:
            self.prefetch(i)
            self.streams.wait(self.streams.compute, self._ready.pop(i, DONE))
            if self.streams.cuda:
                for x in self._dev[i]:
                    x.record_stream(self.streams.compute)  # allocated on h2d, used and freed on compute
        self._host.pop(i, None)
        return self._dev.pop(i)

    def close(self) -> None:
        self._release()  # unregisters a pinned arena (after a device sync); a no-op otherwise
        self._arena, self._release = None, _no_release
