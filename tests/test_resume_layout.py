"""A checkpoint's optimizer state is flat per unit, so it resumes only onto the parameter layout it
was written for (the native and the generic path order some parameters differently)."""

import dataclasses

import pytest
import torch

from megastream.errors import CheckpointError
from megastream.model.layout import Entry, model_layout
from megastream.presets import PRESETS
from megastream.resume import read_training_state, write_training_state
from megastream.store import HostStore


def _store(units):
    return HostStore(units, torch.float32, torch.float32, pin=False)


def _reordered(units):
    """The same parameters with a layer's first two entries swapped (offsets follow the order)."""
    out = list(units)
    u = out[1]
    entries = [u.entries[1], u.entries[0], *u.entries[2:]]
    off, moved = 0, []
    for e in entries:
        moved.append(Entry(e.key, e.hf_name, e.shape, off))
        off += e.numel
    out[1] = dataclasses.replace(u, entries=tuple(moved))
    return out


def test_resume_refuses_another_parameter_layout(tmp_path):
    units = model_layout(PRESETS["tiny"])
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    write_training_state(ckpt, _store(units), step=1, adam_steps=1,
                         config={"model": {"implementation": "native"}})
    read_training_state(ckpt, _store(units))  # the same layout resumes
    with pytest.raises(CheckpointError) as e:
        read_training_state(ckpt, _store(_reordered(units)))
    assert "model.implementation" in str(e.value) and "'native'" in str(e.value)
