"""Adapters over a streamed, frozen base model (issue 15: LoRA / QLoRA).

- quant.py: the quantized frozen base: per-channel int8 and QLoRA NF4 (64-element blocks, absmaxes
  double-quantized to int8 per 256 blocks), packed as one flat byte buffer per weight for streaming,
  dequantized on the device right before the matmul.
- peft_io.py: reading and writing PEFT adapter checkpoints.
- lora.py: the LoRA layers trained over the frozen base.
- merge.py: lora.merge over a quantized base, from the original weights read again from model.path.
"""
