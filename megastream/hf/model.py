"""Everything around the generic layers that the model's own forward would do: the embedding scale,
positions and rotary tables, attention masks, the final norm and the logit soft-capping of the head,
and the router's load-balancing loss of a mixture of experts.

`HFModel` is the engine's hook for the generic path (the native families have engine.NativeModel):

    attention_inputs(mbs) -> per micro-batch (rope, mask)   computed once per step
    layer(i, x, w, rope, mask) -> y                          the layer module on views `w` of its buffer
    embed(x), embed_grad(ids, dy)                            after the row gather, and its backward
    head_kw                                                  the final norm (a module call) and soft-capping
    aux                                                      RouterAux, or None
    route_experts(modules, route)                            a hook before each MoE layer's experts compute

Each is taken from the `transformers` model itself: its rotary module (per layer type where it has
one per type, Gemma 3), the embedding's `embed_scale` and `padding_idx` (whose row gets no gradient
from the lookup, as in nn.Embedding), `final_logit_softcapping`, and the masks from transformers'
own mask builders for the layer's attention implementation, with packed documents kept apart.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from megastream.hf.unit import Parts, call_layer, layer_types, meta_model
from megastream.model.spec import ModelSpec


class HFModel:
    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
        self.parts: Parts = meta_model(spec.hf_config, device)
        self.device, self.dtype = device, dtype
        cfg = self.parts.config
        self.types = layer_types(cfg)
        self.rope_per_type = "layer_type" in inspect.signature(self.parts.rotary.forward).parameters
        emb = self.parts.embed
        scale = getattr(emb, "embed_scale", None)
        self.scale = None if scale is None else torch.as_tensor(scale, device=device).to(dtype)  # as in its forward
        self.padding_idx = emb.padding_idx
        self.embed = self._embed if self.scale is not None else None
        self.embed_grad = self._embed_grad if self.scale is not None or self.padding_idx is not None else None
        softcap = getattr(cfg, "final_logit_softcapping", None)
        self.head_kw = {"norm": self._head_norm, "softcap": softcap}
        self.aux = RouterAux(self.parts, device) if getattr(cfg, "output_router_logits", False) else None
        self._plain: dict[tuple[int, int], tuple] = {}  # (B, S) -> (rope, mask) of unpacked rows

    # ---- embedding -------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale  # (B, S, H), in the compute dtype as the module's own forward

    def _embed_grad(self, ids: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(gathered rows) from d(loss)/d(embedding output)."""
        if self.scale is not None:
            dy = dy * self.scale
        if self.padding_idx is not None:  # nn.Embedding(padding_idx): that row gets no gradient from the lookup
            dy = dy.masked_fill((ids == self.padding_idx).to(dy.device)[..., None], 0)
        return dy

    # ---- positions and masks ---------------------------------------------------------------------
    def attention_inputs(self, mbs) -> tuple[list, list]:
        """(rope, mask) per micro-batch: rope maps each layer type to (cos, sin) (or is one pair),
        mask maps each layer type to what its attention implementation takes (None: plain causal).
        Packed rows: positions restart per document and a document attends only to itself."""
        ropes, masks = [], []
        for mb in mbs:
            B, S = mb.input_ids.shape
            if mb.positions is None and (B, S) in self._plain:
                r, m = self._plain[(B, S)]
            else:
                pos = (torch.arange(S, device=self.device)[None].expand(B, S) if mb.positions is None
                       else mb.positions.to(self.device))
                docs = None if mb.doc_ids is None else mb.doc_ids.to(self.device)
                r, m = (self._rope(pos), pos), self._masks(B, S, docs)
                if mb.positions is None:
                    self._plain[(B, S)] = (r, m)
            ropes.append(r)
            masks.append(m)
        return ropes, masks

    def _rope(self, pos: torch.Tensor):
        x = torch.empty(0, dtype=self.dtype, device=self.device)  # the rotary module reads only its dtype, device
        with torch.no_grad():
            if self.rope_per_type:
                return {t: self.parts.rotary(x, pos, t) for t in set(self.types)}
            return self.parts.rotary(x, pos)

    def _masks(self, B: int, S: int, docs: torch.Tensor | None) -> dict:
        """transformers' own mask builders, per layer type, for this model's attention implementation
        (sdpa: boolean or None for plain causal; eager: additive float). Documents of packed rows
        are kept apart by an extra condition, evaluated on token indices (causality and windows
        within one document are then those of its own positions)."""
        from transformers import masking_utils as mu

        embeds = torch.empty(B, S, 0, dtype=self.dtype, device=self.device)  # read for B, S, dtype, device only

        def same_doc(b, h, q, kv):
            return docs[b, q] == docs[b, kv]

        build = {"full_attention": mu.create_causal_mask, "sliding_attention": mu.create_sliding_window_causal_mask}
        return {t: build[t](self.parts.config, embeds, None, None, and_mask_function=None if docs is None else same_doc)
                for t in set(self.types)}

    # ---- layers ----------------------------------------------------------------------------------
    def layer(self, i: int, x: torch.Tensor, w: dict[str, torch.Tensor], rope, mask, lora=None) -> torch.Tensor:
        """Layer i of the model on x (B, S, H), its parameters the views `w` of its streamed buffer."""
        if lora is not None:
            raise NotImplementedError("LoRA on model.implementation: hf")
        t = self.types[i]
        (pe, pos), m = rope, mask[t]
        if self.aux is not None:
            self.aux.captured.clear()
        return call_layer(self.parts.layers[i], x, w, m, pe[t] if self.rope_per_type else pe, pos)

    def route_experts(self, modules: dict[int, str], route) -> None:
        """Call `route(i, top_k_index)` before the experts module `modules[i]` (its path within layer
        i) computes: routed-expert streaming (engine/experts.py) copies the experts it needs then."""
        for i, path in modules.items():
            def hook(module, args, kwargs, i=i):
                route(i, args[1] if len(args) > 1 else kwargs["top_k_index"])
            self.parts.layers[i].get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)

    # ---- head ------------------------------------------------------------------------------------
    def _head_norm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.parts.norm, {"weight": w}, (h,))


