"""The GPU memory model is a maximum over the phases of a step (forward of one layer, loss chunk,
backward of one layer), each the sum of what is alive then, on top of the persistent buffers; and
`plan` says the GPU figure is unverified until a CUDA allocator has measured it. Budgets for cuda
are computed here on the CPU: nothing is allocated."""

import json
from dataclasses import replace

import torch

from helpers import REPO, run_cli
from megastream import memory
from megastream.config import load_config
from megastream.machine import Machine
from megastream.presets import PRESETS

DEMO = REPO / "configs" / "demo.yaml"
BIG = REPO / "configs" / "qwen2.5-14b-24gb.yaml"
UNVERIFIED = "unverified (not yet measured on a CUDA allocator)"


def _budget(preset="qwen2.5-0.5b", *sets, spec=None, dtype=torch.bfloat16, device="cuda"):
    cfg = load_config(DEMO, [f"model.preset={preset}", f"engine.device={device}", "data.pack=false", *sets])
    return memory.budget(cfg, spec or PRESETS[preset], device, dtype, dtype, 0)


def test_gpu_total_is_the_persistent_buffers_plus_the_largest_phase():
    for b in (_budget("qwen2.5-0.5b", "data.seq_len=512", "train.micro_batch_size=4", "train.grad_accum=2"),
              _budget("qwen2.5-14b", "data.seq_len=1024", "train.micro_batch_size=4", "train.grad_accum=4")):
        persistent = sum(b.device_persistent.values())
        totals = {k: persistent + sum(v.values()) for k, v in b.phases.items()}
        assert set(totals) == {memory.PHASE_FORWARD, memory.PHASE_LOSS, memory.PHASE_BACKWARD}
        assert b.phase_totals == totals
        assert b.gpu_total == max(totals.values()) == totals[b.peak_phase]
        assert b.gpu == b.device_persistent | b.phases[b.peak_phase]  # a reader can sum the parts
        assert sum(b.gpu.values()) == b.gpu_total
        # Not the sum of every term: each phase's own transients are counted once, in their phase.
        every_term = persistent + sum(v for p in b.phases.values() for v in p.values())
        assert b.gpu_total < every_term


def test_the_peak_phase_follows_the_shapes():
    # A big vocabulary and few tokens per micro-batch: the fp32 logits chunk is the largest transient.
    small = _budget("qwen2.5-0.5b", "data.seq_len=512", "train.micro_batch_size=4", "train.grad_accum=2")
    assert small.peak_phase == memory.PHASE_LOSS
    # The same model with 16 x 2048 tokens per micro-batch: recomputing one layer outgrows the chunk,
    # which is bounded by its token count however long the micro-batch.
    many = _budget("qwen2.5-0.5b", "data.seq_len=2048", "train.micro_batch_size=16", "train.grad_accum=1")
    assert many.peak_phase == memory.PHASE_BACKWARD
    assert many.phases[memory.PHASE_LOSS]["logits chunk"] == small.phases[memory.PHASE_LOSS]["logits chunk"]
    # A big hidden size at a moderate token count: backward.
    big = _budget("qwen2.5-14b", "data.seq_len=1024", "train.micro_batch_size=4", "train.grad_accum=4")
    assert big.peak_phase == memory.PHASE_BACKWARD
    # Long sequences with a huge vocabulary and the whole sequence as one loss chunk: the loss.
    spec = replace(PRESETS["tiny"], vocab_size=262_144)
    long = _budget("tiny", "data.seq_len=8192", "train.micro_batch_size=1", "train.grad_accum=1",
                   "engine.loss_chunk_tokens=8192", spec=spec)
    assert long.peak_phase == memory.PHASE_LOSS
    assert long.phases[memory.PHASE_LOSS]["logits chunk"] >= 2 * 8192 * 262_144 * 4


