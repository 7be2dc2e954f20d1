"""Chunked final norm + LM head + cross-entropy vs the full-logits computation under autograd."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_normwise

from megastream.engine.loss import IGNORE, auto_chunk_tokens, head_loss_and_grad
from megastream.model.llama import rms_norm


def _case(B=3, S=11, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, H, generator=g)
    norm_w = 1 + 0.1 * torch.randn(H, generator=g)
    head_w = 0.3 * torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, -3:] = IGNORE
    labels[2, 0] = IGNORE
    return h, norm_w, head_w, labels


def _reference(h, norm_w, head_w, labels, n):
    h, nw, w = (t.clone().requires_grad_() for t in (h, norm_w, head_w))
    logits = F.linear(rms_norm(h, nw, 1e-5), w).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    (loss / n).backward()
    return loss.detach(), h.grad, nw.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 16, 10_000])
def test_chunked_matches_full_logits(chunk):
    h, norm_w, head_w, labels = _case()
    n = int((labels != IGNORE).sum()) + 7  # any normaliser: the caller passes the step's token count
    ref_loss, ref_dh, ref_dnorm, ref_dw = _reference(h, norm_w, head_w, labels, n)
    acc_w = torch.zeros_like(head_w)
    acc_norm = torch.zeros_like(norm_w)
    loss, dh = head_loss_and_grad(h, labels, norm_w, head_w, 1e-5, 1.0 / n, acc_w, acc_norm, chunk)
    # fp32, norm-wise: the loss sums B*S*V terms (logsumexp over V per token); d(hidden) sums over V;
    # the weight gradients sum over all B*S tokens (times H for the norm's).
    B, S, H = h.shape
    V = head_w.shape[0]
    assert_close_normwise(loss, ref_loss, B * S * V, msg="loss")
    assert_close_normwise(dh, ref_dh, V * H, msg="d hidden")
    assert_close_normwise(acc_norm, ref_dnorm, B * S * V, msg="d norm")
    assert_close_normwise(acc_w, ref_dw, B * S * H, msg="d head")


def test_gradients_accumulate_across_calls():
    """Two micro-batches through the head add up to the gradient of both at once."""
    h, norm_w, head_w, labels = _case(B=4)
    n = int((labels != IGNORE).sum())
    _, _, ref_dnorm, ref_dw = _reference(h, norm_w, head_w, labels, n)
    acc_w, acc_norm = torch.zeros_like(head_w), torch.zeros_like(norm_w)
    for part in (slice(0, 1), slice(1, 4)):
        head_loss_and_grad(h[part], labels[part], norm_w, head_w, 1e-5, 1.0 / n, acc_w, acc_norm, 4)
    B, S, H = h.shape  # fp32, norm-wise; terms as in test_chunked_matches_full_logits
    assert_close_normwise(acc_w, ref_dw, B * S * H, msg="d head")
    assert_close_normwise(acc_norm, ref_dnorm, B * S * head_w.shape[0], msg="d norm")


def test_all_ignored_gives_zero_loss_and_grads():
    h, norm_w, head_w, labels = _case()
    labels.fill_(IGNORE)
    acc_w, acc_norm = torch.zeros_like(head_w), torch.zeros_like(norm_w)
    loss, dh = head_loss_and_grad(h, labels, norm_w, head_w, 1e-5, 1.0, acc_w, acc_norm, 8)
    assert float(loss) == 0.0
    assert dh.abs().max() == 0 and acc_w.abs().max() == 0 and acc_norm.abs().max() == 0


def test_auto_chunk_bounds_logits_memory():
    for vocab in (2048, 128256, 152064):
        c = auto_chunk_tokens(vocab)
        assert c * vocab * 4 <= 256 * 2**20 and c >= 16
