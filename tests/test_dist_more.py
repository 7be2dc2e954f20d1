"""Data parallel under torchrun, continued (a file of its own, so pytest-xdist runs it beside
test_dist.py): a rank killed, a world size that does not divide the step, LoRA, two nodes."""

import json

from safetensors.torch import load_file

from helpers import read_metrics, run_cli, torchrun
from test_dist import BASE, REL, _assert_bytes_as_planned, _assert_same_run, _planned, _rel


def test_a_rank_killed_ends_the_job_without_a_half_written_checkpoint(tmp_path):
    out = tmp_path / "killed"
    proc = torchrun("demo", *BASE, "--set", f"output.dir={out}", "--set", "engine.dist_timeout_s=30",
                    env={"MEGASTREAM_TEST_KILL_RANK": "1:3"}, check=False, timeout=120)
    assert proc.returncode != 0
    assert "rank      : 1" in proc.stderr and "SIGKILL" in proc.stderr  # torchrun's summary names the rank
    assert "megastream: error: rank 0: a collective failed" in proc.stderr, proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in names and "final" not in names and "checkpoint-4" not in names
    assert (out / "checkpoint-2" / "optimizer" / "manifest.json").is_file()


def test_grad_accum_must_split_across_ranks(tmp_path):
    proc = torchrun("demo", *BASE, "--set", "train.grad_accum=3", "--set", f"output.dir={tmp_path / 'x'}",
                    check=False, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("cannot be split evenly across 2 ranks") == 1, proc.stderr[-3000:]  # rank 0 says it once
    assert not (tmp_path / "x").exists()


def test_lora_on_two_ranks_equals_one(tmp_path):
    lora = ["--set", "lora.rank=4", "--set", "lora.dropout=0", "--set", "output.save_every=0"]
    run_cli("demo", *BASE, *lora, "--set", f"output.dir={tmp_path / 'one'}")
    torchrun("demo", *BASE, *lora, "--set", f"output.dir={tmp_path / 'two'}")
    ma, mb = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for x, y in zip(ma, mb):
        assert abs(x["loss"] - y["loss"]) <= REL * abs(x["loss"])
    # after the first step (which brings every layer in), the frozen base's resident layers stay
    _assert_bytes_as_planned(tmp_path / "two", _planned("--ranks-per-node", "2", *lora), steps=slice(1, None))
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max(_rel(b[k], a[k]) for k in a) <= REL


def test_two_nodes_replicate_the_shards(tmp_path):
    """Two nodes of one rank each (emulated on this machine: MEGASTREAM_TEST_RANKS_PER_NODE=1 under
    one torchrun, which two agents' rendezvous on one host made flaky): every node holds the whole
    state (a node's shard is all of it) and the gradient shards are all-reduced across nodes (HSDP)."""
    one = tmp_path / "one"
    run_cli("demo", *BASE, "--set", "output.save_every=0", "--set", f"output.dir={one}")
    out = tmp_path / "nodes"
    torchrun("demo", *BASE, "--set", f"output.dir={out}", env={"MEGASTREAM_TEST_RANKS_PER_NODE": "1"})
    _assert_same_run(out, one, exact=False)
    assert json.loads((out / "checkpoint-2" / "optimizer" / "manifest.json").read_text())["world"] == 1
    planned = _planned("--ranks-per-node", "1", "--nodes", "2")
    assert planned["all_reduce_bytes_per_step_per_rank"] > 0
    _assert_bytes_as_planned(out, planned)