def test_terms_that_never_coexist_are_not_summed():
    # Backward peaks here; a larger loss chunk (still below it) does not move the GPU figure, because
    # the logits exist only while the loss runs, never during a layer's recompute.
    sets = ("data.seq_len=1024", "train.micro_batch_size=4", "train.grad_accum=4")
    a = _budget("qwen2.5-14b", *sets, "engine.loss_chunk_tokens=64")
    b = _budget("qwen2.5-14b", *sets, "engine.loss_chunk_tokens=256")
    assert a.gpu_total == b.gpu_total
    assert a.peak_phase == b.peak_phase == memory.PHASE_BACKWARD
    assert b.phases[memory.PHASE_LOSS]["logits chunk"] > a.phases[memory.PHASE_LOSS]["logits chunk"]
    for phase in a.phases.values():
        assert not ("logits chunk" in phase and "recomputed layer's activations" in phase)

    # Within a chunk: two fp32 (chunk, V) tensors at once (the logits and logsumexp's exp(z - max)),
    # not three, and the lm_head gradient block comes later, beside d(logits) only.
    spec = PRESETS["qwen2.5-0.5b"]
    H, V, c = spec.hidden_size, spec.vocab_size, 441
    norm = c * H * (4 + 2 * 2)  # bf16: the final norm's fp32 input copy, normed and scaled outputs
    got, stage = memory.loss_chunk_bytes(spec, c, 2)
    assert (got, stage) == (norm + 2 * c * V * 4, "logsumexp")
    # A chunk of 16 tokens: the (v_block, H) gradient block is the larger stage, and it replaces the
    # logits pair rather than adding to it.
    v_block = min(V, max(1024, (128 * 2**20) // (H * 2)))
    got, stage = memory.loss_chunk_bytes(spec, 16, 2)
    assert stage == "dW block"
    assert got == 16 * H * 8 + 16 * V * 2 + 16 * H * 2 + v_block * H * 2


def test_cpu_host_total_adds_the_phases_transients():
    """On the CPU malloc keeps what one phase frees, so the device buffers' host term is the
    persistent buffers, the largest set of step-long tensors, and every phase's own transients
    (within 10% of the measured peak RSS, where the largest phase alone was 6-24% under it)."""
    b = _budget("tiny", device="cpu", dtype=torch.float32)
    assert b.gpu == {} and b.gpu_total == 0
    shared = ("boundary checkpoints", "hidden states and their gradients", "labels")
    want = (sum(b.device_persistent.values())
            + max(sum(v for k, v in p.items() if k in shared) for p in b.phases.values())
            + sum(v for p in b.phases.values() for k, v in p.items() if k not in shared))
    assert b.host["compute buffers (the device is the CPU)"] == want
    assert want > max(b.phase_totals.values())


def _machine(ram_gb: float) -> Machine:
    return Machine(hostname="test", cpu="test cpu", cores=16, ram_total=int(ram_gb * 1e9),
                   ram_available=int(ram_gb * 1e9 * 0.95), memlock_limit=None, gpus=[])


def test_plan_marks_the_gpu_figure_unverified_until_calibrated(monkeypatch):
    from megastream.plan import make_plan, render

    monkeypatch.setattr(memory, "GPU_CALIBRATION", None)  # as before the first GPU run
    cfg = load_config(BIG)
    p = make_plan(cfg, PRESETS["qwen2.5-14b"], runtime_bytes=int(0.3e9), host=_machine(256))
    b = p.budget
    text = render(p)
    assert UNVERIFIED in text
    assert f"peak in the {b.peak_phase} phase" in text and "(the peak phase)" in text
    for name in b.phases:
        assert name in text  # every phase's total is shown
    js = p.to_json()
    assert js["gpu_verified"] is False and js["gpu_calibration"] is None and UNVERIFIED in js["gpu_status"]
    assert js["gpu_peak_phase"] == b.peak_phase
    assert js["gpu_phases"][b.peak_phase]["bytes_total"] == js["gpu_bytes_total"] == sum(js["gpu_bytes"].values())

    record = {"date": "2026-12-01", "device": "NVIDIA H100 80GB HBM3", "label": "a 1B run",
              "planned_bytes": int(1.0e9), "measured_bytes": int(0.95e9)}
    monkeypatch.setattr(memory, "GPU_CALIBRATION", record)
    p = make_plan(cfg, PRESETS["qwen2.5-14b"], runtime_bytes=int(0.3e9), host=_machine(256))
    assert UNVERIFIED not in render(p)
    assert ("checked on NVIDIA H100 80GB HBM3 (2026-12-01) against a 1B run: planned 1.00 GB, measured 0.95 GB"
            in render(p))
    assert p.to_json()["gpu_verified"] is True and p.to_json()["gpu_calibration"] == record
    # a LoRA plan's GPU terms (adapters, the dequantized layer, a frozen backward) were not in that run
    lora = make_plan(load_config(REPO / "configs" / "qwen2.5-14b-lora.yaml"), PRESETS["qwen2.5-14b"],
                     runtime_bytes=int(0.3e9), host=_machine(256))
    assert lora.to_json()["gpu_verified"] is False
    assert "unverified for LoRA (full fine-tuning's model was checked on NVIDIA H100" in render(lora)


def test_plan_cli_json_carries_the_h200_calibration():
    """The shipped calibration: the first H200 run's qwen2.5-3b peak, 9.19 GB measured, 9.11 GB planned."""
    js = json.loads(run_cli("plan", str(BIG), "--json", check=False).stdout)
    assert js["device"] == "cuda" and js["gpu_verified"] is True
    assert js["gpu_status"] == ("checked on NVIDIA H200 (2026-11-29) against qwen2.5-3b, full mode, 8192 tokens a "
                                "step: planned 9.11 GB, measured 9.19 GB")
    assert js["gpu_peak_phase"] in js["gpu_phases"]


# ---- the automatic loss chunk on CUDA, grown into the plan's free GPU memory (memory.sized_chunk_tokens) ----
SEVEN_B = ("data.seq_len=4096", "train.micro_batch_size=4", "train.grad_accum=2")


def _grown(gpu_bytes: float, preset="qwen2.5-7b", sets=SEVEN_B):
    cfg = load_config(DEMO, [f"model.preset={preset}", "engine.device=cuda", "data.pack=false", *sets])
    return memory.budget(cfg, PRESETS[preset], "cuda", torch.bfloat16, torch.bfloat16, 0, gpu_budget=int(gpu_bytes))


def test_the_automatic_loss_chunk_grows_into_half_the_free_gpu_memory():
    from megastream.engine.loss import auto_chunk_tokens

    spec = PRESETS["qwen2.5-7b"]
    base = auto_chunk_tokens(spec.vocab_size)  # 441 tokens: 256 MiB of fp32 logits
    at_base = _budget("qwen2.5-7b", *SEVEN_B)  # no GPU budget given: the automatic size, as before
    assert at_base.chunk_tokens == base
    cap = min(4 * 4096, memory.MAX_CHUNK_TOKENS)
    chunks = {}
    for gb in (24, 80):
        b = _grown(gb * 1e9)
        c = chunks[gb] = b.chunk_tokens
        assert c & (c - 1) == 0 and base <= c <= cap, c  # a power of two, >= the automatic size, <= the cap
        limit = at_base.gpu_total + (gb * 1e9 - at_base.gpu_total) // 2  # the peak plus half of what it leaves
        others = b.phase_totals[memory.PHASE_LOSS] - b.phases[memory.PHASE_LOSS]["logits chunk"]
        assert b.phases[memory.PHASE_LOSS]["logits chunk"] == memory.loss_chunk_bytes(spec, c, 2)[0]
        assert b.phase_totals[memory.PHASE_LOSS] <= limit
        assert 2 * c > cap or others + memory.loss_chunk_bytes(spec, 2 * c, 2)[0] > limit  # the largest one
        assert b.gpu_total <= gb * 1e9  # the plan's GPU peak with that chunk stays under the budget
        assert f"{b.chunk_tokens}" in b.notes["logits chunk"] and "the largest power of two" in b.notes["loss chunk"]
    assert chunks[24] < chunks[80] == memory.MAX_CHUNK_TOKENS

    # Too small to grow: the loss phase is the peak and half of the 0.1 GB left free is less than the
    # next power of two's logits; or the plan does not fit at all; or the micro-batch is smaller.
    small = ("data.seq_len=512", "train.micro_batch_size=4", "train.grad_accum=2")
    peak = _budget("qwen2.5-0.5b", *small)
    assert peak.peak_phase == memory.PHASE_LOSS
    tight = _grown(peak.gpu_total + 0.1e9, "qwen2.5-0.5b", small)
    assert tight.chunk_tokens == base and tight.gpu_total == peak.gpu_total and "512 tokens would" in \
        tight.notes["loss chunk"]
    over = _grown(0.5 * at_base.gpu_total)
    assert over.chunk_tokens == base and "needs" in over.notes["loss chunk"]
    short = _grown(80e9, sets=("data.seq_len=256", "train.micro_batch_size=1", "train.grad_accum=2"))
    assert short.chunk_tokens == 256  # the micro-batch's tokens, as before


def test_plan_shows_the_chunk_and_the_embedding_path():
    from megastream.plan import make_plan, render

    cfg = load_config(BIG)  # qwen2.5-14b on a 24 GB budget (engine.gpu_memory_gb)
    p = make_plan(cfg, PRESETS["qwen2.5-14b"], runtime_bytes=int(0.3e9), host=_machine(256))
    b, text, js = p.budget, render(p), p.to_json()
    assert b.chunk_tokens > 441 and b.gpu_total <= p.gpu_budget
    assert f"loss chunk {b.chunk_tokens} tokens: the largest power of two" in text
    assert "embedding on the device (auto on CUDA)" in text
    assert (js["loss_chunk_tokens"], js["embedding"]) == (b.chunk_tokens, "device")
