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
