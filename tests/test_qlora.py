"""LoRA over a quantized frozen base (lora.base_dtype: int8 | nf4): each layer's projections held
quantized on the host, streamed as one buffer, dequantized on the device before the layer runs. A run
equals, to floating-point tolerance, the same run over a full-precision base whose projections are
dequantize(quantize(w))."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import assert_close_normwise, fp_tol, read_metrics, rel_err, run_cli
from test_lora import _batches, _lora_config, _peft_model, _rows, _spec
from test_parity import ACCUM, MB, STEPS

from megastream import memory
from megastream.adapters.lora import LoraAdapters
from megastream.adapters.quant import dequantize, quantize, quantized_nbytes, to_flat
from megastream.config import LORA_TARGETS, Config, EngineConfig, LoraConfig, TrainConfig
from megastream.engine.engine import Engine
from megastream.model.layout import model_layout
from megastream.store import HostStore

RANK, ALPHA = 4, 8.0


def _roundtrip(store: HostStore, scheme: str) -> None:
    """Replace each layer's 2-D projections of an unquantized store by dequantize(quantize(w))."""
    for u, unit in enumerate(store.units):
        if unit.name.startswith("layer."):
            views = unit.views(store.weights_of(u))
            for e in unit.entries:
                if e.decay:
                    views[e.key].copy_(dequantize(quantize(views[e.key], scheme), store.compute_dtype))


def _engine(spec, store):
    ad = LoraAdapters(spec, LORA_TARGETS, rank=RANK, alpha=ALPHA, dropout=0.0, rslora=False,
                      device=torch.device("cpu"), seed=0)
    ad.params.copy_(torch.randn(ad.numel, generator=torch.Generator().manual_seed(7)) * 0.3)
    cfg = Config(train=TrainConfig(grad_clip=1.0), engine=EngineConfig(loss_chunk_tokens=5),
                 lora=LoraConfig(rank=RANK, alpha=ALPHA, target_modules=LORA_TARGETS))
    return ad, Engine(spec, store, cfg, torch.device("cpu"), adapters=ad)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied+bias"])
def test_quantized_base_steps_equal_a_dequantized_full_precision_base(scheme, tied):
    spec = _spec(tied)
    layout = model_layout(spec)
    q = HostStore(layout, torch.float32, torch.float32, pin=False, trainable=False, quant=scheme)
    q.init_random(0.2, seed=3)
    ref = HostStore(layout, torch.float32, torch.float32, pin=False, trainable=False)
    ref.init_random(0.2, seed=3)
    _roundtrip(ref, scheme)

    # The host holds the quantized bytes: each layer its projections' flat buffers, then norms / biases.
    assert q.working.numel() == layout[0].numel + layout[-1].numel  # no full-precision layer on the host
    for u in q.packing:
        unit = layout[u]
        assert q.packed_of(u).numel() == memory.frozen_unit_bytes(unit, torch.float32, scheme)
        assert q.packed_of(u).numel() == sum(quantized_nbytes(e.shape, scheme) if e.decay else e.numel * 4
                                             for e in unit.entries)
        for e, off, nb, quantized in q.packing[u]:
            if quantized:
                w = ref.working_of(u)[e.offset:e.offset + e.numel].view(e.shape)
                # (quantize is idempotent on its own output only up to rounding: compare dequantized)
                back = torch.empty(unit.numel)
                q.unpack(u, q.packed_of(u), back)
                assert torch.equal(back[e.offset:e.offset + e.numel].view(e.shape), w)
    expected = memory.frozen_store_bytes(spec, torch.float32, scheme)["working"]
    assert expected <= q.breakdown()["working"] < expected + 16 * spec.num_layers

    ad_q, eng_q = _engine(spec, q)
    ad_r, eng_r = _engine(spec, ref)
    n = 2 * 9 * spec.intermediate_size
    for step in range(3):
        mbs = _batches(spec, M=2, B=1, S=9, seed=step)
        a, b = eng_q.step(mbs, lr=1e-2), eng_r.step(mbs, lr=1e-2)
        assert a.loss == pytest.approx(b.loss, rel=fp_tol(torch.float32, n))
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=fp_tol(torch.float32, n))
    eng_q.close()
    eng_r.close()
    assert_close_normwise(ad_q.params, ad_r.params, n, msg="adapters after 3 steps")

    # The comparison can tell: the same steps over the unquantized base end elsewhere.
    full = HostStore(layout, torch.float32, torch.float32, pin=False, trainable=False)
    full.init_random(0.2, seed=3)
    ad_f, eng_f = _engine(spec, full)
    for step in range(3):
        eng_f.step(_batches(spec, M=2, B=1, S=9, seed=step), lr=1e-2)
    eng_f.close()
    assert float((ad_f.params - ad_r.params).norm() / ad_r.params.norm()) > 100 * fp_tol(torch.float32, n)


