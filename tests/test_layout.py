"""megastream.data.packing: rows from document lengths alone. Greedy is the list-based loader's
packing exactly (its `_pack`, frozen below); bfd is exact best fit and fills rows; wrap tiles the
text stream; every overflow branch; memory O(pieces)."""

import json
import time
import tracemalloc

import numpy as np
import pytest

from megastream.data.packing import KIND_CHAT, KIND_TEXT, KIND_TOKENS, Layout, layout
from megastream.errors import ConfigError, DataError

KINDS = (KIND_TOKENS, KIND_TEXT, KIND_CHAT)


def _pack(docs: list, seq_len: int) -> list[list]:
    """megastream/data/documents.py `_pack` as of de04053 (the list-based loader this module replaces),
    verbatim: the golden loss curve was trained on its rows."""
    rows, cur, used = [], [], 0
    for d in docs:
        if cur and used + len(d[0]) > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(d)
        used += len(d[0])
    return rows + [cur]


def _random_docs(rng, n, seq_len, kinds=KINDS):
    """Lengths (texts from 1 token, others from 2, some longer than seq_len) and kinds."""
    kinds = rng.choice(np.array(kinds, dtype=np.uint8), n)
    lengths = rng.integers(2, 3 * seq_len + 3, n)
    fit = rng.random(n) < 0.5  # many that fit
    lengths[fit] = rng.integers(2, seq_len + 1, n)[fit]
    text = kinds == KIND_TEXT
    lengths[text & (rng.random(n) < 0.1)] = 1
    edge = rng.random(n) < 0.2  # exactly k * seq_len and k * seq_len + 1: tails of 0 and 1 token
    lengths[edge] = seq_len * rng.integers(1, 3, int(edge.sum())) + rng.integers(0, 2, int(edge.sum()))
    return lengths.astype(np.int64), kinds


def _rows(lay: Layout) -> list[list[tuple[int, int, int]]]:
    """Each row as its (doc, start, len) pieces, in order."""
    p = lay.row_pieces
    return [[(int(lay.piece_doc[i]), int(lay.piece_start[i]), int(lay.piece_len[i])) for i in p[a:b]]
            for a, b in zip(lay.row_ptr[:-1], lay.row_ptr[1:])]


def _docs_as_today(lengths, kinds, seq_len, overflow):
    """The list-based load_jsonl's document list (de04053: texts split into seq_len pieces, a piece
    under 2 tokens dropped; longer rows truncated or dropped), each token id naming (doc, position)."""
    docs = []
    for d, (n, k) in enumerate(zip(lengths.tolist(), kinds.tolist())):
        ids = [d * 1_000_000 + i for i in range(n)]
        if k == KIND_TEXT:
            docs += [(ids[s:s + seq_len], None) for s in range(0, n, seq_len) if len(ids[s:s + seq_len]) >= 2]
        elif n <= seq_len:
            docs.append((ids, None))
        elif overflow == "truncate":
            docs.append((ids[:seq_len], None))
    return docs


