"""The generic path's presets (megastream.presets.HF_PRESETS): the published config.json of each
model builds its transformers module on the meta device, with the published parameter count, and
`plan` budgets it without a download."""

import json

import pytest

from helpers import REPO, run_cli

DEMO = str(REPO / "configs" / "demo.yaml")

# Published sizes (billions of parameters; Gemma 3 27B: the text model, without the vision tower).
PUBLISHED = {"mixtral-8x7b": 46.70, "qwen3-30b-a3b": 30.53, "gemma-3-27b": 27.01, "phi-4": 14.66}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_hf_preset_has_the_published_size_and_plans(preset):
    proc = run_cli("plan", DEMO, "--set", f"model.preset={preset}", "--json", check=False)
    assert proc.returncode == 1, proc.stderr  # 1: does not fit this machine (the plan itself ran)
    plan = json.loads(proc.stdout)
    assert abs(plan["params"] / 1e9 - PUBLISHED[preset]) <= 0.005 * PUBLISHED[preset], plan["params"]
    assert plan["state_bytes_per_param"] > 0


def test_hf_preset_refuses_the_native_path():
    proc = run_cli("plan", DEMO, "--set", "model.preset=phi-4", "--set", "model.implementation=native",
                   check=False)
    assert proc.returncode == 2 and "runs on the generic path" in proc.stderr, proc.stderr
