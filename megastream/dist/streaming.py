"""Weights in, gradients out, when each rank holds 1/n of the host state (dist/shard.py).

Forward and backward, per unit: this rank's shard crosses PCIe (s_u elements, H2D into its own
slot of the device buffer), then an all-gather over the node's ranks fills the rest of the buffer
(peer bandwidth, not host memory). After the unit's backward, a reduce-scatter of the fp32
accumulator leaves this rank its s_u summed gradient elements, normed on the device and copied D2H
into its staging shard: each rank's host optimizer then updates 1/n of the model.

The embedding is gathered too: its rows are looked up on the device (untied models gather the
table into the head buffer, which the head overwrites later; tied models use the head's own), and
its gradient is scattered into the head accumulator on the device and reduce-scattered like any unit.
Collectives are issued in the same order on every rank (the schedule is the same everywhere); on
CUDA each runs after the work queued on the stream it is issued from, which then waits for it.
"""

from __future__ import annotations

import torch

from megastream.engine.grads import GradStager
from megastream.engine.streams import DONE
from megastream.engine.weights import WeightStreamer


class ShardedWeightStreamer(WeightStreamer):
    """WeightStreamer's schedule and embedding path (engine.embedding: device, always), with every
    unit loaded as this rank's shard plus an all-gather (`_load`)."""

    def __init__(self, store, device, streams, *, tied, before_copy, comm):
        self.store, self.streams, self.tied, self.before_copy, self.comm = store, streams, tied, before_copy, comm
        self.device_embed = True  # each rank holds a slice of the table: its rows can only be gathered here
        self.head_unit = len(store.units) - 1
        dtype = store.compute_dtype
        self.padded = [store.padded_numel(u) for u in range(len(store.units))]
        self.slots = [torch.empty(max(self.padded[1:-1]), dtype=dtype, device=device) for _ in range(2)]
        self.slot_unit = [None, None]
        self.loaded = [DONE, DONE]
        self.free = [DONE, DONE]
        full = store.full_units
        self.n_vocab_w = full[0].numel
        self.hidden = full[0].entries[0].shape[-1]
        self.n_norm = full[-1].entries[-1].numel
        # [lm_head (V*H) | norm (H)], padded: also where the embedding table is gathered for the forward.
        self.head = torch.empty(max(self.padded[0], self.n_vocab_w + self.n_norm, self.padded[-1]), dtype=dtype,
                                device=device)
        self.norm_buf = torch.empty(self.padded[-1], dtype=dtype, device=device) if tied else None
        self.head_loaded = None
        self.head_free = DONE
        self.table_ready = None
        self.partial = None  # routed-expert streaming is not sharded (dist.comm.check_distributed refuses it)
        self.h2d_bytes = 0

    def _numel(self, u: int) -> int:
        return self.store.full_units[u].numel

    def _load(self, u: int, out: torch.Tensor) -> None:
        """out[:n x s_u] <- unit u, padded (issue on h2d: the all-gather follows the copy)."""
        s, r = self.store.shard_sizes[u], self.store.shard_rank
        mine = out[r * s:(r + 1) * s]
        # H2D: this rank's shard, s_u * itemsize bytes from the pinned working arena (h2d stream)
        mine.copy_(self.store.working_of(u), non_blocking=True)
        self.h2d_bytes += mine.numel() * mine.element_size()
        # Device: (n - 1) x s_u * itemsize bytes arrive from the node's other ranks
        self.comm.all_gather(out[:self.padded[u]], mine)

    def acquire(self, u: int) -> torch.Tensor:
        if u == self.head_unit:
            super().acquire(u)
            return self.head[:self.n_vocab_w + self.n_norm]  # [lm_head | norm], as the engine views it
        return super().acquire(u)

    def _load_norm(self) -> None:
        """The norm lands right after the embedding's V*H elements (gathered padded beside them)."""
        self._load(self.head_unit, self.norm_buf)
        self.head[self.n_vocab_w:self.n_vocab_w + self.n_norm].copy_(self.norm_buf[:self.n_norm])


