"""Head-to-head training throughput on one GPU: megastream vs DeepSpeed ZeRO-3 offload vs FSDP2
offload, same model shape, data, tokens per step, sequence length, gradient checkpointing and GPU
memory cap, each system in its own subprocess, in one invocation.

    python benchmarks/throughput.py --model qwen2.5-3b --seq-len 1024 --micro-batch-size 4 --grad-accum 4 \\
        --gpu-memory-gb 24 --json benchmarks/results/<date>-<device>-qwen2.5-3b.json
    python benchmarks/throughput.py --dry-run      # the CPU, a tiny model, every row, both bounds
    python benchmarks/throughput.py --model qwen2.5-3b --seq-len 8192 --docs-per-row 8 \\
        --systems megastream:full megastream:full+flex megastream:full+clip-previous   # step features before/after

The headline is same arithmetic against same arithmetic. Every row says its precision and its
bytes of model state per parameter:
  megastream:full     bf16 compute, fp32 master weights, fp32 AdamW moments (14 B/param: bf16 working
                      copy + fp32 master + fp32 m, v) -- the arithmetic of DeepSpeed's CPU Adam and of
                      FSDP2's AdamW, so `megastream:full / deepspeed` and `megastream:full / fsdp2` are
                      the headline ratios
  megastream:lean     bf16 weights with stochastic rounding, bf16 moments (6 B/param)
  megastream:compact  bf16 weights with stochastic rounding, block-scaled int8 moments (~4.03 B/param)
  deepspeed           ZeRO stage 3, offload_param and offload_optimizer to pinned CPU memory, bf16, the
                      model built under HF's ZeRO-3 integration (HfDeepSpeedConfig), DeepSpeedCPUAdam
                      (AdamW mode) -- bf16 params + fp32 master + fp32 m, v on the host (14 B/param)
  fsdp2               fully_shard per decoder layer and the root, CPUOffloadPolicy(pin_memory=True),
                      MixedPrecisionPolicy(bf16 params, fp32 reduce), fp32 sharded params on the host
                      (the master), torch.optim.AdamW(fused=True) on the CPU (12 B/param); built on the
                      meta device, sharded, then filled as transformers initialises it, drawn on the GPU
The lean and compact rows stand beside the headline, labelled, never in its place.

Step features before/after: a row megastream:<mode>+<variant>[+<variant>...] is megastream:<mode> with
the settings of each variant (VARIANTS below) applied to its megastream config:
  flex           engine.attention: flex (FlexAttention with a block-sparse document mask instead of SDPA
                 with a dense boolean one; it matters only for rows of several documents: --docs-per-row)
  clip-previous  optim.clip: previous (each unit updated as soon as its gradient lands, clipped by the
                 previous step's norm; its first step runs twice, a norms-only pass first: give it warm-up)
  compile        engine.compile: true (torch.compile of the layer function; the first step compiles:
                 --warmups megastream:full+compile=2 keeps that out of the timed steps)
e.g. megastream:full+flex, megastream:lean+clip-previous+flex. Each such row is labelled with its settings
(the printed table, "settings" in the JSON, and the config the worker really ran with: "config"), and the
harness prints its tokens/s over its base row's (same mode, no variant) when both ran, e.g.
`full+flex / full = 1.18x tokens/s (engine.attention: flex)` ("variants" in the JSON), then what stays
unmeasured ("unmeasured": a variant row that did not run and why, a feature no row tried). Variant rows
are never set against the baselines. The bounds count attention as plan.roofline does (the dense masked
rate for packed rows): they do not model flex's skipped blocks.

Same work for every system:
  data        identical tensors: random token ids (torch.Generator seeded 0, uniform over the
              vocabulary), grad_accum micro-batches of micro_batch_size full rows of seq_len tokens.
              By default (--docs-per-row 1) each row is one document filling the whole row, so no
              system needs a document mask: all run plain causal attention (SDPA) over the full rows,
              and packing is moot (megastream gives a single-document row no mask whether data.pack is
              on, as `train` defaults it, or off; the config says pack: false so its bound uses the
              causal attention rate the rows really run at).
              --docs-per-row N > 1 cuts every row into N documents (>= 2 tokens each) at boundaries
              drawn from a torch.Generator seeded 1, the same for every system, and every system runs
              the same per-document attention: RoPE positions restart at each document and attention
              stays within it. megastream gets them as its packed data path gives them (MicroBatch
              positions and doc_ids, as megastream/data/dataset.py builds them; data.pack: bfd, so the
              bound uses the masked attention rate), and its engine masks with a dense boolean mask
              (engine.attention: sdpa) or a FlexAttention block mask (+flex). The transformers models
              (DeepSpeed, FSDP2) get the same position_ids and the same dense (B, 1, S, S) boolean
              document mask (megastream.model.llama.document_mask), which transformers hands to SDPA as
              it is: the same masked attention as megastream's sdpa rows.
              Each worker hashes the ids and the document boundaries it trained on (data_sha256 in every
              row) and counts its loss tokens, and the harness checks both are the same.
  labels      next-token targets, none across a document boundary: seq_len - N loss tokens per row in
              every system
  checkpoint  gradient checkpointing at every decoder layer's input (megastream always; the HF models
              with gradient_checkpointing_enable(use_reentrant=False))
  optimizer   AdamW lr 1e-5, betas (0.9, 0.95), eps 1e-8, weight decay 0, gradient clipping at norm 1.0
  GPU cap     torch.cuda.set_per_process_memory_fraction to --gpu-memory-gb in every process

Per row: tokens/s (median of the timed steps after warm-up), model TFLOP/s (6 * N * tokens/s: no
credit for recompute), MFU against the bf16 matmul rate measured in this run, peak GPU memory (torch
allocator), peak host memory (VmHWM of the row's own process, read from /proc/<pid>/status: the
worker reports its own at the end, and the harness polls it while the row runs, so a row killed by
its timeout or the OOM killer still has a figure), the spread of step times, the loss per step, and a
status: ok | oom-gpu | oom-host | timeout | not-run | error (with its message). A row that cannot be
built as described -- DeepSpeed's CPU Adam fails to JIT-build, FSDP2's fused CPU AdamW is refused,
megastream's C++ ops fail to build, the host lacks the RAM it needs -- is `not-run` with the reason,
never silently replaced by a slower fallback. megastream rows say whether the C++ ops were built and
which CPU ISA path ran.

Two bounds per megastream row, from rates measured in the same run (pinned H2D/D2H bandwidth, bf16
matmul and attention rates, host memory bandwidth, the fused optimizer's rate per mode):
  ideal       megastream.plan.roofline: every term perfectly overlapped, max(compute, H2D, D2H,
              optimizer) on a GPU
  attainable  megastream.plan.schedule, `plan`'s predicted step: what megastream's own schedule can
              reach with those rates, ~ max(T_opt, T_fwd) + T_head + T_bwd + tail (optim.clip: global;
              T_fwd + T_head + max(T_bwd, T_opt) + tail with optim.clip: previous)
and the fraction of each achieved (bound / measured step time).

The parent process never creates a CUDA context (children would otherwise inherit a GPU already
holding one, and the parent's memory would count against theirs): the device's name comes from the
roofline child. Each row has its own timeout (--timeout, --timeouts NAME=S ...): a row past it is
killed with its process group and reported `timeout`. A row the host's RAM cannot hold (megastream's
memory model; ~18 B/param for DeepSpeed, ~16 for FSDP2, + 4 GB) is `not-run` before it starts
(--host-ram-gb, default MemTotal).

  --device cpu   the harness end to end on the CPU, every system in fp32 (bf16 matmuls are emulated
                 there); DeepSpeed is `not-run`: it needs CUDA. --jobs N runs rows side by side there.
  --dry-run      the CPU, the tiny model, one step per row, every row (or --systems), both bounds,
                 2 rows at a time: checks the harness in well under a minute, measures nothing
  --check        the rows, their timeouts and what can run here (CUDA, DeepSpeed, host RAM, what
                 `megastream train` refuses, e.g. flex on the CPU); no process
  --rates-from   reuse an earlier run's measured rates (its --json) instead of the roofline child
  --profile      megastream rows also run --profile-steps steps under torch.profiler (megastream/
                 profiling.py): compute-stream busy fraction, H2D/D2H time hidden under compute

scripts/gpu_acceptance.sh runs it on the GPU machine (part 1: the qwen2.5-3b head-to-head; part 2:
qwen2.5-14b compact with a profile, qwen2.5-7b rows; part 3: the step features before/after on
qwen2.5-3b with 8k-token rows of 8 documents).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megastream.machine import vm_hwm  # noqa: E402  (no torch: the parent creates no CUDA context)

ALL_SYSTEMS = ["megastream:full", "deepspeed", "fsdp2", "megastream:lean", "megastream:compact"]
HEADLINE = "megastream:full"
BASELINES = ("deepspeed", "fsdp2")
MODES = ("full", "lean", "compact")  # megastream:<mode> (megastream.resolve.MODES)
# Step-time features, before/after: a row `megastream:<mode>+<variant>[+<variant>...]` is the row
# `megastream:<mode>` with these megastream config settings applied ("section.key": value), and the
# harness prints its tokens/s over its base row's (same mode, no variant) when both ran. A new
# feature is one line here (its key must be a field of megastream/config.py's Config:
# tests/test_throughput_harness.py checks every one).
VARIANTS = {
    "flex": {"engine.attention": "flex"},  # FlexAttention, block-sparse document mask (packed rows only)
    "clip-previous": {"optim.clip": "previous"},  # each unit updated as its gradient lands, last step's norm
    "compile": {"engine.compile": True},  # torch.compile of the native layer function
    "varlen": {"engine.attention": "varlen"},  # flash attention over each document (packed rows only)
    "embed-host": {"engine.embedding": "host"},  # the embedding on the host (before engine.embedding's device path)
}
HYPER = {"lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0}

# What each row computes with, and the bytes of model state per parameter it keeps (weights in every
# precision it holds + optimizer moments; gradient buffers not counted). megastream's own figures come
# from its memory model (memory.Budget.state_bytes_per_param); these are the baselines'.
LABELS = {
    "megastream:full": "bf16 compute, fp32 master weights, fp32 AdamW moments",
    "megastream:lean": "bf16 compute, bf16 weights (stochastic rounding), bf16 AdamW moments",
    "megastream:compact": "bf16 compute, bf16 weights (stochastic rounding), int8 block-scaled AdamW moments",
    "deepspeed": "bf16 compute, fp32 master weights, fp32 AdamW moments (DeepSpeedCPUAdam)",
    "fsdp2": "bf16 compute, fp32 master weights (the sharded params), fp32 AdamW moments (fused CPU AdamW)",
}
BASELINE_STATE_BYTES = {"deepspeed": 2 + 4 + 8, "fsdp2": 4 + 8}
# Host bytes per parameter a baseline needs, for the fits-in-RAM check: states above + fp32 gradients
# on the host (+ runtime, CUDA context and pinned bounce buffers: HOST_OVERHEAD).
BASELINE_HOST_BYTES = {"deepspeed": 2 + 4 + 8 + 4, "fsdp2": 4 + 8 + 4}
HOST_OVERHEAD = 4e9
FULL_ARITHMETIC = "fp32 master + fp32 AdamW moments"


class NotRun(Exception):
    """The row cannot be run as described (its reason is the message): reported, never replaced."""


def parse_system(name: str) -> tuple[str, tuple[str, ...]]:
    """A row's name -> (its base row, its variants): "megastream:full+flex+clip-previous" ->
    ("megastream:full", ("flex", "clip-previous")); "fsdp2" -> ("fsdp2", ()). ValueError, listing the
    modes and variants, for a name that is none of them."""
    known = (f"rows are megastream:<mode>[+<variant>...] with mode one of {', '.join(MODES)} and variants "
             f"{', '.join(VARIANTS)}, or {', '.join(BASELINES)}")
    if name in BASELINES:
        return name, ()
    head, sep, mode = name.partition(":")
    if head != "megastream" or not sep:
        raise ValueError(f"unknown row {name!r}: {known}")
    mode, *variants = mode.split("+")
    if mode not in MODES:
        raise ValueError(f"unknown megastream mode {mode!r} in {name!r}: {known}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant {', '.join(map(repr, bad))} in {name!r}: {known}")
    dup = sorted({v for v in variants if variants.count(v) > 1})
    if dup:
        raise ValueError(f"variant {', '.join(map(repr, dup))} named twice in {name!r}")
    return f"megastream:{mode}", tuple(variants)


def variant_settings(name: str) -> dict:
    """The megastream config settings a row's variants apply ({} for a base row or a baseline)."""
    out: dict = {}
    for v in parse_system(name)[1]:
        out.update(VARIANTS[v])
    return out


