"""Config -> what a run is: the model's shape, the device, the dtypes, the optimizer mode, and the
settings the shape rules out. Cheap (no weights or data are read) and below every command, so
`train`, `plan`, `probe` and the benchmarks share one answer and the import graph stays a tree.
"""

from __future__ import annotations

import importlib.util

import torch

from megastream.config import Config
from megastream.errors import ConfigError
from megastream.model.spec import ModelSpec, UnsupportedModel
from megastream.presets import HF_PRESETS, PRESETS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# The memory modes (README): name -> (optim.master, optim.states).
MODES = {"full": ("fp32", "fp32"), "lean": ("none", "bf16"), "compact": ("none", "int8")}


def mode_name(cfg: Config) -> str | None:
    return next((k for k, v in MODES.items() if v == (cfg.optim.master, cfg.optim.states)), None)


def resolve_device(cfg: Config) -> torch.device:
    """The device a run uses. A CUDA device always carries its index (the current device), since
    several torch.cuda calls reject an index-less one."""
    want = cfg.engine.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device: 'cuda' was asked for but torch.cuda.is_available() is False (a CPU "
                          "build of torch, or no visible GPU); use engine.device: auto or cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(want)


def plan_device(cfg: Config) -> str:
    """The device type a run of `cfg` will use here ("cuda" / "cpu"), without creating a CUDA context."""
    if cfg.engine.device != "auto":
        return cfg.engine.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def embedding_path(cfg: Config, spec: ModelSpec, device_type: str, distributed: bool = False) -> tuple[str, str]:
    """engine.embedding resolved: ("device" | "host", why). device: the table crosses PCIe into the head's
    weight buffer (a tied model's head buffer is the table, so nothing more crosses), its rows are gathered
    there and its gradient is scatter-added into the head's fp32 accumulator, normed and copied back once;
    host: the rows are gathered from the host working copy and the gradient summed in host memory.
    auto: device on cuda, host on the cpu, and host for LoRA over an untied frozen base (the device path
    would copy the table, and then the head again, every step, where the host path copies only rows).
    Under torchrun (`distributed`) each rank holds a slice of the table: always device (dist.comm refuses
    host)."""
    want, lora = cfg.engine.embedding, cfg.lora
    if lora is not None and "embed_tokens" in lora.train_extra:
        return "device", "lora.train_extra trains embed_tokens: its rows come from the trained copy on the device"
    if distributed:
        return "device", "under torchrun each rank holds a slice of the table: all-gathered on the device"
    if want != "auto":
        return want, f"engine.embedding: {want}"
    if device_type != "cuda":
        return "host", "auto on the CPU"
    if lora is not None and not spec.tie_word_embeddings:
        return "host", "auto for LoRA over an untied base: rows only cross PCIe (the device path copies the table)"
    return "device", "auto on CUDA"


def resolve_dtypes(cfg: Config, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, host gradient staging dtype)."""
    e = cfg.engine
    compute = _DTYPES[e.dtype] if e.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    grad = compute if e.grad_dtype == "auto" else _DTYPES[e.grad_dtype]
    return compute, grad


def model_spec(cfg: Config) -> ModelSpec:
    """The model's shape, from config.json or the preset table (cheap: no weights are read), and
    how its layers run (model.implementation): megastream's own functions, or the transformers
    modules on the generic path (megastream.hf); `auto` takes the native path when it has the model."""
    impl = cfg.model.implementation
    if cfg.model.path is None and cfg.model.preset in HF_PRESETS:  # a generic-path shape
        if impl == "native":
            raise ConfigError(f"model.preset: {cfg.model.preset} runs on the generic path (transformers' own layer "
                              "modules); set model.implementation: auto or hf")
        if importlib.util.find_spec("transformers") is None:
            raise UnsupportedModel(f"model.preset: {cfg.model.preset} runs on the generic path, which needs "
                                   "transformers: pip install 'megastream[hf]'")
        from megastream.hf.spec import spec_from_config

        return spec_from_config(HF_PRESETS[cfg.model.preset], source=f"model.preset {cfg.model.preset}")
    if cfg.model.path is None:
        if impl == "hf":
            raise ConfigError("model.implementation: hf loads a Hugging Face directory (model.path); presets are "
                              "native shapes: use model.implementation: auto or native with model.preset")
        return PRESETS[cfg.model.preset]
    if impl == "hf":
        from megastream.hf import spec_from_dir

        return spec_from_dir(cfg.model.path)
    try:
        return ModelSpec.from_dir(cfg.model.path)
    except UnsupportedModel as native:
        if impl == "native":
            raise
        if importlib.util.find_spec("transformers") is None:
            raise UnsupportedModel(f"{native} The generic path needs transformers: pip install 'megastream[hf]'")
        from megastream.hf import spec_from_dir

        return spec_from_dir(cfg.model.path)


def check_model_inputs(cfg: Config, spec: ModelSpec, log=print) -> None:
    """Settings the model's shape rules out (cheap: before any data or weights are read)."""
    if spec.implementation == "hf" and getattr(cfg, "lora", None) is not None:
        raise ConfigError(f"lora: adapters are trained on the native path only, and {spec.architecture} runs on the "
                          "generic one (model.implementation: hf); drop the lora: section or use a native model")
    if cfg.engine.compile and spec.implementation == "hf":
        raise ConfigError(f"engine.compile compiles megastream's native layer function; {spec.architecture} runs on the "
                          "generic path (transformers' modules): set engine.compile: false")
    if cfg.engine.attention == "flex":
        if spec.implementation == "hf":
            raise ConfigError(f"engine.attention: flex is megastream's native attention; {spec.architecture} runs on the "
                              "generic path (transformers' own attention): set engine.attention: sdpa")
        if plan_device(cfg) == "cpu":
            raise ConfigError("engine.attention: flex on the CPU: torch's FlexAttention has no backward there, so it "
                              "cannot train; set engine.attention: sdpa (or train on a GPU)")
    if cfg.engine.attention == "varlen":
        check_varlen(cfg, spec)
    if spec.sliding_window is not None and cfg.data.seq_len > spec.sliding_window:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's sliding_window={spec.sliding_window}; "
                          "megastream computes full causal attention, which equals sliding-window attention only "
                          f"up to the window: set data.seq_len <= {spec.sliding_window}")
    if cfg.data.seq_len > spec.max_position_embeddings:
        log(f"megastream: warning: data.seq_len={cfg.data.seq_len} exceeds the model's "
            f"max_position_embeddings={spec.max_position_embeddings}; positions beyond it were never trained")


