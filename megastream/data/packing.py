"""Packing documents into seq_len rows from their lengths alone (the tokens stay on disk).

`layout(lengths, kinds, seq_len, pack)` cuts each document into pieces and places the pieces in
rows; a row is a list of (document, first token, length) pieces, read back from the token cache
when its micro-batch is assembled. Memory is O(pieces) in numpy arrays (about 28 bytes a piece).

Pieces (every mode but wrap):
- raw text (ends with the end-of-text token): split into consecutive seq_len pieces from token 0;
  a piece under 2 tokens (a 1-token tail, a 1-token text) is dropped;
- pre-tokenized input_ids rows and chat / prompt-completion rows longer than seq_len follow
  data.overflow: truncate (keep the first seq_len tokens, counted), drop (counted) or error.

Modes (data.pack):
- greedy: pieces in document order; a piece goes into the current row if it fits, else starts a
  new row (the list-based loader's packing, row for row: the golden loss curve's).
- bfd: best-fit decreasing: pieces longest first (equal lengths in an order seeded by `seed`),
  each into the open row with the least room that still fits it (of equal rooms, the row that
  came to it last), else a new row; rows in creation order, pieces in placement order. The demo
  corpus at seq_len 128 fills 98.8% of its rows (greedy: 77.9%).
- wrap (raw text only, as pre-training does): the documents are concatenated in order and the
  stream cut into consecutive seq_len windows, one row each, documents crossing windows; the last
  window is kept if it has 2 tokens or more. Fill ~100%.
- none (pack: false): each piece is its own padded row.

In a row holding several pieces, RoPE positions restart at each piece and attention never crosses
a piece boundary (`Layout.multi` says whether any row needs that document mask).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable

import numpy as np

from megastream.errors import ConfigError, DataError

KIND_TOKENS, KIND_TEXT, KIND_CHAT = 0, 1, 2  # per-document kinds (uint8)
MODES = ("greedy", "bfd", "wrap", "none")
OVERFLOWS = ("truncate", "drop", "error")


@dataclass
class Layout:
    seq_len: int
    mode: str  # "greedy" | "bfd" | "wrap" | "none"
    piece_doc: np.ndarray  # int64 (P,) document index of each piece
    piece_start: np.ndarray  # int64 (P,) first token of the piece within its document
    piece_len: np.ndarray  # int32 (P,) tokens in the piece (1..seq_len)
    row_ptr: np.ndarray  # int64 (R+1,) row r holds pieces row_pieces[row_ptr[r]:row_ptr[r+1]], in that order
    row_pieces: np.ndarray  # int64 (P,) indices into the piece arrays
    n_truncated: int = 0  # documents cut to seq_len (data.overflow: truncate)
    n_dropped: int = 0  # documents skipped (data.overflow: drop)

    @property
    def n_rows(self) -> int:
        return len(self.row_ptr) - 1

    @property
    def tokens(self) -> int:
        """Non-padding tokens: the sum of the piece lengths."""
        return int(self.piece_len.sum(dtype=np.int64))

    @property
    def fill(self) -> float:
        """Fraction of the n_rows * seq_len token slots holding document tokens."""
        return self.tokens / (self.n_rows * self.seq_len) if self.n_rows else 0.0

    @property
    def multi(self) -> bool:
        """Some row holds more than one piece (so a document mask is needed)."""
        return self.n_rows > 0 and int(np.diff(self.row_ptr).max()) > 1

    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(a.nbytes for a in (self.piece_doc, self.piece_start, self.piece_len, self.row_ptr,
                                      self.row_pieces))


def layout(lengths: np.ndarray, kinds: np.ndarray, seq_len: int, pack, seed: int = 0,
           overflow: str = "truncate", where: Callable[[int], str] = lambda doc: f"document {doc}") -> Layout:
    """Rows of seq_len tokens from per-document `lengths` and `kinds` (KIND_*), per `pack`
    ("greedy" | "bfd" | "wrap" | False / "none"; True means "greedy"). `where(doc)` names a
    document (file:line) in error messages."""
    mode = _mode(pack)
    if overflow not in OVERFLOWS:
        raise ConfigError(f"data.overflow: {overflow!r} is not one of {', '.join(OVERFLOWS)}")
    seq_len = int(seq_len)
    if seq_len < 2:
        raise ConfigError(f"data.seq_len: {seq_len} is too short; a sequence needs at least 2 tokens")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    kinds = np.asarray(kinds).reshape(-1)
    if len(kinds) != len(lengths):
        raise ValueError(f"{len(lengths)} lengths but {len(kinds)} kinds")
    if len(lengths) and (lengths.min() < 0 or kinds.min() < 0 or kinds.max() > KIND_CHAT):
        raise ValueError("lengths must be >= 0 and kinds one of KIND_TOKENS, KIND_TEXT, KIND_CHAT")
    if mode == "wrap":
        return _wrap(lengths, kinds, seq_len, where)
    doc, start, plen, n_truncated, n_dropped = _pieces(lengths, kinds, seq_len, overflow, where)
    if len(plen) == 0:
        raise DataError(_empty_message(len(lengths), n_dropped))
    n = len(plen)
    if mode == "none":
        row_ptr, row_pieces = np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)
    elif mode == "greedy":
        row_ptr, row_pieces = _greedy(plen, seq_len), np.arange(n, dtype=np.int64)
    else:
        row_ptr, row_pieces = _bfd(plen, seq_len, seed)
    return Layout(seq_len, mode, doc, start, plen, row_ptr, row_pieces, n_truncated, n_dropped)


def _mode(pack) -> str:
    if pack is False or pack is None or pack == "none":
        return "none"
    if pack is True:
        return "greedy"
    if isinstance(pack, str) and pack in MODES:
        return pack
    raise ConfigError(f"data.pack: {pack!r} is not one of greedy, bfd, wrap, none (or false)")


def _empty_message(n_docs: int, n_dropped: int) -> str:
    if n_docs == 0:
        return "no training sequences (empty files or blank lines only)"
    short = n_docs - n_dropped
    return (f"no training sequences (of {n_docs} document(s), {n_dropped} dropped by data.overflow: drop and "
            f"{short} under 2 tokens)")


def _pieces(lengths, kinds, seq_len, overflow, where):
    """(doc, start, len, n_truncated, n_dropped): the pieces of every document, in document order."""
    text = kinds == KIND_TEXT
    over = ~text & (lengths > seq_len)
    n_over = int(over.sum())
    if n_over and overflow == "error":
        d = int(np.flatnonzero(over)[0])
        n = int(lengths[d])
        if kinds[d] == KIND_TOKENS:
            raise DataError(f"{where(d)}: input_ids has {n} ids, more than data.seq_len={seq_len}; "
                            "raise data.seq_len, split the row, or set data.overflow: truncate | drop")
        raise DataError(f"{where(d)}: the rendered conversation has {n} tokens, more than "
                        f"data.seq_len={seq_len}; raise data.seq_len or set data.overflow: truncate | drop")
    # pieces per document: texts split (a tail under 2 tokens dropped), others one piece unless dropped
    full, tail = np.divmod(lengths, seq_len)
    count = np.where(text, full + (tail >= 2), (lengths >= 2).astype(np.int64))
    if overflow == "drop":
        count[over] = 0
    docs = np.repeat(np.arange(len(lengths), dtype=np.int64), count)
    first = np.cumsum(count) - count  # index of each document's first piece
    start = (np.arange(len(docs), dtype=np.int64) - first[docs]) * seq_len
    plen = np.minimum(lengths[docs] - start, seq_len).astype(np.int32)
    return (docs, start, plen, n_over if overflow == "truncate" else 0, n_over if overflow == "drop" else 0)


def _greedy(plen: np.ndarray, seq_len: int) -> np.ndarray:
    """row_ptr of the in-order greedy packing (rows are runs of consecutive pieces)."""
    starts = array("q", [0])
    used = 0
    chunk = 1 << 16  # bounded transient memory: Python ints for one chunk at a time
    for base in range(0, len(plen), chunk):
        for i, n in enumerate(plen[base:base + chunk].tolist(), base):
            if used + n > seq_len:
                starts.append(i)
                used = 0
            used += n
    starts.append(len(plen))
    return np.frombuffer(starts, dtype=np.int64).copy()


def _bfd(plen: np.ndarray, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_ptr, row_pieces) of best-fit decreasing.

    Open rows sit on stacks by remaining room; `avail` is a bitset of the rooms with a non-empty
    stack. Pieces of one length L are placed together: the fullest row that fits (room c, the
    lowest set bit at or above L) takes c // L of them (after each its room c - L is again the
    least that fits), and so on down its stack, then the next room up; then new rows take
    seq_len // L each. That is exactly one-piece-at-a-time best fit, in O(rows touched) list
    operations per (length, room) pair."""
    n = len(plen)
    perm = np.random.default_rng(seed).permutation(n)
    order = perm[np.argsort(-plen[perm], kind="stable")]  # longest first, ties in seeded order
    group_len, group_count = np.unique(plen[order], return_counts=True)
    stacks: list[list[int]] = [[] for _ in range(seq_len + 1)]  # open row ids by remaining room
    avail = 0
    run_row, run_count = array("q"), array("q")  # placements in processing order: row, how many pieces
    n_rows = 0

    def push(rows: list[int], room: int) -> None:
        nonlocal avail
        if room and rows:
            if not stacks[room]:
                avail |= 1 << room
            stacks[room] += rows

    for L, k in zip(group_len[::-1].tolist(), group_count[::-1].tolist()):
        while k:
            m = avail >> L
            if not m:  # no open row fits: new rows, seq_len // L pieces each
                per = seq_len // L
                q, last = divmod(k, per)
                rows = list(range(n_rows, n_rows + q))
                run_row.extend(rows)
                run_count.extend([per] * q)
                push(rows, seq_len - per * L)
                n_rows += q
                if last:
                    run_row.append(n_rows)
                    run_count.append(last)
                    push([n_rows], seq_len - last * L)
                    n_rows += 1
                break
            c = L + (m & -m).bit_length() - 1
            st = stacks[c]
            per = c // L
            take = min(k // per, len(st))
            rows = st[len(st) - take:][::-1]  # popped top first
            del st[len(st) - take:]
            run_row.extend(rows)
            run_count.extend([per] * take)
            k -= take * per
            push(rows, c - per * L)
            if k and st:  # fewer than `per` pieces left: one more row takes them
                r = st.pop()
                run_row.append(r)
                run_count.append(k)
                push([r], c - k * L)
                k = 0
            if not st:
                avail &= ~(1 << c)
    placed = np.repeat(np.frombuffer(run_row, dtype=np.int64), np.frombuffer(run_count, dtype=np.int64))
    row_pieces = order[np.argsort(placed, kind="stable")]  # by row, placement order inside a row
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(placed, minlength=n_rows), out=row_ptr[1:])
    return row_ptr, row_pieces.astype(np.int64, copy=False)


