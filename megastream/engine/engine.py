"""One optimizer step, layer-major (see DESIGN.md).

    embed (row gather) -> layer 0..L-1 (all micro-batches per layer, no grad, inputs kept)
    -> head (chunked loss + grads) -> layer L-1..0 (recompute each micro-batch with grad,
    accumulate weight grads in fp32 on the device, one D2H per layer) -> embedding grads
    -> global norm -> per-unit AdamW on a host thread, overlapping what the device does next.

The embedding (engine.embedding, resolve.embedding_path) is gathered and its gradient scatter-added
on the device (the table streamed into the head's buffers like a unit: engine/weights.py,
engine/grads.py), or on the host.

Each layer's weights cross to the device once in forward and once in backward, however many
micro-batches the step has. Updates start once the global norm is known (clipping needs it, and a
non-finite loss or norm must skip the whole update, never half of it), in order 0..L+1,
overlapping the next step's forward, which waits only for the unit it needs next.

With LoRA adapters (megastream.adapters.lora) the base is frozen and the step changes shape: the
same streaming schedule, but the backward recompute computes only input and adapter gradients
(no weight gradient of the base, no head or embedding gradient, nothing copied back to the host,
no host optimizer), and the adapters are updated on the device. The base never changes, so
what is resident on the device stays valid from one step to the next (the head is copied once).
Modules trained in full beside the adapters (lora.train_extra) live with them on the device: the
embedding rows are gathered from the trained copy, the head uses its trained weight and accumulates
its gradient, and the embedding's gradient is scattered from layer 0's input gradient.

What a layer computes is the model's business, not the schedule's: the engine calls the model
functions of its spec (`self.fns`), NativeModel below (model/llama.py's `block` and friends) for
the families megastream implements, megastream.hf.HFModel (the `transformers` layer module
called functionally on the same views) on the generic path. Both provide
`attention_inputs(mbs)`, `layer(i, x, w, rope, mask, lora=None)`, `embed` / `embed_grad` (None, or
what follows the embedding's row gather and its backward), `head_kw` (extra arguments of the chunked
head loss) and `aux` (None, or a loss a layer adds to the step: the MoE router's load balancing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megastream import ops
from megastream.config import Config
from megastream.engine.activations import Checkpoints
from megastream.engine.experts import routed_experts
from megastream.engine.grads import GradStager
from megastream.engine.loss import IGNORE, auto_chunk_tokens, head_loss, head_loss_and_grad
from megastream.engine.streams import DONE, Streams
from megastream.engine.weights import WeightStreamer
from megastream.model.layout import UnitLayout
from megastream.model.flex import document_block_mask
from megastream.model.llama import Adapter, block, document_mask, rope_tables
from megastream.model.spec import ModelSpec
from megastream.model.varlen import documents as varlen_documents
from megastream.optim import AdamWHyper, OptimizerWorker, clip_coef, sr_key
from megastream.resolve import embedding_path
from megastream.store import HostStore


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, S) int64, host
    labels: torch.Tensor  # (B, S) int64, host: next-token targets, IGNORE where no loss
    positions: torch.Tensor | None = None  # (B, S) int64: RoPE positions, restarting per packed document
    doc_ids: torch.Tensor | None = None  # (B, S) int64: document of each token; attention stays within it


@dataclass(frozen=True)
class StepStats:
    loss: float  # token-mean over the step
    loss_tokens: int
    grad_norm: float  # before clipping
    lr: float
    skipped: bool = False  # non-finite loss or gradient norm: no update was applied
    h2d_bytes: int = 0  # weights copied host -> device in the step (layers and head)
    d2h_bytes: int = 0  # gradients copied device -> host in the step (layers and head)


class NativeModel:
    """The engine's model functions for the families megastream implements (model/llama.py)."""
    embed = embed_grad = None  # the gathered embedding rows are the layers' input
    head_kw: dict = {}
    aux = None

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, attention: str = "sdpa",
                 compile: bool = False):
        self.spec, self.device, self.dtype = spec, device, dtype
        # engine.compile: one compiled graph per shape (no CUDA graphs: the weights are new views each
        # step); the forward (no grad) and the backward's recompute (with grad) compile separately
        self.block = torch.compile(block, dynamic=False) if compile else block
        # packed rows: a FlexAttention block mask, or varlen's segment offsets, instead of a dense mask
        self.attention = attention
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, i: int, x: torch.Tensor, w: dict[str, torch.Tensor], rope, mask: torch.Tensor | None = None,
              lora: dict[str, Adapter] | None = None) -> torch.Tensor:
        return self.block(x, w, rope, self.spec, mask, lora)

    def rope(self, seq_len: int):
        if seq_len not in self._rope:
            pos = torch.arange(seq_len, device=self.device)
            self._rope[seq_len] = rope_tables(self.spec, pos, self.dtype)
        return self._rope[seq_len]

    def attention_inputs(self, mbs: list[MicroBatch]):
        """RoPE tables and attention masks per micro-batch. Plain rows share one (S, hd) table and
        the built-in causal mask; packed rows get per-token positions and their documents, as
        engine.attention takes them: a dense mask, a block mask, or segment offsets (found on the
        host: no device sync). Built once per step; the backward's recompute reuses them."""
        ropes, masks = [], []
        for mb in mbs:
            if mb.positions is None:
                ropes.append(self.rope(mb.input_ids.shape[1]))
                masks.append(None)
            else:
                cos, sin = rope_tables(self.spec, mb.positions.to(self.device), self.dtype)  # (B, S, hd)
                ropes.append((cos[:, None], sin[:, None]))  # (B, 1, S, hd): broadcast over heads
                masks.append(self._documents(mb.doc_ids))
        return ropes, masks

    def _documents(self, doc_ids: torch.Tensor):
        """(B, S) host document indices -> what model/llama.py's attention takes for them."""
        if self.attention == "varlen":
            return varlen_documents(doc_ids, self.device)  # int32 offsets + longest segment
        doc = doc_ids.to(self.device)
        return document_block_mask(doc) if self.attention == "flex" else document_mask(doc)  # (B, 1, S, S) bool


