"""Training data: rows from files -> documents (tokenized once, in parallel, into a token cache on
disk) -> packed seq_len rows -> micro-batches read from the cache on the fly.

    sources.py    where rows come from: .jsonl (plain, gzip, zstd), parquet, `datasets` directories;
                  Alpaca / ShareGPT / data.columns mapped onto megastream's row shapes
    documents.py  rows -> validated, tokenized documents (runs in worker processes)
    cache.py      the on-disk token cache: format, key, writer, reader
    packing.py    documents -> seq_len rows, from their lengths alone (bfd, greedy, wrap, none)
    dataset.py    micro-batches by step, assembled from the cache
    loader.py     the entry points below

Entry points are imported lazily, so that `megastream.data.sources` stays light (no torch).
"""

_EXPORTS = {"load_dataset": "loader", "load_jsonl": "loader", "open_data": "loader", "summary": "loader",
            "cache_root": "loader", "pack_mode": "loader", "Dataset": "dataset", "PAD_ID": "dataset",
            "data_files": "sources", "list_sources": "sources"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"megastream.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megastream.data' has no attribute {name!r}")
