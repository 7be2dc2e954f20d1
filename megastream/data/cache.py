"""The token cache: a data set tokenized once into a directory of flat arrays, independent of seq_len.

    <cache root>/<key>/
        header.json    format version, key, sources, sizes, counts (written last: its presence marks a whole cache)
        tokens.bin     every document's tokens, end to end: uint16 when the vocabulary fits, else uint32
        offsets.bin    int64 (docs + 1): document d is tokens[offsets[d]:offsets[d + 1]]
        kinds.bin      uint8 (docs): pre-tokenized row / text / chat (megastream.data.packing KIND_*)
        lines.bin      uint32 (docs): the line (jsonl) or row number each document came from, for messages
        mask.bin       uint8 (tokens): 1 where the token is its own label, 0 where it carries none (-100);
                       only when some token carries no loss (chat, prompt/completion, labelled rows)
        labels.bin     int32 (tokens): the labels themselves, only when some label is neither the token
                       nor -100 (pre-tokenized rows may carry any labels); then there is no mask.bin

The key hashes what the tokens depend on: each source's content (files up to FULL_HASH_BYTES are
hashed whole; larger ones by size, mtime and HASH_SAMPLES sampled 1 MiB blocks), the tokenizer's
files, the row-shape options (data.columns, data.split), the model's vocabulary size and
FORMAT_VERSION. seq_len, packing and data.overflow are not in it: they act when training starts.

A cache is built in a temporary directory beside its final place and renamed into place, so a
killed or failed build leaves nothing that could be mistaken for a cache; a cache whose header or
file sizes do not check out is rebuilt with a warning, never read. Reads use `pread` into small
buffers, so cached data never becomes resident memory of the training process (a plain memory map
would count every page it touches in RSS and VmHWM).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megastream.errors import DataError

FORMAT_VERSION = 1
FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole (~0.3 s per 256 MB)
HASH_SAMPLES = 16
IGNORE = -100
_ARRAYS = {"offsets": np.int64, "kinds": np.uint8, "lines": np.uint32, "mask": np.uint8, "labels": np.int32}


def file_fingerprint(path: Path) -> str:
    """Whole-content hash for files up to FULL_HASH_BYTES; above that, size + mtime + sampled blocks."""
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            while block := f.read(8 << 20):
                h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            for i in range(HASH_SAMPLES):
                f.seek((st.st_size - (1 << 20)) * i // (HASH_SAMPLES - 1))
                h.update(f.read(1 << 20))
    return h.hexdigest()


def cache_key(sources: list[str], tokenizer_files: list[Path], options: dict) -> str:
    """`sources`: one fingerprint per source file, in order; `options`: what else the tokens depend on."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps({"format": FORMAT_VERSION, "sources": sources, "options": options}, sort_keys=True).encode())
    for p in tokenizer_files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class CacheWriter:
    """Appends documents chunk by chunk into `<root>/.<key>.tmp-<pid>/`; `finish()` writes the header
    and renames the directory into place. Any failure removes the temporary directory."""

    def __init__(self, root: Path, key: str, vocab_size: int):
        self.root, self.key = root, key
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.tmp = root / f".{key}.tmp-{os.getpid()}"
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as e:
            raise DataError(f"cannot create the token cache in {root} ({e.strerror}); make it writable or set "
                            "data.cache_dir to a writable directory") from None
        self.dtype = token_dtype(vocab_size)
        self.files = {name: open(self.tmp / f"{name}.bin", "wb")
                      for name in ("tokens", "offsets", "kinds", "lines", "mask")}
        self.labels = None  # opened when the first label that is neither the token nor -100 arrives
        self.n_tokens = self.n_docs = self.n_label_tokens = 0
        self.any_ignored = False
        self.source_docs: list[int] = []  # documents per source, in order
        self._write("offsets", np.zeros(1, np.int64))

    def _write(self, name: str, arr: np.ndarray) -> None:
        try:
            self.files[name].write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        except OSError as e:
            self.abort()
            if e.errno == errno.ENOSPC:
                raise DataError(f"the disk filled while writing the token cache in {self.root}; the partial cache "
                                "was removed. Free some space, or set data.cache_dir to a disk with room") from None
            raise DataError(f"cannot write the token cache in {self.root} ({e.strerror}); set data.cache_dir "
                            "to a writable directory") from None

    def add(self, source: int, tokens: np.ndarray, lengths: np.ndarray, kinds: np.ndarray, lines: np.ndarray,
            labels: np.ndarray | None) -> None:
        """Documents of one chunk of `source`: tokens end to end, their lengths, kinds and line numbers;
        labels aligned with tokens (IGNORE = no loss) or None when every token is its own label."""
        while len(self.source_docs) <= source:
            self.source_docs.append(0)
        self.source_docs[source] += len(lengths)
        self._write("tokens", tokens.astype(self.dtype, copy=False))
        self._write("offsets", self.n_tokens + np.cumsum(lengths, dtype=np.int64))
        self._write("kinds", kinds.astype(np.uint8, copy=False))
        self._write("lines", lines.astype(np.uint32, copy=False))
        if labels is None:
            mask = np.ones(len(tokens), np.uint8)
        else:
            own, ignored = labels == tokens, labels == IGNORE
            mask = own.astype(np.uint8)
            self.any_ignored |= bool(ignored.any())
            if self.labels is None and not (own | ignored).all():
                self._start_labels()
        if self.labels is not None:
            self._write("labels", (labels if labels is not None else tokens).astype(np.int32))
        self._write("mask", mask)
        self.n_label_tokens += int(mask.sum()) if labels is not None else len(tokens)
        self.n_tokens += len(tokens)
        self.n_docs += len(lengths)

    def _start_labels(self) -> None:
        """Full labels from here on: those written so far are rebuilt from tokens and mask."""
        for f in self.files.values():
            f.flush()
        self.files["labels"] = self.labels = open(self.tmp / "labels.bin", "wb")
        step = 1 << 22
        tokens = np.memmap(self.tmp / "tokens.bin", self.dtype, "r") if self.n_tokens else np.zeros(0, self.dtype)
        mask = np.memmap(self.tmp / "mask.bin", np.uint8, "r") if self.n_tokens else np.zeros(0, np.uint8)
        for s in range(0, self.n_tokens, step):
            t, m = tokens[s:s + step].astype(np.int32), mask[s:s + step]
            self._write("labels", np.where(m == 1, t, IGNORE).astype(np.int32))
        del tokens, mask

    def finish(self, header: dict) -> Path:
        for f in self.files.values():
            f.close()
        if self.labels is not None or not self.any_ignored:
            (self.tmp / "mask.bin").unlink()  # labels.bin subsumes it / every token is its own label
        has = {name: (self.tmp / f"{name}.bin").exists() for name in ("mask", "labels")}
        header = {"format": FORMAT_VERSION, "key": self.key, "token_dtype": np.dtype(self.dtype).name,
                  "docs": self.n_docs, "tokens": self.n_tokens, "label_tokens": self.n_label_tokens,
                  "has_mask": has["mask"], "has_labels": has["labels"], "source_docs": self.source_docs,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **header}
        header["bytes"] = sum(p.stat().st_size for p in self.tmp.iterdir())
        (self.tmp / "header.json").write_text(json.dumps(header, indent=1))
        final = self.root / self.key
        try:
            os.rename(self.tmp, final)
        except OSError as e:  # another process finished the same cache first: keep theirs
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return final

    def abort(self) -> None:
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Cache:
    """An open cache: the per-document arrays in memory (13 bytes a document), the per-token files
    read on demand with pread."""
    path: Path
    header: dict
    offsets: np.ndarray  # int64 (docs + 1)
    kinds: np.ndarray  # uint8 (docs)
    lines: np.ndarray  # uint32 (docs)
    dtype: np.dtype
    fds: dict

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def nbytes(self) -> int:
        return self.offsets.nbytes + self.kinds.nbytes + self.lines.nbytes

    def read(self, name: str, start: int, n: int, out: np.ndarray) -> np.ndarray:
        """Elements [start, start + n) of `name`.bin (tokens, mask or labels) into out[:n]."""
        view = out[:n]
        buf = memoryview(view).cast("B")
        got = os.preadv(self.fds[name], [buf], start * view.itemsize)
        if got != buf.nbytes:
            raise DataError(f"{self.path}/{name}.bin is shorter than its header says (the cache changed while "
                            "training); delete the directory and start again to rebuild it")
        return view

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def open_cache(path: Path, key: str, log=print) -> Cache | None:
    """The cache at `path` if it is whole and matches `key`; None if there is none. A cache that fails
    its checks is moved aside and removed with a warning (the caller rebuilds it)."""
    if not path.is_dir():
        return None
    try:
        header = json.loads((path / "header.json").read_text())
        if header.get("format") != FORMAT_VERSION or header.get("key") != key:
            raise ValueError(f"format {header.get('format')} / key {header.get('key')}")
        dtype = np.dtype(header["token_dtype"])
        docs, tokens = int(header["docs"]), int(header["tokens"])
        sizes = {"tokens": tokens * dtype.itemsize, "offsets": (docs + 1) * 8, "kinds": docs, "lines": docs * 4}
        if header["has_mask"]:
            sizes["mask"] = tokens
        if header["has_labels"]:
            sizes["labels"] = tokens * 4
        for name, size in sizes.items():
            got = (path / f"{name}.bin").stat().st_size
            if got != size:
                raise ValueError(f"{name}.bin has {got} bytes, expected {size}")
        offsets = np.fromfile(path / "offsets.bin", np.int64)
        if offsets[0] != 0 or offsets[-1] != tokens or (np.diff(offsets) < 0).any():
            raise ValueError("offsets.bin is not a valid index")
        kinds, lines = np.fromfile(path / "kinds.bin", np.uint8), np.fromfile(path / "lines.bin", np.uint32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"megastream: warning: the token cache {path} failed its check ({e}); rebuilding it")
        aside = path.with_name(f".{path.name}.bad-{os.getpid()}")
        try:
            os.rename(path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            pass
        return None
    fds = {name: os.open(path / f"{name}.bin", os.O_RDONLY) for name in ("tokens", "mask", "labels")
           if name == "tokens" or header[f"has_{name}"]}
    return Cache(path, header, offsets, kinds, lines, dtype, fds)
