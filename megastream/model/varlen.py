"""Document-masked attention as variable-length flash attention (`engine.attention: varlen`).

A packed row is several documents end to end (data/dataset.py), then possibly a padding tail
(token 0, document index -1, no targets, positions counting on from 0). Causal attention confined
to each document is exactly causal attention over each document on its own, so the micro-batch's
tokens are flattened to (B * S, heads, head_dim) and cut into segments by int32 cumulative offsets
`cu_seq` (the rows' segments, rows concatenated): torch's `varlen_attn` runs the flash kernel over
each segment with no mask at all, and computes nothing across a boundary. The padding tail is one
more segment: it attends to itself causally, as it does under the dense mask (where its index -1
matches only itself), so every output, padding's included, equals the masked SDPA path to
rounding; padding's outputs carry no loss either way.

The segments are found on the host from the document indices (a run of equal indices is one
segment: the data path gives each piece of a row its own index), so the longest one, which the
kernel takes as a Python int, costs no device sync; only `cu_seq` is copied to the device, once
per micro-batch and step, and the backward's recompute reuses it.

`varlen_attn` is flash-only CUDA (bf16 / fp16), and its keywords changed across torch releases:
older ones take `is_causal: bool` and no `scale` (flash's default is head_dim^-0.5, SDPA's) or
`enable_gqa`; newer ones `window_size=(-1, 0)` for causal, `scale` and `enable_gqa`. `_keywords`
reads the signature once per function; without `enable_gqa` the k / v heads are repeated to the
query's (resolve.py refuses what cannot run: the CPU, fp32, head sizes flash lacks).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch

# What flash attention supports (aten's flash_api): head sizes that are multiples of 8 up to 256.
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
DTYPES = (torch.bfloat16, torch.float16)


class Documents(NamedTuple):
    """The segments of a micro-batch's flattened (B * S) tokens: what `varlen_attn` takes instead of a mask."""
    cu_seq: torch.Tensor  # (segments + 1,) int32 on the device: each segment's first token, then B * S
    max_len: int  # tokens in the longest segment (host int: the kernel's grid size)


def available() -> bool:
    """This torch has `torch.nn.attention.varlen` (recent releases only)."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


def _varlen_attn():
    """torch's function, looked up at each call (tests stand a CPU reference in for it)."""
    from torch.nn.attention import varlen

    return varlen.varlen_attn


class Keywords(NamedTuple):
    causal: dict  # {"window_size": (-1, 0)} or {"is_causal": True}
    scale: bool  # takes `scale` (else flash's default head_dim^-0.5 applies)
    gqa: bool  # takes `enable_gqa` (else k / v heads are repeated to the query's)


@functools.lru_cache(maxsize=None)
def _keywords(fn) -> Keywords:
    """The keywords this `varlen_attn` takes for causal, scaled, grouped-query attention."""
    params = inspect.signature(fn).parameters
    # window_size: the tuple (-1, 0) (torch compares it with a tuple: a list would mean non-causal)
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return Keywords(causal, "scale" in params, "enable_gqa" in params)


def segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, S) document index per token (host) -> (cu_seq (segments + 1,) int32, longest segment), where
    a segment is a run of equal indices within a row (a document, or the padding tail)."""
    B, S = doc_ids.shape
    starts = torch.ones(B, S, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # each row starts a segment; so does each change
    first = starts.reshape(-1).nonzero().squeeze(1)  # flat index of each segment's first token
    cu_seq = torch.cat([first, first.new_tensor([B * S])]).to(torch.int32)
    return cu_seq, int((cu_seq[1:] - cu_seq[:-1]).max())


def documents(doc_ids: torch.Tensor, device: torch.device) -> Documents:
    """The micro-batch's Documents: offsets found on the host, copied to `device` on its current stream
    (the engine's compute stream), from pinned memory on CUDA so the host does not wait for the copy."""
    cu_seq, max_len = segments(doc_ids.cpu())
    if device.type == "cuda":
        cu_seq = cu_seq.pin_memory()
    return Documents(cu_seq.to(device, non_blocking=True), max_len)


def varlen_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    """q: (B, nh, S, hd); k, v: (B, nkv, S, hd) -> (B, nh, S, hd), as attention() with the dense mask."""
    B, nh, S, hd = q.shape
    fn = _varlen_attn()
    kw = _keywords(fn)
    if k.shape[1] != nh and not kw.gqa:
        rep = nh // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    extra = dict(kw.causal)
    if kw.scale:
        extra["scale"] = hd ** -0.5
    if k.shape[1] != nh:
        extra["enable_gqa"] = True

    def flat(t):  # (B, h, S, hd) -> (B * S, h, hd), the kernel's layout
        return t.transpose(1, 2).reshape(B * S, t.shape[1], hd)

    out = fn(flat(q), flat(k), flat(v), docs.cu_seq, docs.cu_seq, docs.max_len, docs.max_len, **extra)
    return out.view(B, S, nh, hd).transpose(1, 2)
