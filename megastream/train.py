"""`megastream train`: the training loop, top to bottom.

    build the model in host RAM -> read the data -> for each step: lr, micro-batches,
    engine.step (forward/backward/update), log, maybe save -> wait for the last updates -> save.

With a `lora:` section the base is frozen (held once, in its compute dtype or with its layers'
projections quantized (lora.base_dtype int8 / nf4), with no optimizer state) and adapters are trained on the device: final/ and the checkpoints are PEFT adapter
directories, and lora.merge also writes the merged model to merged/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megastream import ops
from megastream.adapters.lora import LoraAdapters, lora_state_bytes, read_lora_state, write_lora_state
from megastream.adapters.merge import SourceMerge
from megastream.adapters.peft_io import load_adapter, resolve_targets, save_adapter
from megastream.checkpoint import COPIED_FILES, files_stamp, load_hf_weights, save_hf
from megastream.config import Config
from megastream.data.dataset import Dataset
from megastream.data.loader import load_dataset
from megastream.engine.engine import Engine
from megastream.errors import ConfigError, DataError, Interrupted, ResourceError, TrainingError
from megastream.machine import release_freed_memory
from megastream.model.layout import model_layout
from megastream.model.spec import ModelSpec
from megastream.optim import lr_at
from megastream.plan import Plan, make_plan
from megastream.resolve import (check_model_inputs, mode_name, model_spec, resolve_dtypes,
                                tokenizer_path)
from megastream.dist.comm import DistError, agreed, check_distributed, collective_failure, join
from megastream.dist.cost import Topology
from megastream.dist.state import GatheredStore, run_on_main, write_all_shards
from megastream.resume import (latest_checkpoint, prune, read_training_state, training_state_bytes,
                               write_trainer_state, write_training_state)
from megastream.store import HostStore
from megastream.telemetry import Monitor, Scalars
from megastream.tokenizer import TextTokenizer, load_tokenizer





@dataclass
class Model:
    spec: ModelSpec
    store: HostStore
    source_config: dict | None  # the source config.json, re-saved with the weights
    source_dir: Path | None
    source_stamp: tuple | None = None  # checkpoint.files_stamp of source_dir when it was loaded




def build_model(cfg: Config, spec: ModelSpec, device: torch.device, init: bool = True, comm=None) -> Model:
    """Allocate the host store and fill it from the checkpoint or a seeded random init
    (init=False when a training checkpoint will fill it instead). A LoRA run's base is frozen:
    its store holds the weights alone, and a LoRA checkpoint does not hold them (always init).
    With `comm` (a data-parallel rank), the store is this rank's shard of the model (megastream.dist)."""
    compute, grad = resolve_dtypes(cfg, device)
    quant = None
    if cfg.lora is not None:
        compute, init = base_dtype(cfg, compute), True
        quant = cfg.lora.base_dtype if cfg.lora.base_dtype in _QUANT_BASES else None
    kw = dict(pin=device.type == "cuda", master=cfg.optim.master == "fp32", states=cfg.optim.states,
              trainable=cfg.lora is None)
    if cfg.optim.clip == "previous":
        kw["rotating_grads"] = True
    if comm is not None:
        from megastream.dist.shard import sharded_store

        store = sharded_store(model_layout(spec), comm, compute_dtype=compute, grad_dtype=grad, **kw)
    else:
        store = HostStore(model_layout(spec), compute, grad, quant=quant, **kw)
    if cfg.model.path is not None:
        src = Path(cfg.model.path)
        stamp = None
        if init:  # (a full run resumed from its checkpoint reads only config.json from model.path)
            stamp = files_stamp(src)
            load_hf_weights(store, spec, src)
        return Model(spec, store, json.loads((src / "config.json").read_text()), src, stamp)
    if init:
        store.init_random(spec.initializer_range, cfg.model.seed)
    return Model(spec, store, None, None)


_BASE_DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}
_QUANT_BASES = ("int8", "nf4")  # each layer's projections quantized, dequantized to the compute dtype on the device


def base_dtype(cfg: Config, compute: torch.dtype) -> torch.dtype:
    """lora.base_dtype: the dtype the frozen base is held, streamed and computed in."""
    want = cfg.lora.base_dtype
    if want == "auto" or want in _QUANT_BASES:
        return compute
    dtype = _BASE_DTYPES[want]
    if cfg.engine.dtype != "auto" and dtype != compute:
        raise ConfigError(f"lora.base_dtype: {want} contradicts engine.dtype: {cfg.engine.dtype} (the base is computed "
                          "in the dtype it is held in); set one of them to auto, or both alike")
    return dtype


