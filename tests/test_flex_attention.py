"""engine.attention: flex: packed documents kept apart by a FlexAttention block mask instead of a
dense (B, 1, S, S) one. On the CPU torch runs its forward only, so the forward pass and the loss are
checked here against the masked SDPA path; gradients on a GPU (`gpu` marker)."""

import dataclasses

import pytest
import torch

from helpers import fp_tol, rel_err
from megastream.config import Config
from megastream.engine.engine import Engine, MicroBatch
from megastream.model.flex import document_block_mask, flex_document_attention
from megastream.model.layout import model_layout
from megastream.model.llama import attention, document_mask
from megastream.presets import PRESETS
from megastream.store import HostStore


def _packed(B=2, S=48, vocab=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    doc = torch.tensor([[0] * 20 + [1] * 17 + [2] * 11, [0] * 5 + [1] * 43])[:B]
    starts = torch.cat([torch.zeros(B, 1, dtype=torch.bool), doc[:, 1:] != doc[:, :-1]], 1)
    pos = torch.zeros_like(ids)
    for b in range(B):
        p = 0
        for s in range(S):
            p = 0 if starts[b, s] else p + 1
            pos[b, s] = p
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
    labels[:, :-1][doc[:, 1:] != doc[:, :-1]] = -100  # no target across a document boundary
    return MicroBatch(ids, labels, positions=pos, doc_ids=doc)


def test_flex_attention_equals_masked_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 48, 16, generator=g) for h in (4, 2, 2))
    doc = _packed().doc_ids
    got = flex_document_attention(q, k, v, document_block_mask(doc))
    want = attention(q, k, v, document_mask(doc))
    assert rel_err(got, want) <= fp_tol(torch.float32, 48), rel_err(got, want)  # softmax over <= 48 keys


def test_flex_loss_equals_sdpa_loss_on_packed_rows():
    spec = PRESETS["tiny"]
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)
    store.init_random(spec.initializer_range, seed=0)
    mbs = [_packed(seed=s) for s in range(2)]
    losses = []
    for attn in ("sdpa", "flex"):
        cfg = Config()
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, attention=attn, device="cpu"))
        engine = Engine(spec, store, cfg, torch.device("cpu"))
        losses.append(engine.eval_loss(mbs))
        engine.close()
    (a, na), (b, nb) = losses
    assert na == nb and abs(a - b) <= fp_tol(torch.float32, 4 * 128) * abs(b), (a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_gradients_equal_masked_sdpa_on_the_gpu():
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 256, 64, generator=g).to(dev).requires_grad_() for h in (8, 2, 2))
    doc = torch.cat([torch.zeros(2, 100, dtype=torch.long), torch.ones(2, 156, dtype=torch.long)], 1).to(dev)
    dy = torch.randn(2, 8, 256, 64, generator=g).to(dev)
    out = []
    # flex's eager path (the engine compiles it on CUDA: tens of seconds, measured in the acceptance run's rows)
    for y in (flex_document_attention(q, k, v, document_block_mask(doc), compiled=False),
              attention(q, k, v, document_mask(doc))):
        out.append([y.detach()] + list(torch.autograd.grad(y, (q, k, v), dy)))
    for got, want in zip(*out):
        assert rel_err(got, want) <= fp_tol(torch.float32, 256), rel_err(got, want)


def test_flex_is_refused_where_it_cannot_train():
    from megastream.config import load_config
    from megastream.errors import ConfigError
    from megastream.resolve import check_model_inputs, model_spec
    from megastream.tokenizer import DEMO_DIR

    cfg = load_config(DEMO_DIR / "demo.yaml", ["engine.attention=flex", "engine.device=cpu"])
    with pytest.raises(ConfigError, match="no backward there"):
        check_model_inputs(cfg, model_spec(cfg))