def _system_arg(name: str) -> str:
    try:
        parse_system(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


# ---- bounds: megastream.plan.roofline (ideal) and megastream.plan.schedule (attainable) -----------
def _rates_from(rec: dict):
    from megastream.plan import Rates

    return Rates(h2d_gbps=rec["h2d_gbps"], d2h_gbps=rec["d2h_gbps"], matmul_tflops=rec["matmul_tflops"],
                 host_gbps=rec["host_gbps"], attention_tflops=dict(rec.get("attention_tflops", {})),
                 attention_by_shape=dict(rec.get("attention_tflops_by_shape") or {}),
                 optimizer_ns_per_param=dict(rec["optimizer_ns_per_param"]), source="measured in this run")


def megastream_bounds(a, mode: str, rates) -> dict:
    """Both bounds of megastream in `mode` for this run's shape: {"ideal": ..., "attainable": ...}."""
    import torch

    from megastream.memory import budget
    from megastream.plan import roofline, schedule
    from megastream.presets import PRESETS
    from megastream.resolve import resolve_dtypes

    cfg, spec = megastream_config(a, mode), PRESETS[a.model]
    compute, grad = resolve_dtypes(cfg, torch.device(a.device))
    b = budget(cfg, spec, a.device, compute, grad, 0)
    r = roofline(cfg, spec, b, rates)
    ideal = {"step_s": r.step_s, "bound": r.bound, "compute_s": r.compute_s, "h2d_s": r.h2d_s, "d2h_s": r.d2h_s,
             "optimizer_s": r.optimizer_s, "flops_per_step": r.flops}
    return {"ideal": ideal, "attainable": vars(schedule(cfg, spec, b, rates, r)),
            "state_bytes_per_param": b.state_bytes_per_param, "host_bytes": b.host_total}


# ---- workers (one per subprocess) ------------------------------------------------------------------
def _cap_gpu(a) -> None:
    """The baselines' cap: the same call megastream's rows make (megastream.train)."""
    import torch

    from megastream.train import limit_gpu_memory

    if a.device == "cuda" and a.gpu_memory_gb:
        limit_gpu_memory(a.gpu_memory_gb, torch.device("cuda", 0))


def _batches(a, vocab: int) -> list[tuple]:
    """The step's data, identical in every system: grad_accum micro-batches of (ids, cuts). ids: full
    (micro_batch_size, seq_len) rows of random token ids; cuts: (micro_batch_size, docs_per_row - 1)
    int64, the first token of each document after the first in each row (sorted; empty with one
    document per row). The ids do not depend on --docs-per-row (their generator is seeded 0, the
    boundaries' 1), and every document holds at least 2 tokens."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (a.micro_batch_size, a.seq_len), generator=g) for _ in range(a.grad_accum)]
    return list(zip(ids, _cuts(a.grad_accum, a.micro_batch_size, a.seq_len, getattr(a, "docs_per_row", 1))))


def _cuts(grad_accum: int, rows: int, S: int, docs: int) -> list:
    """Seeded random document boundaries: for each micro-batch a (rows, docs - 1) tensor of sorted
    cut positions with every document >= 2 tokens long (stars and bars: docs - 1 distinct draws p from
    [0, S - docs - 1), sorted; cut k (1-based) = p_k + k + 1)."""
    import torch

    if not 1 <= docs <= S // 2:
        raise ValueError(f"--docs-per-row {docs}: must be between 1 and seq_len / 2 = {S // 2} (2 tokens a document)")
    if docs == 1:
        return [torch.empty(rows, 0, dtype=torch.int64) for _ in range(grad_accum)]
    g = torch.Generator().manual_seed(1)
    k = torch.arange(1, docs)
    return [torch.stack([torch.randperm(S - docs - 1, generator=g)[:docs - 1].sort().values + k + 1
                         for _ in range(rows)]) for _ in range(grad_accum)]


def _documents(cuts, S: int):
    """(rows, docs - 1) cuts -> (doc_ids, positions), both (rows, S) int64: each token's document and
    its position within it (RoPE restarts at each document, as megastream's packed rows do)."""
    import torch

    B = cuts.shape[0]
    pos = torch.arange(S).expand(B, S)
    if cuts.shape[1]:
        doc = torch.searchsorted(cuts, pos.contiguous(), right=True)
    else:
        doc = torch.zeros(B, S, dtype=torch.int64)
    starts = torch.cat([torch.zeros(B, 1, dtype=torch.int64), cuts], 1)
    return doc, pos - starts.gather(1, doc)


def _megastream_batch(ids, cuts):
    """One micro-batch as megastream's packed data path gives it (megastream/data/dataset.py): next-token
    targets, none across a document boundary (a document's last token has no target), and with several
    documents per row, per-document RoPE positions and document ids (engine attention_inputs: a document
    mask, dense for engine.attention: sdpa, block-sparse for flex)."""
    import torch

    from megastream.engine.engine import MicroBatch

    labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)
    if not cuts.shape[1]:
        return MicroBatch(ids, labels)
    labels.scatter_(1, cuts - 1, -100)
    doc, pos = _documents(cuts, ids.shape[1])
    return MicroBatch(ids, labels, pos, doc)


def _hf_batch(ids, cuts, device) -> dict:
    """The same micro-batch for a transformers model (DeepSpeed, FSDP2 rows): labels are shifted inside
    the model, so a document's first token is not a target; with several documents per row, per-document
    position_ids (RoPE restarts, as in megastream) and a 4-D boolean mask, causal within each document
    (megastream.model.llama.document_mask, the mask megastream's sdpa path uses), which transformers
    passes to SDPA as it is -- the same masked attention as megastream:<mode> without flex."""
    from megastream.model.llama import document_mask

    labels = ids.clone()
    if not cuts.shape[1]:
        return {"input_ids": ids.to(device), "labels": labels.to(device)}
    labels.scatter_(1, cuts, -100)
    doc, pos = _documents(cuts, ids.shape[1])
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device),
            "attention_mask": document_mask(doc.to(device))}


