"""ModelSpec: the shape of a Llama-family model, read from (and written back to) a Hugging Face
config.json. Both the transformers 4.x layout (`rope_theta` + `rope_scaling`) and the 5.x layout
(`rope_parameters`) are understood.

A spec with `implementation: "hf"` describes any decoder-only `transformers` model run through the
generic unit (megastream.hf): its shape fields are read from the `transformers` config, and
`hf_units` holds each unit's parameters as the real module names and shapes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megastream.errors import CheckpointError

# architecture name in config.json -> model_type
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedModel(CheckpointError):
    """The native path does not implement this model (`model.implementation: auto` then tries the
    generic path, megastream.hf)."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # "LlamaForCausalLM" | "Qwen2ForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always; Llama: attention_bias
    o_bias: bool = False  # Llama attention_bias also biases o_proj
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: Optional[int] = None  # Mistral v0.1: attention window (must cover data.seq_len)
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"  # dtype the weights were published in
    extra: dict = field(default_factory=dict)  # bos/eos/pad ids etc., carried to the saved config
    # "native": model/llama.py's functions; "hf": the transformers layer module itself (megastream.hf)
    implementation: str = "native"
    hf_config: Optional[dict] = None  # hf: the config.json the module is built from
    # hf: per unit, (name, ((key, module name, shape), ...) in the module's order, checkpoint map or None),
    # the checkpoint map being ((checkpoint name, key, element offset in that parameter, shape), ...)
    # where the checkpoint's tensors are not the module's parameters (MoE experts saved one by one)
    hf_units: tuple = ()

    @property
    def model_type(self) -> str:
        if self.hf_config is not None:
            return self.hf_config.get("model_type", "")
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelSpec":
        archs = cfg.get("architectures") or []
        by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
        arch = archs[0] if archs else by_type.get(cfg.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"{source}: architecture {arch or cfg.get('model_type')!r} is not supported natively; "
                f"megastream's native path trains {', '.join(SUPPORTED_ARCHITECTURES)} (model.implementation: "
                "hf runs other decoder-only transformers models).")

        def need(key):
            if key not in cfg:
                raise CheckpointError(f"{source}: missing required key {key!r} for {arch}")
            return cfg[key]

        unsupported = []
        if cfg.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu')")
        if cfg.get("mlp_bias", False):
            unsupported.append("mlp_bias=true")
        if cfg.get("use_sliding_window", False):  # Qwen2/3: off in every released checkpoint
            unsupported.append("use_sliding_window=true")
        if cfg.get("pretraining_tp", 1) != 1:
            unsupported.append(f"pretraining_tp={cfg['pretraining_tp']}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope = dict(rope)
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            unsupported.append(f"rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if unsupported:
            raise UnsupportedModel(f"{source}: unsupported setting(s) for megastream's native path: "
                                   f"{'; '.join(unsupported)} (model.implementation: hf runs them through "
                                   "transformers).")

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        is_qwen2 = arch == "Qwen2ForCausalLM"
        bias = bool(cfg.get("attention_bias", False))  # Llama / Qwen3: biases on q, k, v and o
        extra = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=dict(rope, rope_type="llama3") if rope_type == "llama3" else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else bias,
            o_bias=False if is_qwen2 else bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=cfg.get("sliding_window") if arch == "MistralForCausalLM" else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            extra=extra,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelSpec":
        cfg, p = read_hf_config(path)
        return cls.from_hf_config(cfg, source=str(p))

    def to_hf_config(self, dtype: str) -> dict:
        """A config.json that `transformers` loads as this architecture."""
        if self.hf_config is not None:  # the generic path: the config it was built from, as it was
            return {**{k: v for k, v in self.hf_config.items() if k != "dtype"}, "torch_dtype": dtype}
        cfg = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "torch_dtype": dtype,
            **self.extra,
        }
        if self.model_type in ("llama", "qwen3"):
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = False
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def read_hf_config(path: str | Path) -> tuple[dict, Path]:
    """(config.json of a Hugging Face model directory, its path); a clear error when missing or broken."""
    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text()), p
    except FileNotFoundError:
        raise CheckpointError(f"{p} not found: model.path must be a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e}); re-download or re-save the model") from None
