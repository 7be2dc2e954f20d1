"""The token cache (megastream.data.cache / loader): built once, keyed on what the tokens depend on,
rebuilt (never trusted) when damaged, written atomically, the same from one worker or several, and
the word cache exact against the tokenizer."""

import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from megastream.config import load_config
from megastream.data import cache as cache_mod
from megastream.data.loader import build_cache, data_key, load_dataset, open_data, open_or_build
from megastream.data.sources import list_sources
from megastream.data.wordcache import WordCache, applies
from megastream.errors import DataError
from megastream.tokenizer import DEMO_DIR, DEMO_TOKENIZER, load_tokenizer

from helpers import run_cli

DEMO_CORPUS = DEMO_DIR / "corpus.jsonl"
VOCAB = 2048


def _cfg(tmp_path, data, *sets):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ndata: {{path: {data}, seq_len: 64}}\ntrain: {{steps: 2}}\n"
                   f"output: {{dir: {tmp_path / 'runs' / 'a'}, progress: false}}\n")
    return load_config(cfg, list(sets))


def _texts(path: Path, n: int = 40, seed: int = 0) -> Path:
    words = " ".join(json.loads(line)["text"] for line in DEMO_CORPUS.open()).split()
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 120)))}) + "\n"
                            for _ in range(n)))
    return path


def _logs():
    out = []
    return out, out.append


def test_built_once_then_reused(tmp_path):
    cfg = _cfg(tmp_path, _texts(tmp_path / "d.jsonl"))
    logs, log = _logs()
    a = load_dataset(cfg, VOCAB, log=log)
    assert any("tokenized 40 rows" in m for m in logs)
    logs.clear()
    b = load_dataset(cfg, VOCAB, log=log)
    assert logs == [] and a.cache.path == b.cache.path
    assert a.cache.path.parent == tmp_path / "runs" / ".megastream-cache"
    assert not [p for p in a.cache.path.parent.iterdir() if ".tmp-" in p.name]
    # seq_len and packing act at start: same cache, other rows
    c = load_dataset(_cfg(tmp_path, tmp_path / "d.jsonl", "data.seq_len=32", "data.pack=greedy"), VOCAB, log=log)
    assert logs == [] and c.cache.path == a.cache.path and len(c) != len(a)