def _digest(batches) -> str:
    """sha256 over every micro-batch's ids and then its document boundaries (none with one document a
    row, so such a digest is the ids' alone, as before --docs-per-row)."""
    h = hashlib.sha256()
    for ids, cuts in batches:
        h.update(ids.contiguous().numpy().tobytes())
        h.update(cuts.contiguous().numpy().tobytes())
    return h.hexdigest()


def _timed(a, step) -> dict:
    """Run warm-up + timed steps of `step()` (which must end synchronised and return the loss)."""
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t
        losses.append(loss)
        if i >= a.warmup:
            times.append(dt)
        # progress in the row's log (flushed): a row stopped at its timeout shows how far it got
        print(f"{'warm-up' if i < a.warmup else 'timed'} step {i + 1}/{a.warmup + a.steps}: {dt:.3f} s, "
              f"loss {loss:.4f}", flush=True)
    return {"step_times_s": times, "losses": losses, "warmup_steps": a.warmup}


def megastream_config(a, mode: str):
    """The megastream Config a run of this harness uses for `mode`: full | lean | compact, with its
    variants after it ("full+flex+clip-previous": VARIANTS' settings applied over the row's own)."""
    from megastream.config import build_config
    from megastream.resolve import MODES as RESOLVE_MODES

    settings = variant_settings(f"megastream:{mode}")
    master, states = RESOLVE_MODES[mode.split("+")[0]]
    packed = getattr(a, "docs_per_row", 1) > 1
    raw = {
        # pack: false with one document a row -- every row is one full-length document (see the module
        # docstring): the engine runs plain causal attention, and the bound uses that attention rate.
        # With --docs-per-row > 1 the rows are packed (document masks), and the bound uses the masked rate.
        "model": {"preset": a.model}, "data": {"path": str(REPO / "megastream" / "demo" / "corpus.jsonl"),
                                               "seq_len": a.seq_len, "pack": "bfd" if packed else False},
        "train": {"micro_batch_size": a.micro_batch_size, "grad_accum": a.grad_accum, "lr": HYPER["lr"],
                  "grad_clip": HYPER["grad_clip"], "weight_decay": HYPER["weight_decay"]},
        "optim": {"master": master, "states": states, "betas": list(HYPER["betas"]), "eps": HYPER["eps"]},
        "engine": {"device": a.device, "gpu_memory_gb": a.gpu_memory_gb, "activations": a.activations,
                   "dtype": _compute(a)},
    }
    for key, value in settings.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return build_config(raw)


def _compute(a) -> str:
    """The compute dtype of every system: bf16 on a GPU; fp32 on the CPU (a smoke test, where bf16
    matmuls are emulated and slow)."""
    return "bfloat16" if a.device == "cuda" else "float32"


def _label(system: str, device: str) -> str:
    """A row's precision label; a variant row's also names its settings ("...; engine.attention: flex")."""
    base = parse_system(system)[0]
    label = LABELS[base] if device == "cuda" else LABELS[base].replace("bf16 compute", "fp32 compute (CPU)")
    settings = variant_settings(system)
    return label + (f"; {_settings_text(settings)}" if settings else "")


def worker_megastream(a, mode: str) -> dict:
    import warnings

    import torch

    from megastream import ops
    from megastream.engine.engine import Engine
    from megastream.errors import ConfigError
    from megastream.plan import make_plan
    from megastream.resolve import check_model_inputs, model_spec, resolve_device
    from megastream.train import build_model, cap_gpu_memory

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = ops.have_ext()
    isa_fn = getattr(ops, "cpu_isa", None)
    info = {"ops_built": built, "cpu_isa": isa_fn() if isa_fn else None}
    if not built and not a.allow_reference_ops:
        why = "; ".join(str(w.message) for w in caught) or "MEGASTREAM_NO_EXT is set or the build failed"
        raise NotRun(f"megastream's C++ optimizer ops are not built ({why[:300]}): the pure-PyTorch fallback "
                     "would be timed instead (--allow-reference-ops to time it anyway, labelled)")
    cfg = megastream_config(a, mode)
    device = resolve_device(cfg)
    cap_gpu_memory(cfg, device)
    spec = model_spec(cfg)
    try:  # what `megastream train` refuses for this model and device (flex on the CPU, say)
        check_model_inputs(cfg, spec, log=lambda *_: None)
    except ConfigError as e:
        raise NotRun(str(e)) from e
    t0 = time.perf_counter()
    model = build_model(cfg, spec, device)
    init_s = time.perf_counter() - t0
    print(f"init: {init_s:.1f} s (host store, random weights, pinning)", flush=True)
    # the loss chunk `megastream train` runs with: on CUDA the plan's, grown into the free GPU memory
    chunk = make_plan(cfg, spec).budget.chunk_tokens if device.type == "cuda" else None
    engine = Engine(spec, model.store, cfg, device, chunk_tokens=chunk)
    batches = _batches(a, spec.vocab_size)
    mbs = [_megastream_batch(ids, cuts) for ids, cuts in batches]

    def step():
        return engine.step(mbs, HYPER["lr"]).loss  # ends with a device sync; updates overlap the next forward

    out = _timed(a, step)
    engine.worker.wait_all()
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    out.update(info, params=model.store.numel, init_s=init_s, data_sha256=_digest(batches),
               state_bytes_per_param=model.store.state_bytes_per_param(),
               config={"engine.attention": cfg.engine.attention, "engine.compile": cfg.engine.compile,
                       "optim.clip": cfg.optim.clip, "data.pack": cfg.data.pack,
                       **{k: _get(cfg, k) for k in variant_settings(f"megastream:{mode}")}},
               loss_tokens=sum(int((mb.labels != -100).sum()) for mb in mbs))
    if a.profile and device.type == "cuda":
        from megastream.profiling import profile_steps

        _profile_into(a, out, lambda: profile_steps(engine, mbs, HYPER["lr"], steps=a.profile_steps))
    engine.close()
    model.store.close()
    return out


