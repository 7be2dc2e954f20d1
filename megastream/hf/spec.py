"""The ModelSpec of a model run through the generic unit: its shape fields read from the
`transformers` config (for the plan and the engine's buffers), and each unit's parameters as the
real module names and shapes them (model/layout.py builds the flat layout from them)."""

from __future__ import annotations

from pathlib import Path

from megastream.hf.names import checkpoint_map, checkpoint_names
from megastream.hf.unit import meta_model, unit_params
from megastream.model.spec import ModelSpec, read_hf_config


def spec_from_dir(path: str | Path) -> ModelSpec:
    """The spec of a Hugging Face model directory (config.json + safetensors), cheap: no weights read."""
    cfg, p = read_hf_config(path)
    return spec_from_config(cfg, source=str(p), names=checkpoint_names(path))


def spec_from_config(cfg: dict, source: str = "config.json", names: set[str] | None = None) -> ModelSpec:
    """`names`: the checkpoint's tensor names (they choose the expert layout); None for a model
    that has no checkpoint yet."""
    parts = meta_model(cfg, "cpu", source)
    c = parts.config
    units = []
    for name, params in unit_params(parts):
        files = checkpoint_map(c.model_type, params, names) if name.startswith("layer.") else None
        units.append((name, tuple(params), None if files is None else tuple(files)))
    heads = c.num_attention_heads
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    ffn = c.intermediate_size
    if experts:  # the plan's FLOPs and activations: the width a token passes through
        ffn = (getattr(c, "moe_intermediate_size", None) or ffn) * c.num_experts_per_tok \
              + (getattr(c, "shared_expert_intermediate_size", None) or 0)
    rope = getattr(c, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    return ModelSpec(
        architecture=type(parts.model).__name__,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=ffn,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        rms_norm_eps=float(getattr(c, "rms_norm_eps", None) or 1e-6),
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) or 10000.0),
        tie_word_embeddings=parts.tied,
        max_position_embeddings=int(getattr(c, "max_position_embeddings", None) or 4096),
        initializer_range=float(getattr(c, "initializer_range", None) or 0.02),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        extra={k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg},
        implementation="hf",
        hf_config=dict(cfg),
        hf_units=tuple(units),
    )