class RouterAux:
    """The router's load-balancing loss of a mixture of experts, exactly as transformers adds it
    (`load_balancing_loss_func`: E * sum_e f_e * P_e over the tokens of all MoE layers, f_e the
    share of top-k assignments to expert e, P_e its mean router probability; loss += coef * aux),
    computed layer by layer: f, a count, has no gradient, so once the forward pass has counted the
    assignments of every layer, each layer's recompute adds its own term coef * E * sum_e f_e *
    P_e(layer) to its backward, and the terms sum to the loss.

    The router logits are those transformers records (`_can_record_outputs["router_logits"]`, a
    forward hook on the router module). A micro-batch's loss is that of one call of the
    transformers model on it; the step's aux is their mean over micro-batches (the token-mean
    cross-entropy plus coef * aux of each micro-batch, averaged). Packed rows' padding is excluded,
    as transformers excludes positions its attention_mask marks as padding."""

    def __init__(self, parts: Parts, device: torch.device):
        self.device = device
        rec = (getattr(type(parts.model), "_can_record_outputs", None) or {}).get("router_logits")
        if rec is None or not hasattr(rec, "target_class"):
            raise NotImplementedError(f"{type(parts.model).__name__}: output_router_logits is set but the model "
                                      "declares no router to record")
        self.index = rec.index
        self.captured: list[torch.Tensor] = []
        self.moe_layers = set()
        for i, layer in enumerate(parts.layers):
            for m in layer.modules():
                if isinstance(m, rec.target_class):
                    m.register_forward_hook(self._hook)
                    self.moe_layers.add(i)
        model = parts.model
        self.E = int(getattr(model, "num_experts", None) or parts.config.num_local_experts)
        self.top_k = int(getattr(model, "num_experts_per_tok", None) or parts.config.num_experts_per_tok)
        self.coef = float(getattr(model, "router_aux_loss_coef", None) or parts.config.router_aux_loss_coef)

    def _hook(self, module: nn.Module, args, out) -> None:
        self.captured.append(out[self.index] if isinstance(out, tuple) else out)

    def begin(self, mbs) -> None:
        """Before the forward pass of a step: token weights and zeroed statistics per micro-batch."""
        self.c = self.coef / len(mbs)
        self.w = [(torch.ones(mb.input_ids.numel()) if mb.doc_ids is None else (mb.doc_ids.reshape(-1) >= 0).float())
                  for mb in mbs]
        self.count = [torch.zeros(self.E, device=self.device) for _ in mbs]  # top-k assignments per expert
        self.psum = [torch.zeros(self.E, device=self.device) for _ in mbs]  # router probabilities per expert
        self.rows = [float(w.sum()) * len(self.moe_layers) for w in self.w]

    def _probs(self, k: int):
        logits = torch.cat(self.captured) if len(self.captured) > 1 else self.captured[0]
        self.captured.clear()
        probs = torch.softmax(logits, dim=-1)  # (tokens, E), in the logits' dtype as transformers does
        w = self.w[k].to(probs.device)
        return probs, w

    def forward(self, i: int, k: int) -> None:
        """After layer i's forward on micro-batch k: count its assignments and probabilities."""
        if i not in self.moe_layers:
            return
        probs, w = self._probs(k)
        sel = torch.topk(probs, self.top_k, dim=-1).indices  # (tokens, top_k)
        cnt = torch.zeros(self.E, dtype=torch.float32, device=probs.device).scatter_add_(
            0, sel.reshape(-1), w.repeat_interleave(self.top_k))
        self.count[k] += cnt
        self.psum[k] += (probs.float() * w[:, None]).sum(0)

    def value(self) -> float:
        """coef * mean over micro-batches of aux, after the forward pass."""
        return sum(self.c * float((self.count[k] / n * (self.psum[k] / n)[None]).sum() * self.E)
                   for k, n in enumerate(self.rows))

    def term(self, i: int, k: int) -> torch.Tensor | None:
        """After layer i's recompute (with grad) on micro-batch k: its share of the loss, to backprop."""
        if i not in self.moe_layers:
            return None
        probs, w = self._probs(k)
        n = self.rows[k]
        f = self.count[k] / n
        return self.c * self.E * (f * ((probs.float() * w[:, None]).sum(0) / n)).sum()
