"""Tokenizers from tokenizer.json files (the `tokenizers` library), with the end-of-text token
taken from tokenizer_config.json when present."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
    chat_template: str | None = None  # Jinja2 source, from tokenizer_config.json or chat_template.jinja
    special: dict = field(default_factory=dict)  # bos_token / eos_token strings for the template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def special_ids(self) -> dict:
        """{"bos_token_id", "eos_token_id", "pad_token_id"}: those this tokenizer has, for a config.json
        (transformers' generate() stops at eos_token_id)."""
        ids = {"eos_token_id": self.eos_id}
        for key in ("bos", "pad"):
            token = self.special.get(f"{key}_token")
            ids[f"{key}_token_id"] = self.tok.token_to_id(token) if token else None
        return {k: v for k, v in ids.items() if v is not None}


def load_tokenizer(path: str | Path) -> TextTokenizer:
    path = Path(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for bad files
        raise DataError(f"{path}: cannot load tokenizer ({e}); it must be a Hugging Face tokenizer.json") from None
    cfg: dict = {}
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{cfg_path}: not valid JSON ({e})") from None
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    candidates = ([special["eos_token"]] if "eos_token" in special else []) + list(_EOS_CANDIDATES)
    eos_id = next((tok.token_to_id(t) for t in candidates if tok.token_to_id(t) is not None), None)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (path.parent / "chat_template.jinja").is_file():
        template = (path.parent / "chat_template.jinja").read_text()
    return TextTokenizer(tok, path, eos_id, template, special)
