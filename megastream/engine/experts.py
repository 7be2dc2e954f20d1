"""Routed-expert streaming (`engine.moe_streaming: routed`): of a mixture-of-experts layer, only the
experts that the step's tokens route to cross PCIe.

In transformers >= 5 a layer's experts are fused parameters with the expert first
(`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)), and in the unit's flat
layout each of them is one contiguous range (model/layout.py), so expert e of a tensor at offset o
is the contiguous slice [o + e * n, o + (e + 1) * n), n = numel / E. The step then goes:

forward   the layer's non-expert part (attention, norms, router: `dense`) is copied as any unit is;
          the expert slices of the device slot are zeroed (never read: no token reaches them, but
          zeros keep any implementation that touches them finite). When the experts module is
          called, its routing (top_k_index) is read on the host (a sync point) and the experts not
          yet on the device are copied H2D before it computes: after all micro-batches, the step's
          union of routed experts is resident and known.
backward  the recompute routes the same tokens the same way (same input checkpoint, same weights),
          so a layer's prefetch copies its dense part plus exactly the forward's routed experts (a
          recompute that routed elsewhere would still have its experts copied on demand).
          Autograd gives an unrouted expert exactly zero gradient; only the routed experts'
          gradient slices are copied D2H, and the host staging of unrouted experts is zeroed where
          it held a previous step's gradient (a host memset, no PCIe), so the host AdamW decays
          their weights and moments exactly as torch.optim.AdamW does with a zero gradient.

The computation of every routed token reads the same numbers as with whole-layer streaming, so
the result is the same to the bit; the bytes saved are the unrouted experts' (`expected_fraction`
for the plan's estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megastream.model.layout import UnitLayout

Ranges = list[tuple[int, int]]  # [start, end) element ranges of a unit's flat buffer


def moe_shape(cfg: dict | None) -> tuple[int, int] | None:
    """(experts, experts per token) of a transformers config dict, or None for a dense model."""
    cfg = cfg or {}
    E = cfg.get("num_local_experts") or cfg.get("num_experts")
    k = cfg.get("num_experts_per_tok")
    return (int(E), int(k)) if E and k else None


@dataclass(frozen=True)
class UnitExperts:
    """Where a layer unit's fused expert tensors lie: `module`, the experts module's path within the
    layer; `tensors`, (offset, elements per expert) of each of its parameters; `dense`, the rest."""
    module: str
    E: int
    tensors: tuple[tuple[int, int], ...]
    dense: tuple[tuple[int, int], ...]

    @property
    def per_expert(self) -> int:
        return sum(n for _, n in self.tensors)

    def ranges(self, experts) -> Ranges:
        """The slices of `experts` in every expert tensor, consecutive experts merged into one range."""
        es = sorted(experts)
        runs, out = [], []
        for e in es:
            if runs and runs[-1][1] == e:
                runs[-1][1] = e + 1
            else:
                runs.append([e, e + 1])
        for off, n in self.tensors:
            out += [(off + a * n, off + b * n) for a, b in runs]
        return out

    def others(self, experts) -> Ranges:
        return self.ranges(set(range(self.E)) - set(experts))


def unit_experts(unit: UnitLayout, E: int) -> UnitExperts | None:
    """The fused experts of a layer unit: parameters of one module named `...experts` that are 3-D
    with E first (transformers 5's layout); None when the unit has none."""
    fused = [e for e in unit.entries if len(e.shape) == 3 and e.shape[0] == E
             and e.key.rsplit(".", 1)[0].rsplit(".", 1)[-1] == "experts"]
    if not fused or len({e.key.rsplit(".", 1)[0] for e in fused}) != 1:
        return None
    spans = sorted((e.offset, e.offset + e.numel) for e in fused)
    dense, at = [], 0
    for a, b in spans:
        if a > at:
            dense.append((at, a))
        at = b
    if at < unit.numel:
        dense.append((at, unit.numel))
    return UnitExperts(fused[0].key.rsplit(".", 1)[0], E, tuple((e.offset, e.numel // E) for e in fused), tuple(dense))


def expected_fraction(E: int, k: int, tokens: int) -> float:
    """Expected share of a layer's experts that `tokens` tokens route to, each choosing k of E
    uniformly and independently: 1 - (1 - k/E)^tokens (k/E for one token). Trained routers are
    skewed and neighbouring tokens correlate, so real steps usually touch fewer."""
    return 1.0 - (1.0 - k / E) ** tokens


class RoutedExperts:
    """The engine's state of routed streaming for one run: per MoE unit its expert ranges, the
    experts the step's tokens routed to (`routed`), those in the device slot (`loaded`), and those
    whose host gradient staging may hold a non-zero gradient (`staged`).

    Hooks: the WeightStreamer asks `h2d(u)` what to copy of a unit and calls `reset()` when it
    forgets what is resident; the GradStager asks `d2h(u)`; the model calls `route(i, top_k_index)`
    before layer i's experts compute."""

    def __init__(self, units: list[UnitLayout], E: int, weights, grads):
        self.weights, self.grads = weights, grads
        self.units = {u: x for u, unit in enumerate(units[1:-1], start=1)
                      if (x := unit_experts(unit, E)) is not None}
        self.routed: dict[int, set[int]] = {u: set() for u in self.units}
        self.loaded: dict[int, set[int]] = {u: set() for u in self.units}
        self.staged: dict[int, set[int]] = {u: set(range(x.E)) for u, x in self.units.items()}  # unknown: all

    def reset(self) -> None:
        """A new pass over updated weights: nothing is known to be routed or resident."""
        for u in self.units:
            self.routed[u].clear()
            self.loaded[u].clear()

    def h2d(self, u: int) -> tuple[Ranges, Ranges] | None:
        """(ranges to copy, ranges to zero) as unit u is loaded into a slot; None: all of it."""
        x = self.units.get(u)
        if x is None:
            return None
        self.loaded[u] = set(self.routed[u])
        return list(x.dense) + x.ranges(self.routed[u]), x.others(self.routed[u])

    def route(self, i: int, top_k_index: torch.Tensor) -> None:
        """Before layer i's experts compute on one micro-batch: copy those it routes to that are not
        on the device yet."""
        u = i + 1
        x = self.units.get(u)
        if x is None or len(self.loaded[u]) == x.E:  # all on the device: no need to read the routing
            return
        need = {e for e in torch.unique(top_k_index).tolist() if 0 <= e < x.E}  # sync point: reads the routing
        missing = need - self.loaded[u]
        if missing:
            self.weights.add(u, x.ranges(missing))
            self.loaded[u] |= missing
            self.routed[u] |= missing

    def d2h(self, u: int) -> tuple[Ranges, Ranges, Ranges] | None:
        """(gradient ranges to copy to the host, device ranges to zero, host ranges to zero) of unit
        u's accumulated gradient; None: copy all of it."""
        x = self.units.get(u)
        if x is None:
            return None
        r = self.routed[u]
        stale = self.staged[u] - r  # host slices still holding an earlier step's gradient
        self.staged[u] = set(r)
        return list(x.dense) + x.ranges(r), x.others(r), x.ranges(stale)


def routed_experts(cfg, spec, units: list[UnitLayout], fns, weights, grads) -> RoutedExperts | None:
    """RoutedExperts for `engine.moe_streaming: routed` on a model with fused experts, wired to the
    model's experts modules; None otherwise (whole layers are streamed)."""
    shape = moe_shape(spec.hf_config)
    if cfg.engine.moe_streaming != "routed" or shape is None or not hasattr(fns, "route_experts") \
            or grads is None or weights.store.packing:
        return None
    rx = RoutedExperts(units, shape[0], weights, grads)
    if not rx.units:
        return None
    weights.partial = grads.partial = rx
    fns.route_experts({u - 1: x.module for u, x in rx.units.items()}, rx.route)
    return rx
