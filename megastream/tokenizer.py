"""Tokenizers from tokenizer.json files (the `tokenizers` library), with the end-of-text token
taken from tokenizer_config.json when present."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from megastream.errors import DataError

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_TOKENIZER = DEMO_DIR / "tokenizer.json"
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


@dataclass
class TextTokenizer:
    tok: Tokenizer
    path: Path
    eos_id: int | None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    path = Path(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for bad files
        raise DataError(f"{path}: cannot load tokenizer ({e}); it must be a Hugging Face tokenizer.json") from None
    eos = None
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            eos = json.loads(cfg_path.read_text()).get("eos_token")
        except json.JSONDecodeError as e:
            raise DataError(f"{cfg_path}: not valid JSON ({e})") from None
        if isinstance(eos, dict):
            eos = eos.get("content")
    candidates = ([eos] if isinstance(eos, str) else []) + list(_EOS_CANDIDATES)
    eos_id = next((tok.token_to_id(t) for t in candidates if tok.token_to_id(t) is not None), None)
    return TextTokenizer(tok, path, eos_id)