def test_packed_buffer_is_quantize_to_flat():
    spec = _spec(False)
    layout = model_layout(spec)
    q = HostStore(layout, torch.float32, torch.float32, pin=False, trainable=False, quant="nf4")
    full = HostStore(layout, torch.float32, torch.float32, pin=False, trainable=False)
    q.init_random(0.2, seed=5)
    full.init_random(0.2, seed=5)
    for u in q.packing:
        for e, off, nb, quantized in q.packing[u]:
            w = full.working_of(u)[e.offset:e.offset + e.numel].view(e.shape)
            got = q.packed_of(u)[off:off + nb]
            want = to_flat(quantize(w, "nf4")) if quantized else w.reshape(-1).view(torch.uint8)
            assert torch.equal(got, want), (u, e.key)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_train_cli_over_a_quantized_base_equals_the_dequantized_model(tmp_path, scheme):
    """`train` with lora.base_dtype: nf4 | int8 (quantized while load_hf_weights reads the safetensors)
    against `train` over a model directory whose projections were replaced by dequantize(quantize(w))."""
    import safetensors.torch as st

    pm = _peft_model("llama", tmp_path / "q")
    rows = _rows(pm.config.vocab_size, STEPS * ACCUM * MB, seed=1)
    shutil.copytree(tmp_path / "q", tmp_path / "ref")
    path = tmp_path / "ref" / "model" / "model.safetensors"
    tensors = st.load_file(path)
    for name, t in tensors.items():
        if name.startswith("model.layers.") and t.dim() == 2:
            tensors[name] = dequantize(quantize(t.float(), scheme), torch.float32).to(t.dtype).contiguous()
    st.save_file(tensors, path, metadata={"format": "pt"})

    run_cli("train", str(_lora_config(tmp_path / "q", rows, base_dtype=scheme)))
    run_cli("train", str(_lora_config(tmp_path / "ref", rows)))
    got, want = read_metrics(tmp_path / "q" / "run"), read_metrics(tmp_path / "ref" / "run")
    got = [m for m in got if "loss" in m and "step" in m]
    want = [m for m in want if "loss" in m and "step" in m]
    assert len(got) == len(want) > 0
    n = 4096
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=fp_tol(torch.float32, n))
    ad_q = st.load_file(tmp_path / "q" / "run" / "final" / "adapter_model.safetensors")
    ad_r = st.load_file(tmp_path / "ref" / "run" / "final" / "adapter_model.safetensors")
    assert ad_q.keys() == ad_r.keys()
    for k in ad_q:
        assert_close_normwise(ad_q[k], ad_r[k], n, msg=k)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_expert_stacks_are_quantized_expert_by_expert(scheme):
    """A 3-D stack of experts' weights (E, out, in), as a MoE layer holds them fused, is quantized slice
    by slice: each expert's own flat buffer, back to back; unpacked, every expert is exactly
    dequantize(quantize(its weight)); plan counts the bytes the store holds. 4-D is refused by name."""
    from megastream.adapters.quant import packed_nbytes
    from megastream.model.layout import _unit

    E, out_f, in_f = 3, 40, 64
    units = [_unit("embed", [("embed", "model.embed_tokens.weight", (32, in_f))]),
             _unit("layer.0", [("experts", "model.layers.0.mlp.experts.gate_up_proj", (E, 2 * out_f, in_f)),
                               ("router", "model.layers.0.mlp.gate.weight", (E, in_f)),
                               ("ln1", "model.layers.0.input_layernorm.weight", (in_f,))]),
             _unit("head", [("norm", "model.norm.weight", (in_f,))])]
    store = HostStore(units, torch.float32, torch.float32, pin=False, trainable=False, quant=scheme)
    w = store.weights_of(1)  # the layer's full-precision staging
    w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    ref = units[1].views(w.clone())
    store.finish_unit(1)
    one = quantized_nbytes((2 * out_f, in_f), scheme)
    assert packed_nbytes((E, 2 * out_f, in_f), scheme) == E * one
    assert store.packed_of(1).numel() == E * one + quantized_nbytes((E, in_f), scheme) + in_f * 4 \
        == memory.frozen_unit_bytes(units[1], torch.float32, scheme)
    out = torch.empty(units[1].numel)
    store.unpack(1, store.packed_of(1).clone(), out)
    got = units[1].views(out)
    for k in range(E):
        assert torch.equal(got["experts"][k], dequantize(quantize(ref["experts"][k], scheme), torch.float32))
    assert torch.equal(got["router"], dequantize(quantize(ref["router"], scheme), torch.float32))
    assert torch.equal(got["ln1"], ref["ln1"])
    assert not torch.equal(got["experts"][1], dequantize(quantize(ref["experts"][0], scheme), torch.float32))

    bad = [units[0], _unit("layer.0", [("x", "model.layers.0.x", (2, 2, 4, 4))]), units[2]]
    with pytest.raises(ValueError, match=r"layer.0.x: a 4-D weight"):
        HostStore(bad, torch.float32, torch.float32, pin=False, trainable=False, quant=scheme)


