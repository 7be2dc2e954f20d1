"""Chat data: `{"messages": [...]}` and `{"prompt", "completion"}` rows rendered with the model's
chat template (tokenizer_config.json `chat_template`, or chat_template.jinja), with the loss on
assistant / completion tokens only.

Templates render with Jinja2 the way `transformers` renders them (a sandboxed environment with
trim_blocks and lstrip_blocks, `raise_exception`, a non-ASCII-escaping `tojson`, `strftime_now`;
`{% generation %}` blocks are accepted). Assistant spans: a template with `{% generation %}` blocks
marks them itself, so the conversation is rendered once and the blocks are the spans (what
`transformers` returns as `assistant_masks`); otherwise each is found by rendering the conversation
prefix before each assistant message (with the generation prompt) and after it. Tokens whose
characters fall inside a span get labels, all others -100.
"""

from __future__ import annotations

import contextvars
import json
import re
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from megastream.errors import DataError

IGNORE = -100


_MARK = contextvars.ContextVar("megastream_mark_generation", default=False)
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters around each generation block while marking
_HAS_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: plain output, or (while marking) wrapped in _OPEN/_CLOSE."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        body = caller()
        return f"{_OPEN}{body}{_CLOSE}" if _MARK.get() else body


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool, special: dict) -> str:
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def validate_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string \"role\" and \"content\"")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return messages


def _marked_spans(template: str, messages: list[dict], special: dict) -> tuple[str, list] | None:
    """One render of a template with generation blocks: (text, spans of the blocks), or None when
    the template has none or a message holds the marker characters."""
    if not _HAS_GENERATION.search(template) or any(_OPEN in m["content"] or _CLOSE in m["content"] for m in messages):
        return None
    token = _MARK.set(True)
    try:
        marked = render(template, messages, False, special)
    finally:
        _MARK.reset(token)
    text, spans, pos = [], [], 0
    for part in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if part == _OPEN:
            start = pos
        elif part == _CLOSE:
            spans.append((start, pos))
        else:
            text.append(part)
            pos += len(part)
    return ("".join(text), spans) if spans else None


def chat_document(tok, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation: labels on assistant tokens only."""
    template = tok.chat_template
    try:
        once = _marked_spans(template, messages, tok.special)
        if once is not None:
            return _labelled(tok, *once)
        full = render(template, messages, False, tok.special)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(render(template, messages[:i], True, tok.special))
                upto = render(template, messages[:i + 1], False, tok.special)
                if not full.startswith(upto):
                    raise DataError(f"{where}: the chat template does not render conversations prefix by prefix, "
                                    "so assistant tokens cannot be located; use prompt/completion or input_ids rows")
                spans.append((start, len(upto)))
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"{where}: the chat template failed: {e}") from None
    return _labelled(tok, full, spans)


def _labelled(tok, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    enc = tok.tok.encode(text, add_special_tokens=False)
    labels = [i if any(s <= a < e for s, e in spans) else IGNORE for i, (a, _) in zip(enc.ids, enc.offsets)]
    return list(enc.ids), labels


def completion_document(tok, prompt: str, completion: str, where: str) -> tuple[list[int], list[int]]:
    """A prompt/completion row: through the chat template when there is one (user, assistant);
    otherwise prompt + completion + end-of-text, with labels on the completion."""
    if tok.chat_template:
        return chat_document(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                             where)
    p, c = tok.encode([prompt, completion])
    c = c + ([tok.eos_id] if tok.eos_id is not None else [])
    return p + c, [IGNORE] * len(p) + c
