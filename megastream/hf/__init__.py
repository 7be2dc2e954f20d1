"""The generic path (`model.implementation: hf`): any decoder-only `transformers` model, streamed one
layer at a time like the native families, its layers being the `transformers` modules themselves.

    spec_from_dir(path)        config.json + checkpoint names -> ModelSpec (implementation "hf")
    HFModel(spec, device, dt)  the engine's model functions: layers, positions, masks, embedding, head, aux loss
    meta_model(config)         the causal LM with parameters on the meta device, checked streamable

`unit.py` (the meta-device module and the functional layer call), `model.py` (what the model's
forward does around its layers), `names.py` (checkpoint names <-> parameters: MoE experts),
`spec.py`. transformers is imported only here, and only when a model takes this path.
"""

from megastream.hf.model import HFModel
from megastream.hf.spec import spec_from_config, spec_from_dir
from megastream.hf.unit import meta_model

__all__ = ["HFModel", "meta_model", "spec_from_config", "spec_from_dir"]
