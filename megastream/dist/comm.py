"""The process group of a `torchrun` job and the few collectives megastream uses.

One process per GPU (or per CPU process on gloo). Ranks are grouped by node:

  shard group    the ranks of one node (LOCAL_WORLD_SIZE of them): each owns 1/n of every unit's
                 host state; weights are all-gathered and gradients reduce-scattered within it
  replica group  the ranks with the same local rank on every node (HSDP): they hold the same shard,
                 and all-reduce their gradient shards after the node's reduce-scatter
  ctrl group     every rank, always on gloo (CPU tensors): scalars (token counts, losses, norms),
                 config hashes, and gathering host shards to rank 0 for saving, whatever the device

torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor for all_gather_single /
reduce_scatter_single, which older torch lacks: `_ALL_GATHER` / `_REDUCE_SCATTER` take what exists.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megastream.errors import ConfigError, MegastreamError

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_PIECE = 1 << 24  # elements per in-place collective on gloo


class DistError(MegastreamError):
    """Another rank failed or disagreed: this rank stops too (exit non-zero, never a hang)."""


@dataclass
class Comm:
    rank: int  # global rank
    world: int  # global world size
    local_rank: int  # within its node: also its shard index
    local_world: int  # ranks per node: the shard count
    shard_group: object = None  # None: this node has one rank (nothing to gather)
    replica_group: object = None  # None: one node (nothing to all-reduce across nodes)
    ctrl: object = None
    _save_group: object = None  # node 0's shard ranks on gloo: host shards gathered to rank 0 for saving
    # gloo (CPU) copies a whole collective's input or output into a temporary: over host RAM, that is
    # a unit's size on top of the plan (the embedding: V x H x 4 bytes). In place and in pieces instead.
    pieces: bool = False
    gathered_bytes: int = 0  # device bytes received by all-gathers (this rank, since the last reset)
    scattered_bytes: int = 0  # device bytes sent into reduce-scatters (this rank)
    reduced_bytes: int = 0  # device bytes all-reduced (this rank): gradient shards across nodes, LoRA adapters

    @property
    def nodes(self) -> int:
        return self.world // self.local_world

    @property
    def node(self) -> int:
        return self.rank // self.local_world

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- device collectives (the default group: NCCL on GPUs, gloo on CPUs) ---------------------
    def all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> None:
        """out (n x shard.numel(), on the device) <- every shard rank's `shard`, in local-rank order.
        `shard` may be out's own slice at this rank's position (in place)."""
        if self.shard_group is None:
            if shard.data_ptr() != out.data_ptr():
                out.copy_(shard)
            return
        self.gathered_bytes += out.numel() * out.element_size()
        if not self.pieces:
            _ALL_GATHER(out, shard, group=self.shard_group)
            return
        s = shard.numel()
        out[self.local_rank * s:(self.local_rank + 1) * s].copy_(shard)
        for q in range(self.local_world):  # each rank's slice, broadcast by it in place
            for lo in range(q * s, (q + 1) * s, _PIECE):
                dist.broadcast(out[lo:min(lo + _PIECE, (q + 1) * s)], src=self.node * self.local_world + q,
                               group=self.shard_group)

    def reduce_scatter(self, shard: torch.Tensor, full: torch.Tensor) -> None:
        """shard <- this rank's slice of the sum over the node's ranks of `full`; then summed across
        nodes (replicas of the same shard)."""
        if self.shard_group is None:
            shard.copy_(full)
        else:
            self.scattered_bytes += full.numel() * full.element_size()
            if self.pieces:  # summed in place (`full` is a scratch accumulator), then this rank's slice
                self._all_reduce(full, self.shard_group)
                s = shard.numel()
                shard.copy_(full[self.local_rank * s:(self.local_rank + 1) * s])
            else:
                _REDUCE_SCATTER(shard, full, group=self.shard_group)
        self.all_reduce_replicas(shard)

    def all_reduce_replicas(self, t: torch.Tensor) -> None:
        if self.replica_group is not None:
            self.reduced_bytes += t.numel() * t.element_size()
            self._all_reduce(t, self.replica_group)

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum over every rank (replicated state: the LoRA adapters' gradient)."""
        self.reduced_bytes += t.numel() * t.element_size()
        self._all_reduce(t, None)

    def _all_reduce(self, t: torch.Tensor, group) -> None:
        step = _PIECE if self.pieces else max(t.numel(), 1)
        for lo in range(0, t.numel(), step):
            dist.all_reduce(t[lo:lo + step], group=group)

    def take_counters(self) -> dict[str, int]:
        """Device bytes this rank moved through collectives since the last call (then reset)."""
        out = {"all_gather_bytes": self.gathered_bytes, "reduce_scatter_bytes": self.scattered_bytes,
               "all_reduce_bytes": self.reduced_bytes}
        self.gathered_bytes = self.scattered_bytes = self.reduced_bytes = 0
        return out

    # ---- host scalars and objects (gloo) ---------------------------------------------------------
    def sum(self, *values: float) -> list[float]:
        """Sum of each value over every rank (float64 on the host)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.ctrl)
        return t.tolist()

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctrl)
        return float(t)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    def all_objects(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.ctrl)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.ctrl)

    def gather_to_main(self, t: torch.Tensor, shards: list[torch.Tensor] | None) -> None:
        """Node 0's shard ranks send `t` (host) to rank 0, which receives them into `shards`."""
        if self.shard_group is None:
            if self.main:
                shards[0].copy_(t)
            return
        # Point to point, in pieces, straight into rank 0's buffer: gloo's gather would stage the whole
        # unit (and each rank's part) in temporaries on top of it.
        if self.main:
            shards[0].copy_(t)
            for q in range(1, self.local_world):
                for lo in range(0, t.numel(), _PIECE):
                    dist.recv(shards[q][lo:lo + _PIECE], src=q, group=self._save_group)
        else:
            for lo in range(0, t.numel(), _PIECE):
                dist.send(t[lo:lo + _PIECE].contiguous(), dst=0, group=self._save_group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_env() -> dict | None:
    """The torchrun (torch.distributed.run) environment of this process, or None outside one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    emulated = os.environ.get("MEGASTREAM_TEST_RANKS_PER_NODE")  # tests: one machine's ranks as several nodes
    if emulated:
        local_world = int(emulated)
        local_rank = rank % local_world
    return {"rank": rank, "world": world, "local_rank": local_rank, "local_world": local_world}


def check_world(env: dict, grad_accum: int) -> None:
    """The data contract: the global batch is the config's, split evenly across ranks."""
    world, local = env["world"], env["local_world"]
    if world % local:
        raise ConfigError(f"torchrun: WORLD_SIZE={world} is not a multiple of the ranks per node "
                          f"(LOCAL_WORLD_SIZE={local}); give every node the same --nproc-per-node")
    if grad_accum % world:
        raise ConfigError(f"train.grad_accum: {grad_accum} micro-batches per step cannot be split evenly across "
                          f"{world} ranks (each rank runs grad_accum / world_size of them, so the step is the same "
                          f"on any number of ranks); set train.grad_accum to a multiple of {world}, or run "
                          "another number of processes")


def init(env: dict, device: torch.device, timeout_s: float) -> Comm:
    """Join the job's process group (NCCL on CUDA, gloo on CPU) with a short timeout, so a rank that
    dies makes the others fail within `timeout_s`, not the default 30 minutes."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kw)
    rank, world, local = env["rank"], env["world"], env["local_world"]
    nodes = world // local
    comm = Comm(rank=rank, world=world, local_rank=env["local_rank"], local_world=local, pieces=backend == "gloo")
    comm.ctrl = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    # Every rank creates every group, in the same order (a torch.distributed rule).
    for n in range(nodes):
        ranks = list(range(n * local, (n + 1) * local))
        g = dist.new_group(ranks) if local > 1 else None
        gs = dist.new_group(ranks, backend="gloo") if local > 1 and backend != "gloo" else g
        if n == comm.node:
            comm.shard_group, comm._save_group = g, gs
    for lr in range(local):
        ranks = list(range(lr, world, local))
        g = dist.new_group(ranks) if nodes > 1 else None
        if lr == comm.local_rank:
            comm.replica_group = g
    return comm


def config_digest(cfg_dict: dict) -> str:
    return hashlib.blake2b(json.dumps(cfg_dict, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def check_same_config(comm: Comm, cfg_dict: dict) -> None:
    """Every rank must train the same resolved config (a node with another file, or another --set)."""
    digests = comm.all_objects(config_digest(cfg_dict))
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise ConfigError(f"the resolved config differs between ranks: rank(s) {', '.join(map(str, odd))} differ from "
                          "rank 0 (another config file, --set, or relative paths resolved elsewhere); start every "
                          "rank with the same config and arguments")


def join(cfg) -> tuple[Comm | None, torch.device]:
    """(this rank's Comm, its device) under torchrun with more than one process, else (None, device)."""
    from megastream.resolve import resolve_device

    env = torchrun_env()
    if env is None or env["world"] == 1:
        return None, resolve_device(cfg)
    check_world(env, cfg.train.grad_accum)
    if cfg.engine.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(env["local_rank"] % torch.cuda.device_count())  # one GPU per rank of a node
    device = resolve_device(cfg)
    comm = init(env, device, cfg.engine.dist_timeout_s)
    try:
        check_same_config(comm, cfg.to_dict())
    except BaseException:
        comm.close()
        raise
    return comm, device


@contextlib.contextmanager
def agreed(comm: Comm | None):
    """Run the block on every rank; if it raises a MegastreamError on any rank, it raises on all
    (that rank's own error, or a DistError naming the rank that stopped), instead of leaving the
    others waiting in the next collective."""
    if comm is None:
        yield
        return
    err = None
    try:
        yield
    except MegastreamError as e:
        err = e
    msgs = comm.all_objects(None if err is None else str(err))
    if err is not None:
        raise err
    for r, m in enumerate(msgs):
        if m:
            raise DistError(f"rank {r} stopped: {m}")


def check_distributed(cfg, spec) -> None:
    """What the data-parallel path does not do yet: say so before anything is allocated."""
    if cfg.lora is not None and cfg.lora.base_dtype in ("int8", "nf4"):
        raise ConfigError(f"lora.base_dtype: {cfg.lora.base_dtype} under torchrun: a quantized base is not sharded "
                          "across ranks yet; use lora.base_dtype auto (or bf16), or run one process")
    if cfg.optim.clip == "previous":
        raise ConfigError("optim.clip: previous under torchrun: updating each unit as its gradient lands is not done "
                          "on sharded units yet; use optim.clip: global, or run one process")
    if cfg.engine.embedding == "host":
        raise ConfigError("engine.embedding: host under torchrun: each rank holds a slice of the embedding table, so "
                          "its rows are gathered and its gradient scatter-added on the device; set engine.embedding: "
                          "auto (or device), or run one process")
    if cfg.engine.moe_streaming == "routed":
        raise ConfigError("engine.moe_streaming: routed under torchrun: streaming only the routed experts is not "
                          "done on sharded layers yet; set engine.moe_streaming: whole, or run one process")
    if spec.implementation == "hf" and (spec.hf_config or {}).get("output_router_logits"):
        raise ConfigError("a mixture-of-experts model whose config sets output_router_logits, under torchrun: the "
                          "router's load-balancing loss is not summed across ranks yet; set output_router_logits "
                          "false in config.json, or run one process")


def collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because of another rank (gloo / NCCL / the store)."""
    if isinstance(e, dist.DistError):
        return True
    msg = str(e)
    return any(k in msg for k in ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe"))
