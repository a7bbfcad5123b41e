"""The graph kinds, each defined once: its export wrapper and its reference adapter side by side.

Every wrapper runs the reference module's own forward with the export kernels (custom ops, one
ONNX Attention, ONNX RotaryEmbedding); it only turns caches into graph inputs and outputs. Beside it,
the same class says how the validator rebuilds that part of the model from the weight source
(`reference_module`) and runs it on the reference code path (`reference_outputs`: reference kernels,
explicit softmax attention, HF-style rotary), in the order of the graph's outputs. `KINDS` maps a
manifest Kind to its class: adding a kind is one class here.

Graph I/O (names as in the ONNX files and the manifest; B batch, T new tokens, P past tokens):
  embed          input_ids [B,T] int64                         -> hidden [B,T,H]
  linear layer   hidden [B,T,H], conv_state [B,C,K-1],
                 recurrent_state [B,Hv,Dk,Dv] float32          -> hidden_out, conv_state_out, recurrent_state_out
  full layer     hidden [B,T,H], position_ids [B,T] int64, attention_mask [B,P+T] bool (True = real token),
                 past_key, past_value [B,Hkv,P,D]              -> hidden_out, present_key, present_value [B,Hkv,P+T,D]
  final          hidden [B,T,H]                                -> logits [B,T,V], hidden_normed [B,T,H]
  lm_head        hidden [B,T,H]                                -> logits [B,T,V]
  mtp            next_embeds [B,T,H] (embed of token t+1), hidden [B,T,H] (hidden_normed at t),
                 position_ids [B,T], attention_mask [B,P+T], past_key, past_value -> mtp_hidden [B,T,H], present_key, present_value
  model          input_ids, position_ids, attention_mask, then every layer's state -> logits, hidden_normed, every state out
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qwen3next_trt.model import AttentionCache, DeltaNetCache, Qwen3NextCache, Qwen3NextConfig
from qwen3next_trt.model.loader import layer_prefix
from qwen3next_trt.model.config import LINEAR_ATTENTION
from qwen3next_trt.model.modeling_qwen3_next import (
    Qwen3NextDecoderLayer,
    Qwen3NextSparseMoeBlock,
    rope_inverse_frequencies,
)

from qwen3next_trt.model.fp8 import PER_TOKEN, FP8Weight, WeightQuantizer, activation_scale, graph_scale, is_quantized

from .custom_ops import export_kernels, stack_experts
from .manifest import Kind, Role, state_tag

ACTIVATION, STATE_IN, STATE_OUT, POSITION, TOKENS, MASK = (Role.ACTIVATION, Role.STATE_IN, Role.STATE_OUT, Role.POSITION,
                                                            Role.TOKENS, Role.MASK)


def _attention_inputs() -> list:
    """What an attention layer needs beside its hidden state and cache: RoPE positions per row and a
    key mask over past + new tokens, so that rows of different lengths can share a batch."""
    return [PortSpec("position_ids", POSITION, ["batch", "seq"], torch.int64),
            PortSpec("attention_mask", MASK, ["batch", "past+seq"], torch.bool)]


@dataclass
class PortSpec:
    """One graph input or output as the wrapper declares it: name, role, symbolic shape, torch dtype,
    and which state it carries (the manifest's Port takes dtype and named dims from the traced file)."""

    name: str
    role: Role
    shape: list  # ints and dim names ("batch", "seq", "past")
    dtype: torch.dtype
    state: str | None = None  # e.g. "layer_03.key"; state-in and state-out ports of one state share it


class RopeCache(nn.Module):
    """cos/sin tables [max_positions, rotary_dim/2] for ONNX RotaryEmbedding (YaRN scale folded in)."""

    def __init__(self, config: Qwen3NextConfig, max_positions: int, dtype):
        super().__init__()
        inv_freq, scale = rope_inverse_frequencies(config)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None]
        self.register_buffer("cos_cache", (angles.cos() * scale).to(dtype))
        self.register_buffer("sin_cache", (angles.sin() * scale).to(dtype))
        self.rotary_dim = config.rotary_dim

    def rotation(self, position_ids):
        def rotate(x):
            return torch.onnx.ops.rotary_embedding(x, self.cos_cache, self.sin_cache, position_ids,
                                                   rotary_embedding_dim=self.rotary_dim)
        return rotate


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored as FP8 + scales: traced as float8e4m3fn initializer ->
    DequantizeLinear -> MatMul, so the weight bytes in the ONNX file are the FP8 ones."""

    def __init__(self, weight: FP8Weight, bias: torch.Tensor | None, dtype, input_scale: float | str | None = None):
        super().__init__()
        self.register_buffer("weight_fp8", weight.fp8)
        self.register_buffer("weight_scale", weight.row_scale.to(dtype))
        self.block = weight.block
        self.bias = bias
        self.quantize_input = input_scale is not None
        self.per_token = input_scale == PER_TOKEN
        if self.quantize_input and not self.per_token:  # static FP8 activations: QuantizeLinear -> DequantizeLinear on the input
            self.register_buffer("input_scale", graph_scale(input_scale, dtype))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.float8_e4m3fn))

    def forward(self, x):
        if self.per_token:
            x = torch.ops.qwen3next.fake_quantize_fp8_per_token(x)
        elif self.quantize_input:
            x = torch.ops.qwen3next.fake_quantize_fp8(x, self.input_scale, self.input_zero_point)
        w = torch.ops.qwen3next.dequantize_fp8(self.weight_fp8, self.weight_scale, self.block)
        return nn.functional.linear(x, w.to(x.dtype), self.bias)


def quantize_linears_(module: nn.Module, prefix: str, quantizer: WeightQuantizer, dtype, act_scales: dict | None = None):
    """Swap every linear whose weight the FP8 scheme stores in FP8 for an FP8Linear, in place."""
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{prefix}{name + '.' if name else ''}{attr}.weight"
            if isinstance(sub, nn.Linear) and is_quantized(full):
                scale = activation_scale(act_scales, full) if act_scales else None
                setattr(child, attr, FP8Linear(quantizer(full, sub.weight.detach()), sub.bias, dtype, scale))
    return module


def _interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[E, I, ...] x 2 -> [E, 2I, ...] with rows gate_0, up_0, gate_1, up_1, ..."""
    return torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


