"""Run configuration: a frozen dataclass tree that the YAML file mirrors key for key.

Everything is checked before any work starts: unknown keys, wrong types, impossible values and
missing files all raise `ConfigError` naming the file, the dotted key and what is allowed.
Relative input paths in a YAML file (model.path, data.path, data.tokenizer) are resolved against
that file's directory, so a config and its data travel together; output.dir and every path given
with `--set` are relative to the current directory.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from megastream.errors import ConfigError, MegastreamError
from megastream.presets import HF_PRESETS, PRESETS


@dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = None  # Hugging Face directory: config.json + *.safetensors
    preset: Optional[str] = None  # or a named shape (megastream.presets), randomly initialised
    seed: int = 0  # init seed for presets
    # native: megastream's own layer functions (Llama, Mistral, Qwen2, Qwen3); hf: the transformers layer
    # module itself, streamed like any unit (any decoder-only model; needs transformers); auto: native when
    # megastream has the model, else hf
    implementation: Literal["native", "hf", "auto"] = "auto"


@dataclass(frozen=True)
class DataConfig:
    path: Union[str, tuple[str, ...]] = ""  # .jsonl file, a list of them, or a directory of them
    overflow: Literal["truncate", "drop", "error"] = "truncate"  # pre-tokenized / chat rows longer than seq_len
    # Packing documents into seq_len rows (attention blocked across them): bfd (best-fit decreasing),
    # greedy (in order), wrap (raw text cut at seq_len); true = bfd, false = one padded row per document.
    pack: Union[Literal["bfd", "greedy", "wrap"], bool] = "bfd"
    val_path: Union[str, tuple[str, ...], None] = None  # validation data, same formats; see train.eval_every
    seq_len: int = 512
    shuffle: bool = True
    tokenizer: Optional[str] = None  # tokenizer.json for text rows; default: the model's, else the demo's
    split: str = "train"  # the split of a `datasets` DatasetDict directory
    columns: Optional[dict[str, str]] = None  # {megastream field: your field}, e.g. {text: body}
    cache_dir: Optional[str] = None  # token cache; default: .megastream-cache beside output.dir
    workers: int = 0  # tokenizing processes; 0 = one per core


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps
    micro_batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
    lr: float = 1.0e-5
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr: float = 0.0
    weight_decay: float = 0.0  # decays 2-D weights (incl. embeddings), not norms or biases
    grad_clip: float = 1.0  # global L2 norm; 0 disables
    seed: int = 0
    eval_every: int = 0  # eval loss on data.val_path every N steps (and after the last); 0 disables
    max_nonfinite_steps: int = 5  # a non-finite loss/grad norm skips the update; this many in a row stop the run


@dataclass(frozen=True)
class OptimConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    master: Literal["fp32", "none"] = "fp32"  # none: the bf16 weights are updated with stochastic rounding
    states: Literal["fp32", "bf16", "int8"] = "fp32"  # AdamW moments; int8: blockwise, dynamic-exponent code
    # global: clip by this step's global norm, updates after the whole backward (exact); previous: each unit
    # updated as soon as its gradient lands, clipped by the previous step's norm (no whole-model staging)
    clip: Literal["global", "previous"] = "global"


@dataclass(frozen=True)
class EngineConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # compute dtype; auto: bf16 on cuda, fp32 on cpu
    grad_dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # host gradient staging; auto: compute dtype
    # tokens per LM-head chunk; 0: automatic (fp32 logits near 256 MiB; on CUDA grown into the plan's free GPU memory)
    loss_chunk_tokens: int = 0
    threads: int = 0  # CPU threads for torch; 0: torch's default
    gpu_memory_gb: float = 0.0  # cap this process's GPU memory (e.g. 24 to act like a 24 GB card); 0: the whole GPU
    activations: Literal["device", "host"] = "device"  # layer-boundary checkpoints: on the device, or offloaded
    # the embedding's row gather and gradient scatter-add: on the device (the table streamed into the head's
    # buffer, its gradient built in the head's accumulator) or on the host; auto: device on cuda, host on the cpu
    embedding: Literal["auto", "host", "device"] = "auto"
    # packed rows' document mask: sdpa (a dense boolean mask), flex (FlexAttention, block-sparse; CUDA to train)
    # or varlen (flash attention over each document, no mask; CUDA, bf16)
    attention: Literal["sdpa", "flex", "varlen"] = "sdpa"
    compile: bool = False  # torch.compile the native layer function (forward, and backward's recompute)
    # mixture-of-experts layers (model.implementation: hf): stream all experts, or only those the step's tokens route to
    moe_streaming: Literal["whole", "routed"] = "whole"
    # torchrun jobs: seconds a collective may wait for another rank before the job fails (a rank that died
    # makes the others exit instead of hanging for torch's default 30 minutes)
    dist_timeout_s: float = 300.0


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/demo"
    save_every: int = 0  # resumable checkpoint-<step>/ every N steps; 0 = only final/ at the end
    keep_last: int = 0  # keep only the newest N checkpoints; 0 = keep all
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # saved weights; auto: the source's
    shard_size_gb: float = 5.0
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard scalars to output.dir/tensorboard (needs `tensorboard`)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_EXTRA = ("embed_tokens", "lm_head")  # what lora.train_extra may name


@dataclass(frozen=True)
class LoraConfig:
    """Adapters over a frozen base (a `lora:` section, even an empty one, turns them on)."""
    rank: int = 16
    alpha: float = 32.0  # scaling = alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.05  # on the input of A, in training only
    target_modules: Union[Literal["all-linear"], tuple[str, ...]] = LORA_TARGETS
    rslora: bool = False
    init: Optional[str] = None  # a PEFT adapter directory to start from
    base_dtype: Literal["auto", "bf16", "float32", "int8", "nf4"] = "auto"  # auto: the compute dtype
    merge: bool = False  # also write the merged full model (output.dir/merged) at the end
    # modules trained in full beside the adapters (saved as PEFT modules_to_save): embed_tokens, lm_head
    train_extra: Union[tuple[()], tuple[str, ...]] = ()


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    lora: Optional[LoraConfig] = None  # None: full fine-tuning

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.lora is None:  # a full fine-tuning run's config.yaml has no lora section, as before
            del d["lora"]
        return d


# Input paths, resolved against the YAML file's directory.
_PATH_KEYS = {"model.path", "data.path", "data.val_path", "data.tokenizer", "lora.init"}


def load_config(path: str | os.PathLike, overrides: list[str] = (), log=None) -> Config:
    """Load a YAML file, apply `--set key=value` overrides, validate, return a frozen Config.
    Where an override contradicts a value from the file, the file's value follows it (see
    `_follow_set_keys`), with a note to `log` (default: stderr)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path to a YAML file "
                          f"(e.g. configs/demo.yaml).")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(f.name for f in dataclasses.fields(Config))}).")
    base = path.resolve().parent
    _resolve_paths(raw, base)
    from_file = copy.deepcopy(raw)
    set_keys = {_apply_override(raw, item) for item in overrides}
    notes = _follow_set_keys(raw, from_file, set_keys, path.name)
    cfg = build_config(raw, source=str(path))
    for note in notes:
        (log or _stderr)(f"megastream: note: {note}")
    return cfg


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _follow_set_keys(raw: dict, from_file: dict, set_keys: set[str], source: str) -> list[str]:
    """Values from the file that depend on a value `--set` changed follow it (README, "Config
    reference"): `train.min_lr` keeps its ratio to `train.lr` (so it can never end up above it);
    `train.warmup_steps` is capped at `train.steps`; `model.preset` and `model.path` replace each
    other. `raw` is changed in place; returns one note per change. Values the user wrote in the same
    place (both in the file, or both on the command line) are left alone, and `lr` and `steps` never
    follow: a contradiction there is the user's own, and validation reports it."""
    notes: list[str] = []
    train, file_train = raw.get("train"), from_file.get("train") or {}
    if isinstance(train, dict) and isinstance(file_train, dict):
        if "train.lr" in set_keys and "train.min_lr" not in set_keys and "min_lr" in file_train:
            ok_new, lr = _coerce(train.get("lr"), float)
            ok_old, file_lr = _coerce(file_train.get("lr", TrainConfig.lr), float)
            ok_min, file_min = _coerce(file_train["min_lr"], float)
            if ok_new and ok_old and ok_min and lr > 0 and file_lr > 0 and file_min >= 0 and lr != file_lr:
                ratio = file_min / file_lr
                train["min_lr"] = min_lr = float(f"{lr * ratio:.12g}")
                notes.append(f"train.min_lr {file_min:g} (from {source}) follows train.lr {file_lr:g} -> {lr:g} "
                             f"(from --set): now {min_lr:g}, {ratio:g} x train.lr as in the file")
        if "train.steps" in set_keys and "train.warmup_steps" not in set_keys:
            ok_steps, steps = _coerce(train.get("steps"), int)
            ok_warm, warm = _coerce(file_train.get("warmup_steps", TrainConfig.warmup_steps), int)
            if ok_steps and ok_warm and steps >= 1 and warm > steps:
                train["warmup_steps"] = steps
                notes.append(f"train.warmup_steps {warm} (from {source}) capped at train.steps={steps} (from --set): "
                             f"the whole run warms up")
    model, file_model = raw.get("model"), from_file.get("model") or {}
    if isinstance(model, dict) and isinstance(file_model, dict):
        for key, other in (("preset", "path"), ("path", "preset")):
            if (f"model.{key}" in set_keys and model.get(key) is not None and f"model.{other}" not in set_keys
                    and file_model.get(other) is not None):
                model[other] = None
                notes.append(f"model.{other} {file_model[other]} (from {source}) is replaced by model.{key} "
                             f"{model[key]} (from --set)")
    return notes


