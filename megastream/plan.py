"""`megastream plan CONFIG`: will this run fit, and how fast can it go — before anything is allocated.

    budget (megastream.memory)  ->  verdict against this machine (RAM, GPU, locked memory)
    roofline (DESIGN.md)        ->  predicted step time from measured (`megastream probe`) or default rates
    suggestions                 ->  settings that make a run fit when the configured one does not

`train` calls `make_plan` too and refuses a run the verdict says cannot fit (unless --force).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

import torch

from megastream.config import Config
from megastream.machine import Machine, cpu_flags, machine, rss
from megastream.memory import Budget, budget
from megastream.model.layout import model_layout
from megastream.model.spec import ModelSpec
from megastream.probe import attention_rate, cached_probe, gemm_rate, lora_rate
from megastream.resolve import MODES, check_model_inputs, mode_name, model_spec, plan_device, resolve_dtypes

# Stated defaults when `megastream probe` has not been run on this machine. GPU: a PCIe Gen4 x16
# host (pinned ~25 GB/s per direction), a Hopper-class bf16 matmul rate, a server's DRAM. CPU: a
# small cloud VM (2 cores; fp32 matmul ~0.1 TFLOP/s, ~20 GB/s).
# Attention is timed apart from the matmuls: with the boolean document mask of packed rows SDPA
# computes the whole S x S square on a slower path (on a 2-core CPU ~10x below the matmul rate per
# counted FLOP), which dominates long sequences. LoRA: an adapter's rank-wide matmuls are bound by the
# memory they stream (its (tokens, width) input and output), ~50 TFLOP/s at rank 16 on an H100-class GPU
# by that bound, ~0.03 measured on the CPU; dequantizing an int8 / nf4 base in torch ops (estimates).
DEFAULT_RATES = {
    "cuda": {"h2d_gbps": 25.0, "d2h_gbps": 25.0, "matmul_tflops": 600.0, "host_gbps": 50.0,
             "attention_tflops": {"masked": 100.0, "causal": 300.0}, "dequant_gbps": {"int8": 300.0, "nf4": 100.0},
             "lora_matmul_by_rank": {"16": 50.0, "64": 150.0}},
    "cpu": {"h2d_gbps": 0.0, "d2h_gbps": 0.0, "matmul_tflops": 0.1, "host_gbps": 20.0,
            "attention_tflops": {"masked": 0.008, "causal": 0.03}, "dequant_gbps": {"int8": 1.0, "nf4": 0.2},
            "lora_matmul_by_rank": {"16": 0.03, "64": 0.06}},
}


@dataclass
class Rates:
    h2d_gbps: float
    d2h_gbps: float
    matmul_tflops: float
    host_gbps: float
    attention_tflops: dict[str, float] = field(default_factory=dict)  # "masked" / "causal" (see DEFAULT_RATES)
    matmul_by_width: dict = field(default_factory=dict)  # probe's matmul_tflops_by_width
    attention_by_shape: dict = field(default_factory=dict)  # probe's attention_tflops_by_shape
    optimizer_ns_per_param: dict[str, float] = field(default_factory=dict)
    dequant_gbps: dict[str, float] = field(default_factory=dict)  # int8 / nf4 -> GB/s of packed bytes (LoRA)
    lora_matmul_by_rank: dict = field(default_factory=dict)  # probe's lora_matmul_tflops_by_rank
    source: str = "defaults"
    bf16_scale: float | None = None  # a bf16 run on the CPU: the probe's bf16 / fp32 ratio the rates carry


def rates_for(device_type: str, compute: torch.dtype | None = None) -> Rates:
    """The rates `plan` times a step with: this host's cached probe, else stated defaults. The CPU's
    are fp32 rates; for a bf16 run on the CPU every compute rate is scaled by the probe's measured
    bf16 / fp32 matmul ratio (~0.1 without AVX512-BF16 or AMX), or the source says it is unscaled."""
    rec = cached_probe(device_type)
    r = _rates(device_type, rec)
    if device_type != "cpu" or compute != torch.bfloat16:
        return r
    k = (rec or {}).get("bf16_matmul_ratio")
    if k is None:
        return replace(r, source=r.source + "; fp32 rates, bf16 unmeasured on this CPU (`megastream "
                                   "probe` measures it: without AVX512-BF16 or AMX it runs ~9x slower)")
    return replace(
        r, matmul_tflops=r.matmul_tflops * k, attention_tflops={n: v * k for n, v in r.attention_tflops.items()},
        matmul_by_width={w: v * k for w, v in r.matmul_by_width.items()},
        attention_by_shape={kind: {p: v * k for p, v in pts.items()} for kind, pts in r.attention_by_shape.items()},
        lora_matmul_by_rank={n: v * k for n, v in r.lora_matmul_by_rank.items()}, bf16_scale=k,
        source=r.source + f"; bf16 at {k:.3f}x the fp32 rates, the probe's bf16 / fp32 matmul ratio")


def _rates(device_type: str, rec: dict | None) -> Rates:
    if rec is None:
        return Rates(**DEFAULT_RATES[device_type], source="stated defaults (run `megastream probe` to measure)")
    d = DEFAULT_RATES[device_type]
    return Rates(h2d_gbps=rec.get("h2d_gbps", d["h2d_gbps"]), d2h_gbps=rec.get("d2h_gbps", d["d2h_gbps"]),
                 matmul_tflops=rec["matmul_tflops"], host_gbps=rec["host_gbps"],
                 attention_tflops=dict(d["attention_tflops"]) | rec.get("attention_tflops", {}),
                 optimizer_ns_per_param=dict(rec.get("optimizer_ns_per_param", {})),
                 matmul_by_width=dict(rec.get("matmul_tflops_by_width", {})),
                 attention_by_shape=dict(rec.get("attention_tflops_by_shape", {})),
                 dequant_gbps=dict(d["dequant_gbps"]) | rec.get("dequant_gbps", {}),
                 lora_matmul_by_rank=dict(rec.get("lora_matmul_tflops_by_rank", d["lora_matmul_by_rank"])),
                 source=f"`megastream probe` of {rec['date']} ({rec['device']})")




def optimizer_bytes_per_param(cfg: Config, compute: torch.dtype, grad: torch.dtype) -> float:
    """DRAM bytes one fused AdamW pass moves per parameter: read+write weights and moments, read the
    gradient, write the working copy (when separate from the weights)."""
    master = cfg.optim.master == "fp32" and compute != torch.float32
    w = 4 if master or compute == torch.float32 else compute.itemsize
    states = {"fp32": 8, "bf16": 4, "int8": 2 + 8 / 256}[cfg.optim.states]
    return 2 * w + 2 * states + grad.itemsize + (compute.itemsize if master else 0)


@dataclass
class Roofline:
    flops: float  # executed per step: forward, recompute, backward (and the head once)
    attention_flops: float  # the part of `flops` in attention (timed at the attention rate)
    model_flops: float  # 6 * N * tokens: the work credited in TFLOP/s and MFU
    compute_s: float
    h2d_s: float
    d2h_s: float
    optimizer_s: float
    step_s: float
    bound: str  # which term sets step_s
    attention_s: float = 0.0  # of compute_s
    h2d_bytes: int = 0  # per step: weights host -> device (layers twice, the head once)
    d2h_bytes: int = 0  # per step: gradients device -> host
    routed_fraction: float | None = None  # engine.moe_streaming: routed: expected share of experts copied
    dequant_s: float = 0.0  # of compute_s: an int8 / nf4 LoRA base dequantized on the device, twice a step
    adapter_s: float = 0.0  # of compute_s: the LoRA adapters' own matmuls


def roofline(cfg: Config, spec: ModelSpec, b: Budget, rates: Rates) -> Roofline:
    """Step time >= max(GPU compute, H2D bytes / H2D bw, D2H bytes / D2H bw, optimizer) on a GPU;
    on the CPU the same cores do compute and optimizer, so the terms add up.

    LoRA (b.lora): the frozen base computes no weight gradients, so a layer costs forward + recompute +
    input gradients = 6 FLOPs per weight per token instead of 8 (3/4 of full fine-tuning's; the head 4
    instead of 6), plus 8 per adapter parameter (forward, recompute, input and adapter gradients);
    attention's backward is unchanged. H2D is b.lora's (each layer twice, in the streamed format, but
    the two resident at each turn), D2H nothing, and there is no host optimizer: the adapters' AdamW runs where they live (on a GPU a few
    ms, not counted; on the CPU 28 B of traffic per adapter parameter). The adapters' matmuls run at
    the rank-wide rate `megastream probe` measured (lora_matmul_tflops_by_rank), and an int8 / nf4
    base adds its dequantization (each streamed layer, forward and recompute) at probe's dequant_gbps."""
    units = model_layout(spec)
    n_layers = sum(u.numel for u in units[1:-1])
    T, S = b.tokens_per_step, cfg.data.seq_len
    head = spec.vocab_size * spec.hidden_size
    qd = spec.num_heads * spec.head_dim
    # layers: forward + recompute + backward (2x) = 4 x 2 FLOPs per weight per token; causal attention
    # (QK^T and PV, half the square) 2*S*qd per token per layer, same 4 passes; the head: 6 per weight.
    # Attention runs at its own measured rate: masked (packed rows) or plain causal.
    attn_flops = 8 * spec.num_layers * T * S * qd
    matmuls = _matmuls(spec, T)  # the projections' weights; norms are elementwise, not counted
    flops = sum(f for f, _ in matmuls) + attn_flops
    model_flops = 6 * b.params * T
    ec, eg = b.compute_dtype.itemsize, b.grad_dtype.itemsize
    # each layer in forward and backward, but for the last two (still resident when backward starts,
    # engine/weights.py), and the head (lm_head and final norm) once; every gradient back once, the
    # embedding's in fp32 (tied: with the lm_head's; untied on the host: built there, nothing crosses)
    h2d = (sum(u.numel * passes for u, passes in zip(units[1:-1], layer_passes(spec.num_layers)))
           + head + spec.hidden_size) * ec
    d2h = (n_layers + spec.hidden_size) * eg + head * (4 if spec.tie_word_embeddings else eg)
    if b.embedding == "device" and not spec.tie_word_embeddings:
        # the table into the head's buffer for the rows, its fp32 gradient back (tied: these are the head's)
        h2d, d2h = h2d + head * ec, d2h + head * 4
    frac, unrouted_in, unrouted_out = routed_expert_bytes(cfg, spec, units, T)  # routed MoE streaming
    h2d, d2h = h2d - unrouted_in * ec, d2h - unrouted_out * eg
    mode = mode_name(cfg)
    if b.lora:
        n_ad = b.lora["adapter_params"]
        head_passes = 6 if "lm_head" in b.lora["train_extra"] else 4  # a trained head adds its weight gradient
        flops = 6 * n_layers * T + 8 * n_ad * T + attn_flops + head_passes * head * T
        model_flops = 4 * b.params * T + 6 * n_ad * T  # forward and input gradients; adapters in full
        h2d, d2h = b.lora["h2d_bytes_per_step"], b.lora["d2h_bytes_per_step"]
        n_opt = n_ad + b.lora["extra_params"]
        opt = 0.0 if b.device_type == "cuda" else n_opt * 28 / (rates.host_gbps * 1e9)
    elif mode in rates.optimizer_ns_per_param and b.compute_dtype == torch.bfloat16:
        opt = b.params * rates.optimizer_ns_per_param[mode] * 1e-9
    else:
        opt = b.params * optimizer_bytes_per_param(cfg, b.compute_dtype, b.grad_dtype) / (rates.host_gbps * 1e9)
    # varlen runs the flash causal kernel over each document (no mask): the plain causal rate, with the
    # FLOPs above an upper bound (documents shorter than the row do less)
    kind = "masked" if cfg.data.pack and cfg.engine.attention != "varlen" else "causal"
    attn_rate = attention_rate(rates.attention_by_shape, kind, S, spec.head_dim,
                               rates.attention_tflops.get(kind) or rates.matmul_tflops)
    attention_s = attn_flops / (attn_rate * 1e12)
    mms = _matmuls(spec, T)
    adapter_s = dequant_s = 0.0
    if b.lora:  # no weight gradients: layers 6 of 8, the head 4 of 6; the adapters' matmuls are rank-wide
        mms = [(f * 6 / 8, w) for f, w in mms[:-1]] + [(mms[-1][0] * head_passes / 6, mms[-1][1])]
        rank = b.lora["rank"]
        ad_rate = lora_rate(rates.lora_matmul_by_rank, rank,
                            gemm_rate(rates.matmul_by_width, rank, rates.matmul_tflops))
        adapter_s = 8.0 * b.lora["adapter_params"] * T / (ad_rate * 1e12)
        scheme = b.lora["base_dtype"]
        if scheme in rates.dequant_gbps:  # int8 / nf4: the packed layers, dequantized as each arrives
            dequant_s = h2d / (rates.dequant_gbps[scheme] * 1e9)
    compute = sum(f / (gemm_rate(rates.matmul_by_width, w, rates.matmul_tflops) * 1e12)
                  for f, w in mms) + attention_s + adapter_s + dequant_s
    if b.device_type == "cuda":
        terms = {"compute": compute, "H2D": h2d / (rates.h2d_gbps * 1e9), "D2H": d2h / (rates.d2h_gbps * 1e9),
                 "optimizer": opt}
        bound = max(terms, key=terms.get)
        step = terms[bound]
    else:
        copies = (h2d + d2h) * 2 / (rates.host_gbps * 1e9)  # the "transfers" are memcpys (read + write)
        terms = {"compute": compute, "H2D": 0.0, "D2H": 0.0, "optimizer": opt}
        step = compute + opt + copies
        bound = "compute" if compute >= opt else "optimizer"
    return Roofline(flops=flops, attention_flops=attn_flops, model_flops=model_flops, compute_s=compute, h2d_s=terms["H2D"],
                    d2h_s=terms["D2H"], optimizer_s=opt, step_s=step, bound=bound, attention_s=attention_s,
                    h2d_bytes=int(h2d), d2h_bytes=int(d2h), routed_fraction=frac,
                    dequant_s=dequant_s, adapter_s=adapter_s)


