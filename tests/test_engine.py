"""The layer-major streaming schedule against a plain whole-model forward/backward."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_normwise, fp_tol, random_micro_batches

from megastream.config import Config, EngineConfig, TrainConfig
from megastream.engine.engine import Engine, MicroBatch
from megastream.engine.loss import IGNORE
from megastream.model.layout import model_layout
from megastream.model.llama import block, rms_norm, rope_tables
from megastream.model.spec import ModelSpec
from megastream.store import HostStore


def _spec(tied: bool) -> ModelSpec:
    return ModelSpec(architecture="Qwen2ForCausalLM" if tied else "LlamaForCausalLM", vocab_size=40,
                     hidden_size=24, intermediate_size=40, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=6,
                     qkv_bias=tied, tie_word_embeddings=tied, torch_dtype="float32")


_batches = random_micro_batches


def _plain_grads(spec, store, mbs):
    """Whole-model autograd over the concatenated micro-batches, token-mean loss."""
    units = store.units
    flats = [store.weights_of(u).clone().requires_grad_() for u in range(len(units))]
    views = [unit.views(f) for unit, f in zip(units, flats)]
    ids = torch.cat([mb.input_ids for mb in mbs])
    labels = torch.cat([mb.labels for mb in mbs])
    rope = rope_tables(spec, torch.arange(ids.shape[1]), torch.float32)
    x = views[0]["embed"][ids]
    for i in range(spec.num_layers):
        x = block(x, views[i + 1], rope, spec)
    head = views[-1]
    w = views[0]["embed"] if spec.tie_word_embeddings else head["lm_head"]
    logits = F.linear(rms_norm(x, head["norm"], spec.rms_norm_eps), w)
    loss = F.cross_entropy(logits.reshape(-1, spec.vocab_size), labels.reshape(-1), ignore_index=IGNORE)
    loss.backward()
    return float(loss.detach()), [f.grad for f in flats]


def _engine(spec, chunk=5):
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)
    store.init_random(0.2, seed=3)
    cfg = Config(train=TrainConfig(grad_clip=0.0, weight_decay=0.0), engine=EngineConfig(loss_chunk_tokens=chunk))
    return store, Engine(spec, store, cfg, torch.device("cpu"))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied+bias"])
def test_layer_major_step_matches_plain_backward(tied):
    spec = _spec(tied)
    store, engine = _engine(spec)
    mbs = _batches(spec, M=3, B=2, S=9)
    ref_loss, ref_grads = _plain_grads(spec, store, mbs)
    stats = engine.step(mbs, lr=1e-6)
    engine.close()  # waits for the updates; with clipping off the staged gradients are left as they were
    # Tolerances: fp32, each gradient element sums over every token of the step times the widest
    # inner dimension (chunked and layer-major vs whole-model autograd round differently).
    n = sum(mb.input_ids.numel() for mb in mbs) * spec.intermediate_size
    assert stats.loss == pytest.approx(ref_loss, rel=fp_tol(torch.float32, n))
    assert stats.loss_tokens == sum(int((mb.labels != IGNORE).sum()) for mb in mbs)
    for u, ref in enumerate(ref_grads):
        assert_close_normwise(store.grad_of(u), ref, n, msg=f"unit {store.units[u].name}")
    assert stats.grad_norm == pytest.approx(float(torch.linalg.vector_norm(torch.cat(ref_grads))),
                                            rel=fp_tol(torch.float32, n))


@pytest.mark.parametrize("M", [1, 4])
def test_each_layer_crosses_once_per_pass(M):
    """Layer weights are copied to the device at most twice per step (forward, backward), whatever
    the number of micro-batches; the last two layers stay resident from forward into backward."""
    spec = _spec(False)
    store, engine = _engine(spec)
    copies = []
    wait = engine.weights.before_copy
    engine.weights.before_copy = lambda u: (copies.append(u), wait(u))
    for step in range(2):
        copies.clear()
        engine.step(_batches(spec, M=M, B=1, S=6, seed=step), lr=1e-3)
        L = spec.num_layers
        head = L + 1
        # 0: the embedding rows' wait for its update (the step's rows gathered on the host, not the
        # table copied), forward 1..L, head, backward L-2..1
        assert copies == [0, 1, 2, 3, 4, head, 2, 1], copies
    engine.close()


def test_micro_batching_does_not_change_the_step():
    """One micro-batch of 4 sequences and four of 1 give the same gradients (loss is the step's mean)."""
    spec = _spec(False)
    big = _batches(spec, M=1, B=4, S=7, seed=5)[0]
    small = [MicroBatch(big.input_ids[i:i + 1], big.labels[i:i + 1]) for i in range(4)]
    out = []
    for mbs in ([big], small):
        store, engine = _engine(spec)
        stats = engine.step(mbs, lr=1e-6)
        engine.close()
        out.append((stats.loss, [store.grad_of(u).clone() for u in range(len(store.units))]))
    # fp32; a gradient element sums over the step's tokens times the widest inner dimension, in
    # another order (one batched matmul vs four accumulated ones): a norm-wise eps-based bound.
    n = big.input_ids.numel() * spec.intermediate_size
    assert out[0][0] == pytest.approx(out[1][0], rel=fp_tol(torch.float32, n))
    for u, (a, b) in enumerate(zip(out[0][1], out[1][1])):
        assert_close_normwise(a, b, n, msg=f"unit {u}")


def test_loss_chunk_size_does_not_change_the_step():
    """The plan's larger chunk (Engine's chunk_tokens, memory.sized_chunk_tokens on CUDA) against many
    small ones: the same loss and gradients. fp32, norm-wise: each lm_head gradient element sums over the
    step's tokens in chunk-sized GEMMs, in another blocking; terms as in the tests above."""
    spec = _spec(False)
    mbs = _batches(spec, M=2, B=2, S=9, seed=4)
    out = []
    for chunk in (3, 32):  # six chunks of a micro-batch's 18 tokens, or one
        store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)
        store.init_random(0.2, seed=3)
        cfg = Config(train=TrainConfig(grad_clip=0.0, weight_decay=0.0), engine=EngineConfig(loss_chunk_tokens=5))
        engine = Engine(spec, store, cfg, torch.device("cpu"), chunk_tokens=chunk)
        assert engine.chunk_tokens == chunk  # the plan's chunk wins over engine.loss_chunk_tokens
        stats = engine.step(mbs, lr=1e-6)
        engine.close()
        out.append((stats.loss, [store.grad_of(u).clone() for u in range(len(store.units))]))
    n = sum(mb.input_ids.numel() for mb in mbs) * spec.intermediate_size
    assert out[0][0] == pytest.approx(out[1][0], rel=fp_tol(torch.float32, n))
    for u, (a, b) in enumerate(zip(out[0][1], out[1][1])):
        assert_close_normwise(a, b, n, msg=f"unit {u}")
