"""Training data: .jsonl rows (one file, a list, or a directory of them) of pre-tokenized
`{"input_ids": [...]}` (optionally with aligned `"labels"`, -100 for no loss), raw `{"text": "..."}`,
or chat rows `{"messages": [...]}` / `{"prompt", "completion"}` (megastream.chat: loss on the
assistant / completion tokens only).

- An input_ids row of exactly seq_len ids is one sequence; a shorter one is padded (padding is
  excluded from the loss); a longer one is truncated, dropped or an error (data.overflow), counted.
- Text rows are tokenized and end with the end-of-text token; texts longer than seq_len are split.
- data.pack (the default): documents are packed in order into seq_len rows, RoPE positions restart
  at each document and attention never crosses a boundary; otherwise each document is a padded row.
- Labels are next-token targets (the inputs shifted by one, as in `transformers`), so a full row
  has seq_len - 1 loss tokens.
- Order: sequence position p = (step * grad_accum + k) * micro_batch_size + j of micro-batch k;
  with shuffle off that is row p mod N in file order, with shuffle on a seeded permutation of the
  rows drawn afresh each epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megastream.engine.engine import MicroBatch
from megastream.engine.loss import IGNORE
from megastream.chat import chat_document, completion_document, validate_messages
from megastream.errors import DataError
from megastream.tokenizer import TextTokenizer

PAD_ID = 0


@dataclass
class Dataset:
    input_ids: torch.Tensor  # (N, S) int64
    labels: torch.Tensor  # (N, S) int64, IGNORE where no loss
    source: str
    n_text_docs: int = 0
    n_truncated: int = 0  # pre-tokenized rows cut to seq_len (data.overflow: truncate)
    n_dropped: int = 0  # ... or skipped (data.overflow: drop)
    positions: torch.Tensor | None = None  # (N, S) RoPE positions when rows pack several documents
    doc_ids: torch.Tensor | None = None  # (N, S) document index of each token (-1: padding)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def micro_batches(self, step: int, grad_accum: int, micro_batch_size: int, shuffle: bool,
                      seed: int) -> list[MicroBatch]:
        n = len(self)
        out = []
        for k in range(grad_accum):
            start = (step * grad_accum + k) * micro_batch_size
            rows = [self._row(p, n, shuffle, seed) for p in range(start, start + micro_batch_size)]
            idx = torch.tensor(rows, dtype=torch.long)
            packed = self.positions is not None
            out.append(MicroBatch(self.input_ids[idx], self.labels[idx], self.positions[idx] if packed else None,
                                  self.doc_ids[idx] if packed else None))
        return out

    def _row(self, p: int, n: int, shuffle: bool, seed: int) -> int:
        epoch, r = divmod(p, n)
        if not shuffle:
            return r
        if getattr(self, "_perm_key", None) != (seed, epoch):
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._perm, self._perm_key = torch.randperm(n, generator=g), (seed, epoch)
        return int(self._perm[r])


DATA_SUFFIXES = (".jsonl", ".parquet")


def data_files(path) -> list[Path]:
    """data.path as files: one file, a list of files, or every .jsonl/.parquet in a directory (sorted)."""
    out = []
    for p in [path] if isinstance(path, (str, Path)) else path:
        p = Path(p)
        out += sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES) if p.is_dir() else [p]
    return out


def _jsonl_rows(path: Path):
    """(where, row) for each non-blank line; malformed lines are errors naming file:line."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"data.path: cannot open {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:  # some messages end in "at" ("Unterminated string starting at")
                what = e.msg.removesuffix(" at")
                raise DataError(f"{where}: not valid JSON ({what} at column {e.colno}); each line must be one "
                                'JSON object such as {"input_ids": [1, 2, 3]} or {"text": "..."}') from None


def _parquet_rows(path: Path):
    """(where, row) for each row of a parquet file: columns as in the jsonl formats."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for bad files
        raise DataError(f"{path}: cannot read as parquet ({e}); the file is corrupt or not parquet") from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            i += 1
            yield f"{path}:row {i}", {k: v for k, v in row.items() if v is not None}


def load_jsonl(path, seq_len: int, vocab_size: int, tokenizer=None, overflow: str = "error",
               pack: bool = False) -> Dataset:
    """Read and validate .jsonl data (a file, a list of files, or a directory) into sequences.
    `tokenizer` is a callable returning a TextTokenizer, called only if there are text rows.
    Pre-tokenized rows longer than seq_len are truncated, dropped (both counted) or an error, per
    `overflow`; texts longer than seq_len are split into seq_len pieces. With `pack`, documents
    are packed in order into seq_len rows, positions restarting and attention confined to each
    document; without it, every document is its own padded row."""
    items: list[tuple] = []  # in file order: ("doc", (ids, labels | None)) | ("text", str) | ("chat", where, row)
    counts = {"truncated": 0, "dropped": 0}
    files = data_files(path)
    for f in files:
        _read_file(f, seq_len, vocab_size, overflow, items, counts)
    tok: TextTokenizer | None = None
    if any(it[0] != "doc" for it in items):
        tok = tokenizer()
        if tok.vocab_size > vocab_size:
            raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary has "
                            f"{vocab_size}; use the model's own tokenizer (data.tokenizer)")
    texts = [it[1] for it in items if it[0] == "text"]
    encoded = iter(tok.encode(texts)) if texts else iter(())
    docs: list[tuple[list[int], list[int] | None]] = []  # (input ids, labels or None = every token)
    for it in items:
        if it[0] == "doc":
            docs.append(it[1])
        elif it[0] == "text":  # split long texts into seq_len pieces
            ids = next(encoded) + ([tok.eos_id] if tok.eos_id is not None else [])
            docs += [(ids[s:s + seq_len], None) for s in range(0, len(ids), seq_len) if len(ids[s:s + seq_len]) >= 2]
        else:
            doc = _chat(tok, it[1], it[2])
            if len(doc[0]) > seq_len:
                if overflow == "error":
                    raise DataError(f"{it[1]}: the rendered conversation has {len(doc[0])} tokens, more than "
                                    f"data.seq_len={seq_len}; raise data.seq_len or set data.overflow: truncate | drop")
                counts["dropped" if overflow == "drop" else "truncated"] += 1
                if overflow == "drop":
                    continue
                doc = (doc[0][:seq_len], doc[1][:seq_len])
            docs.append(doc)
    source = ", ".join(map(str, files))
    if not docs:
        raise DataError(f"{source}: no training sequences (empty files, blank lines only, or every row dropped "
                        "by data.overflow: drop)")
    rows = _pack(docs, seq_len) if pack else [[d] for d in docs]
    inputs, labels, positions, doc_ids = zip(*(_row(r, seq_len) for r in rows))
    multi = pack and any(len(r) > 1 for r in rows)  # single-document rows need no mask
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Dataset(t(inputs), t(labels), source, n_text_docs=len(items) - sum(it[0] == "doc" for it in items),
                   n_truncated=counts["truncated"],
                   n_dropped=counts["dropped"], positions=t(positions) if multi else None,
                   doc_ids=t(doc_ids) if multi else None)


def _pack(docs: list, seq_len: int) -> list[list]:
    """Greedy, in order: a document goes into the current row if it fits, else starts a new one."""
    rows, cur, used = [], [], 0
    for d in docs:
        if cur and used + len(d[0]) > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(d)
        used += len(d[0])
    return rows + [cur]


def _row(docs: list, seq_len: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """One seq_len row from its documents: inputs, next-token targets (the next token's label,
    never across a document boundary), positions restarting per document, document index."""
    inputs, targets, positions, doc_ids = [], [], [], []
    for k, (ids, labels) in enumerate(docs):
        lab = labels if labels is not None else ids
        inputs += ids
        targets += lab[1:] + [IGNORE]
        positions += list(range(len(ids)))
        doc_ids += [k] * len(ids)
    pad = seq_len - len(inputs)
    return (inputs + [PAD_ID] * pad, targets + [IGNORE] * pad, positions + list(range(pad)),
            doc_ids + [-1] * pad)


def _chat(tok: TextTokenizer, where: str, row: dict) -> tuple[list[int], list[int]]:
    if "messages" in row:
        if not tok.chat_template:
            raise DataError(f"{where}: a messages row needs a chat template, and {tok.path.parent} has none "
                            "(tokenizer_config.json chat_template or chat_template.jinja)")
        return chat_document(tok, validate_messages(row["messages"], where), where)
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
        raise DataError(f"{where}: prompt and completion must both be strings")
    return completion_document(tok, row["prompt"], row["completion"], where)


def _read_file(path: Path, seq_len: int, vocab_size: int, overflow: str, items: list, counts: dict) -> None:
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "input_ids" in row:
            ids = _int_list(row["input_ids"], "input_ids", where)
            labels = _int_list(row["labels"], "labels", where) if "labels" in row else None
            if labels is not None and len(labels) != len(ids):
                raise DataError(f"{where}: labels has {len(labels)} entries and input_ids {len(ids)}; they must "
                                "align one to one (use -100 where a token gets no loss)")
            if len(ids) < 2:
                raise DataError(f"{where}: input_ids has {len(ids)} id(s); a sequence needs at least 2")
            if len(ids) > seq_len:
                if overflow == "error":
                    raise DataError(f"{where}: input_ids has {len(ids)} ids, more than data.seq_len={seq_len}; "
                                    "raise data.seq_len, split the row, or set data.overflow: truncate | drop")
                if overflow == "drop":
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += 1
                ids = ids[:seq_len]
                labels = labels[:seq_len] if labels is not None else None
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise DataError(f"{where}: token id {bad[0]} is outside the model's vocabulary "
                                f"(0..{vocab_size - 1}); the data was tokenized for another model")
            if labels is not None:
                bad = [i for i in labels if i != IGNORE and not 0 <= i < vocab_size]
                if bad:
                    raise DataError(f"{where}: label {bad[0]} is neither -100 nor a token id of the model "
                                    f"(0..{vocab_size - 1})")
            items.append(("doc", (ids, labels)))
        elif "text" in row:
            if not isinstance(row["text"], str):
                raise DataError(f"{where}: text must be a string")
            items.append(("text", row["text"]))
        elif "messages" in row or "prompt" in row:
            items.append(("chat", where, row))
        else:
            raise DataError(f"{where}: row has none of \"input_ids\", \"text\", \"messages\", "
                            f"\"prompt\"/\"completion\" (keys: {', '.join(map(str, row)) or 'none'})")


def _int_list(value, key: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise DataError(f"{where}: {key} must be a list of integers")
    return value
