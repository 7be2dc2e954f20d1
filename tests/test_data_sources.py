"""megastream.data.sources: data files and `datasets` directories -> chunks -> rows in megastream's shapes."""

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megastream.data import sources
from megastream.data.sources import Chunk, Source, chunk_rows, data_files, list_sources, read_chunks
from megastream.errors import DataError

zstandard = pytest.importorskip("zstandard")

# Real-shaped public rows: yahma/alpaca-cleaned (empty and non-empty input), a SlimOrca-style ShareGPT
# conversation (system/human/gpt turns with a "weight"), a gsm8k question/answer row.
ALPACA = [{"instruction": "Give three tips for staying healthy.", "input": "",
           "output": "1. Eat a balanced and nutritious diet.\n2. Engage in regular physical activity.\n"
                     "3. Get enough sleep."},
          {"instruction": "Evaluate this sentence for spelling and grammar mistakes.",
           "input": "He finnished his meal and left the resturant",
           "output": "He finished his meal and left the restaurant."}]
SHAREGPT = {"conversations": [
    {"from": "system", "value": "You are an AI assistant. You will be given a task.", "weight": None},
    {"from": "human", "value": "Translate \"Hello\" to French.", "weight": 0.0},
    {"from": "gpt", "value": "Bonjour.", "weight": 1.0}]}
GSM8K = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                     "How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"}
ROWS = [{"input_ids": [1, 2, 3]}, {"text": "héllo"}, {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": "p", "completion": "c"}]


def rows(path, columns=None, split="train", **kw):
    srcs = list_sources(path, split)
    return [(srcs[c.source].where(n), row) for c in read_chunks(srcs, **kw)
            for n, row in chunk_rows(c, srcs[c.source], columns)]


def jsonl_bytes(objs, blank_every=2) -> bytes:
    out = []
    for i, o in enumerate(objs):
        out.append(json.dumps(o, ensure_ascii=False) + "\n")
        if i % blank_every == 0:
            out.append("  \n")
    return "".join(out).rstrip("\n").encode()  # last line without its newline


def write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return str(e.value)


def read_all(path, **kw):
    return lambda: rows(path, **kw)


def test_plain_gz_and_zst_jsonl_give_the_same_rows_and_line_numbers(tmp_path):
    data = jsonl_bytes(ROWS)  # row, blank, row, row, blank, row (no final newline): blank lines count
    got = {s: rows(write(tmp_path / f"d{s}", data)) for s in (".jsonl", ".jsonl.gz", ".jsonl.zst")}
    assert [w for w, _ in got[".jsonl"]] == [f"{tmp_path / 'd.jsonl'}:{n}" for n in (1, 3, 4, 6)]
    for s, r in got.items():
        assert [row for _, row in r] == ROWS
        assert [w.replace(s, "") for w, _ in r] == [w.replace(".jsonl", "") for w, _ in got[".jsonl"]]
    kinds = [s.kind for s in list_sources([tmp_path / "d.jsonl.gz", tmp_path / "d.jsonl.zst"])]
    assert kinds == ["jsonl.gz", "jsonl.zst"]


def test_zst_of_several_frames_is_read_across_them(tmp_path):
    c = zstandard.ZstdCompressor()
    (tmp_path / "d.jsonl.zst").write_bytes(c.compress(b'{"text": "a"}\n') + c.compress(b'{"text": "b"}\n'))
    assert [r for _, r in rows(tmp_path / "d.jsonl.zst")] == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_is_streamed_in_chunks_of_about_chunk_bytes_that_pickle(tmp_path, suffix):
    data = b"".join(json.dumps({"text": f"line {i} " + "x" * (i % 50)}).encode() + b"\n" for i in range(400))
    src = list_sources(write(tmp_path / f"d{suffix}", data))
    chunks = list(read_chunks(src, chunk_bytes=1000))
    assert len(chunks) > 10
    assert all(sum(map(len, c.payload)) < 1000 + 100 for c in chunks)  # never the whole file (about 14 KB)
    assert b"".join(line for c in chunks for line in c.payload) == data
    assert [c.first for c in chunks] == [1 + sum(len(c.payload) for c in chunks[:k]) for k in range(len(chunks))]
    back = pickle.loads(pickle.dumps(chunks[3]))
    assert (back.source, back.first, back.payload) == (0, chunks[3].first, chunks[3].payload)
    assert list(chunk_rows(back, src[0]))[0] == (back.first, json.loads(back.payload[0]))


def test_parquet_rows_in_batches_with_nulls_dropped(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c", "d", "e"], "input_ids": [None, [1, 2], None, None, None]}),
                   tmp_path / "d.parquet")
    src = list_sources(tmp_path / "d.parquet")
    chunks = list(read_chunks(src, chunk_rows=2))
    assert [(c.first, c.payload.num_rows) for c in chunks] == [(1, 2), (3, 2), (5, 1)]
    back = pickle.loads(pickle.dumps(chunks[0]))
    assert list(chunk_rows(back, src[0])) == [(1, {"text": "a"}), (2, {"input_ids": [1, 2]})]
    assert rows(tmp_path / "d.parquet")[-1] == (f"{tmp_path / 'd.parquet'}:row 5", {"text": "e"})


def test_a_directory_reads_every_supported_file_in_name_order(tmp_path):
    write(tmp_path / "b.jsonl.gz", b'{"text": "b"}\n')
    write(tmp_path / "a.jsonl", b'{"text": "a"}\n')
    write(tmp_path / "c.jsonl.zst", b'{"text": "c"}\n')
    pq.write_table(pa.table({"text": ["d"]}), tmp_path / "d.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r["text"] for _, r in rows(tmp_path)] == ["a", "b", "c", "d"]
    names = ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "a.jsonl")
    assert data_files([tmp_path, tmp_path / "a.jsonl"]) == [tmp_path / n for n in names]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hf")
    ds = datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(10)], "extra": [None] * 9 + [1]})
    ds.save_to_disk(root / "one", num_shards=2)
    test = datasets.Dataset.from_dict({"conversations": [SHAREGPT["conversations"]]})
    datasets.DatasetDict(train=ds, test=test).save_to_disk(root / "dict")
    return root


