"""Document-masked attention without a dense mask (`engine.attention: flex`).

Packed rows keep documents apart with a (B, 1, S, S) boolean mask, which rules out SDPA's flash and
cuDNN kernels: the masked path computes the whole S x S square (25-45% of a step at 8k-token rows on
a GPU, by the issue's estimate). FlexAttention instead takes a block-sparse mask built from the
tokens' document ids: blocks outside every document, and above the diagonal, are skipped; the
softmax and scale are SDPA's (scale = head_dim^-0.5, grouped-query heads broadcast), so the result
equals the masked SDPA path to rounding.

On CUDA the kernel is torch.compile'd once per process (FlexAttention's eager path is a slow
reference); on the CPU torch 2.13 runs its forward only (no backward), so training with it needs a
GPU (train refuses it on the CPU) and the CPU tests check forward and loss against SDPA.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _kernel(cuda: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if cuda else flex_attention


def document_block_mask(doc_ids: torch.Tensor):
    """(B, S) document index per token (on the device) -> a BlockMask: causal, within a document."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = doc_ids.shape

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, B, None, S, S, device=doc_ids.device)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask,
                            compiled: bool | None = None) -> torch.Tensor:
    """q: (B, nh, S, hd); k, v: (B, nkv, S, hd) -> (B, nh, S, hd), as attention() with the dense mask.
    `compiled`: None = compiled on CUDA; False = torch's eager reference (a test's quick check)."""
    gqa = q.shape[1] != k.shape[1]
    fn = _kernel(q.is_cuda if compiled is None else compiled)
    return fn(q, k, v, block_mask=block_mask, scale=q.shape[-1] ** -0.5, enable_gqa=gqa)
