"""What a data-parallel step costs, for `plan`: n ranks per node, m nodes.

Bytes per rank per step (full fine-tuning; P_u = n * s_u, a unit padded to n shards, dist/shard.py):
  H2D             its shards only: 1/n of one process's (each layer in forward and backward, the head once)
  all-gather      the whole padded unit lands in its device buffer for every gather (counted as received
                  bytes, the way the ranks count them): layers L in forward + L - 2 in backward (the
                  last two stay resident), the head, and the embedding for the forward's rows (tied:
                  the embedding is the head)
  reduce-scatter  every unit's padded fp32 gradient once (counted as bytes put in)
  all-reduce      across nodes (m > 1): every shard's fp32 gradient once (HSDP)
  D2H             1/n of one process's (each GPU has its own PCIe link)
  optimizer       1/n of the work per rank, but the node's ranks share one host memory bus, which one
                  process's fused AdamW already saturates: the node's time is one process's
LoRA (adapters replicated, base frozen and sharded): all-gathers as above less what stays resident,
no reduce-scatter, an all-reduce of the adapters' fp32 gradient.

Time: the shard's H2D and the all-gather share the h2d stream (one after the other); the
reduce-scatter and the all-reduces run on the compute stream; collectives move (n - 1)/n of their
bytes over the peer links at `peer_gbps` per GPU (bus bandwidth, as nccl-tests reports it), the
cross-node all-reduce 2 (m - 1)/m of its bytes at `net_gbps`:
  step >= max(compute / (n m) + reduce-scatter + all-reduce, H2D / n + all-gather, D2H / n, optimizer)
"""

from __future__ import annotations

from dataclasses import dataclass

from megastream.dist.shard import shard_size

# Stated defaults when the topology is not given: NVLink 4 (H100/H200 SXM, ~450 GB/s per GPU of
# all-gather bus bandwidth in nccl-tests), InfiniBand NDR 400 Gb/s per GPU (~45 GB/s).
DEFAULT_PEER_GBPS = 450.0
DEFAULT_NET_GBPS = 45.0
# Host state a rank holds 1/n of; the rest of the host budget (runtime, buffers, data) is per process,
# and rank 0 adds the unit it gathers when it saves (plan._dist_plan).
SHARDED_PARTS = ("working", "master", "optimizer states", "gradient staging")


@dataclass(frozen=True)
class Topology:
    ranks_per_node: int
    nodes: int = 1
    peer_gbps: float = DEFAULT_PEER_GBPS
    net_gbps: float = DEFAULT_NET_GBPS

    @property
    def world(self) -> int:
        return self.ranks_per_node * self.nodes


def comm_bytes(units, tied: bool, compute_itemsize: int, grad_itemsize: int, n: int, nodes: int,
               lora_adapter_params: int = 0) -> dict:
    """Per rank per step: the bytes megastream.dist.comm.Comm counts (see the module docstring), and
    the PCIe bytes the streamers count (h2d: this rank's shard of every gathered unit; d2h: its
    gradient shards, the embedding's in fp32)."""
    s = [shard_size(u.numel, n) for u in units]
    U = len(units)
    L = U - 2
    if lora_adapter_params:  # steady state (the base never changes, nothing is invalidated): the last two
        # layers of a backward are the first two of the next forward, and the reverse
        gathered = list(range(3, L + 1)) + list(range(1, max(L - 2, 0) + 1))
        if not tied:  # the embedding's rows take the head buffer, so the head is gathered again after them
            gathered += [0, U - 1]
        scattered = []
    else:
        gathered = list(range(1, L + 1)) + list(range(1, max(L - 2, 0) + 1)) + [0, U - 1]
        scattered = list(range(U))
    g = sum(s[u] for u in gathered)
    return {"all_gather_bytes": g * n * compute_itemsize if n > 1 else 0,
            "reduce_scatter_bytes": sum(s[u] for u in scattered) * n * 4 if n > 1 else 0,
            "all_reduce_bytes": (lora_adapter_params * 4 if n * nodes > 1 else 0) if lora_adapter_params else
                                (sum(s) * 4 if nodes > 1 else 0),
            "h2d_bytes": g * compute_itemsize,
            "d2h_bytes": (sum(s[u] for u in scattered if u) * grad_itemsize + s[0] * 4) if scattered else 0}


def per_rank_host(host: dict[str, int], n: int) -> dict[str, int]:
    """The host budget of one rank: its 1/n of the model state, the rest as one process's."""
    return {k: (-(-v // n) if k in SHARDED_PARTS else v) for k, v in host.items()}


def dist_terms(topo: Topology, roof, bytes_: dict) -> dict:
    """Seconds per step of each term, the predicted step, and its bound (see the module docstring)."""
    n, m = topo.ranks_per_node, topo.nodes
    peer = (n - 1) / n / (topo.peer_gbps * 1e9) if n > 1 else 0.0
    ag = bytes_["all_gather_bytes"] * peer
    rs = bytes_["reduce_scatter_bytes"] * peer
    ar = bytes_["all_reduce_bytes"] * 2 * (m - 1) / m / (topo.net_gbps * 1e9) if m > 1 else 0.0
    terms = {"compute + reduce-scatter + all-reduce": roof.compute_s / (n * m) + rs + ar,
             "H2D + all-gather": roof.h2d_s / n + ag, "D2H": roof.d2h_s / n,
             # the node's ranks update 1/n each, but over the one memory bus a single process saturates
             "optimizer": roof.optimizer_s}
    bound = max(terms, key=terms.get)
    return {"all_gather_s": ag, "reduce_scatter_s": rs, "all_reduce_s": ar, "terms_s": terms,
            "step_s": terms[bound], "bound": bound}