def test_datasets_save_to_disk_dataset_is_read_shard_by_shard(hf_dirs):
    src = list_sources(hf_dirs / "one")
    assert [(s.kind, s.path.name) for s in src] == [("arrow", "data-00000-of-00002.arrow"),
                                                    ("arrow", "data-00001-of-00002.arrow")]
    got = rows(hf_dirs / "one", chunk_rows=3)
    assert [r for _, r in got] == [{"text": f"doc {i}"} for i in range(9)] + [{"text": "doc 9", "extra": 1}]
    assert got[0][0] == f"{src[0].path}:row 1" and got[-1][0] == f"{src[1].path}:row 5"
    chunks = list(read_chunks(src, chunk_rows=3))
    assert [(c.source, c.first, c.payload.num_rows) for c in chunks] == [(0, 1, 3), (0, 4, 2), (1, 1, 3), (1, 4, 2)]
    back = pickle.loads(pickle.dumps(chunks[1]))
    assert [r for _, r in chunk_rows(back, src[0])] == [{"text": "doc 3"}, {"text": "doc 4"}]


def test_datasets_dict_split_selection_and_missing_split(hf_dirs):
    assert [r["text"] for _, r in rows(hf_dirs / "dict")][:2] == ["doc 0", "doc 1"]
    (where, row), = rows(hf_dirs / "dict", split="test")
    assert where == f"{hf_dirs / 'dict' / 'test' / 'data-00000-of-00001.arrow'}:row 1"
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    msg = error(list_sources, hf_dirs / "dict", "validation")
    assert str(hf_dirs / "dict") in msg and "'validation'" in msg and "train, test" in msg


