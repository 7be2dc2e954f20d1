"""Training data: .jsonl loading and validation, next-token labels, and the order in which rows are served."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import write_ids
from megastream.data import load_jsonl
from megastream.errors import DataError, MegastreamError
from megastream.tokenizer import DEMO_TOKENIZER, load_tokenizer

IGNORE = -100


def _demo_tok():
    return load_tokenizer(DEMO_TOKENIZER)


def _no_tokenizer():
    raise AssertionError("the tokenizer must only be loaded when the file has text rows")


def _distinct_rows(n: int, seq_len: int) -> list[list[int]]:
    """Row i is [100*i + 1, 100*i + 2, ...]: every row and position distinguishable."""
    return [[100 * i + t + 1 for t in range(seq_len)] for i in range(n)]


def _first_ids(mbs) -> list[int]:
    return [int(x) for mb in mbs for x in mb.input_ids[:, 0]]


def _load_error(tmp_path, text: str, seq_len: int = 8, vocab: int = 1000, name: str = "train.jsonl") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as ei:
        load_jsonl(path, seq_len, vocab, _no_tokenizer)
    return str(ei.value)


# ---------------------------------------------------------------------------------------------- order


def test_unshuffled_micro_batches_follow_file_order_and_wrap(tmp_path):
    N, S, MB, ACCUM = 7, 4, 2, 3
    rows = _distinct_rows(N, S)
    ds = load_jsonl(write_ids(tmp_path / "train.jsonl", rows), S, 1000, _no_tokenizer)
    assert len(ds) == N
    for step in range(4):  # 4 steps x 6 rows = 24 rows: wraps past the end of the 7-row file three times
        mbs = ds.micro_batches(step, ACCUM, MB, shuffle=False, seed=0)
        assert len(mbs) == ACCUM
        for k, mb in enumerate(mbs):
            start = (step * ACCUM + k) * MB
            want = [rows[p % N] for p in range(start, start + MB)]
            assert mb.input_ids.shape == (MB, S) and mb.input_ids.dtype == torch.long
            assert mb.input_ids.tolist() == want, (step, k)
            assert mb.labels.tolist() == [r[1:] + [IGNORE] for r in want], (step, k)


def test_unshuffled_wraparound_inside_a_micro_batch(tmp_path):
    rows = _distinct_rows(7, 4)
    ds = load_jsonl(write_ids(tmp_path / "train.jsonl", rows), 4, 1000, _no_tokenizer)
    # step 1, micro-batch 0 with grad_accum 3 and micro_batch_size 2 starts at row 6: rows 6 then 0
    mb = ds.micro_batches(1, 3, 2, shuffle=False, seed=0)[0]
    assert mb.input_ids.tolist() == [rows[6], rows[0]]
    # the seed plays no part without shuffling
    assert ds.micro_batches(1, 3, 2, shuffle=False, seed=123)[0].input_ids.tolist() == [rows[6], rows[0]]


def test_shuffle_is_seeded(tmp_path):
    N = 10
    path = write_ids(tmp_path / "train.jsonl", _distinct_rows(N, 4))
    one = lambda seed: _first_ids(load_jsonl(path, 4, 2000, _no_tokenizer).micro_batches(0, N, 1, True, seed))
    a, b = one(0), one(0)
    assert a == b  # same seed, fresh datasets: same order
    ds = load_jsonl(path, 4, 2000, _no_tokenizer)
    assert _first_ids(ds.micro_batches(0, N, 1, True, 0)) == a == _first_ids(ds.micro_batches(0, N, 1, True, 0))
    assert a != [100 * i + 1 for i in range(N)]  # actually shuffled
    assert one(1) != a  # a different seed gives a different order
    assert one(2) not in (a, one(1))


def test_shuffle_seed_change_on_the_same_dataset(tmp_path):
    N = 10
    path = write_ids(tmp_path / "train.jsonl", _distinct_rows(N, 4))
    fresh = _first_ids(load_jsonl(path, 4, 2000, _no_tokenizer).micro_batches(0, N, 1, True, 1))
    ds = load_jsonl(path, 4, 2000, _no_tokenizer)
    ds.micro_batches(0, N, 1, True, 0)
    assert _first_ids(ds.micro_batches(0, N, 1, True, 1)) == fresh


@pytest.mark.parametrize("mb,accum", [(1, 7), (3, 2), (2, 5)])
def test_each_shuffled_epoch_is_a_permutation(tmp_path, mb, accum):
    N, EPOCHS = 7, 4
    path = write_ids(tmp_path / "train.jsonl", _distinct_rows(N, 4))
    ds = load_jsonl(path, 4, 1000, _no_tokenizer)
    per_step = mb * accum
    steps = -(-N * EPOCHS // per_step)
    order = [i for s in range(steps) for i in _first_ids(ds.micro_batches(s, accum, mb, True, seed=5))]
    order = [(x - 1) // 100 for x in order[:N * EPOCHS]]  # row indices, epochs may straddle micro-batches
    epochs = [order[e * N:(e + 1) * N] for e in range(EPOCHS)]
    for e, ep in enumerate(epochs):
        assert sorted(ep) == list(range(N)), (e, ep)  # every row exactly once per epoch
    assert len({tuple(ep) for ep in epochs}) > 1  # drawn afresh each epoch, not one order repeated
    # served the same way again (e.g. after a restart): identical
    again = [i for s in range(steps) for i in _first_ids(
        load_jsonl(path, 4, 1000, _no_tokenizer).micro_batches(s, accum, mb, True, seed=5))]
    assert [(x - 1) // 100 for x in again[:N * EPOCHS]] == order


def test_shuffled_rows_keep_their_labels(tmp_path):
    rows = _distinct_rows(5, 4)
    ds = load_jsonl(write_ids(tmp_path / "train.jsonl", rows), 4, 1000, _no_tokenizer)
    for mb in ds.micro_batches(0, 5, 2, True, seed=3):
        for ids, labels in zip(mb.input_ids.tolist(), mb.labels.tolist()):
            assert ids in rows and labels == ids[1:] + [IGNORE]


# ---------------------------------------------------------------------------------------------- labels


def test_full_row_labels_are_next_tokens(tmp_path):
    ids = [11, 12, 13, 14, 15, 16]
    ds = load_jsonl(write_ids(tmp_path / "train.jsonl", [ids]), 6, 100, _no_tokenizer)
    assert ds.input_ids.tolist() == [ids]
    labels = ds.labels[0].tolist()
    assert labels[:-1] == ids[1:]
    for t in range(5):
        assert labels[t] == ids[t + 1]
    assert labels[-1] == IGNORE
    assert sum(lab != IGNORE for lab in labels) == len(ids) - 1


def test_short_row_is_padded_and_padding_ignored(tmp_path):
    ids = [21, 22, 23]
    ds = load_jsonl(write_ids(tmp_path / "train.jsonl", [ids, [1, 2, 3, 4, 5, 6]]), 6, 100, _no_tokenizer)
    inputs, labels = ds.input_ids[0].tolist(), ds.labels[0].tolist()
    assert inputs[:3] == ids and len(inputs) == 6
    assert inputs[3:] == [0, 0, 0]  # padded with id 0
    assert labels == [22, 23, IGNORE, IGNORE, IGNORE, IGNORE]
    assert sum(lab != IGNORE for lab in labels) == len(ids) - 1
    assert ds.labels.dtype == torch.long and ds.input_ids.shape == (2, 6)


def test_two_id_row_has_one_loss_token(tmp_path):
    ds = load_jsonl(write_ids(tmp_path / "train.jsonl", [[7, 8]]), 4, 100, _no_tokenizer)
    assert ds.input_ids.tolist() == [[7, 8, 0, 0]]
    assert ds.labels.tolist() == [[8, IGNORE, IGNORE, IGNORE]]


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('\n{"input_ids": [1, 2]}\n   \n{"input_ids": [3, 4]}\n\n')
    ds = load_jsonl(path, 2, 10, _no_tokenizer)
    assert ds.input_ids.tolist() == [[1, 2], [3, 4]]
    assert ds.source == str(path)


# ---------------------------------------------------------------------------------------------- malformed files


def test_data_error_is_a_user_error():
    assert issubclass(DataError, MegastreamError) and DataError.exit_code == 2


def test_malformed_json_names_file_and_line(tmp_path):
    msg = _load_error(tmp_path, '{"input_ids": [1, 2]}\n{"input_ids": [3, 4]}\n{"input_ids": [5, 6\n')
    assert "train.jsonl:3" in msg
    assert "not valid JSON" in msg


def test_line_numbers_count_blank_lines(tmp_path):
    msg = _load_error(tmp_path, '{"input_ids": [1, 2]}\n\n\n{oops}\n')
    assert "train.jsonl:4" in msg


def test_row_that_is_a_list(tmp_path):
    msg = _load_error(tmp_path, '{"input_ids": [1, 2]}\n[1, 2, 3]\n')
    assert "train.jsonl:2" in msg and "JSON object" in msg and "list" in msg


def test_row_without_input_ids_or_text(tmp_path):
    msg = _load_error(tmp_path, '{"ids": [1, 2], "label": 3}\n')
    assert "train.jsonl:1" in msg
    assert "input_ids" in msg and "text" in msg
    assert "ids, label" in msg  # shows the keys it did find


def test_input_ids_longer_than_seq_len(tmp_path):
    msg = _load_error(tmp_path, '{"input_ids": [1, 2, 3, 4, 5]}\n', seq_len=4)
    assert "train.jsonl:1" in msg and "seq_len" in msg and "5" in msg and "4" in msg


def test_input_ids_exactly_seq_len_is_fine(tmp_path):
    ds = load_jsonl(write_ids(tmp_path / "train.jsonl", [[1, 2, 3, 4]]), 4, 10, _no_tokenizer)
    assert ds.input_ids.tolist() == [[1, 2, 3, 4]]


def test_token_id_outside_the_vocab(tmp_path):
    msg = _load_error(tmp_path, '{"input_ids": [1, 2]}\n{"input_ids": [3, 10]}\n', vocab=10)
    assert "train.jsonl:2" in msg and "10" in msg and "vocabulary" in msg and "0..9" in msg
    # the largest valid id is accepted
    ds = load_jsonl(write_ids(tmp_path / "ok.jsonl", [[0, 9]]), 8, 10, _no_tokenizer)
    assert ds.input_ids[0, :2].tolist() == [0, 9]


def test_negative_token_id(tmp_path):
    msg = _load_error(tmp_path, '{"input_ids": [1, -1]}\n')
    assert "train.jsonl:1" in msg and "-1" in msg and "vocabulary" in msg


def test_input_ids_with_one_element(tmp_path):
    msg = _load_error(tmp_path, '{"input_ids": [5]}\n')
    assert "train.jsonl:1" in msg and "1 id" in msg and "at least 2" in msg


@pytest.mark.parametrize("value", ["[1, 2.5]", "[1, true]", '"1 2 3"', "[[1, 2]]"])
def test_input_ids_not_a_list_of_ints(tmp_path, value):
    msg = _load_error(tmp_path, '{"input_ids": %s}\n' % value)
    assert "train.jsonl:1" in msg and "list of integers" in msg


def test_text_not_a_string(tmp_path):
    msg = _load_error(tmp_path, '{"text": ["a", "b"]}\n')
    assert "train.jsonl:1" in msg and "text must be a string" in msg


def test_empty_file(tmp_path):
    msg = _load_error(tmp_path, "\n   \n\n", name="empty.jsonl")
    assert "empty.jsonl" in msg and "no training sequences" in msg


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as ei:
        load_jsonl(tmp_path / "nope.jsonl", 8, 10, _no_tokenizer)
    assert "nope.jsonl" in str(ei.value) and "does not exist" in str(ei.value)


def test_invalid_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"input_ids": [1, 2]}\n\xff\xfe\n')
    with pytest.raises(DataError, match="train.jsonl:2: not valid UTF-8"):
        load_jsonl(path, 8, 10, _no_tokenizer)


# ---------------------------------------------------------------------------------------------- text rows


@pytest.mark.parametrize("pack", [False, True])
def test_text_rows_become_documents(tmp_path, pack):
    """Each text is tokenized and ends with the end-of-text id; texts longer than seq_len are split
    into seq_len pieces. Unpacked, each piece is a padded row; packed, pieces share rows in order."""
    texts = ["Assert statements are a convenient way to insert debugging assertions into a program.",
             "x = [1, 2, 3]\nprint(x)",
             "The current code generator emits no code for an assert statement when optimization is requested."]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = _demo_tok()
    assert tok.eos_id is not None
    S = 16
    pieces = []
    for t in texts:
        ids = tok.encode([t])[0] + [tok.eos_id]
        pieces += [ids[i:i + S] for i in range(0, len(ids), S) if len(ids[i:i + S]) >= 2]
    assert any(len(p) == S for p in pieces) and any(len(p) < S for p in pieces)

    calls = []
    ds = load_jsonl(path, S, tok.vocab_size, lambda: calls.append(1) or _demo_tok(), pack=pack)
    assert calls == [1] and ds.n_text_docs == 3
    got = []  # documents recovered from the rows: real tokens, split where the document index changes
    for r in range(len(ds)):
        ids, labels = ds.input_ids[r].tolist(), ds.labels[r].tolist()
        docs = ds.doc_ids[r].tolist() if ds.doc_ids is not None else [0] * S
        n_real = S if ds.doc_ids is not None else sum(lab != IGNORE for lab in labels) + 1
        if ds.doc_ids is not None:
            n_real = sum(d >= 0 for d in docs)
        start = 0
        for j in range(1, n_real + 1):
            if j == n_real or docs[j] != docs[start]:
                doc = ids[start:j]
                assert labels[start:j - 1] == doc[1:] and labels[j - 1] == IGNORE  # never across a boundary
                if ds.positions is not None:
                    assert ds.positions[r, start:j].tolist() == list(range(j - start))
                got.append(doc)
                start = j
        assert labels[n_real:] == [IGNORE] * (S - n_real)
    assert got == pieces
    text = tok.decode([i for p in pieces for i in p if i != tok.eos_id])
    assert all(t.split()[0] in text for t in texts)
    if not pack:
        assert len(ds) == len(pieces) and ds.positions is None


def test_packing_fills_rows_in_order(tmp_path):
    path = write_ids(tmp_path / "train.jsonl", [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2, 3, 4, 5, 6]])
    ds = load_jsonl(path, 8, 10, _no_tokenizer, pack=True)
    assert ds.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 0, 0]]
    assert ds.labels[0].tolist() == [2, 3, -100, 5, -100, -100, -100, -100]  # no target across a boundary
    assert ds.positions[0].tolist()[:5] == [0, 1, 2, 0, 1]
    assert ds.doc_ids[0].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]

def test_text_and_input_ids_rows_mix(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"text": "hello there"}) + "\n")
    ds = load_jsonl(path, 8, 2048, _demo_tok)
    assert len(ds) == 2 and ds.n_text_docs == 1
    assert ds.input_ids[0, :3].tolist() == [5, 6, 7]
    tok = _demo_tok()
    want = tok.encode(["hello there"])[0] + [tok.eos_id]
    assert ds.input_ids[1, :len(want)].tolist() == want


def test_tokenizer_larger_than_the_model_vocab(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "some text"}) + "\n")
    with pytest.raises(DataError) as ei:
        load_jsonl(path, 16, 100, _demo_tok)
    msg = str(ei.value)
    assert "tokenizer.json" in msg and str(_demo_tok().vocab_size) in msg and "100" in msg


def test_demo_tokenizer_has_an_end_of_text_token():
    tok = _demo_tok()
    assert tok.eos_id == tok.tok.token_to_id("<|endoftext|>")
    assert tok.vocab_size == 2048


def test_bad_tokenizer_file_is_a_data_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(bad)


# ---------------------------------------------------------------------------------------- issue 4 additions

def test_labels_rows_shift_like_transformers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}) + "\n")
    ds = load_jsonl(path, 6, 10, _no_tokenizer)
    # target of position t is labels[t+1]: prompt tokens masked, completion tokens kept
    assert ds.labels[0].tolist() == [-100, 7, 8, -100, -100, -100]
    assert ds.input_ids[0].tolist()[:4] == [5, 6, 7, 8]


@pytest.mark.parametrize("row,msg", [({"input_ids": [1, 2, 3], "labels": [1, 2]}, "must align"),
                                     ({"input_ids": [1, 2, 3], "labels": [1, 2, 99]}, "label 99"),
                                     ({"input_ids": [1, 2, 3], "labels": "x"}, "labels must be a list")])
def test_bad_labels_rows(tmp_path, row, msg):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=msg):
        load_jsonl(path, 8, 10, _no_tokenizer)


def test_overflow_policies_count_rows(tmp_path):
    path = write_ids(tmp_path / "train.jsonl", [[1, 2, 3], [1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8, 9, 1]])
    ds = load_jsonl(path, 4, 10, _no_tokenizer, overflow="truncate")
    assert len(ds) == 3 and ds.n_truncated == 2 and ds.n_dropped == 0
    assert ds.input_ids[2].tolist() == [4, 5, 6, 7] and ds.labels[2].tolist() == [5, 6, 7, -100]
    ds = load_jsonl(path, 4, 10, _no_tokenizer, overflow="drop")
    assert len(ds) == 1 and ds.n_dropped == 2
    with pytest.raises(DataError, match=r"train.jsonl:2: .*data.overflow"):
        load_jsonl(path, 4, 10, _no_tokenizer, overflow="error")


def test_list_of_files_and_directory(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_ids(d / "b.jsonl", [[3, 4], [5, 6]])
    write_ids(d / "a.jsonl", [[1, 2]])
    (d / "notes.txt").write_text("ignored")
    ds = load_jsonl(d, 2, 10, _no_tokenizer)  # directory: *.jsonl in name order
    assert ds.input_ids.tolist() == [[1, 2], [3, 4], [5, 6]]
    ds = load_jsonl([d / "b.jsonl", d / "a.jsonl"], 2, 10, _no_tokenizer)  # list: in the given order
    assert ds.input_ids.tolist() == [[3, 4], [5, 6], [1, 2]]
    (d / "b.jsonl").write_text('{"input_ids": [1, 2]}\n{oops\n')
    with pytest.raises(DataError, match=r"b.jsonl:2"):
        load_jsonl(d, 2, 10, _no_tokenizer)


def test_parquet_rows_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, 5, 6, 7]], "labels": [[-100, 2, 3], None]}),
                   tmp_path / "a.parquet")
    write_ids(tmp_path / "b.jsonl", [[8, 9]])
    ds = load_jsonl(tmp_path, 4, 10, _no_tokenizer)  # a directory mixing both formats
    assert ds.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert ds.labels.tolist()[0] == [2, 3, -100, -100]
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:row 2: input_ids has 1 id"):
        load_jsonl(tmp_path / "bad.parquet", 4, 10, _no_tokenizer)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet: cannot read as parquet"):
        load_jsonl(tmp_path / "junk.parquet", 4, 10, _no_tokenizer)
