"""Training data: rows from files -> documents -> packed seq_len rows -> micro-batches.

Entry points: `load_jsonl` (read, validate and pack a data path), `Dataset` (micro-batches by step),
`data_files` (the files a data.path names).
"""

from megastream.data.documents import DATA_SUFFIXES, PAD_ID, Dataset, data_files, load_jsonl

__all__ = ["DATA_SUFFIXES", "PAD_ID", "Dataset", "data_files", "load_jsonl"]