def check_varlen(cfg: Config, spec: ModelSpec) -> None:
    """What `engine.attention: varlen` (model/varlen.py) cannot run: torch's varlen_attn is a CUDA flash
    kernel (bf16 / fp16, head sizes a multiple of 8 up to 256) and megastream calls it from its native
    attention. Sliding-window models are covered by the seq_len check below (full causal attention
    equals the window's up to it); the native path has no soft-capped attention."""
    from megastream.model import varlen

    fix = "set engine.attention: sdpa"
    if spec.implementation == "hf":
        raise ConfigError(f"engine.attention: varlen is megastream's native attention; {spec.architecture} runs on the "
                          f"generic path (transformers' own attention): {fix}")
    if not varlen.available():
        raise ConfigError(f"engine.attention: varlen needs torch.nn.attention.varlen (a recent torch), which torch "
                          f"{torch.__version__} lacks: upgrade torch, or {fix} (or flex)")
    device = plan_device(cfg)
    if device == "cpu":
        raise ConfigError("engine.attention: varlen on the CPU: torch's varlen_attn is a CUDA flash-attention kernel "
                          f"with no CPU implementation; {fix} (or train on a GPU)")
    compute = resolve_dtypes(cfg, torch.device(device))[0]
    if cfg.lora is not None:
        from megastream.memory import lora_base_format

        compute = lora_base_format(cfg, compute)[0]
    if compute not in varlen.DTYPES:
        raise ConfigError(f"engine.attention: varlen: flash attention computes in bfloat16 or float16, and this run "
                          f"computes in {str(compute)[6:]} (engine.dtype, lora.base_dtype): set engine.dtype: "
                          f"bfloat16, or {fix}")
    hd = spec.head_dim
    if hd > varlen.MAX_HEAD_DIM or hd % varlen.HEAD_DIM_MULTIPLE:
        raise ConfigError(f"engine.attention: varlen: flash attention takes head_dim a multiple of "
                          f"{varlen.HEAD_DIM_MULTIPLE} up to {varlen.MAX_HEAD_DIM}, and {spec.architecture} has "
                          f"head_dim={hd}: {fix} (or flex)")
    if cfg.engine.compile:
        raise ConfigError("engine.compile with engine.attention: varlen: the compiled layer would specialise on each "
                          "micro-batch's longest document (a Python int the kernel takes) and recompile for every new "
                          "length; set engine.compile: false (the attention is a flash kernel already), or "
                          "engine.attention: sdpa or flex")


def tokenizer_path(cfg: Config):
    """The tokenizer.json for text and chat rows: data.tokenizer, else the model's, else (for a preset)
    the demo's; None when there is none (pre-tokenized data needs none)."""
    from pathlib import Path

    from megastream.tokenizer import DEMO_TOKENIZER

    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.model.path and (Path(cfg.model.path) / "tokenizer.json").is_file():
        return Path(cfg.model.path) / "tokenizer.json"
    return DEMO_TOKENIZER if cfg.model.preset else None