def lora_start(cfg: Config, spec: ModelSpec, log, load_init: bool = True) -> tuple[tuple[str, ...], dict | None]:
    """lora.target_modules resolved for this model, and lora.init's tensors (checked against the
    model, rank and targets) or None (also when resuming: the checkpoint holds the adapter). Cheap:
    runs before anything is written."""
    lo = cfg.lora
    if lo.base_dtype in _QUANT_BASES and lo.merge and cfg.model.path is None:  # merged from model.path's files
        raise ConfigError(f"lora.merge with lora.base_dtype: {lo.base_dtype} and model.preset: the host holds the "
                          "base's layers quantized, and a merge starts from the full-precision weights, which a "
                          "quantized base reads again from model.path's safetensors; a preset has none. Set "
                          "lora.merge: false (final/ is a PEFT adapter), or train from a model.path, or with "
                          "lora.base_dtype auto, bf16 or float32")
    if lo.merge and lo.train_extra and spec.tie_word_embeddings:
        raise ConfigError(f"lora.merge with lora.train_extra {list(lo.train_extra)} on a model with tied embeddings "
                          "(tie_word_embeddings): the trained copy breaks the tie, so there is no single merged table "
                          "to write; set lora.merge: false (final/ is a PEFT adapter with the trained module as "
                          "modules_to_save), or drop lora.train_extra")
    targets = resolve_targets(lo.target_modules, spec)
    if lo.init is None or not load_init:
        return targets, None
    tensors, acfg = load_adapter(lo.init, spec, rank=lo.rank, targets=targets,
                                 base_model_name_or_path=cfg.model.path, log=lambda m: log(f"megastream: {m}"))
    theirs = sorted(acfg.get("modules_to_save") or ())
    if theirs != sorted(lo.train_extra):
        raise ConfigError(f"lora.init: {lo.init} trains {', '.join(theirs) or 'no module'} in full (modules_to_save) "
                          f"and lora.train_extra is {list(lo.train_extra)}; set lora.train_extra: {theirs} to continue "
                          "this adapter as it was trained, or set lora.init: null to start a new one")
    for key, ours, theirs in (("lora.alpha", lo.alpha, acfg.get("lora_alpha")),
                              ("lora.rslora", lo.rslora, bool(acfg.get("use_rslora", False)))):
        if theirs != ours:
            log(f"megastream: warning: lora.init: {lo.init} was trained with {key}={theirs}, and the config says "
                f"{ours}: the config's value is used, so the adapter's output scale changes")
    return targets, tensors


def make_adapters(cfg: Config, spec: ModelSpec, targets: tuple[str, ...], init: dict | None,
                  device: torch.device, store: HostStore) -> LoraAdapters:
    """The adapters on the device: from lora.init, else PEFT's default init seeded by train.seed; the
    modules of lora.train_extra from lora.init, else copied from the base in `store`."""
    lo = cfg.lora
    if lo.train_extra and store.unit_range(0) != (0, store.full_units[0].numel):  # a rank's shard (torchrun)
        raise ConfigError(f"lora.train_extra {list(lo.train_extra)} with data parallel (torchrun): each rank holds "
                          "a slice of the embedding and head, and the trained copies start from the whole tables, "
                          "which this version does not gather; train them on one process, or drop lora.train_extra")
    ad = LoraAdapters(spec, targets, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, rslora=lo.rslora,
                      device=device, seed=cfg.train.seed, extra=lo.train_extra)
    if init is not None:
        ad.load(init, f"lora.init ({lo.init})")
    else:
        ad.init_default()
        ad.init_extra(store)
    return ad


def _tokenizer_for(cfg: Config):
    """A tokenizer factory for the data loader, and the list of tokenizers it loaded (saved beside
    the model, so that what megastream writes loads with `transformers` as one directory)."""
    used: list[TextTokenizer] = []

    def make() -> TextTokenizer:
        path = tokenizer_path(cfg)
        if path is None:
            raise DataError(f"data.path has text rows but {cfg.model.path} has no tokenizer.json; "
                            "set data.tokenizer to a tokenizer.json")
        used.append(load_tokenizer(path))
        return used[-1]

    return make, used


# What a run writes into output.dir (with `megastream plot`'s PNG and the temporary names of saves):
# --overwrite deletes a directory holding only these, never one holding anything else.
_RUN_FILE = re.compile(r"^(metrics\.jsonl|config\.yaml|final|merged|checkpoint-\d+|metrics\.png|tensorboard"
                       r"|\..+\.(tmp|old)-\d+)$")


def _inputs(cfg: Config) -> list[tuple[str, Path]]:
    paths = [("model.path", cfg.model.path), ("data.tokenizer", cfg.data.tokenizer), ("the current directory", ".")]
    for key, value in (("data.path", cfg.data.path), ("data.val_path", cfg.data.val_path)):
        paths += [(key, p) for p in ((value,) if isinstance(value, str) else value or ())]
    return [(key, Path(p)) for key, p in paths if p]


