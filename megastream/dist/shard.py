"""The host state of one rank: its 1/n of every unit.

Unit u (numel N_u) is cut into n equal shards of s_u = ceil(N_u / (n * 256)) * 256 elements, the
last ones padded with zeros past N_u: rank r holds [r * s_u, (r + 1) * s_u) of the unit's flat
layout (model/layout.py), in every arena (working, master, moments, gradient staging). Shards start
on 256-element boundaries of the unit, so int8 moment blocks (store.BLOCK) never straddle two ranks
and a checkpoint reshards to any rank count by element ranges. Padding stays zero: its gradient is
zero, so AdamW never moves it.

    all_gather(n x s_u) on the device -> the whole unit, padded: [:N_u] is what the model reads
    reduce_scatter(n x s_u fp32 gradient) -> this rank's s_u, summed over the node's ranks

The optimizer runs on the shard as on any unit: the weight-decayed prefix of the unit ([0, n_decay))
becomes the shard's [0, clamp(n_decay - r * s_u, 0, s_u)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megastream.model.layout import UnitLayout
from megastream.store import _INIT_PIECE, BLOCK, HostStore, init_piece


def shard_size(numel: int, n: int) -> int:
    """Elements per rank of a unit of `numel` elements cut into n shards (a multiple of BLOCK)."""
    return math.ceil(numel / (n * BLOCK)) * BLOCK


@dataclass(frozen=True)
class ShardLayout:
    """What HostStore needs of a unit, for one rank's slice of it."""
    name: str
    numel: int  # s_u, padding included
    n_decay: int
    entries: tuple = ()  # a shard has no named tensors (the model reads the gathered unit)


class ShardedStore(HostStore):
    def __init__(self, units: list[UnitLayout], rank: int, n: int, compute_dtype: torch.dtype,
                 grad_dtype: torch.dtype, pin: bool, master: bool = True, states: str = "fp32",
                 trainable: bool = True):
        self.shard_rank, self.shard_count = rank, n
        self.shard_sizes = [shard_size(u.numel, n) for u in units]
        shards = [ShardLayout(u.name, s, min(max(u.n_decay - rank * s, 0), s)) for u, s in zip(units, self.shard_sizes)]
        super().__init__(shards, compute_dtype, grad_dtype, pin=pin, master=master, states=states, trainable=trainable)
        self.full_units = units

    def unit_range(self, u: int) -> tuple[int, int]:
        s, n = self.shard_sizes[u], self.full_units[u].numel
        return min(self.shard_rank * s, n), min((self.shard_rank + 1) * s, n)

    def padded_numel(self, u: int) -> int:
        """The whole unit as the all-gather builds it: n x s_u elements (>= its numel)."""
        return self.shard_sizes[u] * self.shard_count

    def write_entry(self, u: int, offset: int, flat: torch.Tensor) -> None:
        lo, hi = self.unit_range(u)
        a, b = max(lo, offset), min(hi, offset + flat.numel())
        if a < b:
            self.weights_of(u)[a - lo:b - lo].copy_(flat[a - offset:b - offset])

    def init_random(self, std: float, seed: int, threads: int | None = None) -> None:
        """HostStore.init_random's values, drawn only for the pieces that overlap this rank's shard:
        the same model on any number of ranks."""
        for u, unit in enumerate(self.full_units):
            lo, hi = self.unit_range(u)
            for k, e in enumerate(unit.entries):
                a, b = max(lo, e.offset), min(hi, e.offset + e.numel)
                if a >= b:
                    continue
                if not e.decay:
                    self.write_entry(u, a, torch.full((b - a,), 0.0 if e.key.endswith("_b") else 1.0))
                    continue
                for p in range((a - e.offset) // _INIT_PIECE, (b - e.offset - 1) // _INIT_PIECE + 1):
                    p0 = e.offset + p * _INIT_PIECE
                    n = min(_INIT_PIECE, e.offset + e.numel - p0)
                    self.write_entry(u, p0, init_piece((seed, u, k, p), n, std))
        self.sync_working()


def sharded_store(units: list[UnitLayout], comm, **kw) -> ShardedStore:
    """This rank's shard of the model (comm.local_rank of comm.local_world)."""
    return ShardedStore(units, comm.local_rank, comm.local_world, **kw)
