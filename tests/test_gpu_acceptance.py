"""scripts/gpu_acceptance.sh --dry-run: the plan lists every step the GPU run needs, with timeouts
inside the 10-minute budget (part 1 <= 360 s, part 2 <= 240 s), and the CPU-capable parts run with
tiny shapes, leaving the summary, the JSON and every step's log behind."""

import json
import os
import subprocess
import tarfile

from helpers import REPO

PART1 = ["setup", "ds-build", "preflight", "build", "env", "pytest-gpu", "ds-join", "h2h-3b"]
PART2 = ["setup2", "14b", "7b"]


def test_acceptance_dry_run(tmp_path):
    out = tmp_path / "acc"
    env = dict(os.environ, PYTHON=__import__("sys").executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]

    # the plan: every step, its timeout and its command, within each part's budget
    assert "part 1: timeouts sum to" in text and "part 2: timeouts sum to" in text
    doc = json.loads((out / "acceptance.json").read_text())
    for part, names, budget in (("1", PART1, 360), ("2", PART2, 240)):
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
    for name in PART1 + PART2:
        assert f"{name}: ok in" in text  # each step's elapsed time as it ends

    # the summary table, the logs packed, the head-to-head's dry run with both bounds
    summary = (out / "summary.txt").read_text()
    for name in PART1 + PART2:
        assert name in summary
    with tarfile.open(out / "logs-partall.tar.gz") as tar:
        assert "steps/preflight.log" in tar.getnames()
    h2h = json.loads((out / "h2h-tiny-dry-run.json").read_text())
    rows = {s["name"]: s for s in h2h["systems"]}
    assert rows["megastream:full"]["status"] == "ok"  # every row's dry run: test_throughput_harness.py
    assert rows["deepspeed"]["status"] == "not-run"
    assert set(h2h["bounds"]["megastream:full"]) >= {"ideal", "attainable"}
    # the GPU commands' arguments checked: rows the host cannot hold are not-run up front
    assert "not-run: needs ~" in (out / "steps" / "14b.log").read_text()
    assert "preflight:" in (out / "steps" / "preflight.log").read_text()


PART3 = ["setup3", "pytest-features", "features"]
FEATURE_ROWS = ["megastream:full", "megastream:full+flex", "megastream:full+varlen", "megastream:full+clip-previous",
                "megastream:full+embed-host"]


def test_acceptance_part3_dry_run(tmp_path):
    """Part 3, the step features before/after: its plan (a setup, the features' GPU tests and one harness
    step whose rows are megastream:full and each feature, each under its own timeout, all within 330 s), the GPU command
    checked (--check: every row runs there, with its timeout and settings) and the CPU's dry run of
    its rows with packed rows (flex not-run on the CPU, with megastream's reason)."""
    out = tmp_path / "acc3"
    env = dict(os.environ, PYTHON=__import__("sys").executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), "--part", "3", "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    doc = json.loads((out / "acceptance.json").read_text())
    assert list(doc["parts"]) == ["3"]
    p = doc["parts"]["3"]
    assert [s["step"] for s in p["plan"]] == PART3 and p["timeouts_s"] <= 330
    assert "part 3: timeouts sum to" in text and "(budget 330 s)" in text
    for s in p["steps"]:
        assert s["status"] == "ok", (s, (out / s["log"]).read_text()[-3000:])
    features = next(s for s in p["plan"] if s["step"] == "features")
    gpu = features["command"].split(" && ")[0]  # the dry run's first command: the GPU command with --check
    for flag in ("--model qwen2.5-3b", "--seq-len 8192", "--docs-per-row 8", "--carry-over",
                 "step-features.json"):
        assert flag in gpu, flag

    # the GPU command's check: every row runs there (the host holds qwen2.5-3b full), its own timeout each,
    # the roofline and the rows within the step's timeout, which with the setup's stays within 330 s
    log = (out / "steps" / "features.log").read_text()
    timeouts = {}
    for name in ["roofline"] + FEATURE_ROWS:
        line = next(l for l in log.splitlines() if l.split()[:1] == [name])
        assert " runs" in line, line
        timeouts[name] = float(line.split("timeout")[1].split()[0])
    assert "[engine.attention: varlen]" in log and "[engine.embedding: host]" in log
    assert sum(timeouts.values()) <= features["timeout_s"]
    assert f"at most {sum(timeouts.values()):.0f} s in all" in log
    assert sum(timeouts.values()) + sum(s["timeout_s"] for s in p["plan"] if s["step"] != "features") <= 330

    # the dry run: packed rows, the sdpa rows ran and have a ratio, flex is not-run on the CPU
    dry = json.loads((out / "step-features-dry-run.json").read_text())
    rows = {s["name"]: s for s in dry["systems"]}
    assert dry["data"]["docs_per_row"] == 4 and dry["data"]["identical_for_all_systems"]
    assert rows["megastream:full"]["status"] == rows["megastream:full+clip-previous"]["status"] == "ok"
    assert rows["megastream:full+clip-previous"]["config"]["optim.clip"] == "previous"
    for row in ("megastream:full+flex", "megastream:full+varlen"):
        assert rows[row]["status"] == "not-run" and "CPU" in rows[row]["message"], row
    assert dry["variants"]["full+clip-previous / full"]["ratio"] > 0
    assert any(u.startswith("compile") for u in dry["unmeasured"])
    assert "full+clip-previous / full = " in log
    results = doc["results"]["step-features-dry-run.json"]
    assert results["variants"]["full+flex / full"] is None and results["unmeasured"]