def _prepare_output(out: Path, cfg: Config, overwrite: bool, resuming: bool, create: bool) -> None:
    """Check output.dir (create=False, before any work), then make it (create=True, once the inputs
    are valid). --overwrite (not resuming) replaces the run there as a whole: renamed aside, then deleted."""
    existing = [p.name for p in (out / "metrics.jsonl", out / "final", out / "merged", *sorted(out.glob("checkpoint-*")))
                if p.exists()]
    if existing and not (overwrite or resuming):
        raise ConfigError(f"output.dir: {out} already holds a run ({', '.join(existing[:4])}); choose a new directory "
                          "(--set output.dir=...) or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir: {out} exists and is not a directory")
    replace = bool(existing) and overwrite and not resuming
    if replace:
        foreign = sorted(p.name for p in out.iterdir() if not _RUN_FILE.match(p.name))
        if foreign:
            raise ConfigError(f"--overwrite: {out} also holds {', '.join(foreign[:4])}, which megastream did not "
                              "write; it only replaces a directory that holds a run alone. Move those away, or choose "
                              "a new output.dir")
        for key, p in _inputs(cfg):
            if p.resolve().is_relative_to(out.resolve()):
                raise ConfigError(f"--overwrite would delete {out}, and {key} ({p}) is inside it; choose a new "
                                  "output.dir (or move the input out first)")
    if create:
        for stale in out.parent.glob(f".{out.name}.overwritten-*"):  # an --overwrite that crashed mid-delete
            shutil.rmtree(stale, ignore_errors=True)
        if replace:  # the old run is gone before the new one starts: one atomic rename (a crash leaves one
            aside = out.parent / f".{out.name}.overwritten-{os.getpid()}"  # run or the other, never a mix),
            os.rename(out, aside)  # then the delete
            shutil.rmtree(aside)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp-*"):  # a save that crashed: never a complete checkpoint
            shutil.rmtree(stale, ignore_errors=True)


def _output_dtype(cfg: Config, spec: ModelSpec) -> str:
    if cfg.output.dtype != "auto":
        return cfg.output.dtype
    return spec.torch_dtype if spec.torch_dtype in ("float32", "bfloat16", "float16") else "float32"


def _save(path: Path, cfg: Config, model: Model, tokenizers: list[TextTokenizer], extra=None,
          extra_bytes: int = 0, tensor_of=None) -> None:
    copy_from = ([model.source_dir] if model.source_dir else []) + [t.path.parent for t in tokenizers]
    spec = model.spec
    if model.source_config is None and tokenizers:  # a preset: config.json names its tokenizer's eos/bos ids,
        spec = dataclasses.replace(spec, extra={**tokenizers[0].special_ids(), **spec.extra})  # so generate() stops
    save_hf(path, spec, model.store, _output_dtype(cfg, model.spec), source_config=model.source_config,
            copy_from=copy_from, shard_bytes=int(cfg.output.shard_size_gb * 2**30), extra=extra,
            extra_bytes=extra_bytes, tensor_of=tensor_of)


def _save_checkpoint(out: Path, step: int, adam_steps: int, cfg: Config, model: Model,
                     tokenizers: list[TextTokenizer], comm=None, prev_norm: float | None = None) -> None:
    """checkpoint-<step>/: the HF model plus the exact training state, written atomically. With
    `comm`, rank 0 writes it, gathering the weights unit by unit, and each rank adds its optimizer shard."""
    store = model.store

    def extra(tmp: Path) -> None:
        extra = {"prev_grad_norm": prev_norm}  # optim.clip: previous clips the next step by it
        if comm is None:
            write_training_state(tmp, store, step=step, adam_steps=adam_steps, config=cfg.to_dict(), extra=extra)
        else:
            write_all_shards(tmp, store, comm)
            write_trainer_state(tmp, store, step=step, adam_steps=adam_steps, config=cfg.to_dict(),
                                world=comm.local_world, extra=extra)
        if os.environ.get("MEGASTREAM_TEST_CRASH_DURING_SAVE") == str(step):  # fault injection for tests
            os._exit(3)

    def save() -> None:
        n = 1 if comm is None else comm.local_world
        _save(out / f"checkpoint-{step}", cfg, _gathered(model, comm), tokenizers, extra=extra,
              extra_bytes=training_state_bytes(store) * n)
        prune(out, cfg.output.keep_last)

    run_on_main(comm, store, save)


def _gathered(model: Model, comm) -> Model:
    """The model as rank 0 saves it: each unit gathered from the ranks' shards as it is written."""
    return model if comm is None else dataclasses.replace(model, store=GatheredStore(model.store, comm))


def _save_adapter(path: Path, cfg: Config, model: Model, adapters: LoraAdapters, tokenizers: list[TextTokenizer],
                  extra=None) -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) with the
    tokenizer's files beside it, written atomically; `extra(tmp)` may add files first."""
    def add(tmp: Path) -> None:
        copied = set()
        for src in ([model.source_dir] if model.source_dir else []) + [t.path.parent for t in tokenizers]:
            for name in COPIED_FILES:
                if name != "generation_config.json" and name not in copied and (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, tmp / name)
                    copied.add(name)
        if extra is not None:
            extra(tmp)

    lo = cfg.lora
    save_adapter(path, adapters.tensors(), rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=adapters.targets,
                 rslora=lo.rslora, base_model_name_or_path=cfg.model.path, modules_to_save=adapters.extra, extra=add)


def _save_lora_checkpoint(out: Path, step: int, adam_steps: int, cfg: Config, model: Model, adapters: LoraAdapters,
                          tokenizers: list[TextTokenizer]) -> None:
    """checkpoint-<step>/ of a LoRA run: the adapter (PEFT format) plus its exact training state."""
    def extra(tmp: Path) -> None:
        need, free = lora_state_bytes(adapters), shutil.disk_usage(tmp).free
        if need > free:
            raise ResourceError(f"not enough disk space to write {out / f'checkpoint-{step}'}: its training state "
                                f"needs {need:,} bytes and {out} has {free:,} free. Free some space "
                                "(output.keep_last deletes old checkpoints), then continue with --resume")
        write_lora_state(tmp, adapters, step=step, adam_steps=adam_steps, config=cfg.to_dict())
        if os.environ.get("MEGASTREAM_TEST_CRASH_DURING_SAVE") == str(step):  # fault injection for tests
            os._exit(3)

    _save_adapter(out / f"checkpoint-{step}", cfg, model, adapters, tokenizers, extra=extra)
    prune(out, cfg.output.keep_last)