def test_merge_over_a_quantized_base_starts_from_the_original_weights(tmp_path):
    """lora.merge with an NF4 base, from the usual bf16 source, with the head trained in full
    (lora.train_extra): merged/ is read again from model.path's files and equals peft's merge_and_unload
    of final/ onto the original model, each adapted projection summed in fp32 and rounded once to bf16
    (output.dtype auto), the trained head rounded once, every other tensor the source's bit for bit; not
    a merge into the dequantized base. A preset (no files) is refused before anything is written, and so
    are source files that changed since they were loaded."""
    import json
    import os

    import peft
    import transformers
    import yaml
    from safetensors.torch import load_file, save_file

    from helpers import write_config
    from test_cli_errors import _user_error

    from megastream.adapters.merge import SourceMerge
    from megastream.checkpoint import files_stamp
    from megastream.errors import CheckpointError

    pm = _peft_model("llama", tmp_path, modules_to_save=["lm_head"])
    rows = _rows(pm.config.vocab_size, STEPS * ACCUM * MB, seed=3)
    model = tmp_path / "model"
    src = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(model / "model.safetensors").items()}
    save_file(src, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config.update({"torch_dtype": "bfloat16", "dtype": "bfloat16"})
    (model / "config.json").write_text(json.dumps(config))
    cfg = _lora_config(tmp_path, rows, base_dtype="nf4", merge=True, train_extra=["lm_head"])
    run_cli("train", str(cfg))

    run = tmp_path / "run"
    got = {}
    for f in sorted((run / "merged").glob("*.safetensors")):
        got.update(load_file(f))
    assert set(got) == set(src) and all(t.dtype == torch.bfloat16 for t in got.values())
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)  # bf16 -> fp32: exact
    want = peft.PeftModel.from_pretrained(base, run / "final").merge_and_unload().state_dict()
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    merged = 0
    for k, w in src.items():
        if "base_model.model." + k.removesuffix(".weight") + ".lora_A.weight" in adapter:
            # one rounding of fp32 sums that may differ in their last bit: at most a bf16 ulp apart
            assert rel_err(got[k].float(), want[k].to(torch.bfloat16).float()) <= torch.finfo(torch.bfloat16).eps, k
            assert not torch.equal(got[k], w), k  # the adapter moved it
            merged += 1
        else:  # the trained head (rounded once), and the rest as the source holds it
            assert torch.equal(got[k], want[k].to(torch.bfloat16)), k
    assert merged == 7 * pm.config.num_hidden_layers and not torch.equal(got["lm_head.weight"], src["lm_head.weight"])
    k = "model.layers.1.mlp.down_proj.weight"
    deq = dequantize(quantize(src[k].float(), "nf4"), torch.float32)
    assert float((got[k].float() - want[k]).norm()) < 0.1 * float((deq - src[k].float()).norm())  # not from NF4

    preset = write_config(tmp_path / "preset.yaml", {
        **{k: v for k, v in yaml.safe_load(cfg.read_text()).items() if k != "model"},
        "model": {"preset": "tiny"}, "lora": {"base_dtype": "nf4", "merge": True},
        "output": {"dir": str(tmp_path / "preset-run"), "progress": False}})
    _user_error(run_cli("train", str(preset), check=False), "lora.merge", "model.preset", "model.path")
    assert not (tmp_path / "preset-run").exists()

    stamp = files_stamp(model)
    f = model / "model.safetensors"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # replaced since it was loaded
    with pytest.raises(CheckpointError, match="changed since this run loaded them"):
        SourceMerge(None, model, stamp)