class _WithExperts(nn.Module):
    """Holds the stacked expert tensors of the MoE blocks it wraps as buffers (-> initializers);
    in FP8 exports those are FP8 + scales, dequantised in the graph in front of the MoE node."""

    def __init__(self, quantizer: WeightQuantizer | None = None, dtype=torch.float32, act_scales: dict | None = None):
        super().__init__()
        self._expert_slots: dict[int, tuple[str, tuple[int, int] | None]] = {}
        self.quantizer, self.dtype, self.act_scales = quantizer, dtype, act_scales
        self.kernels = export_kernels(self._moe_weights)

    def _add_experts(self, block: nn.Module, slot: str, prefix: str = ""):
        if not isinstance(block, Qwen3NextSparseMoeBlock):
            return
        block_size = None
        if self.quantizer is None:
            fc1, fc2 = stack_experts(block)
        else:
            q = lambda e, kind: self.quantizer(f"{prefix}mlp.experts.{e}.{kind}.weight", getattr(block.experts[e], kind).weight.detach())  # noqa: E731
            n = len(block.experts)
            gate, up, down = ([q(e, kind) for e in range(n)] for kind in ("gate_proj", "up_proj", "down_proj"))
            # one DequantizeLinear per stacked tensor: fc1's and fc2's column blocks may differ
            # (per-channel scales span each weight's whole input width), within one they may not
            block_size = (gate[0].block, down[0].block)
            if any(w.block != block_size[0] for w in gate + up) or any(w.block != block_size[1] for w in down):
                raise ValueError(f"{prefix}mlp.experts: FP8 weights with different block sizes")
            fc1 = _interleave_rows(torch.stack([w.fp8 for w in gate]), torch.stack([w.fp8 for w in up]))
            fc2 = torch.stack([w.fp8 for w in down])
            # float32 whatever the export dtype: the checkpoint's scales exactly (DequantizeLinear -> Cast),
            # which engines/fold.py hands the MoE plugin unchanged
            self.register_buffer(f"{slot}_fc1_scale", _interleave_rows(torch.stack([w.row_scale for w in gate]),
                                                                        torch.stack([w.row_scale for w in up])).float())
            self.register_buffer(f"{slot}_fc2_scale", torch.stack([w.row_scale for w in down]).float())
        self.register_buffer(f"{slot}_fc1", fc1)
        self.register_buffer(f"{slot}_fc1_bias", torch.zeros(fc1.shape[:2], dtype=self.dtype))
        self.register_buffer(f"{slot}_fc2", fc2)
        self.register_buffer(f"{slot}_fc2_bias", torch.zeros(fc2.shape[:2], dtype=self.dtype))
        self._expert_slots[id(block)] = (slot, block_size)
        if self.act_scales == PER_TOKEN:
            block.expert_input_quant = torch.ops.qwen3next.fake_quantize_fp8_per_token
        elif self.act_scales:
            self.register_buffer(f"{slot}_input_scale", graph_scale(self.act_scales[f"{prefix}mlp.experts"], self.dtype))
            self.register_buffer(f"{slot}_input_zero_point", torch.zeros((), dtype=torch.float8_e4m3fn))
            block.expert_input_quant = lambda x, slot=slot: torch.ops.qwen3next.fake_quantize_fp8(
                x, getattr(self, f"{slot}_input_scale"), getattr(self, f"{slot}_input_zero_point"))
        # The per-expert modules are not used by the traced graph: drop them so they are not
        # lifted as (unused) inputs, and the 80B layer's expert weights are not held twice.
        block.experts = nn.ModuleList()

    def _moe_weights(self, block):
        slot, block_size = self._expert_slots[id(block)]
        fc1, fc1_bias, fc2, fc2_bias = (getattr(self, f"{slot}_{n}") for n in ("fc1", "fc1_bias", "fc2", "fc2_bias"))
        if block_size is not None:
            fc1 = torch.ops.qwen3next.dequantize_fp8(fc1, getattr(self, f"{slot}_fc1_scale"), block_size[0]).to(self.dtype)
            fc2 = torch.ops.qwen3next.dequantize_fp8(fc2, getattr(self, f"{slot}_fc2_scale"), block_size[1]).to(self.dtype)
        return fc1, fc1_bias, fc2, fc2_bias


