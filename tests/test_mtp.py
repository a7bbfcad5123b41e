"""The MTP head against a naive implementation written here from its definition:

    logits = lm_head(norm(layer(fc([rms0(embed(x_{t+1})), rms0(h_t)]), position t)))

with rms0 the zero-centred RMSNorm, `layer` a full-attention MoE decoder layer (transformers'
own Qwen3NextDecoderLayer holding the mtp.layers.0 weights), h_t the main model's final hidden.
"""

import pytest
import torch

from qwen3next_trt.model import load_preset, random_model

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_next import modeling_qwen3_next as hf  # noqa: E402


def rms0(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def hf_mtp_layer(model):
    cfg = model.config
    hf_cfg = transformers.Qwen3NextConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    hf_cfg.layer_types = ["full_attention"] * (cfg.num_hidden_layers + 1)
    hf_cfg.num_hidden_layers += 1
    layer = hf.Qwen3NextDecoderLayer(hf_cfg, cfg.num_hidden_layers).eval()
    ours = model.mtp.layers[0].state_dict()
    sd = {}
    for name in layer.state_dict():
        if name == "mlp.experts.gate_up_proj":
            sd[name] = torch.stack([torch.cat([ours[f"mlp.experts.{e}.gate_proj.weight"], ours[f"mlp.experts.{e}.up_proj.weight"]]) for e in range(cfg.num_experts)])
        elif name == "mlp.experts.down_proj":
            sd[name] = torch.stack([ours[f"mlp.experts.{e}.down_proj.weight"] for e in range(cfg.num_experts)])
        else:
            sd[name] = ours[name]
    layer.load_state_dict(sd)
    return layer, hf.Qwen3NextRotaryEmbedding(hf_cfg)


@torch.no_grad()
def test_mtp_matches_naive_definition():
    model = random_model(load_preset("tiny"), seed=5)
    cfg = model.config
    eps = cfg.rms_norm_eps
    B, T = 2, 20
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    _, hidden = model(ids[:, :T], return_hidden=True)
    positions = torch.arange(T).expand(B, T)
    logits, _ = model.mtp_forward(ids[:, 1:], hidden, positions)

    mtp = dict(model.mtp.named_parameters())
    emb = model.model.embed_tokens.weight[ids[:, 1:]]
    x = torch.cat([rms0(emb, mtp["pre_fc_norm_embedding.weight"], eps), rms0(hidden, mtp["pre_fc_norm_hidden.weight"], eps)], -1)
    x = x @ mtp["fc.weight"].T
    layer, rope = hf_mtp_layer(model)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    x = layer(x, position_embeddings=rope(x, positions), attention_mask=causal, position_ids=positions)
    x = x[0] if isinstance(x, tuple) else x
    expected = rms0(x, mtp["norm.weight"], eps) @ model.lm_head.weight.T
    assert expected.abs().max() > 1.0
    assert (logits - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_mtp_with_cache_equals_full_pass():
    """Drafting token by token with the MTP layer's own KV cache equals one pass over all positions."""
    model = random_model(load_preset("tiny"), seed=6)
    B, T = 1, 12
    ids = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    _, hidden = model(ids[:, :T], return_hidden=True)
    positions = torch.arange(T).expand(B, T)
    full, _ = model.mtp_forward(ids[:, 1:], hidden, positions)
    cache = model.new_cache(B)
    steps = [model.mtp_forward(ids[:, t + 1 : t + 2], hidden[:, t : t + 1], positions[:, t : t + 1], cache)[0] for t in range(T)]
    assert cache.mtp_layers[0].length == T
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