def _save_final(out: Path, cfg: Config, model: Model, adapters: LoraAdapters | None,
                tokenizers: list[TextTokenizer], log, comm=None) -> None:
    """final/: the model, or for LoRA the adapter (and, with lora.merge, merged/: base + adapter).
    With `comm`, rank 0 writes, the others serve it their shards."""
    if adapters is None:
        run_on_main(comm, model.store, lambda: _save(out / "final", cfg, _gathered(model, comm), tokenizers))
        return
    run_on_main(comm, model.store, lambda: _save_adapter(out / "final", cfg, model, adapters, tokenizers))
    if not cfg.lora.merge:
        return
    if cfg.lora.base_dtype in _QUANT_BASES:  # the host holds the projections quantized: merge from model.path
        source = SourceMerge(adapters, model.source_dir, model.source_stamp)
        _save(out / "merged", cfg, model, tokenizers, tensor_of=source.tensor_of)  # one process (torchrun refuses it)
    else:
        adapters.merge_into(model.store)  # the base is no longer needed as it was (each rank: its shard)
        run_on_main(comm, model.store, lambda: _save(out / "merged", cfg, _gathered(model, comm), tokenizers))
    log(f"megastream: merged model (base + adapter) saved to {out / 'merged'}")


_DATA_KEYS = ("data.path", "data.seq_len", "data.pack", "data.shuffle", "train.micro_batch_size", "train.grad_accum",
              "train.seed", "train.lr", "train.warmup_steps", "train.schedule", "train.min_lr", "train.steps",
              "lora.alpha", "lora.dropout", "lora.rslora")


def _resume_point(cfg: Config, out: Path, resume: str) -> Path:
    path = latest_checkpoint(out) if resume == "latest" else Path(resume)
    if path is None:
        raise ConfigError(f"--resume: {out} holds no checkpoint-<step>/ to resume (set output.save_every to "
                          "write them), or pass --resume PATH")
    if not path.is_dir():
        raise ConfigError(f"--resume: {path} is not a directory; pass a checkpoint-<step> directory")
    return path


def _metrics_up_to(path: Path, step: int, log) -> list[str]:
    """The lines of metrics.jsonl up to `step` (a resumed checkpoint's); a line that does not parse
    (cut short when a run was killed mid-write) is dropped with a warning."""
    kept = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines() if path.exists() else [], 1):
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            log(f"megastream: warning: {path}:{i} is not a whole metrics record (a run killed mid-write?); dropped")
    return kept


def _config_changes(old: dict, new: dict) -> list[str]:
    changed = []
    for key in _DATA_KEYS:
        section, name = key.split(".")
        a, b = (old.get(section) or {}).get(name), (new.get(section) or {}).get(name)
        if a != b and not (isinstance(a, list) and tuple(a) == b):
            changed.append(f"{key}: {a!r} -> {b!r}")
    return changed


def evaluate(engine: Engine, val: Dataset, micro_batch_size: int, group: int, comm=None) -> tuple[float, int]:
    """Token-mean loss over the whole validation set, `group` micro-batches per layer-major pass
    (per rank: each pass takes group x ranks micro-batches, and rank r every r-th of them; a rank
    left without one still streams the weights with the others)."""
    total, n = 0.0, 0
    rank, world = (0, 1) if comm is None else (comm.rank, comm.world)
    batches = val.in_order(micro_batch_size)
    while mbs := list(itertools.islice(batches, group * world)):
        loss, k = engine.eval_loss(mbs[rank::world])
        total, n = total + loss * k, n + k
    if comm is not None:
        total, n = comm.sum(total, n)
    return total / max(n, 1), int(n)


class _StopRequest:
    """First SIGINT/SIGTERM: finish the current step, save a checkpoint, exit; during a save, finish
    the save first. Second SIGINT: abort (KeyboardInterrupt; a save in progress removes its temporary
    directory). Armed from the first step until final/ is written."""

    def __init__(self, log):
        self.signum: int | None = None
        self.log = log
        self.doing = "finishing this step, then saving a checkpoint"  # what the first signal lets finish
        self.abortable = True  # False while a save that nothing on disk could replace is being written
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be set up there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            if not self.abortable:  # aborting now would lose the whole run: there is no checkpoint
                self.log(f"\nmegastream: {self.doing}: this run has no checkpoint to fall back on, so the save "
                         "cannot be abandoned (SIGKILL ends the process and loses the run)")
                return
            raise KeyboardInterrupt  # second Ctrl-C: abort at once, no checkpoint
        self.signum = signum
        self.log(f"\nmegastream: {signal.Signals(signum).name}: {self.doing} (Ctrl-C again to abort at once)")




