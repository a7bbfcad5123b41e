"""The reference against transformers' Qwen3NextForCausalLM (the oracle), float32 on CPU.

Each config is written as a checkpoint by our writer and loaded by transformers' own
from_pretrained, so both sides see the same bytes through different code.
"""

import pytest
import torch

from qwen3next_trt.model import Qwen3NextConfig, load_model, load_preset, random_model, save_model
from qwen3next_trt.validate.tolerances import greedy_check

transformers = pytest.importorskip("transformers")

# A config unlike the presets: irregular layer types, a dense layer, MoE every other layer,
# 3 value heads per key head, conv width 3, half-rotary heads with YaRN, tied embeddings,
# attention bias, no top-k renormalisation.
VARIANT = {
    "model_type": "qwen3_next",
    "vocab_size": 300,
    "hidden_size": 96,
    "intermediate_size": 160,
    "num_hidden_layers": 6,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"],
    "mlp_only_layers": [2],
    "decoder_sparse_step": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "attention_bias": True,
    "linear_num_key_heads": 1,
    "linear_num_value_heads": 3,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 24,
    "linear_conv_kernel_dim": 3,
    "num_experts": 8,
    "num_experts_per_tok": 3,
    "norm_topk_prob": False,
    "moe_intermediate_size": 40,
    "shared_expert_intermediate_size": 56,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "partial_rotary_factor": 0.5,
                        "factor": 4.0, "original_max_position_embeddings": 128},
}

CONFIGS = {"tiny": lambda: load_preset("tiny"), "variant": lambda: Qwen3NextConfig.from_dict(dict(VARIANT))}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]()
    path = save_model(random_model(cfg, seed=1), tmp_path_factory.mktemp(request.param) / "ckpt", max_shard_bytes=2**20)
    ours = load_model(path)
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    return ours, hf


def tokens(cfg, batch, n, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prefill_100_tokens_logits(pair):
    ours, hf = pair
    ids = tokens(ours.config, 2, 100)  # longer than one 64-token scan chunk
    ref = hf(input_ids=ids, use_cache=False).logits
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (ours(ids) - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_prefill_60_then_decode_40_equals_full_forward(pair):
    ours, hf = pair
    ids = tokens(ours.config, 2, 100, seed=1)
    ref = hf(input_ids=ids, use_cache=False).logits
    cache = ours.new_cache(2)
    steps = [ours(ids[:, :60], cache)] + [ours(ids[:, t : t + 1], cache) for t in range(60, 100)]
    assert cache.seq_len == 100
    assert (torch.cat(steps, 1) - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_chunked_continuation_equals_full_forward(pair):
    """Multi-token steps on a warm cache (what speculative verification does): 37 + 5 + 1 + 30 tokens."""
    ours, hf = pair
    ids = tokens(ours.config, 1, 73, seed=2)
    ref = hf(input_ids=ids, use_cache=False).logits
    cache = ours.new_cache(1)
    cuts = [0, 37, 42, 43, 73]
    out = torch.cat([ours(ids[:, a:b], cache) for a, b in zip(cuts, cuts[1:])], 1)
    assert (out - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(pair):
    ours, hf = pair
    prompt = tokens(ours.config, 2, 12, seed=3)
    expected = hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate_greedy(prompt, 24)
    # transformers' logits along our path: every token of ours is its greedy choice up to the parity
    # tolerance, and equal to its own tokens before any near-tie (holds on any CPU: tests/greedy.py)
    hf_logits = hf(torch.cat([prompt, got[:, :-1]], 1)).logits[:, 11:].float().numpy()
    check = greedy_check(got.numpy(), expected[:, 12:].numpy(), hf_logits, 1e-4)
    assert check["consistent"] and check["agreement_before_tie"] == 1.0, check
