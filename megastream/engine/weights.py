"""Device copies of the weights: a double buffer for the layers and one buffer for the head.

While layer i computes from one slot, layer i+1 is copied into the other on the h2d stream.
The schedule a step walks is 0..L-1, head, L-1..0: the last two layers of the forward pass are
still resident when backward starts, so they are not copied again. Weights change only between
steps (the optimizer updates the host copy), so `invalidate()` at the start of each step.

A quantized frozen base (store.quant) streams each layer's packed buffer (store.packed_of: one
H2D copy into a uint8 slot) and `acquire` dequantizes it on the compute stream into one scratch
layer in the compute dtype, just before the layer runs: the layer functions see ordinary weights.

With routed-expert streaming (`partial`, engine/experts.py) a mixture-of-experts layer is copied in
parts: its non-expert part and the experts known to be routed on prefetch, further experts by `add`
once the router has chosen them. `h2d_bytes` counts every byte copied host -> device.

The embedding (engine.embedding, resolve.embedding_path): `host` gathers each micro-batch's rows from
the host working copy; `device` copies the table into the head buffer and gathers the rows there. A
tied model's head buffer is the table, so the head then needs only the final norm (and with a frozen
base, nothing at all after the first step); an untied model's head overwrites the table later, so the
table crosses PCIe once more per step and the per-micro-batch row copies are gone.
"""

from __future__ import annotations

from typing import Callable

import torch

from megastream.engine.streams import DONE, Streams
from megastream.store import HostStore