@dataclass
class Schedule:
    """The step megastream's own schedule can reach with the rates: the roofline's terms in the order
    the engine runs them, overlapped only where it overlaps them (see `schedule`)."""
    fwd_s: float  # forward: max(forward compute, H2D of every layer and then the head)
    opt_s: float  # the host optimizer pass over every parameter
    head_s: float  # the chunked loss with the head's gradients
    bwd_s: float  # backward: max(recompute + backward compute, H2D of every layer, D2H of the gradients)
    tail_s: float  # after the last layer's backward: what overlaps nothing
    step_s: float
    bound: str  # "optimizer" | "forward" | "backward" (CUDA); the roofline's (the CPU, LoRA)
    overlap: str  # how the terms combine, in words


def schedule(cfg: Config, spec: ModelSpec, b: Budget, rates: Rates, roof: Roofline | None = None) -> Schedule:
    """The step time of engine/engine.py's `Engine.step` with these rates, `plan`'s prediction. The
    roofline (every term overlapped with every other) is a bound the engine cannot reach on a GPU: its
    host optimizer overlaps only part of the step. With optim.clip: global the step's updates start
    when the global norm is known (backward's end) and run in unit order while the next forward
    streams the units in the same order, so

        step = max(T_opt, T_fwd) + T_head + T_bwd + tail

    and with optim.clip: previous each unit is updated as its gradient lands, overlapping the backward,
    and the next forward starts after the last (the embedding's) update:

        step = T_fwd + T_head + max(T_bwd, T_opt) + tail

    T_fwd   max(forward compute, H2D of every layer and then the head): one stream computes while the
            copy stream brings the next unit
    T_head  the chunked loss with d(hidden) and the head's gradients
    T_bwd   max(recompute + backward compute (3x the forward's), H2D of every layer again, D2H of
            every layer's gradient and the head's (fp32 when the embedding is tied))
    tail    the last layer's gradient D2H, then with the embedding on the device (engine.embedding) its
            fp32 gradient D2H, on the host the d(embedding output) D2H and the host's scatter-add and
            norm of the embedding gradient (V * H fp32 read once, 8 bytes per scattered element)

    Compute is the roofline's: each matmul at the rate of its narrowest dimension, attention at its
    own. It ignores launch gaps and the first unit's copy latency. On the CPU the same cores do
    everything, so the roofline already adds its terms; a LoRA step has no host optimizer to schedule:
    both are the roofline's step."""
    roof = roof or roofline(cfg, spec, b, rates)
    if b.device_type != "cuda" or b.lora:
        serial = b.device_type != "cuda"
        return Schedule(fwd_s=roof.step_s - roof.optimizer_s if serial else roof.compute_s, opt_s=roof.optimizer_s,
                        head_s=0.0, bwd_s=0.0, tail_s=0.0, step_s=roof.step_s, bound=roof.bound,
                        overlap="the CPU: one set of cores, the terms add" if serial
                        else "LoRA: no host optimizer, the roofline's overlap")
    units = model_layout(spec)
    layers = units[1:-1]
    n_layers, max_layer = sum(u.numel for u in layers), max(u.numel for u in layers)
    T, H, head = b.tokens_per_step, spec.hidden_size, spec.vocab_size * spec.hidden_size
    ec, eg = b.compute_dtype.itemsize, b.grad_dtype.itemsize
    # the roofline's compute split by phase: each matmul's 4 passes (forward, recompute, 2 of backward)
    # at the rate of its narrowest dimension, attention's 4 the same way; the head's 3 after the forward
    times = [f / (gemm_rate(rates.matmul_by_width, w, rates.matmul_tflops) * 1e12) for f, w in _matmuls(spec, T)]
    layer_mm, attn_pass = sum(times[:-1]), roof.attention_s / 4
    c_fwd, c_bwd, c_head = layer_mm / 4 + attn_pass, 3 * layer_mm / 4 + 3 * attn_pass, times[-1]
    _, unrouted_in, unrouted_out = routed_expert_bytes(cfg, spec, units, T)
    lay_in = (n_layers - unrouted_in / 2) * ec  # each pass's share of the experts that stay home
    lay_out = (n_layers - unrouted_out) * eg
    h2d, d2h = rates.h2d_gbps * 1e9, rates.d2h_gbps * 1e9
    tied = spec.tie_word_embeddings
    if b.embedding == "device":
        # an untied table crosses before layer 0 (into the head's buffer); the gradient is scatter-added
        # and normed on the device and crosses once, fp32, after the last layer's backward (a tied head's
        # gradient waits for it: they are one buffer)
        fwd = max(c_fwd, (lay_in + head * ec * (1 if tied else 2)) / h2d)
        bwd = max(c_bwd, lay_in / h2d, (lay_out + (0 if tied else head * eg)) / d2h)
        tail = max_layer * eg / d2h + head * 4 / d2h
    else:
        fwd = max(c_fwd, (lay_in + head * ec) / h2d)
        bwd = max(c_bwd, lay_in / h2d, (lay_out + head * (4 if tied else eg)) / d2h)
        tail = max_layer * eg / d2h + T * H * ec / d2h + (head * 4 + T * H * 8) / (rates.host_gbps * 1e9)
    opt = roof.optimizer_s
    if cfg.optim.clip == "previous":
        step, bound = fwd + c_head + max(bwd, opt) + tail, "optimizer" if opt >= bwd else "backward"
        overlap = "the updates overlap the backward (optim.clip: previous)"
    else:
        step, bound = max(opt, fwd) + c_head + bwd + tail, "optimizer" if opt >= fwd else "forward"
        overlap = "the updates overlap the next forward (optim.clip: global)"
    return Schedule(fwd_s=fwd, opt_s=opt, head_s=c_head, bwd_s=bwd, tail_s=tail, step_s=step, bound=bound,
                    overlap=overlap)