def refuse_if_too_big(plan: Plan) -> None:
    """Raise ResourceError, naming what does not fit and what would, when the plan says no."""
    if plan.fits_host and plan.fits_gpu:
        return
    b = plan.budget
    why = []
    if not plan.fits_host:
        why.append(f"{b.host_total / 1e9:.1f} GB of host RAM, and {plan.ram_usable / 1e9:.1f} GB is usable here "
                   f"({plan.machine.ram_total / 1e9:.1f} GB total)")
    if not plan.fits_gpu:
        have = (f"{plan.gpu_budget / 1e9:.1f} GB ({plan.gpu_budget_source})" if plan.gpu_budget
                else plan.gpu_budget_source)
        why.append(f"{b.gpu_total / 1e9:.1f} GB of GPU memory, and the budget is {have}")
    fixes = "; ".join(plan.suggestions) or "use a smaller model or a larger machine"
    raise ResourceError(f"this run would need {' and '.join(why)}, so it would swap or be killed rather than train. "
                        f"To fit: {fixes}. `megastream plan CONFIG` prints the whole budget; pass --force to start "
                        "anyway")


def cap_gpu_memory(cfg: Config, device: torch.device) -> None:
    """engine.gpu_memory_gb: make the caching allocator refuse beyond the cap, so a large card
    behaves like a smaller one (the CUDA context itself is outside the cap)."""
    if device.type == "cuda" and cfg.engine.gpu_memory_gb:
        limit_gpu_memory(cfg.engine.gpu_memory_gb, device)