def model_functions(spec: ModelSpec, device: torch.device, dtype: torch.dtype, attention: str = "sdpa",
                    compile: bool = False):
    """The layer functions of `spec`'s implementation (the generic path imports transformers)."""
    if spec.implementation == "hf":
        from megastream.hf import HFModel

        return HFModel(spec, device, dtype)
    return NativeModel(spec, device, dtype, attention, compile)


def layer_backward(x: torch.Tensor, w_flat: torch.Tensor, layout: UnitLayout, dy: torch.Tensor,
                   acc: torch.Tensor, rope, spec: ModelSpec, mask: torch.Tensor | None = None,
                   layer=None, extra=None) -> torch.Tensor:
    """Recompute one layer from its input checkpoint and backprop `dy` through it.
    Adds the weight gradients into `acc` (fp32, the layer's flat layout); returns d(input).
    `layer(x, w, rope, mask)` computes it (default: the native block); `extra()`, called right
    after, may return a scalar loss of the layer's own (the MoE router's) to backprop with it."""
    leaves = {k: t.detach().requires_grad_() for k, t in layout.views(w_flat).items()}
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = block(x, leaves, rope, spec, mask) if layer is None else layer(x, leaves, rope, mask)
        aux = extra() if extra is not None else None
    keys = list(leaves)
    if aux is None:
        grads = torch.autograd.grad(y, [x] + [leaves[k] for k in keys], dy, allow_unused=layer is not None)
    else:
        grads = torch.autograd.grad([y, aux], [x] + [leaves[k] for k in keys], [dy, torch.ones_like(aux)],
                                    allow_unused=True)
    acc_views = layout.views(acc)
    for k, g in zip(keys, grads[1:]):
        if g is not None:  # None: a parameter this input never reached (an expert no token chose)
            acc_views[k].add_(g)
    return grads[0]


