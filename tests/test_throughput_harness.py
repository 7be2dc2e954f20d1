"""benchmarks/throughput.py end to end on the CPU (the GPU head-to-head runs the same code with
--device cuda): every system in its own subprocess, failures reported as results, the JSON schema."""

import json
import subprocess
import sys

from helpers import REPO


def test_harness_runs_systems_and_reports_failures(tmp_path):
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", "cpu",
                           "--model", "tiny", "--seq-len", "32", "--micro-batch-size", "2", "--grad-accum", "2",
                           "--steps", "2", "--warmup", "1", "--systems", "megastream:lean", "megastream:compact",
                           "fsdp2", "deepspeed", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for key in ("device", "date", "torch_version", "model", "tokens_per_step", "systems", "roofline"):
        assert key in doc
    assert doc["tokens_per_step"] == 2 * 2 * 32
    for key in ("h2d_gbps", "d2h_gbps", "matmul_tflops", "host_gbps", "bound_s", "achieved_fraction"):
        assert key in doc["roofline"]
    systems = {s["name"]: s for s in doc["systems"]}
    assert list(systems) == ["megastream:lean", "megastream:compact", "fsdp2", "deepspeed"]
    for name in ("megastream:lean", "megastream:compact", "fsdp2"):
        s = systems[name]
        assert s["status"] == "ok", s
        for key in ("tokens_per_s", "tflops", "mfu", "peak_host_gb"):
            assert s[key] > 0
        assert "peak_gpu_gb" in s
    assert systems["megastream:lean"]["achieved_fraction"] > 0
    assert systems["deepspeed"]["status"] == "error" and systems["deepspeed"]["message"]
    assert "megastream:" in proc.stdout and "/ fsdp2:" in proc.stdout
