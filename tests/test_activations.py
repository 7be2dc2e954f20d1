"""engine.activations: host offloads the layer-boundary checkpoints and brings them back for
backward; the result must be bit-identical to keeping them on the device."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, read_metrics
from megastream.config import load_config
from megastream.engine.activations import Checkpoints
from megastream.engine.streams import Streams
from megastream.train import train

DEMO = REPO / "configs" / "demo.yaml"


def _run(out, mode, *sets):
    cfg = load_config(DEMO, ["train.steps=3", "train.warmup_steps=0", "train.micro_batch_size=4",
                             "train.grad_accum=3", "output.progress=false", f"output.dir={out}",
                             f"engine.activations={mode}", *sets])
    train(cfg, log=lambda *a: None)
    return read_metrics(out), load_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize("sets", [(), ("data.pack=false", "train.grad_clip=0")])
def test_host_offload_is_bit_identical(tmp_path, sets):
    m_dev, w_dev = _run(tmp_path / "dev", "device", *sets)
    m_host, w_host = _run(tmp_path / "host", "host", *sets)
    assert [(r["loss"], r["grad_norm"]) for r in m_dev] == [(r["loss"], r["grad_norm"]) for r in m_host]
    assert all(torch.equal(w_dev[k], w_host[k]) for k in w_dev)


def test_checkpoints_round_trip_and_reuse_the_arena():
    ck = Checkpoints(torch.device("cpu"), Streams(torch.device("cpu")), "host")
    for step in range(2):
        xs = [torch.randn(2, 5, 8) + step, torch.randn(1, 5, 8)]
        ck.begin(3, xs)
        saved = {}
        for i in range(3):
            layer_in = [x * (i + 1) for x in xs]
            ck.save(i, layer_in)
            saved[i] = [x.clone() for x in layer_in]
        arena = ck._arena
        for i in reversed(range(3)):
            got = ck.take(i)
            ck.prefetch(i - 1)
            assert all(torch.equal(a, b) for a, b in zip(got, saved[i]))
        assert ck._arena is arena and arena.numel() == 3 * (80 + 40)
    ck.close()