class KVCacheIO(nn.Module):
    """How an attention layer's key/value state crosses the graph boundary. Plain: as is. FP8
    (static per-tensor scales from calibration): the past arrives as float8e4m3fn and is dequantised;
    this step's keys/values are rounded through E4M3 (Q/DQ) before attention, as the cache will hold
    them; the present leaves through QuantizeLinear, which is exact since every value is on the grid.
    ONNX's Concat takes no float8, hence dequantise -> concat -> quantise."""

    def __init__(self, dtype, scales: tuple[float, float] | None = None):
        super().__init__()
        self.fp8 = scales is not None
        if self.fp8:
            self.register_buffer("key_scale", graph_scale(scales[0], dtype))
            self.register_buffer("value_scale", graph_scale(scales[1], dtype))
            self.register_buffer("kv_zero_point", torch.zeros((), dtype=torch.float8_e4m3fn))

    @property
    def dtype(self):
        return torch.float8_e4m3fn if self.fp8 else None

    def load(self, past_key, past_value, attention_mask) -> AttentionCache:
        if not self.fp8:
            return AttentionCache.from_tensors(past_key, past_value, attention_mask)
        zp = self.kv_zero_point
        cache = AttentionCache.from_tensors(torch.ops.qwen3next.dequantize_fp8_tensor(past_key, self.key_scale, zp),
                                            torch.ops.qwen3next.dequantize_fp8_tensor(past_value, self.value_scale, zp), attention_mask)
        cache.quantize = lambda k, v: (torch.ops.qwen3next.fake_quantize_fp8(k, self.key_scale, zp),
                                       torch.ops.qwen3next.fake_quantize_fp8(v, self.value_scale, zp))
        return cache

    def store(self, cache: AttentionCache):
        if not self.fp8:
            return cache.key, cache.value
        zp = self.kv_zero_point
        return (torch.ops.qwen3next.quantize_fp8(cache.key, self.key_scale, zp),
                torch.ops.qwen3next.quantize_fp8(cache.value, self.value_scale, zp))