def _wrap(lengths, kinds, seq_len, where) -> Layout:
    """The documents' tokens as one stream cut into seq_len windows; pieces are the document
    segments inside each window."""
    bad = np.flatnonzero(kinds != KIND_TEXT)
    if len(bad):
        raise DataError(f"data.pack: wrap concatenates raw text, but {where(int(bad[0]))} is a pre-tokenized/chat "
                        "row; use data.pack: bfd")
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    n_full, tail = divmod(total, seq_len)
    kept = total if tail >= 2 else n_full * seq_len
    if kept < 2:
        raise DataError(f"no training sequences (the {len(lengths)} text document(s) hold {total} token(s) "
                        "in all; a sequence needs at least 2)")
    n_rows = -(-kept // seq_len)
    starts = ends - lengths
    windows = np.arange(n_rows, dtype=np.int64) * seq_len
    doc_starts = starts[(lengths > 0) & (starts < kept)]
    cuts = np.concatenate([windows, doc_starts])  # every piece starts at a window or a document start
    cuts.sort(kind="stable")  # two sorted runs: a merge
    cuts = cuts[np.append(True, cuts[1:] != cuts[:-1])]
    piece_len = np.diff(np.append(cuts, kept)).astype(np.int32)
    piece_doc = np.searchsorted(ends, cuts, side="right").astype(np.int64)  # skips empty documents
    piece_start = cuts - starts[piece_doc]
    row_ptr = np.append(np.searchsorted(cuts, windows), len(cuts)).astype(np.int64)
    return Layout(seq_len, "wrap", piece_doc, piece_start, piece_len, row_ptr,
                  np.arange(len(cuts), dtype=np.int64))