def test_save_to_disk_layout_written_with_pyarrow_alone(tmp_path):
    """The layout `datasets` writes (state.json + Arrow *stream* shards), without needing `datasets`."""
    batch = pa.record_batch({"prompt": [f"p{i}" for i in range(1, 1001)],
                             "completion": [f"c{i}" for i in range(1, 1001)]})
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, batch.schema) as w:
        w.write_batch(batch)
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    chunks = list(read_chunks(list_sources(tmp_path), chunk_rows=400))
    assert [(c.first, c.payload.num_rows) for c in chunks] == [(1, 400), (401, 400), (801, 200)]
    assert len(pickle.dumps(chunks[2])) < len(pickle.dumps(batch)) / 3  # a re-batched slice pickles alone
    assert rows(tmp_path)[999] == (f"{tmp_path / 'data-00000-of-00001.arrow'}:row 1000",
                                   {"prompt": "p1000", "completion": "c1000"})
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')  # a DatasetDict whose train/ is gone
    assert f"{tmp_path / 'train' / 'state.json'} is missing" in error(list_sources, tmp_path)


def test_alpaca_rows_become_prompt_completion(tmp_path):
    write(tmp_path / "a.jsonl", jsonl_bytes(ALPACA + [dict(ALPACA[0], system="Be brief.")], blank_every=99))
    got = [r for _, r in rows(tmp_path / "a.jsonl")]
    assert got[0] == {"prompt": "Give three tips for staying healthy.", "completion": ALPACA[0]["output"]}
    assert got[1] == {"prompt": "Evaluate this sentence for spelling and grammar mistakes.\n\n"
                                "He finnished his meal and left the resturant",
                      "completion": "He finished his meal and left the restaurant."}
    assert got[2]["system"] == "Be brief." and got[2]["prompt"] == got[0]["prompt"]
    # A row that already has a megastream field (tatsu-lab/alpaca's formatted "text") is left as it is.
    assert sources.normalise(dict(ALPACA[0], text="Below is an instruction..."), "x")["text"].startswith("Below")


def test_sharegpt_rows_become_messages(tmp_path):
    pq.write_table(pa.Table.from_pylist([SHAREGPT]), tmp_path / "s.parquet")
    (_, row), = rows(tmp_path / "s.parquet")
    assert row == {"messages": [{"role": "system", "content": "You are an AI assistant. You will be given a task."},
                                {"role": "user", "content": "Translate \"Hello\" to French."},
                                {"role": "assistant", "content": "Bonjour."}]}
    row = sources.normalise({"system": "S", "conversations": SHAREGPT["conversations"][1:]}, "x")
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]


def test_columns_mapping_renames_first(tmp_path):
    write(tmp_path / "g.jsonl", jsonl_bytes([GSM8K, GSM8K], blank_every=99))
    qa = [r for _, r in rows(tmp_path / "g.jsonl", columns={"prompt": "question", "completion": "answer"})]
    assert qa == [{"prompt": GSM8K["question"], "completion": GSM8K["answer"]}] * 2
    write(tmp_path / "g.jsonl", jsonl_bytes([GSM8K, {"body": "plain text", "id": 7}], blank_every=99))
    assert sources.normalise({"body": "plain text", "id": 7}, "x", {"text": "body"}) == {"id": 7, "text": "plain text"}
    conv = sources.normalise({"dialog": SHAREGPT["conversations"]}, "x", {"conversations": "dialog"})
    assert conv["messages"][2] == {"role": "assistant", "content": "Bonjour."}
    msg = error(read_all(tmp_path / "g.jsonl", columns={"prompt": "question", "completion": "answer"}))
    assert f"{tmp_path / 'g.jsonl'}:3" in msg and "data.columns.prompt" in msg and "'question'" in msg
    assert "keys: body, id" in msg


