"""The host optimizer's schedule and plumbing: the learning-rate schedule, the clipping factor,
and a worker thread that runs unit updates while the device keeps going. The update itself is
`megastream.ops.adamw_step` (csrc/adamw.cpp, with a pure-PyTorch fallback): AdamW with decoupled
weight decay over the unit's 2-D weights, which the layout puts first.
"""

from __future__ import annotations

import math
import queue
import threading
import zlib
from dataclasses import dataclass

import torch

from megastream.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    if t.schedule == "linear":
        return t.lr - (t.lr - t.min_lr) * progress
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_coef(total_norm: float, max_norm: float) -> float:
    """The factor `torch.nn.utils.clip_grad_norm_` multiplies gradients by (1.0 when disabled)."""
    if max_norm <= 0:
        return 1.0
    coef = torch.tensor(max_norm, dtype=torch.float32) / (torch.tensor(total_norm, dtype=torch.float32) + 1e-6)
    return float(coef.clamp(max=1.0))


@dataclass(frozen=True)
class AdamWHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int  # 1-based count of updates, for bias correction
    grad_scale: float = 1.0  # clipping coefficient


def sr_key(seed: int, step: int, unit: int, shard: int = 0) -> int:
    """32-bit key for stochastic rounding of one unit's update: a function of (seed, step, unit)
    only, so runs reproduce whatever the threading; and of the shard (megastream.dist), so that
    ranks do not round their slices with the same stream."""
    return zlib.crc32(f"{seed}:{step}:{unit}".encode() + (f":{shard}".encode() if shard else b""))


class OptimizerWorker:
    """Runs `update(unit, hyper)` on a background thread, in submission order.

    `wait(u)` blocks until the last submitted update of unit u has finished (immediately if none
    is pending); the weight streamer calls it before copying a unit to the device, so the next
    step's forward proceeds layer by layer as updates land. Torch ops release the GIL, so updates
    run in parallel with the main thread's device work.

    `threads` sizes the OpenMP team of the updates (engine.threads; 0: the creating thread's
    torch.get_num_threads()). OpenMP's team size is per thread: a new thread starts from the
    process default (every core, or OMP_NUM_THREADS), whatever the main thread set, and the C++
    op's parallel regions would take every core from the data loader and the main thread.
    """

    def __init__(self, update, threads: int = 0):
        self._update = update
        self.threads = threads or torch.get_num_threads()
        if self.threads < 1:  # checked here: a failure on the worker thread would leave wait() hanging
            raise ValueError(f"OptimizerWorker: threads must be >= 0 (0 = torch's default), got {threads}")
        self._q: queue.Queue = queue.Queue()
        self._done: dict[int, threading.Event] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="megastream-optimizer", daemon=True)
        self._thread.start()

    def submit(self, u: int, ready, hyper: AdamWHyper) -> None:
        """Queue an update of unit u once `ready` (the D2H copy of its gradient) has completed."""
        ev = threading.Event()
        self._done[u] = ev
        self._q.put((u, ready, hyper, ev))

    def wait(self, u: int) -> None:
        ev = self._done.get(u)
        if ev is not None:
            ev.wait()
        if self._error is not None:
            raise RuntimeError("the optimizer thread failed") from self._error

    def wait_all(self) -> None:
        for u in list(self._done):
            self.wait(u)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's OpenMP team (and MKL's), before any update
        while True:
            item = self._q.get()
            if item is None:
                return
            u, ready, hyper, ev = item
            try:
                if self._error is None:
                    ready.synchronize()  # host wait for the gradient copy (GIL released)
                    self._update(u, hyper)
            except BaseException as e:  # surfaced to the main thread by wait()
                self._error = e
            finally:
                ev.set()