def _profile_into(a, out: dict, profile) -> None:
    """out["overlap"] = profile(), after writing the row's timed steps (a profile stopped at the row's
    timeout does not lose them); a profiler that fails (CUPTI, say) costs the overlap figures, not the
    row's throughput: out["overlap_error"] says why."""
    _write_result(a, {"status": "ok", **out, "profile": "started, not finished (the row's timeout)"})
    t0 = time.perf_counter()
    try:
        out["overlap"] = profile()
    except Exception as e:
        out["overlap_error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
    print(f"profile: {a.profile_steps} steps in {time.perf_counter() - t0:.1f} s"
          + (f" ({out['overlap_error']})" if "overlap_error" in out else ""), flush=True)


def _settings_text(settings: dict) -> str:
    """{"engine.attention": "flex", "engine.compile": True} -> "engine.attention: flex, engine.compile: true"."""
    return ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())


def _get(cfg, key: str):
    """A dotted setting of a megastream Config ("engine.attention")."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _hf_config(a):
    import transformers

    from megastream.presets import PRESETS

    d = PRESETS[a.model].to_hf_config("bfloat16")
    d.pop("architectures", None)
    d.pop("torch_dtype", None)
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    return cfg


def _dist_env() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)


def _hf_loss_tokens(batches) -> int:
    """Tokens with a target in the step (transformers shifts the labels: the first of each row has none)."""
    return sum(int((kw["labels"][:, 1:] != -100).sum()) for kw in batches)


def worker_deepspeed(a) -> dict:
    if a.device != "cuda":
        raise NotRun("DeepSpeed ZeRO-3 offload needs CUDA")
    if importlib.util.find_spec("deepspeed") is None:
        raise NotRun("deepspeed is not installed (bash scripts/gpu_wheels.sh brings it as a wheel)")
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import deepspeed
    import torch
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    t0 = time.perf_counter()
    try:  # built once, before the timed rows, by gpu_acceptance.sh; a cache hit here
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()
    except Exception as e:
        raise NotRun(f"DeepSpeed's CPU Adam did not build: {type(e).__name__}: {str(e).strip()[:400]}") from e
    build_s = time.perf_counter() - t0
    _dist_env()
    _cap_gpu(a)
    deepspeed.init_distributed(dist_backend="nccl")
    ds = {
        "train_micro_batch_size_per_gpu": a.micro_batch_size, "gradient_accumulation_steps": a.grad_accum,
        "bf16": {"enabled": True}, "gradient_clipping": HYPER["grad_clip"],
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                              "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "overlap_comm": True, "contiguous_gradients": True},
        "optimizer": {"type": "AdamW", "params": {"lr": HYPER["lr"], "betas": list(HYPER["betas"]),
                                                  "eps": HYPER["eps"], "weight_decay": HYPER["weight_decay"]}},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    hf = _hf_config(a)
    t0 = time.perf_counter()
    dschf = HfDeepSpeedConfig(ds)  # noqa: F841 -- kept alive: from_config builds under zero.Init
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    print(f"init: the model under zero.Init in {time.perf_counter() - t0:.1f} s", flush=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    init_s = time.perf_counter() - t0
    print(f"init: deepspeed.initialize done, {init_s:.1f} s in all", flush=True)
    basic = type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__
    if basic != "DeepSpeedCPUAdam":
        raise NotRun(f"DeepSpeed chose {basic} for the offloaded optimizer, not DeepSpeedCPUAdam")
    cpu_batches = _batches(a, hf.vocab_size)
    batches = [_hf_batch(ids, cuts, "cuda") for ids, cuts in cpu_batches]

    def step():
        total = torch.zeros((), device="cuda")
        for kw in batches:  # DeepSpeed steps the optimizer at the accumulation boundary
            loss = engine(**kw).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        torch.cuda.synchronize()
        return float(total) / len(batches)

    out = _timed(a, step)
    out.update(params=sum(p.ds_numel for p in model.parameters()), init_s=init_s, cpu_adam_load_s=build_s,
               optimizer=basic, peak_gpu_bytes=torch.cuda.max_memory_allocated(), data_sha256=_digest(cpu_batches),
               deepspeed_version=deepspeed.__version__, loss_tokens=_hf_loss_tokens(batches))
    return out


@contextlib.contextmanager
def _params_on_meta():
    """Build a module's parameters on the meta device (no memory, no init cost) and its buffers for real:
    a rotary embedding computes its inv_freq in __init__, which `to_empty` could not give back."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a meta one is kept: tying re-registers it
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_fp32_hf(hf, shard, storage: str, draw_on: str):
    """transformers' fp32 model of `hf`, built on the meta device, passed to `shard` (FSDP2's wrapping),
    then given its storage on `storage` and filled as transformers initialises it, drawn on `draw_on`.
    The buffers (rotary inv_freq) were computed for real at construction; `to_empty` would leave them
    uninitialised, so they are put back."""
    import torch
    import transformers

    with _params_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    shard(model)
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # parameters keep their identity: tying holds
    try:
        model.to_empty(device=storage)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    _init_like_hf(model, hf.initializer_range, draw_on)
    return model


