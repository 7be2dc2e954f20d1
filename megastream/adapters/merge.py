"""lora.merge over a quantized base: the merged model built from the original checkpoint.

With lora.base_dtype int8 or nf4 the host holds each layer's projections quantized, so the weights a
merge must start from are not in memory. They are still on disk, in model.path: as save_hf writes
merged/, each tensor is read again from the source safetensors (pread, one tensor at a time), the
adapter's scale * B @ A added in fp32 for an adapted projection (or the trained copy put in place of a
module in lora.train_extra), and the sum rounded once to the output dtype in save_hf's cast chunks.
The merged model is then what peft's merge_and_unload gives on the original model, not a merge into
the dequantized base. Peak host memory: the largest tensor as read, plus, for a projection, its fp32
sum and the fp32 delta (memory.py counts both).

The source must be the files the run loaded: their sizes and modification times are compared with
those recorded at load, and a directory that changed is refused (final/, the adapter, is already
written by then, and peft merges it onto whatever base the user chooses).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megastream.adapters.lora import LoraAdapters
from megastream.checkpoint import SafetensorsReader, files_stamp
from megastream.errors import CheckpointError


class SourceMerge:
    """save_hf's tensor source for merged/: `tensor_of(u, entry)` is the merged tensor, flat."""

    def __init__(self, adapters: LoraAdapters, model_dir: str | Path, stamp: tuple):
        model_dir = Path(model_dir)
        if files_stamp(model_dir) != stamp:
            raise CheckpointError(
                f"lora.merge: the weight files in {model_dir} changed since this run loaded them, so they may not be "
                "the base the adapter was trained on; merged/ was not written. final/ holds the adapter: merge it "
                "onto the original model with peft (PeftModel.from_pretrained(base, final).merge_and_unload())")
        self.adapters = adapters
        self.reader = SafetensorsReader(model_dir)

    def tensor_of(self, u: int, e) -> torch.Tensor:
        return self.adapters.merged_weight(u, e.key, lambda: self._read(e))

    def _read(self, e) -> torch.Tensor:
        w = self.reader.read(e.hf_name)  # the source's dtype; a fresh buffer, so the merge may sum into it
        if tuple(w.shape) != tuple(e.shape):
            raise CheckpointError(f"lora.merge: tensor {e.hf_name!r} has shape {tuple(w.shape)} in the source "
                                  f"files, the model {tuple(e.shape)}; merged/ was not written")
        return w
