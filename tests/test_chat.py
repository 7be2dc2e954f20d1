"""Chat rows: rendering and token ids against transformers' own apply_chat_template on a real
template (ChatML, as Qwen2 uses), and the loss mask covering exactly the assistant turns."""

import json

import pytest
from tokenizers import AddedToken, Tokenizer

from megastream.chat import render
from megastream.data import load_jsonl
from megastream.errors import DataError
from megastream.tokenizer import DEMO_TOKENIZER, load_tokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVO = [{"role": "system", "content": "You answer briefly."},
         {"role": "user", "content": "What does assert do?"},
         {"role": "assistant", "content": "It checks a condition and raises AssertionError if it is false."},
         {"role": "user", "content": "And with -O?"},
         {"role": "assistant", "content": "The statement is removed; nothing is checked."}]


@pytest.fixture
def chat_tok_dir(tmp_path):
    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return d


def test_ids_match_apply_chat_template_and_mask_covers_assistant_turns(tmp_path, chat_tok_dir):
    import transformers

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVO}) + "\n")
    tok = load_tokenizer(chat_tok_dir / "tokenizer.json")
    ds = load_jsonl(path, 256, tok.vocab_size, lambda: tok, pack=False)

    hf = transformers.AutoTokenizer.from_pretrained(chat_tok_dir)
    want = hf.apply_chat_template(CONVO, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    n = len(want)
    assert ds.input_ids[0, :n].tolist() == want
    for gen in (False, True):  # the rendered text itself, with and without the generation prompt
        assert render(CHATML, CONVO, gen, tok.special) == hf.apply_chat_template(CONVO, tokenize=False,
                                                                                 add_generation_prompt=gen)

    # targets are next-token labels: the tokens predicted are exactly the assistant turns
    targets = [t for t in ds.labels[0].tolist() if t != -100]
    trained = hf.decode(targets)
    assert trained == ("It checks a condition and raises AssertionError if it is false.<|im_end|>\n"
                       "The statement is removed; nothing is checked.<|im_end|>\n")
    assert "What does assert do" not in trained and "You answer briefly" not in trained


def test_prompt_completion_rows(tmp_path, chat_tok_dir):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    tok = load_tokenizer(chat_tok_dir / "tokenizer.json")
    ds = load_jsonl(path, 64, tok.vocab_size, lambda: tok, pack=False)
    targets = [t for t in ds.labels[0].tolist() if t != -100]
    assert tok.decode(targets) == "4\n"  # special tokens are skipped by decode; the turn ends the span

    plain = load_tokenizer(DEMO_TOKENIZER)  # no chat template: prompt + completion + end-of-text
    ds = load_jsonl(path, 64, plain.vocab_size, lambda: plain, pack=False)
    labels = ds.labels[0].tolist()
    n_prompt = len(plain.encode(["2+2?"])[0])
    assert all(lab == -100 for lab in labels[:n_prompt - 1])
    assert [t for t in labels if t != -100] == plain.encode(["4"])[0] + [plain.eos_id]


@pytest.mark.parametrize("row,msg", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"prompt": "x", "completion": 3}, "must both be strings"),
])
def test_bad_chat_rows(tmp_path, chat_tok_dir, row, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 2]}) + "\n" + json.dumps(row) + "\n")
    tok = load_tokenizer(chat_tok_dir / "tokenizer.json")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{msg}"):
        load_jsonl(path, 64, tok.vocab_size, lambda: tok)


def test_messages_without_a_template_is_a_clear_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVO}) + "\n")
    tok = load_tokenizer(DEMO_TOKENIZER)
    with pytest.raises(DataError, match="chat.jsonl:1: a messages row needs a chat template"):
        load_jsonl(path, 256, tok.vocab_size, lambda: tok)


