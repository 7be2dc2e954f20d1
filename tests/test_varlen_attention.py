"""engine.attention: varlen: packed documents as segments of variable-length flash attention
(model/varlen.py) instead of a dense (B, 1, S, S) mask.

torch's varlen_attn is CUDA-only, so the CPU tests stand a reference in for it: a function with the
signature of a torch 2.13 or a torch 2.10/2.11 varlen_attn, recording the keywords it is given and
computing what the kernel computes (SDPA over each segment on its own). Against it: the signature
probe, the engine's forward and backward on packed rows (several documents, a padding tail, GQA)
against the dense-mask SDPA path, and the config refusals. The real kernel, forward and gradients
in bf16, is checked by the `gpu` tests."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_normwise, fp_tol, rel_err
from megastream.config import Config, EngineConfig, TrainConfig
from megastream.engine.engine import Engine, MicroBatch, NativeModel
from megastream.engine.loss import IGNORE
from megastream.model import varlen
from megastream.model.layout import model_layout
from megastream.model.llama import attention, block, document_mask
from megastream.model.spec import ModelSpec
from megastream.store import HostStore

# GQA (4 query heads over 2 k/v heads), a head size flash takes
SPEC = ModelSpec(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                 num_heads=4, num_kv_heads=2, head_dim=8, torch_dtype="float32")


# ---- CPU stand-ins for torch's varlen_attn -------------------------------------------------------
def _per_segment_sdpa(q, k, v, cu_seq, causal, scale, gqa):
    """What varlen_attn computes: each segment's attention on its own. q: (T, nh, hd); k, v: (T, nkv, hd)."""
    b = cu_seq.tolist()
    outs = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=causal,
                                           scale=scale, enable_gqa=gqa).transpose(0, 1)
            for s, e in zip(b[:-1], b[1:])]
    return torch.cat(outs)


def _check_call(q, k, cu_seq_q, cu_seq_k, max_q, max_k):
    assert cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32 and cu_seq_q.device == q.device
    assert int(cu_seq_q[0]) == 0 and int(cu_seq_q[-1]) == q.shape[0] == k.shape[0]
    assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max()) and isinstance(max_q, int)


def new_style(calls: list):
    """torch 2.13's signature: window_size=(-1, 0) is causal; scale, enable_gqa."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        calls.append(dict(window_size=window_size, scale=scale, enable_gqa=enable_gqa, kv_heads=key.shape[1],
                          cu_seq=cu_seq_q))
        _check_call(query, key, cu_seq_q, cu_seq_k, max_q, max_k)
        assert enable_gqa or key.shape[1] == query.shape[1]
        return _per_segment_sdpa(query, key, value, cu_seq_q, window_size == (-1, 0), scale, enable_gqa)
    return varlen_attn


def old_style(calls: list):
    """torch 2.10/2.11's signature: is_causal, no scale (flash's default head_dim^-0.5), no enable_gqa."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append(dict(is_causal=is_causal, kv_heads=key.shape[1], cu_seq=cu_seq_q))
        _check_call(query, key, cu_seq_q, cu_seq_k, max_q, max_k)
        assert key.shape[1] == query.shape[1], "this torch has no GQA: k / v heads must be repeated"
        return _per_segment_sdpa(query, key, value, cu_seq_q, is_causal, None, False)
    return varlen_attn


@pytest.fixture(params=[new_style, old_style], ids=["torch2.13", "torch2.11"])
def stand_in(request, monkeypatch):
    """The calls list of a CPU varlen_attn of one signature, standing in for torch's."""
    calls = []
    monkeypatch.setattr(varlen, "_varlen_attn", lambda: fn)
    fn = request.param(calls)
    fn.style = request.param.__name__
    return fn, calls


# ---- packed rows ---------------------------------------------------------------------------------
DOCS = [[20, 17], [5, 30, 13]]  # rows of 48: the first ends in an 11-token padding tail


