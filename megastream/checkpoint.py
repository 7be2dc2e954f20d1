"""Hugging Face format in and out: config.json + (sharded) safetensors.

Loading reads one tensor at a time from the safetensors files (pread, not mmap) straight into the
host store's weight arena (converting dtype on the way), so peak memory is the store plus one tensor;
a tensor holding NaN or infinity is refused as it is read, before any training.
Saving writes into a temporary directory beside the target and renames it into place, so a crash
mid-save never leaves a half-written checkpoint where a good one was; a save that would not fit on
the disk is refused before it starts, and one that fills the disk anyway removes its temporary directory.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import struct

import torch

from megastream.errors import CheckpointError, ResourceError
from megastream.model.layout import hf_names
from megastream.model.spec import ModelSpec
from megastream.store import HostStore

# Non-weight files copied from the source model / tokenizer directory into every saved model.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# Tensors some checkpoints carry that the model does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}); re-save the model") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}; "
                                  "the download is incomplete")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files found")
    return files


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _header(f: Path, fh) -> tuple[int, list[tuple[str, dict]]]:
    """(where the data starts, [(name, meta)] in file order) of an open safetensors file: 8-byte
    little-endian header length, JSON header of dtype / shape / data_offsets, each checked against the
    file's size, so a truncated or corrupt file is refused before any tensor is read."""
    size = f.stat().st_size
    head = fh.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{f}: the file is corrupt or truncated (no safetensors header); re-download it")
    n = int.from_bytes(head, "little")
    if n <= 0 or 8 + n > size:
        raise CheckpointError(f"{f}: the safetensors header is corrupt or truncated; re-download it")
    try:
        header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{f}: the safetensors header is corrupt or truncated; re-download it") from None
    header.pop("__metadata__", None)
    for name, meta in header.items():
        dtype = _ST_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{f}: tensor {name!r} has dtype {meta.get('dtype')}; megastream reads "
                                  f"{', '.join(_ST_DTYPES)}")
        begin, end = meta["data_offsets"]
        if 8 + n + end > size or end - begin != math.prod(meta["shape"]) * dtype.itemsize:
            raise CheckpointError(f"{f}: tensor {name!r} runs past the end of the file or has the wrong "
                                  "size; the file is corrupt or truncated, re-download it")
    return 8 + n, sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])


