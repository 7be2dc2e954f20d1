"""scripts/gpu_acceptance.sh --dry-run: the plan lists every step the GPU run needs, each part within
one device call (part 1 <= 545 s, part 2 <= 525 s, part 3 <= 545 s, part 4 <= 510 s), and the CPU-capable parts
run with tiny shapes, leaving the summary, the JSON and every step's log behind."""

import json
import os
import subprocess
import tarfile

import pytest

from helpers import REPO

PART1 = ["setup", "ds-build", "preflight", "build", "env", "ds-join", "h2h-3b"]
PART2 = ["setup2", "cpu-ops", "pytest-gpu", "14b", "7b"]


def _dry_run(out, *args, rc=0):
    env = dict(os.environ, PYTHON=__import__("sys").executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), *args, "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == rc, text[-6000:]
    return text, json.loads((out / "acceptance.json").read_text())


def test_acceptance_parts_and_a_bad_part():
    """--part all (the default) is parts 1 and 2 (each checked below, run on its own as the GPU machine
    runs them); a part that does not exist is refused before anything runs."""
    env = dict(os.environ, PYTHON=__import__("sys").executable)
    bad = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), "--part", "9", "--dry-run"],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    assert bad.returncode == 2 and "--part must be" in bad.stderr
    bad = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), "--deadline", "9m", "--dry-run"],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    assert bad.returncode == 2 and "--deadline must be a whole number of seconds, got 9m" in bad.stderr
    script = (REPO / "scripts" / "gpu_acceptance.sh").read_text()
    assert "PART=all\n" in script and "all) parts=(1 2) ;;" in script


@pytest.mark.parametrize("part", ["1", "2"])
def test_acceptance_dry_run(tmp_path, part):
    out = tmp_path / "acc"
    text, doc = _dry_run(out, "--part", part)
    names, budget = {"1": (PART1, 545), "2": (PART2, 525)}[part]

    # the plan: every step, its timeout and its command, within the part's budget
    assert f"part {part}: timeouts sum to" in text
    p = doc["parts"][part]
    assert [s["step"] for s in p["plan"]] == names
    assert all(s["timeout_s"] > 0 and s["command"] for s in p["plan"])
    assert p["timeouts_s"] == sum(s["timeout_s"] for s in p["plan"] if not s["background"]) <= budget
    # a background step (DeepSpeed's build) fits under the steps it overlaps until its join
    for i, s in enumerate(p["plan"]):
        if s["background"]:
            join = next(j for j in range(i, len(names)) if names[j].endswith("-join"))
            assert s["timeout_s"] <= sum(x["timeout_s"] for x in p["plan"][i + 1:join + 1])
    assert p["dry_run"] is True
    # run: every step ran (none stopped the others), each with its own log, all fine on the CPU
    assert sorted(s["step"] for s in p["steps"]) == sorted(names)
    for s in p["steps"]:
        assert s["status"] == "ok", (s, (out / s["log"]).read_text()[-3000:])
        assert (out / s["log"]).exists()
    for name in names:
        assert f"{name}: ok in" in text  # each step's elapsed time as it ends

    # the summary table, the logs packed
    summary = (out / "summary.txt").read_text()
    for name in names:
        assert name in summary
    with tarfile.open(out / f"logs-part{part}.tar.gz") as tar:
        assert f"steps/{names[0]}.log" in tar.getnames()
    if part == "2":  # the GPU commands' arguments checked: rows the host cannot hold are not-run up front
        assert "not-run: needs ~" in (out / "steps" / "14b.log").read_text()
        return
    # the head-to-head's GPU command checked: its rows in order, each with its timeout, within the step's
    # (the rows themselves run on the CPU in test_throughput_harness.py)
    log = (out / "steps" / "h2h-3b.log").read_text()
    rows = [l.split()[0] for l in log.splitlines() if l.split()[:1] and l.split()[0] in
            ("roofline", "megastream:full", "megastream:lean", "fsdp2", "deepspeed")]
    assert rows == ["roofline", "megastream:full", "megastream:lean", "fsdp2", "deepspeed"], log[-2000:]
    assert "preflight:" in (out / "steps" / "preflight.log").read_text()



def test_acceptance_deadline_skips_what_cannot_finish(tmp_path):
    """--deadline S: a step whose timeout would end past S seconds into the run is skipped (logged,
    summed up, never started), so one device call ends inside its limit with its logs packed. Each
    part alone fits one 600 s call."""
    out = tmp_path / "acc"
    text, doc = _dry_run(out, "--part", "2", "--deadline", "5", rc=1)  # not every step ran
    steps = doc["parts"]["2"]["steps"]
    assert [s["step"] for s in steps] == PART2 and {s["status"] for s in steps} == {"skipped"}
    assert "skipped: its" in (out / "steps" / "14b.log").read_text()
    assert "14b          skipped" in (out / "summary.txt").read_text()
    script = (REPO / "scripts" / "gpu_acceptance.sh").read_text()
    for part in "1234":  # each part is one device call (at most 600 s), with time left to pack its logs
        assert int(script.split(f"BUDGET_{part}=")[1].split()[0]) <= 560


PART3 = ["setup3", "pytest-features", "features", "14b-32k"]
FEATURE_ROWS = ["megastream:full", "megastream:full+flex", "megastream:full+varlen", "megastream:full+clip-previous"]