@pytest.mark.parametrize("change", ["data", "tokenizer", "columns"])
def test_what_the_tokens_depend_on_changes_the_key(tmp_path, change):
    data = _texts(tmp_path / "d.jsonl")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes(DEMO_TOKENIZER.read_bytes())
    sets = [f"data.tokenizer={tok / 'tokenizer.json'}"]
    first = open_data(_cfg(tmp_path, data, *sets), VOCAB)[0].path
    if change == "data":
        data.write_text(data.read_text() + json.dumps({"text": "one more row"}) + "\n")
    elif change == "tokenizer":  # the same vocabulary, another end-of-text token: other ids
        (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    else:
        sets.append("data.columns={text: text}")
    cache, _, built = open_data(_cfg(tmp_path, data, *sets), VOCAB)
    assert built and cache.path != first


@pytest.mark.parametrize("damage", ["header", "short tokens", "bad offsets", "missing file"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    cfg = _cfg(tmp_path, _texts(tmp_path / "d.jsonl"))
    good = load_dataset(cfg, VOCAB, log=lambda m: None)
    want = good.input_ids.clone()
    path = good.cache.path
    good.cache.close()
    if damage == "header":
        (path / "header.json").write_text("{not json")
    elif damage == "short tokens":
        with open(path / "tokens.bin", "r+b") as f:
            f.truncate(10)
    elif damage == "bad offsets":
        off = np.fromfile(path / "offsets.bin", np.int64)
        off[3] = off[-1] + 5
        off.tofile(path / "offsets.bin")
    else:
        (path / "kinds.bin").unlink()
    logs, log = _logs()
    again = load_dataset(cfg, VOCAB, log=log)
    assert any("failed its check" in m and "rebuilding" in m for m in logs), logs
    assert any("tokenized" in m for m in logs)
    assert again.input_ids.equal(want)


def test_parallel_build_is_byte_identical_to_serial(tmp_path):
    data = _texts(tmp_path / "d.jsonl", n=300)
    sources = list_sources(data)
    tok = lambda: load_tokenizer(DEMO_TOKENIZER)  # noqa: E731
    serial = build_cache(sources, tmp_path / "one", "k", VOCAB, tok, workers=1, progress=False)
    parallel = build_cache(sources, tmp_path / "two", "k", VOCAB, tok, workers=2, progress=False, chunk_bytes=4096)
    for name in ("tokens", "offsets", "kinds", "lines"):
        assert (serial / f"{name}.bin").read_bytes() == (parallel / f"{name}.bin").read_bytes(), name
    assert json.loads((parallel / "header.json").read_text())["workers"] == 2


def test_word_cache_is_exact_against_the_tokenizer():
    tok = load_tokenizer(DEMO_TOKENIZER).tok
    assert applies(tok)
    texts = [json.loads(line)["text"] for line in DEMO_CORPUS.open()]
    texts += ["", " ", "a", "  leading and trailing  ", "tab\tand\nnewline \n x", "x  y   z", "naïve café ünïcödé 東京",
              "<|endoftext|>glued<|endoftext|> spaced <|endoftext|>", "don't won't it's", "1234567 89", "a" * 3000]
    wc = WordCache(tok)
    for _ in range(2):  # second pass: every word from the table
        tokens, lengths = wc.encode(texts)
        want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        assert lengths.tolist() == [len(w) for w in want]
        assert tokens.tolist() == [i for w in want for i in w]


def test_word_cache_refuses_tokenizers_it_cannot_split(tmp_path):
    spec = json.loads(DEMO_TOKENIZER.read_text())
    from tokenizers import Tokenizer

    spec["pre_tokenizer"]["add_prefix_space"] = True
    assert not applies(Tokenizer.from_str(json.dumps(spec)))
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    assert not applies(Tokenizer.from_str(json.dumps(spec)))


def test_a_word_cache_mismatch_rebuilds_text_by_text(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, _texts(tmp_path / "d.jsonl"))
    want = load_dataset(cfg, VOCAB, log=lambda m: None).input_ids.clone()
    real = WordCache.encode

    def wrong(self, texts):
        tokens, lengths = real(self, texts)
        return tokens + 1, lengths

    monkeypatch.setattr(WordCache, "encode", wrong)
    logs, log = _logs()
    got = load_dataset(_cfg(tmp_path, tmp_path / "d.jsonl", f"data.cache_dir={tmp_path / 'other'}"), VOCAB, log=log)
    assert any("word cache" in m for m in logs)
    assert got.input_ids.equal(want) and not got.cache.header["word_cache"]


def test_mask_and_labels_only_when_needed(tmp_path):
    text = _texts(tmp_path / "t.jsonl", n=3)
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": [5, 6, 7, 8]}) + "\n"
                   + json.dumps({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}) + "\n")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"input_ids": [5, 6, 7], "labels": [5, 9, 7]}) + "\n"
                   + json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    got = {}
    for name, path in (("text", text), ("masked", ids), ("labels", odd)):
        c = load_dataset(_cfg(tmp_path, path, "data.pack=false"), VOCAB, log=lambda m: None)
        got[name] = (c.cache.header["has_mask"], c.cache.header["has_labels"])
        if name == "masked":
            assert c.labels.tolist() == [[6, 7, 8, -100] + [-100] * 60, [6, 7, -100] + [-100] * 61]
            assert c.cache.path.joinpath("tokens.bin").stat().st_size == 7 * 2  # uint16
        if name == "labels":
            assert c.labels.tolist()[0][:3] == [9, 7, -100] and c.labels.tolist()[1][:3] == [2, 3, -100]
    assert got == {"text": (False, False), "masked": (True, False), "labels": (False, True)}