def _init_like_hf(model, std: float, device: str) -> None:
    """Fill a model's parameters as transformers initialises these decoders (matrices ~ N(0, std), norm
    weights 1, biases 0), drawing on `device` (seeded 0) and copying into each parameter's storage; for
    an FSDP2 model of one rank the local shard is the whole tensor."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if name.endswith("bias"):
                local.zero_()
            elif p.dim() == 1:
                local.fill_(1.0)
            else:  # drawn where it is fast, then one copy into the (pinned) host storage
                local.copy_(torch.empty(local.shape, device=device).normal_(0.0, std, generator=gen))


def worker_fsdp2(a) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    _dist_env()
    cuda = a.device == "cuda"
    _cap_gpu(a)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(0)
    hf = _hf_config(a)
    t0 = time.perf_counter()
    # Built without memory (parameters on the meta device), sharded, then given its fp32 storage (the
    # master, pinned by FSDP2 under its offload policy) and filled: transformers' own init draws every
    # weight with the host's serial generator, ~11 ns/param (about a minute for 3B on the GPU's host,
    # most of the row's timeout in the first run); drawn on the GPU it costs one D2H copy.
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=getattr(torch, _compute(a)), reduce_dtype=torch.float32)}
    if cuda:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)

    def shard(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)

    # offloaded: the sharded params live on the host (the CPU's run: where it computes)
    model = build_fp32_hf(hf, shard, storage="cpu" if cuda else a.device, draw_on=a.device)
    print(f"init: the fp32 model built, sharded and filled in {time.perf_counter() - t0:.1f} s", flush=True)
    if cuda:  # buffers (rotary inv_freq) are not FSDP's: put them where compute runs
        for mod in model.modules():
            for name, buf in list(mod.named_buffers(recurse=False)):
                mod.register_buffer(name, buf.cuda(), persistent=False)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
                                weight_decay=HYPER["weight_decay"], fused=True)
    except (RuntimeError, TypeError, ValueError) as e:  # never fall back to the slower for-each AdamW
        raise NotRun(f"torch.optim.AdamW(fused=True) refused the offloaded parameters: {e}") from e
    init_s = time.perf_counter() - t0
    print(f"init: sharded, offloaded and the optimizer built, {init_s:.1f} s in all", flush=True)
    cpu_batches = _batches(a, hf.vocab_size)
    batches = [_hf_batch(ids, cuts, a.device) for ids, cuts in cpu_batches]

    def step():
        total = torch.zeros((), device=a.device)
        for kw in batches:
            loss = model(**kw).loss / len(batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(total)

    out = _timed(a, step)
    out.update(params=sum(p.numel() for p in model.parameters()), init_s=init_s, fused_adamw=True,
               data_sha256=_digest(cpu_batches), loss_tokens=_hf_loss_tokens(batches))
    if cuda:
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    dist.destroy_process_group()
    return out


def worker_roofline(a) -> dict:
    import torch

    from megastream.probe import run_probe

    cuda = a.device == "cuda"
    small = a.dry_run or not cuda
    # the dry run: toy sizes (quick: the probe's smallest shapes); it checks the plumbing, it measures nothing
    # each rate printed as it is measured (flushed): a roofline child stopped at its timeout shows how far it got
    rec = run_probe(torch.device(a.device), log=lambda *m: print(*m, flush=True), quick=a.dry_run,
                    # on CUDA 64M params: 1.8 GB of full-mode state, past any cache
                    optimizer_params=2**18 if a.dry_run else 2**20 if small else 64 * 2**20,
                    host_bytes=2**24 if a.dry_run else 2**26 if small else 2**30)
    return {"h2d_gbps": 0.0, "d2h_gbps": 0.0} | rec


def run_worker(a) -> None:
    """Subprocess entry: run one system, write its result (or its failure) as JSON to a.out."""
    res: dict = {"status": "ok"}
    try:
        if a.worker == "roofline":
            res.update(worker_roofline(a))
        elif a.worker.startswith("megastream:"):
            res.update(worker_megastream(a, a.worker.split(":", 1)[1]))
        elif a.worker == "deepspeed":
            res.update(worker_deepspeed(a))
        elif a.worker == "fsdp2":
            res.update(worker_fsdp2(a))
        else:
            raise ValueError(f"unknown system {a.worker}")
    except NotRun as e:
        res = {"status": "not-run", "message": str(e)[:600]}
    except BaseException as e:  # classify, never crash the harness
        import torch

        text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        oom_gpu = isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e)
        res = {"status": "oom-gpu" if oom_gpu else "oom-host" if isinstance(e, MemoryError) else "error",
               "message": text[:500], "traceback": traceback.format_exc()[-3000:]}
    _write_result(a, res)


def _write_result(a, res: dict) -> None:
    """The row's result for the harness (a.out), with this process's peak host memory; written whole
    (temp file, then rename), also as a partial result before a profile the timeout may cut short."""
    from megastream.machine import peak_rss

    res = dict(res, peak_host_bytes=peak_rss(),  # VmHWM of this process (/proc/self/status)
               peak_host_source="VmHWM, /proc/self/status at the end of the row")
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(a.out)


# ---- the harness -----------------------------------------------------------------------------------
_RUNNING: set[int] = set()  # process groups of the rows running now (each row is its own session)


def _stop_rows(signum, frame) -> None:
    """SIGTERM / SIGINT of the harness (an outer `timeout`, Ctrl-C): end the rows it started, then
    itself. Each row runs in its own session, out of reach of a signal to the harness's group: on the
    first H200 run a row outlived the harness killed by gpu_acceptance.sh's step timeout, and went on
    using the GPU and the host's cores under the next step's measurements."""
    for pgid in list(_RUNNING):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _rows_stop_with_the_harness():
    """_stop_rows on SIGTERM and SIGINT while the rows run (the main thread only); then the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _stop_rows) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _spawn(a, system: str, tmp: Path, timeout: float) -> dict:
    """Run one row in its own process, under its own timeout, polling its VmHWM while it runs."""
    name = system.replace(":", "_")
    out = tmp / f"{name}.json"
    log_dir = Path(a.logs) if a.logs else tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    cmd = [sys.executable, __file__, "--worker", system, "--out", str(out)] + a.passthrough
    cmd += getattr(a, "row_args", {}).get(system, [])  # --warmups: the last --warmup wins
    t = time.perf_counter()
    polled, timed_out = 0, False
    with open(log, "w") as f:
        # its own process group, so that a timeout also ends what it started (a compiler, ninja)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        _RUNNING.add(proc.pid)
        while proc.poll() is None:
            polled = max(polled, vm_hwm(proc.pid) or 0)
            if time.perf_counter() - t > timeout:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                timed_out = True
                break
            time.sleep(0.2)
        rc = proc.wait()
        _RUNNING.discard(proc.pid)
    text = log.read_text(errors="replace")
    if out.exists():  # its result; after a timeout, what it wrote before it (the timed steps, not the profile)
        res = json.loads(out.read_text())
        if timed_out:
            res["timed_out"] = f"after its result was written, at its {timeout:g} s timeout"
    elif timed_out:
        res = {"status": "timeout", "message": f"timed out after {timeout:g} s (its own timeout)"}
    elif rc in (-9, 137):  # SIGKILL without a result: the kernel's OOM killer
        res = {"status": "oom-host", "message": "killed (SIGKILL), most likely by the kernel's OOM killer"}
    else:
        tail = text.strip().splitlines()[-1:] or [f"exit {rc}"]
        res = {"status": "error", "message": tail[0][:500]}
    if "peak_host_bytes" not in res and polled:
        res["peak_host_bytes"] = polled
        res["peak_host_source"] = "VmHWM, /proc/<pid>/status polled every 0.2 s while the row ran"
    res["wall_s"] = time.perf_counter() - t
    res["timeout_s"] = timeout
    if res["status"] != "ok" and text:
        res["output_tail"] = text[-2000:]
    return res


def _timeouts(a) -> dict[str, float]:
    return _per_row(a.timeouts, "--timeouts", "SECONDS", float, roofline=True)