def _packed(S=48, vocab=64, seed=0, docs=DOCS) -> MicroBatch:
    """As data/dataset.py assembles them: pieces end to end, then padding (token 0, document -1, no
    targets, positions counting on from 0); no target across a piece boundary."""
    g = torch.Generator().manual_seed(seed)
    B = len(docs)
    ids = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    doc = torch.full((B, S), -1, dtype=torch.long)
    for b, lens in enumerate(docs):
        col = 0
        for k, n in enumerate(lens):
            ids[b, col:col + n] = torch.randint(1, vocab, (n,), generator=g)
            labels[b, col:col + n - 1] = ids[b, col + 1:col + n]
            pos[b, col:col + n] = torch.arange(n)
            doc[b, col:col + n] = k
            col += n
        pos[b, col:] = torch.arange(S - col)
    return MicroBatch(ids, labels, positions=pos, doc_ids=doc)


def test_segments_are_the_documents_and_the_padding_tail():
    cu_seq, longest = varlen.segments(_packed().doc_ids)
    assert cu_seq.dtype == torch.int32
    assert cu_seq.tolist() == [0, 20, 37, 48, 53, 83, 96]  # row 0: 20, 17, padding 11; row 1: 5, 30, 13
    assert longest == 30


def test_the_probe_picks_each_signatures_keywords():
    assert varlen._keywords(new_style([])) == ({"window_size": (-1, 0)}, True, True)
    assert varlen._keywords(old_style([])) == ({"is_causal": True}, False, False)


def test_varlen_attention_equals_masked_sdpa(stand_in):
    fn, calls = stand_in
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 48, 16, generator=g) for h in (4, 2, 2))
    mb = _packed()
    got = varlen.varlen_document_attention(q, k, v, varlen.documents(mb.doc_ids, q.device))
    want = attention(q, k, v, document_mask(mb.doc_ids))
    assert rel_err(got, want) <= fp_tol(torch.float32, 48), rel_err(got, want)  # softmax over <= 48 keys
    (call,) = calls
    if fn.style == "new_style":
        assert call["window_size"] == (-1, 0) and type(call["window_size"]) is tuple  # a list would not be causal
        assert call["scale"] == 16 ** -0.5 and call["enable_gqa"] and call["kv_heads"] == 2
    else:
        assert call["is_causal"] is True and call["kv_heads"] == 4  # repeated to the query's heads


def _engine(attn: str, seed=3):
    store = HostStore(model_layout(SPEC), torch.float32, torch.float32, pin=False)
    store.init_random(0.2, seed=seed)
    cfg = Config(train=TrainConfig(grad_clip=0.0, weight_decay=0.0),
                 engine=EngineConfig(loss_chunk_tokens=7, attention=attn, device="cpu"))
    return store, Engine(SPEC, store, cfg, torch.device("cpu"))


def test_engine_loss_and_gradients_equal_the_sdpa_path(stand_in):
    """Two micro-batches of packed rows (one with a padding tail), GQA: the step's loss and every
    unit's gradient with varlen equal the dense-mask path's; the backward's recompute reuses the
    forward's offsets."""
    fn, calls = stand_in
    mbs = [_packed(seed=0), _packed(seed=1, docs=[[48], [9, 9, 9, 21]])]
    out = []
    for attn in ("sdpa", "varlen"):
        store, engine = _engine(attn)
        evaluated = engine.eval_loss(mbs)  # the forward alone
        stats = engine.step(mbs, lr=1e-6)
        engine.close()  # waits for the updates; with clipping off the staged gradients are left as they were
        out.append((evaluated, stats, [store.grad_of(u).clone() for u in range(len(store.units))]))
    (ev_ref, ref, ref_grads), (ev, got, grads) = out
    # fp32; a loss or gradient element sums over the step's tokens times the widest inner dimension,
    # and the attention rounds differently (per document vs over the masked row): a norm-wise
    # eps-based bound, as tests/test_engine.py's
    n = sum(mb.input_ids.numel() for mb in mbs) * SPEC.intermediate_size
    assert ev[1] == ev_ref[1] and ev[0] == pytest.approx(ev_ref[0], rel=fp_tol(torch.float32, n))
    assert got.loss_tokens == ref.loss_tokens and got.loss == pytest.approx(ref.loss, rel=fp_tol(torch.float32, n))
    for u, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close_normwise(a, b, n, msg=f"unit {u}")
    # eval: L layers x 2 micro-batches; step: forward and backward's recompute, the same again each
    L = SPEC.num_layers
    assert len(calls) == 3 * 2 * L
    step = calls[2 * L:]
    for k in range(2):  # micro-batch k's offsets: built once in the step, reused by every layer and pass
        assert len({id(c["cu_seq"]) for c in step[k::2]}) == 1