@pytest.mark.parametrize("seq_len", [2, 3, 8, 33])
@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_greedy_and_none_are_todays_packing(seq_len, overflow):
    rng = np.random.default_rng(seq_len)
    lengths, kinds = _random_docs(rng, 400, seq_len)
    docs = _docs_as_today(lengths, kinds, seq_len, overflow)
    today = [[(ids[0] // 1_000_000, ids[0] % 1_000_000, len(ids)) for ids, _ in row]
             for row in _pack(docs, seq_len)]
    greedy = layout(lengths, kinds, seq_len, "greedy", overflow=overflow)
    assert _rows(greedy) == today and greedy.mode == "greedy"
    assert _rows(layout(lengths, kinds, seq_len, True, overflow=overflow)) == today  # pack: true as today
    pieces = [p for row in today for p in row]
    for off in (False, "none", None):
        alone = layout(lengths, kinds, seq_len, off, overflow=overflow)
        assert _rows(alone) == [[p] for p in pieces] and alone.mode == "none" and not alone.multi
    over = int(((kinds != KIND_TEXT) & (lengths > seq_len)).sum())
    assert (greedy.n_truncated, greedy.n_dropped) == ((over, 0) if overflow == "truncate" else (0, over))


def _check_pieces(lay, lengths, kinds, overflow="truncate"):
    """Every piece in exactly one row, rows within seq_len, and each document's pieces exactly
    its rule: text tiles [0, len) in seq_len steps less a tail under 2 tokens; others (0, min(len,
    seq_len)) unless dropped."""
    S = lay.seq_len
    assert lay.piece_doc.dtype == np.int64 and lay.piece_start.dtype == np.int64
    assert lay.piece_len.dtype == np.int32 and lay.row_ptr.dtype == np.int64 and lay.row_pieces.dtype == np.int64
    P = len(lay.piece_len)
    assert np.array_equal(np.sort(lay.row_pieces), np.arange(P)) and lay.row_ptr[0] == 0 and lay.row_ptr[-1] == P
    assert (np.diff(lay.row_ptr) >= 1).all()
    assert lay.piece_len.min() >= 1 and lay.piece_len.max() <= S
    used = np.add.reduceat(lay.piece_len[lay.row_pieces].astype(np.int64), lay.row_ptr[:-1])
    assert used.max() <= S and lay.tokens == used.sum()
    assert lay.fill == pytest.approx(used.sum() / (lay.n_rows * S))
    assert lay.multi == bool((np.diff(lay.row_ptr) > 1).any())
    got: dict = {}
    for d, s, n in zip(lay.piece_doc.tolist(), lay.piece_start.tolist(), lay.piece_len.tolist()):
        got.setdefault(d, []).append((s, n))
    for d, (n, k) in enumerate(zip(lengths.tolist(), kinds.tolist())):
        if k == KIND_TEXT:
            want = [(s, min(S, n - s)) for s in range(0, n, S) if min(S, n - s) >= 2]
        elif n > S and overflow == "drop":
            want = []
        else:
            want = [(0, min(n, S))]
        assert sorted(got.get(d, [])) == want, d


def _reference_bfd(lens, order, S):
    """One piece at a time: the open row with the least room that fits; among equal rooms the row
    that came to that room last (the stack top)."""
    rooms, came, rows = [], [], []
    for t, i in enumerate(order):
        L = int(lens[i])
        fits = [r for r in range(len(rooms)) if rooms[r] >= L]
        if fits:
            r = min(fits, key=lambda r: (rooms[r], -came[r]))
        else:
            r = len(rooms)
            rooms.append(S)
            came.append(0)
            rows.append([])
        rooms[r] -= L
        came[r] = t
        rows[r].append(int(i))
    return rows


@pytest.mark.parametrize("seq_len", [2, 5, 16, 64])
def test_bfd_is_best_fit_decreasing_and_covers_every_piece(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths, kinds = _random_docs(rng, 300, seq_len)
    for overflow in ("truncate", "drop"):
        lay = layout(lengths, kinds, seq_len, "bfd", seed=7, overflow=overflow)
        _check_pieces(lay, lengths, kinds, overflow)
        perm = np.random.default_rng(7).permutation(len(lay.piece_len))
        order = perm[np.argsort(-lay.piece_len[perm], kind="stable")]
        ref = _reference_bfd(lay.piece_len, order, seq_len)
        got = [lay.row_pieces[a:b].tolist() for a, b in zip(lay.row_ptr[:-1], lay.row_ptr[1:])]
        assert got == ref


@pytest.mark.parametrize("mode", ["greedy", "none"])
@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_splitting_modes_cover_every_piece(mode, overflow):
    rng = np.random.default_rng(3)
    for seq_len in (2, 7, 50):
        lengths, kinds = _random_docs(rng, 300, seq_len)
        _check_pieces(layout(lengths, kinds, seq_len, mode, overflow=overflow), lengths, kinds, overflow)


def _lognormal(n, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(seq_len / 4) - 0.5, 1.0, n), 2, 3 * seq_len).astype(np.int64)
    return lengths, np.full(n, KIND_TEXT, dtype=np.uint8)


def test_bfd_fills_rows_where_greedy_does_not():
    lengths, kinds = _lognormal(4000, 1024)
    assert 200 < lengths.mean() < 320  # ~ seq_len / 4
    bfd, greedy = layout(lengths, kinds, 1024, "bfd"), layout(lengths, kinds, 1024, "greedy")
    assert bfd.tokens == greedy.tokens
    assert bfd.fill >= 0.98 and greedy.fill < 0.9 and bfd.n_rows < 0.9 * greedy.n_rows
    assert bfd.multi


def test_bfd_is_deterministic_per_seed():
    lengths, kinds = _lognormal(3000, 256, seed=5)
    a, b, c = (layout(lengths, kinds, 256, "bfd", seed=s) for s in (1, 1, 2))
    for x in ("piece_doc", "piece_start", "piece_len", "row_ptr", "row_pieces"):
        assert np.array_equal(getattr(a, x), getattr(b, x))
    assert not np.array_equal(a.row_pieces, c.row_pieces)
    assert sorted(map(sorted, _rows(a))) != sorted(map(sorted, _rows(c)))  # other rows, not only reordered
    assert np.array_equal(a.piece_len, c.piece_len)  # the same pieces


@pytest.mark.parametrize("seq_len", [2, 3, 16])
def test_wrap_tiles_the_text_stream(seq_len):
    rng = np.random.default_rng(seq_len)
    for n_docs in (1, 2, 40):
        lengths = rng.integers(1, 3 * seq_len, n_docs)
        lengths[rng.random(n_docs) < 0.1] = 0  # an empty document contributes nothing
        if lengths.sum() < 2:
            continue
        kinds = np.full(n_docs, KIND_TEXT, dtype=np.uint8)
        lay = layout(lengths, kinds, seq_len, "wrap")
        assert lay.mode == "wrap" and lay.piece_len.dtype == np.int32 and lay.piece_doc.dtype == np.int64
        stream = [(d, i) for d, n in enumerate(lengths.tolist()) for i in range(n)]
        total, tail = len(stream), len(stream) % seq_len
        kept = total if tail >= 2 else total - tail
        rows = [[(d, s + i) for d, s, n in row for i in range(n)] for row in _rows(lay)]
        assert [t for row in rows for t in row] == stream[:kept]  # in order, each token once
        assert all(len(r) == seq_len for r in rows[:-1]) and 2 <= len(rows[-1]) <= seq_len
        assert lay.piece_len.min() >= 1 and (lay.n_rows - 1) * seq_len < kept
        for row in _rows(lay):  # a piece is a maximal run of one document inside the row
            assert all(a[0] != b[0] for a, b in zip(row, row[1:]))


def test_wrap_fill_and_its_errors():
    lengths, kinds = _lognormal(2000, 512)
    lay = layout(lengths, kinds, 512, "wrap")
    assert lay.fill > 0.995 and lay.tokens == lengths.sum() - (lengths.sum() % 512 if lengths.sum() % 512 < 2 else 0)
    kinds[5] = KIND_CHAT
    with pytest.raises(DataError) as e:
        layout(lengths, kinds, 512, "wrap", where=lambda d: f"train.jsonl:{d + 1}")
    assert str(e.value) == ("data.pack: wrap concatenates raw text, but train.jsonl:6 is a pre-tokenized/chat row; "
                            "use data.pack: bfd")
    kinds[5] = KIND_TOKENS
    with pytest.raises(DataError, match="train.jsonl:6 is a pre-tokenized/chat row"):
        layout(lengths, kinds, 512, "wrap", where=lambda d: f"train.jsonl:{d + 1}")
    # a last window of one token is dropped; one token in all is no sequence
    one = np.ones(1, dtype=np.uint8)
    assert layout(np.array([9]), one, 4, "wrap").tokens == 8
    assert layout(np.array([10]), one, 4, "wrap").tokens == 10
    for lengths in ([1], [0, 1, 0], [], [0]):
        with pytest.raises(DataError, match="no training sequences"):
            layout(np.array(lengths, dtype=np.int64), np.ones(len(lengths), dtype=np.uint8), 4, "wrap")


@pytest.mark.parametrize("mode", ["greedy", "bfd", "none"])
def test_overflow_branches(mode):
    S = 8
    lengths = np.array([12, 5, 30, 8, 9], dtype=np.int64)
    kinds = np.array([KIND_TOKENS, KIND_TOKENS, KIND_CHAT, KIND_CHAT, KIND_TEXT], dtype=np.uint8)
    where = lambda d: f"data/train.jsonl:{d + 1}"  # noqa: E731
    t = layout(lengths, kinds, S, mode, overflow="truncate", where=where)
    assert (t.n_truncated, t.n_dropped) == (2, 0)
    assert sorted(zip(t.piece_doc.tolist(), t.piece_start.tolist(), t.piece_len.tolist())) == [
        (0, 0, 8), (1, 0, 5), (2, 0, 8), (3, 0, 8), (4, 0, 8)]  # text 9 = 8 + a dropped 1-token tail
    d = layout(lengths, kinds, S, mode, overflow="drop", where=where)
    assert (d.n_truncated, d.n_dropped) == (0, 2)
    assert sorted(zip(d.piece_doc.tolist(), d.piece_start.tolist(), d.piece_len.tolist())) == [
        (1, 0, 5), (3, 0, 8), (4, 0, 8)]
    with pytest.raises(DataError) as e:
        layout(lengths, kinds, S, mode, overflow="error", where=where)
    assert str(e.value) == ("data/train.jsonl:1: input_ids has 12 ids, more than data.seq_len=8; raise data.seq_len, "
                            "split the row, or set data.overflow: truncate | drop")
    kinds[0] = KIND_TEXT
    with pytest.raises(DataError) as e:
        layout(lengths, kinds, S, mode, overflow="error", where=where)
    assert str(e.value) == ("data/train.jsonl:3: the rendered conversation has 30 tokens, more than "
                            "data.seq_len=8; raise data.seq_len or set data.overflow: truncate | drop")
    with pytest.raises(DataError, match=r"^document 2: the rendered conversation has 30 tokens"):
        layout(lengths, kinds, S, mode, overflow="error")  # the default where
    # texts never overflow; fitting rows are not counted
    ok = layout(np.array([50, 8, 2]), np.array([KIND_TEXT, KIND_TOKENS, KIND_CHAT]), S, mode, overflow="error")
    assert (ok.n_truncated, ok.n_dropped, ok.tokens) == (0, 0, 50 + 8 + 2)  # 50 = 6 * 8 + 2


@pytest.mark.parametrize("mode", ["greedy", "bfd", "none"])
def test_no_pieces_is_an_error(mode):
    cases = [([], [], "empty files or blank lines only"),
             ([1, 1], [KIND_TEXT, KIND_TEXT], "2 under 2 tokens"),
             ([9, 1], [KIND_TOKENS, KIND_TEXT], "1 dropped by data.overflow: drop")]
    for lengths, kinds, why in cases:
        with pytest.raises(DataError, match="^no training sequences") as e:
            layout(np.array(lengths, dtype=np.int64), np.array(kinds, dtype=np.uint8), 4, mode, overflow="drop")
        assert why in str(e.value)


def test_bad_arguments():
    one = (np.array([4]), np.array([KIND_TEXT], dtype=np.uint8), 4)
    for pack in ("ffd", "yes", 1):
        with pytest.raises(ConfigError, match="data.pack"):
            layout(*one, pack)
    with pytest.raises(ConfigError, match="data.overflow"):
        layout(*one, "bfd", overflow="cut")
    with pytest.raises(ValueError):
        layout(np.array([4]), np.array([7], dtype=np.uint8), 4, "bfd")


def test_properties_and_dtypes_on_a_small_example():
    lay = layout(np.array([3, 5, 2, 8]), np.array([KIND_TEXT, KIND_TOKENS, KIND_CHAT, KIND_TEXT], dtype=np.uint8),
                 8, "greedy")
    assert _rows(lay) == [[(0, 0, 3), (1, 0, 5)], [(2, 0, 2)], [(3, 0, 8)]]
    assert (lay.n_rows, lay.tokens, lay.multi) == (3, 18, True) and lay.fill == 18 / 24
    assert lay.nbytes() == 4 * (8 + 8 + 4 + 8) + 4 * 8
    bfd = layout(np.array([3, 5, 2, 8]), np.array([KIND_TEXT, KIND_TOKENS, KIND_CHAT, KIND_TEXT], dtype=np.uint8),
                 8, "bfd")
    assert _rows(bfd) == [[(3, 0, 8)], [(1, 0, 5), (0, 0, 3)], [(2, 0, 2)]]  # creation order, placement order


def test_memory_is_pieces_in_numpy_and_time_is_linear():
    """28 bytes a piece and 8 a row held; a transient peak of a few times that; 300k documents in a
    fraction of a second per mode (2M pieces at seq_len 4096: ~1 s for bfd, measured outside the tests)."""
    lengths, kinds = _lognormal(300_000, 4096, seed=2)
    for mode in ("greedy", "bfd", "wrap", "none"):
        t = time.perf_counter()
        lay = layout(lengths, kinds, 4096, mode)
        elapsed = time.perf_counter() - t
        assert elapsed < 1.5, (mode, elapsed)  # ~0.1 s for bfd, less for the others
        assert lay.nbytes() == 28 * len(lay.piece_len) + 8 * (lay.n_rows + 1)
    lengths, kinds = _lognormal(20_000, 512, seed=2)
    for mode in ("greedy", "bfd", "wrap"):
        tracemalloc.start()
        try:
            lay = layout(lengths, kinds, 512, mode)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 5 * lay.nbytes(), (mode, peak / len(lay.piece_len))  # ~2.6x for bfd