def build_config(raw: dict, source: str = "<config>") -> Config:
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    if not errors:
        _check_values(cfg, errors)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"{source}: invalid configuration:\n{lines}")
    return cfg


def _resolve_paths(raw: dict, base: Path) -> None:
    for dotted in _PATH_KEYS:
        section, key = dotted.split(".")
        sec = raw.get(section)
        if not isinstance(sec, dict):
            continue
        value = sec.get(key)
        if isinstance(value, str) and value:
            sec[key] = _resolve(value, base)
        elif isinstance(value, list):
            sec[key] = [_resolve(v, base) if isinstance(v, str) and v else v for v in value]


def _resolve(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def _apply_override(raw: dict, item: str) -> str:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-5")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"--set {item!r}: the key must be SECTION.NAME, e.g. train.lr")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"--set {item!r}: section {parts[0]!r} is not a mapping in the config file")
    section[parts[1]] = value
    return f"{parts[0]}.{parts[1]}"


def _build(cls, raw: Any, prefix: str, errors: list[str]):
    if raw is None:  # an empty section (`train:` with nothing under it)
        raw = {}
    if not isinstance(raw, dict):
        names = ", ".join(f.name for f in dataclasses.fields(cls))
        errors.append(f"{prefix.rstrip('.') or 'top level'}: expected a mapping of keys ({names}), "
                      f"got {type(raw).__name__} {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}{key}"
            errors.append(f"{where}: unknown key; allowed under {prefix.rstrip('.') or 'the top level'}: "
                          f"{', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = _optional_section(hints[name])
        where = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], where + ".", errors)
        else:
            ok, value = _coerce(raw[name], tp)
            if ok:
                kwargs[name] = value
            else:
                errors.append(f"{where}: expected {_describe(tp)}, got {raw[name]!r}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        errors.append(f"{prefix}: {e}")
        return cls()


def _optional_section(tp):
    """Optional[SomeSection] -> SomeSection: a section that is off unless present (lora)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if dataclasses.is_dataclass(inner):
            return inner
    return tp


def _coerce(value: Any, tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is not type(None):
                ok, v = _coerce(value, a)
                if ok:
                    return True, v
        return False, None
    if origin is Literal:
        return (value in args, value)
    if origin is dict:  # a mapping of str -> str
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return ok, dict(value) if ok else None
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: a non-empty list
        if not isinstance(value, (list, tuple)) or not value:
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, args[0])
            if not ok:
                return False, None
            out.append(c)
        return True, tuple(out)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, None
        out = []
        for v, a in zip(value, args):
            ok, c = _coerce(v, a)
            if not ok:
                return False, None
            out.append(c)
        return True, tuple(out)
    if tp is bool:
        return (isinstance(value, bool), value)
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool), value)
    if tp is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, str):  # YAML 1.1 reads `3e-5` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return True, float(value)
        return False, None
    if tp is str:
        return (isinstance(value, str), value)
    return False, None  # pragma: no cover


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is dict:
        return "a mapping of names to names"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a non-empty list of {_describe(args[0])}s"
    if origin is tuple and not args:
        return "an empty list"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _check_values(cfg: Config, errors: list[str]) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            errors.append(f"{key}: {msg}")

    m, d, t, o, e, out = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.engine, cfg.output
    need((m.path is None) != (m.preset is None), "model",
         "set exactly one of model.path (a Hugging Face directory) or model.preset "
         f"({', '.join([*PRESETS, *HF_PRESETS])})")
    if m.preset is not None:
        need(m.preset in PRESETS or m.preset in HF_PRESETS, "model.preset",
             f"unknown preset {m.preset!r}; known: {', '.join(PRESETS)}; on the generic path: {', '.join(HF_PRESETS)}")
    if m.path is not None:
        p = Path(m.path)
        if not p.is_dir():
            errors.append(f"model.path: {m.path} is not a directory; point it at a Hugging Face model "
                          "directory holding config.json and *.safetensors")
        elif not (p / "config.json").is_file():
            errors.append(f"model.path: {m.path} has no config.json; it must be a Hugging Face model directory")
        elif not any(p.glob("*.safetensors")):
            errors.append(f"model.path: {m.path} has no *.safetensors files; megastream reads safetensors "
                          "only (convert .bin weights with `transformers` save_pretrained)")
    need(bool(d.path), "data.path", "required: a .jsonl file of {\"input_ids\": [...]} or {\"text\": ...} rows, "
         "a list of such files, or a directory of them")
    for key, value in (("data.path", d.path), ("data.val_path", d.val_path)):
        for p in ([value] if isinstance(value, str) else value) if value else []:
            if not Path(p).exists():
                errors.append(f"{key}: {p} does not exist")
                continue
            from megastream.data.sources import list_sources  # light: no torch

            try:
                list_sources(p, d.split)
            except MegastreamError as err:
                errors.append(f"{key}: {err}")
    need(d.workers >= 0, "data.workers", f"must be >= 0 (0 = one per core), got {d.workers}")
    need(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 disables), got {t.eval_every}")
    need(not t.eval_every or d.val_path is not None, "train.eval_every",
         "needs data.val_path (the validation data to evaluate)")
    if d.tokenizer:
        need(Path(d.tokenizer).is_file(), "data.tokenizer", f"{d.tokenizer} does not exist (a tokenizer.json)")
    need(d.seq_len >= 2, "data.seq_len", f"must be >= 2 (one input and one label), got {d.seq_len}")
    need(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    need(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    # Bounds that name another key are checked only when that key is valid: one mistake, one error.
    if t.lr > 0:
        need(0 <= t.min_lr <= t.lr, "train.min_lr", f"must be between 0 and train.lr ({t.lr:g}), got {t.min_lr:g}")
    else:
        need(t.min_lr >= 0, "train.min_lr", f"must be >= 0, got {t.min_lr:g}")
    if t.steps >= 1:
        need(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
             f"must be between 0 and train.steps ({t.steps}), got {t.warmup_steps}")
    else:
        need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    need(all(0 <= b < 1 for b in o.betas), "optim.betas", f"each beta must be in [0, 1), got {list(o.betas)}")
    need(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    need(e.loss_chunk_tokens >= 0, "engine.loss_chunk_tokens",
         f"must be >= 0 (0 = automatic), got {e.loss_chunk_tokens}")
    need(e.gpu_memory_gb >= 0, "engine.gpu_memory_gb", f"must be >= 0 (0 = the whole GPU), got {e.gpu_memory_gb}")
    need(e.dist_timeout_s > 0, "engine.dist_timeout_s", f"must be > 0 seconds, got {e.dist_timeout_s}")
    need(cfg.lora is None or o.clip == "global", "optim.clip",
         "previous applies to full fine-tuning (the host optimizer); LoRA adapters are updated on the device right "
         "after the backward, clipped by the step's own norm: set optim.clip: global")
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", f"must be >= 1, got {t.max_nonfinite_steps}")
    need(e.threads >= 0, "engine.threads", f"must be >= 0 (0 = torch's default), got {e.threads}")
    need(bool(out.dir), "output.dir", "required: the directory for metrics and checkpoints")
    need(out.save_every >= 0, "output.save_every", f"must be >= 0 (0 = only at the end), got {out.save_every}")
    need(out.keep_last >= 0, "output.keep_last", f"must be >= 0 (0 = keep all), got {out.keep_last}")
    need(out.shard_size_gb > 0, "output.shard_size_gb", f"must be > 0, got {out.shard_size_gb}")
    if cfg.lora is not None:
        _check_lora(cfg.lora, need, errors)


def _check_lora(lo: LoraConfig, need, errors: list[str]) -> None:
    need(lo.rank >= 1, "lora.rank", f"must be >= 1, got {lo.rank}")
    need(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha:g}")
    need(0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout:g}")
    if lo.target_modules != "all-linear":
        unknown = [t for t in lo.target_modules if t not in LORA_TARGETS]
        whole = [t for t in unknown if t in LORA_EXTRA]
        need(not unknown, "lora.target_modules",
             f"unknown module(s) {', '.join(map(repr, unknown))}; the models megastream adapts (Llama, Mistral, "
             f"Qwen2, Qwen3) have the linear projections {', '.join(LORA_TARGETS)} in every layer: list some of "
             "them, or all-linear" + (f". {' and '.join(whole)} take no adapter: train them in full with "
                                      f"lora.train_extra: [{', '.join(whole)}]" if whole else ""))
        dup = sorted({t for t in lo.target_modules if lo.target_modules.count(t) > 1})
        need(not dup, "lora.target_modules", f"{', '.join(dup)} listed more than once")
    unknown = [m for m in lo.train_extra if m not in LORA_EXTRA]
    need(not unknown, "lora.train_extra",
         f"{', '.join(map(repr, unknown))} cannot be trained in full; allowed: {', '.join(LORA_EXTRA)} (the input "
         "embedding and the output head; the projections take adapters through lora.target_modules)")
    dup = sorted({m for m in lo.train_extra if lo.train_extra.count(m) > 1})
    need(not dup, "lora.train_extra", f"{', '.join(dup)} listed more than once")
    if lo.init is not None:
        p = Path(lo.init)
        if not p.is_dir():
            errors.append(f"lora.init: {lo.init} is not a directory; point it at a PEFT adapter directory "
                          "(adapter_config.json + adapter_model.safetensors)")
        elif not (p / "adapter_config.json").is_file():
            errors.append(f"lora.init: {lo.init} has no adapter_config.json; it must be a PEFT adapter directory "
                          "(written by save_pretrained of a PeftModel, or megastream's final/)")