def test_acceptance_part3_dry_run(tmp_path):
    """Part 3, the step features before/after: its plan (a setup, the features' GPU tests, one harness
    step whose rows are megastream:full and each feature, each under its own timeout, then qwen2.5-14b
    compact + clip-previous at 32k tokens a step, all within 545 s) and the GPU commands checked
    (--check: every row runs there, with its timeout and settings)."""
    out = tmp_path / "acc3"
    text, doc = _dry_run(out, "--part", "3")
    assert list(doc["parts"]) == ["3"]
    p = doc["parts"]["3"]
    assert [s["step"] for s in p["plan"]] == PART3 and p["timeouts_s"] <= 545
    assert "part 3: timeouts sum to" in text and "(budget 545 s)" in text
    for s in p["steps"]:
        assert s["status"] == "ok", (s, (out / s["log"]).read_text()[-3000:])
    features = next(s for s in p["plan"] if s["step"] == "features")
    gpu = features["command"].split(" && ")[0]  # the dry run's first command: the GPU command with --check
    for flag in ("--model qwen2.5-3b", "--seq-len 8192", "--docs-per-row 8", "--carry-over",
                 "step-features.json"):
        assert flag in gpu, flag

    # the GPU command's check: every row runs there (the host holds qwen2.5-3b full), its own timeout each,
    # the roofline and the rows within the step's timeout
    log = (out / "steps" / "features.log").read_text()
    timeouts = {}
    for name in ["roofline"] + FEATURE_ROWS:
        line = next(l for l in log.splitlines() if l.split()[:1] == [name])
        assert " runs" in line, line
        timeouts[name] = float(line.split("timeout")[1].split()[0])
    assert "[engine.attention: varlen]" in log and "[optim.clip: previous]" in log
    assert sum(timeouts.values()) <= features["timeout_s"]
    assert f"at most {sum(timeouts.values()):.0f} s in all" in log

    # issue 13's 14B target: compact + clip-previous at 32k tokens a step under the 24 GB cap, the boundary
    # checkpoints on the host; the plan's GPU peak for exactly that row fits the cap
    big = next(s for s in p["plan"] if s["step"] == "14b-32k")
    for flag in ("--model qwen2.5-14b", "--grad-accum 8", "--activations host", "--gpu-memory-gb 24"):
        assert flag in big["command"], flag
    line = next(l for l in (out / "steps" / "14b-32k.log").read_text().splitlines()
                if l.split()[:1] == ["megastream:compact+clip-previous"])
    assert " runs" in line and "[optim.clip: previous]" in line, line
    import argparse
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput as tp

    from megastream.plan import make_plan
    from megastream.presets import PRESETS

    a = argparse.Namespace(model="qwen2.5-14b", seq_len=1024, micro_batch_size=4, grad_accum=8, gpu_memory_gb=24.0,
                           activations="host", device="cuda", docs_per_row=1)
    plan = make_plan(tp.megastream_config(a, "compact+clip-previous"), PRESETS["qwen2.5-14b"])
    assert plan.budget.tokens_per_step == 32768 and plan.fits_gpu and plan.budget.gpu_total < 24e9

    assert not (out / "step-features-dry-run.json").exists()  # the rows run on the CPU in test_throughput_harness


PART4 = ["setup4", "pytest-lora", "features2", "lora", "qlora-72b"]
FEATURE2_ROWS = ["megastream:full", "megastream:full+varlen+clip-previous", "megastream:full+embed-host",
                 "megastream:full+compile"]


def test_acceptance_part4_dry_run(tmp_path):
    """Part 4, the rest of the step features and LoRA on the GPU: its plan within 510 s, the features'
    GPU command checked (compile with its warm-up steps), the LoRA benchmarks' GPU arguments checked
    (the 72B-wide QLoRA's planned GPU peak under its 24 GB cap)."""
    out = tmp_path / "acc4"
    text, doc = _dry_run(out, "--part", "4")
    p = doc["parts"]["4"]
    assert [s["step"] for s in p["plan"]] == PART4 and p["timeouts_s"] <= 510
    for s in p["steps"]:
        assert s["status"] == "ok", (s, (out / s["log"]).read_text()[-3000:])
    log = (out / "steps" / "features2.log").read_text()
    for name in ["roofline"] + FEATURE2_ROWS:
        line = next(l for l in log.splitlines() if l.split()[:1] == [name])
        assert " runs" in line, line
    assert "[engine.attention: varlen, optim.clip: previous]" in log and "(warm-up 2 steps)" in log
    assert "[engine.embedding: host]" in log
    qlora = (out / "steps" / "qlora-72b.log").read_text()
    planned = float(qlora.split("planned GPU peak")[1].split()[0])
    assert 0 < planned <= 24, qlora  # the cap the GPU run sets
    lora = (out / "steps" / "lora.log").read_text()
    assert "qwen2.5-1.5b" in lora and " full: planned GPU peak" in lora and " lora: planned GPU peak" in lora, lora


def test_every_gpu_test_file_runs_in_some_part():
    """Each part's pytest runs its own list of files (part 1 the engine's, parts 3 and 4 the step
    features' and LoRA's): every file with `gpu` tests is in exactly one list."""
    import re

    script = (REPO / "scripts" / "gpu_acceptance.sh").read_text()
    lists = {name: re.search(rf'^{name}="([^"]*)"', script, re.M).group(1).split()
             for name in ("ENGINE_TESTS", "FEATURE_TESTS", "LORA_TESTS")}
    listed = [f for files in lists.values() for f in files]
    gpu_files = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text() and p.name != "test_gpu_acceptance.py")
    assert sorted(listed) == gpu_files  # none missed, none twice
    assert 'PYTEST_1="$PYTEST $ENGINE_TESTS"' in script and '"$PYTEST_1" "$PYTEST_1"' in script
    assert '"$PYTEST $FEATURE_TESTS"' in script and '"$PYTEST $LORA_TESTS"' in script  # parts 3 and 4
