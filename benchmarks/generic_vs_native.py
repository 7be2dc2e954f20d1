"""Step time of the generic path (model.implementation: hf, the transformers layer module called
functionally on the streamed buffer) against the native path on the same Llama, in one run.

    python benchmarks/generic_vs_native.py                      # CPU, a ~9M-parameter Llama
    python benchmarks/generic_vs_native.py --hidden 512 --layers 8 --seq-len 512 --json out.json

A random Llama is written with transformers' save_pretrained and loaded by both paths from disk,
as a user's model would be. The two engines then take turns, one step each per round on the same
micro-batches (so that a shared machine's load falls on both alike); the first round is warm-up.
Prints the median step time of each, their ratio (generic / native) and the loss both computed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megastream.checkpoint import load_hf_weights
from megastream.config import Config, EngineConfig, TrainConfig
from megastream.engine.engine import Engine, MicroBatch
from megastream.engine.loss import IGNORE
from megastream.hf import spec_from_dir
from megastream.model.layout import count_params, model_layout
from megastream.model.spec import ModelSpec
from megastream.store import HostStore


def write_llama(path: Path, a) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                                   num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                                   num_key_value_heads=max(1, a.hidden // 128), max_position_embeddings=a.seq_len)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def engine_for(spec: ModelSpec, path: Path, device: torch.device) -> tuple[HostStore, Engine]:
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)
    load_hf_weights(store, spec, path)
    return store, Engine(spec, store, Config(train=TrainConfig(grad_clip=1.0), engine=EngineConfig()), device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="steps of each path, the first one warm-up")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    a = ap.parse_args()
    device = torch.device("cpu")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        write_llama(path, a)
        specs = {"native": ModelSpec.from_dir(path), "generic": spec_from_dir(path)}
        engines = {k: engine_for(s, path, device) for k, s in specs.items()}
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(a.grad_accum):
        ids = torch.randint(0, a.vocab, (a.micro_batch, a.seq_len), generator=g)
        mbs.append(MicroBatch(ids, torch.cat([ids[:, 1:], torch.full((a.micro_batch, 1), IGNORE)], 1)))

    times = {k: [] for k in engines}
    losses = {k: [] for k in engines}
    for _ in range(a.rounds):
        for k, (_, engine) in engines.items():
            t = time.perf_counter()
            losses[k].append(engine.step(mbs, lr=1e-4).loss)  # returns after its sync point
            engine.worker.wait_all()  # the host updates, so that the next path starts on an idle machine
            times[k].append(time.perf_counter() - t)
    for store, engine in engines.values():
        engine.close()
        store.close()

    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    ratio = med["generic"] / med["native"]
    per_round = [g_ / n_ for g_, n_ in zip(times["generic"][1:], times["native"][1:])]
    tokens = a.micro_batch * a.grad_accum * a.seq_len
    result = {
        "torch_version": torch.__version__, "threads": torch.get_num_threads(), "params": count_params(specs["native"]),
        "hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "tokens_per_step": tokens,
        "step_time_s": med, "ratio_generic_over_native": ratio, "ratio_per_round": per_round,
        "step_times_s": times, "losses": losses,
        "max_loss_rel_diff": max(abs(x - y) / abs(y) for x, y in zip(losses["generic"], losses["native"])),
    }
    print(f"Llama {result['params'] / 1e6:.1f}M params, {tokens} tokens/step, CPU ({result['threads']} threads): "
          f"native {med['native']:.3f} s/step, generic {med['generic']:.3f} s/step, ratio {ratio:.3f} "
          f"(per round {min(per_round):.3f}-{max(per_round):.3f}); losses agree to "
          f"{result['max_loss_rel_diff']:.1e}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