def kv_scales_of(kv_scales: dict | None, prefix: str) -> tuple[float, float] | None:
    """(key scale, value scale) of the attention layer with checkpoint prefix `prefix`, if FP8 KV."""
    return None if kv_scales is None else (kv_scales[f"{prefix}self_attn.key"], kv_scales[f"{prefix}self_attn.value"])


def _state_ports(config: Qwen3NextConfig, layer_type: str, tag: str, dtype, batch="batch", past="past", kv_dtype=None):
    """(state-in ports, state-out ports) of one layer."""
    if layer_type == LINEAR_ATTENTION:
        conv = [batch, config.linear_conv_dim, config.linear_conv_kernel_dim - 1]
        rec = [batch, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim]
        ins = [PortSpec(f"{tag}conv_state", STATE_IN, conv, dtype, f"{tag}conv_state"),
               PortSpec(f"{tag}recurrent_state", STATE_IN, rec, torch.float32, f"{tag}recurrent_state")]
        outs = [PortSpec(f"{tag}conv_state_out", STATE_OUT, conv, dtype, f"{tag}conv_state"),
                PortSpec(f"{tag}recurrent_state_out", STATE_OUT, rec, torch.float32, f"{tag}recurrent_state")]
        return ins, outs
    kv_in = [batch, config.num_key_value_heads, past, config.head_dim]
    kv_out = [batch, config.num_key_value_heads, f"{past}+seq", config.head_dim]
    kv = kv_dtype or dtype
    ins = [PortSpec(f"{tag}past_key", STATE_IN, kv_in, kv, f"{tag}key"), PortSpec(f"{tag}past_value", STATE_IN, kv_in, kv, f"{tag}value")]
    outs = [PortSpec(f"{tag}present_key", STATE_OUT, kv_out, kv, f"{tag}key"), PortSpec(f"{tag}present_value", STATE_OUT, kv_out, kv, f"{tag}value")]
    return ins, outs


class LayerGraph(_WithExperts):
    """A decoder layer (or the MTP layer's decoder block) with its state as inputs and outputs."""

    kinds = (Kind.LINEAR_ATTENTION, Kind.FULL_ATTENTION)
    fp8_weights = True

    @staticmethod
    def weight_prefix(record, config) -> str:
        return layer_prefix(record.layer, config)

    @staticmethod
    def reference_module(source, record):
        return source.layer(record.layer)

    @staticmethod
    def reference_outputs(m, t: dict, ctx, record) -> list:
        if record.kind == Kind.LINEAR_ATTENTION:
            cache = DeltaNetCache.from_tensors(t["conv_state"], t["recurrent_state"])
            return [m(t["hidden"], None, cache), cache.conv_state, cache.recurrent_state]
        cache = ctx.attention_cache(t, "", t["attention_mask"])
        return [m(t["hidden"], ctx.rotation(t["position_ids"]), cache), cache.key, cache.value]

    def __init__(self, layer: Qwen3NextDecoderLayer, config: Qwen3NextConfig, rope: RopeCache | None, dtype,
                 quantizer: WeightQuantizer | None = None, prefix: str = "", act_scales: dict | None = None,
                 kv_scales: dict | None = None):
        super().__init__(quantizer, dtype, act_scales)
        self.layer = layer
        self.rope = rope
        self.linear = layer.layer_type == LINEAR_ATTENTION
        self.kv = None if self.linear else KVCacheIO(dtype, kv_scales_of(kv_scales, prefix))
        self.fixed_args = 1
        self._add_experts(layer.mlp, "experts", prefix)
        if quantizer is not None:
            quantize_linears_(layer, prefix, quantizer, dtype, act_scales)
        H = config.hidden_size
        state_in, state_out = _state_ports(config, layer.layer_type, "", dtype, kv_dtype=self.kv and self.kv.dtype)
        self.inputs = [PortSpec("hidden", ACTIVATION, ["batch", "seq", H], dtype), *([] if self.linear else _attention_inputs()), *state_in]
        self.outputs = [PortSpec("hidden_out", ACTIVATION, ["batch", "seq", H], dtype), *state_out]

    def forward(self, hidden, *args):
        if self.linear:
            cache = DeltaNetCache.from_tensors(*args)
            out = self.layer(hidden, None, cache, self.kernels)
            return out, cache.conv_state, cache.recurrent_state
        position_ids, attention_mask, past_key, past_value = args
        cache = self.kv.load(past_key, past_value, attention_mask)
        out = self.layer(hidden, self.rope.rotation(position_ids), cache, self.kernels)
        return out, *self.kv.store(cache)