class ShardedGradStager(GradStager):
    def __init__(self, store, device, streams, *, tied, comm):
        self.store, self.streams, self.tied, self.comm = store, streams, tied, comm
        self.head_unit = len(store.units) - 1
        self.padded = [store.padded_numel(u) for u in range(len(store.units))]
        sizes = store.shard_sizes
        f32 = {"dtype": torch.float32, "device": device}
        self.acc = [torch.zeros(max(self.padded[1:-1]), **f32) for _ in range(2)]
        self.out = [torch.zeros(max(sizes[1:-1]), **f32) for _ in range(2)]  # reduce-scatter results
        self.acc_free = [DONE, DONE]  # the D2H copy out of out[b] has finished
        self.turn = 0
        full = store.full_units
        self.n_vocab_w = full[0].numel
        self.hidden = full[0].entries[0].shape[-1]
        self.n_norm = full[-1].entries[-1].numel
        self.head_acc = torch.zeros(max(self.n_vocab_w + self.n_norm, self.padded[0], self.padded[-1]), **f32)
        self.head_out = torch.zeros(sizes[-1], **f32)
        self.embed_out = torch.zeros(sizes[0], **f32)
        self.norm_pad = torch.zeros(self.padded[-1], **f32) if tied else None
        self.head_free = DONE
        self.device_embed = True
        self.embed_span = self.padded[0]  # zeroed before the rows' gradient is added: the padding too
        self.norms = torch.zeros(len(store.units), **f32)
        self.tied_ready = DONE
        self.partial = None
        self.d2h_bytes = 0  # counted by GradStager._to_host: this rank's shards
        self.norms_only = False
        self.norms_host = torch.zeros(len(store.units), dtype=torch.float32, pin_memory=streams.cuda)

    def begin(self, u: int) -> torch.Tensor:
        b = self.turn
        self.turn ^= 1
        self.streams.wait(self.streams.compute, self.acc_free[b])
        self.acc[b][:self.padded[u]].zero_()  # the padding is reduce-scattered too: it must be zero
        self._buf = b
        return self.acc[b][:self.store.full_units[u].numel]

    def finish(self, u: int, acc: torch.Tensor) -> "torch.cuda.Event":
        b = self._buf
        out = self.out[b][:self.store.shard_sizes[u]]
        # Device: n x s_u * 4 bytes in, s_u * 4 bytes out (compute stream)
        self.comm.reduce_scatter(out, self.acc[b][:self.padded[u]])
        self.acc_free[b] = done = self._to_host(u, out, self.store.grad_of(u))
        return done

    def begin_head(self) -> torch.Tensor:
        self.streams.wait(self.streams.compute, self.head_free)
        self.head_acc.zero_()
        return self.head_acc[:self.n_vocab_w + self.n_norm]

    def finish_head(self) -> "torch.cuda.Event":
        h = self.head_unit
        if not self.tied:
            self.comm.reduce_scatter(self.head_out, self.head_acc[:self.padded[h]])
            self.head_free = done = self._to_host(h, self.head_out, self.store.grad_of(h))
            return done
        # Tied: the norm is the head unit; the lm_head part stays here for the embedding's rows.
        nv = self.n_vocab_w
        self.norm_pad[:self.n_norm].copy_(self.head_acc[nv:nv + self.n_norm])
        self.comm.reduce_scatter(self.head_out, self.norm_pad)
        self.head_acc[nv:].zero_()  # the embedding's padding
        return self._to_host(h, self.head_out, self.store.grad_of(h))

    def _embed_to_host(self, acc: torch.Tensor) -> "torch.cuda.Event":
        """Reduce-scatter the embedding's gradient (zero past V*H: the padding), then this rank's shard
        goes to the host like any unit's."""
        # Device: n x s_0 * 4 bytes in, s_0 * 4 bytes out (compute stream)
        self.comm.reduce_scatter(self.embed_out, acc[:self.padded[0]])
        return self._to_host(0, self.embed_out, self.store.embed_grad)


def streamers(store, device, streams, *, tied, before_copy, comm):
    """(weights, gradients) of a sharded store: the classes above."""
    return (ShardedWeightStreamer(store, device, streams, tied=tied, before_copy=before_copy, comm=comm),
            ShardedGradStager(store, device, streams, tied=tied, comm=comm))
