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
    (B, 1, S, S) boolean (True = may attend), replacing the plain causal mask, or the same documents
    without a dense mask: a FlexAttention BlockMask (model/flex.py) or varlen's segment offsets
    (model/varlen.py's Documents)."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        from megastream.model.varlen import Documents, varlen_document_attention

        if isinstance(mask, Documents):
            return varlen_document_attention(q, k, v, mask)
        from megastream.model.flex import flex_document_attention

        return flex_document_attention(q, k, v, mask)
    if q.shape[1] != k.shape[1] and not _SDPA_GQA:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kw = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5, **kw)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5, **kw)


class Adapter(NamedTuple):
    """A low-rank adapter on one projection (PEFT's LoRA): y = x W^T + scale * drop(x) A^T B^T, where
    drop(x) = keep_scale * (x where `keep`, else 0), keep_scale = 1 / P(keep)."""
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    keep: torch.Tensor | None = None  # dropout: 1 kept / 0 dropped in x's dtype, the shape of x (None: none)
    keep_scale: float = 1.0


class _GradientOnly(torch.autograd.Function):
    """x W^T for a frozen W when only its gradient is wanted, not its value (the last projection of
    a layer recomputed for backward over a frozen base): forward skips the GEMM and returns zeros,
    backward gives d(x) = d(y) W."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x.new_zeros(x.shape[0], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        (w,) = ctx.saved_tensors
        return dy @ w, None


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], key: str,
           lora: dict[str, Adapter] | None = None, value: bool = True) -> torch.Tensor:
    """Projection `key` of the layer (with its bias, if any), plus its adapter when it has one.
    value=False (a frozen W): only the gradient graph is built, the base GEMM is skipped and the
    result's value is meaningless."""
    ad = lora.get(key) if lora else None
    if ad is None and value:
        return F.linear(x, w[key], w.get(key + "_b"))
    x2 = x.flatten(0, -2)  # (tokens, in)
    y = F.linear(x2, w[key], w.get(key + "_b")) if value else _GradientOnly.apply(x2, w[key])  # (tokens, out)
    if ad is None:
        return y.view(*x.shape[:-1], y.shape[-1])
    xa = x2 if ad.keep is None else x2 * ad.keep.flatten(0, -2)  # dropped inputs zeroed
    # y += scale (xa A^T) B^T: the (tokens, r) product, then one GEMM accumulating into y in place
    # (F.linear's backward does not need its output); never an (out, in) delta, nor a scaled copy of B:
    # both scales are the GEMM's alpha
    y.addmm_(F.linear(xa, ad.a), ad.b.t(), alpha=ad.scale * ad.keep_scale)
    return y.view(*x.shape[:-1], y.shape[-1])


def block(x: torch.Tensor, w: dict[str, torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
          spec: ModelSpec, mask: torch.Tensor | None = None,
          lora: dict[str, Adapter] | None = None, value: bool = True) -> torch.Tensor:
    """One transformer layer: x (B, S, H) -> (B, S, H). `w` holds views of the layer's buffer;
    `mask` (packed documents) as in `attention`; `lora` maps projection keys (q, k, v, o, gate, up,
    down) to their adapters. value=False, for a backward recompute over a frozen base: the output's
    gradient graph without its value (the down projection's base GEMM, 1/4 to 1/3 of the layer's
    matmul work in a recompute, is not needed for backward and is skipped)."""
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
    return x + linear(F.silu(linear(h, w, "gate", lora)) * linear(h, w, "up", lora), w, "down", lora, value)


def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids (B, S) -> (B, S, H): a row gather (done where the table lives)."""
    return table[ids]


def logits(h: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Final norm + LM head over all positions (reference path; training uses engine.loss)."""
    return F.linear(rms_norm(h, norm_w, spec.rms_norm_eps), head_w)