PART4 = ["setup4", "pytest-lora", "features2", "lora", "qlora-72b"]
FEATURE2_ROWS = ["megastream:full", "megastream:full+varlen+clip-previous", "megastream:full+compile"]


def test_acceptance_part4_dry_run(tmp_path):
    """Part 4, the rest of the step features and LoRA on the GPU: its plan within 340 s, the features'
    GPU command checked (compile with its warm-up steps), the LoRA benchmarks' GPU arguments checked
    (the 72B-wide QLoRA's planned GPU peak under its 24 GB cap) and run on the CPU's tiny shape."""
    out = tmp_path / "acc4"
    env = dict(os.environ, PYTHON=__import__("sys").executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh"), "--part", "4", "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    doc = json.loads((out / "acceptance.json").read_text())
    p = doc["parts"]["4"]
    assert [s["step"] for s in p["plan"]] == PART4 and p["timeouts_s"] <= 340
    for s in p["steps"]:
        assert s["status"] == "ok", (s, (out / s["log"]).read_text()[-3000:])
    log = (out / "steps" / "features2.log").read_text()
    for name in ["roofline"] + FEATURE2_ROWS:
        line = next(l for l in log.splitlines() if l.split()[:1] == [name])
        assert " runs" in line, line
    assert "[engine.attention: varlen, optim.clip: previous]" in log and "(warm-up 2 steps)" in log
    qlora = (out / "steps" / "qlora-72b.log").read_text()
    planned = float(qlora.split("planned GPU peak")[1].split()[0])
    assert 0 < planned <= 24, qlora  # the cap the GPU run sets
    lora = json.loads((out / "lora-step-dry-run.json").read_text())
    assert lora["ratio_cpu"] > 0 and set(lora["step_cpu_s"]) == {"full", "lora"}
    q = json.loads((out / "qlora-dry-run.json").read_text())
    assert q["base_dtype"] == "nf4" and q["layers"] == 2 and q["lora_tokens_per_s"] > 0


def test_every_gpu_test_file_runs_in_some_part():
    """Part 1's pytest leaves out the step features' and LoRA's GPU tests, which parts 3 and 4 run:
    every file with `gpu` tests is run by exactly one part."""
    import re

    script = (REPO / "scripts" / "gpu_acceptance.sh").read_text()
    lists = {name: re.search(rf'^{name}="([^"]*)"', script, re.M).group(1).split()
             for name in ("FEATURE_TESTS", "LORA_TESTS")}
    later = lists["FEATURE_TESTS"] + lists["LORA_TESTS"]
    gpu_files = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text() and p.name != "test_gpu_acceptance.py")
    assert set(later) <= set(gpu_files), set(later) - set(gpu_files)
    assert "--ignore=%s" in script and "for t in $FEATURE_TESTS $LORA_TESTS" in script  # part 1 leaves them out
    assert '"$PYTEST $FEATURE_TESTS"' in script and '"$PYTEST $LORA_TESTS"' in script  # parts 3 and 4 run them
    assert len(later) == len(set(later)) and {"tests/test_gpu.py", "tests/test_flex_attention.py"} <= (
        set(gpu_files) - set(later))  # the engine's own GPU tests stay in part 1
