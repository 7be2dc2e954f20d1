"""The memory model: every byte a run will hold, by component, on the host and on the device.

One function, `budget()`, used by `megastream plan` (before anything is allocated) and by
`megastream train` (to refuse a run that cannot fit, and in its start-up summary). The host-store
terms are exact (they are the sizes HostStore allocates; a test checks it); device terms follow
the engine's buffers (engine/weights.py, engine/grads.py, engine/loss.py) and the tensors autograd
keeps while one layer is recomputed; the rest are stated estimates.

The device peak is a maximum over the phases of a step, not a sum of every buffer: persistent
buffers (weight slots, gradient accumulators, the step's masks) are alive throughout, and on top of
them exactly one of
    forward of one layer   boundary checkpoints so far, the layer's outputs, its no-grad transients
    loss chunk             checkpoints, final hidden states and d(hidden), one chunk's fp32 logits
    backward of one layer  checkpoints, d(hidden) in and out, the recomputed layer's saved
                           activations and its weight gradients
A CUDA caching allocator reuses what a phase frees for the next, so its max_memory_allocated is the
largest phase. The GPU figure is unverified until GPU_CALIBRATION records a measured peak.

The embedding on the device (engine.embedding: device) adds no buffer and no phase: its table is
copied into the head weight buffer, its gradient built in the head's fp32 accumulator, and what its
gather and scatter-add hold besides (token ids, one micro-batch's fp32 rows' gradient) is far below
the backward of a layer.

The loss chunk (`chunk_tokens`): engine.loss_chunk_tokens, or automatically the tokens whose fp32
logits take about 256 MiB (engine/loss.py:auto_chunk_tokens), which on CUDA grows into the plan's free
GPU memory (`sized_chunk_tokens`): its lm_head gradient GEMMs then have a wider inner dimension.

On the CPU the "device" buffers live in host RAM, so they are added to the host total and the GPU
total is 0; glibc malloc keeps much of what one phase frees, so there the phases add up (see
`budget`).

With `lora:` (adapters over a frozen base, megastream.adapters) the same model, with LoRA's terms:
host  the frozen base alone, held in lora.base_dtype (int8 / nf4: each layer's seven projections as
      adapters/quant.py's flat buffers, quantized_nbytes each; embeddings, head, norms and biases in
      the compute dtype); no master, optimizer states or gradient staging
GPU   persistent: two layer buffers in the streamed format, the dequantized layer (int8 / nf4), the
      head, and every adapter's A and B with their gradients and AdamW moments, 16 B a parameter
      (fp32, adapters/lora.py), also for each (V, H) module of lora.train_extra; no gradient accumulators. Phases as above, except that backward of
      a frozen layer has no weight gradients (one layer's adapters and their gradients instead), the
      adapters' dropout masks and dropped inputs join the recomputed layer's activations, and the
      loss chunk computes no lm_head gradient.
PCIe  the layers host -> GPU twice a step (forward and the backward's recompute), in the streamed
      format; nothing back (`Budget.lora["h2d_bytes_per_step"]`, used by plan.roofline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megastream.checkpoint import WRITE_CHUNK
from megastream.config import Config
from megastream.engine.loss import _DW_BLOCK_BUDGET, auto_chunk_tokens
from megastream.model.layout import UnitLayout, model_layout
from megastream.model.spec import ModelSpec
from megastream.store import BLOCK, STATE_DTYPES

CUDA_CONTEXT_HOST = int(1.0e9)  # host RSS of the CUDA runtime and its libraries (estimate)
# Host RSS a training process gains in its first step beyond its tensors: kernel code paged in from
# libtorch, OpenMP/oneDNN thread pools and scratch, the optimizer thread's malloc arena. Measured on
# the CPU (2-core Xeon, torch 2.13, 2026-11-22: demo config, peak RSS minus every planned term).
ENGINE_RUNTIME = int(0.09e9)
CUDA_CONTEXT_DEVICE = int(0.6e9)  # device memory outside the caching allocator: context, cuBLAS workspace
# fp32 (chunk, V) tensors alive at once in engine/loss.py: the logits z and logsumexp's exp(z - max).
# Everything else on a chunk is in place (softmax, minus one-hot, scale) or narrower (d(logits) in
# the compute dtype, one (v_block, H) lm_head gradient block, which never coexists with the second).
LOGITS_TEMPS = 2
# Device bytes per adapter parameter: A / B, its gradient and AdamW's two moments, all fp32 (adapters/lora.py).
ADAPTER_BYTES = 16
_LORA_BASE_DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}

PHASE_FORWARD, PHASE_LOSS, PHASE_BACKWARD = "forward of one layer", "loss chunk", "backward of one layer"
MAX_CHUNK_TOKENS = 8192  # the automatic loss chunk grows up to this many tokens on CUDA
# Measured calibration of the GPU figure on a CUDA allocator. None: never measured, and `plan` says
# so. The GPU acceptance run (tests/test_gpu.py::test_plan_predicts_gpu_peak_within_15_percent,
# scripts/gpu_acceptance.sh) measures torch.cuda.max_memory_allocated against this model; commit
# its record here, e.g. {"date": "...", "device": "H100 80GB", "torch": "2.x", "config": "...",
# "planned_bytes": ..., "measured_bytes": ...} (planned_bytes: gpu_total minus CUDA_CONTEXT_DEVICE).
# The first H200 run (benchmarks/results/2026-11-29-h200-first-run.md): the qwen2.5-3b head-to-head's
# megastream:full row peaked at 9.19 GB allocated (printed to 2 decimals; its JSON was lost to the step's
# timeout) where this model plans 9.113 GB for that config; test_plan_predicts_gpu_peak_within_15_percent
# passed there too (qwen2.5-0.5b, activations on the device and on the host).
GPU_CALIBRATION: dict | None = {
    "date": "2026-11-29", "device": "NVIDIA H200", "torch": "2.11.0+cu130",
    "label": "qwen2.5-3b, full mode, 8192 tokens a step",
    "config": "benchmarks/throughput.py --model qwen2.5-3b, megastream:full, 4 x 2 x 1024 tokens a step, "
              "engine.gpu_memory_gb 24, activations and embedding on the device, loss chunk 4096 tokens",
    "planned_bytes": 9_112_807_576, "measured_bytes": 9_190_000_000}


@dataclass
class Budget:
    """Bytes by component. `host` is what the process will hold in RAM at its peak; `gpu` what the
    device will hold at its peak phase (empty on the CPU, where those buffers are part of `host`)."""
    params: int
    device_type: str  # "cuda" | "cpu"
    compute_dtype: torch.dtype
    grad_dtype: torch.dtype
    tokens_per_step: int
    host: dict[str, int] = field(default_factory=dict)
    gpu: dict[str, int] = field(default_factory=dict)
    pinned: int = 0  # host bytes page-locked (cuda only)
    notes: dict[str, str] = field(default_factory=dict)  # component -> how it was estimated
    # The device model, on either device type: buffers alive in every phase, and each phase's own
    # terms. On cuda `gpu` is `device_persistent` plus the terms of `peak_phase`.
    device_persistent: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    gpu_calibration: dict | None = None  # GPU_CALIBRATION (cuda budgets only)
    # LoRA runs only (empty for full fine-tuning): rank, targets, adapter_params, adapter_bytes (device),
    # base_dtype, base_bytes (host), h2d_bytes_per_step, d2h_bytes_per_step.
    lora: dict = field(default_factory=dict)
    embedding: str = "host"  # engine.embedding resolved (resolve.embedding_path): "host" | "device"
    chunk_tokens: int = 0  # tokens per loss chunk; notes["logits chunk"] says how it was chosen

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def phase_totals(self) -> dict[str, int]:
        """Device bytes at each phase's peak: persistent buffers plus the phase's own terms."""
        base = sum(self.device_persistent.values())
        return {k: base + sum(v.values()) for k, v in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.phase_totals
        return max(totals, key=totals.get) if totals else ""

    @property
    def gpu_verified(self) -> bool:
        """The device model this budget uses has met a CUDA allocator: the calibration run was full
        fine-tuning, so a LoRA budget (its own GPU terms) is not verified by it."""
        return self.gpu_calibration is not None and not self.lora

    @property
    def state_bytes_per_param(self) -> float:
        return (self.host["working"] + self.host.get("master", 0) + self.host["optimizer states"]) / self.params


def store_bytes(spec: ModelSpec, compute: torch.dtype, grad: torch.dtype, master: bool, states: str,
                rotating_grads: bool = False) -> dict[str, int]:
    """The host store's arenas (store.HostStore allocates exactly these). `rotating_grads`
    (optim.clip: previous): the head's staging and two slots of the largest layer, not one per unit."""
    units = model_layout(spec)
    sizes = [u.numel for u in units]
    n, n_embed = sum(sizes), sizes[0]
    ns = sum(-(-s // BLOCK) * BLOCK for s in sizes)  # state slices start on 256-element boundaries
    m_dtype, v_dtype = STATE_DTYPES[states]
    out = {"working": n * compute.itemsize}
    if master and compute != torch.float32:
        out["master"] = n * 4
    out["optimizer states"] = ns * (m_dtype.itemsize + v_dtype.itemsize) + (ns // BLOCK * 8 if states == "int8" else 0)
    staged = 2 * max(sizes[1:-1]) + sizes[-1] if rotating_grads else n - n_embed
    out["gradient staging"] = staged * grad.itemsize + n_embed * 4
    return out


def lora_base_format(cfg: Config, compute: torch.dtype) -> tuple[torch.dtype, str | None]:
    """lora.base_dtype -> (the dtype the frozen base computes in and holds its unquantized tensors in,
    the quantization scheme of its layers' projections or None). auto: the compute dtype (as train.py's
    base_dtype); int8 / nf4 dequantize to the compute dtype."""
    want = cfg.lora.base_dtype
    if want in ("int8", "nf4"):
        return compute, want
    return (compute if want == "auto" else _LORA_BASE_DTYPES[want]), None


def frozen_unit_bytes(unit: UnitLayout, dtype: torch.dtype, scheme: str | None) -> int:
    """Host bytes (and bytes streamed) of one unit of a frozen base: a layer's 2-D projections (and 3-D
    stacks of experts, expert by expert) quantized with `scheme` (adapters/quant.py's flat buffers),
    everything else in `dtype`."""
    from megastream.adapters.quant import packed_nbytes

    if scheme is None or not unit.name.startswith("layer."):
        return unit.numel * dtype.itemsize
    return sum(packed_nbytes(e.shape, scheme) if e.decay else e.numel * dtype.itemsize for e in unit.entries)


def frozen_store_bytes(spec: ModelSpec, dtype: torch.dtype, scheme: str | None = None) -> dict[str, int]:
    """The host store of a frozen base (HostStore(trainable=False) for an unquantized one): the weights
    alone, under store.breakdown()'s names."""
    return {"working": sum(frozen_unit_bytes(u, dtype, scheme) for u in model_layout(spec)),
            "optimizer states": 0, "gradient staging": 0}


def lora_adapter_shapes(cfg: Config, spec: ModelSpec) -> tuple[tuple[str, ...], dict]:
    """(the resolved lora.target_modules, adapters/peft_io.adapter_shapes of every layer and target)."""
    from megastream.adapters.peft_io import adapter_shapes, resolve_targets

    targets = resolve_targets(cfg.lora.target_modules, spec)
    return targets, adapter_shapes(spec, targets, cfg.lora.rank)


def layer_activation_bytes(spec: ModelSpec, tokens: int, itemsize: int) -> int:
    """Bytes autograd holds while one layer is recomputed and backpropagated for `tokens` tokens:
    the tensors model/llama.py:block saves for backward, plus the gradients flowing through it.
    SDPA runs flash / memory-efficient kernels, so no (S, S) score matrix is kept."""
    H, I = spec.hidden_size, spec.intermediate_size
    qd, kd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    e = itemsize
    # each RMSNorm: an fp32 copy of its input (none when the input is fp32), the normalised tensor and
    # the scaled output; the attention residual and the layer's output; rope'd q and k, v, the SDPA
    # output and its (B, S, nh*hd) copy; the MLP's four I-wide tensors
    norm = (4 if e != 4 else 0) + 2 * e
    saved = H * (2 * norm + 2 * e) + qd * 3 * e + kd * 2 * e + I * 4 * e
    # backward peaks in the MLP: d(silu(gate)) and d(up) beside everything saved; SDPA's logsumexp
    flowing = 2 * e * I + 4 * spec.num_heads
    return tokens * (saved + flowing)


def layer_forward_bytes(spec: ModelSpec, tokens: int, itemsize: int) -> int:
    """Transient bytes of one layer's no-grad forward for `tokens` tokens, besides its input and
    output: the larger of the MLP (residual, normed input, silu(gate), up, their product) and the
    attention block (normed input, q, k, v, rope temporaries)."""
    H, I = spec.hidden_size, spec.intermediate_size
    qd, kd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return tokens * itemsize * max(2 * H + 3 * I, H + 4 * qd + 3 * kd)


def loss_chunk_bytes(spec: ModelSpec, chunk: int, itemsize: int, frozen_head: bool = False) -> tuple[int, str]:
    """Peak transient bytes of one `chunk`-token step of engine/loss.py:head_loss_and_grad, and
    which stage sets it. Stages (each chunk runs them in order, so they never coexist):
      logsumexp   the fp32 logits z and logsumexp's fp32 exp(z - max): LOGITS_TEMPS (chunk, V)
      cast        z and d(logits) in the compute dtype (compute dtype != fp32; else d(logits) is z)
      dW block    d(logits), d(normed hidden) and one (v_block, H) lm_head gradient block
    plus the chunk's final norm (saved for its backward) throughout. A frozen head (LoRA) computes no
    lm_head gradient: its dW stage is d(logits) and d(normed hidden) alone."""
    H, V, e = spec.hidden_size, spec.vocab_size, itemsize
    v_block = min(V, max(1024, _DW_BLOCK_BUDGET // (H * e)))
    norm = chunk * H * ((4 if e != 4 else 0) + 2 * e)
    stages = {"logsumexp": LOGITS_TEMPS * chunk * V * 4,
              "cast": chunk * V * (4 + (e if e != 4 else 0)),
              "dW block": chunk * V * e + chunk * H * e + (0 if frozen_head else v_block * H * e)}
    stage = max(stages, key=stages.get)
    return norm + stages[stage], stage


def sized_chunk_tokens(spec: ModelSpec, base: int, mb_tokens: int, itemsize: int, frozen_head: bool, resident: int,
                       peak: int, gpu_budget: int) -> tuple[int, str]:
    """The loss chunk on CUDA when engine.loss_chunk_tokens is 0: the largest power of two of tokens, at
    least `base` (the automatic size), at most the micro-batch's `mb_tokens` and MAX_CHUNK_TOKENS, whose
    loss phase (`resident`: the persistent buffers and the phase's other terms, plus loss_chunk_bytes)
    stays within the plan's `peak` at `base` plus half of what that leaves free under `gpu_budget`; else
    `base`. Returns (tokens, why). Pure: the caller passes the plan's figures (tests, synthetic budgets)."""
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    free = gpu_budget - peak
    if free <= 0:
        return base, f"the automatic size: the plan needs {gb(peak)} of the {gb(gpu_budget)} budget already"
    limit = peak + free // 2
    cap = min(mb_tokens, MAX_CHUNK_TOKENS)
    best, c = base, 1 << max(base - 1, 0).bit_length()  # the smallest power of two >= base
    while c <= cap and resident + loss_chunk_bytes(spec, c, itemsize, frozen_head)[0] <= limit:
        best, c = c, 2 * c
    half = f"half of the {gb(free)} the plan leaves free at {base} tokens under {gb(gpu_budget)}"
    if best > base:
        loss = resident + loss_chunk_bytes(spec, best, itemsize, frozen_head)[0]
        return best, (f"the largest power of two up to {cap} (the micro-batch's {mb_tokens} tokens, at most "
                      f"{MAX_CHUNK_TOKENS}) whose loss phase ({gb(loss)}) keeps {half}")
    if c > cap:
        return base, f"the automatic size: no power of two above it fits the micro-batch's {mb_tokens} tokens"
    loss = resident + loss_chunk_bytes(spec, c, itemsize, frozen_head)[0]
    return base, f"the automatic size: {c} tokens would take the loss phase to {gb(loss)}, past {half}"


def _data_bytes(cfg: Config, spec: ModelSpec) -> tuple[int, str]:
    from megastream.data.loader import data_memory  # the data package knows its own arrays

    return data_memory(cfg, spec.vocab_size)


def budget(cfg: Config, spec: ModelSpec, device_type: str, compute: torch.dtype, grad: torch.dtype,
           runtime_bytes: int, gpu_budget: int | None = None, distributed: bool = False) -> Budget:
    """The memory a run of `cfg` will take. `runtime_bytes`: the host RSS of Python, torch and
    megastream before any model memory exists (the caller measures its own). With `cfg.lora` the base
    is frozen and `compute` becomes the base's compute dtype (lora_base_format). `gpu_budget` (bytes):
    the GPU memory the run may use, which the automatic loss chunk grows into on CUDA (None: it does
    not grow). `distributed`: a rank of a torchrun job (the embedding is then on the device)."""
    from megastream.resolve import embedding_path

    t, e, lo = cfg.train, cfg.engine, cfg.lora
    scheme = None
    if lo is not None:
        compute, scheme = lora_base_format(cfg, compute)
    units = model_layout(spec)
    n = sum(u.numel for u in units)
    S = cfg.data.seq_len
    T = t.micro_batch_size * t.grad_accum * S  # tokens per step (rows are always seq_len long)
    mb_tokens = t.micro_batch_size * S
    ec = compute.itemsize
    H, V, L = spec.hidden_size, spec.vocab_size, spec.num_layers
    b = Budget(params=n, device_type=device_type, compute_dtype=compute, grad_dtype=grad, tokens_per_step=T)
    b.embedding, b.notes["embedding"] = embedding_path(cfg, spec, device_type, distributed)

    # ---- device buffers (engine/weights.py, engine/grads.py, engine/engine.py, engine/loss.py) ----
    # Persistent: allocated once (weight slots, accumulators) or alive for the whole step (masks).
    max_layer = max(u.numel for u in units[1:-1])
    head = V * H + H
    keep: dict[str, int] = {}
    if lo is None:
        keep["layer weight buffers"] = 2 * max_layer * ec  # double buffer
        keep["head weight buffer"] = head * ec
        keep["gradient accumulators"] = 2 * max_layer * 4 + head * 4 + len(units) * 4  # fp32, layers alternate
    else:  # frozen base: no gradient buffers; the adapters and their AdamW live on the device
        targets, shapes = lora_adapter_shapes(cfg, spec)
        n_ad = sum(a[0] * a[1] + b_[0] * b_[1] for a, b_ in shapes.values())
        layer_ad = n_ad // L  # every layer has the same targets and shapes
        unit_bytes = [frozen_unit_bytes(u, compute, scheme) for u in units]
        keep["layer weight buffers"] = 2 * max(unit_bytes[1:-1])  # double buffer, in the streamed format
        if scheme is not None:
            keep["dequantized layer"] = max_layer * ec
            b.notes["dequantized layer"] = f"the {scheme} layer's projections in {str(compute)[6:]}, for its matmuls"
        keep["head weight buffer"] = head * ec  # resident across steps
        n_x = len(lo.train_extra) * V * H  # modules trained in full, beside the adapters, same 16 B each
        keep["adapters, gradients, AdamW moments"] = ADAPTER_BYTES * (n_ad + n_x)
        b.notes["adapters, gradients, AdamW moments"] = (
            f"{n_ad:,} adapter parameters" + (f" + {n_x:,} of {', '.join(lo.train_extra)} (lora.train_extra)"
                                              if n_x else "") + f" x {ADAPTER_BYTES} B (fp32)")
        # dropout: a mask and the dropped input per target, each as wide as the target's input
        drop_in = sum(a[1] for a, _ in list(shapes.values())[:len(targets)]) if lo.dropout > 0 else 0
        widest = max((2 * a[1] if lo.dropout > 0 else 0) + 2 * b_[0] for a, b_ in list(shapes.values())[:len(targets)])
        b.lora = {"rank": lo.rank, "targets": list(targets), "adapter_params": n_ad,
                  "adapter_bytes": ADAPTER_BYTES * (n_ad + n_x),
                  "train_extra": list(lo.train_extra), "extra_params": n_x,
                  "base_dtype": scheme or {torch.bfloat16: "bf16", torch.float32: "float32"}.get(compute, str(compute)[6:]),
                  "base_bytes": sum(unit_bytes),
                  # each layer twice (forward, backward's recompute), but the base never changes, so the
                  # double buffer's two layers are not copied again at either turn: the forward starts on
                  # layers 0 and 1, still resident from the previous backward, and the backward on the last
                  # two (a step after the first, but for one right after an evaluation, which ends on the
                  # last layers: forward copies layers 2..L-1, backward L-3..0). The head
                  # stays resident, and so does a tied table; an untied one on the device takes the head's
                  # buffer, so both cross each step.
                  "h2d_bytes_per_step": sum(unit_bytes[3:-1]) + sum(unit_bytes[1:-3]) + (
                      (unit_bytes[0] + unit_bytes[-1]) if b.embedding == "device" and not spec.tie_word_embeddings
                      and "embed_tokens" not in lo.train_extra else 0),
                  "d2h_bytes_per_step": 0}
    dense_mask = cfg.engine.attention != "varlen"  # varlen: int32 segment offsets (<= B * S + 1), no mask
    if cfg.data.pack:  # packed rows: a (B, 1, S, S) bool mask and (B, S, hd) rope tables per micro-batch
        mask_row = S * S if dense_mask else 4 * S
        keep["attention masks"] = t.grad_accum * t.micro_batch_size * (mask_row + 4 * S * spec.head_dim * ec)
    if device_type == "cuda":
        keep["CUDA context and workspace"] = CUDA_CONTEXT_DEVICE
        b.notes["CUDA context and workspace"] = "estimate"

    # Each phase at its own peak (engine/engine.py:Engine.step), on top of the persistent buffers.
    offload = e.activations == "host" and device_type == "cuda"
    ckpt = L * T * H * ec  # every layer's input, all micro-batches (activations: device)
    th = T * H * ec  # one layer's hidden states, all micro-batches
    labels = T * 8  # int64, on the device from the loss to the end of the step
    chunk = min(e.loss_chunk_tokens or auto_chunk_tokens(V), mb_tokens)
    frozen_head = lo is not None and "lm_head" not in lo.train_extra
    logits, stage = loss_chunk_bytes(spec, chunk, ec, frozen_head=frozen_head)
    # Not counted: a gradient's grad-dtype cast (engine/grads.py) or an offloaded checkpoint whose copy
    # is still in flight. Freed tensors with pending stream uses leave the allocated bytes at once,
    # and the allocator waits for their copies before it would report out of memory.
    phases = {
        # Layer L-1: every layer's input kept so far (offloaded: only the one being copied out).
        PHASE_FORWARD: {"boundary checkpoints": th if offload else ckpt,
                        "hidden states and their gradients": th,  # the layer's outputs, being made
                        "one layer's no-grad activations": layer_forward_bytes(spec, mb_tokens, ec)},
        PHASE_LOSS: {"boundary checkpoints": 0 if offload else ckpt,
                     "hidden states and their gradients": 2 * th,  # final hidden states, d(hidden)
                     "labels": labels,
                     "logits chunk": logits},
        # Layer L-1 (offloaded: its inputs and layer L-2's, coming back); d(hidden) in, d(hidden) out
        # for the micro-batches done, and the last micro-batch's final hidden states, which
        # engine.step's loop variable still holds.
        PHASE_BACKWARD: {"boundary checkpoints": 2 * th if offload else ckpt,
                         "hidden states and their gradients": 2 * th,
                         "labels": labels,
                         "recomputed layer's activations": layer_activation_bytes(spec, mb_tokens, ec),
                         "weight gradients": max_layer * ec},
    }
    if cfg.data.pack and dense_mask:  # SDPA turns the boolean mask into a float bias, saved for its backward
        phases[PHASE_BACKWARD]["attention bias"] = t.micro_batch_size * S * S * ec
    if lo is not None:
        # A frozen layer's backward computes input and adapter gradients only: no weight gradients. The
        # layer's adapters, cast to the compute dtype, and their gradients take their place; with dropout
        # each target saves its mask and dropped input (as wide as its input) for backward, and in
        # forward the widest target's mask, dropped input and low-rank output (scaled) are transient.
        del phases[PHASE_BACKWARD]["weight gradients"]
        phases[PHASE_BACKWARD]["one layer's adapters and their gradients"] = 2 * layer_ad * ec
        if drop_in:
            phases[PHASE_BACKWARD]["adapter dropout masks and inputs"] = 2 * mb_tokens * drop_in * ec
        phases[PHASE_FORWARD]["adapter transients"] = mb_tokens * widest * ec + layer_ad * ec
        if "lm_head" in lo.train_extra and ec != 4:  # the trained fp32 head, cast for the step's loss chunks
            phases[PHASE_LOSS]["trained lm_head in the compute dtype"] = V * H * ec
    b.device_persistent, b.phases = keep, phases
    why = ("engine.loss_chunk_tokens" if e.loss_chunk_tokens else
           "the micro-batch's tokens" if chunk == mb_tokens else "the automatic size (fp32 logits near 256 MiB)")
    if device_type == "cuda" and not e.loss_chunk_tokens and gpu_budget:
        loss_phase = phases[PHASE_LOSS]
        resident = sum(keep.values()) + sum(v for k, v in loss_phase.items() if k != "logits chunk")
        chunk, why = sized_chunk_tokens(spec, chunk, mb_tokens, ec, frozen_head, resident, max(b.phase_totals.values()),
                                        gpu_budget)
        loss_phase["logits chunk"], stage = loss_chunk_bytes(spec, chunk, ec, frozen_head=frozen_head)
    b.chunk_tokens = chunk
    b.notes["logits chunk"] = (f"{chunk} tokens x {V} vocab; peak at the {stage} stage ("
                               f"{LOGITS_TEMPS} fp32 (chunk, V) tensors at logsumexp)")
    b.notes["loss chunk"] = why
    if device_type == "cuda":
        b.gpu = keep | phases[b.peak_phase]
        b.gpu_calibration = GPU_CALIBRATION
        b.notes["GPU peak"] = (f"the {b.peak_phase} phase: persistent buffers plus that phase's terms "
                               "(the largest phase total)")
    # On the CPU glibc malloc keeps much of what a phase frees (RSS does not fall back between phases),
    # so there the phases' own transients add up. Measured (2-core EPYC, torch 2.13, 2026-11-29; the
    # demo, seq 512, 64 x 128 and 8 x 8 x 128 micro-batches, 6 steps): the host total is within 2% of
    # the peak RSS with this sum (demo +0.4%); with the largest phase alone it would be 6-24% under.
    shared = ("boundary checkpoints", "hidden states and their gradients", "labels")
    cpu_compute = (sum(keep.values()) + max(sum(v for k, v in p.items() if k in shared) for p in phases.values())
                   + sum(v for p in phases.values() for k, v in p.items() if k not in shared))

    # ---- host ----------------------------------------------------------------------------------
    if lo is None:
        host = store_bytes(spec, compute, grad, cfg.optim.master == "fp32", cfg.optim.states,
                           rotating_grads=cfg.optim.clip == "previous")
    else:
        host = frozen_store_bytes(spec, compute, scheme)
        b.notes["working"] = f"the frozen base in {b.lora['base_dtype']} (no master, moments or staging)"
    if offload:
        host["offloaded checkpoints"] = ckpt  # pinned
    if device_type == "cpu":
        host["compute buffers (the device is the CPU)"] = cpu_compute
    host["data"], b.notes["data"] = _data_bytes(cfg, spec)
    # Saving streams from the arenas, one cast chunk at a time; resuming reads one tensor at a time
    # (the largest: the embedding's weights or a moment).
    io = WRITE_CHUNK * 4
    if lo is not None:
        # host copies of the adapters (4 B a parameter) for the PEFT adapter; a training checkpoint adds
        # the exact state (parameters and both moments, 12 B); lora.merge adds B @ A and the weight in
        # fp32 beside the sum, for the largest projection (over a quantized base, read from the source files).
        io = max(io, 4 * (n_ad + n_x) + (12 * (n_ad + n_x) if cfg.output.save_every else 0))
        if lo.merge:
            io = max(io, 3 * 4 * max(en.numel for en in units[1].entries))
            if scheme is not None:  # merged from model.path's files: each tensor read whole in the source dtype
                src = {"float32": 4, "float64": 8}.get(spec.torch_dtype, 2)
                io = max(io, src * max(en.numel for unit in units for en in unit.checkpoint_entries))
    elif cfg.output.save_every:
        io = max(io, units[0].numel * (4 if cfg.optim.master == "fp32" else ec))
    if device_type == "cpu":  # between steps, when the step's temporaries are gone
        persistent = sum(v for k, v in keep.items() if k != "attention masks")
        io = max(0, io - (cpu_compute - persistent))
    host["checkpoint I/O buffer"] = io
    b.notes["checkpoint I/O buffer"] = ("host copies of the adapters (and their state) while saving" if lo is not None
                                        else "one cast chunk while saving; the largest tensor while resuming")
    host["runtime (Python, torch, megastream)"] = runtime_bytes
    b.notes["runtime (Python, torch, megastream)"] = "measured: this process's RSS before any model memory"
    host["kernels and thread pools"] = ENGINE_RUNTIME
    b.notes["kernels and thread pools"] = "measured once on the CPU (see memory.py)"
    if device_type == "cuda":
        host["CUDA runtime"] = CUDA_CONTEXT_HOST
        b.notes["CUDA runtime"] = "estimate"
        b.pinned = host["working"] + host["gradient staging"] + host.get("offloaded checkpoints", 0)
    if lo is not None:
        b.grad_dtype = compute  # no gradient crosses to the host
    b.host = host
    return b
