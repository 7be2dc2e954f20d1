"""Packed sequences never attend across a document boundary: checked on the outputs (logits and
a whole training step), not only on the mask."""

import pytest
import torch

from helpers import assert_close_normwise, fp_tol, write_ids
from megastream.data import load_jsonl
from megastream.engine.engine import MicroBatch
from megastream.model.llama import block, document_mask, logits, rope_tables
from test_engine import _engine, _spec

DOCS = [[3, 9, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [2, 3]]


def _forward(spec, store, ids, positions=None, doc_ids=None):
    w = [u.views(store.weights_of(i)) for i, u in enumerate(store.units)]
    x = w[0]["embed"][ids]
    if positions is None:
        rope, mask = rope_tables(spec, torch.arange(ids.shape[1]), torch.float32), None
    else:
        cos, sin = rope_tables(spec, positions, torch.float32)
        rope, mask = (cos[:, None], sin[:, None]), document_mask(doc_ids)
    for i in range(spec.num_layers):
        x = block(x, w[i + 1], rope, spec, mask)
    head_w = w[0]["embed"] if spec.tie_word_embeddings else w[-1]["lm_head"]
    return logits(x, w[-1]["norm"], head_w, spec)


@pytest.mark.parametrize("tied", [False, True])
def test_packed_logits_equal_each_document_alone(tmp_path, tied):
    spec = _spec(tied)
    store, engine = _engine(spec)
    engine.close()
    ds = load_jsonl(write_ids(tmp_path / "d.jsonl", DOCS), 16, spec.vocab_size, None, pack=True)
    assert len(ds) == 1 and ds.doc_ids[0].max() == 3
    with torch.no_grad():
        packed = _forward(spec, store, ds.input_ids, ds.positions, ds.doc_ids)[0]
        start = 0
        for doc in DOCS:
            alone = _forward(spec, store, torch.tensor([doc]))[0]
            # fp32 logits, norm-wise: masked attention over 16 positions vs unmasked over the
            # document's own; each logit sums over the layers' widest inner dimension.
            assert_close_normwise(packed[start:start + len(doc)], alone, 16 * spec.intermediate_size,
                                  msg=f"document at {start}")
            start += len(doc)
        # and without the mask the later documents would see the earlier ones: the check has teeth
        leaky = _forward(spec, store, ds.input_ids)[0]
        assert not torch.allclose(leaky[5:8], _forward(spec, store, torch.tensor([DOCS[1]]))[0], atol=1e-3)


def test_packed_step_equals_padded_step(tmp_path):
    """One optimizer step on packed rows gives the loss and gradients of the same documents each
    in its own padded row (the loss is the token mean over the same targets)."""
    spec = _spec(False)
    path = write_ids(tmp_path / "d.jsonl", DOCS * 2)
    results = []
    for pack in (True, False):
        ds = load_jsonl(path, 16, spec.vocab_size, None, pack=pack)
        mb = MicroBatch(ds.input_ids, ds.labels, ds.positions, ds.doc_ids)
        store, engine = _engine(spec)
        stats = engine.step([mb], lr=1e-6)
        engine.close()
        results.append((stats, [store.grad_of(u).clone() for u in range(len(store.units))], len(ds)))
    (packed, g_packed, n_packed), (padded, g_padded, n_padded) = results
    assert n_packed == 2 and n_padded == 8
    assert packed.loss_tokens == padded.loss_tokens == sum(len(d) - 1 for d in DOCS) * 2
    # fp32; a gradient element sums over the step's tokens times the widest inner dimension.
    n = n_padded * 16 * spec.intermediate_size
    assert packed.loss == pytest.approx(padded.loss, rel=fp_tol(torch.float32, n))
    for u, (a, b) in enumerate(zip(g_packed, g_padded)):
        assert_close_normwise(a, b, n, msg=f"unit {u}")
