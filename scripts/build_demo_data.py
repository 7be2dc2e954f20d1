"""Rebuild the demo corpus and tokenizer shipped in megastream/demo/.

Corpus: sections of the Python language reference as bundled with CPython (pydoc_data.topics,
PSF license), one {"text": ...} row per paragraph group, capped at ~200 KB so the repo stays small.
Tokenizer: a byte-level BPE with 2048 tokens (the `tiny` preset's vocabulary) trained with the
`tokenizers` library; token 0 is <|endoftext|>.

    python scripts/build_demo_data.py
"""

import json
from pathlib import Path

from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parent.parent / "megastream" / "demo"
MAX_BYTES = 200_000
VOCAB = 2048


def main() -> None:
    rows, size = [], 0
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            text = " ".join(para.split())
            if len(text) < 80:
                continue
            rows.append(text)
            size += len(text)
            if size >= MAX_BYTES:
                break
        if size >= MAX_BYTES:
            break
    with open(OUT / "corpus.jsonl", "w") as f:
        for text in rows:
            f.write(json.dumps({"text": text}) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(rows, trainer)
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
         "model_max_length": 2048}, indent=2) + "\n")
    print(f"{len(rows)} rows, {size} characters, vocab {tok.get_vocab_size()} -> {OUT}")


if __name__ == "__main__":
    main()
