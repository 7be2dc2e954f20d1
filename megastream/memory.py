"""The memory model: every byte a run will hold, by component, on the host and on the device.

One function, `budget()`, used by `megastream plan` (before anything is allocated) and by
`megastream train` (to refuse a run that cannot fit, and in its start-up summary). The host-store
terms are exact (they are the sizes HostStore allocates; a test checks it); device terms follow
the engine's buffers (engine/weights.py, engine/grads.py, engine/loss.py) and the tensors autograd
keeps while one layer is recomputed; the rest are stated estimates.

On the CPU the "device" buffers live in host RAM, so they are added to the host total and the GPU
total is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megastream.checkpoint import WRITE_CHUNK
from megastream.config import Config
from megastream.data import data_files
from megastream.engine.loss import _DW_BLOCK_BUDGET, auto_chunk_tokens
from megastream.model.layout import model_layout
from megastream.model.spec import ModelSpec
from megastream.store import BLOCK, STATE_DTYPES

CUDA_CONTEXT_HOST = int(1.0e9)  # host RSS of the CUDA runtime and its libraries (estimate)
# Host RSS a training process gains in its first step beyond its tensors: kernel code paged in from
# libtorch, OpenMP/oneDNN thread pools and scratch, the optimizer thread's malloc arena. Measured on
# the CPU (2-core Xeon, torch 2.13, 2026-11-22: demo config, peak RSS minus every planned term).
ENGINE_RUNTIME = int(0.09e9)
CUDA_CONTEXT_DEVICE = int(0.6e9)  # device memory outside the caching allocator: context, cuBLAS workspace
# Data held: 32 B/token (int64 ids, labels, positions, documents); ~4 (json) or ~1.3 (parquet) B/token on disk.
DATA_BYTES_PER_FILE_BYTE = {".jsonl": 8.0, ".parquet": 24.0}
LOGITS_TEMPS = 3  # fp32 (chunk, V) tensors alive at once in the chunked loss: logits, softmax/grad, temp


@dataclass
class Budget:
    """Bytes by component. `host` is what the process will hold in RAM at its peak; `gpu` what the
    device will hold (empty on the CPU, where those buffers are part of `host`)."""
    params: int
    device_type: str  # "cuda" | "cpu"
    compute_dtype: torch.dtype
    grad_dtype: torch.dtype
    tokens_per_step: int
    host: dict[str, int] = field(default_factory=dict)
    gpu: dict[str, int] = field(default_factory=dict)
    pinned: int = 0  # host bytes page-locked (cuda only)
    notes: dict[str, str] = field(default_factory=dict)  # component -> how it was estimated

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def state_bytes_per_param(self) -> float:
        return (self.host["working"] + self.host.get("master", 0) + self.host["optimizer states"]) / self.params


def store_bytes(spec: ModelSpec, compute: torch.dtype, grad: torch.dtype, master: bool, states: str) -> dict[str, int]:
    """The host store's arenas (store.HostStore allocates exactly these)."""
    units = model_layout(spec)
    sizes = [u.numel for u in units]
    n, n_embed = sum(sizes), sizes[0]
    ns = sum(-(-s // BLOCK) * BLOCK for s in sizes)  # state slices start on 256-element boundaries
    m_dtype, v_dtype = STATE_DTYPES[states]
    out = {"working": n * compute.itemsize}
    if master and compute != torch.float32:
        out["master"] = n * 4
    out["optimizer states"] = ns * (m_dtype.itemsize + v_dtype.itemsize) + (ns // BLOCK * 8 if states == "int8" else 0)
    out["gradient staging"] = (n - n_embed) * grad.itemsize + n_embed * 4
    return out


def layer_activation_bytes(spec: ModelSpec, tokens: int, itemsize: int) -> int:
    """Bytes autograd holds while one layer is recomputed and backpropagated for `tokens` tokens:
    the tensors model/llama.py:block saves for backward, plus the gradients flowing through it.
    SDPA runs flash / memory-efficient kernels, so no (S, S) score matrix is kept."""
    H, I = spec.hidden_size, spec.intermediate_size
    qd, kd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    e = itemsize
    # two RMSNorms (fp32 statistics), rope'd q and k, v, the SDPA output, the MLP's four I-wide tensors
    saved = H * (8 + 6 * e) + qd * 3 * e + kd * 2 * e + I * 4 * e
    flowing = 2 * e * (H + I) + 4 * spec.num_heads  # d(activation) temporaries, logsumexp
    return tokens * (saved + flowing)


def _data_bytes(cfg: Config) -> tuple[int, str]:
    total, on_disk = 0, 0
    for path in (cfg.data.path, cfg.data.val_path):
        if not path:
            continue
        try:
            files = data_files(path)
        except Exception:  # missing files are reported by the config check / loader
            continue
        for f in files:
            size = Path(f).stat().st_size
            on_disk += size
            total += int(size * DATA_BYTES_PER_FILE_BYTE.get(Path(f).suffix, 8.0))
    return total, f"estimated from {on_disk / 1e6:.1f} MB of data files (int64 ids, labels, positions, documents)"


def budget(cfg: Config, spec: ModelSpec, device_type: str, compute: torch.dtype, grad: torch.dtype,
           runtime_bytes: int) -> Budget:
    """The memory a run of `cfg` will take. `runtime_bytes`: the host RSS of Python, torch and
    megastream before any model memory exists (the caller measures its own)."""
    t, e = cfg.train, cfg.engine
    units = model_layout(spec)
    n = sum(u.numel for u in units)
    S = cfg.data.seq_len
    T = t.micro_batch_size * t.grad_accum * S  # tokens per step (rows are always seq_len long)
    mb_tokens = t.micro_batch_size * S
    ec = compute.itemsize
    H, V, L = spec.hidden_size, spec.vocab_size, spec.num_layers
    b = Budget(params=n, device_type=device_type, compute_dtype=compute, grad_dtype=grad, tokens_per_step=T)

    # ---- device buffers (engine/weights.py, engine/grads.py, engine/engine.py, engine/loss.py) ----
    max_layer = max(u.numel for u in units[1:-1])
    head = V * H + H
    dev: dict[str, int] = {}
    dev["layer weight buffers"] = 2 * max_layer * ec  # double buffer
    dev["head weight buffer"] = head * ec
    dev["gradient accumulators"] = 2 * max_layer * 4 + head * 4 + len(units) * 4  # fp32, layers alternate
    ckpt = L * T * H * ec
    offload = e.activations == "host" and device_type == "cuda"
    dev["boundary checkpoints"] = 2 * T * H * ec if offload else ckpt  # offloaded: only the layers in flight
    dev["hidden states and their gradients"] = 2 * T * H * ec
    dev["one layer's activations"] = layer_activation_bytes(spec, mb_tokens, ec) + max_layer * ec  # + weight grads
    chunk = e.loss_chunk_tokens or auto_chunk_tokens(V)
    v_block = min(V, max(1024, _DW_BLOCK_BUDGET // (H * ec)))
    dev["loss chunk"] = min(chunk, mb_tokens) * V * 4 * LOGITS_TEMPS + v_block * H * ec
    if cfg.data.pack:  # packed rows: a (B, 1, S, S) bool mask and (B, S, hd) rope tables per micro-batch
        dev["attention masks"] = t.grad_accum * t.micro_batch_size * (S * S + 4 * S * spec.head_dim * ec)
    if device_type == "cuda":
        dev["CUDA context and workspace"] = CUDA_CONTEXT_DEVICE
        b.notes["CUDA context and workspace"] = "estimate"
        b.gpu = dev

    # ---- host ----------------------------------------------------------------------------------
    host = store_bytes(spec, compute, grad, cfg.optim.master == "fp32", cfg.optim.states)
    if offload:
        host["offloaded checkpoints"] = ckpt  # pinned
    if device_type == "cpu":
        host["compute buffers (the device is the CPU)"] = sum(dev.values())
    host["data"], b.notes["data"] = _data_bytes(cfg)
    # Saving streams from the arenas, one cast chunk at a time; resuming reads one tensor at a time
    # (the largest: the embedding's weights or a moment).
    io = WRITE_CHUNK * 4
    if cfg.output.save_every:
        io = max(io, units[0].numel * (4 if cfg.optim.master == "fp32" else ec))
    if device_type == "cpu":  # between steps, when the step's temporaries are gone
        persistent = dev["layer weight buffers"] + dev["head weight buffer"] + dev["gradient accumulators"]
        io = max(0, io - (sum(dev.values()) - persistent))
    host["checkpoint I/O buffer"] = io
    b.notes["checkpoint I/O buffer"] = "one cast chunk while saving; the largest tensor while resuming"
    host["runtime (Python, torch, megastream)"] = runtime_bytes
    b.notes["runtime (Python, torch, megastream)"] = "measured: this process's RSS before any model memory"
    host["kernels and thread pools"] = ENGINE_RUNTIME
    b.notes["kernels and thread pools"] = "measured once on the CPU (see memory.py)"
    if device_type == "cuda":
        host["CUDA runtime"] = CUDA_CONTEXT_HOST
        b.notes["CUDA runtime"] = "estimate"
        b.pinned = host["working"] + host["gradient staging"] + host.get("offloaded checkpoints", 0)
    b.host = host
    return b
