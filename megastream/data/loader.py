"""Data path -> token cache (built once, in parallel) -> packing layout -> Dataset.

`load_dataset` is what `train` calls: it opens the cache for the data's key, building it first when
there is none (`megastream prepare` builds it ahead of time), then packs rows from the offsets.
Tokenization runs in `data.workers` processes (default: one per core), each taking chunks of
about 4 MB of rows in file order; the parent reads the files and appends the workers' arrays to
the cache in order, with at most two chunks per worker in flight, so memory does not grow with the
data set.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

from megastream.data.cache import Cache, CacheWriter, cache_key, file_fingerprint, open_cache
from megastream.data.dataset import Dataset
from megastream.data.documents import Encoded, Encoder
from megastream.data.packing import KIND_CHAT, KIND_TEXT, layout
from megastream.data.sources import Source, list_sources, read_chunks
from megastream.data.wordcache import Mismatch
from megastream.errors import DataError

CHUNK_BYTES = 4 << 20


def pack_mode(pack) -> str:
    """data.pack as a mode: true -> bfd (the default), false -> none (one padded row per document)."""
    return {True: "bfd", False: "none"}.get(pack, pack) if isinstance(pack, bool) else pack


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tokenizer_files(path: Path | None) -> list[Path]:
    """The files a tokenizer's output depends on: tokenizer.json and its config / chat template."""
    if path is None:
        return []
    return [p for p in (path, path.parent / "tokenizer_config.json", path.parent / "chat_template.jinja")
            if p.is_file()]


def data_key(sources: list[Source], tokenizer_path: Path | None, vocab_size: int, columns, split: str) -> str:
    fingerprints = [f"{s.kind}:{file_fingerprint(s.path)}" for s in sources]
    return cache_key(fingerprints, tokenizer_files(tokenizer_path),
                     {"vocab_size": vocab_size, "columns": dict(columns or {}), "split": split})


# ---- building ---------------------------------------------------------------------------------
_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER = encoder


def _encode_in_worker(chunk) -> Encoded:
    return _WORKER(chunk)