def _per_row(items: list[str], flag: str, what: str, cast, roofline: bool = False) -> dict:
    """NAME=VALUE items (--timeouts, --warmups) -> {NAME: VALUE}; NAME is any row name (variants too)."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not (roofline and name == "roofline"):
            try:
                parse_system(name)
            except ValueError as e:
                raise SystemExit(f"{flag} {item!r}: " + ("NAME is a row or roofline; " if roofline else "")
                                 + str(e)) from None
        try:
            out[name] = cast(value)
        except ValueError:
            raise SystemExit(f"{flag} {item!r}: expected NAME={what}") from None
    return out


def _host_need(a, system: str, n: int) -> float:
    """Host bytes a row needs (estimate), for the fits-in-RAM check before it is spawned."""
    if system.startswith("megastream:"):
        import torch

        from megastream.memory import budget
        from megastream.presets import PRESETS
        from megastream.resolve import resolve_dtypes

        cfg = megastream_config(a, system.split(":", 1)[1])
        compute, grad = resolve_dtypes(cfg, torch.device(a.device))
        return budget(cfg, PRESETS[a.model], a.device, compute, grad, int(0.5e9)).host_total
    return n * BASELINE_HOST_BYTES[system] + HOST_OVERHEAD


def _precheck(a, system: str, n: int) -> str | None:
    """Why `system` cannot run here, decided without a subprocess (or None)."""
    if system.startswith("megastream:"):  # what `megastream train` refuses (flex on the CPU, say)
        from megastream.errors import ConfigError
        from megastream.presets import PRESETS
        from megastream.resolve import check_model_inputs

        try:
            check_model_inputs(megastream_config(a, system.split(":", 1)[1]), PRESETS[a.model], log=lambda *_: None)
        except ConfigError as e:
            return str(e)
    if system == "deepspeed":
        if a.device != "cuda":
            return "DeepSpeed ZeRO-3 offload needs CUDA"
        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed (bash scripts/gpu_wheels.sh brings it as a wheel)"
    need = _host_need(a, system, n)
    if need > 0.95 * a.host_ram_gb * 1e9:
        return (f"needs ~{need / 1e9:.0f} GB of host RAM (estimate), over 95% of this host's {a.host_ram_gb:.0f} GB "
                "(--host-ram-gb)")
    return None


def _apply_dry_run(a) -> None:
    a.device, a.model, a.seq_len, a.micro_batch_size, a.grad_accum = "cpu", "tiny", 32, 2, 2
    a.steps, a.warmup, a.gpu_memory_gb, a.profile = 1, 0, 0.0, False
    a.timeout = min(a.timeout, 120)
    a.jobs = a.jobs or 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-3b", help="a megastream preset (megastream/presets.py)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per system")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row before the timed ones")
    ap.add_argument("--warmups", nargs="*", default=[], metavar="NAME=N",
                    help="per-row warm-up steps, e.g. megastream:full+compile=2 (its compilation stays untimed)")
    ap.add_argument("--docs-per-row", type=int, default=1, metavar="N",
                    help="split every row into N documents at seeded random boundaries, the same for every system "
                         "(megastream: its packed rows' document mask; transformers: per-document position_ids and "
                         "a 4-D document mask); 1: one full-length document a row, plain causal attention")
    ap.add_argument("--gpu-memory-gb", type=float, default=24.0, help="cap per process (0: the whole GPU)")
    ap.add_argument("--activations", choices=["device", "host"], default="device", help="megastream only")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--systems", nargs="+", default=None, type=_system_arg, metavar="ROW",
                    help=f"rows, in order (default: {' '.join(ALL_SYSTEMS)}; {HEADLINE} is always added: the "
                         f"headline): {', '.join(BASELINES)} or megastream:<mode>[+<variant>...], mode one of "
                         f"{', '.join(MODES)}, variants "
                         f"{', '.join(f'{k} ({_settings_text(v)})' for k, v in VARIANTS.items())}"
                         " -- a variant row is its base row with those settings, and its tokens/s over its base "
                         "row's is printed when both ran")
    ap.add_argument("--profile", action="store_true", help="also profile megastream's overlap (torch.profiler)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row unless --timeouts names it")
    ap.add_argument("--timeouts", nargs="*", default=[], metavar="NAME=S",
                    help="per-row timeouts, e.g. deepspeed=300 megastream:full=120 megastream:full+flex=90 roofline=60")
    ap.add_argument("--carry-over", action="store_true",
                    help="the seconds a row leaves of its timeout go to the next row's (a fixed total for all rows)")
    ap.add_argument("--host-ram-gb", type=float, default=None,
                    help="host RAM the rows may use (default: MemTotal); a row predicted above it is not-run")
    ap.add_argument("--allow-reference-ops", action="store_true",
                    help="time megastream with the pure-PyTorch optimizer if its C++ ops do not build (labelled)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="rows at a time, --device cpu only (a harness check: the timings mean nothing); default 1, "
                         "2 with --dry-run")
    ap.add_argument("--logs", default=None, help="keep each row's output as DIR/<row>.log")
    ap.add_argument("--dry-run", action="store_true",
                    help="the CPU, the tiny model, every row, both bounds: checks the harness, measures nothing")
    ap.add_argument("--rates-from", default=None, metavar="JSON",
                    help="reuse the rates (and device name) of an earlier run's --json on this machine: no roofline child")
    ap.add_argument("--check", action="store_true",
                    help="print the rows, their timeouts and whether each can run here (CUDA, DeepSpeed, host RAM), "
                         "then exit: no subprocess, no measurement")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        run_worker(a)
        return 0
    if a.dry_run:
        _apply_dry_run(a)
    a.systems = a.systems or list(ALL_SYSTEMS)
    a.jobs = a.jobs or 1
    if a.jobs > 1 and a.device != "cpu":
        ap.error("--jobs > 1 is for --device cpu only: rows timed side by side on a GPU would share it")
    if HEADLINE not in a.systems:
        a.systems = [HEADLINE] + a.systems
    a.systems = list(dict.fromkeys(a.systems))
    timeouts = _timeouts(a)
    a.row_args = {name: ["--warmup", str(n)] for name, n in _per_row(a.warmups, "--warmups", "STEPS", int).items()}
    try:
        _cuts(1, 1, a.seq_len, a.docs_per_row)
    except ValueError as e:
        ap.error(str(e))
    if a.host_ram_gb is None:
        import psutil

        a.host_ram_gb = psutil.virtual_memory().total / 1e9
    a.passthrough = ["--model", a.model, "--seq-len", str(a.seq_len), "--micro-batch-size", str(a.micro_batch_size),
                     "--grad-accum", str(a.grad_accum), "--steps", str(a.steps), "--warmup", str(a.warmup),
                     "--gpu-memory-gb", str(a.gpu_memory_gb), "--activations", a.activations, "--device", a.device,
                     "--profile-steps", str(a.profile_steps), "--docs-per-row", str(a.docs_per_row)]
    a.passthrough += ["--profile"] * a.profile + ["--dry-run"] * a.dry_run + ["--allow-reference-ops"] * a.allow_reference_ops

    # The parent makes no CUDA call: the device's name comes from the roofline child.
    from megastream.model.layout import count_params
    from megastream.presets import PRESETS

    spec = PRESETS[a.model]
    n = count_params(spec)
    tokens = a.micro_batch_size * a.grad_accum * a.seq_len
    rows_are = ("identical random full rows for every system" if a.docs_per_row == 1 else
                f"identical random rows of {a.docs_per_row} documents each, seeded boundaries, for every system")
    print(f"{a.model}: {n / 1e9:.2f}B params | {tokens} tokens/step = {a.micro_batch_size} x {a.grad_accum} x "
          f"{a.seq_len} ({rows_are}) | GPU cap {a.gpu_memory_gb:g} GB | "
          f"host {a.host_ram_gb:.0f} GB" + (" | DRY RUN: the CPU, a tiny model; no measurement" if a.dry_run else ""),
          flush=True)
    if a.docs_per_row == 1 and any("flex" in parse_system(s)[1] for s in a.systems):
        print("  note: with one document a row megastream runs plain causal attention: flex changes nothing "
              "(--docs-per-row N > 1 packs N documents a row)", flush=True)
    pre = {s: _precheck(a, s, n) for s in a.systems}

    def timeout_of(name: str) -> float:
        return timeouts.get(name, min(a.timeout, 300) if name == "roofline" else a.timeout)

    if a.check:
        rows = ([] if a.rates_from else ["roofline"]) + a.systems
        width = max(19, *map(len, rows))
        for s in rows:
            settings = variant_settings(s) if s != "roofline" else {}
            warm = a.row_args.get(s, ["", a.warmup])[1]
            print(f"  {s:<{width}} timeout {timeout_of(s):5.0f} s  " + (f"not-run: {pre[s]}" if pre.get(s) else "runs")
                  + (f"  [{_settings_text(settings)}]" if settings else "")
                  + (f"  (warm-up {warm} steps)" if s in a.row_args else ""))
        print(f"  at most {sum(timeout_of(s) for s in rows if not pre.get(s)):.0f} s in all")
        return 0
    with _rows_stop_with_the_harness(), tempfile.TemporaryDirectory() as tmp:
        slack = [0.0]  # --carry-over: seconds earlier rows left of their timeouts (sequential rows only)

        def spawn(name: str) -> dict:
            limit = timeout_of(name) + (slack[0] if a.carry_over and a.jobs == 1 else 0.0)
            r = _spawn(a, name, Path(tmp), limit)
            slack[0] = max(0.0, limit - r["wall_s"])
            r["own_timeout_s"] = timeout_of(name)
            return r

        if a.rates_from:  # an earlier run's rates on this machine: no roofline child
            prev = json.loads(Path(a.rates_from).read_text())
            roof = {"status": "ok", "device": prev["device"], "torch_version": prev.get("torch_version"),
                    **prev["rates"], "rates_from": a.rates_from}
        else:
            roof = spawn("roofline")  # first and alone: it also builds megastream's C++ ops, which the rows load
        todo = [s for s in a.systems if not pre[s]]
        if a.jobs > 1 and roof["status"] == "ok":  # the CPU only: rows side by side (the timings mean nothing)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(a.jobs) as pool:
                done = dict(zip(todo, pool.map(spawn, todo)))
            results = done.__getitem__
        else:
            results = spawn
        if roof["status"] != "ok":
            print(f"roofline measurement failed: {roof.get('message')}\n{roof.get('output_tail', '')}")
            return 1
        device = roof["device"]
        print(f"{device} | torch {roof.get('torch_version')} | roofline inputs: H2D {roof['h2d_gbps']:.1f} GB/s, "
              f"D2H {roof['d2h_gbps']:.1f} GB/s, {roof.get('matmul_dtype', '')} matmul "
              f"{roof['matmul_tflops']:.2f} TFLOP/s, attention masked/causal "
              + "/".join(f"{roof.get('attention_tflops', {}).get(k, 0):.2f}" for k in ("masked", "causal"))
              + f" TFLOP/s, host {roof['host_gbps']:.1f} GB/s, optimizer "
              + ", ".join(f"{k} {v:.2f}" for k, v in roof["optimizer_ns_per_param"].items()) + " ns/param", flush=True)
        rates = _rates_from(roof)
        bounds = {s: megastream_bounds(a, s.split(":", 1)[1], rates) for s in a.systems if s.startswith("megastream:")}
        for s, bd in bounds.items():
            i, t = bd["ideal"], bd["attainable"]
            if a.device != "cuda":
                terms = "the ideal (the CPU: one set of cores, the terms add)"
            elif "optim.clip: previous" in t["overlap"]:
                terms = (f"fwd {t['fwd_s']:.3g} + head {t['head_s']:.3g} + max(bwd {t['bwd_s']:.3g}, opt "
                         f"{t['opt_s']:.3g}) + tail {t['tail_s']:.3g}")
            else:
                terms = (f"max(opt {t['opt_s']:.3g}, fwd {t['fwd_s']:.3g}) + head {t['head_s']:.3g} + bwd "
                         f"{t['bwd_s']:.3g} + tail {t['tail_s']:.3g}")
            print(f"  bounds {s:<19} ideal {i['step_s']:.4g} s ({i['bound']}-bound) | attainable (plan's prediction) "
                  f"{t['step_s']:.4g} s = {terms}", flush=True)
        systems = []
        for system in a.systems:
            r = {"status": "not-run", "message": pre[system]} if pre[system] else results(system)
            systems.append(_row(a, system, r, n, tokens, roof, bounds.get(system)))
            _print_row(systems[-1])
            if a.json and system != a.systems[-1]:
                _write_json(a.json, _doc(a, device=device, roof=roof, n=n, tokens=tokens, systems=systems,
                                         bounds=bounds, partial=True))
    digests, loss_tokens = _data_identity(systems)
    if len(digests) > 1:
        print("ERROR: the systems trained on different data (data_sha256 differs)", flush=True)
    if len(loss_tokens) > 1:
        print(f"ERROR: the systems' losses count different tokens ({loss_tokens})", flush=True)
    headline = _print_ratios(systems)
    variants = _print_variant_ratios(systems)
    unmeasured = _unmeasured(a, systems, variants)
    if unmeasured:
        print("unmeasured step features:\n" + "\n".join(f"  {u}" for u in unmeasured), flush=True)
    if a.json:
        _write_json(a.json, _doc(a, device=device, roof=roof, n=n, tokens=tokens, systems=systems, bounds=bounds,
                                 headline=headline, variants=variants, unmeasured=unmeasured))
    return 0


def _doc(a, *, device: str, roof: dict, n: int, tokens: int, systems: list[dict], bounds: dict, headline=None,
         variants=None, unmeasured=None, partial: bool = False) -> dict:
    """The --json document: the run's setup, rates, bounds and rows (partial: the rows so far)."""
    import torch

    digests, loss_tokens = _data_identity(systems)
    doc = {"device": device, "date": datetime.date.today().isoformat(),
           "torch_version": roof.get("torch_version", torch.__version__), "model": a.model, "params": n,
           "tokens_per_step": tokens, "seq_len": a.seq_len, "micro_batch_size": a.micro_batch_size,
           "grad_accum": a.grad_accum, "gpu_memory_gb": a.gpu_memory_gb, "host_ram_gb": a.host_ram_gb,
           "dry_run": a.dry_run, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "data": {"kind": "random token ids, torch.Generator seeded 0, uniform over the vocabulary",
                    "rows": "full seq_len rows, one document per row: plain causal attention, no packing "
                            "masks, in every system (megastream data.pack: false; moot for such rows)"
                            if a.docs_per_row == 1 else
                            f"full seq_len rows of {a.docs_per_row} documents each, boundaries drawn by a "
                            "torch.Generator seeded 1 (every document >= 2 tokens), the same for every system: "
                            "RoPE positions restart at each document, attention stays within it (megastream: "
                            "its packed rows' document mask, data.pack: bfd; transformers: position_ids and "
                            "a 4-D boolean document mask), no target across a boundary",
                    "docs_per_row": a.docs_per_row,
                    "loss_tokens_per_row": a.seq_len - a.docs_per_row,
                    "sha256": digests[0] if len(digests) == 1 else digests or None,
                    "sha256_covers": "token ids and document boundaries",
                    "identical_for_all_systems": len(digests) <= 1 and len(loss_tokens) <= 1},
           "setup": {"gradient_checkpointing": "every decoder layer's input (recompute in backward)",
                     "optimizer": "AdamW", **{k: list(v) if isinstance(v, tuple) else v for k, v in HYPER.items()},
                     "attention": "SDPA, causal" if a.docs_per_row == 1 else
                     "SDPA with a dense document mask (megastream engine.attention: sdpa, the transformers "
                     "baselines); FlexAttention with a block-sparse one in megastream's +flex rows",
                     "compute_dtype": _compute(a)},
           "headline": headline, "variants": variants, "unmeasured": unmeasured, "systems": systems,
           "rates": {k: roof.get(k) for k in ("h2d_gbps", "d2h_gbps", "matmul_tflops", "matmul_dtype",
                                             "attention_tflops", "attention_tflops_by_shape", "host_gbps",
                                             "optimizer_ns_per_param", "threads")},
           "rates_source": roof.get("rates_from") or "measured in this run (the roofline child)",
           "bounds": bounds,
           "roofline": _roofline_summary(roof, systems)}
    if partial:
        doc["partial"] = ("the rows run so far: written after each row, so that a run stopped before its end "
                          "(an outer timeout) keeps them; the headline and ratios come with the last row")
    return doc


