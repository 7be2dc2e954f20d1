"""Final norm + LM head + cross-entropy in token chunks, with gradients in the same pass.

The full (tokens, vocab) logits never exist: each chunk's fp32 logits are turned into
d(loss)/d(logits) in place, which then gives d(hidden) and the lm_head gradient (accumulated
into the fp32 device buffer in vocab blocks, so no (V, H) temporary is ever allocated).
The loss is a sum; the caller passes `inv_n` = 1 / (loss tokens in the whole optimizer step),
so gradients are those of the token-mean over the step, exactly as if the batch ran at once.

The generic path (megastream.hf) passes the model's own final norm as `norm(h, w)` and its
`softcap` (Gemma 2: logits = softcap * tanh(logits / softcap)); the defaults are Llama's RMSNorm
and no capping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megastream.model.llama import rms_norm

IGNORE = -100
_LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits per chunk when chunk size is automatic
_DW_BLOCK_BUDGET = 128 * 2**20  # bytes of the per-block lm_head gradient temporary


def auto_chunk_tokens(vocab: int) -> int:
    return max(16, _LOGITS_BUDGET // (4 * vocab))


def head_loss_and_grad(h: torch.Tensor, labels: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor,
                       eps: float, inv_n: float, acc_head_w: torch.Tensor | None, acc_norm_w: torch.Tensor | None,
                       chunk_tokens: int, norm=None, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, S, H) final hidden states, labels (B, S) with IGNORE for no loss.
    Returns (summed loss as an fp32 0-d tensor, d(loss * inv_n)/dh of shape (B, S, H)).
    Adds d/d(head_w) into acc_head_w (V, H) and d/d(norm_w) into acc_norm_w (H,), both fp32;
    None for a frozen head (LoRA): those gradients are then not computed at all."""
    H = h.shape[-1]
    V = head_w.shape[0]
    hf, lf = h.reshape(-1, H), labels.reshape(-1)
    dh = torch.empty_like(hf)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    v_block = min(V, max(1024, _DW_BLOCK_BUDGET // (H * h.element_size())))
    for s in range(0, hf.shape[0], chunk_tokens):
        hc = hf[s:s + chunk_tokens].detach().requires_grad_()
        nw = norm_w.detach().requires_grad_(acc_norm_w is not None)
        with torch.enable_grad():
            hn = rms_norm(hc, nw, eps) if norm is None else norm(hc, nw)  # (c, H)
        hn_d = hn.detach()
        z = F.linear(hn_d, head_w).float()  # (c, V) fp32 logits, the chunk's only large buffer
        if softcap is not None:
            t = z.div_(softcap).tanh_()  # in place; kept for the backward of the capping
            z = t * softcap  # (c, V): a second buffer while capping
        lab = lf[s:s + chunk_tokens]
        valid = lab != IGNORE
        tgt = lab.clamp_min(0)[:, None]
        lse = torch.logsumexp(z, dim=-1)  # (c,)
        loss += ((lse - z.gather(1, tgt)[:, 0]) * valid).sum()
        # d loss / d z = softmax(z) - onehot(target), zero for ignored rows, scaled by 1/n; in place.
        z.sub_(lse[:, None]).exp_()
        z.scatter_add_(1, tgt, -valid[:, None].to(z.dtype))
        z.mul_((valid.to(z.dtype) * inv_n)[:, None])
        if softcap is not None:
            z.mul_(t.mul_(t).neg_().add_(1))  # d(softcap * tanh(z / softcap)) / dz = 1 - tanh^2
            del t
        dz = z.to(hn_d.dtype)
        del z
        dhn = dz @ head_w  # (c, H)
        if acc_head_w is not None:
            for v0 in range(0, V, v_block):  # lm_head gradient, one vocab block at a time
                acc_head_w[v0:v0 + v_block].add_(dz[:, v0:v0 + v_block].t() @ hn_d)
        if acc_norm_w is None:
            dh[s:s + chunk_tokens] = torch.autograd.grad(hn, hc, dhn)[0]
            continue
        dhc, dnw = torch.autograd.grad(hn, [hc, nw], dhn)
        dh[s:s + chunk_tokens] = dhc
        acc_norm_w.add_(dnw)
    return loss, dh.view(h.shape)


def head_loss(h: torch.Tensor, labels: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, eps: float,
              chunk_tokens: int, norm=None, softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy only (evaluation): the same chunked logits, no gradients."""
    H = h.shape[-1]
    hf, lf = h.reshape(-1, H), labels.reshape(-1)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, hf.shape[0], chunk_tokens):
        hc = hf[s:s + chunk_tokens]
        z = F.linear(rms_norm(hc, norm_w, eps) if norm is None else norm(hc, norm_w), head_w).float()  # (c, V)
        if softcap is not None:
            z = z.div_(softcap).tanh_().mul_(softcap)
        lab = lf[s:s + chunk_tokens]
        valid = lab != IGNORE
        loss += ((torch.logsumexp(z, dim=-1) - z.gather(1, lab.clamp_min(0)[:, None])[:, 0]) * valid).sum()
    return loss
