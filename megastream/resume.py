"""Training checkpoints that resume exactly: `output.dir/checkpoint-<step>/`.

A checkpoint is a Hugging Face model directory (loadable as is) plus
  optimizer/<unit>.safetensors  per unit (embed, layer.i, head): the exact weights (fp32 master,
                         or the bf16 weights without one) and the AdamW moments in their configured
                         precision (and int8 block scales), streamed from the arenas (no copies).
  rng_state.safetensors  the torch RNG state
  trainer_state.json     completed steps, AdamW step count, the config it was written with
A data-parallel run (megastream.dist) writes its shards instead of the per-unit files:
  optimizer/rank-<r>-of-<n>.safetensors  rank r's slice of every unit ("<unit>.weights", ...)
  optimizer/manifest.json                the element range [lo, hi) of each unit in each file
Reading takes the element ranges the store holds from whichever files hold them, so a checkpoint
resumes on any number of ranks (moment blocks of 256 never straddle two shards).
Everything else a step depends on derives from the step number: the learning rate, the data
position (rows are addressed by step), and the stochastic-rounding keys (seed, step, unit).
The directory is written under a temporary name and renamed, so a crash mid-save leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megastream.checkpoint import check_finite, write_safetensors
from megastream.errors import CheckpointError
from megastream.store import BLOCK, HostStore

STATE_FILE = "trainer_state.json"
OPTIM_DIR = "optimizer"
RNG_FILE = "rng_state.safetensors"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def unit_tensors(store: HostStore, u: int) -> dict[str, torch.Tensor]:
    """Views of unit u's exact training state (no copies)."""
    m, v, ms, vs = store.states_of(u)
    out = {"weights": store.weights_of(u), "exp_avg": m, "exp_avg_sq": v}
    if ms is not None:
        out.update(exp_avg_scale=ms, exp_avg_sq_scale=vs)
    return out


def training_state_bytes(store: HostStore) -> int:
    """Bytes write_training_state adds to a checkpoint (the optimizer files; the rest is small)."""
    return sum(t.numel() * t.element_size() for u in range(len(store.units)) for t in unit_tensors(store, u).values())


def layout_digest(store: HostStore) -> str:
    """A hash of every unit's parameter names, shapes and offsets in the flat buffers: the optimizer
    state is stored flat per unit, so it resumes only onto the same layout (the native and the
    generic path order some parameters differently)."""
    h = hashlib.blake2b(digest_size=8)
    for unit in store.full_units:
        h.update(unit.name.encode())
        for e in unit.entries:
            h.update(f"|{e.hf_name}:{tuple(e.shape)}@{e.offset}".encode())
    return h.hexdigest()


def write_training_state(tmp: Path, store: HostStore, *, step: int, adam_steps: int, config: dict,
                         extra: dict | None = None) -> None:
    """Add the optimizer state and trainer state to a checkpoint directory being written."""
    (tmp / OPTIM_DIR).mkdir()
    for u, unit in enumerate(store.units):
        # Streamed from the arenas' views: no copy of the unit. Non-finite moments are refused as
        # they are written, as on load: a checkpoint that is written can be resumed.
        write_safetensors(tmp / OPTIM_DIR / f"{unit.name}.safetensors",
                          [(k, t, tuple(t.shape)) for k, t in unit_tensors(store, u).items()], finite=True)
    write_trainer_state(tmp, store, step=step, adam_steps=adam_steps, config=config, extra=extra)


def write_trainer_state(tmp: Path, store: HostStore, *, step: int, adam_steps: int, config: dict,
                        world: int = 1, extra: dict | None = None) -> None:
    """trainer_state.json and the RNG state (after the optimizer files)."""
    save_file({"rng_state": torch.get_rng_state()}, str(tmp / RNG_FILE))
    state = {"step": step, "adam_steps": adam_steps, "master": "fp32" if store.master is not None else "none",
             "states": store.states, "layout": layout_digest(store), "world": world, **(extra or {}), "config": config}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))


MANIFEST = "manifest.json"


