"""LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

A directory written here is what `peft.PeftModel.from_pretrained(base, dir)` loads unchanged, and
one written by peft (`save_pretrained`) is what `lora.init` continues from. The format:

* `adapter_model.safetensors` keys are the base model's module paths under `base_model.model.`,
  with no adapter name: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (shape
  (r, in)) and `...lora_B.weight` (shape (out, r)); a module trained in full (peft's
  `modules_to_save`, megastream's `lora.train_extra`) is saved as its plain weight,
  `base_model.model.model.embed_tokens.weight` / `base_model.model.lm_head.weight` (peft strips the
  `modules_to_save.<adapter>` part on save and puts it back on load).
* `adapter_config.json` holds peft's LoraConfig fields: `peft_type: LORA`, `task_type: CAUSAL_LM`,
  `r`, `lora_alpha`, `lora_dropout`, `use_rslora`, `target_modules` (module-name suffixes),
  `modules_to_save`, `base_model_name_or_path`, ...

Here tensors are keyed by the Hugging Face module path plus `.lora_A` / `.lora_B`
("model.layers.0.self_attn.q_proj.lora_A"), and full modules by their path ("model.embed_tokens",
"lm_head"). The effective update of a target's weight W (out, in) is `scaling * B @ A`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from megastream.errors import CheckpointError, ConfigError, ResourceError
from megastream.model.spec import ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # older peft (and some trainers) wrote a torch pickle
_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# modules trained in full (lora.train_extra / peft modules_to_save): short name -> module path
EXTRA_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}

# LoraConfig features megastream does not train: (key, value meaning "off", what it is)
_UNSUPPORTED = (
    ("use_dora", False, "DoRA (use_dora)"),
    ("lora_bias", False, "trainable LoRA biases (lora_bias)"),
    ("rank_pattern", {}, "per-module ranks (rank_pattern)"),
    ("alpha_pattern", {}, "per-module alphas (alpha_pattern)"),
    ("layers_to_transform", None, "adapters on some layers only (layers_to_transform)"),
    ("layer_replication", None, "layer replication (layer_replication)"),
    ("trainable_token_indices", None, "trainable token rows (trainable_token_indices)"),
    ("target_parameters", None, "LoRA on raw parameters (target_parameters)"),
    ("fan_in_fan_out", False, "transposed (Conv1D-style) weights (fan_in_fan_out)"),
    ("bias", "none", "trained biases (bias)"),
)


# ---- shapes and scaling ----------------------------------------------------------------------------
def resolve_targets(target_modules, spec: ModelSpec) -> tuple[str, ...]:
    """`lora.target_modules` -> the projection names, in LINEAR_TARGETS order. "all-linear" is all
    seven (peft's meaning too: every linear layer but the output head); a single name is a list of one."""
    have = ", ".join(LINEAR_TARGETS)
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return LINEAR_TARGETS
        target_modules = [target_modules]
    names = list(target_modules or ())
    if not names:
        raise ConfigError(f"lora.target_modules is empty: name the projections to adapt ({have}) or write "
                          "\"all-linear\" for all of them")
    unknown = [n for n in names if n not in LINEAR_TARGETS]
    if unknown:
        hint = ""
        if any(n in EXTRA_MODULES for n in unknown):
            hint = (" embed_tokens and lm_head are not LoRA targets here: list them in lora.train_extra to train "
                    "them in full (saved as PEFT modules_to_save).")
        raise ConfigError(f"lora.target_modules: {', '.join(map(repr, unknown))} is not a module of "
                          f"{spec.architecture}; its layers have {have} (or write \"all-linear\" for all seven)."
                          + hint)
    return tuple(n for n in LINEAR_TARGETS if n in names)


def _check_rank(rank, what: str = "lora.rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"{what} must be a positive integer (typically 8, 16 or 64), got {rank!r}")
    return rank


def module_path(i: int, target: str) -> str:
    """"model.layers.{i}.self_attn.q_proj" for layer i's projection `target`."""
    return f"model.layers.{i}.{_PARENT[target]}.{target}"


def _in_out(spec: ModelSpec, target: str) -> tuple[int, int]:
    H, I, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_size, spec.kv_size
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}[target]


def adapter_shapes(spec: ModelSpec, targets: Iterable[str],
                   rank: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """HF module path -> (A shape (r, in), B shape (out, r)), for every layer and target."""
    _check_rank(rank)
    out = {}
    for i in range(spec.num_layers):
        for t in targets:
            fan_in, fan_out = _in_out(spec, t)
            out[module_path(i, t)] = ((rank, fan_in), (fan_out, rank))
    return out


def extra_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Full-module path -> weight shape, for the modules lora.train_extra may name."""
    return {"model.embed_tokens": (spec.vocab_size, spec.hidden_size), "lm_head": (spec.vocab_size, spec.hidden_size)}


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (use_rslora)."""
    _check_rank(rank)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# ---- save ------------------------------------------------------------------------------------------
def _extra_path(name: str) -> str:
    if name in EXTRA_MODULES:
        return EXTRA_MODULES[name]
    if name in EXTRA_MODULES.values():
        return name
    raise ConfigError(f"lora.train_extra: {name!r} cannot be trained in full; the choices are "
                      f"{', '.join(EXTRA_MODULES)}")


def save_adapter(dir, tensors: dict[str, torch.Tensor], *, rank: int, alpha: float, dropout: float,
                 targets: Iterable[str], rslora: bool, base_model_name_or_path: Optional[str],
                 modules_to_save: Optional[Iterable[str]] = None,
                 extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write `tensors` (keyed "<module path>.lora_A" / ".lora_B", and "model.embed_tokens" /
    "lm_head" for `modules_to_save`) as a PEFT adapter directory `dir`. Everything is written into
    a temporary directory beside `dir` and renamed into place, so a failure leaves an existing `dir`
    as it was; `dir` is replaced as a whole (`extra(tmp_dir)` may add files, e.g. the tokenizer,
    before the rename). Host tensors are written in their own dtype; NaN or infinity is refused."""
    from megastream.checkpoint import NonFiniteWeights, _replace_dir, write_safetensors

    dir = Path(dir)
    rank = _check_rank(rank)
    targets = tuple(targets)
    bad = [t for t in targets if t not in LINEAR_TARGETS]
    if bad or not targets:
        raise ValueError(f"save_adapter: targets must be a non-empty subset of {LINEAR_TARGETS}, got {targets}")
    extras = [_extra_path(m) for m in (modules_to_save or ())]

    # check every tensor before anything is written
    entries, seen = [], set()
    for key in sorted(tensors):
        t = tensors[key]
        if key in extras:
            if t.dim() != 2:
                raise ValueError(f"save_adapter: {key} must be a 2-D weight, got shape {tuple(t.shape)}")
            name = _PREFIX + key + ".weight"
        else:
            base, _, ab = key.rpartition(".")
            if ab not in ("lora_A", "lora_B") or base.rpartition(".")[2] not in targets:
                raise ValueError(f"save_adapter: unexpected tensor {key!r}: keys are '<module path>.lora_A' / "
                                 f"'.lora_B' of targets {targets}, or modules_to_save {extras}")
            if t.dim() != 2 or (t.shape[0] if ab == "lora_A" else t.shape[1]) != rank:
                want = "(r, in)" if ab == "lora_A" else "(out, r)"
                raise ValueError(f"save_adapter: {key} has shape {tuple(t.shape)}, expected {want} with r={rank}")
            partner = base + (".lora_B" if ab == "lora_A" else ".lora_A")
            if partner not in tensors:
                raise ValueError(f"save_adapter: {key} has no {partner}")
            seen.add(base.rpartition(".")[2])
            name = _PREFIX + key + ".weight"
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        entries.append((name, t.contiguous(), tuple(t.shape)))
    missing = [m for m in extras if m not in tensors] + [t for t in targets if t not in seen]
    if missing:
        raise ValueError(f"save_adapter: no tensors for {missing}")

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        "use_rslora": bool(rslora),
        "target_modules": list(targets),
        "modules_to_save": [n for n, p in EXTRA_MODULES.items() if p in extras] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }

    dir.parent.mkdir(parents=True, exist_ok=True)
    need = sum(t.numel() * t.element_size() for _, t, _ in entries) + (1 << 20)
    free = shutil.disk_usage(dir.parent).free
    if need > free:
        raise ResourceError(f"not enough disk space to write the adapter {dir}: it needs {need:,} bytes and "
                            f"{dir.parent} has {free:,} free. Nothing was written; free some space or move "
                            "output.dir to a larger disk")
    tmp = dir.parent / f".{dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_safetensors(tmp / WEIGHTS_FILE, entries, None, finite=True)
        with open(tmp / CONFIG_FILE, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if extra is not None:
            extra(tmp)
    except NonFiniteWeights as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise NonFiniteWeights(f"refusing to write the adapter {dir}: {e}; {dir} is untouched. Resume from the "
                               "last checkpoint with a lower train.lr (or train.grad_clip)") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"the disk filled up while writing the adapter {dir}; {dir} is untouched. Free "
                                "some space or move output.dir to a larger disk") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, dir)
    return dir


# ---- load ------------------------------------------------------------------------------------------
def _file_targets(cfg: dict, keys: Iterable[str], cfg_file: Path) -> tuple[str, ...]:
    """The projections an adapter file adapts, from its config (list, "all-linear", or a regex:
    then from the tensors present)."""
    tm = cfg.get("target_modules")
    if tm == "all-linear":
        return LINEAR_TARGETS
    if isinstance(tm, str) or tm is None:  # a regex (or nothing): the tensors say what it matched
        names = {k.rsplit(".lora_", 1)[0].rpartition(".")[2] for k in keys if ".lora_" in k}
    else:
        names = {str(n).rpartition(".")[2] for n in tm}  # peft matches by suffix: "self_attn.q_proj" too
    unknown = sorted(n for n in names if n not in LINEAR_TARGETS)
    if unknown or not names:
        raise CheckpointError(f"{cfg_file}: target_modules {tm!r} adapts {', '.join(unknown) or 'nothing'}; "
                              f"megastream trains LoRA on {', '.join(LINEAR_TARGETS)} only. Point lora.init at an "
                              "adapter over those projections, or set lora.init: null to start a new one")
    return tuple(n for n in LINEAR_TARGETS if n in names)


def _read_tensors(d: Path) -> tuple[dict[str, torch.Tensor], Path]:
    from megastream.checkpoint import check_finite

    f = d / WEIGHTS_FILE
    if f.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(f), framework="pt") as sf:
                out = {k: sf.get_tensor(k) for k in sf.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); the adapter is damaged or was "
                                  "not fully written. Use an intact copy, or set lora.init: null") from None
    elif (d / _LEGACY_WEIGHTS_FILE).is_file():
        f = d / _LEGACY_WEIGHTS_FILE
        try:
            out = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{f}: not a readable torch state dict ({e}); use an intact copy, or set "
                                  "lora.init: null") from None
    else:
        raise CheckpointError(f"lora.init: {d} has {CONFIG_FILE} but no {WEIGHTS_FILE}; it is not a complete "
                              "PEFT adapter directory (one written by peft's save_pretrained or by megastream's "
                              "final/). Point lora.init at one, or set lora.init: null")
    for k, t in out.items():
        check_finite(t, k, f)
    return out, f


def load_adapter(dir, spec: ModelSpec, *, rank: Optional[int] = None, targets=None,
                 base_model_name_or_path: Optional[str] = None, log=print) -> tuple[dict, dict]:
    """Read the PEFT adapter directory `dir` (lora.init) for a model of shape `spec`.

    Returns (tensors keyed as save_adapter's input, the adapter_config.json dict with
    `target_modules` resolved to a list of projection names in LINEAR_TARGETS order and
    `modules_to_save` to the short names present, or None). `rank` / `targets` (lora.rank /
    lora.target_modules; None: take the file's) must agree with the file (ConfigError);
    tensors must match `spec`'s shapes (CheckpointError); a different `base_model_name_or_path`
    only warns through `log`."""
    d = Path(dir)
    cfg_file = d / CONFIG_FILE
    if not d.is_dir():
        raise CheckpointError(f"lora.init: {d} is not a directory. Point it at a PEFT adapter directory (with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}), or set lora.init: null to start a new adapter")
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"lora.init: {d} has no {CONFIG_FILE}, so it is not a PEFT adapter directory "
                              f"(a full model directory has config.json instead: use it as model.path). Point "
                              "lora.init at an adapter directory, or set lora.init: null") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e}); use an intact copy of the adapter, or set "
                              "lora.init: null") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")

    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type is {peft_type!r}, not 'LORA'; megastream continues only LoRA "
                              "adapters. Point lora.init at a LoRA adapter, or set lora.init: null")
    task_type = cfg.get("task_type")
    if task_type not in ("CAUSAL_LM", None):
        raise CheckpointError(f"{cfg_file}: task_type is {task_type!r}, not 'CAUSAL_LM'; this adapter was trained "
                              "for another head. Point lora.init at a causal-LM adapter, or set lora.init: null")
    used = [what for key, off, what in _UNSUPPORTED if cfg.get(key, off) not in (off, None)]
    if used:
        raise CheckpointError(f"{cfg_file}: the adapter uses {'; '.join(used)}, which megastream does not train. "
                              "Point lora.init at a plain LoRA adapter, or set lora.init: null")

    file_rank = cfg.get("r")
    if isinstance(file_rank, bool) or not isinstance(file_rank, int) or file_rank <= 0:
        raise CheckpointError(f"{cfg_file}: 'r' is {file_rank!r}, not a positive integer; the file is damaged. "
                              "Point lora.init at an intact adapter, or set lora.init: null")
    if not isinstance(cfg.get("lora_alpha"), (int, float)) or isinstance(cfg.get("lora_alpha"), bool):
        raise CheckpointError(f"{cfg_file}: 'lora_alpha' is {cfg.get('lora_alpha')!r}, not a number; the file "
                              "is damaged. Point lora.init at an intact adapter, or set lora.init: null")
    raw, weights_file = _read_tensors(d)
    file_targets = _file_targets(cfg, raw, cfg_file)

    if targets is not None:
        want = resolve_targets(targets, spec)
        if want != file_targets:
            raise ConfigError(f"lora.init: {d} adapts {', '.join(file_targets)} but lora.target_modules is "
                              f"{', '.join(want)}. Set lora.target_modules to {list(file_targets)} to continue "
                              "this adapter, or set lora.init: null to start a new one")
    if rank is not None:
        _check_rank(rank)
        if rank != file_rank:
            raise ConfigError(f"lora.init: {d} has rank r={file_rank} ({cfg_file}) but lora.rank is {rank}. Set "
                              f"lora.rank: {file_rank} to continue this adapter, or set lora.init: null to start "
                              "a new one")

    file_base = cfg.get("base_model_name_or_path")
    if base_model_name_or_path and file_base and \
            os.path.normpath(str(file_base)) != os.path.normpath(str(base_model_name_or_path)):
        log(f"warning: lora.init: {d} was trained on {file_base!r} ({cfg_file}: base_model_name_or_path) and "
            f"model.path is {base_model_name_or_path!r}; continuing, since the shapes will be checked. If that is "
            "not the same model, the adapter's updates will not mean what they did")

    # tensors: every expected key present, nothing else, every shape the model's
    extras_in_cfg = cfg.get("modules_to_save") or []
    if isinstance(extras_in_cfg, str):
        extras_in_cfg = [extras_in_cfg]
    extras = []
    for m in extras_in_cfg:
        short = str(m).rpartition(".")[2]
        if short not in EXTRA_MODULES:
            raise CheckpointError(f"{cfg_file}: modules_to_save names {m!r}; megastream trains in full only "
                                  f"{', '.join(EXTRA_MODULES)}. Point lora.init at another adapter, or set "
                                  "lora.init: null")
        extras.append(short)
    expected = {}
    for path, (a, b) in adapter_shapes(spec, file_targets, file_rank).items():
        expected[_PREFIX + path + ".lora_A.weight"] = (path + ".lora_A", a)
        expected[_PREFIX + path + ".lora_B.weight"] = (path + ".lora_B", b)
    eshapes = extra_shapes(spec)
    for short in extras:
        p = EXTRA_MODULES[short]
        expected[_PREFIX + p + ".weight"] = (p, eshapes[p])

    unexpected = sorted(k for k in raw if k not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{weights_file}: unexpected tensor(s) {', '.join(unexpected[:3])}{more} for an "
                              f"adapter of r={file_rank} on {', '.join(file_targets)} over {spec.num_layers} layers "
                              f"({cfg_file}). The adapter was trained on another model or with features megastream "
                              "does not train; point lora.init at a matching adapter, or set lora.init: null")
    missing = [k for k in expected if k not in raw]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{weights_file}: missing tensor(s) {', '.join(missing[:3])}{more}: the model has "
                              f"{spec.num_layers} layers and {cfg_file} says r={file_rank} on "
                              f"{', '.join(file_targets)}. The adapter was trained on another model or is incomplete; "
                              "point lora.init at a matching adapter, or set lora.init: null")
    tensors = {}
    for k, (ours, shape) in expected.items():
        t = raw[k]
        rank_dim = 0 if ours.endswith(".lora_A") else 1
        if ".lora_" in ours and t.dim() == 2 and t.shape[rank_dim] != file_rank:
            raise CheckpointError(f"{weights_file}: tensor {k} has rank {t.shape[rank_dim]} but {cfg_file} says "
                                  f"r={file_rank}: the two files do not belong together. Point lora.init at an "
                                  "intact adapter, or set lora.init: null")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{weights_file}: tensor {k} has shape {tuple(t.shape)} but this model "
                                  f"({spec.architecture}, hidden {spec.hidden_size}, {spec.num_layers} layers) needs "
                                  f"{tuple(shape)}: the adapter was trained on another base model "
                                  f"({cfg.get('base_model_name_or_path')!r}). Use model.path of the model it was "
                                  "trained on, or set lora.init: null to start a new adapter")
        tensors[ours] = t

    out_cfg = dict(cfg)
    out_cfg["target_modules"] = list(file_targets)
    out_cfg["modules_to_save"] = extras or None
    return tensors, out_cfg