def test_alpaca_and_sharegpt_rows_train_on_the_answer_only(tmp_path, chat_tok_dir):
    """Real-shaped rows (an Alpaca row with an input and a system prompt, a ShareGPT conversation)
    render as the equivalent messages rows: the same ids and the same loss mask."""
    tok = load_tokenizer(chat_tok_dir / "tokenizer.json")
    alpaca = {"instruction": "Summarize the text.", "input": "Assert statements insert debugging assertions.",
              "output": "They add checks.", "system": "You answer briefly."}
    sharegpt = {"conversations": [{"from": "system", "value": "You answer briefly."},
                                  {"from": "human", "value": "What does assert do?"},
                                  {"from": "gpt", "value": "It checks a condition."}]}
    as_messages = [
        {"messages": [{"role": "system", "content": "You answer briefly."},
                      {"role": "user", "content": "Summarize the text.\n\nAssert statements insert debugging assertions."},
                      {"role": "assistant", "content": "They add checks."}]},
        {"messages": [{"role": "system", "content": "You answer briefly."},
                      {"role": "user", "content": "What does assert do?"},
                      {"role": "assistant", "content": "It checks a condition."}]}]
    got, want = tmp_path / "shapes.jsonl", tmp_path / "messages.jsonl"
    got.write_text("".join(json.dumps(r) + "\n" for r in (alpaca, sharegpt)))
    want.write_text("".join(json.dumps(r) + "\n" for r in as_messages))
    a = load_jsonl(got, 128, tok.vocab_size, lambda: tok)
    b = load_jsonl(want, 128, tok.vocab_size, lambda: tok)
    assert a.input_ids.equal(b.input_ids) and a.labels.equal(b.labels)
    trained = tok.decode([t for t in a.labels[0].tolist() if t != -100])
    assert trained.startswith("They add checks.") and "Summarize" not in trained


def test_bfd_fills_chat_rows(tmp_path, chat_tok_dir):
    """Conversations cannot be split, yet best-fit decreasing packs them to >= 98% real tokens
    (greedy packing in file order wastes far more)."""
    import random

    tok = load_tokenizer(chat_tok_dir / "tokenizer.json")
    words = "the assert statement checks a condition and raises an error when it is false".split()
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        turns = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 60)))},
                 {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(3, 90)))}]
        rows.append(json.dumps({"messages": turns}) + "\n")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(rows))
    bfd = load_jsonl(path, 512, tok.vocab_size, lambda: tok, pack="bfd")
    greedy = load_jsonl(path, 512, tok.vocab_size, lambda: tok, pack="greedy")
    assert bfd.layout.fill >= 0.98 and bfd.layout.fill > greedy.layout.fill
    assert bfd.layout.tokens == greedy.layout.tokens  # the same tokens, in fewer rows


CHATML_GEN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
              "{{'<|im_start|>assistant\\n'}}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
              "{{'\\n'}}{% else %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_generation_blocks_render_once_and_match_transformers_assistant_masks(tmp_path, chat_tok_dir, monkeypatch):
    import transformers

    import megastream.chat as chat

    cfg = json.loads((chat_tok_dir / "tokenizer_config.json").read_text())
    (chat_tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML_GEN}))
    tok = load_tokenizer(chat_tok_dir / "tokenizer.json")
    calls = []
    real = chat.render
    monkeypatch.setattr(chat, "render", lambda *a: calls.append(1) or real(*a))
    ids, labels = chat.chat_document(tok, CONVO, "x")
    assert len(calls) == 1  # one render per conversation

    hf = transformers.AutoTokenizer.from_pretrained(chat_tok_dir)
    out = hf.apply_chat_template(CONVO, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"])
    assert [lab != -100 for lab in labels] == [bool(m) for m in out["assistant_masks"]]
    assert hf.decode([i for i, lab in zip(ids, labels) if lab != -100]) == (
        "It checks a condition and raises AssertionError if it is false.<|im_end|>"
        "The statement is removed; nothing is checked.<|im_end|>")