def layer_passes(n_layers: int) -> list[int]:
    """H2D copies of each layer per step: forward and backward, but once for the last two, which are
    still resident in the double buffer when backward starts."""
    return [1 if i >= n_layers - 2 else 2 for i in range(n_layers)]


def routed_expert_bytes(cfg: Config, spec: ModelSpec, units, tokens: int) -> tuple[float | None, float, float]:
    """With `engine.moe_streaming: routed` (engine/experts.py): (expected share of each MoE layer's
    experts that a step's `tokens` route to, then the elements of expert tensors expected not to
    cross PCIe per step host -> device and device -> host), assuming each token picks its k experts
    uniformly and independently (expected_fraction: k/E of the expert bytes for one token, all of
    them as tokens * k grows past E); (None, 0, 0) otherwise."""
    from megastream.engine.experts import expected_fraction, moe_shape, unit_experts

    shape = moe_shape(spec.hf_config) if spec.implementation == "hf" else None
    if cfg.engine.moe_streaming != "routed" or shape is None or cfg.lora is not None:
        return None, 0.0, 0.0
    E, k = shape
    frac = expected_fraction(E, k, tokens)
    experts = [(E * x.per_expert if (x := unit_experts(u, E)) is not None else 0) for u in units[1:-1]]
    h2d = sum(n * p for n, p in zip(experts, layer_passes(spec.num_layers)))
    return frac, h2d * (1.0 - frac), sum(experts) * (1.0 - frac)


