"""Saving a sharded run: rank 0 writes, the other ranks serve it what it needs.

Rank 0 runs the single-process save code (checkpoint.save_hf, train's savers) on a GatheredStore,
whose `weights_of(u)` gathers unit u's shards from node 0's ranks into one buffer (host, gloo): one
unit at a time, never the whole model in one rank's RAM. The other ranks run `serve`, answering
rank 0's broadcast commands in the order it sends them:

  ("gather", u)      send this rank's shard of unit u's weights to rank 0
  ("state", tmp)     write this rank's optimizer shard into the checkpoint being written at tmp
  ("done", ok)       the save is over (ok False: rank 0 failed, and says why; every rank stops)

A checkpoint directory is written under a temporary name and renamed by rank 0 once every rank's
shard is in it, so a rank that dies mid-save leaves no checkpoint, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megastream.checkpoint import write_safetensors
from megastream.dist.comm import Comm, DistError
from megastream.resume import MANIFEST, OPTIM_DIR, unit_tensors


class GatheredStore:
    """The whole model, as save_hf reads it (`units`, `weights_of`), gathered a unit at a time."""

    def __init__(self, store, comm: Comm):
        self.store, self.comm = store, comm
        self.units = store.full_units
        self.full_units = store.full_units
        self._unit, self._buf = None, None

    def unit_range(self, u: int) -> tuple[int, int]:
        return 0, self.units[u].numel

    def weights_of(self, u: int) -> torch.Tensor:
        if u != self._unit:
            self.comm.broadcast(("gather", u))
            self._buf = None  # the previous unit's buffer goes first
            self._buf = gather_unit(self.store, self.comm, u)
            self._unit = u
        return self._buf[:self.units[u].numel]


def gather_unit(store, comm: Comm, u: int) -> torch.Tensor | None:
    """Unit u's weights (master, or working without one), padded, on rank 0 (None elsewhere)."""
    s = store.shard_sizes[u]
    buf = torch.empty(s * store.shard_count, dtype=store.weights.dtype) if comm.main else None
    comm.gather_to_main(store.weights_of(u), list(buf.split(s)) if comm.main else None)
    return buf


def write_shard_state(tmp: Path, store, comm: Comm) -> None:
    """This rank's slice of every unit's exact training state: rank-<r>-of-<n>.safetensors."""
    r, n = store.shard_rank, store.shard_count
    entries = []
    for u, unit in enumerate(store.full_units):
        lo, hi = store.unit_range(u)
        for k, t in unit_tensors(store, u).items():
            m = hi - lo if not k.endswith("_scale") else -(-(hi - lo) // 256)
            entries.append((f"{unit.name}.{k}", t[:m], (m,)))  # the valid part: padding is not saved
    write_safetensors(tmp / OPTIM_DIR / shard_file(r, n), entries, finite=True)


def shard_file(r: int, n: int) -> str:
    return f"rank-{r:05d}-of-{n:05d}.safetensors"


def write_manifest(tmp: Path, store) -> None:
    n = store.shard_count
    units = {}
    for u, unit in enumerate(store.full_units):
        s = store.shard_sizes[u]
        units[unit.name] = [[min(r * s, unit.numel), min((r + 1) * s, unit.numel)] for r in range(n)]
    manifest = {"world": n, "files": [shard_file(r, n) for r in range(n)], "units": units}
    (tmp / OPTIM_DIR / MANIFEST).write_text(json.dumps(manifest))


def write_all_shards(tmp: Path, store, comm: Comm) -> None:
    """Rank 0, inside a checkpoint being written: every node-0 rank adds its shard, rank 0 the manifest."""
    (tmp / OPTIM_DIR).mkdir()
    comm.broadcast(("state", str(tmp)))
    errors = _write_and_wait(tmp, store, comm)
    if errors:
        raise DistError(f"writing the optimizer shards failed: {'; '.join(errors)}")
    write_manifest(tmp, store)


def _write_and_wait(tmp: Path, store, comm: Comm) -> list[str]:
    """Write this rank's shard; every rank learns of every rank's failure (rank 0 reports them)."""
    err = None
    if comm.node == 0:
        try:
            write_shard_state(tmp, store, comm)
        except Exception as e:  # reported on every rank below, not left as a hang
            err = f"rank {comm.rank}: {e}"
    return [e for e in comm.all_objects(err) if e]


def run_on_main(comm: Comm | None, store, fn):
    """fn() on rank 0 while the other ranks serve it; every rank returns (or raises) together."""
    if comm is None:
        return fn()
    if not comm.main:
        return serve(comm, store)
    ok = False
    try:
        out = fn()
        ok = True
        return out
    finally:
        comm.broadcast(("done", ok))


def serve(comm: Comm, store) -> None:
    while True:
        cmd = comm.broadcast(None)
        if cmd[0] == "gather":
            if comm.node == 0:
                gather_unit(store, comm, cmd[1])
        elif cmd[0] == "state":
            _write_and_wait(Path(cmd[1]), store, comm)
        elif cmd[0] == "done":
            if not cmd[1]:
                raise DistError("rank 0 failed while saving (its message says why); this rank stops too")
            return