class WeightStreamer:
    def __init__(self, store: HostStore, device: torch.device, streams: Streams, *, tied: bool,
                 before_copy: Callable[[int], None], device_embed: bool = False):
        self.store = store
        self.streams = streams
        self.tied = tied
        self.device_embed = device_embed  # engine.embedding: device (the rows gathered from the table in `head`)
        self.before_copy = before_copy  # blocks until the host optimizer is done with a unit
        self.head_unit = len(store.units) - 1
        dtype = store.compute_dtype
        n_layer = max(u.numel for u in store.units[1:-1])
        if store.packing:  # quantized: slots in the streamed (packed) format, one dequantized scratch layer
            n_bytes = max(store.packed_of(u).numel() for u in store.packing)
            self.slots = [torch.empty(n_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
            self.scratch = torch.empty(n_layer, dtype=dtype, device=device)
        else:
            self.slots = [torch.empty(n_layer, dtype=dtype, device=device) for _ in range(2)]
        self.slot_unit: list[int | None] = [None, None]
        self.loaded = [DONE, DONE]  # h2d finished writing the slot
        self.free = [DONE, DONE]  # compute finished reading the slot
        # Head buffer: [lm_head (V*H) | final norm (H)], lm_head taken from the embedding when tied.
        self.n_vocab_w = store.units[0].numel
        self.head = torch.empty(self.n_vocab_w + store.units[-1].entries[-1].numel, dtype=dtype, device=device)
        self.hidden = store.full_units[0].entries[0].shape[-1]
        self.head_loaded = None
        self.head_free = DONE
        self.table_ready = None  # the embedding table is in head[:V*H] once this event is done (None: it is not)
        self.partial = None  # engine.experts.RoutedExperts: what to copy of a MoE layer (None: whole units)
        self.h2d_bytes = 0  # copied so far (the engine reports it per step)

    def embed_rows(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each micro-batch's embedding rows (B, S, H) on the device, once the optimizer is done with
        the embedding: gathered on the host from the working copy, or on the device from the table."""
        if not self.device_embed:
            self.before_copy(0)  # host wait: the embedding's pending update
            table = self.store.working_of(0).view(-1, self.hidden)
            # H2D: tokens * H * itemsize bytes per micro-batch (small, pageable)
            return [table[i].to(self.head.device, non_blocking=True) for i in ids]
        if self.table_ready is None:
            self.before_copy(0)  # host wait: the embedding's pending update
            with self.streams.on(self.streams.h2d):
                self.streams.wait(self.streams.h2d, self.head_free)
                self._load(0, self.head)
                self.table_ready = self.streams.record(self.streams.h2d)
            if not self.tied:
                self.head_loaded = None  # the buffer holds the embedding now, not the head
        self.streams.wait(self.streams.compute, self.table_ready)
        table = self.head[:self.n_vocab_w].view(-1, self.hidden)
        # H2D: the token ids, 8 bytes each (pageable); the rows are gathered on the device
        rows = [table[i.to(table.device, non_blocking=True)] for i in ids]
        self.head_free = self.streams.record(self.streams.compute)
        return rows

    def invalidate(self) -> None:
        """Forget what is resident: the host weights have been updated."""
        self.slot_unit = [None, None]
        self.head_loaded = None
        self.table_ready = None
        if self.partial is not None:
            self.partial.reset()

    def _numel(self, u: int) -> int:
        return self.store.units[u].numel

    def _host(self, u: int) -> torch.Tensor:
        return self.store.packed_of(u) if u in self.store.packing else self.store.working_of(u)

    def prefetch(self, u: int, keep: int | None = None) -> None:
        """Start copying unit `u` to the device (async on h2d) unless it is resident.
        The slot holding `keep` (the unit being computed) is never evicted."""
        if u == self.head_unit:
            return self._prefetch_head()
        if u in self.slot_unit:
            return
        s = 0 if self.slot_unit[0] is None or self.slot_unit[1] == keep else 1
        self.before_copy(u)  # host wait: the optimizer has written this unit's new weights
        parts = self.partial.h2d(u) if self.partial is not None else None  # (copy, zero) ranges of a MoE layer
        with self.streams.on(self.streams.h2d):
            self.streams.wait(self.streams.h2d, self.free[s])
            if parts is None:
                self._load(u, self.slots[s])
            else:
                self._copy(s, u, parts[0])
                for a, b in parts[1]:  # unrouted experts: never read, zeroed on the device (no PCIe)
                    self.slots[s][a:b].zero_()
            self.loaded[s] = self.streams.record(self.streams.h2d)
        self.slot_unit[s] = u

    def _load(self, u: int, out: torch.Tensor) -> None:
        """out[:n] <- all of unit u, on the current (h2d) stream."""
        src = self._host(u)
        # H2D: the unit's bytes from the pinned working (or packed) arena (h2d stream)
        out[:src.numel()].copy_(src, non_blocking=True)
        self.h2d_bytes += src.numel() * src.element_size()

    def _copy(self, s: int, u: int, ranges) -> None:
        """Copy element ranges of unit u's host buffer into slot s (on the current stream)."""
        src = self._host(u)
        for a, b in ranges:
            # H2D: (b - a) * itemsize bytes of one routed part of the unit (h2d stream)
            self.slots[s][a:b].copy_(src[a:b], non_blocking=True)
            self.h2d_bytes += (b - a) * src.element_size()

    def add(self, u: int, ranges) -> None:
        """Copy more of resident unit u (experts its router has just chosen) into its slot; the
        compute stream waits for them. The ranges were never read in this residency of the slot."""
        s = self.slot_unit.index(u)
        with self.streams.on(self.streams.h2d):
            self._copy(s, u, ranges)  # after the slot's earlier copies on h2d, so after its free event too
            ev = self.streams.record(self.streams.h2d)
        self.streams.wait(self.streams.compute, ev)

    def acquire(self, u: int) -> torch.Tensor:
        """The flat device buffer of unit `u`, ready for the compute stream."""
        if u == self.head_unit:
            self._prefetch_head()
            self.streams.wait(self.streams.compute, self.head_loaded)
            return self.head
        self.prefetch(u)
        s = self.slot_unit.index(u)
        self.streams.wait(self.streams.compute, self.loaded[s])
        if u in self.store.packing:
            n, nb = self._numel(u), self.store.packed_of(u).numel()
            with self.streams.on(self.streams.compute):  # reads the slot before release(u)'s event
                self.store.unpack(u, self.slots[s][:nb], self.scratch[:n])
            return self.scratch[:n]
        return self.slots[s][:self._numel(u)]

    def release(self, u: int) -> None:
        """The compute stream has queued its last read of unit `u` for now."""
        ev = self.streams.record(self.streams.compute)
        if u == self.head_unit:
            self.head_free = ev
        else:
            self.free[self.slot_unit.index(u)] = ev

    def _prefetch_head(self) -> None:
        if self.head_loaded is not None:
            return
        self.before_copy(self.head_unit)
        if self.tied and self.table_ready is None:
            self.before_copy(0)
        with self.streams.on(self.streams.h2d):
            self.streams.wait(self.streams.h2d, self.head_free)
            self._fill_head()
            self.head_loaded = self.streams.record(self.streams.h2d)
        self.table_ready = self.head_loaded if self.tied else None  # untied: the head overwrote the table

    def _fill_head(self) -> None:
        """The head buffer <- [lm_head | final norm], on the current (h2d) stream. Tied: the lm_head is the
        embedding, copied unless embed_rows has put it there already."""
        if not self.tied:
            self._load(self.head_unit, self.head)
            return
        if self.table_ready is None:
            self._load(0, self.head)
        self._load_norm()

    def _load_norm(self) -> None:
        """head[V*H:] <- the final norm (tied: the head unit), on the current (h2d) stream."""
        self._load(self.head_unit, self.head[self.n_vocab_w:])