def lora_layer_backward(x: torch.Tensor, w_flat: torch.Tensor, layout: UnitLayout, dy: torch.Tensor,
                        lora: dict[str, Adapter], rope, spec: ModelSpec, mask: torch.Tensor | None = None,
                        need_dx: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Recompute one layer over a frozen base (its weights do not require grad, so autograd computes
    no weight gradient for them) and backprop `dy`. `lora` holds leaf A, B tensors that require grad.
    Returns (d(input), or None without `need_dx` (layer 0: the embedding is frozen), and the adapter
    gradients [dA, dB, ...] in `lora`'s order)."""
    x = x.detach().requires_grad_(need_dx)
    leaves = [t for ad in lora.values() for t in (ad.a, ad.b)]
    with torch.enable_grad():
        y = block(x, layout.views(w_flat), rope, spec, mask, lora, value=False)  # only its graph is used
    grads = torch.autograd.grad(y, ([x] if need_dx else []) + leaves, dy)
    return (grads[0], list(grads[1:])) if need_dx else (None, list(grads))


class Engine:
    def __init__(self, spec: ModelSpec, store: HostStore, cfg: Config, device: torch.device, adapters=None,
                 comm=None, chunk_tokens: int | None = None):
        """`adapters` (megastream.adapters.lora.LoraAdapters): train them over a frozen base instead
        of the base itself. `comm` (megastream.dist.comm.Comm): one rank of a data-parallel job whose
        `store` is this rank's shard (megastream.dist): weights all-gathered, gradients reduce-scattered,
        token counts, losses and norms summed over the ranks. `chunk_tokens`: the loss chunk the plan
        sized (memory.budget; None: engine.loss_chunk_tokens, or the automatic size)."""
        self.spec = spec
        self.store = store
        self.cfg = cfg
        self.device = device
        self.dtype = store.compute_dtype
        self.units = store.full_units  # what the model computes on (a sharded store holds slices of them)
        self.comm = comm
        self.L = spec.num_layers
        self.head_unit = self.L + 1
        self.adam_steps = 0
        self.prev_norm: float | None = None  # optim.clip: previous: the last step's global norm (checkpointed)
        self.chunk_tokens = chunk_tokens or cfg.engine.loss_chunk_tokens or auto_chunk_tokens(spec.vocab_size)
        self.streams = Streams(device)
        self.worker = OptimizerWorker(self._update_unit, threads=cfg.engine.threads)
        tied = spec.tie_word_embeddings
        self.adapters = adapters
        self.embedding = embedding_path(cfg, spec, device.type, distributed=comm is not None)[0]
        if comm is None:
            on_device = self.embedding == "device"
            self.weights = WeightStreamer(store, device, self.streams, tied=tied, before_copy=self.worker.wait,
                                          device_embed=on_device)
            # Frozen base: no weight gradient buffers on the device at all.
            self.grads = (GradStager(store, device, self.streams, tied=tied, device_embed=on_device)
                          if adapters is None else None)
        else:
            from megastream.dist.streaming import streamers

            self.weights, self.grads = streamers(store, device, self.streams, tied=tied, before_copy=self.worker.wait,
                                                 comm=comm)
            if adapters is not None:
                self.grads = None
        self.ckpts = Checkpoints(device, self.streams, cfg.engine.activations)
        # what a layer, the embedding and the head compute
        self.fns = model_functions(spec, device, self.dtype, cfg.engine.attention, cfg.engine.compile)
        # engine.moe_streaming: routed: only the routed experts of MoE layers cross PCIe (engine/experts.py)
        self.experts = routed_experts(cfg, spec, self.units, self.fns, self.weights, self.grads)

    def close(self) -> None:
        """Wait for the device and the optimizer thread, then release the pinned checkpoint arena.
        The copy streams are drained first: D2H gradient copies (d2h), checkpoint offloads (offload)
        and weight / checkpoint copies (h2d) may still be in flight into or out of pinned host
        memory, which must stay registered until they land."""
        try:
            self.streams.synchronize()
            self.worker.wait_all()
        finally:
            self.worker.close()
            self.ckpts.close()

    # ---- the step --------------------------------------------------------------------------------
    def step(self, mbs: list[MicroBatch], lr: float) -> StepStats:
        if self.adapters is not None:
            return self._lora_step(mbs, lr)
        if self.cfg.optim.clip == "previous" and self.prev_norm is None:
            # The first step has no previous norm: it is clipped by its own, found by a pass that
            # only norms the gradients (the step's forward and backward run twice, once per run).
            self.grads.norms_only = True
            try:
                self.prev_norm = self._step(mbs, lr, norms_only=True).grad_norm
            finally:
                self.grads.norms_only = False
        return self._step(mbs, lr)

    def _step(self, mbs: list[MicroBatch], lr: float, norms_only: bool = False) -> StepStats:
        """The full fine-tuning step. optim.clip: global: updates once the step's global norm is
        known (exact). previous: each unit's update is queued as soon as its gradient has landed,
        clipped by the previous step's norm, so the host optimizer overlaps the rest of backward;
        the staging holds two units' gradients, not the model's (store.rotating)."""
        spec, L, head = self.spec, self.L, self.head_unit
        clip = self.cfg.train.grad_clip
        early = self.cfg.optim.clip == "previous" and not norms_only
        if early:
            prev = self.prev_norm
            coef_early = clip_coef(prev, clip) if clip > 0 and math.isfinite(prev) else 1.0
        ropes, masks = self._attention_inputs(mbs)  # per micro-batch: (cos, sin), mask or None
        n_tok = self._loss_tokens(mbs)
        inv_n = 1.0 / max(n_tok, 1)
        if not norms_only:
            self.adam_steps += 1
        self.weights.invalidate()
        h2d0, d2h0 = self.weights.h2d_bytes, self.grads.d2h_bytes  # PCIe bytes of this step: the difference
        aux = self.fns.aux
        if aux is not None:
            aux.begin(mbs)

        # 1-2. Embedding rows, then forward layer-major, keeping each layer's inputs.
        xs = self._forward(mbs, ropes, masks, keep=True)
        self.grads.begin_embed()  # after _forward waited for the embedding's previous update
        labels = [mb.labels.to(self.device, non_blocking=True) for mb in mbs]

        # 3. Head: chunked loss with d(hidden) and head gradients in one pass.
        norm_w, head_w = self._head_views(self.weights.acquire(head))
        self.weights.prefetch(L, keep=head)  # the last layer is normally still resident
        acc_norm, acc_head = self._head_views(self.grads.begin_head())
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        dys = []
        for x, lab in zip(xs, labels):
            loss, dy = head_loss_and_grad(x, lab, norm_w, head_w, spec.rms_norm_eps, inv_n, acc_head, acc_norm,
                                          self.chunk_tokens, **self.fns.head_kw)
            loss_sum += loss
            dys.append(dy)
        del xs
        self.weights.release(head)
        ready = {head: self.grads.finish_head()}  # unit -> event: its gradient is on the host
        if early:
            self._submit(head, ready[head], lr, coef_early)

        # 4. Backward, layer-major in reverse, recomputing each layer from its checkpoint.
        for i in reversed(range(L)):
            u = i + 1
            w = self.weights.acquire(u)
            acc = self.grads.begin(u)
            xs = self.ckpts.take(i)
            self.ckpts.prefetch(i - 1)  # offloaded: the previous layer's inputs come back under this backward
            dys = [layer_backward(x, w, self.units[u], dy, acc, r, spec, m, *self._layer_fn(i, k))
                   for k, (x, dy, r, m) in enumerate(zip(xs, dys, ropes, masks))]
            del xs  # this layer's checkpoints are freed
            self.weights.release(u)
            if i > 0:
                self.weights.prefetch(u - 1, keep=u)  # previous layer on h2d under this backward
            if early and u + 2 < head:
                self.worker.wait(u + 2)  # host wait: the update reading this staging slot is done with it
            ready[u] = self.grads.finish(u, acc)
            if early:
                self._submit(u, ready[u], lr, coef_early)

        # 5. Embedding gradient: scatter-add (on the device, or on the host), normed into norms[0].
        if self.fns.embed_grad is not None:  # e.g. Gemma's embedding scale
            dys = [self.fns.embed_grad(mb.input_ids, dy) for mb, dy in zip(mbs, dys)]
        ready[0] = self.grads.embed_backward([mb.input_ids for mb in mbs], dys)
        if early:
            self._submit(0, ready[0], lr, coef_early)

        # 6. Global norm (sync point: waits for all backward work), then the updates.
        norms = self.grads.norms.cpu()
        if self.comm is None:
            total = float(torch.linalg.vector_norm(norms))
            loss = float(loss_sum) * inv_n  # sync point (already synchronised above)
        else:  # each rank normed its shards: the global norm is the root of the summed squares (each
            # shard is held by one rank per node, so the sum over every rank counts it once per node)
            sq, loss = self.comm.sum(float(norms.double().square().sum()), float(loss_sum))
            total, loss = math.sqrt(sq / self.comm.nodes), loss * inv_n
        if aux is not None:
            loss += aux.value()
        pcie = {"h2d_bytes": self.weights.h2d_bytes - h2d0, "d2h_bytes": self.grads.d2h_bytes - d2h0}
        finite = math.isfinite(loss) and math.isfinite(total)
        if norms_only:
            return StepStats(loss=loss, loss_tokens=n_tok, grad_norm=total, lr=lr, skipped=True, **pcie)
        if early:  # the updates are queued already; a unit whose own gradient is not finite skips its own
            if finite:
                self.prev_norm = total
            return StepStats(loss=loss, loss_tokens=n_tok, grad_norm=total, lr=lr, skipped=not finite, **pcie)
        if not finite:
            self.adam_steps -= 1  # as if the step never happened: bias correction does not advance
            return StepStats(loss=loss, loss_tokens=n_tok, grad_norm=total, lr=lr, skipped=True, **pcie)
        coef = clip_coef(total, clip) if clip > 0 else 1.0
        for u in range(len(self.units)):
            self._submit(u, ready.get(u, DONE), lr, coef)
        return StepStats(loss=loss, loss_tokens=n_tok, grad_norm=total, lr=lr, **pcie)

    def _lora_step(self, mbs: list[MicroBatch], lr: float) -> StepStats:
        """The step over a frozen base: forward, head (d(hidden) only), backward computing input and
        adapter gradients only, then the adapters' AdamW on the device. Nothing is copied to the host
        but the loss and the norm, and nothing is invalidated: the base does not change."""
        spec, L, head, ad = self.spec, self.L, self.head_unit, self.adapters
        ropes, masks = self._attention_inputs(mbs)
        n_tok = self._loss_tokens(mbs)
        inv_n = 1.0 / max(n_tok, 1)
        self.adam_steps += 1  # also keys the dropout masks: the recompute draws the forward's again
        ad.begin_step()
        h2d0 = self.weights.h2d_bytes  # the base's bytes this step copies in; nothing is copied back

        xs = self._forward(mbs, ropes, masks, keep=True)
        labels = [mb.labels.to(self.device, non_blocking=True) for mb in mbs]
        norm_w, head_w = self._head_views(self.weights.acquire(head))  # resident after the first step
        self.weights.prefetch(L, keep=head)
        acc_head = None  # frozen head: d(hidden) only
        if ad.trains("lm_head"):  # lora.train_extra: the trained copy, and its gradient
            head_w, acc_head = ad.head_weight(self.dtype), ad.head_grad()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        dys = []
        for x, lab in zip(xs, labels):
            loss, dy = head_loss_and_grad(x, lab, norm_w, head_w, spec.rms_norm_eps, inv_n, acc_head, None,
                                          self.chunk_tokens, **self.fns.head_kw)
            loss_sum += loss
            dys.append(dy)
        del xs, head_w
        self.weights.release(head)

        need_embed = ad.trains("embed_tokens")  # layer 0's input gradient is then needed
        for i in reversed(range(L)):
            u = i + 1
            w = self.weights.acquire(u)
            xs = self.ckpts.take(i)
            self.ckpts.prefetch(i - 1)
            new = []
            for k, (x, dy, r, m) in enumerate(zip(xs, dys, ropes, masks)):
                dx, g = lora_layer_backward(x, w, self.units[u], dy, self._lora(i, k, x, train=True, grad=True),
                                            r, spec, m, need_dx=i > 0 or need_embed)
                ad.add_grads(i, g)  # fp32, summed over the step's micro-batches on the device
                new.append(dx)
            dys = new
            del xs
            self.weights.release(u)
            if i > 0:
                self.weights.prefetch(u - 1, keep=u)
        if need_embed:
            for mb, dy in zip(mbs, dys):
                if self.fns.embed_grad is not None:
                    dy = self.fns.embed_grad(mb.input_ids, dy)
                ad.embed_backward(mb.input_ids, dy)  # scatter-add on the device

        if self.comm is not None:
            self.comm.all_reduce(ad.grad)  # replicated adapters: every rank applies the summed gradient
            loss_sum = torch.tensor(self.comm.sum(float(loss_sum))[0])
        total = float(ad.grad_norm())  # sync point: waits for all backward work
        loss = float(loss_sum) * inv_n
        pcie = {"h2d_bytes": self.weights.h2d_bytes - h2d0, "d2h_bytes": 0}
        if not (math.isfinite(loss) and math.isfinite(total)):
            self.adam_steps -= 1
            return StepStats(loss=loss, loss_tokens=n_tok, grad_norm=total, lr=lr, skipped=True, **pcie)
        clip = self.cfg.train.grad_clip
        o = self.cfg.optim
        ad.adamw(lr=lr, beta1=o.betas[0], beta2=o.betas[1], eps=o.eps, weight_decay=self.cfg.train.weight_decay,
                 step=self.adam_steps, grad_scale=clip_coef(total, clip) if clip > 0 else 1.0)
        return StepStats(loss=loss, loss_tokens=n_tok, grad_norm=total, lr=lr, **pcie)

    def _loss_tokens(self, mbs: list[MicroBatch]) -> int:
        """Tokens that carry a loss in the step (every rank's): the loss is their mean."""
        n = int(sum(int((mb.labels != IGNORE).sum()) for mb in mbs))  # host tensors: no sync
        return n if self.comm is None else int(self.comm.sum(n)[0])

    def _lora(self, i: int, k: int, x: torch.Tensor, train: bool, grad: bool = False) -> dict[str, Adapter]:
        """Layer i's adapters for micro-batch k (input x), with its dropout masks when training."""
        ad = self.adapters
        drop_for = None
        if train and ad.dropout > 0:
            B, S = x.shape[:2]

            def drop_for(s):
                return ad.dropout_mask(self.adam_steps, i, k, s.key, (B, S, s.a_shape[1]), self.dtype)
        return ad.layer(i, self.dtype, drop_for=drop_for, grad=grad)

    def _lora_kw(self, i: int, k: int, x: torch.Tensor, train: bool) -> dict:
        return {} if self.adapters is None else {"lora": self._lora(i, k, x, train)}

    def _layer_fn(self, i: int, k: int) -> tuple:
        """(layer, extra) for layer_backward: None, None on the native path (model/llama.py's block)."""
        if isinstance(self.fns, NativeModel):
            if self.fns.block is block:
                return None, None
            return (lambda x, w, r, m: self.fns.block(x, w, r, self.spec, m)), None  # engine.compile
        aux = self.fns.aux
        return ((lambda x, w, r, m: self.fns.layer(i, x, w, r, m)),
                None if aux is None else (lambda: aux.term(i, k)))

    @torch.no_grad()
    def _forward(self, mbs: list[MicroBatch], ropes, masks, keep: bool = False) -> list[torch.Tensor]:
        """Embedding rows, then layers 0..L-1 layer-major (every micro-batch passes layer i before
        layer i+1); with `keep` (training), each layer's inputs go to self.ckpts and adapters apply
        their dropout. Returns the last hidden states."""
        if self.adapters is not None and self.adapters.trains("embed_tokens"):  # lora.train_extra: the trained
            # copy's rows, gathered on the device (the frozen table is not read)
            xs = [self.adapters.embed_rows(mb.input_ids, self.dtype) for mb in mbs]
        else:
            xs = self.weights.embed_rows([mb.input_ids for mb in mbs])  # waits for the embedding's pending update
        if self.fns.embed is not None:  # e.g. Gemma's sqrt(hidden) scale
            xs = [self.fns.embed(x) for x in xs]
        aux = self.fns.aux if keep and self.adapters is None else None
        if keep:
            self.ckpts.begin(self.L, xs)
        for i in range(self.L):
            u = i + 1
            views = self.units[u].views(self.weights.acquire(u))
            if keep:
                self.ckpts.save(i, xs)  # layer-boundary checkpoint: kept on the device, or offloaded
            ys = []
            for k, (x, r, m) in enumerate(zip(xs, ropes, masks)):
                ys.append(self.fns.layer(i, x, views, r, m, **self._lora_kw(i, k, x, keep)))  # compute stream
                if aux is not None:
                    aux.forward(i, k)  # the router's statistics of this layer and micro-batch
            xs = ys
            self.weights.release(u)
            # Next layer (or the head) on h2d under this layer's compute. Issued after the compute
            # is queued: the host may block here until the optimizer has updated it.
            self.weights.prefetch(u + 1, keep=u)
        return xs

    def _head_views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final norm, lm_head (V, H)) views of a device head buffer laid out [lm_head | norm]."""
        nv = self.weights.n_vocab_w
        return flat[nv:], flat[:nv].view(self.spec.vocab_size, self.spec.hidden_size)

    def _attention_inputs(self, mbs: list[MicroBatch]):
        """Positions (RoPE tables) and attention masks per micro-batch, as the model takes them."""
        return self.fns.attention_inputs(mbs)

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, mbs: list[MicroBatch]) -> tuple[float, int]:
        """(token-mean loss, loss tokens) of a forward-only, layer-major pass over `mbs`, streaming
        the weights as a step does (and waiting, unit by unit, for pending updates)."""
        ropes, masks = self._attention_inputs(mbs)
        n_tok = int(sum(int((mb.labels != IGNORE).sum()) for mb in mbs))
        frozen = self.adapters is not None  # a frozen base: what is resident stays valid (as _lora_step keeps it)
        if not frozen:
            self.weights.invalidate()
        xs = self._forward(mbs, ropes, masks)
        norm_w, head_w = self._head_views(self.weights.acquire(self.head_unit))
        if self.adapters is not None and self.adapters.trains("lm_head"):
            head_w = self.adapters.head_weight(self.dtype)
        total = sum(head_loss(x, mb.labels.to(self.device), norm_w, head_w, self.spec.rms_norm_eps, self.chunk_tokens,
                              **self.fns.head_kw) for x, mb in zip(xs, mbs))
        self.weights.release(self.head_unit)
        if not frozen:
            self.weights.invalidate()
        return float(total) / max(n_tok, 1), n_tok  # sync point

    # ---- optimizer -------------------------------------------------------------------------------
    def _submit(self, u: int, ready, lr: float, coef: float) -> None:
        t, o = self.cfg.train, self.cfg.optim
        hyper = AdamWHyper(lr=lr, beta1=o.betas[0], beta2=o.betas[1], eps=o.eps, weight_decay=t.weight_decay,
                           step=self.adam_steps, grad_scale=coef)
        self.worker.submit(u, ready, hyper)

    def _update_unit(self, u: int, hyper: AdamWHyper) -> None:
        """Runs on the optimizer thread: one fused pass over unit u's host buffers (csrc/adamw.cpp)
        reads the staged gradient, updates weights and moments, writes the bf16 working copy."""
        s = self.store
        if self.cfg.optim.clip == "previous" and not math.isfinite(float(self.grads.norms_host[u])):
            return  # optim.clip: previous: a non-finite gradient skips its unit (the others are updated)
        m, v, m_scale, v_scale = s.states_of(u)
        separate_working = s.master is not None and s.working is not s.master
        ops.adamw_step(s.weights_of(u), s.grad_of(u), m, v, m_scale, v_scale,
                       s.working_of(u) if separate_working else None, n_decay=s.units[u].n_decay,
                       lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
                       weight_decay=hyper.weight_decay, step=hyper.step, grad_scale=hyper.grad_scale,
                       key=sr_key(self.cfg.train.seed, hyper.step, u, getattr(s, "shard_rank", 0)))