def test_plain_rows_keep_the_causal_kernel():
    """Rows without packing (no document indices) take SDPA's causal path: nothing to segment."""
    model = NativeModel(SPEC, torch.device("cpu"), torch.float32, attention="varlen")
    mb = _packed()
    _, masks = model.attention_inputs([MicroBatch(mb.input_ids, mb.labels), mb])
    assert masks[0] is None and isinstance(masks[1], varlen.Documents)


# ---- refusals ------------------------------------------------------------------------------------
def _check(*overrides, spec=None):
    from megastream.config import load_config
    from megastream.resolve import check_model_inputs, model_spec
    from megastream.tokenizer import DEMO_DIR

    cfg = load_config(DEMO_DIR / "demo.yaml", ["engine.attention=varlen", *overrides])
    check_model_inputs(cfg, spec or model_spec(cfg), log=lambda msg: None)


@pytest.mark.parametrize("overrides, change, says", [
    (["engine.device=cpu"], {}, "no CPU implementation"),
    (["engine.device=cuda", "engine.dtype=float32"], {}, "computes in float32"),
    (["engine.device=cuda"], {"head_dim": 36}, "head_dim=36"),
    (["engine.device=cuda"], {"head_dim": 288}, "head_dim=288"),
    (["engine.device=cuda"], {"implementation": "hf"}, "generic path"),
    (["engine.device=cuda", "engine.compile=true"], {}, "engine.compile"),
], ids=["cpu", "fp32", "head_dim-36", "head_dim-288", "hf", "compile"])
def test_varlen_is_refused_where_it_cannot_run(overrides, change, says):
    from megastream.errors import ConfigError
    from megastream.presets import PRESETS

    spec = dataclasses.replace(PRESETS["tiny"], **change)
    with pytest.raises(ConfigError, match="engine.attention") as e:
        _check(*overrides, spec=spec)
    assert says in str(e.value) and "set engine" in str(e.value), e.value


def test_varlen_is_refused_without_torch_varlen(monkeypatch):
    from megastream.errors import ConfigError

    monkeypatch.setattr(varlen, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"engine.attention: varlen needs torch.nn.attention.varlen"):
        _check("engine.device=cuda")


def test_varlen_is_accepted_for_a_gpu_run_in_bf16():
    _check("engine.device=cuda")  # the demo's tiny model: head_dim 32, bf16 (auto on a GPU)


def test_the_memory_model_counts_no_dense_mask():
    from megastream.config import load_config
    from megastream.memory import PHASE_BACKWARD, budget
    from megastream.presets import PRESETS
    from megastream.tokenizer import DEMO_DIR

    b = {}
    for attn in ("sdpa", "varlen"):
        cfg = load_config(DEMO_DIR / "demo.yaml", [f"engine.attention={attn}"])
        b[attn] = budget(cfg, PRESETS["tiny"], "cuda", torch.bfloat16, torch.bfloat16, 0)
    rows, S = 16 * 2, 128
    assert b["sdpa"].device_persistent["attention masks"] - b["varlen"].device_persistent["attention masks"] == \
        rows * (S * S - 4 * S)  # (S, S) bool per row, against int32 offsets
    assert "attention bias" in b["sdpa"].phases[PHASE_BACKWARD]
    assert "attention bias" not in b["varlen"].phases[PHASE_BACKWARD]


# ---- the real kernel -----------------------------------------------------------------------------
def _run_kernel(fn):
    """fn(); a head size or GPU this flash build lacks skips (with its message) rather than fails."""
    try:
        return fn()
    except NotImplementedError as e:
        pytest.skip(f"varlen_attn is not implemented here: {e}")
    except RuntimeError as e:
        if "only support" in str(e):  # flash's capability checks: head size, GPU generation
            pytest.skip(f"flash attention cannot run this case here: {e}")
        raise


