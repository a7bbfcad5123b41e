"""A two-layer Qwen3-Next config small enough for checkpoint-level tests that run in a second."""

MICRO = {
    "model_type": "qwen3_next", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
    "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
}
VICTIM = "model.layers.1.self_attn.o_proj.weight"  # [32, 32]: the tensor tests damage
