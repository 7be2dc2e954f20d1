"""The one weight-name map: Hugging Face tensor names <-> megastream's flat per-unit buffers.

The model is stored as a list of *units*, each one flat contiguous buffer:
  unit 0          embed   model.embed_tokens.weight
  units 1..L      layer i model.layers.{i}.*   (2-D weights first, then norms and biases)
  unit L+1        head    lm_head.weight (untied only), model.norm.weight

Within a unit, the weight-decayed tensors (2-D matrices, embeddings included) come first, so
"decay this unit" is one contiguous range `[0, n_decay)`. Load, save, the model function and
the parity tests all go through this table.

On the generic path (spec.implementation "hf", megastream.hf) a layer unit's entries are the
`transformers` layer module's own parameters, keyed by their names within the layer
("self_attn.q_proj.weight"), in the module's order (2-D first as above); where the checkpoint
stores a parameter in pieces (MoE experts saved one by one), `files` maps each checkpoint tensor
to its contiguous range of the unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megastream.model.spec import ModelSpec


@dataclass(frozen=True)
class Entry:
    key: str  # short name the model function uses ("q", "ln1", ...)
    hf_name: str  # full Hugging Face tensor name
    shape: tuple[int, ...]
    offset: int  # in elements, within the unit's flat buffer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decay(self) -> bool:
        return len(self.shape) >= 2


@dataclass(frozen=True)
class UnitLayout:
    name: str  # "embed" | "layer.{i}" | "head"
    entries: tuple[Entry, ...]
    files: tuple[Entry, ...] | None = None  # checkpoint tensors when they are not the entries themselves

    @property
    def checkpoint_entries(self) -> tuple[Entry, ...]:
        """The tensors of this unit as a Hugging Face checkpoint names and shapes them (load and save)."""
        return self.entries if self.files is None else self.files

    @property
    def numel(self) -> int:
        last = self.entries[-1]
        return last.offset + last.numel

    @property
    def n_decay(self) -> int:
        """Elements [0, n_decay) are weight-decayed, the rest are not."""
        return sum(e.numel for e in self.entries if e.decay)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into one flat buffer of this unit (no copies)."""
        return {e.key: flat[e.offset:e.offset + e.numel].view(e.shape) for e in self.entries}


def _unit(name: str, specs, files=None) -> UnitLayout:
    """specs: (key, hf name, shape) in model order; files: (checkpoint name, key, element offset
    within that entry, shape) for a checkpoint that stores the entries in pieces, or None."""
    specs = sorted(specs, key=lambda s: len(s[2]) < 2)  # stable: 2-D first, order kept otherwise
    entries, offset = [], 0
    for key, hf_name, shape in specs:
        entries.append(Entry(key, hf_name, tuple(shape), offset))
        offset += math.prod(shape)
    if files is not None:
        at = {e.key: e.offset for e in entries}
        files = tuple(Entry(key, ck_name, tuple(shape), at[key] + off) for ck_name, key, off, shape in files)
    return UnitLayout(name, tuple(entries), files)


def layer_layout(spec: ModelSpec, i: int) -> UnitLayout:
    H, I, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_size, spec.kv_size
    p = f"model.layers.{i}."
    t = [
        ("q", p + "self_attn.q_proj.weight", (q, H)),
        ("k", p + "self_attn.k_proj.weight", (kv, H)),
        ("v", p + "self_attn.v_proj.weight", (kv, H)),
        ("o", p + "self_attn.o_proj.weight", (H, q)),
        ("gate", p + "mlp.gate_proj.weight", (I, H)),
        ("up", p + "mlp.up_proj.weight", (I, H)),
        ("down", p + "mlp.down_proj.weight", (H, I)),
        ("ln1", p + "input_layernorm.weight", (H,)),
        ("ln2", p + "post_attention_layernorm.weight", (H,)),
    ]
    if spec.qkv_bias:
        t += [("q_b", p + "self_attn.q_proj.bias", (q,)),
              ("k_b", p + "self_attn.k_proj.bias", (kv,)),
              ("v_b", p + "self_attn.v_proj.bias", (kv,))]
    if spec.o_bias:
        t += [("o_b", p + "self_attn.o_proj.bias", (H,))]
    if spec.qk_norm:
        t += [("q_norm", p + "self_attn.q_norm.weight", (spec.head_dim,)),
              ("k_norm", p + "self_attn.k_norm.weight", (spec.head_dim,))]
    return _unit(f"layer.{i}", t)


def embed_layout(spec: ModelSpec) -> UnitLayout:
    return _unit("embed", [("embed", "model.embed_tokens.weight", (spec.vocab_size, spec.hidden_size))])


def head_layout(spec: ModelSpec) -> UnitLayout:
    t = [("norm", "model.norm.weight", (spec.hidden_size,))]
    if not spec.tie_word_embeddings:
        t.insert(0, ("lm_head", "lm_head.weight", (spec.vocab_size, spec.hidden_size)))
    return _unit("head", t)


def model_layout(spec: ModelSpec) -> list[UnitLayout]:
    """All units in storage and update order: embed, layer 0..L-1, head."""
    if spec.implementation == "hf":  # shapes read from the transformers module (megastream.hf.unit)
        return [_unit(name, params, files) for name, params, files in spec.hf_units]
    return [embed_layout(spec)] + [layer_layout(spec, i) for i in range(spec.num_layers)] + [head_layout(spec)]


def hf_names(spec: ModelSpec) -> dict[str, tuple[int, Entry]]:
    """HF checkpoint tensor name -> (unit index, entry)."""
    return {e.hf_name: (u, e) for u, unit in enumerate(model_layout(spec)) for e in unit.checkpoint_entries}


def count_params(spec: ModelSpec) -> int:
    return sum(u.numel for u in model_layout(spec))
