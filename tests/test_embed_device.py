"""engine.embedding: device — the embedding's rows gathered and its gradient scatter-added on the device
(the table streamed into the head's buffers like a unit) — against the host path it replaces: the same
steps, the transformers reference, exact resume, the PCIe bytes `plan` predicts, LoRA over a frozen
table, and the combinations refused.

On the CPU both paths run the same index_add in the same order, so their gradients agree to the last
bit in practice; the bounds are still the dtype's (helpers.fp_tol), not what this CPU happened to round:
each embedding gradient element sums at most the step's tokens' row gradients (plus, tied, the lm_head's
own sum over the step's tokens), and the norms and later steps inherit that through every weight, so the
number of terms is the step's tokens times the widest inner dimension, as in test_engine."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import (assert_close_normwise, fp_tol, make_hf_model, random_micro_batches, read_metrics, run_cli,
                     write_config, write_ids)
from test_engine import _spec
from test_parity import ACCUM, MB, SEQ, _rows, check_parity

from megastream.config import Config, EngineConfig, LoraConfig, OptimConfig, TrainConfig, build_config
from megastream.engine.engine import Engine
from megastream.errors import ConfigError
from megastream.model.layout import model_layout
from megastream.store import HostStore


def _engine(spec, embedding: str, clip: float = 0.5, previous: bool = False, activations: str = "device",
            device: str = "cpu", dtype=torch.float32):
    store = HostStore(model_layout(spec), dtype, dtype, pin=device == "cuda", rotating_grads=previous)
    store.init_random(0.2, seed=3)
    cfg = Config(train=TrainConfig(grad_clip=clip, weight_decay=0.1),
                 optim=OptimConfig(clip="previous" if previous else "global"),
                 engine=EngineConfig(loss_chunk_tokens=5, embedding=embedding, activations=activations))
    return store, Engine(spec, store, cfg, torch.device(device))


def _terms(spec, mbs) -> int:
    """Rounded terms behind each gradient element and norm (module docstring)."""
    return sum(mb.input_ids.numel() for mb in mbs) * spec.intermediate_size


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_one_step_gradients_equal_the_host_path(tied):
    """Every staged gradient (the embedding's in fp32) and the step's loss and norm, 3 micro-batches."""
    spec = _spec(tied)
    mbs = random_micro_batches(spec, M=3, B=2, S=9)
    out = {}
    for path in ("host", "device"):
        store, engine = _engine(spec, path, clip=0.0)
        assert engine.weights.device_embed == engine.grads.device_embed == (path == "device")
        stats = engine.step(mbs, lr=1e-6)
        engine.close()
        out[path] = stats, [store.grad_of(u).clone() for u in range(len(store.units))]
    (host, hg), (dev, dg) = out["host"], out["device"]
    n = _terms(spec, mbs)
    assert dev.loss == host.loss  # the forward reads the same rows either way
    assert dev.grad_norm == pytest.approx(host.grad_norm, rel=fp_tol(torch.float32, n))
    for u, (a, b) in enumerate(zip(dg, hg)):
        assert_close_normwise(a, b, n, msg=f"unit {u}")
    # PCIe: untied, the table crosses in (into the head's buffer) and its fp32 gradient out, once each;
    # tied, the head's own bytes (the table is the lm_head, its gradient the lm_head's)
    table = spec.vocab_size * spec.hidden_size * 4
    assert (dev.h2d_bytes - host.h2d_bytes, dev.d2h_bytes - host.d2h_bytes) == ((0, 0) if tied else (table, table))


@pytest.mark.parametrize("tied,previous,activations",
                         [(False, False, "device"), (True, False, "device"), (False, True, "device"),
                          (True, True, "host")],
                         ids=["untied", "tied", "untied-clip-previous", "tied-clip-previous-offload"])
def test_steps_equal_the_host_path(tied, previous, activations):
    """Three clipped steps (optim.clip: previous too: the embedding's update waits for its copy, its norm
    lands with it), grad_accum 3: the same losses, norms and weights."""
    spec = _spec(tied)
    runs = {}
    for path in ("host", "device"):
        store, engine = _engine(spec, path, previous=previous, activations=activations)
        stats = [engine.step(random_micro_batches(spec, M=3, B=2, S=9, seed=k), lr=1e-3) for k in range(3)]
        engine.close()
        runs[path] = stats, store.weights_of(0).clone(), store.master.clone()
    n = _terms(spec, random_micro_batches(spec, M=3, B=2, S=9))
    tol = fp_tol(torch.float32, n)
    for a, b in zip(runs["device"][0], runs["host"][0]):
        assert a.loss == pytest.approx(b.loss, rel=tol) and a.grad_norm == pytest.approx(b.grad_norm, rel=tol)
        assert not a.skipped and not b.skipped
    for a, b in zip(runs["device"][1:], runs["host"][1:]):
        assert_close_normwise(a, b, n)


def test_auto_is_device_on_cuda_and_host_on_the_cpu():
    """auto: host on the CPU (the bit-exact CPU tests keep their path), device on CUDA; torchrun: device."""
    from megastream.resolve import embedding_path

    cfg = Config()
    assert embedding_path(cfg, _spec(False), "cpu")[0] == "host"
    assert embedding_path(cfg, _spec(False), "cuda")[0] == "device"
    assert embedding_path(cfg, _spec(False), "cpu", distributed=True)[0] == "device"
    lora = Config(lora=LoraConfig())
    assert embedding_path(lora, _spec(False), "cuda")[0] == "host"  # untied frozen base: rows only cross
    assert embedding_path(lora, _spec(True), "cuda")[0] == "device"  # tied: the resident head buffer is the table
    forced = Config(engine=EngineConfig(embedding="device"))
    assert embedding_path(forced, _spec(False), "cpu") == ("device", "engine.embedding: device")


def test_refused_combinations_name_the_key_and_the_fix():
    from megastream.dist.comm import check_distributed

    with pytest.raises(ConfigError, match=r"engine.embedding: host under torchrun.*set engine.embedding: auto"):
        check_distributed(Config(engine=EngineConfig(embedding="host")), _spec(False))
    check_distributed(Config(engine=EngineConfig(embedding="device")), _spec(False))  # no error
    with pytest.raises(ConfigError, match=r"engine.embedding: expected one of 'auto', 'host', 'device'"):
        build_config({"engine": {"embedding": "gpu"}})


# ---- LoRA: the base table is frozen (rows only), or lora.train_extra owns a trained copy ----------------
@pytest.mark.parametrize("tied,extra", [(False, ()), (True, ()), (False, ("embed_tokens",)),
                                        (True, ("embed_tokens", "lm_head"))],
                         ids=["untied", "tied", "untied-embed", "tied-embed-head"])
def test_lora_steps_are_the_same_on_both_paths(tied, extra):
    """No gradient reaches the frozen table, and its rows are the same numbers either way: the adapters'
    steps are identical. Device, tied: the head buffer is the table, copied once for the whole run;
    untied: the table takes the head's buffer each step. A trained embed_tokens never reads the table."""
    from megastream.adapters.lora import LoraAdapters
    from megastream.config import LORA_TARGETS

    spec = _spec(tied)
    out = {}
    for path in ("host", "device"):
        store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False, trainable=False)
        store.init_random(0.2, seed=3)
        ad = LoraAdapters(spec, LORA_TARGETS, rank=4, alpha=8.0, dropout=0.0, rslora=False,
                          device=torch.device("cpu"), seed=0, extra=extra)
        ad.params.copy_(torch.randn(ad.numel, generator=torch.Generator().manual_seed(7)) * 0.3)
        ad.init_extra(store)
        cfg = Config(train=TrainConfig(grad_clip=0.5), engine=EngineConfig(loss_chunk_tokens=5, embedding=path),
                     lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0, train_extra=extra))
        engine = Engine(spec, store, cfg, torch.device("cpu"), adapters=ad)
        copied = []
        h2d = engine.weights.h2d_bytes
        for k in range(3):
            stats = engine.step(random_micro_batches(spec, M=2, B=2, S=7, seed=k), lr=1e-2)
            copied.append(engine.weights.h2d_bytes - h2d)
            h2d = engine.weights.h2d_bytes
        engine.close()
        out[path] = stats, ad.params.clone(), copied
    (hs, hp, hc), (ds, dp, dc) = out["host"], out["device"]
    assert (ds.loss, ds.grad_norm) == (hs.loss, hs.grad_norm) and torch.equal(dp, hp)
    table = spec.vocab_size * spec.hidden_size * 4
    if not tied and not extra:  # each step: the table, then the head again (lm_head and norm)
        assert [d - h for d, h in zip(dc, hc)] == [table, 2 * table + spec.hidden_size * 4,
                                                   2 * table + spec.hidden_size * 4]
    else:  # nothing more: tied, the resident head is the table; trained embed_tokens: the table is not read
        assert dc == hc


