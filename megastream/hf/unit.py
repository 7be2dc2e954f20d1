"""The generic streamed unit: a `transformers` decoder layer, called functionally on views of the
layer's flat buffer.

The causal LM is built once with its parameters on the meta device (no storage at all, whatever
the model's size); only its non-persistent buffers (rotary tables, the embedding scale) are
computed for real, on the compute device, as `transformers` computes them when it loads a model.
A unit's layout is the layer module's own `named_parameters()`, in order; its forward is
`torch.func.functional_call(layer, views, ...)`, where `views` are slices of the streamed device
buffer. Nothing of the module holds weights, so the host store, the streaming, the fused optimizer
and the checkpoints treat it like any other unit.

`parts()` is also the check that a model can be streamed this way: it names the class and what is
missing when it cannot (an encoder-decoder, a layer with a custom signature, parameters outside
the embedding, the layers and the final norm).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from megastream.model.spec import UnsupportedModel

# Layer kinds whose masks transformers builds from the config alone (megastream.hf.model.masks).
LAYER_TYPES = ("full_attention", "sliding_attention")
# config keys that scale the embeddings or logits outside any module: the generic path would miss them.
_OUTSIDE_MODULES = ("logit_scale", "logits_scaling", "embedding_multiplier", "output_multiplier_scale")


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise UnsupportedModel("model.implementation: hf runs the model through transformers, which is not "
                               "installed: pip install 'megastream[hf]' (or transformers>=4.56)") from None
    return transformers


@dataclass
class Parts:
    """Where a causal LM keeps what megastream streams."""
    model: nn.Module  # the ...ForCausalLM, parameters on the meta device
    backbone: nn.Module  # model.model
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module  # the final norm: exactly one parameter, its weight (hidden,)
    rotary: nn.Module  # backbone.rotary_emb
    tied: bool  # lm_head.weight is the embedding table
    layer_names: list[str]  # "model.layers.0", ...

    @property
    def config(self):
        return self.model.config


def meta_model(config: dict, device: torch.device | str = "cpu", source: str = "config.json") -> Parts:
    """Build the causal LM of a config.json dict with parameters on the meta device and real
    non-persistent buffers on `device`; check it can be streamed (UnsupportedModel otherwise)."""
    transformers = import_transformers()
    name = (config.get("architectures") or [config.get("model_type", "?")])[0]
    if config.get("auto_map"):
        raise UnsupportedModel(f"{source}: {name} is defined by custom code (auto_map); the generic path builds only "
                               "models that transformers itself defines")
    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError) as e:
        raise UnsupportedModel(f"{source}: transformers {transformers.__version__} does not know model_type "
                               f"{config.get('model_type')!r} ({str(e).split('. ')[0]}); upgrade transformers or use "
                               "a model it defines") from None
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModel(f"{source}: {name} is an encoder-decoder model; megastream streams decoder-only causal "
                               "language models (one stack of decoder layers)")
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    except ValueError as e:
        raise UnsupportedModel(f"{source}: {name} has no causal-LM class in transformers (AutoModelForCausalLM: "
                               f"{str(e).splitlines()[0]}); megastream streams decoder-only causal language models"
                               ) from None
    parts = _parts(model, name, source)
    _materialize_buffers(model, torch.device(device))
    model.eval()  # no dropout: the backward recompute must see the forward's numbers
    return parts


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """The non-persistent buffers, computed on `device` by the model's own `_init_weights`, as
    `transformers` does for a model it loads; a persistent buffer (saved state that is not a
    parameter) is not something megastream streams."""
    owners = {}
    for mod_name, mod in model.named_modules():
        for b_name, buf in list(mod._buffers.items()):
            if buf is None:
                continue
            if b_name not in mod._non_persistent_buffers_set:
                raise UnsupportedModel(f"{type(model).__name__}: {mod_name}.{b_name} is a saved buffer (state outside "
                                       "the parameters), which the generic path does not stream")
            mod._buffers[b_name] = torch.empty_like(buf, device=device)
            owners[id(mod)] = mod
    with torch.no_grad():
        for mod in owners.values():
            model._init_weights(mod)


def _parts(model: nn.Module, name: str, source: str) -> Parts:
    cls = type(model).__name__
    cfg = model.config

    def refuse(what: str):
        raise UnsupportedModel(f"{source}: {cls} cannot be streamed by megastream's generic path: {what}")

    backbone = getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != cfg.num_hidden_layers:
        refuse("it has no model.layers list of num_hidden_layers decoder layers (a multimodal or nested model? "
               "use its text-only causal LM)")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, nn.Embedding) or (type(embed).forward is not nn.Embedding.forward
                                                and not hasattr(embed, "embed_scale")):
        refuse(f"its input embedding {type(embed).__name__} is neither an nn.Embedding nor a scaled one (embed_scale)")
    if not isinstance(head, nn.Linear) or head.bias is not None:
        refuse(f"its output layer {type(head).__name__} is not a bias-free nn.Linear")
    norm = getattr(backbone, "norm", None)
    norm_params = dict(norm.named_parameters()) if isinstance(norm, nn.Module) else {}
    if list(norm_params) != ["weight"] or tuple(norm_params["weight"].shape) != (cfg.hidden_size,):
        refuse("its final norm (model.norm) is missing or holds other parameters than one weight of hidden_size")
    rotary = getattr(backbone, "rotary_emb", None)
    if rotary is None:
        refuse("model.rotary_emb is missing (positions are encoded some other way)")
    known = {id(embed), id(layers), id(norm), id(rotary)}
    for child_name, child in backbone.named_children():
        if id(child) not in known and any(True for _ in child.parameters()):
            refuse(f"model.{child_name} ({type(child).__name__}) holds parameters outside the embedding, the layers "
                   "and the final norm")
    for key in _OUTSIDE_MODULES:
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            refuse(f"config {key}={getattr(cfg, key)} scales activations outside the layer modules")
    sig = inspect.signature(type(layers[0]).forward).parameters
    params = list(sig)
    kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.values())
    missing = [p for p in ("position_embeddings", "attention_mask") if p not in sig and not kwargs]
    if len(params) < 2 or params[1] != "hidden_states" or missing:
        refuse(f"its decoder layer {type(layers[0]).__name__} has a custom signature forward({', '.join(params[1:])}); "
               "the generic path calls layer(hidden_states, attention_mask=, position_embeddings=, position_ids=)"
               + (f", and {', '.join(missing)} is missing" if missing else ""))
    for t in layer_types(cfg):
        if t not in LAYER_TYPES:
            refuse(f"layer type {t!r} (the generic path builds masks for {', '.join(LAYER_TYPES)})")
    if getattr(cfg, "use_bidirectional_attention", False):
        refuse("use_bidirectional_attention=true (megastream trains causal attention)")
    seen: set[int] = set()
    for layer in layers:
        for p in layer.parameters():
            if id(p) in seen or p is embed.weight:
                refuse("its layers share parameters with each other or with the embedding")
            seen.add(id(p))
    names = {id(m): n for n, m in model.named_modules()}
    return Parts(model=model, backbone=backbone, embed=embed, layers=layers, norm=norm, rotary=rotary,
                 tied=head.weight is embed.weight, layer_names=[names[id(layer)] for layer in layers])


def layer_types(cfg) -> list[str]:
    """The attention kind of each layer, as the model's own forward chooses its masks: the config's
    layer_types, else sliding-window attention everywhere when sliding_window is set (Mistral,
    Mixtral, Phi-3), else full causal attention."""
    L = cfg.num_hidden_layers
    if getattr(cfg, "layer_types", None):
        return list(cfg.layer_types)[:L]
    return ["sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"] * L


def unit_params(parts: Parts) -> list[tuple[str, list[tuple[str, str, tuple[int, ...]]]]]:
    """Per unit (embed, layer 0..L-1, head): (unit name, [(key, module name, shape), ...]) in the
    module's named_parameters order. The layer keys are the names within the layer, so that the
    unit's views are functional_call's parameter dict as they are."""
    model = parts.model
    full = {id(p): n for n, p in model.named_parameters()}
    units = [("embed", [("embed", full[id(parts.embed.weight)], tuple(parts.embed.weight.shape))])]
    for i, (layer, prefix) in enumerate(zip(parts.layers, parts.layer_names)):
        units.append((f"layer.{i}", [(k, f"{prefix}.{k}", tuple(p.shape)) for k, p in layer.named_parameters()]))
    head = [("norm", full[id(parts.norm.weight)], tuple(parts.norm.weight.shape))]
    if not parts.tied:
        w = model.get_output_embeddings().weight
        head.insert(0, ("lm_head", full[id(w)], tuple(w.shape)))
    units.append(("head", head))
    return units


def layer_numel(parts: Parts, i: int) -> int:
    return sum(math.prod(p.shape) for p in parts.layers[i].parameters())


def call_layer(layer: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor], mask, position_embeddings,
               position_ids: torch.Tensor) -> torch.Tensor:
    """The layer's own forward on x (B, S, H), with its parameters taken from `w` (views of the
    streamed buffer, keyed as in unit_params) for this call only."""
    y = torch.func.functional_call(layer, w, (x,), {"attention_mask": mask, "position_embeddings": position_embeddings,
                                                    "position_ids": position_ids})
    return y[0] if isinstance(y, tuple) else y  # transformers 4.x layers return a tuple