def _matmuls(spec: ModelSpec, tokens: int) -> list[tuple[float, int]]:
    """(FLOPs per step, narrowest dimension) of each matmul of a step: every layer projection in
    forward, recompute and backward (4 x 2 FLOPs per weight per token), the head in forward and
    backward (3 x 2). A matmul runs as fast as its narrowest dimension allows (probe's by-width rate)."""
    H, I, L = spec.hidden_size, spec.intermediate_size, spec.num_layers
    qd, kd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = [(H, qd), (H, kd), (H, kd), (qd, H), (H, I), (H, I), (I, H)]
    out = [(8.0 * L * tokens * k * n, min(k, n)) for k, n in shapes]
    return out + [(6.0 * tokens * H * spec.vocab_size, min(H, spec.vocab_size))]


@dataclass
class Plan:
    cfg: Config
    spec: ModelSpec
    device_type: str
    budget: Budget
    machine: Machine
    rates: Rates
    roofline: Roofline
    schedule: Schedule  # the predicted step: the roofline's terms as the engine overlaps them
    ram_usable: int  # bytes this run may take: what is available now plus what this process holds
    gpu_budget: int | None  # bytes; None when no GPU is visible and engine.gpu_memory_gb is unset
    gpu_budget_source: str
    fits_host: bool
    fits_gpu: bool
    warnings: list[str]
    suggestions: list[str]
    modes: dict[str, Budget]
    data: dict = field(default_factory=dict)  # megastream.data.loader.data_plan: rows and fill from the cache
    lora_bases: dict[str, Budget] = field(default_factory=dict)  # LoRA: lora.base_dtype -> its budget
    dist: dict = field(default_factory=dict)  # data parallel (a Topology was given): per rank, per node, per step

    def lora_json(self) -> dict | None:
        """The LoRA block of `plan --json` (None for full fine-tuning)."""
        lo, b = self.budget.lora, self.budget
        if not lo:
            return None
        return {"rank": lo["rank"], "alpha": self.cfg.lora.alpha, "targets": lo["targets"],
                "adapter_params": lo["adapter_params"], "adapter_fraction": lo["adapter_params"] / b.params,
                "train_extra": lo["train_extra"], "extra_params": lo["extra_params"],
                "adapter_state_bytes_gpu": lo["adapter_bytes"], "adapter_state_gb_gpu": lo["adapter_bytes"] / 1e9,
                "base_dtype": lo["base_dtype"], "base_bytes_host": lo["base_bytes"],
                "base_bytes_per_param_host": lo["base_bytes"] / b.params,
                "h2d_bytes_per_step": lo["h2d_bytes_per_step"], "d2h_bytes_per_step": lo["d2h_bytes_per_step"],
                "pcie_gb_per_step": (lo["h2d_bytes_per_step"] + lo["d2h_bytes_per_step"]) / 1e9,
                "base_dtypes": {k: {"host_bytes_total": m.host_total, "gpu_bytes_total": m.gpu_total,
                                    "fits_host": m.host_total <= self.ram_usable}
                                for k, m in self.lora_bases.items()}}

    def to_json(self) -> dict:
        b, r = self.budget, self.roofline
        return {
            "model": self.cfg.model.preset or self.cfg.model.path, "architecture": self.spec.architecture,
            "params": b.params, "device": self.device_type, "compute_dtype": str(b.compute_dtype)[6:],
            "optimizer_mode": {"master": self.cfg.optim.master, "states": self.cfg.optim.states},
            "tokens_per_step": b.tokens_per_step,
            "embedding": b.embedding, "embedding_note": b.notes["embedding"],
            "loss_chunk_tokens": b.chunk_tokens, "loss_chunk_note": b.notes["loss chunk"],
            "host_bytes": b.host, "gpu_bytes": b.gpu,
            "host_bytes_total": b.host_total, "gpu_bytes_total": b.gpu_total,
            **_gpu_json(b),
            "host_bytes_per_param": b.host_total / b.params, "state_bytes_per_param": b.state_bytes_per_param,
            "pinned_bytes": b.pinned,
            "ram_total": self.machine.ram_total, "ram_available": self.machine.ram_available,
            "ram_usable": self.ram_usable, "gpu_budget_bytes": self.gpu_budget,
            "memlock_limit": self.machine.memlock_limit,
            "fits_host": self.fits_host, "fits_gpu": self.fits_gpu, "fits": self.fits_host and self.fits_gpu,
            "predicted_step_s": self.schedule.step_s,
            "predicted_tokens_per_s": b.tokens_per_step / self.schedule.step_s,
            "schedule": vars(self.schedule),
            "roofline": {"step_s": r.step_s, "flops_per_step": r.flops, "attention_flops_per_step": r.attention_flops, "compute_s": r.compute_s, "h2d_s": r.h2d_s, "d2h_s": r.d2h_s,
                         "h2d_bytes_per_step": r.h2d_bytes, "d2h_bytes_per_step": r.d2h_bytes,
                         "routed_expert_fraction": r.routed_fraction,
                         "adapter_s": r.adapter_s, "dequant_s": r.dequant_s,
                         "optimizer_s": r.optimizer_s, "bound": r.bound, "rates": vars(self.rates)},
            "modes": {k: {"host_bytes_total": m.host_total, "state_bytes_per_param": m.state_bytes_per_param,
                          "fits_host": m.host_total <= self.ram_usable} for k, m in self.modes.items()},
            "lora": self.lora_json(), "distributed": self.dist or None,
            "data": self.data, "warnings": self.warnings, "suggestions": self.suggestions,
        }