# ---- through the CLI: the transformers reference, exact resume, plan's bytes ------------------------------
def _planned_bytes(cfg) -> dict:
    proc = run_cli("plan", str(cfg), "--json", check=False)
    plan = json.loads(proc.stdout)
    assert plan["embedding"] == "device", plan["embedding_note"]
    return plan["roofline"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"], ids=["untied", "tied"])
def test_matches_transformers_and_moves_the_planned_bytes(tmp_path, kind):
    """The parity contract (test_parity) with engine.embedding: device; every step's PCIe bytes are plan's."""
    check_parity(tmp_path, kind, clip=0.5, engine={"embedding": "device"})
    planned = _planned_bytes(tmp_path / "run.yaml")
    for m in read_metrics(tmp_path / "run"):
        assert (m["h2d_bytes"], m["d2h_bytes"]) == (planned["h2d_bytes_per_step"], planned["d2h_bytes_per_step"])


def test_resume_is_bit_exact(tmp_path):
    model = make_hf_model("llama", tmp_path / "model")
    data = write_ids(tmp_path / "train.jsonl", _rows(model.config.vocab_size, 4 * ACCUM * MB, seed=2))

    def config(name):
        return write_config(tmp_path / f"{name}.yaml", {
            "model": {"path": str(tmp_path / "model")},
            "data": {"path": str(data), "seq_len": SEQ, "shuffle": True, "pack": False},
            "train": {"steps": 4, "micro_batch_size": MB, "grad_accum": ACCUM, "lr": 2e-3, "grad_clip": 0.5},
            "engine": {"device": "cpu", "dtype": "float32", "embedding": "device"},
            "output": {"dir": str(tmp_path / name), "progress": False, "save_every": 2},
        })

    run_cli("train", str(config("straight")))
    shutil.copytree(tmp_path / "straight", tmp_path / "again", ignore=shutil.ignore_patterns("final", "checkpoint-4"))
    run_cli("train", str(config("again")), "--resume", str(tmp_path / "again" / "checkpoint-2"))
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "again")
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("straight", "again"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_gemma_embedding_scale_and_padding_row(tmp_path):
    """The generic path's embedding (Gemma 2: rows scaled by sqrt(hidden), no gradient into the padding row)
    on the device equals the host path."""
    pytest.importorskip("transformers")
    from test_hf_generic import make_model

    model = make_model("gemma2", tmp_path / "model")
    rows = _rows(model.config.vocab_size, 2 * ACCUM * MB, seed=1)
    for r in rows:
        r[2] = model.config.pad_token_id
    data = write_ids(tmp_path / "train.jsonl", rows)
    runs = {}
    for path in ("host", "device"):
        cfg = write_config(tmp_path / f"{path}.yaml", {
            "model": {"path": str(tmp_path / "model"), "implementation": "hf"},
            "data": {"path": str(data), "seq_len": SEQ, "shuffle": False, "pack": False},
            "train": {"steps": 2, "micro_batch_size": MB, "grad_accum": ACCUM, "lr": 2e-3, "grad_clip": 0.5},
            "engine": {"device": "cpu", "dtype": "float32", "embedding": path},
            "output": {"dir": str(tmp_path / path), "progress": False},
        })
        run_cli("train", str(cfg))
        runs[path] = read_metrics(tmp_path / path)
    tol = fp_tol(torch.float32, ACCUM * MB * SEQ * model.config.intermediate_size)
    for a, b in zip(runs["device"], runs["host"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=tol)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=tol)


# ---- CUDA ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cuda_bf16_device_path_equals_host_path(tied):
    """On CUDA in bf16 (streams, pinned arenas, the embedding's copy gating its update): the device path's
    steps equal the host path's within bf16 rounding. The first step reads the same rows, so its loss and
    gradient norm differ by fp32 summation order only (the device's index_add uses atomics); later steps
    also by the bf16 working copy (a rounding can flip), so they are held to a few bf16 ulps."""
    spec = _spec(tied)
    runs = {}
    for path in ("host", "device"):
        store, engine = _engine(spec, path, device="cuda", dtype=torch.bfloat16)
        stats = [engine.step(random_micro_batches(spec, M=3, B=2, S=16, seed=k), lr=1e-3) for k in range(3)]
        engine.close()
        runs[path] = stats, store.working.float().clone()
        store.close()
    (dev, dw), (host, hw) = runs["device"], runs["host"]
    n = _terms(spec, random_micro_batches(spec, M=3, B=2, S=16))
    tol = fp_tol(torch.float32, n)
    assert dev[0].loss == pytest.approx(host[0].loss, rel=tol) and dev[0].grad_norm == pytest.approx(
        host[0].grad_norm, rel=tol)
    bf16 = 4 * torch.finfo(torch.bfloat16).eps
    for a, b in zip(dev[1:], host[1:]):
        assert a.loss == pytest.approx(b.loss, rel=bf16) and a.grad_norm == pytest.approx(b.grad_norm, rel=8 * bf16)
    assert float((dw - hw).norm() / hw.norm()) <= bf16
    table = spec.vocab_size * spec.hidden_size
    assert dev[0].h2d_bytes - host[0].h2d_bytes == (0 if tied else table * 2)
    assert dev[0].d2h_bytes - host[0].d2h_bytes == (0 if tied else table * 4)  # the embedding's gradient: fp32