def test_cache_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _cfg(tmp_path, _texts(tmp_path / "d.jsonl"), f"data.cache_dir={blocker / 'cache'}")
    with pytest.raises(DataError) as e:
        load_dataset(cfg, VOCAB, log=lambda m: None)
    assert "data.cache_dir" in str(e.value) and str(blocker) in str(e.value)


def test_disk_full_mid_build_removes_the_partial_cache(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, _texts(tmp_path / "d.jsonl", n=200))
    real = cache_mod.CacheWriter.add
    calls = []

    def add(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise_enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.files["tokens"] = _Failing(raise_enospc)
        return real(self, *a, **k)

    monkeypatch.setattr(cache_mod.CacheWriter, "add", add)
    from megastream.data import loader

    monkeypatch.setattr(loader, "read_chunks", _small_chunks(loader.read_chunks))
    with pytest.raises(DataError) as e:
        open_or_build(list_sources(cfg.data.path), tmp_path / "cache", VOCAB, lambda: load_tokenizer(DEMO_TOKENIZER),
                      None, workers=1, progress=False)
    assert "disk filled" in str(e.value) and "data.cache_dir" in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []


class _Failing:
    def __init__(self, exc):
        self.exc = exc

    def write(self, _):
        raise self.exc

    def close(self):
        pass


def _small_chunks(read_chunks):
    def small(sources, chunk_bytes=4 << 20, **k):
        return read_chunks(sources, chunk_bytes=2048, **k)
    return small


def test_empty_data_set(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError) as e:
        load_dataset(_cfg(tmp_path, empty), VOCAB, log=lambda m: None)
    assert "e.jsonl" in str(e.value) and "no training sequences" in str(e.value)


def test_malformed_row_names_file_and_line_from_a_worker(tmp_path):
    path = _texts(tmp_path / "d.jsonl", n=300)
    lines = path.read_text().splitlines()
    lines[250] = '{"text": 5}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        build_cache(list_sources(path), tmp_path / "c", "k", VOCAB, lambda: load_tokenizer(DEMO_TOKENIZER),
                    workers=2, progress=False, chunk_bytes=4096)
    assert f"{path}:251: text must be a string" in str(e.value)
    assert not list((tmp_path / "c").iterdir())


def test_key_does_not_read_tokens_twice(tmp_path):
    """The key is a function of the sources' content, not their names."""
    a = _texts(tmp_path / "a.jsonl")
    b = tmp_path / "b.jsonl"
    b.write_bytes(a.read_bytes())
    assert data_key(list_sources(a), None, VOCAB, None, "train") == data_key(list_sources(b), None, VOCAB, None, "train")


def test_prepare_command_then_train_uses_the_cache(tmp_path, capsys):
    data = _texts(tmp_path / "d.jsonl", n=60)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ndata: {{path: {data}, seq_len: 64}}\n"
                   f"train: {{steps: 2, micro_batch_size: 2, grad_accum: 1}}\n"
                   f"output: {{dir: {tmp_path / 'runs' / 'a'}, progress: false}}\n")
    before = json.loads(run_cli("plan", str(cfg), "--json", check=False).stdout)["data"]
    assert before["cache"] is None and "megastream prepare" in before["note"]
    out = run_cli("prepare", str(cfg))
    assert "60 rows" in out.stdout and "pack bfd" in out.stdout and "fill" in out.stdout
    out = run_cli("prepare", str(cfg), "--json")
    s = json.loads(out.stdout)["train"]
    assert s["rows_read"] == 60 and s["pack"] == "bfd" and s["fill"] > 0.9
    after = json.loads(run_cli("plan", str(cfg), "--json", check=False).stdout)["data"]
    assert (after["rows"], after["fill"], after["cache"]) == (s["packed_rows"], s["fill"], s["cache"])
    assert "data: " in run_cli("plan", str(cfg), check=False).stdout
    run = run_cli("train", str(cfg))
    assert "tokenized" not in run.stdout and "fill" in run.stdout
    rec = json.loads((tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < rec["fill"] <= 1