def _pieces(path: Path, store: HostStore) -> dict[str, list[tuple[Path, str, int, int]]]:
    """unit name -> [(file, tensor-name prefix, lo, hi)]: where each element range of it is stored."""
    odir = path / OPTIM_DIR
    manifest = odir / MANIFEST
    if not manifest.is_file():
        if any(odir.glob("rank-*.safetensors")):
            raise CheckpointError(f"{odir} holds the shards of a multi-rank run but no {MANIFEST}, which says where "
                                  "each unit's elements are; the checkpoint is incomplete (a save that was cut "
                                  "short?): resume from an earlier one")
        return {u.name: [(odir / f"{u.name}.safetensors", "", 0, u.numel)] for u in store.full_units}
    try:
        m = json.loads(manifest.read_text())
        files = [odir / f for f in m["files"]]
        out = {name: [(f, f"{name}.", lo, hi) for f, (lo, hi) in zip(files, ranges)]
               for name, ranges in m["units"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: not a valid shard manifest ({e}); resume from an earlier checkpoint") from None
    for u in store.full_units:
        covered = sorted((lo, hi) for _, _, lo, hi in out.get(u.name, ()) if hi > lo)
        end = 0
        for lo, hi in covered:
            end = hi if lo <= end else end
        if end < u.numel:
            raise CheckpointError(f"{manifest}: the shards do not cover unit {u.name} ({end} of {u.numel} elements); "
                                  "the checkpoint was written for another model")
    return out


def read_training_state(path: Path, store: HostStore) -> dict:
    """Load a checkpoint's exact state into `store`; returns trainer_state.json."""
    state_path = path / STATE_FILE
    if not state_path.is_file() or not (path / OPTIM_DIR).is_dir():
        raise CheckpointError(f"{path} is not a resumable checkpoint (it needs {STATE_FILE} and {OPTIM_DIR}/); "
                              "pass a checkpoint-<step> directory written by megastream train")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_path}: not valid JSON ({e}); the checkpoint is damaged, resume from an "
                              "earlier one") from None
    master = "fp32" if store.master is not None else "none"
    if state.get("master") != master or state.get("states") != store.states:
        raise CheckpointError(
            f"{path} was written with optim.master={state.get('master')}, optim.states={state.get('states')}, "
            f"but the config says optim.master={master}, optim.states={store.states}; set them to match the "
            "checkpoint to resume it")
    if state.get("layout", layout_digest(store)) != layout_digest(store):  # checkpoints before it: not checked
        impl = (state.get("config") or {}).get("model", {}).get("implementation", "auto")
        raise CheckpointError(
            f"{path} was written for another parameter layout of this model (model.implementation was {impl!r} "
            "then, and the native and hf paths store some parameters in another order), so its optimizer state "
            "cannot be resumed here; resume with the model.implementation it was written with")
    pieces = _pieces(path, store)
    for u, unit in enumerate(store.full_units):
        lo, hi = store.unit_range(u)
        for f, prefix, plo, phi in pieces[unit.name]:
            a, b = max(lo, plo), min(hi, phi)
            if a < b:
                _read_range(f, prefix, unit_tensors(store, u), (a - plo, b - plo), (a - lo, b - lo), phi - plo)
    if (path / RNG_FILE).is_file():
        with safe_open(str(path / RNG_FILE), framework="pt") as sf:
            torch.set_rng_state(sf.get_tensor("rng_state"))
    store.sync_working()
    return state


def _read_range(f: Path, prefix: str, want: dict[str, torch.Tensor], src: tuple[int, int], dst: tuple[int, int],
                n_src: int) -> None:
    """want[k][dst] <- file f's tensor prefix+k [src] (elements; int8 scales by their 256-element block),
    checked for shape, dtype and finiteness as it is read."""
    try:
        with safe_open(str(f), framework="pt") as sf:
            missing = sorted(prefix + k for k in want if prefix + k not in sf.keys())
            if missing:
                raise CheckpointError(f"{f}: missing {', '.join(missing)}; the checkpoint does not match "
                                      "this configuration")
            for name, t in want.items():
                blocks = name.endswith("_scale")
                (s0, s1), (d0, d1), n = src, dst, n_src
                if blocks:  # ranges start on block boundaries; a range's last block may be partial
                    s0, s1, d0, d1, n = s0 // BLOCK, -(-s1 // BLOCK), d0 // BLOCK, -(-d1 // BLOCK), -(-n // BLOCK)
                sl = sf.get_slice(prefix + name)
                if tuple(sl.get_shape()) != (n,) or _ST_DTYPES.get(sl.get_dtype()) != t.dtype:
                    raise CheckpointError(f"{f}: {prefix + name} is {sl.get_dtype()} {tuple(sl.get_shape())}, expected "
                                          f"{t.dtype} ({n},); the checkpoint does not match this model and config")
                piece = sl[s0:s1]
                check_finite(piece, prefix + name, f)  # in the same pass, one range at a time
                t[d0:d1].copy_(piece)
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(f"{f}: cannot read ({e}); the checkpoint is incomplete or corrupt, resume "
                              "from an earlier one") from None


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8, "U8": torch.uint8}


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return sorted((s, p) for s, p in found if (p / STATE_FILE).is_file())


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def prune(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all)."""
    if keep_last > 0:
        for _, p in checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(p)