class _FloatWeights(nn.Module):
    """A kind whose weights stay in the export dtype (the checkpoint keeps embeddings, norms and lm_head
    unquantised): no FP8 rounding in its reference, no checkpoint prefix needed for it."""

    fp8_weights = False
    weight_prefix = staticmethod(lambda record, config: "")


class EmbedGraph(_FloatWeights):
    kinds = (Kind.EMBED,)
    reference_module = staticmethod(lambda source, record: source.embedding())
    reference_outputs = staticmethod(lambda m, t, ctx, record: [m(t["input_ids"])])

    def __init__(self, embedding: nn.Embedding, dtype):
        super().__init__()
        self.embed_tokens = embedding
        self.inputs = [PortSpec("input_ids", TOKENS, ["batch", "seq"], torch.int64)]
        self.outputs = [PortSpec("hidden", ACTIVATION, ["batch", "seq", embedding.embedding_dim], dtype)]

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class FinalGraph(_FloatWeights):
    kinds = (Kind.FINAL,)
    reference_module = staticmethod(lambda source, record: (source.final_norm(), source.lm_head()))

    @staticmethod
    def reference_outputs(m, t: dict, ctx, record) -> list:
        norm, head = m
        normed = norm(t["hidden"])
        return [head(normed), normed]

    def __init__(self, norm: nn.Module, lm_head: nn.Linear, dtype):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        H, V = lm_head.in_features, lm_head.out_features
        self.inputs = [PortSpec("hidden", ACTIVATION, ["batch", "seq", H], dtype)]
        self.outputs = [PortSpec("logits", ACTIVATION, ["batch", "seq", V], dtype),
                        PortSpec("hidden_normed", ACTIVATION, ["batch", "seq", H], dtype)]

    def forward(self, hidden):
        normed = self.norm(hidden)
        return self.lm_head(normed), normed


class LMHeadGraph(_FloatWeights):
    kinds = (Kind.LM_HEAD,)
    reference_module = staticmethod(lambda source, record: source.lm_head())
    reference_outputs = staticmethod(lambda m, t, ctx, record: [m(t["hidden"])])

    def __init__(self, lm_head: nn.Linear, dtype):
        super().__init__()
        self.lm_head = lm_head
        self.inputs = [PortSpec("hidden", ACTIVATION, ["batch", "seq", lm_head.in_features], dtype)]
        self.outputs = [PortSpec("logits", ACTIVATION, ["batch", "seq", lm_head.out_features], dtype)]

    def forward(self, hidden):
        return self.lm_head(hidden)


class MTPGraph(_WithExperts):
    kinds = (Kind.MTP,)
    fp8_weights = True
    weight_prefix = staticmethod(lambda record, config: "mtp.")
    reference_module = staticmethod(lambda source, record: source.mtp())

    @staticmethod
    def reference_outputs(m, t: dict, ctx, record) -> list:
        cache = ctx.attention_cache(t, "", t["attention_mask"])
        return [m(t["next_embeds"], t["hidden"], ctx.rotation(t["position_ids"]), cache), cache.key, cache.value]

    def __init__(self, mtp: nn.Module, config: Qwen3NextConfig, rope: RopeCache, dtype,
                 quantizer: WeightQuantizer | None = None, act_scales: dict | None = None, kv_scales: dict | None = None):
        super().__init__(quantizer, dtype, act_scales)
        self.mtp, self.rope = mtp, rope
        self.kv = KVCacheIO(dtype, kv_scales_of(kv_scales, "mtp.layers.0."))
        self._add_experts(mtp.layers[0].mlp, "experts", "mtp.layers.0.")
        if quantizer is not None:
            quantize_linears_(mtp, "mtp.", quantizer, dtype, act_scales)
        H = config.hidden_size
        state_in, state_out = _state_ports(config, "full_attention", "", dtype, kv_dtype=self.kv.dtype)
        self.inputs = [PortSpec("next_embeds", ACTIVATION, ["batch", "seq", H], dtype),
                       PortSpec("hidden", ACTIVATION, ["batch", "seq", H], dtype),
                       *_attention_inputs(), *state_in]
        self.outputs = [PortSpec("mtp_hidden", ACTIVATION, ["batch", "seq", H], dtype), *state_out]

    def forward(self, next_embeds, hidden, position_ids, attention_mask, past_key, past_value):
        cache = self.kv.load(past_key, past_value, attention_mask)
        out = self.mtp(next_embeds, hidden, self.rope.rotation(position_ids), cache, 0, self.kernels)
        return out, *self.kv.store(cache)


