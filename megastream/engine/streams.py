"""CUDA streams and events, or their no-op stand-ins on the CPU.

Four streams take part in a step:
  compute  the default stream: layer math, gradient accumulation, casts
  h2d      weight copies host -> device (prefetch of the next unit)
  d2h      gradient copies device -> host (one per unit per step)
  offload  layer-boundary checkpoints device -> host in forward (engine.activations: host)
On the CPU every copy is synchronous, so events are always complete and waits do nothing; the
engine's code path is otherwise identical.
"""

from __future__ import annotations

import contextlib

import torch


class _DoneEvent:
    """A CPU stand-in for torch.cuda.Event: already complete."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


DONE = _DoneEvent()


class Streams:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)
            self.offload = torch.cuda.Stream(device)
        else:
            self.compute = self.h2d = self.d2h = self.offload = None

    def record(self, stream) -> "torch.cuda.Event | _DoneEvent":
        """An event marking all work queued so far on `stream`."""
        if not self.cuda:
            return DONE
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def wait(self, stream, event) -> None:
        """Make `stream` wait (on the device, not the host) for `event`."""
        if self.cuda and event is not None and event is not DONE:
            stream.wait_event(event)

    def synchronize(self) -> None:
        """Host waits until everything queued on the four streams has finished: before the host
        memory those copies read or write is unregistered (cudaHostUnregister) or freed."""
        if self.cuda:
            for stream in (self.h2d, self.d2h, self.offload, self.compute):
                stream.synchronize()

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()