def _data_identity(systems: list[dict]) -> tuple[list[str], list[int]]:
    """The distinct data hashes and loss-token counts the rows report (one of each: the same work)."""
    return (sorted({s["data_sha256"] for s in systems if s.get("data_sha256")}),
            sorted({s["loss_tokens"] for s in systems if s.get("loss_tokens")}))


def _write_json(path: str, doc: dict) -> None:
    """Whole or not at all: a temp file, then a rename."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def _row(a, system: str, r: dict, n: int, tokens: int, roof: dict, bound: dict | None) -> dict:
    mega = system.startswith("megastream:")
    base, variants = parse_system(system)
    row = {"name": system, "status": r["status"], "message": r.get("message"), "precision": _label(system, a.device),
           "base": base, "variants": list(variants), "settings": variant_settings(system),
           "state_bytes_per_param": (bound or {}).get("state_bytes_per_param") if mega else BASELINE_STATE_BYTES[system],
           "same_arithmetic_as_headline": system in (HEADLINE, *BASELINES),
           "arithmetic": FULL_ARITHMETIC if system in (HEADLINE, *BASELINES) else _label(system, a.device),
           "peak_host_gb": r["peak_host_bytes"] / 1e9 if r.get("peak_host_bytes") else None,
           "peak_host_source": r.get("peak_host_source"),
           "peak_gpu_gb": r["peak_gpu_bytes"] / 1e9 if "peak_gpu_bytes" in r else None,
           "wall_s": r.get("wall_s"), "timeout_s": r.get("own_timeout_s", r.get("timeout_s")),
           "limit_s": r.get("timeout_s")}
    for k in ("ops_built", "cpu_isa", "init_s", "losses", "data_sha256", "loss_tokens", "warmup_steps", "config",
              "optimizer", "cpu_adam_load_s", "fused_adamw", "deepspeed_version", "overlap", "overlap_error",
              "profile", "timed_out", "peak_gpu_bytes", "output_tail", "traceback"):
        if k in r:
            row[k] = r[k]
    if mega and "state_bytes_per_param" in r:
        row["state_bytes_per_param"] = r["state_bytes_per_param"]
    if r["status"] == "ok":
        times = r["step_times_s"]
        med = statistics.median(times)
        row.update(tokens_per_s=tokens / med, step_s=med, step_times_s=times,
                   step_spread=max(abs(t / med - 1) for t in times), tflops=6 * n * tokens / med / 1e12)
        row["mfu"] = row["tflops"] / roof["matmul_tflops"]
        if bound:
            ideal, att = bound["ideal"]["step_s"], bound["attainable"]["step_s"]
            row.update(ideal_s=ideal, ideal_bound=bound["ideal"]["bound"], ideal_fraction=ideal / med,
                       attainable_s=att, attainable_fraction=att / med,
                       bound_s=ideal, bound=bound["ideal"]["bound"], achieved_fraction=ideal / med)
    else:
        row.update(tokens_per_s=None, tflops=None, mfu=None)
    return row


def _roofline_summary(roof: dict, systems: list[dict]) -> dict:
    mega = [s for s in systems if s.get("ideal_s")]
    best = max(mega, key=lambda s: s["tokens_per_s"]) if mega else None
    return {"h2d_gbps": roof["h2d_gbps"], "d2h_gbps": roof["d2h_gbps"], "matmul_tflops": roof["matmul_tflops"],
            "host_gbps": roof["host_gbps"], "optimizer_ns_per_param": roof["optimizer_ns_per_param"],
            "best": best["name"] if best else None,
            "bound_s": best["ideal_s"] if best else None, "achieved_fraction": best["ideal_fraction"] if best else None,
            "attainable_s": best["attainable_s"] if best else None,
            "attainable_fraction": best["attainable_fraction"] if best else None}


def _print_row(r: dict) -> None:
    mem = (f"GPU {r['peak_gpu_gb']:.2f} GB, " if r.get("peak_gpu_gb") else "") + \
        (f"host {r['peak_host_gb']:.2f} GB" if r.get("peak_host_gb") else "")
    spb = f"{r['state_bytes_per_param']:.2f} B/param" if r.get("state_bytes_per_param") else "? B/param"
    ops = ""
    if "ops_built" in r:
        ops = f" | C++ ops {'built, ' + str(r.get('cpu_isa')) if r['ops_built'] else 'NOT built'}"
    head = f"  {r['name']:<19} [{r['precision']}; {spb}{ops}]"
    if r["status"] != "ok":
        print(f"{head}\n      {r['status']}: {r.get('message')}" + (f" ({mem})" if mem else ""), flush=True)
        return
    line = (f"{head}\n      {r['tokens_per_s']:10,.0f} tok/s  {r['tflops']:8.3f} TFLOP/s  MFU {r['mfu']:6.1%}  "
            f"step {r['step_s']:.3f} s (spread {r['step_spread']:.0%})  {mem}")
    if "ideal_s" in r:
        line += (f"\n      bounds: ideal {r['ideal_s']:.3g} s ({r['ideal_bound']}), {r['ideal_fraction']:.0%} of it "
                 f"achieved | attainable (plan's prediction) {r['attainable_s']:.3g} s, {r['attainable_fraction']:.0%} "
                 f"of it achieved: plan/measured {r['attainable_fraction']:.2f}")
    if "overlap" in r:
        o = r["overlap"]
        line += (f"\n      overlap: compute busy {o['compute_busy_fraction']:.0%} of the GPU timeline; H2D "
                 f"{o['h2d_hidden_s']:.3f} of {o['h2d_s']:.3f} s hidden under compute "
                 f"({o['h2d_hidden_fraction']:.0%}), D2H {o['d2h_hidden_s']:.3f} of {o['d2h_s']:.3f} s "
                 f"({o['d2h_hidden_fraction']:.0%})")
    print(line, flush=True)


def _print_ratios(systems: list[dict]) -> dict:
    """Headline: megastream:full against each baseline (same arithmetic); the other modes beside it
    (variant rows are set against their base rows instead: _print_variant_ratios)."""
    ok = {s["name"]: s for s in systems if s["status"] == "ok"}
    out = {}
    for mode in [HEADLINE] + [s for s in ok if s.startswith("megastream:") and s != HEADLINE and "+" not in s]:
        for base in BASELINES:
            key = f"{mode} / {base}"
            if mode in ok and base in ok:
                out[key] = ok[mode]["tokens_per_s"] / ok[base]["tokens_per_s"]
                note = "same arithmetic: the headline" if mode == HEADLINE else "different precision, beside it"
                print(f"{key}: {out[key]:.2f}x tokens/s ({note})", flush=True)
            elif mode == HEADLINE:
                out[key] = None
                if any(s["name"] == base for s in systems):  # a baseline the run left out is not news
                    why = [f"{x} {systems_status(systems, x)}" for x in (mode, base) if x not in ok]
                    print(f"{key}: no ratio ({', '.join(why)})", flush=True)
    return out


def _short(name: str) -> str:
    return name.split(":", 1)[1] if name.startswith("megastream:") else name


def _print_variant_ratios(systems: list[dict]) -> dict:
    """Before/after: each variant row's tokens/s over its base row's (same mode, no variant), e.g.
    `full+flex / full = 1.18x`; a pair where either row did not run gets None and says why."""
    ok = {s["name"]: s for s in systems if s["status"] == "ok"}
    out = {}
    for s in systems:
        if not s.get("variants"):
            continue
        key = f"{_short(s['name'])} / {_short(s['base'])}"
        settings = _settings_text(s["settings"])
        if s["name"] in ok and s["base"] in ok:
            ratio = ok[s["name"]]["tokens_per_s"] / ok[s["base"]]["tokens_per_s"]
            print(f"{key} = {ratio:.2f}x tokens/s ({settings})", flush=True)
        else:
            ratio = None
            why = [f"{x} {systems_status(systems, x)}" for x in (s["name"], s["base"]) if x not in ok]
            print(f"{key}: no ratio ({', '.join(why)})", flush=True)
        out[key] = {"ratio": ratio, "variant": s["name"], "base": s["base"], "settings": s["settings"],
                    "step_s": [ok[x]["step_s"] if x in ok else None for x in (s["name"], s["base"])]}
    return out


def _unmeasured(a, systems: list[dict], variants: dict) -> list[str]:
    """What this run leaves unmeasured: each variant row without a ratio (and why), and each feature in
    VARIANTS that no row of this run tried."""
    out = []
    for key, v in variants.items():
        if v["ratio"] is None:
            row = next(s for s in systems if s["name"] == v["variant"])
            base = next((s for s in systems if s["name"] == v["base"]), None)
            why = (row.get("message") if row["status"] != "ok" else
                   (base or {}).get("message") or "its base row did not run")
            out.append(f"{key} ({_settings_text(v['settings'])}): {row['status']}"
                       + (f" / base {base['status']}" if base and base["status"] != "ok" else "")
                       + f": {(why or '')[:200]}")
    tried = {x for s in systems for x in s.get("variants", [])}
    for name, settings in VARIANTS.items():
        if name not in tried:
            out.append(f"{name} ({_settings_text(settings)}): no row of this run has it")
    if a.docs_per_row == 1 and "flex" in tried:
        out.append("flex with one document a row (--docs-per-row 1) runs plain causal attention: measured nothing "
                   "of the block-sparse mask")
    return out


def systems_status(systems: list[dict], name: str) -> str:
    return next((s["status"] for s in systems if s["name"] == name), "not in this run")


if __name__ == "__main__":
    sys.exit(main())
