"""Raw text tokenized one distinct word at a time: the same ids as the tokenizer, ~5x faster.

A byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2 and the demo's) first cuts text into pieces with
its regex and then encodes every piece on its own. A single space between two non-space characters
always starts a new piece under those regexes (a letter, digit or punctuation run never takes a
space after it), so a text is the concatenation of its "words" -- the runs between such spaces, each
but the first with its leading space -- and its ids are the concatenation of the words' ids. Real
text repeats words endlessly, so each distinct word is encoded once (by the tokenizer itself, in a
batch) and every occurrence after that is a table lookup, done with numpy for a whole chunk.

`applies()` admits only tokenizers for which that argument holds: no normalizer but NFC, a ByteLevel
pre-tokenizer (with its own regex, or after a Split regex) that adds no prefix space, and no added
token that strips or contains whitespace. The loader also checks a sample of every chunk against
the tokenizer and rebuilds without this path if one ever differs (`Mismatch`).
"""

from __future__ import annotations

import json
import re

import numpy as np

_WORDS = re.compile(r"(?<=\S) (?=\S)")
MAX_WORDS = 1 << 19  # distinct words kept (a worker's table is reset beyond it)


class Mismatch(Exception):
    """The word-cached ids of a text differ from the tokenizer's."""


def applies(tokenizer) -> bool:
    """Whether ids are a concatenation over words for this `tokenizers.Tokenizer` (see above)."""
    try:
        spec = json.loads(tokenizer.to_str())
    except Exception:  # noqa: BLE001 - an exotic tokenizer: use the plain path
        return False
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        ok = steps[0].get("use_regex", True)
    elif kinds == ["Split", "ByteLevel"]:
        ok = steps[0].get("behavior") == "Isolated" and not steps[1].get("use_regex", True)
    else:
        return False
    if not ok or steps[-1].get("add_prefix_space", False):
        return False
    for t in spec.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or re.search(r"\s", t.get("content", "")):
            return False
    return (spec.get("model") or {}).get("type") == "BPE"


class WordCache:
    """Encodes lists of texts; keeps a table of distinct words -> their ids (int32, end to end)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._reset()

    def _reset(self) -> None:
        self.index: dict[str, int] = {}
        self.flat = np.empty(1 << 16, np.int32)  # every word's ids, end to end
        self.ptr = np.zeros(1 << 12, np.int64)  # word w: flat[ptr[w]:ptr[w + 1]]
        self.n = 0

    def _add(self, words: list[str]) -> None:
        encoded = [e.ids for e in self.tok.encode_batch_fast(words, add_special_tokens=False)]
        lens = np.fromiter(map(len, encoded), np.int64, len(encoded))
        end = int(self.ptr[self.n]) + int(lens.sum())
        if end > len(self.flat):
            self.flat = np.resize(self.flat, max(end, 2 * len(self.flat)))
        if self.n + len(words) + 1 > len(self.ptr):
            self.ptr = np.resize(self.ptr, max(self.n + len(words) + 1, 2 * len(self.ptr)))
        start = int(self.ptr[self.n])
        self.flat[start:end] = np.fromiter((i for ids in encoded for i in ids), np.int32, end - start)
        self.ptr[self.n + 1:self.n + 1 + len(words)] = start + np.cumsum(lens)
        for w in words:
            self.index[w] = self.n
            self.n += 1

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts end to end as int64, ids per text)."""
        words: list[str] = []
        per_text = np.empty(len(texts), np.int64)
        for i, text in enumerate(texts):
            parts = _WORDS.split(text)
            per_text[i] = len(parts)
            words.append(parts[0])
            words += [" " + p for p in parts[1:]]
        new = list(dict.fromkeys(w for w in words if w not in self.index))
        if self.n + len(new) > MAX_WORDS:
            self._reset()
            new = list(dict.fromkeys(words))
        if new:
            self._add(new)
        ids = np.fromiter(map(self.index.__getitem__, words), np.int64, len(words))
        start, n = self.ptr[ids], self.ptr[ids + 1] - self.ptr[ids]
        ends = np.cumsum(n)
        gather = np.repeat(start - (ends - n), n) + np.arange(int(ends[-1]) if len(ends) else 0)
        tokens = self.flat[gather].astype(np.int64)
        word_end = np.concatenate([[0], ends])
        text_end = np.cumsum(per_text)
        lengths = word_end[text_end] - word_end[text_end - per_text]
        return tokens, lengths

    def check(self, texts: list[str], tokens: np.ndarray, lengths: np.ndarray, sample: int = 8) -> None:
        """Compare the first `sample` texts with the tokenizer's own ids; raise Mismatch on a difference."""
        k = min(sample, len(texts))
        if not k:
            return
        want = [e.ids for e in self.tok.encode_batch_fast(texts[:k], add_special_tokens=False)]
        got_end = int(lengths[:k].sum())
        if [len(w) for w in want] != lengths[:k].tolist() or tokens[:got_end].tolist() != [i for w in want for i in w]:
            raise Mismatch("word-cached tokenization differs from the tokenizer's")
