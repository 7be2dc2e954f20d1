"""Checkpoint tensor names <-> the generic unit's parameters: where a Hugging Face checkpoint does
not store the module's parameters under the module's own names, this is the one table of how.

Dense models store every parameter as the module names it. A mixture of experts is the exception:
transformers >= 5 holds each layer's experts as two fused 3-D parameters,
`...experts.gate_up_proj` (E, 2I, H: each expert's gate rows, then its up rows) and
`...experts.down_proj` (E, H, I), while its `save_pretrained` and every released checkpoint store
them one expert at a time (`experts.{e}.w1/w3/w2` in Mixtral, under `block_sparse_moe`;
`experts.{e}.gate_proj/up_proj/down_proj` in Qwen-MoE). Each of those tensors is a contiguous
range of the fused parameter, so load and save copy it in place (megastream.checkpoint streams
them like any tensor). Both layouts load; a model is saved back in the layout it was loaded from.
"""

from __future__ import annotations

import json
from pathlib import Path

from megastream.errors import CheckpointError
from megastream.model.spec import UnsupportedModel

# model_type -> (checkpoint name of the module's "mlp", gate, up, down) for experts saved one by one
PER_EXPERT = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}
_FUSED = (".experts.gate_up_proj", ".experts.down_proj")


def checkpoint_names(model_dir: str | Path) -> set[str]:
    """The tensor names a model directory holds, from the safetensors index or the files' headers
    (a few kB each: no tensor is read)."""
    from megastream.checkpoint import _weight_files

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            return set(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}); re-save the model") from None
    names: set[str] = set()
    for f in _weight_files(model_dir):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{f}: the safetensors header is corrupt or truncated; re-download it") from None
        names.update(k for k in header if k != "__metadata__")
    return names


def checkpoint_map(model_type: str, params: list[tuple[str, str, tuple[int, ...]]], names: set[str] | None):
    """For one layer's parameters [(key, module name, shape)], the checkpoint tensors
    [(checkpoint name, key, element offset within the parameter, shape)], or None when the
    checkpoint names them as the module does. `names`: the checkpoint's tensor names (None: a
    model with no checkpoint yet, saved per expert as transformers saves it)."""
    fused = [full for _, full, _ in params if full.endswith(_FUSED)]
    if not fused or (names is not None and all(f in names for f in fused)):
        return None
    if model_type not in PER_EXPERT:
        raise UnsupportedModel(f"{model_type}: the checkpoint does not hold the fused expert tensors "
                               f"({fused[0]}, ...), and megastream does not know how {model_type} names its experts "
                               f"one by one (known: {', '.join(PER_EXPERT)})")
    block, gate, up, down = PER_EXPERT[model_type]
    out = []
    for key, full, shape in params:
        name = full.replace(".mlp.", f".{block}.", 1)
        if full.endswith(".experts.gate_up_proj"):
            E, I2, H = shape
            base = name[:-len(".gate_up_proj")]
            for e in range(E):
                out.append((f"{base}.{e}.{gate}.weight", key, e * I2 * H, (I2 // 2, H)))
                out.append((f"{base}.{e}.{up}.weight", key, e * I2 * H + I2 // 2 * H, (I2 // 2, H)))
        elif full.endswith(".experts.down_proj"):
            E, H, I = shape
            base = name[:-len(".down_proj")]
            out += [(f"{base}.{e}.{down}.weight", key, e * H * I, (H, I)) for e in range(E)]
        elif ".experts." in full:
            raise UnsupportedModel(f"{model_type}: expert parameter {full} has no per-expert checkpoint name in "
                                   "megastream's table")
        else:
            out.append((name, key, 0, shape))
    return out
