"""Rows -> documents: validation and tokenization of one chunk of rows, in a worker process.

A row is one of (after megastream.data.sources has mapped Alpaca, ShareGPT and data.columns onto them):
- `{"input_ids": [...]}`, optionally with aligned `"labels"` (-100 for no loss): a pre-tokenized
  document, checked against the model's vocabulary;
- `{"text": "..."}`: raw text, tokenized and ended with the end-of-text token;
- `{"messages": [...]}` / `{"prompt", "completion"}`: chat, rendered with the model's chat template
  (megastream.chat), the loss on the assistant / completion tokens only.

A chunk becomes flat arrays (tokens end to end, per-document lengths, kinds, line numbers, and labels
when some token is not its own label) that the cache writer appends. Nothing here depends on seq_len:
splitting, overflow and packing act on the cache's offsets when training starts (megastream.data.packing).
This module does not import torch: it runs in worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megastream.chat import chat_document, completion_document, validate_messages
from megastream.data.packing import KIND_CHAT, KIND_TEXT, KIND_TOKENS
from megastream.data.sources import Chunk, Source, chunk_rows
from megastream.data.wordcache import WordCache
from megastream.data.wordcache import applies as wordcache_applies
from megastream.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    """The documents of one chunk."""
    source: int
    tokens: np.ndarray  # int64, every document end to end
    lengths: np.ndarray  # int64 per document
    kinds: np.ndarray  # uint8 per document
    lines: np.ndarray  # int64 line / row number per document
    labels: np.ndarray | None  # int64 aligned with tokens (IGNORE: no loss); None: every token is its own label
    rows: int  # non-blank rows read
    payload_bytes: int  # for the progress bar
    word_cache: bool = False  # texts went through megastream.data.wordcache


class Encoder:
    """Turns chunks into documents. `tokenizer` is a callable returning a megastream TextTokenizer,
    called once, on the first text or chat row (pre-tokenized data needs none)."""

    def __init__(self, sources: list[Source], vocab_size: int, tokenizer, columns: dict | None = None,
                 word_cache: bool = True):
        self.sources, self.vocab_size, self._make_tok, self.columns = sources, vocab_size, tokenizer, columns
        self._tok = None
        self.word_cache: WordCache | bool | None = None if word_cache else False  # decided on the first text

    @property
    def tok(self):
        if self._tok is None:
            tok = self._make_tok()
            if tok.vocab_size > self.vocab_size:
                raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary has "
                                f"{self.vocab_size}; use the model's own tokenizer (data.tokenizer)")
            self._tok = tok
        return self._tok

    def __call__(self, chunk: Chunk) -> Encoded:
        src = self.sources[chunk.source]
        docs: list = []  # per document: [kind, ids, labels | None, line]; text ids filled after one batched encode
        texts: list[tuple[int, str]] = []
        rows = 0
        for n, row in chunk_rows(chunk, src, self.columns):
            rows += 1
            where = src.where(n)
            if "input_ids" in row:
                ids, labels = self._tokens_row(row, where)
                docs.append([KIND_TOKENS, ids, labels, n])
            elif "text" in row:
                if not isinstance(row["text"], str):
                    raise DataError(f"{where}: text must be a string")
                texts.append((len(docs), row["text"]))
                docs.append([KIND_TEXT, None, None, n])
            elif "messages" in row or "prompt" in row:
                ids, labels = self._chat(row, where)
                docs.append([KIND_CHAT, np.asarray(ids, np.int64), np.asarray(labels, np.int64), n])
            else:
                raise DataError(f"{where}: row has none of \"input_ids\", \"text\", \"messages\", "
                                f"\"prompt\"/\"completion\" (keys: {', '.join(map(str, row)) or 'none'})")
        if texts:
            self._encode_texts(docs, texts)
        docs = [d for d in docs if len(d[1])]  # an empty text with no end-of-text token is no document
        lengths = np.fromiter((len(d[1]) for d in docs), np.int64, len(docs))
        tokens = np.concatenate([d[1] for d in docs]) if docs else np.zeros(0, np.int64)
        labels = None
        if any(d[2] is not None for d in docs):
            labels = np.concatenate([d[2] if d[2] is not None else d[1] for d in docs])
        payload = chunk.payload
        size = sum(map(len, payload)) if isinstance(payload, list) else payload.nbytes
        return Encoded(chunk.source, tokens, lengths, np.fromiter((d[0] for d in docs), np.uint8, len(docs)),
                       np.fromiter((d[3] for d in docs), np.int64, len(docs)), labels, rows, size,
                       bool(self.word_cache))

    def _encode_texts(self, docs: list, texts: list[tuple[int, str]]) -> None:
        """Fill in the ids of the text documents (each ended with the end-of-text token): through the
        word cache where the tokenizer allows it (megastream.data.wordcache), else the tokenizer."""
        tok = self.tok
        strs = [t for _, t in texts]
        if self.word_cache is None:
            self.word_cache = WordCache(tok.tok) if wordcache_applies(tok.tok) else False
        if self.word_cache:
            tokens, lengths = self.word_cache.encode(strs)
            self.word_cache.check(strs, tokens, lengths)  # raises Mismatch: the loader rebuilds without it
            per_text = np.split(tokens, np.cumsum(lengths)[:-1])
        else:
            per_text = [np.asarray(e.ids, np.int64) for e in tok.tok.encode_batch_fast(strs, add_special_tokens=False)]
        eos = np.array([tok.eos_id] if tok.eos_id is not None else [], np.int64)
        for (i, _), ids in zip(texts, per_text):
            docs[i][1] = np.concatenate([ids, eos])

    def _tokens_row(self, row: dict, where: str) -> tuple[np.ndarray, np.ndarray | None]:
        ids = _int_array(row["input_ids"], "input_ids", where)
        labels = _int_array(row["labels"], "labels", where) if "labels" in row else None
        if labels is not None and len(labels) != len(ids):
            raise DataError(f"{where}: labels has {len(labels)} entries and input_ids {len(ids)}; they must "
                            "align one to one (use -100 where a token gets no loss)")
        if len(ids) < 2:
            raise DataError(f"{where}: input_ids has {len(ids)} id(s); a sequence needs at least 2")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if len(bad):
            raise DataError(f"{where}: token id {bad[0]} is outside the model's vocabulary "
                            f"(0..{self.vocab_size - 1}); the data was tokenized for another model")
        if labels is not None:
            bad = labels[(labels != IGNORE) & ((labels < 0) | (labels >= self.vocab_size))]
            if len(bad):
                raise DataError(f"{where}: label {bad[0]} is neither -100 nor a token id of the model "
                                f"(0..{self.vocab_size - 1})")
        return ids, labels

    def _chat(self, row: dict, where: str) -> tuple[list[int], list[int]]:
        tok = self.tok
        if "messages" in row:
            if not tok.chat_template:
                raise DataError(f"{where}: a messages row needs a chat template, and {tok.path.parent} has none "
                                "(tokenizer_config.json chat_template or chat_template.jinja)")
            return chat_document(tok, validate_messages(row["messages"], where), where)
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise DataError(f"{where}: prompt and completion must both be strings")
        system = row.get("system")
        if isinstance(system, str) and system:  # Alpaca's optional system prompt
            if tok.chat_template:
                return chat_document(tok, [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]},
                                           {"role": "assistant", "content": row["completion"]}], where)
            return completion_document(tok, system + "\n\n" + row["prompt"], row["completion"], where)
        return completion_document(tok, row["prompt"], row["completion"], where)


def _int_array(value, key: str, where: str) -> np.ndarray:
    """A JSON list of integers as int64 (bools, floats and nested lists are refused)."""
    if isinstance(value, list) and not value:
        return np.zeros(0, np.int64)
    arr = np.asarray(value) if isinstance(value, list) else None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu" or bool in set(map(type, value)):
        raise DataError(f"{where}: {key} must be a list of integers")
    return arr.astype(np.int64)

