"""Qwen3-Next in plain PyTorch: the reference every later stage is checked against.

Module and parameter names are the checkpoint's (`model.layers.{i}.linear_attn.in_proj_qkvz.weight`,
`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, `mtp.fc.weight`, ...), so a state dict of this
model is a checkpoint. Read top to bottom beside the Qwen3-Next / Gated DeltaNet papers:

  norms:      Qwen3NextRMSNorm (zero-centred: x_hat * (1 + w)), Qwen3NextRMSNormGated (x_hat * w * silu(z))
  mixers:     Qwen3NextGatedDeltaNet (3 of 4 layers), Qwen3NextAttention (gated, partial RoPE, q/k norm)
  channel:    Qwen3NextSparseMoeBlock (softmax router, top-k, renormalise, shared expert), Qwen3NextMLP
  stacks:     Qwen3NextDecoderLayer, Qwen3NextModel, Qwen3NextForCausalLM, Qwen3NextMTP

The functional pieces the exporter turns into single ONNX custom ops (the causal conv with state,
the gated delta rule scan, the MoE dispatch) are module-level functions taking plain tensors, so the
traced op and this reference are one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cache import AttentionCache, DeltaNetCache, Qwen3NextCache
from .config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen3NextConfig
from .gated_delta_rule import gated_delta_rule


# ------------------------------------------------------------------------------------------------
# Norms


class Qwen3NextRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as an offset from 1 (zero-initialised), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: x * rsqrt(mean(x^2) + eps) * w; it exports as one ONNX RMSNormalization.
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).to(x.dtype)


class Qwen3NextRMSNormGated(nn.Module):
    """Per-head RMSNorm of the DeltaNet output, gated by silu(z). Its weight is NOT zero-centred."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        # The weight multiplies in the activation dtype, the gate in float32 (as the checkpoint was trained).
        y = self.weight * xf.to(dtype)
        return (y * F.silu(gate.float())).to(dtype)


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (on the first `rotary_dim` dims of each head, half-split layout)


def rope_inverse_frequencies(config: Qwen3NextConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rotary dims and the cos/sin scale (YaRN's attention factor, else 1)."""
    rope = config.rope
    dim = config.rotary_dim
    base = rope.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    # YaRN: keep high-frequency dims (many rotations within the original context), interpolate
    # low-frequency dims by `factor`, blend linearly in between; scale cos/sin by 0.1 ln(factor) + 1.
    factor = rope.factor

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    original = rope.original_max_position_embeddings

    def dim_for_rotations(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, attention_factor


class Qwen3NextRotaryEmbedding(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, rotary_dim] for integer positions [B, T]."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        angles = torch.cat([freqs, freqs], dim=-1)
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype)

    def rotation(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Callable:
        """x [B, H, T, D] -> x with RoPE applied at these positions (cos/sin computed once for all layers)."""
        cos, sin = self(position_ids, dtype)
        return partial(apply_partial_rotary, cos=cos, sin=sin)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, H, T, D] (pairs (i, i + R/2)); pass the rest."""
    R = cos.shape[-1]
    x_rot, x_pass = x[..., :R], x[..., R:]
    cos, sin = cos[:, None], sin[:, None]
    half1, half2 = x_rot[..., : R // 2], x_rot[..., R // 2 :]
    rotated = torch.cat([-half2, half1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


# ------------------------------------------------------------------------------------------------
# Gated attention (every `full_attention_interval`-th layer)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, GQA by head grouping; q [B,Hq,T,D], k/v [B,Hkv,P+T,D] where the first P are past.

    Query i (absolute position P+i) sees keys j <= P+i whose `key_mask` [B, P+T] entry is True
    (all keys when None). Softmax in float32.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    past = S - T
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
    if key_mask is not None:
        visible = visible & key_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


class Qwen3NextAttention(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        H, D = config.hidden_size, config.head_dim
        # q_proj yields, per head, [query (D) | output gate (D)].
        self.q_proj = nn.Linear(H, self.num_heads * D * 2, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=bias)
        self.q_norm = Qwen3NextRMSNorm(D, eps=config.rms_norm_eps)
        self.k_norm = Qwen3NextRMSNorm(D, eps=config.rms_norm_eps)

    def forward(self, x, rotate, cache: AttentionCache | None = None, kernels: "Kernels" = None):
        """`rotate` applies RoPE at this step's positions to [B, H, T, D]; the cache, when given, grows."""
        kernels = kernels or REFERENCE_KERNELS
        B, T, _ = x.shape
        D = self.head_dim
        query, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * D).chunk(2, dim=-1)
        gate = gate.reshape(B, T, self.num_heads * D)
        q = self.q_norm(query).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, D)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        if cache is not None:
            k, v = cache.append(k, v)
        out = kernels.attention(q, k, v, self.scaling, None if cache is None else cache.key_mask)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * D)
        return self.o_proj(out * torch.sigmoid(gate))


