"""The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3) as pure functions of their weights.

A transformer layer is `block(x, w, rope, spec) -> x`, where `w` maps short names to views of
that layer's flat buffer (megastream.model.layout). Nothing here holds state, allocates
parameters or knows about streaming; the engine binds weights and schedules from outside.
Numerics follow `transformers` op for op (RMSNorm in fp32, RoPE tables in fp32, SDPA attention)
so that float32 runs agree with it to rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from megastream.model.spec import ModelSpec

# enable_gqa lets SDPA broadcast k/v heads without materialising repeated copies (torch >= 2.5).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama computes it: statistics in fp32, scale applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, with Llama-3 scaling when configured."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = spec.rope_scaling
    if rs is None:
        return inv_freq
    factor = rs["factor"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long waves: divide
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # medium waves: interpolate
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(spec: ModelSpec, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim), computed in fp32, returned in `dtype`."""
    inv_freq = rope_inv_freq(spec).to(positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (..., S, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., S, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, S, hd); cos/sin: (S, hd), or (B, 1, S, hd) for per-sequence positions (packing)
    return x * cos + _rotate_half(x) * sin


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document index per token -> (B, 1, S, S) boolean mask: causal, and only within the
    token's own document (packed sequences never attend across a boundary)."""
    S = doc_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).logical_and_(causal)[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention. q: (B, nh, S, hd); k, v: (B, nkv, S, hd); mask: optional
    (B, 1, S, S) boolean (True = may attend), replacing the plain causal mask."""
    if q.shape[1] != k.shape[1] and not _SDPA_GQA:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kw = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5, **kw)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5, **kw)


class Adapter(NamedTuple):
    """A low-rank adapter on one projection: y = x W^T + scale * (drop * x) A^T B^T (PEFT's LoRA)."""
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    drop: torch.Tensor | None = None  # dropout as a multiplier of x (0 or 1 / (1 - p)), None: no dropout


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], key: str,
           lora: dict[str, Adapter] | None = None) -> torch.Tensor:
    """Projection `key` of the layer (with its bias, if any), plus its adapter when it has one."""
    y = F.linear(x, w[key], w.get(key + "_b"))
    ad = lora.get(key) if lora else None
    if ad is None:
        return y
    xa = x if ad.drop is None else x * ad.drop
    return y + F.linear(F.linear(xa, ad.a), ad.b) * ad.scale  # (.., r) then (.., out): never a (out, in) delta


def block(x: torch.Tensor, w: dict[str, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
          spec: ModelSpec, mask: torch.Tensor | None = None,
          lora: dict[str, Adapter] | None = None) -> torch.Tensor:
    """One transformer layer: x (B, S, H) -> (B, S, H). `w` holds views of the layer's buffer;
    `mask` (packed documents) as in `attention`; `lora` maps projection keys (q, k, v, o, gate, up,
    down) to their adapters."""
    B, S, _ = x.shape
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos, sin = rope

    h = rms_norm(x, w["ln1"], spec.rms_norm_eps)
    q = linear(h, w, "q", lora).view(B, S, nh, hd)  # (B, S, nh, hd)
    k = linear(h, w, "k", lora).view(B, S, nkv, hd)  # (B, S, nkv, hd)
    if "q_norm" in w:  # Qwen3: per-head RMSNorm of q and k
        q, k = rms_norm(q, w["q_norm"], spec.rms_norm_eps), rms_norm(k, w["k_norm"], spec.rms_norm_eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, S, hd), (B, nkv, S, hd)
    v = linear(h, w, "v", lora).view(B, S, nkv, hd).transpose(1, 2)  # (B, nkv, S, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = attention(q, k, v, mask).transpose(1, 2).reshape(B, S, nh * hd)  # (B, S, nh*hd)
    x = x + linear(a, w, "o", lora)

    h = rms_norm(x, w["ln2"], spec.rms_norm_eps)
    return x + linear(F.silu(linear(h, w, "gate", lora)) * linear(h, w, "up", lora), w, "down", lora)


def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids (B, S) -> (B, S, H): a row gather (done where the table lives)."""
    return table[ids]


def logits(h: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Final norm + LM head over all positions (reference path; training uses engine.loss)."""
    return F.linear(rms_norm(h, norm_w, spec.rms_norm_eps), head_w)
