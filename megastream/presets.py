"""Named model shapes for random-init runs (`model.preset`): the real architectures' config.json
values, so a benchmark or a plan needs no download."""

from __future__ import annotations

from megastream.model.spec import ModelSpec

_LLAMA3_ROPE_8B = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_ROPE_1B = dict(_LLAMA3_ROPE_8B, factor=32.0)


def _llama(**kw) -> ModelSpec:
    base = dict(architecture="LlamaForCausalLM", rms_norm_eps=1e-5, rope_theta=500000.0,
                max_position_embeddings=131072, torch_dtype="bfloat16")
    return ModelSpec(**{**base, **kw})


def _qwen2(**kw) -> ModelSpec:
    base = dict(architecture="Qwen2ForCausalLM", rms_norm_eps=1e-6, rope_theta=1000000.0,
                qkv_bias=True, max_position_embeddings=32768, torch_dtype="bfloat16")
    return ModelSpec(**{**base, **kw})


PRESETS: dict[str, ModelSpec] = {
    # The demo's model: a 1.3M-parameter Llama that trains on the CPU in 1-2 minutes.
    "tiny": _llama(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=2048,
                   torch_dtype="float32"),
    "llama-3.2-1b": _llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                           num_heads=32, num_kv_heads=8, head_dim=64, rope_scaling=_LLAMA3_ROPE_1B,
                           tie_word_embeddings=True),
    "llama-3.1-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                           num_heads=32, num_kv_heads=8, head_dim=128, rope_scaling=_LLAMA3_ROPE_8B),
    "qwen2.5-0.5b": _qwen2(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                           num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-1.5b": _qwen2(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                           num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "qwen2.5-3b": _qwen2(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                         num_heads=16, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "qwen2.5-7b": _qwen2(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                         num_heads=28, num_kv_heads=4, head_dim=128),
    "qwen2.5-14b": _qwen2(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48,
                          num_heads=40, num_kv_heads=8, head_dim=128),
    "qwen2.5-32b": _qwen2(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                          num_heads=40, num_kv_heads=8, head_dim=128),
    # 70B class, for LoRA / QLoRA plans and benchmarks (random init): 70.55B and 72.71B parameters.
    "llama-3.1-70b": _llama(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                            num_heads=64, num_kv_heads=8, head_dim=128, rope_scaling=_LLAMA3_ROPE_8B),
    "qwen2.5-72b": _qwen2(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
                          num_heads=64, num_kv_heads=8, head_dim=128),
}


# Shapes of models megastream runs on the generic path (model.implementation: hf, megastream.hf):
# their config.json as published, from which the transformers module (built on the meta device)
# gives every parameter's name and shape. Random init, as the presets above; plan needs no download.
HF_PRESETS: dict[str, dict] = {
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "output_router_logits": False,
        "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"},
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "output_router_logits": False,
        "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    "gemma-3-27b": {  # the text model (Gemma3ForCausalLM) of google/gemma-3-27b
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262208,
        "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
        "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168, "sliding_window": 1024,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        "initializer_range": 0.02, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16"},
    "phi-4": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 100352, "hidden_size": 5120,
        "intermediate_size": 17920, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
        "max_position_embeddings": 16384, "original_max_position_embeddings": 16384, "rms_norm_eps": 1e-5,
        "rope_theta": 250000.0, "rope_scaling": None, "partial_rotary_factor": 1.0, "sliding_window": None,
        "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02, "bos_token_id": 100257,
        "eos_token_id": 100265, "pad_token_id": 100349, "torch_dtype": "bfloat16"},
}