GPU_UNVERIFIED = "unverified (not yet measured on a CUDA allocator)"


def gpu_status(b: Budget) -> str:
    """Whether the GPU figure has met a CUDA allocator (memory.GPU_CALIBRATION), in words: which run
    checked the model, planned against measured. A calibration is one config's peak, not this one's."""
    c = b.gpu_calibration
    if c is None:
        return GPU_UNVERIFIED
    planned, measured = c.get("planned_bytes"), c.get("measured_bytes")
    where = f"{c.get('device', 'a GPU')} ({c.get('date', 'undated')})"
    figures = f"planned {planned / 1e9:.2f} GB, measured {measured / 1e9:.2f} GB" if planned and measured else ""
    if not b.gpu_verified:  # LoRA: its adapters, dequantized layer and frozen backward are not in that run
        return f"unverified for LoRA (full fine-tuning's model was checked on {where}: {figures})"
    return f"checked on {where} against {c.get('label', 'one run')}: {figures}"


def _gpu_json(b: Budget) -> dict:
    cuda = b.device_type == "cuda"
    totals = b.phase_totals
    return {"gpu_peak_phase": b.peak_phase if cuda else None,
            "gpu_phases": {k: {"bytes_total": totals[k], "bytes": v} for k, v in b.phases.items()} if cuda else {},
            "gpu_persistent_bytes": b.device_persistent if cuda else {},
            "gpu_verified": b.gpu_verified, "gpu_status": gpu_status(b) if cuda else None,
            "gpu_calibration": b.gpu_calibration}


def _with(cfg: Config, **sections) -> Config:
    return replace(cfg, **{k: replace(getattr(cfg, k), **v) for k, v in sections.items()})