def uncap_gpu_memory(cfg: Config, device: torch.device) -> None:
    """Lift engine.gpu_memory_gb's cap when the run ends: the allocator's fraction is per process, and a
    caller that trains again in the same process (a notebook, a test) must not inherit it."""
    if device.type == "cuda" and cfg.engine.gpu_memory_gb:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def limit_gpu_memory(gb: float, device: torch.device) -> None:
    """Cap this process's caching allocator on `device` (which must carry its index) at `gb` GB."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 1e9 / total), device)


def _summary(cfg: Config, spec: ModelSpec, plan: Plan, store: HostStore, device: torch.device, data: Dataset,
             adapters: LoraAdapters | None = None, comm=None) -> str:
    b, t = plan.budget, cfg.train
    mode = mode_name(cfg) or "custom"
    optim = f"master {cfg.optim.master}, states {cfg.optim.states} ({mode} mode)"
    if adapters is not None:
        trained = (f" + {', '.join(adapters.extra)} in full ({(adapters.numel - adapters.n_adapter) / 1e6:.2f}M)"
                   if adapters.extra else "")
        optim = (f"LoRA r={adapters.rank} on {', '.join(adapters.targets)}: {adapters.n_adapter / 1e6:.2f}M adapter "
                 f"params{trained} ({adapters.nbytes() / 1e6:.1f} MB with gradients and moments, on the device), "
                 "base frozen")
    parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in b.host.items())
    gpu = (f"GPU {b.gpu_total / 1e9:.2f} GB planned"
           + (f" of {plan.gpu_budget / 1e9:.1f} GB ({plan.gpu_budget_source})" if plan.gpu_budget else "")
           if device.type == "cuda" else "no GPU")
    return (f"megastream: {cfg.model.preset or cfg.model.path} ({spec.architecture}), {b.params / 1e6:.1f}M params, "
            f"{spec.num_layers} layers | device {device}, compute {str(store.compute_dtype)[6:]}, "
            f"{optim}, activations "
            f"{cfg.engine.activations}, embedding on the {b.embedding}, loss chunk {b.chunk_tokens} tokens, "
            f"C++ ops {'on' if ops.have_ext() else 'off'}\n"
            f"megastream: host {b.host_total / 1e9:.2f} GB planned ({parts} GB): "
            f"{store.state_bytes_per_param():.2f} B/param of model state, {b.host_total / b.params:.2f} B/param in all "
            f"| {gpu}\n"
            f"megastream: {len(data)} sequences of {cfg.data.seq_len} ({_packing(data)}), "
            f"{b.tokens_per_step} tokens/step, {t.steps} steps; predicted "
            f"{plan.schedule.step_s:.3g} s/step ({plan.schedule.bound}-bound, {plan.rates.source.split(' (')[0]})"
            + "".join(f"\nmegastream: warning: {w}" for w in plan.warnings)
            + ("" if comm is None else
               f"\nmegastream: data parallel over {comm.world} ranks ({comm.local_world} per node x {comm.nodes} "
               f"node(s)): each holds 1/{comm.local_world} of the host state ({store.host_bytes() / 1e9:.2f} GB here), "
               f"runs {cfg.train.grad_accum // comm.world} of the {cfg.train.grad_accum} micro-batches per step"))


def _packing(data: Dataset) -> str:
    lay = data.layout
    return (f"{lay.tokens:,} tokens of {data.cache.header['docs']:,} documents, packed {lay.mode}, "
            f"fill {lay.fill:.1%}" if lay.mode != "none" else f"one document per row, fill {lay.fill:.1%}")


def _build(cfg: Config, spec: ModelSpec, device: torch.device, comm, resume_from: Path | None, out: Path, log,
           lora_targets, lora_init) -> tuple[Model, LoraAdapters | None, int, int, float | None]:
    """The model in host RAM (this rank's shard under torchrun), the adapters, and where training
    starts: (model, adapters, step, AdamW steps, the last step's gradient norm or None), from the
    checkpoint when resuming."""
    model = build_model(cfg, spec, device, init=resume_from is None, comm=comm)
    store = model.store
    adapters = make_adapters(cfg, spec, lora_targets, lora_init, device, store) if cfg.lora is not None else None
    start_step, adam_steps, prev_norm = 0, 0, None
    if resume_from is not None:
        if adapters is None and (resume_from / "adapter_config.json").is_file():
            raise ConfigError(f"--resume: {resume_from} is a LoRA checkpoint; resume it with the run's lora: section")
        state = read_lora_state(resume_from, adapters) if adapters else read_training_state(resume_from, store)
        start_step, adam_steps = state["step"], state["adam_steps"]
        prev_norm = state.get("prev_grad_norm")  # optim.clip: previous
        if start_step > cfg.train.steps or (start_step == cfg.train.steps and (out / "final").is_dir()):
            done = f"; the run is complete ({out / 'final'} holds its model)" if (out / "final").is_dir() else ""
            raise ConfigError(f"--resume: {resume_from} is at step {start_step}, and train.steps is "
                              f"{cfg.train.steps}{done}; raise train.steps to train further")
        for change in _config_changes(state.get("config", {}), cfg.to_dict()):
            log(f"megastream: warning: resuming with a changed setting, {change}")
        log(f"megastream: resuming from {resume_from} at step {start_step}"
            + ("; all steps are done, writing final/ only" if start_step == cfg.train.steps else ""))
        written = state.get("world", 1)
        if comm is not None or written != 1:
            log(f"megastream: the checkpoint's state was written by {written} rank(s) and is read by "
                f"{1 if comm is None else comm.local_world} per node (resharded by element ranges)")
    release_freed_memory()  # what loading freed (read tensors, init pieces, staged layers): not kept for the run
    return model, adapters, start_step, adam_steps, prev_norm


def train(cfg: Config, *, overwrite: bool = False, resume: str | None = None, force: bool = False,
          log=print) -> list[dict]:
    """Run a whole training job (or continue one: resume = "latest" or a checkpoint path);
    returns the per-step metrics of this invocation. Refuses (ResourceError) a run the memory
    plan says cannot fit, unless `force`. Under torchrun (more than one process), each process is a
    data-parallel rank holding its shard of the host state (megastream.dist); rank 0 logs and writes."""
    comm, device = join(cfg)
    main = comm is None or comm.main
    try:
        return _train(cfg, comm, device, main, overwrite, resume, force, log if main else (lambda *a, **k: None))
    except (RuntimeError, torch.distributed.DistError) as e:
        if comm is None or not collective_failure(e):
            raise
        raise DistError(f"rank {comm.rank}: a collective failed, so another rank of the job stopped or cannot be "
                        "reached (torchrun's summary names the rank that failed first; with a hang instead, "
                        f"engine.dist_timeout_s={cfg.engine.dist_timeout_s:g} bounds the wait). "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    finally:
        uncap_gpu_memory(cfg, device)
        if comm is not None:
            comm.close()


def _train(cfg: Config, comm, device: torch.device, main: bool, overwrite: bool, resume: str | None, force: bool,
           log) -> list[dict]:
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.output.dir)
    with agreed(comm):  # every rank checks; any rank's refusal stops them all (rank 0 says why)
        resume_from = _resume_point(cfg, out, resume) if resume else None
        # Refuse early, create only once inputs are valid; a resumed run continues its own directory.
        _prepare_output(out, cfg, overwrite, resume_from is not None, create=False)

        # Shape checks and the memory plan first (cheap), so nothing big is allocated for a run that cannot fit.
        spec = model_spec(cfg)
        check_model_inputs(cfg, spec, log)
        if comm is not None:
            check_distributed(cfg, spec)
        if cfg.lora is not None:  # targets and lora.init checked against the model before anything is written
            lora_targets, lora_init = lora_start(cfg, spec, log, load_init=resume_from is None)
        plan = make_plan(cfg, spec, topology=None if comm is None else Topology(comm.local_world, comm.nodes))
        if not force:
            refuse_if_too_big(plan)
        cap_gpu_memory(cfg, device)
    make_tok, used_toks = _tokenizer_for(cfg)
    for turn in ((True,) if comm is None else (True, False)):  # rank 0 builds the token cache, then the others read it
        with agreed(comm):
            if main == turn:
                data: Dataset = load_dataset(cfg, spec.vocab_size, "train", make_tok, log)
                val: Dataset | None = None
                if cfg.data.val_path is not None:
                    val = load_dataset(cfg, spec.vocab_size, "val", make_tok, log)
    if not used_toks and any(d is not None and d.cache.header["used_tokenizer"] for d in (data, val)):
        make_tok()  # the cache was built earlier: the tokenizer still goes beside the model
    if data.n_truncated or data.n_dropped:
        log(f"megastream: warning: {data.n_truncated} row(s) longer than data.seq_len={cfg.data.seq_len} truncated, "
            f"{data.n_dropped} dropped (data.overflow: {cfg.data.overflow})")
    with agreed(comm):
        model, adapters, start_step, adam_steps, prev_norm = _build(cfg, spec, device, comm, resume_from, out, log,
                                                         *((lora_targets, lora_init) if cfg.lora else (None, None)))
    store = model.store
    if main:
        _prepare_output(out, cfg, overwrite, resume_from is not None, create=True)
    if comm is not None:
        comm.barrier()  # output.dir exists before any rank writes a checkpoint shard into it

    t = cfg.train
    tokens_per_step = plan.budget.tokens_per_step
    log(_summary(cfg, spec, plan, store, device, data, adapters, comm))
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    with _gpu_oom(plan, "while allocating the device buffers"):
        # the loss chunk the plan sized into the free GPU memory (on the CPU: engine.loss_chunk_tokens or automatic)
        engine = Engine(spec, store, cfg, device, adapters=adapters, comm=comm,
                        chunk_tokens=plan.budget.chunk_tokens if device.type == "cuda" else None)
    engine.adam_steps = adam_steps
    engine.prev_norm = prev_norm
    history = []
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None and main:  # keep the records up to the checkpoint, drop any written after it
        kept = _metrics_up_to(metrics_path, start_step, log)
        metrics_path.write_text("".join(line + "\n" for line in kept))
    monitor = Monitor(device)
    scalars = Scalars(out, cfg.output.tensorboard and main, log)
    bad_run, skipped = 0, 0  # consecutive / total steps skipped for a non-finite loss or gradient norm
    per_rank = t.grad_accum // (1 if comm is None else comm.world)  # micro-batches each rank runs
    try:
        with _StopRequest(log) as stop, \
                open(metrics_path if main else os.devnull, "a" if resume_from is not None else "w") as metrics, \
                _ProgressBar(t.steps, start_step, disable=not (cfg.output.progress and main)) as bar:
            for step in range(start_step, t.steps):
                lr = lr_at(step, t)
                rows = data.step_rows(step, t.grad_accum, t.micro_batch_size, cfg.data.shuffle, t.seed)
                rank = 0 if comm is None else comm.rank
                mbs = [data.batch(r) for r in rows[rank * per_rank:(rank + 1) * per_rank]]  # read from the token cache now
                if os.environ.get("MEGASTREAM_TEST_KILL_RANK") == f"{rank}:{step + 1}":  # fault injection for tests
                    os.kill(os.getpid(), signal.SIGKILL)
                t0 = time.perf_counter()
                with _gpu_oom(plan, f"in step {step + 1}"):
                    stats = engine.step(mbs, lr)  # returns after a device sync (loss, grad norm)
                dt = time.perf_counter() - t0
                moved = comm.take_counters() if comm is not None else {}  # this rank's collective bytes
                rec = {"step": step + 1, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                       "tokens": tokens_per_step, "loss_tokens": stats.loss_tokens, "fill": round(data.fill(rows), 4),
                       "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
                rec["h2d_bytes"], rec["d2h_bytes"] = stats.h2d_bytes, stats.d2h_bytes  # PCIe: weights in, grads out
                rec.update(moved)
                if stats.skipped:
                    bad_run, skipped = bad_run + 1, skipped + 1
                    rec["skipped"] = True
                    log(f"\nmegastream: warning: step {step + 1}: non-finite loss ({stats.loss}) or gradient norm "
                        f"({stats.grad_norm}); update skipped ({bad_run} in a row, {skipped} in all)")
                else:
                    bad_run = 0
                rec["skipped_steps"] = skipped
                if val is not None and t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
                    rec["eval_loss"], rec["eval_tokens"] = evaluate(engine, val, t.micro_batch_size, per_rank, comm)
                rec.update(monitor.sample())
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                scalars.write(rec)
                history.append(rec)
                bar.step_done(rec)
                if bad_run >= t.max_nonfinite_steps:
                    bar.close()
                    raise TrainingError(
                        f"stopped at step {step + 1}: {bad_run} steps in a row had a non-finite loss or gradient norm "
                        f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); their updates were skipped, so the "
                        "weights are those of the last good step, and nothing was written. Lower train.lr, keep "
                        f"train.grad_clip on, check the data near step {step + 1 - bad_run + 1}, then --resume")
                saving = cfg.output.save_every and (step + 1) % cfg.output.save_every == 0
                last = step + 1 == t.steps
                if comm is not None:  # one rank asked to stop: all stop here (one collective, every step)
                    stop.signum = stop.signum or int(comm.max(stop.signum or 0)) or None
                # A stop request checkpoints this step; in the last one only if the run has no checkpoint
                # yet (final/ follows), so that a second Ctrl-C during final/ still leaves one to --resume.
                if saving or (stop.signum is not None and not (last and latest_checkpoint(out))):
                    engine.worker.wait_all()  # the step's updates must have landed
                    if adapters is not None:
                        run_on_main(comm, store, lambda: _save_lora_checkpoint(out, step + 1, engine.adam_steps, cfg,
                                                                               model, adapters, used_toks))
                    else:
                        _save_checkpoint(out, step + 1, engine.adam_steps, cfg, model, used_toks, comm,
                                         prev_norm=engine.prev_norm)
                if stop.signum is not None and not last:
                    bar.close()
                    saved = out / f"checkpoint-{step + 1}"
                    raise Interrupted(f"stopped after step {step + 1} of {t.steps}; saved {saved}. Continue with the "
                                      "same command and --resume", stop.signum)
            # final/ with the handler still armed: a first signal now waits for the save to complete.
            stop.doing = "finishing the save of final/"
            stop.abortable = latest_checkpoint(out) is not None
            engine.worker.wait_all()
            _save_final(out, cfg, model, adapters, used_toks, log, comm)
            if stop.signum is not None:
                raise Interrupted(f"all {t.steps} steps were done; the save of {out / 'final'} was let finish and "
                                  "is complete, so there is nothing to resume", stop.signum)
    except KeyboardInterrupt:  # a second Ctrl-C: no save now; say what is left to continue from
        ckpt = latest_checkpoint(out)
        left = (f"{ckpt} is the last checkpoint: continue with the same command and --resume" if ckpt
                else "no checkpoint was written, so the run has to start over (--overwrite)")
        raise Interrupted(f"aborted; {left}", signal.SIGINT) from None
    finally:
        engine.close()
        store.close()
        monitor.close()
        scalars.close()
    if history:
        # From the run's first step (the first record in metrics.jsonl, written before a resume) to its last.
        first = (_first_record(metrics_path) if resume_from is not None else None) or history[0]
        last = history[-1]
        msg = (f"megastream: done, loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} "
               f"(step {last['step']}); ")
        if resume_from is not None:
            msg += f"resumed at step {start_step}; "
        if skipped:
            msg += f"{skipped} step(s) skipped for non-finite values; "
        log(msg + f"{'adapter' if adapters is not None else 'model'} saved to {out / 'final'}")
    return history


@contextlib.contextmanager
def _gpu_oom(plan: Plan, where: str):
    """Turn a GPU out-of-memory error into a message about the budget (no CUDA trace)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        cap = plan.cfg.engine.gpu_memory_gb
        raise ResourceError(
            f"the GPU ran out of memory {where} (the plan predicted {plan.budget.gpu_total / 1e9:.1f} GB"
            + (f"; engine.gpu_memory_gb caps it at {cap:g} GB" if cap else "") + "). Lower train.micro_batch_size "
            "(raising train.grad_accum keeps the tokens per step), set engine.activations: host, or lower "
            f"data.seq_len; `megastream plan CONFIG` shows the budget. CUDA said: {str(e).splitlines()[0]}") from None


def _first_record(metrics_path: Path) -> dict | None:
    """The first whole record of metrics.jsonl (the run's first step), or None."""
    try:
        with open(metrics_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "loss" in rec and "step" in rec:
                    return rec
    except OSError:
        pass
    return None


# The step count first, then the fields (_postfix), then the bar in whatever width is left: a narrow
# terminal loses the bar and the trailing GPU fields first, never tokens/s or host RAM.
_BAR_FORMAT = "{desc} {n_fmt}/{total_fmt}{postfix} |{bar}|"


class _ProgressBar(tqdm):
    """The training progress bar. Its ETA is our own: the time per step since the end of the first
    step of this invocation, times the steps left. The first step is left out because it includes
    the warm-up (allocation, page faults, thread pools, op compilation), often several normal steps'
    worth; tqdm's estimate after one step multiplies exactly that by all the steps left."""

    def __init__(self, total: int, initial: int = 0, disable: bool = False, file=None, ncols: int | None = None,
                 clock=time.perf_counter):
        super().__init__(total=total, initial=initial, desc="step", unit="step", disable=disable,
                         file=file if file is not None else sys.stderr, ncols=ncols, dynamic_ncols=ncols is None,
                         bar_format=_BAR_FORMAT, mininterval=0, miniters=1)  # every step is shown
        self._clock = clock
        self._done = initial
        self._first: tuple[float, int] | None = None  # (clock, steps done) at the end of the first step

    def eta_s(self) -> float | None:
        """Seconds left, from the steps after the first; None until there is one."""
        if self._first is None or self._done <= self._first[1]:
            return None
        t0, n0 = self._first
        return (self._clock() - t0) / (self._done - n0) * (self.total - self._done)

    def step_done(self, rec: dict) -> None:
        self._done += 1
        if self._first is None:
            self._first = (self._clock(), self._done)
        self.set_postfix_str(_postfix(rec, self.eta_s()), refresh=False)
        self.update()


def _rate(x: float) -> str:
    """3 significant digits: 950, 3.42k, 10.8k, 125k, 1.2M."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _postfix(rec: dict, eta_s: float | None = None) -> str:
    """Loss, tokens/s, host RSS and the ETA, each short, so that all four fit in 60 columns after the
    step count; the GPU fields follow (a wider terminal shows them)."""
    eta = tqdm.format_interval(eta_s) if eta_s is not None else "?"
    parts = [f"loss {rec['loss']:.3f}", f"{_rate(rec['tokens_per_s'])} tok/s", f"host {rec['host_rss_gb']:.1f} GB",
             f"eta {eta}"]
    if "gpu_peak_gb" in rec:
        parts.append(f"GPU {rec['gpu_peak_gb']:.1f} GB")
    if "gpu_util" in rec:
        parts.append(f"util {rec['gpu_util']:.0f}%")
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']}")
    return ", ".join(parts)