def _encoded_chunks(sources: list[Source], encoder: Encoder, workers: int, chunk_bytes: int):
    """Encoded chunks in file order, from `workers` processes (in this process when 1)."""
    chunks = read_chunks(sources, chunk_bytes=chunk_bytes)
    if workers <= 1:
        yield from map(encoder, chunks)
        return
    # fork: the workers inherit the encoder (and its tokenizer factory) without pickling it
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (encoder,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def build_cache(sources: list[Source], root: Path, key: str, vocab_size: int, tokenizer, columns=None,
                workers: int = 0, log=print, progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Tokenize `sources` into the cache directory root/key (see megastream.data.cache)."""
    workers = workers or default_workers()
    total = sum(s.path.stat().st_size for s in sources)
    if total <= chunk_bytes:
        workers = 1  # one chunk: forking would only add start-up time
    t0 = time.perf_counter()
    try:
        return _build(sources, root, key, vocab_size, tokenizer, columns, workers, progress, chunk_bytes, t0, True)
    except Mismatch:
        log("megastream: warning: the word cache's ids differed from the tokenizer's on a sample; tokenizing "
            "again, text by text (slower, exact)")
        return _build(sources, root, key, vocab_size, tokenizer, columns, workers, progress, chunk_bytes, t0, False)


def _build(sources, root, key, vocab_size, tokenizer, columns, workers, progress, chunk_bytes, t0,
           word_cache: bool) -> Path:
    from tqdm import tqdm

    total = sum(s.path.stat().st_size for s in sources)
    writer = CacheWriter(root, key, vocab_size)
    rows = text_docs = 0
    used_tokenizer = used_word_cache = False
    encoder = Encoder(sources, vocab_size, tokenizer, columns, word_cache)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="megastream: tokenizing", disable=not progress or None,
               leave=False, dynamic_ncols=True)
    try:
        for enc in _encoded_chunks(sources, encoder, workers, chunk_bytes):
            writer.add(enc.source, enc.tokens, enc.lengths, enc.kinds, enc.lines, enc.labels)
            rows += enc.rows
            text_docs += int((enc.kinds == KIND_TEXT).sum())
            used_word_cache |= enc.word_cache
            used_tokenizer |= bool(((enc.kinds == KIND_TEXT) | (enc.kinds == KIND_CHAT)).any())
            bar.update(enc.payload_bytes)
            bar.set_postfix_str(f"{rows:,} rows", refresh=False)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    return writer.finish({"sources": [{"label": s.label, "kind": s.kind} for s in sources], "rows": rows,
                          "text_docs": text_docs, "used_tokenizer": used_tokenizer, "vocab_size": vocab_size,
                          "build_s": round(elapsed, 3), "workers": workers, "source_bytes": total,
                          "word_cache": used_word_cache})


def open_or_build(sources: list[Source], root: Path, vocab_size: int, tokenizer, tokenizer_path: Path | None,
                  columns=None, split: str = "train", workers: int = 0, log=print,
                  progress: bool = True) -> tuple[Cache, bool]:
    """(the cache, whether it was built now)."""
    key = data_key(sources, tokenizer_path, vocab_size, columns, split)
    cache = open_cache(root / key, key, log)
    if cache is not None:
        return cache, False
    build_cache(sources, root, key, vocab_size, tokenizer, columns, workers, log, progress)
    cache = open_cache(root / key, key, log)
    if cache is None:  # pragma: no cover - a cache we just wrote fails its own check
        raise DataError(f"the token cache {root / key} failed its check right after it was built; "
                        "is another process deleting it?")
    return cache, True


def make_dataset(cache: Cache, sources: list[Source], seq_len: int, pack, seed: int, overflow: str) -> Dataset:
    """Pack the cache's documents into seq_len rows (megastream.data.packing)."""
    ends = np.cumsum(cache.header["source_docs"])
    label = ", ".join(s.label for s in sources)

    def where(doc: int) -> str:
        i = int(np.searchsorted(ends, doc, side="right"))
        return sources[i].where(int(cache.lines[doc]))

    try:
        lay = layout(cache.lengths, cache.kinds, seq_len, pack_mode(pack), seed, overflow, where)
    except DataError as e:
        if "no training sequences" in str(e):
            raise DataError(f"{label}: {e}") from None
        raise
    return Dataset(cache, lay, label)


def load_jsonl(path, seq_len: int, vocab_size: int, tokenizer=None, overflow: str = "error", pack=False,
               seed: int = 0, workers: int = 1, split: str = "train", columns=None) -> Dataset:
    """Read, validate and pack a data path without a persistent cache (a temporary one, removed
    once open): for tests and small data. `pack`: True = greedy (today's default), or a mode name."""
    sources = list_sources(path, split)
    if tokenizer is None:
        def tokenizer():
            raise DataError(f"{sources[0].label}: text rows need a tokenizer")
    root = Path(tempfile.mkdtemp(prefix="megastream-data-"))
    try:
        cache, _ = open_or_build(sources, root, vocab_size, tokenizer, None, columns, split, workers,
                                 progress=False)
        return make_dataset(cache, sources, seq_len, "greedy" if pack is True else pack, seed, overflow)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the open file descriptors keep the data readable


# ---- from a config ----------------------------------------------------------------------------
def cache_root(cfg) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output.dir).parent / ".megastream-cache"


def open_data(cfg, vocab_size: int, which: str = "train", tokenizer=None, log=print,
              progress: bool | None = None) -> tuple[Cache, list[Source], bool]:
    """The token cache of data.path (which="train") or data.val_path ("val"), built when missing:
    (cache, sources, whether it was built now)."""
    from megastream.resolve import tokenizer_path
    from megastream.tokenizer import load_tokenizer

    path = cfg.data.path if which == "train" else cfg.data.val_path
    sources = list_sources(path, cfg.data.split)
    tok_path = tokenizer_path(cfg)
    if tokenizer is None:
        def tokenizer():
            if tok_path is None:
                raise DataError(f"data.path has text rows but {cfg.model.path} has no tokenizer.json; "
                                "set data.tokenizer to a tokenizer.json")
            return load_tokenizer(tok_path)
    progress = cfg.output.progress if progress is None else progress
    cache, built = open_or_build(sources, cache_root(cfg), vocab_size, tokenizer, tok_path, cfg.data.columns,
                                 cfg.data.split, cfg.data.workers, log, progress)
    return cache, sources, built


def load_dataset(cfg, vocab_size: int, which: str = "train", tokenizer=None, log=print) -> Dataset:
    cache, sources, built = open_data(cfg, vocab_size, which, tokenizer, log)
    h = cache.header
    if built:
        log(f"megastream: tokenized {h['rows']:,} rows of {which} data into {h['tokens']:,} tokens in "
            f"{h['build_s']:.1f} s ({h['workers']} worker(s)); cached in {cache.path}")
    return make_dataset(cache, sources, cfg.data.seq_len, cfg.data.pack, cfg.train.seed, cfg.data.overflow)


def summary(cfg, ds: Dataset) -> dict:
    """What `megastream prepare` prints: documents, tokens, loss tokens, rows after packing, bytes."""
    h, lay = ds.cache.header, ds.layout
    return {"cache": str(ds.cache.path), "rows_read": h["rows"], "documents": h["docs"], "tokens": h["tokens"],
            "label_tokens": h["label_tokens"], "token_dtype": h["token_dtype"], "bytes_on_disk": h["bytes"],
            "build_s": h["build_s"], "workers": h["workers"], "seq_len": lay.seq_len, "pack": lay.mode,
            "packed_rows": lay.n_rows, "packed_tokens": lay.tokens, "fill": round(lay.fill, 4),
            "truncated": lay.n_truncated, "dropped": lay.n_dropped, "host_bytes_in_training": ds.nbytes()}


def prepare_main(cfg, as_json: bool = False) -> int:
    """`megastream prepare`: build (or find) the token caches of data.path and data.val_path and
    print what training will see."""
    import json
    import sys

    from megastream.resolve import model_spec

    vocab = model_spec(cfg).vocab_size
    log = (lambda msg: print(msg, file=sys.stderr)) if as_json else print
    out = {}
    for which in ("train", "val") if cfg.data.val_path is not None else ("train",):
        t0 = time.perf_counter()
        ds = load_dataset(cfg, vocab, which, log=log)
        out[which] = {**summary(cfg, ds), "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        print(json.dumps(out, indent=1))
        return 0
    for which, s in out.items():
        print(f"megastream prepare: {which} data -> {s['cache']}\n"
              f"  {s['rows_read']:,} rows, {s['documents']:,} documents, {s['tokens']:,} tokens "
              f"({s['label_tokens']:,} with a label), {s['bytes_on_disk'] / 1e6:.1f} MB on disk ({s['token_dtype']})\n"
              f"  seq_len {s['seq_len']}, pack {s['pack']}: {s['packed_rows']:,} rows, fill {s['fill']:.1%}"
              + (f", {s['truncated']} truncated" if s["truncated"] else "")
              + (f", {s['dropped']} dropped" if s["dropped"] else "") + "\n"
              f"  built in {s['build_s']:.1f} s with {s['workers']} worker(s); opened and packed in "
              f"{s['seconds']:.2f} s; {s['host_bytes_in_training'] / 1e6:.1f} MB of RAM while training")
    return 0


# ---- memory (megastream.memory's data term) ----------------------------------------------------
DOC_BYTES = 13  # offsets (int64), kind (uint8), line (uint32)
PIECE_BYTES = 28  # layout: document, start (int64), length (int32), row order (int64)
ROW_BYTES = 20  # layout row pointer (int64), permutation (int32) and the epoch's randperm it is cast from (int64)
# Building the cache (<= 2 chunks per worker in flight) and packing (numpy sorts and gathers, ~2.6x
# the layout) take more for a moment, but before the model's memory exists: they do not add to the
# training peak, which is what the plan predicts.


def data_memory(cfg, vocab_size: int) -> tuple[int, str]:
    """Host bytes the data holds while training (it adds to the peak), and how they were found: from
    the token cache's own sizes when it exists, else estimated from the files."""
    S, t = cfg.data.seq_len, cfg.train
    total, how = 4 * t.grad_accum * t.micro_batch_size * S * 8, []  # a step's micro-batches (int64)
    for which, path in (("train", cfg.data.path), ("val", cfg.data.val_path)):
        if not path:
            continue
        try:
            sources = list_sources(path, cfg.data.split)
            from megastream.resolve import tokenizer_path

            key = data_key(sources, tokenizer_path(cfg), vocab_size, cfg.data.columns, cfg.data.split)
        except Exception:  # noqa: BLE001 - missing or unreadable data is reported by the config check / loader
            continue
        cache = cache_root(cfg) / key
        try:
            lengths = np.diff(np.fromfile(cache / "offsets.bin", np.int64))
            kinds = np.fromfile(cache / "kinds.bin", np.uint8)
            docs, texts = len(lengths), lengths[kinds == KIND_TEXT]
            pieces = int((-(-texts // S)).sum()) + int((kinds != KIND_TEXT).sum())
            tokens = int(np.minimum(lengths, S).sum() + np.maximum(texts - S, 0).sum())
            how.append(f"{which}: the token cache's {docs:,} documents")
        except (OSError, ValueError):
            size = sum(s.path.stat().st_size for s in sources)
            docs = _estimate_rows(sources)
            tokens = size // 4  # ~4 bytes of JSON per token of text
            pieces = docs + tokens // S
            how.append(f"{which}: estimated from {size / 1e6:.1f} MB of files (no token cache yet)")
        rows = pieces if pack_mode(cfg.data.pack) == "none" else min(pieces, -(-tokens // S) + 1)
        total += DOC_BYTES * docs + PIECE_BYTES * pieces + ROW_BYTES * rows
    return total, "; ".join(how) or "no data files found"


def _estimate_rows(sources: list[Source]) -> int:
    """Rows in the sources: parquet/arrow metadata, or jsonl lines counted in the first MB."""
    n = 0
    for s in sources:
        size = s.path.stat().st_size
        if s.kind == "jsonl":
            with open(s.path, "rb") as f:
                head = f.read(1 << 20)
            n += max(1, head.count(b"\n") * size // max(len(head), 1))
        else:
            n += max(1, size // 1000)
    return n


def data_plan(cfg, vocab_size: int) -> dict:
    """What `plan` says about the training data: the packed rows and their fill when a token cache
    exists (nothing is built), else how to get them."""
    from megastream.resolve import tokenizer_path

    try:
        sources = list_sources(cfg.data.path, cfg.data.split)
        key = data_key(sources, tokenizer_path(cfg), vocab_size, cfg.data.columns, cfg.data.split)
        cache = open_cache(cache_root(cfg) / key, key, log=lambda m: None)
    except (DataError, OSError):
        cache = None
    if cache is None:
        return {"cache": None, "note": "no token cache yet: `megastream prepare` builds it (`train` does when "
                                       "missing); rows and fill are known then"}
    try:
        ds = make_dataset(cache, sources, cfg.data.seq_len, cfg.data.pack, cfg.train.seed, cfg.data.overflow)
    except DataError as e:
        return {"cache": str(cache.path), "note": str(e)}
    finally:
        cache.close()
    lay = ds.layout
    return {"cache": str(cache.path), "documents": cache.header["docs"], "tokens": lay.tokens, "rows": lay.n_rows,
            "pack": lay.mode, "fill": round(lay.fill, 4), "truncated": lay.n_truncated, "dropped": lay.n_dropped}