def _pread(f: Path, fh, start: int, name: str, meta: dict) -> torch.Tensor:
    """One tensor of an open safetensors file, read with pread into a fresh buffer."""
    begin, end = meta["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    got = os.preadv(fh.fileno(), [buf.numpy()], start + begin) if end > begin else 0
    if got != end - begin:
        raise CheckpointError(f"{f}: short read of tensor {name!r}; the file is corrupt or truncated")
    return buf.view(_ST_DTYPES[meta["dtype"]]).view(meta["shape"])


def _read_safetensors(f: Path):
    """Yield (name, tensor) from a safetensors file, one tensor at a time, read with pread into a
    fresh buffer. Not mmap: every touched page of a mapped file counts in the process's RSS, so
    loading through a mapping would add up to the whole checkpoint to the peak."""
    with open(f, "rb") as fh:
        start, header = _header(f, fh)
        for name, meta in header:
            yield name, _pread(f, fh, start, name, meta)


def files_stamp(model_dir: str | Path) -> tuple[tuple[str, int, int], ...]:
    """(file, size, mtime_ns) of each weight file: equal stamps mean the files were not replaced."""
    return tuple((str(f), st.st_size, st.st_mtime_ns) for f in _weight_files(Path(model_dir)) for st in [f.stat()])


class SafetensorsReader:
    """A model directory's tensors by name, each read whole with pread when asked (a merge from the
    original weights reads them in the order it writes them, not in file order)."""

    def __init__(self, model_dir: str | Path):
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for f in _weight_files(Path(model_dir)):
            with open(f, "rb") as fh:
                start, header = _header(f, fh)
            self.where.update({name: (f, start, meta) for name, meta in header})

    def read(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"tensor {name!r} is in none of the weight files it was loaded from")
        f, start, meta = self.where[name]
        with open(f, "rb") as fh:
            return _pread(f, fh, start, name, meta)


def load_hf_weights(store: HostStore, spec: ModelSpec, model_dir: str | Path) -> None:
    """Fill the store's weight (and working) arenas from a Hugging Face model directory, one
    tensor at a time: peak memory is the store plus the largest tensor."""
    model_dir = Path(model_dir)
    names = hf_names(spec)
    seen: set[str] = set()
    left: dict[int, int] = {}  # unit -> its tensors not read yet (a packed layer is quantized when complete)
    for u, _ in names.values():
        left[u] = left.get(u, 0) + 1
    for f in _weight_files(model_dir):
        for name, t in _read_safetensors(f):
            if name not in names:
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and spec.tie_word_embeddings):
                    continue
                raise CheckpointError(f"{f}: unexpected tensor {name!r} for {spec.architecture} "
                                      f"with {spec.num_layers} layers; config.json and weights disagree")
            u, e = names[name]
            if tuple(t.shape) != e.shape:
                raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, but config.json "
                                      f"implies {e.shape}; config.json and weights disagree")
            check_finite(t, name, f)
            store.write_entry(u, e.offset, t.reshape(-1))  # dtype cast here
            if name not in seen:
                left[u] -= 1
                if left[u] == 0:
                    store.finish_unit(u)  # a quantized base: this layer's projections quantized now
            seen.add(name)
            del t
    missing = sorted(set(names) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{model_dir}: missing tensor(s) {', '.join(missing[:5])}{more}")
    store.sync_working()


class NonFiniteWeights(CheckpointError):
    """The weights about to be saved hold NaN or infinity: nothing is written."""


_CHECK_CHUNK = 1 << 20  # elements checked at a time: isfinite's temporaries stay a few MB, not a tensor's size


def check_finite(t: torch.Tensor, name: str, f: Path) -> None:
    """Refuse a tensor just read from file `f` that holds NaN or infinity, at load: otherwise every
    step would be skipped, or the saves would refuse the weights only after the whole run."""
    flat = t.reshape(-1)
    if t.is_floating_point() and not all(bool(torch.isfinite(flat[lo:lo + _CHECK_CHUNK]).all())
                                         for lo in range(0, flat.numel(), _CHECK_CHUNK)):
        bad = int((~torch.isfinite(flat)).sum())
        raise CheckpointError(f"{f}: tensor {name!r} holds {bad:,} NaN or infinite value(s) of {t.numel():,}; the "
                              "file is damaged or was saved from a run that diverged. Use an intact copy (re-download "
                              "it, or resume from an earlier checkpoint)")


_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
             torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32"}
WRITE_CHUNK = 1 << 24  # elements cast and written at a time: the only temporary a save needs


def write_safetensors(path: str | Path, tensors: list[tuple[str, torch.Tensor, tuple[int, ...]]],
                      dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                      finite: bool = False) -> None:
    """Write (name, contiguous host tensor, shape) entries as one .safetensors file, streaming:
    each tensor is cast to `dtype` (None: kept) 16M elements at a time and written, so a save needs
    no copy of the model, only one chunk. The file is the safetensors format (8-byte little-endian
    header length, JSON header of dtype/shape/data_offsets, then the raw bytes), which
    safetensors.safe_open and transformers read. safetensors' own save_file needs every tensor
    materialised at once (and refuses views that share one arena). With `finite`, each chunk is
    checked in the same pass and a NaN or infinity raises NonFiniteWeights before it is written.
    A tensor may be given as a function returning it (with `dtype` set): it is called when its turn
    comes, so a source that builds each tensor (a sharded run gathering units) holds one at a time."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t, shape in tensors:
        d = dtype or t.dtype
        n = math.prod(shape) * d.itemsize
        header[name] = {"dtype": _ST_NAMES[d], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t, _ in tensors:
            flat = (t() if callable(t) else t).reshape(-1)
            for lo in range(0, flat.numel(), WRITE_CHUNK):
                piece = flat[lo:lo + WRITE_CHUNK]
                if dtype is not None and piece.dtype != dtype:
                    piece = piece.to(dtype)  # the cast temporary: one chunk
                if finite and not bool(torch.isfinite(piece).all()):
                    raise NonFiniteWeights(f"tensor {name!r} of {Path(path).name} holds NaN or infinite values")
                f.write(memoryview(piece.contiguous().view(torch.uint8).numpy()))
                del piece
            del flat  # before the next tensor is built (a gathered unit is freed first)
        f.flush()
        os.fsync(f.fileno())


def shard_groups(units: list, itemsize: int, shard_bytes: int) -> list[list[tuple[str, int, object]]]:
    """Tensors as (hf name, unit, entry), grouped in layout order into shards of at most
    shard_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[list[tuple[str, int, object]]] = [[]]
    size = 0
    for u, unit in enumerate(units):
        for e in unit.checkpoint_entries:
            nbytes = e.numel * itemsize
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((e.hf_name, u, e))
            size += nbytes
    return shards


_SMALL_FILES = 1 << 20  # headers, config.json, the copied tokenizer files: allowed for on top of the tensors


def _disk_full(path: Path, need: int, free: int, during: bool) -> ResourceError:
    what = "the disk filled up while writing" if during else "not enough disk space to write"
    return ResourceError(f"{what} {path}: the save needs {need:,} bytes ({need / 1e9:.2f} GB) and {path.parent} had "
                         f"{free:,} bytes ({free / 1e9:.2f} GB) free. Nothing was written, earlier checkpoints are "
                         "untouched; free some space (output.keep_last deletes old checkpoints) or move output.dir to "
                         "a larger disk, then continue with --resume")


def save_hf(path: str | Path, spec: ModelSpec, store: HostStore, dtype: str, *, source_config: dict | None = None,
            copy_from: list[Path] = (), shard_bytes: int = 5 * 2**30,
            extra: Callable[[Path], None] | None = None, extra_bytes: int = 0,
            tensor_of: Callable[[int, object], torch.Tensor] | None = None) -> Path:
    """Write the weights (fp32 master, or the bf16 working copy without one) as a Hugging Face
    model directory at `path` (atomically). `extra(tmp_dir)` may add files (optimizer state, of
    `extra_bytes`) before the directory is renamed into place. `tensor_of(unit, entry)`, when given,
    builds each tensor instead of the store (a merge from the source files); it is called as the
    tensor's turn comes, so one is held at a time. Refuses (ResourceError) a save the free disk space
    cannot hold, before writing anything."""
    if tensor_of is None:
        def tensor_of(u, e):
            return store.weights_of(u)[e.offset:e.offset + e.numel]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_dtype = _DTYPES[dtype]
    shards = shard_groups(store.units, torch_dtype.itemsize, shard_bytes)
    total = sum(e.numel for shard in shards for _, _, e in shard) * torch_dtype.itemsize
    need, free = total + extra_bytes + _SMALL_FILES, shutil.disk_usage(path.parent).free
    if need > free:
        raise _disk_full(path, need, free, during=False)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            entries = [(name, lambda u=u, e=e: tensor_of(u, e), e.shape)
                       for name, u, e in shard]
            write_safetensors(tmp / fname, entries, torch_dtype, finite=True)
            weight_map.update({name: fname for name, _, _ in entries})
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        if source_config is not None:
            config = dict(source_config)
            config.pop("dtype", None)
            config["torch_dtype"] = dtype
        else:
            config = spec.to_hf_config(dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copied = set()
        for src_dir in copy_from:
            for name in COPIED_FILES:
                if name not in copied and (Path(src_dir) / name).is_file():
                    shutil.copy2(Path(src_dir) / name, tmp / name)
                    copied.add(name)
        if extra is not None:
            extra(tmp)
    except OSError as e:  # the disk (or quota) filled up anyway: another writer, or a filesystem's overhead
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, need, free, during=True) from None
        raise
    except NonFiniteWeights as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise NonFiniteWeights(f"refusing to write {path}: {e}; earlier checkpoints in {path.parent} are untouched. "
                               "Resume from the last one with a lower train.lr (or train.grad_clip), and check the "
                               "data around this step") from None
    except BaseException:  # a failed save leaves nothing behind; the previous one is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _replace_dir(tmp, path)
    return path


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path`; an existing `path` is kept (and put back on failure) until the new one is in place."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