class ModelGraph(_WithExperts):
    """The whole main model in one graph (small models): every layer's state in and out."""

    kinds = (Kind.MODEL,)
    fp8_weights = True
    weight_prefix = staticmethod(lambda record, config: "")
    reference_module = staticmethod(lambda source, record: source.whole_model(with_mtp=False))

    @staticmethod
    def reference_outputs(m, t: dict, ctx, record) -> list:
        cache = Qwen3NextCache(ctx.config, t["input_ids"].shape[0])
        for i, layer_type in enumerate(ctx.config.layer_types):
            tag = state_tag(i)
            if layer_type == LINEAR_ATTENTION:
                cache.layers[i].conv_state, cache.layers[i].recurrent_state = t[tag + "conv_state"], t[tag + "recurrent_state"]
            else:
                cache.layers[i] = ctx.attention_cache(t, tag, t["attention_mask"])
        logits, normed = m(t["input_ids"], cache, position_ids=t["position_ids"], return_hidden=True)
        outs = [logits, normed]
        for layer_cache in cache.layers:
            outs += ([layer_cache.conv_state, layer_cache.recurrent_state] if isinstance(layer_cache, DeltaNetCache)
                     else [layer_cache.key, layer_cache.value])
        return outs

    def __init__(self, model: nn.Module, rope: RopeCache, dtype, quantizer: WeightQuantizer | None = None,
                 act_scales: dict | None = None, kv_scales: dict | None = None):
        super().__init__(quantizer, dtype, act_scales)
        self.model, self.rope = model, rope
        self.kv = nn.ModuleList(KVCacheIO(dtype, None if t == LINEAR_ATTENTION else kv_scales_of(kv_scales, f"model.layers.{i}."))
                                for i, t in enumerate(model.config.layer_types))
        self.fixed_args = 3
        cfg = model.config
        for i, layer in enumerate(model.model.layers):
            self._add_experts(layer.mlp, f"layer_{i:02d}_experts", f"model.layers.{i}.")
        if quantizer is not None:
            quantize_linears_(model, "", quantizer, dtype, act_scales)
        self.layer_types = list(cfg.layer_types)
        self.inputs = [PortSpec("input_ids", TOKENS, ["batch", "seq"], torch.int64), *_attention_inputs()]
        self.outputs = [PortSpec("logits", ACTIVATION, ["batch", "seq", cfg.vocab_size], dtype),
                        PortSpec("hidden_normed", ACTIVATION, ["batch", "seq", cfg.hidden_size], dtype)]
        for i, t in enumerate(cfg.layer_types):
            ins, outs = _state_ports(cfg, t, state_tag(i), dtype, kv_dtype=self.kv[i].dtype)
            self.inputs += ins
            self.outputs += outs

    def forward(self, input_ids, position_ids, attention_mask, *states):
        m = self.model.model
        x = m.embed_tokens(input_ids)
        rotate = self.rope.rotation(position_ids)
        outs = []
        for i, layer in enumerate(m.layers):
            a, b = states[2 * i], states[2 * i + 1]
            linear = layer.layer_type == LINEAR_ATTENTION
            cache = DeltaNetCache.from_tensors(a, b) if linear else self.kv[i].load(a, b, attention_mask)
            x = layer(x, rotate, cache, self.kernels)
            outs += [cache.conv_state, cache.recurrent_state] if linear else list(self.kv[i].store(cache))
        normed = m.norm(x)
        return (self.model.lm_head(normed), normed, *outs)


# manifest Kind -> the class that exports it and knows its reference
KINDS = {kind: cls for cls in (EmbedGraph, LayerGraph, FinalGraph, LMHeadGraph, MTPGraph, ModelGraph) for kind in cls.kinds}
