"""Loading streams tensors into the host store: the process's peak RSS while loading stays within
1.15x of the store it fills (no second copy of the model, no mapped checkpoint pages)."""

import json
import os
import subprocess
import sys

import torch

from helpers import REPO

MEASURE = r"""
import json, resource, sys, psutil, torch
from megastream.checkpoint import load_hf_weights
from megastream.model.layout import model_layout
from megastream.model.spec import ModelSpec
from megastream.store import HostStore
spec = ModelSpec.from_dir(sys.argv[1])
before = psutil.Process().memory_info().rss
store = HostStore(model_layout(spec), torch.bfloat16, torch.bfloat16, pin=False, master=False, states="bf16")
load_hf_weights(store, spec, sys.argv[1])
from megastream.machine import peak_rss
peak = peak_rss()  # VmHWM: ru_maxrss would include the (large) pytest process this child was forked from
print(json.dumps({"before": before, "peak": peak, "store": store.host_bytes(),
                  "file": sum(f.stat().st_size for f in __import__("pathlib").Path(sys.argv[1]).glob("*.safetensors"))}))
"""


def test_peak_rss_while_loading(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "model")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["store"] == n_params * 8 + 32000 * 512 * 2  # bf16 weights, moments, staging; fp32 embedding grad
    grown = m["peak"] - m["before"]
    assert m["file"] > 0.2 * m["store"]  # a mapped checkpoint would show: the bound below has teeth
    assert grown <= 1.15 * m["store"], (grown / m["store"], m)