def _bf16_tol(ref32, sdpa16) -> float:
    """bf16 tolerance, norm-wise against an fp32 reference: flash accumulates in fp32, so an element
    carries a few bf16 roundings (the probabilities, the output; in backward dP, dS and the k / v
    group sums), not a sum's worth: 4 eps(bf16); and never less than twice what the dense-mask SDPA
    path's own bf16 kernel is off by."""
    return max(4 * torch.finfo(torch.bfloat16).eps, 2 * rel_err(sdpa16, ref32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not varlen.available(), reason="this torch has no torch.nn.attention.varlen")
@pytest.mark.parametrize("hd", [64, 128])
def test_varlen_forward_and_gradients_equal_masked_sdpa_on_the_gpu(hd):
    """The real varlen_attn in bf16, GQA (8 query heads over 2 k/v heads), rows of several documents
    and a padding tail, against masked SDPA: forward and d(q, k, v), both in bf16, each measured
    against masked SDPA in fp32 on the same bf16 inputs."""
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(2)
    S = 256
    base = [torch.randn(2, h, S, hd, generator=g).to(dev, torch.bfloat16) for h in (8, 2, 2)]
    dy = torch.randn(2, 8, S, hd, generator=g).to(dev, torch.bfloat16)
    doc = _packed(S=S, docs=[[100, 70, 50], [17, 200]]).doc_ids  # row 0: a 36-token padding tail
    docs, dense = varlen.documents(doc, dev), document_mask(doc.to(dev))

    def run(fn, dtype):
        q, k, v = (t.to(dtype).requires_grad_() for t in base)
        y = fn(q, k, v)
        return [y.detach().float()] + [d.float() for d in torch.autograd.grad(y, (q, k, v), dy.to(dtype))]

    got = _run_kernel(lambda: run(lambda q, k, v: varlen.varlen_document_attention(q, k, v, docs), torch.bfloat16))
    sdpa16 = run(lambda q, k, v: attention(q, k, v, dense), torch.bfloat16)
    ref32 = run(lambda q, k, v: attention(q, k, v, dense), torch.float32)
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), got, sdpa16, ref32):
        err, tol = rel_err(a, r), _bf16_tol(r, s)
        assert err <= tol, f"{name}: varlen {err:.3g} > {tol:.3g} (bf16 SDPA: {rel_err(s, r):.3g})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not varlen.available(), reason="this torch has no torch.nn.attention.varlen")
def test_a_native_layer_with_varlen_equals_sdpa_on_the_gpu():
    """A native layer (model/llama.py's block: RoPE per document, GQA) on the GPU, with the engine's
    attention inputs: varlen in bf16 against the dense mask in bf16 and in fp32, forward and the
    gradients of its input and weights."""
    dev = torch.device("cuda", torch.cuda.current_device())
    spec = dataclasses.replace(SPEC, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                               head_dim=64)
    unit = model_layout(spec)[1]
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(unit.numel, generator=g) * 0.05
    for key in ("ln1", "ln2"):
        unit.views(w0)[key].fill_(1.0)  # RMSNorm weights as initialised
    w0 = w0.to(dev, torch.bfloat16)
    x0 = torch.randn(2, 128, spec.hidden_size, generator=g).to(dev, torch.bfloat16)
    mb = _packed(S=128, vocab=spec.vocab_size, docs=[[40, 50], [128]])
    dy = torch.randn(x0.shape, generator=g).to(dev, torch.bfloat16)

    def run(attn, dtype):
        model = NativeModel(spec, dev, dtype, attention=attn)
        ropes, masks = model.attention_inputs([mb])
        w, x = w0.to(dtype).requires_grad_(), x0.to(dtype).requires_grad_()
        y = block(x, unit.views(w), ropes[0], spec, masks[0])
        return [y.detach().float()] + [d.float() for d in torch.autograd.grad(y, (x, w), dy.to(dtype))]

    got = _run_kernel(lambda: run("varlen", torch.bfloat16))
    sdpa16, ref32 = run("sdpa", torch.bfloat16), run("sdpa", torch.float32)
    for name, a, s, r in zip(("out", "dx", "dw"), got, sdpa16, ref32):
        err, tol = rel_err(a, r), _bf16_tol(r, s)
        assert err <= tol, f"{name}: varlen {err:.3g} > {tol:.3g} (bf16 SDPA: {rel_err(s, r):.3g})"
