"""Validation loss (data.val_path, train.eval_every) is the loss of the model as it stands after
the step, over the whole validation set: checked against transformers on the saved model."""

import torch
import torch.nn.functional as F

from helpers import make_hf_model, read_metrics, run_cli, write_config, write_ids


def test_eval_loss_matches_transformers_on_the_final_model(tmp_path):
    import transformers

    make_hf_model("qwen2", tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    train_rows = [torch.randint(0, 80, (10,), generator=g).tolist() for _ in range(8)]
    val_rows = [torch.randint(0, 80, (n,), generator=g).tolist() for n in (10, 7, 9, 4, 10)]
    cfg = write_config(tmp_path / "run.yaml", {
        "model": {"path": str(tmp_path / "model")},
        "data": {"path": str(write_ids(tmp_path / "train.jsonl", train_rows)), "seq_len": 10, "pack": False,
                 "val_path": str(write_ids(tmp_path / "val.jsonl", val_rows))},
        "train": {"steps": 3, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "eval_every": 2},
        "engine": {"device": "cpu", "dtype": "float32"},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    })
    run_cli("train", str(cfg))
    metrics = read_metrics(tmp_path / "run")
    assert ["eval_loss" in m for m in metrics] == [False, True, True]  # every 2 steps, and after the last
    assert metrics[1]["eval_loss"] != metrics[2]["eval_loss"]

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32)
    total, n = 0.0, 0
    with torch.no_grad():
        for r in val_rows:
            logits = model(input_ids=torch.tensor([r])).logits[0, :-1]
            total += float(F.cross_entropy(logits, torch.tensor(r[1:]), reduction="sum"))
            n += len(r) - 1
    assert metrics[2]["eval_tokens"] == n
    assert abs(metrics[2]["eval_loss"] - total / n) <= 1e-4 * total / n


def test_eval_every_needs_val_path(tmp_path):
    data = write_ids(tmp_path / "train.jsonl", [[1, 2, 3]])
    cfg = write_config(tmp_path / "run.yaml", {"model": {"preset": "tiny"}, "data": {"path": str(data)},
                                               "train": {"eval_every": 5}, "output": {"dir": str(tmp_path / "o")}})
    proc = run_cli("train", str(cfg), check=False)
    assert proc.returncode == 2 and "train.eval_every" in proc.stderr and "data.val_path" in proc.stderr