@pytest.mark.parametrize("name, data, where, words", [
    # mtime=0: the parameters must be the same bytes in every pytest-xdist worker
    ("u.jsonl", b'{"text": "a"}\n\n{"text": "\xff"}\n', ":3", "not valid UTF-8"),
    ("u.jsonl", gzip.compress(b'{"text": "a"}\n', mtime=0), ":1", "name it .jsonl.gz"),
    ("j.jsonl", b'{"text": "a"}\n{"text": \n', ":2", "not valid JSON"),
    ("o.jsonl", b'[1, 2]\n', ":1", "expected a JSON object, got list"),
    ("s.jsonl", b'{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}', ":1",
     "conversations[1] is from 'bot'"),
    ("t.jsonl", b'{"conversations": [{"from": "human"}]}', ":1", "conversations[0] must be an object"),
    ("c.jsonl", b'{"conversations": "hi"}', ":1", "must be a list"),
    ("a.jsonl", b'{"instruction": "i", "output": 3}', ":1", "must be strings"),
    ("g.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100, mtime=0)[:-20], "", "cannot read as jsonl.gz"),
    ("n.jsonl.gz", b"not gzip at all", "", "cannot read as jsonl.gz"),
    ("z.jsonl.zst", b"not zstd at all", "", "cannot read as jsonl.zst"),
    ("p.parquet", b"PAR1 not really parquet PAR1", "", "cannot read as parquet"),
])
def test_malformed_data_names_the_file_and_line(tmp_path, name, data, where, words):
    (tmp_path / name).write_bytes(data)
    msg = error(read_all(tmp_path / name))
    assert f"{tmp_path / name}{where}" in msg and words in msg, msg


def test_a_corrupt_arrow_shard_names_the_file(tmp_path):
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"\xff\xff\xff\xff garbage")
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    msg = error(read_all(tmp_path))
    assert str(tmp_path / "data-00000-of-00001.arrow") in msg and "cannot read as an Arrow stream" in msg


def test_missing_paths_unsupported_files_and_damaged_directories(tmp_path):
    assert str(tmp_path / "nope.jsonl") in error(list_sources, [tmp_path / "nope.jsonl"])
    (tmp_path / "d.json").write_text("{}")
    assert "unsupported file type" in error(list_sources, tmp_path / "d.json")
    (tmp_path / "empty").mkdir()
    assert f"directory {tmp_path / 'empty'} holds no data files" in error(list_sources, tmp_path / "empty")
    (tmp_path / "empty" / "state.json").write_text('{"_data_files": [{"filename": "gone.arrow"}]}')
    assert f"{tmp_path / 'empty' / 'gone.arrow'} is missing" in error(list_sources, tmp_path / "empty")
    (tmp_path / "empty" / "state.json").write_text("{oops")
    assert f"{tmp_path / 'empty' / 'state.json'}: cannot read" in error(list_sources, tmp_path / "empty")


def test_zstd_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    write(tmp_path / "d.jsonl.zst", b'{"text": "a"}\n')
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` raises ImportError
    for fn in (lambda: list_sources(tmp_path),
               lambda: list(read_chunks([Source(tmp_path / "d.jsonl.zst", "jsonl.zst", "L")]))):
        msg = error(fn)
        assert "pip install zstandard (or megastream[zstd])" in msg and ("d.jsonl.zst" in msg or msg.startswith("L:"))


def test_where_and_chunk_pickle():
    s = Source(Path("/d/x.parquet"), "parquet", "/d/x.parquet")
    assert s.where(4) == "/d/x.parquet:row 4"
    assert Source(Path("a.jsonl.gz"), "jsonl.gz", "a.jsonl.gz").where(4) == "a.jsonl.gz:4"
    assert pickle.loads(pickle.dumps(s)) == s and pickle.loads(pickle.dumps(Chunk(1, 5, [b"x\n"]))).payload == [b"x\n"]


def test_the_module_does_not_import_torch():
    """It runs in data worker processes: loaded on its own, it pulls in neither torch nor pyarrow."""
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('src', sys.argv[1]); "
            "m = sys.modules['src'] = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(k for k in ('torch', 'pyarrow', 'datasets') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, sources.__file__], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