# ------------------------------------------------------------------------------------------------
# Gated DeltaNet (linear attention)


def causal_conv1d_with_state(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, bias=None):
    """Depthwise causal conv + SiLU over x [B, C, T] with weight [C, 1, K], continuing from `state`.

    `state` [B, C, K-1] holds the last K-1 inputs before x (zeros at sequence start). Returns
    (y [B, C, T], new state [B, C, K-1]).
    """
    B, C, T = x.shape
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(B, C, K - 1)
    window = torch.cat([state.to(x.dtype), x], dim=-1)  # [B, C, K-1+T]
    y = F.conv1d(window, weight.to(x.dtype), bias=bias, groups=C)
    return F.silu(y), window[..., -(K - 1) :]


def linear_attention(q, k, v, state, g, beta, num_k_heads: int, num_v_heads: int, scale: float):
    """Gated delta rule over packed heads: q, k [B, T, Hk*Dk], v [B, T, Hv*Dv], g/beta [B, T, Hv].

    q and k are L2-normalised; value head h reads key head h // (Hv / Hk). Returns the output
    [B, T, Hv*Dv] (float32) and the state [B, Hv, Dk, Dv] (float32).
    """
    B, T, _ = q.shape
    r = num_v_heads // num_k_heads
    q = q.reshape(B, T, num_k_heads, -1).repeat_interleave(r, dim=2)
    k = k.reshape(B, T, num_k_heads, -1).repeat_interleave(r, dim=2)
    v = v.reshape(B, T, num_v_heads, -1)
    out, state = gated_delta_rule(q, k, v, g, beta, initial_state=state, scale=scale)
    return out.reshape(B, T, -1), state


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class Qwen3NextGatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = config.linear_key_dim
        self.value_dim = config.linear_value_dim
        self.conv_dim = config.linear_conv_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        H = config.hidden_size
        # Both projections are grouped per key head: in_proj_qkvz rows are, for each key head,
        # [q (Dk) | k (Dk) | v (r*Dv) | z (r*Dv)] with r = value heads per key head; in_proj_ba rows
        # are [b (r) | a (r)] per key head.
        self.in_proj_qkvz = nn.Linear(H, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(H, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim,
            padding=self.conv_kernel_size - 1, bias=False,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = Qwen3NextRMSNormGated(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)

    def split_projections(self, qkvz: torch.Tensor, ba: torch.Tensor):
        """Undo the per-key-head grouping: q, k [B,T,Hk,Dk]; v, z [B,T,Hv,Dv]; b, a [B,T,Hv]."""
        B, T, _ = qkvz.shape
        r = self.num_v_heads // self.num_k_heads
        Dk, Dv = self.head_k_dim, self.head_v_dim
        qkvz = qkvz.view(B, T, self.num_k_heads, 2 * Dk + 2 * r * Dv)
        q, k, v, z = qkvz.split([Dk, Dk, r * Dv, r * Dv], dim=-1)
        b, a = ba.view(B, T, self.num_k_heads, 2 * r).split([r, r], dim=-1)
        return (
            q, k,
            v.reshape(B, T, self.num_v_heads, Dv), z.reshape(B, T, self.num_v_heads, Dv),
            b.reshape(B, T, self.num_v_heads), a.reshape(B, T, self.num_v_heads),
        )

    def gates(self, a: torch.Tensor, b: torch.Tensor):
        """Log-space decay g = -exp(A_log) * softplus(a + dt_bias) and write strength beta = sigmoid(b), float32."""
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return g, torch.sigmoid(b.float())

    def forward(self, x: torch.Tensor, cache: DeltaNetCache | None = None, kernels: "Kernels" = None) -> torch.Tensor:
        kernels = kernels or REFERENCE_KERNELS
        B, T, _ = x.shape
        q, k, v, z, b, a = self.split_projections(self.in_proj_qkvz(x), self.in_proj_ba(x))
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
        conv_state = cache.conv_state if cache is not None else None
        mixed, new_conv_state = kernels.causal_conv(mixed.transpose(1, 2), self.conv1d.weight, conv_state)
        q, k, v = mixed.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(q.reshape(B, T, self.num_k_heads, self.head_k_dim)).reshape(B, T, self.key_dim)
        k = l2_normalize(k.reshape(B, T, self.num_k_heads, self.head_k_dim)).reshape(B, T, self.key_dim)
        g, beta = self.gates(a, b)
        state = cache.recurrent_state if cache is not None else None
        out, new_state = kernels.linear_attention(
            q, k, v, state, g, beta, self.num_k_heads, self.num_v_heads, self.head_k_dim**-0.5
        )
        if cache is not None:
            cache.conv_state = new_conv_state
            cache.recurrent_state = new_state
        out = self.norm(out.to(x.dtype).reshape(B, T, self.num_v_heads, self.head_v_dim), z)
        return self.out_proj(out.reshape(B, T, self.value_dim))


# ------------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU MLP and the sparse MoE block


class Qwen3NextMLP(nn.Module):
    def __init__(self, config: Qwen3NextConfig, intermediate_size: int):
        super().__init__()
        H = config.hidden_size
        self.gate_proj = nn.Linear(H, intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, H, bias=False)

    def forward(self, x, kernels=None):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route_tokens(router_logits: torch.Tensor, top_k: int, normalize: bool):
    """Softmax over all experts in float32, keep the top k, optionally renormalise them to sum 1."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def moe_dispatch(x, routing_weights, selected_experts, gate_proj, up_proj, down_proj):
    """Weighted sum of the selected experts' SwiGLU outputs for tokens x [N, H].

    routing_weights / selected_experts [N, k]; gate_proj[e], up_proj[e] [I, H] and down_proj[e] [H, I]
    are the expert weights (lists of tensors or stacked [E, ...] tensors).
    """
    out = torch.zeros_like(x)
    weights = routing_weights.to(x.dtype)
    for e in selected_experts.unique().tolist():
        token, slot = torch.where(selected_experts == e)
        h = x[token]
        h = F.linear(F.silu(F.linear(h, gate_proj[e])) * F.linear(h, up_proj[e]), down_proj[e])
        out.index_add_(0, token, h * weights[token, slot, None])
    return out


class Qwen3NextSparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            [Qwen3NextMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)]
        )
        # shared_expert_intermediate_size 0: no shared expert (transformers keeps zero-width linears,
        # whose output is exactly zero; a checkpoint's empty tensors for it are not read)
        self.shared_expert = Qwen3NextMLP(config, config.shared_expert_intermediate_size) if config.shared_expert_intermediate_size else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if self.shared_expert is not None else None
        # FP8 activations: rounds the routed experts' input (the router still sees the exact input)
        self.expert_input_quant: Callable | None = None

    def routed_experts(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, selected = route_tokens(router_logits, self.top_k, self.norm_topk_prob)
        return moe_dispatch(
            x, weights, selected,
            [e.gate_proj.weight for e in self.experts],
            [e.up_proj.weight for e in self.experts],
            [e.down_proj.weight for e in self.experts],
        )

    def forward(self, x: torch.Tensor, kernels: "Kernels" = None) -> torch.Tensor:
        kernels = kernels or REFERENCE_KERNELS
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts_in = self.expert_input_quant(x) if self.expert_input_quant is not None else x
        routed = kernels.routed_experts(self, experts_in, self.gate(x))
        if self.shared_expert is not None:
            routed = routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Layers and stacks


class Qwen3NextDecoderLayer(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int, layer_type: str | None = None, moe: bool | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = layer_type or config.layer_types[layer_idx]
        if self.layer_type == LINEAR_ATTENTION:
            self.linear_attn = Qwen3NextGatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Qwen3NextAttention(config, layer_idx)
        moe = config.is_moe_layer(layer_idx) if moe is None else moe
        self.mlp = Qwen3NextSparseMoeBlock(config) if moe else Qwen3NextMLP(config, config.intermediate_size)
        self.input_layernorm = Qwen3NextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3NextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, rotate, cache=None, kernels: "Kernels" = None):
        h = self.input_layernorm(x)
        if self.layer_type == LINEAR_ATTENTION:
            h = self.linear_attn(h, cache, kernels)
        else:
            h = self.self_attn(h, rotate, cache, kernels)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), kernels)


class Qwen3NextModel(nn.Module):
    """Embedding, decoder layers, final norm: returns the normed hidden states."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Qwen3NextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3NextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3NextRotaryEmbedding(config)

    def forward(self, input_ids, position_ids, cache: Qwen3NextCache | None = None):
        x = self.embed_tokens(input_ids)
        rotate = self.rotary_emb.rotation(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotate, cache.layers[i] if cache is not None else None)
        return self.norm(x)


class Qwen3NextMTP(nn.Module):
    """Multi-token prediction head (checkpoint prefix `mtp.`).

    Given the main model's final (normed) hidden state h_t at position t and the embedding of the
    token x_{t+1}, predicts x_{t+2}:  fc([norm_e(embed(x_{t+1})), norm_h(h_t)]) -> one full-attention
    MoE decoder layer at position t -> norm -> the shared LM head. Its output hidden state can be fed
    back for the next draft step.
    """

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        H = config.hidden_size
        self.pre_fc_norm_embedding = Qwen3NextRMSNorm(H, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = Qwen3NextRMSNorm(H, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(
            [
                Qwen3NextDecoderLayer(config, config.num_hidden_layers + i, layer_type=FULL_ATTENTION, moe=config.num_experts > 0)
                for i in range(config.num_mtp_layers)
            ]
        )
        self.norm = Qwen3NextRMSNorm(H, eps=config.rms_norm_eps)

    def forward(self, next_token_embeds, hidden, rotate, cache: AttentionCache | None = None, step: int = 0, kernels=None):
        x = torch.cat([self.pre_fc_norm_embedding(next_token_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
        x = self.layers[step](self.fc(x), rotate, cache, kernels)
        return self.norm(x)


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = Qwen3NextMTP(config) if config.num_mtp_layers else None
        # FP8 KV cache: {attention layer index: AttentionCache.quantize}, applied by new_cache
        self.kv_quantize: dict[int, Callable] = {}

    def new_cache(self, batch_size: int) -> Qwen3NextCache:
        p = self.lm_head.weight
        cache = Qwen3NextCache(self.config, batch_size, dtype=p.dtype, device=p.device)
        for i, quantize in self.kv_quantize.items():
            cache.layers[i].quantize = quantize
        return cache

    def positions(self, input_ids, cache: Qwen3NextCache | None):
        start = cache.seq_len if cache is not None else 0
        T = input_ids.shape[1]
        return torch.arange(start, start + T, device=input_ids.device).expand(input_ids.shape[0], T)

    def forward(self, input_ids, cache: Qwen3NextCache | None = None, position_ids=None, return_hidden=False):
        """Logits [B, T, vocab] for input_ids [B, T], continuing `cache` when given (which advances)."""
        if position_ids is None:
            position_ids = self.positions(input_ids, cache)
        hidden = self.model(input_ids, position_ids, cache)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def mtp_forward(self, next_ids, hidden, position_ids, cache: Qwen3NextCache | None = None, step: int = 0):
        """MTP logits and hidden for tokens next_ids [B, T] given main hidden states [B, T, H] at position_ids."""
        if self.mtp is None:
            raise RuntimeError("this model has no MTP layer (num_mtp_layers = 0)")
        embeds = self.model.embed_tokens(next_ids)
        rotate = self.model.rotary_emb.rotation(position_ids, embeds.dtype)
        layer_cache = cache.mtp_layers[step] if cache is not None else None
        h = self.mtp(embeds, hidden, rotate, layer_cache, step)
        return self.lm_head(h), h

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Prefill, then decode one token at a time with the cache; returns the new tokens [B, max_new_tokens]."""
        cache = self.new_cache(input_ids.shape[0])
        logits = self(input_ids, cache)
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        while len(tokens) < max_new_tokens:
            tokens.append(self(tokens[-1], cache)[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, dim=1)


# ------------------------------------------------------------------------------------------------
# The swappable kernels. The exporter passes versions of these that trace to single ONNX nodes and
# whose eager code calls the functions above, so the graph and this reference stay one definition.


@dataclass(frozen=True)
class Kernels:
    # (x [B, C, T], weight [C, 1, K], state [B, C, K-1] | None) -> (y, new state)
    causal_conv: Callable
    # (q, k [B, T, Hk*Dk], v [B, T, Hv*Dv], state | None, g, beta [B, T, Hv], Hk, Hv, scale) -> (o, state)
    linear_attention: Callable
    # (q [B, Hq, T, D], k, v [B, Hkv, P+T, D], scale, key_mask [B, P+T] | None) -> [B, Hq, T, D],
    # causal with P past positions, masked keys invisible
    attention: Callable
    # (moe block, tokens [N, H], router logits [N, E]) -> routed experts' weighted sum [N, H]
    routed_experts: Callable


REFERENCE_KERNELS = Kernels(
    causal_conv=causal_conv1d_with_state,
    linear_attention=linear_attention,
    attention=causal_attention,
    routed_experts=Qwen3NextSparseMoeBlock.routed_experts,
)
