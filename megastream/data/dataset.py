"""Micro-batches from a token cache and a packing layout, assembled on the fly.

- Row order: sequence position p = (step * grad_accum + k) * micro_batch_size + j of micro-batch k;
  with shuffle off that is row p mod N in layout order, with shuffle on a seeded permutation of the
  N row indices (int32, 4 bytes a row), drawn afresh each epoch: a function of (seed, step), so a
  resumed run sees exactly the rows a straight one would.
- A row is its pieces end to end, then padding (token 0, no loss). Labels are next-token targets
  (inputs shifted by one, as in `transformers`), never across a piece boundary: the last token of
  each piece has no target. With packing, RoPE positions restart at each piece and the document
  index of each token (-1 for padding) confines attention to its piece.
- Only the rows of one micro-batch are ever read (pread, per run of contiguous pieces); the data set
  itself stays on disk.
"""

from __future__ import annotations

import numpy as np
import torch

from megastream.data.cache import IGNORE, Cache
from megastream.data.packing import Layout
from megastream.engine.engine import MicroBatch

PAD_ID = 0


class Dataset:
    def __init__(self, cache: Cache, layout: Layout, source: str):
        self.cache, self.layout, self.source = cache, layout, source
        self.seq_len = layout.seq_len
        self.n_truncated, self.n_dropped = layout.n_truncated, layout.n_dropped
        self.n_text_docs = int(cache.header.get("text_docs", 0))
        self.packed = layout.multi  # positions and document indices only when some row holds several pieces
        self.has_mask, self.has_labels = cache.header["has_mask"], cache.header["has_labels"]
        self._perm: torch.Tensor | None = None
        self._perm_key = None
        S = self.seq_len
        self._tok_buf = np.empty(S, cache.dtype)
        self._lab_buf = np.empty(S, np.int32 if self.has_labels else np.uint8)

    def __len__(self) -> int:
        return self.layout.n_rows

    def nbytes(self) -> int:
        """Host bytes this data set holds: per-document index, layout, permutation, row buffers."""
        return (self.cache.nbytes() + self.layout.nbytes() + 4 * len(self) + self._tok_buf.nbytes
                + self._lab_buf.nbytes)

    # ---- order ---------------------------------------------------------------------------------
    def step_rows(self, step: int, grad_accum: int, micro_batch_size: int, shuffle: bool,
                  seed: int) -> list[list[int]]:
        """The row indices of each micro-batch of `step`."""
        out = []
        for k in range(grad_accum):
            start = (step * grad_accum + k) * micro_batch_size
            out.append([self._row(p, shuffle, seed) for p in range(start, start + micro_batch_size)])
        return out

    def _row(self, p: int, shuffle: bool, seed: int) -> int:
        epoch, r = divmod(p, len(self))
        if not shuffle:
            return r
        if self._perm_key != (seed, epoch):
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._perm, self._perm_key = torch.randperm(len(self), generator=g).to(torch.int32), (seed, epoch)
        return int(self._perm[r])

    def micro_batches(self, step: int, grad_accum: int, micro_batch_size: int, shuffle: bool,
                      seed: int) -> list[MicroBatch]:
        return [self.batch(rows) for rows in self.step_rows(step, grad_accum, micro_batch_size, shuffle, seed)]

    def fill(self, rows) -> float:
        """Non-padding tokens / tokens over `rows` (a list, or a list of lists)."""
        flat = [r for x in rows for r in (x if isinstance(x, list) else [x])]
        lay = self.layout
        n = sum(int(lay.piece_len[lay.row_pieces[lay.row_ptr[r]:lay.row_ptr[r + 1]]].sum()) for r in flat)
        return n / (len(flat) * self.seq_len)

    # ---- assembly ------------------------------------------------------------------------------
    def batch(self, rows) -> MicroBatch:
        """The micro-batch of these rows: (B, seq_len) int64 inputs, targets (and positions, document
        indices when packed), read from the cache."""
        B, S = len(rows), self.seq_len
        inputs = np.zeros((B, S), np.int64)  # PAD_ID
        targets = np.full((B, S), IGNORE, np.int64)
        positions = np.tile(np.arange(S, dtype=np.int64), (B, 1)) if self.packed else None
        doc_ids = np.full((B, S), -1, np.int64) if self.packed else None
        lay, offsets = self.layout, self.cache.offsets
        for b, r in enumerate(rows):
            pieces = lay.row_pieces[lay.row_ptr[r]:lay.row_ptr[r + 1]]
            col = 0
            for k, p in enumerate(pieces):
                n = int(lay.piece_len[p])
                off = int(offsets[lay.piece_doc[p]]) + int(lay.piece_start[p])
                tok = self.cache.read("tokens", off, n, self._tok_buf).astype(np.int64)
                inputs[b, col:col + n] = tok
                if self.has_labels:  # the labels of tokens 1..n-1 are the targets of tokens 0..n-2
                    targets[b, col:col + n - 1] = self.cache.read("labels", off + 1, n - 1, self._lab_buf)
                elif self.has_mask:
                    m = self.cache.read("mask", off + 1, n - 1, self._lab_buf)
                    targets[b, col:col + n - 1] = np.where(m == 1, tok[1:], IGNORE)
                else:
                    targets[b, col:col + n - 1] = tok[1:]
                if self.packed:
                    positions[b, col:col + n] = np.arange(n)
                    doc_ids[b, col:col + n] = k
                col += n
            if self.packed:
                positions[b, col:] = np.arange(S - col)
        t = torch.from_numpy
        return MicroBatch(t(inputs), t(targets), t(positions) if self.packed else None,
                          t(doc_ids) if self.packed else None)

    def in_order(self, micro_batch_size: int):
        """Every row once, in layout order (evaluation)."""
        for i in range(0, len(self), micro_batch_size):
            yield self.batch(list(range(i, min(i + micro_batch_size, len(self)))))

    # ---- whole-set views, for tests and small data only ----------------------------------------
    def _all(self) -> MicroBatch:
        if getattr(self, "_materialised", None) is None:
            self._materialised = self.batch(list(range(len(self))))
        return self._materialised

    @property
    def input_ids(self) -> torch.Tensor:
        return self._all().input_ids

    @property
    def labels(self) -> torch.Tensor:
        return self._all().labels

    @property
    def positions(self) -> torch.Tensor | None:
        return self._all().positions

    @property
    def doc_ids(self) -> torch.Tensor | None:
        return self._all().doc_ids
