"""LoRA adapters over a frozen, streamed base: their parameters, gradients and AdamW, on the device.

Each targeted projection W (out, in) of each layer gets A (r, in) and B (out, r); the layer computes
y = x W^T + scale * (drop(x) A^T) B^T (megastream.model.llama.linear), scale = alpha / r (or
alpha / sqrt(r) with rslora). Every A and B lives in one flat fp32 device buffer, in layer order
(layer 0's targets in layout order, A then B, then layer 1's, ...), beside flat fp32 buffers of the
same size for the gradient and the two AdamW moments: 16 B per adapter parameter on the device,
nothing on the host, nothing over PCIe. The engine binds each layer's slices into the model
function (cast to the compute dtype) and adds their gradients into `grad`, fp32, across the
micro-batches of a step; the update is one AdamW pass over the flat buffers, done on the device
after the global norm is known (clipping needs it), exactly as torch.optim.AdamW (single-tensor
path) with decoupled weight decay on every adapter parameter (all are matrices).

With lora.train_extra, whole modules are trained beside the adapters (PEFT's `modules_to_save`): the
input embedding and / or the output head, each a (V, H) fp32 copy of the base's weight appended to the
same flat buffers (so the same norm, clipping, AdamW, checkpoint and resume cover them: 16 B per
parameter on the device). The forward gathers embedding rows from the trained copy on the device and
the head computes its weight gradient into it; the frozen base in the host store is left as it was.
With tied embeddings each named module gets its own copy, as PEFT does (the tie is broken; the one
not named stays the frozen base weight).

Dropout (training only) is a mask on the input of A, one per (step, layer, micro-batch, target),
drawn from a generator seeded by those numbers: the backward recompute draws the same mask again
instead of keeping it, and a resumed run draws what the straight run drew.

A LoRA training checkpoint (output.dir/checkpoint-<step>/) is a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors, loadable as is) plus
  lora_state.safetensors  the flat fp32 parameters and AdamW moments, exactly
  rng_state.safetensors   the torch RNG state
  trainer_state.json      completed steps, AdamW step count, the adapter's shape, the config
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megastream.adapters.peft_io import EXTRA_MODULES
from megastream.checkpoint import check_finite, write_safetensors
from megastream.errors import CheckpointError
from megastream.model.layout import layer_layout
from megastream.model.llama import Adapter
from megastream.model.spec import ModelSpec

EXTRA = tuple(EXTRA_MODULES)  # what lora.train_extra may name, in buffer order: embed_tokens, lm_head
_CHUNK = 1 << 24  # elements per AdamW pass: bounds the temporaries of a large adapter set


@dataclass(frozen=True)
class Slot:
    """One adapted projection: where its A and B sit in the flat buffers."""
    layer: int
    key: str  # the model function's name of the projection ("q", ..., "down")
    module: str  # Hugging Face module path, "model.layers.0.self_attn.q_proj"
    a_shape: tuple[int, int]  # (r, in)
    b_shape: tuple[int, int]  # (out, r)
    offset: int  # A at [offset, offset + r*in), B right after

    @property
    def a_numel(self) -> int:
        return self.a_shape[0] * self.a_shape[1]

    @property
    def numel(self) -> int:
        return self.a_numel + self.b_shape[0] * self.b_shape[1]


def lora_slots(spec: ModelSpec, targets: tuple[str, ...], rank: int) -> list[Slot]:
    """The adapted projections of every layer, from the one weight-name map (model/layout.py):
    a target is a projection whose HF module name ends in it ("q_proj", ...)."""
    slots, offset = [], 0
    for i in range(spec.num_layers):
        for e in layer_layout(spec, i).entries:
            module = e.hf_name.removesuffix(".weight")
            if e.decay and module.rpartition(".")[2] in targets:
                out_f, in_f = e.shape
                slots.append(Slot(i, e.key, module, (rank, in_f), (out_f, rank), offset))
                offset += slots[-1].numel
    return slots


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoraAdapters:
    def __init__(self, spec: ModelSpec, targets: tuple[str, ...], *, rank: int, alpha: float, dropout: float,
                 rslora: bool, device: torch.device, seed: int, extra: tuple[str, ...] = ()):
        self.spec = spec
        self.targets = tuple(targets)
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.rslora = rslora
        self.scale = lora_scale(alpha, rank, rslora)
        self.drop_threshold = round(dropout * 65536)  # of 65536: dropout in 16-bit steps
        self.keep_scale = 65536 / (65536 - self.drop_threshold)
        self.device = device
        self.seed = seed
        self.slots = lora_slots(spec, self.targets, rank)
        if not self.slots:
            raise ValueError(f"LoraAdapters: no projection of {spec.architecture} matches targets {self.targets}")
        self.by_layer: dict[int, list[Slot]] = {}
        for s in self.slots:
            self.by_layer.setdefault(s.layer, []).append(s)
        self.n_adapter = self.slots[-1].offset + self.slots[-1].numel
        # lora.train_extra: whole (V, H) weights after the adapters, in EXTRA order
        self.extra = tuple(m for m in EXTRA if m in extra)
        self.extra_offsets, offset = {}, self.n_adapter
        for m in self.extra:
            self.extra_offsets[m] = offset
            offset += spec.vocab_size * spec.hidden_size
        self.numel = offset
        # 4 x 4 B per adapter parameter, on the device.
        self.params = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.grad = torch.zeros_like(self.params)
        self.exp_avg = torch.zeros_like(self.params)
        self.exp_avg_sq = torch.zeros_like(self.params)

    # ---- views -----------------------------------------------------------------------------------
    def _ab(self, flat: torch.Tensor, s: Slot) -> tuple[torch.Tensor, torch.Tensor]:
        a = flat[s.offset:s.offset + s.a_numel].view(s.a_shape)
        b = flat[s.offset + s.a_numel:s.offset + s.numel].view(s.b_shape)
        return a, b

    def _extra(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The (V, H) view of a module trained in full (lora.train_extra) in a flat buffer."""
        V, H = self.spec.vocab_size, self.spec.hidden_size
        lo = self.extra_offsets[name]
        return flat[lo:lo + V * H].view(V, H)

    def trains(self, name: str) -> bool:
        """Whether `name` (embed_tokens, lm_head) is trained in full (lora.train_extra)."""
        return name in self.extra_offsets

    def nbytes(self) -> int:
        """Device bytes of parameters, gradients and moments."""
        return 4 * 4 * self.numel

    # ---- initialisation and I/O ------------------------------------------------------------------
    def init_default(self) -> None:
        """PEFT's default init: A kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero.
        Drawn on the host from one generator seeded by train.seed, in slot order: the same values on
        every device."""
        g = torch.Generator().manual_seed(self.seed)
        host = torch.zeros(self.n_adapter, dtype=torch.float32)
        for s in self.slots:
            a, _ = self._ab(host, s)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        self.params[:self.n_adapter].copy_(host)  # H2D: 4 B per adapter parameter, once

    def init_extra(self, store) -> None:
        """The modules trained in full start as the base's weights (PEFT's modules_to_save copies the
        module), read from the host store; with tied embeddings both start from the one table."""
        head_u = len(store.units) - 1
        for m in self.extra:
            if m == "embed_tokens" or self.spec.tie_word_embeddings:
                src = store.working_of(0)
            else:
                src = store.units[head_u].views(store.working_of(head_u))["lm_head"]
            self._extra(self.params, m).copy_(src.view(self.spec.vocab_size, self.spec.hidden_size))  # H2D, once

    def load(self, tensors: dict[str, torch.Tensor], source: str = "lora.init") -> None:
        """Fill from tensors keyed "<module path>.lora_A" / ".lora_B" (peft_io.load_adapter's output)."""
        host = torch.zeros(self.numel, dtype=torch.float32)
        want = set()
        for s in self.slots:
            for name, view in zip((".lora_A", ".lora_B"), self._ab(host, s)):
                key = s.module + name
                want.add(key)
                t = tensors.get(key)
                if t is None:
                    raise CheckpointError(f"{source}: no tensor for {key}; the adapter does not match lora.rank / "
                                          "lora.target_modules and the model")
                if tuple(t.shape) != tuple(view.shape):
                    raise CheckpointError(f"{source}: {key} has shape {tuple(t.shape)}, this model and lora.rank "
                                          f"need {tuple(view.shape)}")
                view.copy_(t)
        extra = sorted(k for k in tensors if k not in want and (k.endswith(".lora_A") or k.endswith(".lora_B")))
        if extra:
            raise CheckpointError(f"{source}: adapts {extra[0]}, which lora.target_modules does not name")
        for m, path in EXTRA_MODULES.items():
            t = tensors.get(path)
            if self.trains(m) != (t is not None):
                raise CheckpointError(f"{source}: " + (f"has no {path} weight (modules_to_save), and lora.train_extra "
                                                       f"names {m}" if t is None else f"also trains {m} in full "
                                                       "(modules_to_save), and lora.train_extra does not name it")
                                      + f"; set lora.train_extra to the modules the adapter trains")
            if t is not None:
                view = self._extra(host, m)
                if tuple(t.shape) != tuple(view.shape):
                    raise CheckpointError(f"{source}: {path} has shape {tuple(t.shape)}, this model needs "
                                          f"{tuple(view.shape)}")
                view.copy_(t)
        self.params.copy_(host)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Host copies keyed as peft_io.save_adapter takes them: "<module path>.lora_A" / ".lora_B"."""
        host = self.params.cpu()  # D2H: 4 B per adapter parameter (sync point)
        out = {}
        for s in self.slots:
            a, b = self._ab(host, s)
            out[s.module + ".lora_A"], out[s.module + ".lora_B"] = a, b
        for m in self.extra:
            out[EXTRA_MODULES[m]] = self._extra(host, m)
        return out

    def delta(self, s: Slot) -> torch.Tensor:
        """scale * B @ A (out, in) in fp32 on the host: what merging adds to the base weight."""
        a, b = self._ab(self.params, s)
        return (b @ a).mul_(self.scale).cpu()

    @torch.no_grad()
    def merged_weight(self, u: int, key: str, read: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Checkpoint tensor `key` of unit u (0: the embedding, 1..L: the layers, L+1: the head) as
        the merged model holds it, flat on the host, from the base's tensor `read()` gives: that plus
        scale * B @ A summed in fp32 for an adapted projection (in the read buffer when it is fp32), the
        trained copy for a module in lora.train_extra (the base's is not read), else the base's."""
        head = {0: ("embed", "embed_tokens"), self.spec.num_layers + 1: ("lm_head", "lm_head")}.get(u)
        if head is not None and head[0] == key and self.trains(head[1]):
            return self._extra(self.params, head[1]).reshape(-1).cpu()  # D2H: 4 B a parameter
        w = read().reshape(-1)
        s = next((s for s in self.by_layer.get(u - 1, ()) if s.key == key), None)
        return w if s is None else w.float().add_(self.delta(s).view(-1))

    @torch.no_grad()
    def merge_into(self, store) -> None:
        """W += scale * B @ A for every adapted projection, in the host store's weights (fp32 sum,
        rounded once to the store's dtype): the base becomes the merged model. Ends training."""
        if self.extra and self.spec.tie_word_embeddings:
            raise ValueError("merge_into: a tied model with modules trained in full has no single merged table")
        for s in self.slots:
            u = s.layer + 1
            e = next(e for e in store.full_units[u].entries if e.key == s.key)
            lo, hi = store.unit_range(u)  # a sharded store (megastream.dist) merges into its slice
            a, b = max(lo, e.offset), min(hi, e.offset + e.numel)
            if a < b:
                w = store.weights_of(u)[a - lo:b - lo]
                w.copy_(w.float() + self.delta(s).view(-1)[a - e.offset:b - e.offset])
        head_u = len(store.full_units) - 1
        for m in self.extra:  # the trained copies replace the base's weights, rounded once to its dtype
            u, key = (0, "embed") if m == "embed_tokens" else (head_u, "lm_head")
            e = next(e for e in store.full_units[u].entries if e.key == key)
            lo, hi = store.unit_range(u)
            a, b = max(lo, e.offset), min(hi, e.offset + e.numel)
            if a < b:
                trained = self._extra(self.params, m).view(-1)
                store.weights_of(u)[a - lo:b - lo].copy_(trained[a - e.offset:b - e.offset])
        store.sync_working()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact training state (host copies): parameters and AdamW moments, flat fp32."""
        return {"params": self.params.cpu(), "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        for name in ("params", "exp_avg", "exp_avg_sq"):
            t, dst = state.get(name), getattr(self, name)
            if t is None or t.shape != dst.shape or t.dtype != dst.dtype:
                got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise CheckpointError(f"{source}: {name} is {got}, expected {dst.dtype} {tuple(dst.shape)}; the "
                                      "checkpoint was written with another lora.rank / lora.target_modules or model")
            dst.copy_(t)

    # ---- the step --------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self.grad.zero_()

    def dropout_mask(self, step: int, layer: int, mb: int, key: str, shape: tuple[int, ...],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Which inputs of A dropout keeps (1 kept, 0 dropped, in `dtype`, `shape`) for one (step,
        layer, micro-batch, projection), the same every time it is asked for. The drop probability is
        lora.dropout rounded to a multiple of 1/65536 (`drop_threshold`); kept inputs are scaled by
        `keep_scale`, the inverse of the rounded keep probability. The mask is made in the compute
        dtype, as the multiplier it is: on a CPU the comparison writing it and the multiply (forward
        and backward) each run ~3x faster than with a bool mask."""
        g = torch.Generator(device=self.device).manual_seed(
            zlib.crc32(f"{self.seed}:{step}:{layer}:{mb}:{key}".encode()))
        # 16 random bits per element, four to each 64-bit draw: a quarter of the generator calls of
        # torch.rand (the CPU generator is serial, and ~10 ns a call made masks a quarter of a step).
        n = math.prod(shape)
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=self.device).random_(-2**63, None, generator=g)
        keep = torch.empty(shape, dtype=dtype, device=self.device)
        # P(drop) = threshold / 65536
        return torch.ge(words.view(torch.int16)[:n].view(shape), self.drop_threshold - 32768, out=keep)

    def layer(self, i: int, dtype: torch.dtype, *, drop_for=None, grad: bool = False) -> dict[str, Adapter]:
        """Layer i's adapters for the model function, in the compute dtype. With `grad`, A and B are
        fresh leaves that require grad (for the backward recompute). `drop_for(slot)` gives the slot's
        dropout keep mask (None: no dropout)."""
        out = {}
        for s in self.by_layer.get(i, ()):
            a, b = (t.to(dtype) for t in self._ab(self.params, s))  # no copy in fp32
            if grad:
                a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
            if drop_for is None:
                out[s.key] = Adapter(a, b, self.scale)
            else:
                out[s.key] = Adapter(a, b, self.scale, drop_for(s), self.keep_scale)
        return out

    def embed_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """ids (B, S) -> (B, S, H) rows of the trained embedding, gathered on the device, in `dtype`."""
        return self._extra(self.params, "embed_tokens")[ids.to(self.device, non_blocking=True)].to(dtype)

    def embed_backward(self, ids: torch.Tensor, dy: torch.Tensor) -> None:
        """Scatter-add d(embedding rows) (B, S, H) into the trained embedding's fp32 gradient."""
        flat = ids.reshape(-1).to(self.device, non_blocking=True)
        self._extra(self.grad, "embed_tokens").index_add_(0, flat, dy.reshape(flat.numel(), -1).float())

    def head_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The trained lm_head (V, H) in `dtype` (no copy in fp32)."""
        return self._extra(self.params, "lm_head").to(dtype)

    def head_grad(self) -> torch.Tensor:
        """The trained lm_head's fp32 gradient (V, H), accumulated by the chunked head loss."""
        return self._extra(self.grad, "lm_head")

    def add_grads(self, i: int, grads: list[torch.Tensor]) -> None:
        """Add layer i's (dA, dB, dA, dB, ...) in `layer` order into the fp32 gradient."""
        for s, ga, gb in zip(self.by_layer.get(i, ()), grads[0::2], grads[1::2]):
            a, b = self._ab(self.grad, s)
            a.add_(ga)
            b.add_(gb)

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of every adapter gradient (a device scalar, no sync)."""
        return torch.linalg.vector_norm(self.grad)

    @torch.no_grad()
    def adamw(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
              grad_scale: float = 1.0) -> None:
        """One AdamW update of every adapter, as torch.optim.AdamW computes it (clipping first, as
        clip_grad_norm_ scales the gradients). `step` is the 1-based update count."""
        if grad_scale != 1.0:
            self.grad.mul_(grad_scale)
        bc1 = 1 - beta1 ** step
        bc2_sqrt = math.sqrt(1 - beta2 ** step)
        for lo in range(0, self.numel, _CHUNK):
            p, g = self.params[lo:lo + _CHUNK], self.grad[lo:lo + _CHUNK]
            m, v = self.exp_avg[lo:lo + _CHUNK], self.exp_avg_sq[lo:lo + _CHUNK]
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-(lr / bc1))


# ---- training checkpoints ------------------------------------------------------------------------
STATE_FILE = "trainer_state.json"  # the name megastream.resume looks for
LORA_STATE_FILE = "lora_state.safetensors"
RNG_FILE = "rng_state.safetensors"


def _shape(ad: LoraAdapters) -> dict:
    out = {"rank": ad.rank, "targets": list(ad.targets), "numel": ad.numel}
    if ad.extra:  # absent without lora.train_extra, as in checkpoints written before it existed
        out["train_extra"] = list(ad.extra)
    return out


def lora_state_bytes(ad: LoraAdapters) -> int:
    """Bytes write_lora_state adds to a checkpoint beside the adapter itself."""
    return 3 * 4 * ad.numel + (1 << 16)


def write_lora_state(tmp: Path, ad: LoraAdapters, *, step: int, adam_steps: int, config: dict) -> None:
    """Add the exact training state to a checkpoint directory being written (the adapter is there)."""
    st = ad.state_dict()  # D2H: 12 B per adapter parameter (sync point)
    write_safetensors(tmp / LORA_STATE_FILE, [(k, t, tuple(t.shape)) for k, t in st.items()], finite=True)
    save_file({"rng_state": torch.get_rng_state()}, str(tmp / RNG_FILE))
    state = {"step": step, "adam_steps": adam_steps, "lora": _shape(ad), "config": config}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_lora_state(path: Path, ad: LoraAdapters) -> dict:
    """Load a LoRA checkpoint's exact state into `ad` (and the torch RNG); returns trainer_state.json."""
    state_path, f = path / STATE_FILE, path / LORA_STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a resumable checkpoint (it needs {STATE_FILE}); pass a "
                              "checkpoint-<step> directory written by megastream train") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_path}: not valid JSON ({e}); the checkpoint is damaged, resume from an "
                              "earlier one") from None
    if "lora" not in state:
        raise CheckpointError(f"{path} was written by a full fine-tuning run (no lora section in {STATE_FILE}); "
                              "resume it without a lora: section, or start the LoRA run in a new output.dir")
    if state["lora"] != _shape(ad):
        raise CheckpointError(f"{path} holds an adapter of {state['lora']}, but the config asks for {_shape(ad)}; "
                              "set lora.rank / lora.target_modules / lora.train_extra as the checkpoint has them to "
                              "resume it")
    try:
        with safe_open(str(f), framework="pt") as sf:
            tensors = {}
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
                check_finite(tensors[k], k, f)
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(f"{f}: cannot read ({e}); the checkpoint is incomplete or corrupt, resume from an "
                              "earlier one") from None
    ad.load_state_dict(tensors, str(f))
    if (path / RNG_FILE).is_file():
        with safe_open(str(path / RNG_FILE), framework="pt") as sf:
            torch.set_rng_state(sf.get_tensor("rng_state"))
    return state