def make_plan(cfg: Config, spec: ModelSpec, runtime_bytes: int | None = None, host: Machine | None = None,
              topology=None) -> Plan:
    """The budget and verdict of `cfg` on this machine (or on `host`, a Machine to plan for). With a
    `topology` (megastream.dist.cost.Topology: ranks per node, nodes, link bandwidths), `budget.host` is
    one rank's, the host verdict is for a node (all its ranks), and `dist` holds the data-parallel model."""
    device_type = plan_device(cfg)
    compute, grad = resolve_dtypes(cfg, torch.device(device_type))
    runtime = rss() if runtime_bytes is None else runtime_bytes
    m = host or machine()
    gpu_budget, source = gpu_budget_of(cfg, m) if device_type == "cuda" else (None, "no GPU here")
    distributed = topology is not None and topology.world > 1

    def budget_of(c: Config) -> Budget:
        return budget(c, spec, device_type, compute, grad, runtime, gpu_budget=gpu_budget, distributed=distributed)

    b = budget_of(cfg)
    rates = rates_for(device_type, b.compute_dtype)  # (a LoRA base computes in lora.base_dtype)
    roof = roofline(cfg, spec, b, rates)
    ram_usable = m.ram_available + (rss() if host is None else runtime)
    dist = {}
    if topology is not None:
        dist = _dist_plan(cfg, spec, b, roof, topology, budget_of, rates)
        b.host = dist.pop("host_per_rank")
        if cfg.train.grad_accum % topology.world:
            dist["warning"] = (f"train.grad_accum {cfg.train.grad_accum} cannot be split evenly across {topology.world} "
                            f"ranks, so `megastream train` would refuse it; set it to a multiple of {topology.world}")
    per_node = b.host_total * (topology.ranks_per_node if topology is not None else 1)
    fits_host = per_node <= ram_usable

    fits_gpu = device_type == "cpu" or (gpu_budget is not None and b.gpu_total <= gpu_budget)

    warnings = [dist["warning"]] if "warning" in dist else []
    if device_type == "cuda" and gpu_budget is None:
        warnings.append("no GPU is visible here and engine.gpu_memory_gb is unset, so the GPU verdict is 'no'; "
                        "set engine.gpu_memory_gb to the card you will run on")
    if m.memlock_limit is not None and b.pinned > m.memlock_limit:
        warnings.append(f"{b.pinned / 1e9:.1f} GB would be page-locked but the locked-memory limit (ulimit -l) "
                        f"is {m.memlock_limit / 1e9:.2f} GB; if pinning fails, raise it (ulimit -l unlimited, or "
                        "memlock in /etc/security/limits.conf / docker --ulimit memlock=-1)")
    if device_type == "cpu" and b.compute_dtype == torch.bfloat16:
        ratio = rates.bf16_scale
        key = "lora.base_dtype" if cfg.lora is not None and cfg.lora.base_dtype == "bf16" else "engine.dtype"
        if ratio is not None and ratio < 0.5:
            warnings.append(f"bf16 matmuls run at {ratio:.2f}x float32's rate on this CPU (measured by `megastream "
                            f"probe`); {key}: float32 is faster here and exact")
        elif ratio is None and host is None and not {"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags():
            warnings.append("this CPU has no native bf16 (no AVX512-BF16, AMX or Arm BF16): bf16 matmuls typically "
                            f"run ~9x slower than float32 there; {key}: float32 is faster and exact")
    if fits_host and b.host_total > 0.9 * m.ram_total:
        warnings.append(f"the run takes {b.host_total / m.ram_total:.0%} of this machine's RAM; other programs "
                        "may push it into swap")

    if cfg.lora is None:
        modes = {k: budget_of(_with(cfg, optim={"master": ms, "states": st})) for k, (ms, st) in MODES.items()}
        bases = {}
    else:  # the optimizer modes do not apply to a frozen base; the base's format does
        modes = {}
        bases = {k: b if k == cfg.lora.base_dtype else budget_of(_with(cfg, lora={"base_dtype": k}))
                 for k in LORA_BASES}
    suggestions = _suggest(cfg, b, modes, budget_of, ram_usable, gpu_budget, fits_host, fits_gpu, device_type, bases)
    return Plan(cfg, spec, device_type, b, m, rates, roof, schedule(cfg, spec, b, rates, roof), ram_usable,
                gpu_budget, source, fits_host, fits_gpu, warnings, suggestions, modes, lora_bases=bases, dist=dist)


def gpu_budget_of(cfg: Config, m: Machine) -> tuple[int | None, str]:
    """(bytes a CUDA run may use: engine.gpu_memory_gb, or the first GPU's memory, or None; where from)."""
    physical = m.gpus[0].total_bytes if m.gpus else None
    cap = int(cfg.engine.gpu_memory_gb * 1e9) if cfg.engine.gpu_memory_gb else None
    if cap and physical:
        return min(cap, physical), (f"engine.gpu_memory_gb={cfg.engine.gpu_memory_gb:g} on a {physical / 1e9:.0f} GB "
                                    f"{m.gpus[0].name}")
    if cap:
        return cap, f"engine.gpu_memory_gb={cfg.engine.gpu_memory_gb:g} (no GPU visible here)"
    if physical:
        return physical, f"{m.gpus[0].name}, {physical / 1e9:.0f} GB"
    return None, "no GPU here"


def _dist_plan(cfg: Config, spec: ModelSpec, b: Budget, roof: Roofline, topo, budget_of, rates: Rates) -> dict:
    """Per rank and per node: host RAM, GPU, PCIe and collective bytes per step, the step's terms,
    and the scaling efficiency against one GPU at the same tokens per step per GPU."""
    from megastream.dist.cost import comm_bytes, dist_terms, per_rank_host

    n, world = topo.ranks_per_node, topo.world
    units = model_layout(spec)
    moved = comm_bytes(units, spec.tie_word_embeddings, b.compute_dtype.itemsize, b.grad_dtype.itemsize, n,
                       topo.nodes, b.lora.get("adapter_params", 0) if b.lora else 0)
    terms = dist_terms(topo, roof, moved)
    one = None
    if cfg.train.grad_accum % world == 0:  # one GPU with this GPU's share of the step's tokens
        c1 = _with(cfg, train={"grad_accum": cfg.train.grad_accum // world})
        one = roofline(c1, spec, budget_of(c1), rates).step_s
    host = per_rank_host(b.host, n)
    if n > 1:  # rank 0 saves: one unit at a time gathered from the ranks' slices, in the weights' dtype
        w = 4 if cfg.lora is None and cfg.optim.master == "fp32" else b.compute_dtype.itemsize
        host["a unit gathered to save (rank 0)"] = max(u.numel for u in units) * w
    return {"ranks_per_node": n, "nodes": topo.nodes, "world": world, "peer_gbps": topo.peer_gbps,
            "net_gbps": topo.net_gbps, "host_per_rank": host, "host_bytes_per_rank": sum(host.values()),
            "host_bytes_per_node": n * sum(host.values()), "host_bytes_one_process": b.host_total,
            "gpu_bytes_per_rank": b.gpu_total,
            **{f"{k}_per_step_per_rank": v for k, v in moved.items()}, **terms,
            "tokens_per_s": b.tokens_per_step / terms["step_s"],
            "one_gpu_step_s": one,
            "scaling_efficiency": (one / terms["step_s"]) if one else None}


LORA_BASES = ("bf16", "int8", "nf4")  # lora.base_dtype choices `plan` compares


def _suggest(cfg, b, modes, budget_of, ram_usable, gpu_budget, fits_host, fits_gpu, device_type,
             bases=None) -> list[str]:
    out = []
    gb = lambda n: f"{n / 1e9:.0f} GB" if n >= 10e9 else f"{n / 1e9:.1f} GB"  # noqa: E731
    if not fits_host and cfg.lora is not None:
        fitting = [(k, m) for k, m in (bases or {}).items() if m.host_total <= ram_usable and k != cfg.lora.base_dtype]
        for k, m in fitting:
            out.append(f"lora.base_dtype: {k} brings host RAM to {gb(m.host_total)} (of {gb(ram_usable)} usable)")
        if not fitting:
            out.append(f"even an nf4 base needs {gb(min(m.host_total for m in bases.values()))} of host RAM and "
                       f"{gb(ram_usable)} is usable here: use a machine with more RAM or a smaller model")
    elif not fits_host:
        fitting = [(k, m) for k, m in modes.items() if m.host_total <= ram_usable]
        for k, m in fitting:
            ms, st = MODES[k]
            out.append(f"optim.master: {ms}, optim.states: {st} ({k} mode) brings host RAM to "
                       f"{gb(m.host_total)} (of {gb(ram_usable)} usable)")
        if not fitting:
            smallest = min(modes.values(), key=lambda m: m.host_total)
            out.append(f"even the compact mode needs {gb(smallest.host_total)} of host RAM and {gb(ram_usable)} "
                       "is usable here: use a machine with more RAM or a smaller model")
    if not fits_gpu and gpu_budget is not None:
        t, e = cfg.train, cfg.engine
        tries = []
        if e.activations == "device":
            tries.append(("engine.activations: host", {"engine": {"activations": "host"}}))
        if t.micro_batch_size > 1:
            mbs = max(1, t.micro_batch_size // 2)
            ga = t.grad_accum * t.micro_batch_size // mbs
            tries.append((f"train.micro_batch_size: {mbs}, train.grad_accum: {ga} (same tokens per step)",
                          {"train": {"micro_batch_size": mbs, "grad_accum": ga}}))
        both = {"engine": {"activations": "host"}, "train": {"micro_batch_size": 1,
                                                             "grad_accum": t.grad_accum * t.micro_batch_size}}
        tries.append(("engine.activations: host with train.micro_batch_size: 1", both))
        for text, change in tries:
            g = budget_of(_with(cfg, **change)).gpu_total
            if g <= gpu_budget:
                out.append(f"{text} brings GPU memory to {gb(g)} (of {gb(gpu_budget)})")
                break
        else:
            out.append(f"even with activations on the host and one sequence per micro-batch the GPU needs more than "
                       f"{gb(gpu_budget)}: lower data.seq_len or use a larger GPU")
    if device_type == "cpu" and torch.cuda.is_available():
        out.append("a GPU is visible: engine.device: cuda")
    return out


# ---- rendering -----------------------------------------------------------------------------------
def render(p: Plan) -> str:
    b, r, m = p.budget, p.roofline, p.machine
    gb = lambda n: f"{n / 1e9:10.2f} GB"  # noqa: E731
    name = p.cfg.model.preset or p.cfg.model.path
    mode = mode_name(p.cfg) or "custom"
    size = f"{b.params / 1e9:.2f}B" if b.params >= 1e9 else f"{b.params / 1e6:.1f}M"
    if b.lora:
        training = f"LoRA rank {b.lora['rank']} over a frozen {b.lora['base_dtype']} base"
    else:
        training = (f"gradients {str(b.grad_dtype)[6:]}, optim.master {p.cfg.optim.master}, "
                    f"optim.states {p.cfg.optim.states} ({mode} mode)")
    lines = [f"{name} ({p.spec.architecture}): {size} parameters, {p.spec.num_layers} layers",
             f"device {p.device_type}, compute {str(b.compute_dtype)[6:]}, {training}, "
             f"activations {p.cfg.engine.activations}",
             f"{b.tokens_per_step} tokens/step = {p.cfg.train.micro_batch_size} x {p.cfg.train.grad_accum} x "
             f"{p.cfg.data.seq_len}", _data_line(p.data),
             f"embedding on the {b.embedding} ({b.notes['embedding']}): "
             + ("rows gathered and gradient scatter-added on the GPU, the table streamed like a unit"
                if b.embedding == "device" else "rows gathered and gradient summed in host memory"),
             f"loss chunk {b.chunk_tokens} tokens: {b.notes['loss chunk']}", "",
             "host RAM" + " " * 40 + "bytes   per param"]
    for k, v in b.host.items():
        label = f"working (the frozen base, {b.lora['base_dtype']})" if b.lora and k == "working" else k
        lines.append(f"  {label:<44}{gb(v)}  {v / b.params:8.2f}")
    lines.append(f"  {'total':<44}{gb(b.host_total)}  {b.host_total / b.params:8.2f}")
    if b.gpu:
        lines += ["", f"GPU memory, peak in the {b.peak_phase} phase: {gpu_status(b)}",
                  "  persistent (alive in every phase)"]
        for k, v in b.device_persistent.items():
            lines.append(f"    {k:<42}{gb(v)}")
        lines.append(f"  {b.peak_phase} (the peak phase)")
        for k, v in b.phases[b.peak_phase].items():
            lines.append(f"    {k:<42}{gb(v)}")
        lines.append(f"  {'total (persistent + peak phase)':<44}{gb(b.gpu_total)}")
        totals = b.phase_totals
        lines.append("  each phase's total: " + ", ".join(
            f"{k} {v / 1e9:.2f} GB" + (" (peak)" if k == b.peak_phase else "") for k, v in totals.items()))
    if b.pinned:
        lines.append(f"  (page-locked host memory: {b.pinned / 1e9:.2f} GB)")
    if b.lora:
        lines += [""] + _lora_lines(p)
    else:
        lines += ["", "optimizer modes, host RAM (GB)     working   master   states  staging    other    total  verdict"]
    for k, mb in p.modes.items():
        ms, st = MODES[k]
        h = mb.host
        core = h["working"] + h.get("master", 0) + h["optimizer states"] + h["gradient staging"]
        fit = "fits" if mb.host_total <= p.ram_usable else "does not fit"
        mark = "  <- configured" if k == mode else ""
        lines.append(f"  {k:<8} master {ms:<4} states {st:<4} {h['working'] / 1e9:9.2f} "
                     f"{h.get('master', 0) / 1e9:8.2f} {h['optimizer states'] / 1e9:8.2f} {h['gradient staging'] / 1e9:8.2f} "
                     f"{(mb.host_total - core) / 1e9:8.2f} {mb.host_total / 1e9:8.2f}  {fit}{mark}")

    memlock = "unlimited" if m.memlock_limit is None else f"{m.memlock_limit / 1e9:.2f} GB"
    lines += ["", f"this machine: {m.cpu}, {m.cores} cores; RAM {m.ram_total / 1e9:.1f} GB total, "
              f"{m.ram_available / 1e9:.1f} GB available; locked-memory limit {memlock}"]
    if m.gpus:
        lines.append("  GPU " + "; ".join(f"{g.index}: {g.name}, {g.total_bytes / 1e9:.0f} GB" for g in m.gpus))
    host_v = "yes" if p.fits_host else "NO"
    need = p.dist["host_bytes_per_node"] if p.dist else b.host_total
    lines.append(f"  host RAM{' (the node: all its ranks)' if p.dist else ''}: {need / 1e9:.2f} GB of "
                 f"{p.ram_usable / 1e9:.2f} GB usable -> fits: {host_v}")
    if p.device_type == "cuda":
        budget_txt = f"{p.gpu_budget / 1e9:.2f} GB ({p.gpu_budget_source})" if p.gpu_budget else p.gpu_budget_source
        lines.append(f"  GPU: {b.gpu_total / 1e9:.2f} GB of {budget_txt} -> fits: {'yes' if p.fits_gpu else 'NO'}"
                     + ("" if b.gpu_verified else f" ({GPU_UNVERIFIED})"))

    base_s = r.compute_s - r.attention_s - r.adapter_s - r.dequant_s  # the base's matmuls
    ad_flops = 8.0 * b.lora["adapter_params"] * b.tokens_per_step if b.lora else 0.0
    mm_rate = (r.flops - r.attention_flops - ad_flops) / max(base_s, 1e-12) / 1e12
    at_rate = r.attention_flops / max(r.attention_s, 1e-12) / 1e12
    lines += ["", f"roofline ({p.rates.source}):",
              f"  {'compute':<46}{r.compute_s:9.3f} s",
              f"    {f'matmuls {(r.flops - r.attention_flops - ad_flops) / 1e12:.3g} TFLOP at {mm_rate:.3g} TFLOP/s':<44}"
              f"{base_s:9.3f} s   (each at the rate of its narrowest dimension)",
              f"    {f'attention {r.attention_flops / 1e12:.3g} TFLOP at {at_rate:.3g} TFLOP/s':<44}{r.attention_s:9.3f} s"
              f"   ({'document-masked' if p.cfg.data.pack else 'causal'}, seq {p.cfg.data.seq_len}, "
              f"head_dim {p.spec.head_dim})"]
    if b.lora:
        ad_rate = ad_flops / max(r.adapter_s, 1e-12) / 1e12
        lines.append(f"    {f'adapters {ad_flops / 1e12:.3g} TFLOP at {ad_rate:.3g} TFLOP/s':<44}{r.adapter_s:9.3f} s"
                     f"   (rank {b.lora['rank']}: x A^T and the rank-wide update of each output)")
        if r.dequant_s:
            q = b.lora["base_dtype"]
            lines.append(f"    {f'dequantize {q} at {p.rates.dequant_gbps[q]:g} GB/s':<44}{r.dequant_s:9.3f} s"
                         "   (the streamed layers' packed bytes, forward and recompute)")
    if p.device_type == "cuda":
        lines.append(f"  H2D        at {p.rates.h2d_gbps:g} GB/s{'':22}{r.h2d_s:9.3f} s")
        lines.append(f"  D2H        at {p.rates.d2h_gbps:g} GB/s{'':22}{r.d2h_s:9.3f} s")
    if r.routed_fraction is not None:
        lines.append(f"  PCIe per step: H2D {r.h2d_bytes / 1e9:.3f} GB, D2H {r.d2h_bytes / 1e9:.3f} GB: routed experts "
                     f"only, {r.routed_fraction:.1%} of each MoE layer's (expected if {b.tokens_per_step} tokens "
                     "route uniformly)")
    if b.lora:
        where = "the adapters' AdamW, on the device" if p.device_type == "cuda" else "the adapters' AdamW"
        lines.append(f"{f'  optimizer  ({where})':<48}{r.optimizer_s:9.3f} s")
    else:
        lines.append(f"  optimizer  ({mode} mode){'':24}{r.optimizer_s:9.3f} s")
    sc = p.schedule
    tps = b.tokens_per_step / sc.step_s
    if sc.step_s != r.step_s:  # a GPU: the engine overlaps the host optimizer with part of the step only
        terms = (f"max(optimizer {sc.opt_s:.3f}, forward {sc.fwd_s:.3f}) + head {sc.head_s:.3f} + backward "
                 f"{sc.bwd_s:.3f}" if p.cfg.optim.clip != "previous" else
                 f"forward {sc.fwd_s:.3f} + head {sc.head_s:.3f} + max(backward {sc.bwd_s:.3f}, optimizer "
                 f"{sc.opt_s:.3f})")
        lines.append(f"  all terms overlapped: {r.step_s:.3f} s ({r.bound}-bound); as the engine runs them, "
                     f"{sc.overlap}:")
        lines.append(f"    {terms} + tail {sc.tail_s:.3f}")
    lines.append(f"  predicted step {sc.step_s:.3f} s ({sc.bound}-bound), {tps:,.0f} tokens/s; "
                 f"{p.cfg.train.steps} steps in {_duration(sc.step_s * p.cfg.train.steps)}")
    if p.dist:
        lines += [""] + _dist_lines(p)
    for w in p.warnings:
        lines.append(f"warning: {w}")
    verdict = "fits" if p.fits_host and p.fits_gpu else "does NOT fit"
    lines += ["", f"verdict: {verdict}"]
    for s in p.suggestions:
        lines.append(f"  suggestion: {s}")
    return "\n".join(lines)


def _dist_lines(p: Plan) -> list[str]:
    d = p.dist
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    eff = f", {d['scaling_efficiency']:.0%} scaling efficiency" if d["scaling_efficiency"] else ""
    return [f"data parallel: {d['world']} ranks = {d['ranks_per_node']} per node x {d['nodes']} node(s) (host state "
            f"sharded {d['ranks_per_node']} ways in a node, replicated across nodes)",
            f"  host RAM per rank {gb(d['host_bytes_per_rank'])} (the table above), per node "
            f"{gb(d['host_bytes_per_node'])} (one process: {gb(d['host_bytes_one_process'])}); GPU per rank "
            f"{gb(d['gpu_bytes_per_rank'])}",
            f"  per rank per step: H2D {gb(d['h2d_bytes_per_step_per_rank'])}, D2H "
            f"{gb(d['d2h_bytes_per_step_per_rank'])}, all-gather {gb(d['all_gather_bytes_per_step_per_rank'])}, "
            f"reduce-scatter {gb(d['reduce_scatter_bytes_per_step_per_rank'])}, all-reduce across nodes "
            f"{gb(d['all_reduce_bytes_per_step_per_rank'])}",
            f"  links: peer {d['peer_gbps']:g} GB/s per GPU, network {d['net_gbps']:g} GB/s per GPU -> all-gather "
            f"{d['all_gather_s']:.3f} s, reduce-scatter {d['reduce_scatter_s']:.3f} s, all-reduce {d['all_reduce_s']:.3f} s",
            f"  predicted step {d['step_s']:.3f} s ({d['bound']}-bound), {d['tokens_per_s']:,.0f} tokens/s{eff} "
            "(documented, unmeasured on GPUs)"]


def _lora_lines(p: Plan) -> list[str]:
    b, lo = p.budget, p.budget.lora
    targets = lo["targets"]
    what = "all-linear" if len(targets) == 7 else ", ".join(targets)
    lines = [f"LoRA: rank {lo['rank']} on {what} ({len(targets)} targets x {p.spec.num_layers} layers), "
             f"{lo['adapter_params'] / 1e6:.4g}M adapter parameters ({lo['adapter_params'] / b.params:.2%} of the base)",
             *([f"  + {', '.join(lo['train_extra'])} trained in full (lora.train_extra): "
                f"{lo['extra_params'] / 1e6:.4g}M parameters, with the adapters on the device"] if lo["extra_params"] else []),
             f"  {'GPU   adapters, gradients, AdamW moments (fp32, 16 B/param)':<60}{lo['adapter_bytes'] / 1e9:8.2f} GB",
             f"  {'host  frozen base in ' + lo['base_dtype']:<60}"
             f"{lo['base_bytes'] / 1e9:8.2f} GB   ({lo['base_bytes'] / b.params:.2f} B/param; no master, optimizer "
             "states or gradient staging)",
             f"  PCIe  per step: H2D {lo['h2d_bytes_per_step'] / 1e9:.2f} GB (each layer twice, but the two resident at each turn), "
             f"D2H {lo['d2h_bytes_per_step'] / 1e9:.2f} GB",
             "  lora.base_dtype, host RAM / GPU (GB): " + ", ".join(
                 f"{k} {m.host_total / 1e9:.1f} / {m.gpu_total / 1e9:.1f}"
                 + ("" if m.host_total <= p.ram_usable else " (does not fit)")
                 + (" <- configured" if k == lo["base_dtype"] else "") for k, m in p.lora_bases.items())]
    return lines


def _data_line(d: dict) -> str:
    if "fill" not in d:
        return f"data: {d.get('note', 'unknown')}"
    return (f"data: {d['rows']:,} rows from the token cache ({d['tokens']:,} tokens of {d['documents']:,} documents), "
            f"pack {d['pack']}, fill {d['fill']:.1%}")


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def plan_main(cfg: Config, as_json: bool, topology=None) -> int:
    spec = model_spec(cfg)
    check_model_inputs(cfg, spec, log=lambda msg: print(msg, file=sys.stderr))  # stdout: the plan (or its JSON)
    p = make_plan(cfg, spec, topology=topology)
    from megastream.data.loader import data_plan

    p.data = data_plan(cfg, spec.vocab_size)
    print(json.dumps(p.to_json(), indent=2) if as_json else render(p))
    return 0 if p.fits_host and p.fits_gpu else 1
