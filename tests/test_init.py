"""Random init of presets: seeded per piece, so it is the same on any number of threads, and
drawn as transformers draws it (N(0, std) matrices, unit norms, zero biases)."""

from dataclasses import replace

import torch

from megastream.model.layout import model_layout
from megastream.presets import PRESETS
from megastream.store import HostStore


def _store(spec, dtype=torch.float32, master=True):
    return HostStore(model_layout(spec), dtype, dtype, pin=False, master=master, states="bf16")


def test_init_is_independent_of_thread_count_and_seeded():
    spec = replace(PRESETS["qwen2.5-0.5b"], vocab_size=5000, num_layers=2)  # > one 4M piece per embedding
    a, b, c = _store(spec), _store(spec), _store(spec)
    a.init_random(0.02, seed=1, threads=1)
    b.init_random(0.02, seed=1, threads=3)
    c.init_random(0.02, seed=2, threads=3)
    assert torch.equal(a.weights, b.weights) and not torch.equal(a.weights, c.weights)
    pieces = a.weights_of(0).view(-1).split(1 << 22)
    assert not torch.equal(pieces[0][:1000], pieces[1][:1000])  # pieces are independent draws


def test_init_distribution_and_modes_agree():
    spec = replace(PRESETS["qwen2.5-0.5b"], num_layers=1, vocab_size=4096)
    full, lean = _store(spec), _store(spec, torch.bfloat16, master=False)
    full.init_random(0.02, seed=0)
    lean.init_random(0.02, seed=0)
    assert torch.equal(full.weights.bfloat16(), lean.weights)  # same draw, rounded once
    views = model_layout(spec)[1].views(full.weights_of(1))
    assert abs(float(views["q"].std()) - 0.02) < 1e-4 and abs(float(views["q"].mean())) < 1e-4
    assert torch.all(views["ln1"] == 1) and torch.all(views["q_b"] == 0)
