"""The three blocks that become single ONNX nodes, as torch custom ops with ONNX translations.

  torch op                          ONNX node (domain com.microsoft, ONNX Runtime's contrib schemas)
  qwen3next::causal_conv_with_state CausalConvWithState(input [B,C,T], weight [C,1,K], bias [C], past_state [B,C,K-1])
                                      -> output [B,C,T], present_state [B,C,K-1]; activation silu, ndim 1
  qwen3next::linear_attention       LinearAttention(query, key [B,T,Hk*Dk], value [B,T,Hv*Dv], past_state [B,Hv,Dk,Dv],
                                      decay [B,T,Hv] (log space), beta [B,T,Hv]) -> output [B,T,Hv*Dv], present_state;
                                      update_rule gated_delta, q_num_heads Hk, kv_num_heads Hv, scale
  qwen3next::moe                    MoE(input [B,T,H], router_probs [B*T,E] (router logits), fc1 [E,2I,H] (gate/up
                                      rows interleaved), fc1_bias [E,2I], fc2 [E,H,I], fc2_bias [E,H]) -> output [B,T,H];
                                      activation swiglu, swiglu_fusion 1, k, normalize_routing_weights 1; without
                                      norm_topk_prob, times the top-k softmax mass (Softmax, TopK, ReduceSum, Mul)

Each op's eager implementation is the reference model's function, so tracing cannot drift from it.
TensorRT's ONNX parser hands these nodes to plugin creators of the same names (plugins/).
Zero biases are explicit inputs: TensorRT's parser rejects an empty optional input in front of a
present one (PLATFORM.md).
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

from qwen3next_trt.model.fp8 import (
    FP8_MAX,
    MIN_SCALE,
    FP8Weight,
    fake_quantize_activation,
    fake_quantize_activation_per_token,
    quantize_tensor,
)
from qwen3next_trt.model.modeling_qwen3_next import (
    Kernels,
    causal_conv1d_with_state,
    linear_attention,
    moe_dispatch,
    route_tokens,
)

MS_DOMAIN = "com.microsoft"
MS_OPSET_VERSION = 1
CUSTOM_OPS = {"CausalConvWithState": 1, "LinearAttention": 1, "MoE": 1}  # op -> com.microsoft version

# ------------------------------------------------------------------------------------------------
# torch side


@torch.library.custom_op("qwen3next::causal_conv_with_state", mutates_args=())
def causal_conv_with_state(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, past_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, state = causal_conv1d_with_state(x, weight, past_state, bias)
    return y.contiguous(), state.contiguous()


@causal_conv_with_state.register_fake
def _(x, weight, bias, past_state):
    return torch.empty_like(x), torch.empty_like(past_state)


@torch.library.custom_op("qwen3next::linear_attention", mutates_args=())
def linear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_state: torch.Tensor, decay: torch.Tensor,
                        beta: torch.Tensor, q_num_heads: int, kv_num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, state = linear_attention(q, k, v, past_state, decay, beta, q_num_heads, kv_num_heads, scale)
    return out.to(v.dtype).contiguous(), state.to(past_state.dtype).contiguous()


@linear_attention_op.register_fake
def _(q, k, v, past_state, decay, beta, q_num_heads, kv_num_heads, scale):
    return torch.empty_like(v), torch.empty_like(past_state)


@torch.library.custom_op("qwen3next::moe", mutates_args=())
def moe_op(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc1_bias: torch.Tensor, fc2: torch.Tensor,
           fc2_bias: torch.Tensor, k: int, normalize_routing_weights: int) -> torch.Tensor:
    tokens = x.reshape(-1, x.shape[-1])
    weights, experts = route_tokens(router_logits, k, bool(normalize_routing_weights))
    # fc1 rows alternate gate, up (swiglu_fusion=1); the biases are zero by construction.
    out = moe_dispatch(tokens, weights, experts, fc1[:, 0::2], fc1[:, 1::2], fc2)
    return out.reshape(x.shape)


@moe_op.register_fake
def _(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize_routing_weights):
    return torch.empty_like(x)


@torch.library.custom_op("qwen3next::dequantize_fp8", mutates_args=())
def dequantize_fp8_op(x: torch.Tensor, row_scale: torch.Tensor, block_size: int) -> torch.Tensor:
    return FP8Weight(x, row_scale, block_size).dequantize().to(row_scale.dtype)


@dequantize_fp8_op.register_fake
def _(x, row_scale, block_size):
    return torch.empty(x.shape, dtype=row_scale.dtype, device=x.device)


@torch.library.custom_op("qwen3next::fake_quantize_fp8", mutates_args=())
def fake_quantize_fp8_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return fake_quantize_activation(x, scale)


@fake_quantize_fp8_op.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("qwen3next::quantize_fp8", mutates_args=())
def quantize_fp8_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return quantize_tensor(x, scale)


@quantize_fp8_op.register_fake
def _(x, scale, zero_point):
    return torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)


@torch.library.custom_op("qwen3next::dequantize_fp8_tensor", mutates_args=())
def dequantize_fp8_tensor_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (x.float() * scale.float()).to(scale.dtype)


@dequantize_fp8_tensor_op.register_fake
def _(x, scale, zero_point):
    return torch.empty(x.shape, dtype=scale.dtype, device=x.device)


@torch.library.custom_op("qwen3next::fake_quantize_fp8_per_token", mutates_args=())
def fake_quantize_fp8_per_token_op(x: torch.Tensor) -> torch.Tensor:
    return fake_quantize_activation_per_token(x)


@fake_quantize_fp8_per_token_op.register_fake
def _(x):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------
# ONNX side: ONNX Runtime's contrib schemas are not in onnx.defs; onnxscript needs them to know the
# number of outputs and the attribute types.


def _register_schemas():
    P = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    def A(name, kind, _doc=""):
        # Every attribute is optional to the checker: ONNX Runtime's contrib schemas have defaults.
        return OpSchema.Attribute(name, kind, "", required=False)

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schemas = [
        OpSchema("CausalConvWithState", MS_DOMAIN, 1,
                 inputs=[P("input", "T"), P("weight", "T"), P("bias", "T", param_option=opt), P("past_state", "T", param_option=opt)],
                 outputs=[P("output", "T"), P("present_state", "T")], type_constraints=[("T", floats, "")],
                 attributes=[A("activation", OpSchema.AttrType.STRING, ""), A("ndim", OpSchema.AttrType.INT, ""),
                             A("channels_last", OpSchema.AttrType.INT, "")]),
        OpSchema("LinearAttention", MS_DOMAIN, 1,
                 inputs=[P("query", "T"), P("key", "T"), P("value", "T"), P("past_state", "S", param_option=opt),
                         P("decay", "T", param_option=opt), P("beta", "T", param_option=opt)],
                 outputs=[P("output", "T"), P("present_state", "S")],
                 type_constraints=[("T", floats, ""), ("S", floats, "")],
                 attributes=[A("q_num_heads", OpSchema.AttrType.INT, ""), A("kv_num_heads", OpSchema.AttrType.INT, ""),
                             A("update_rule", OpSchema.AttrType.STRING, ""), A("chunk_size", OpSchema.AttrType.INT, ""),
                             A("scale", OpSchema.AttrType.FLOAT, "")]),
        OpSchema("MoE", MS_DOMAIN, 1,
                 inputs=[P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T"),
                         P("fc1_experts_bias", "T", param_option=opt), P("fc2_experts_weights", "T"),
                         P("fc2_experts_bias", "T", param_option=opt)],
                 outputs=[P("output", "T")], type_constraints=[("T", floats, "")],
                 attributes=[A("k", OpSchema.AttrType.INT, ""), A("activation_type", OpSchema.AttrType.STRING, ""),
                             A("swiglu_fusion", OpSchema.AttrType.INT, ""), A("normalize_routing_weights", OpSchema.AttrType.INT, ""),
                             A("use_sparse_mixer", OpSchema.AttrType.INT, ""), A("activation_alpha", OpSchema.AttrType.FLOAT, ""),
                             A("activation_beta", OpSchema.AttrType.FLOAT, "")]),
    ]
    for schema in schemas:
        try:
            onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)


_register_schemas()
_ms = onnxscript.values.Opset(MS_DOMAIN, MS_OPSET_VERSION)


def _conv_onnx(x, weight, bias, past_state):
    return _ms.CausalConvWithState(x, weight, bias, past_state, activation="silu", ndim=1, channels_last=0)


def _linear_attention_onnx(q, k, v, past_state, decay, beta, q_num_heads: int, kv_num_heads: int, scale: float):
    return _ms.LinearAttention(q, k, v, past_state, decay, beta, q_num_heads=q_num_heads, kv_num_heads=kv_num_heads,
                               update_rule="gated_delta", scale=scale)


def _moe_onnx(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k: int, normalize_routing_weights: int):
    # The MoE node always renormalises the top-k weights. ONNX Runtime's CPU kernel may run in place
    # over its input (MayInplace(0, 0)), and its normalize_routing_weights=0 path does not survive
    # that: when the node is the last reader of its input and the shapes are known (a layer graph),
    # the routed experts' contribution comes out as zero (ONNX Runtime 1.31.1; a lone node on graph
    # inputs is right, which is why single-node tests passed; NOTES.md, issue 12). Without
    # norm_topk_prob the weights are the top-k softmax probabilities p_i, i.e. the renormalised
    # p_i / sum_topk(p) times sum_topk(p): scale the output by that top-k mass, computed from the
    # same float32 softmax as the router.
    from onnxscript import opset23

    out = _ms.MoE(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k=k, activation_type="swiglu", swiglu_fusion=1,
                  normalize_routing_weights=1, use_sparse_mixer=0, activation_alpha=1.0, activation_beta=0.0)
    if normalize_routing_weights:
        return out
    probs = opset23.Softmax(opset23.Cast(router_logits, to=onnx.TensorProto.FLOAT), axis=-1)
    top, _ = opset23.TopK(probs, opset23.Constant(value_ints=[k]), axis=-1)
    mass = opset23.ReduceSum(top, opset23.Constant(value_ints=[-1]), keepdims=1)  # [tokens, 1]
    # router_logits is [tokens, E] while x may keep its batch dims: give the mass x's leading shape
    mass = opset23.Reshape(mass, opset23.Concat(opset23.Shape(x, end=-1), opset23.Constant(value_ints=[1]), axis=0))
    return opset23.Mul(out, opset23.CastLike(mass, out))


def _dequantize_fp8_onnx(x, row_scale, block_size: int):
    # Blocked DequantizeLinear (opset 21+) along the last axis; the scale has x's rank.
    from onnxscript import opset23

    return opset23.DequantizeLinear(x, row_scale, axis=-1, block_size=block_size)


def _fake_quantize_fp8_onnx(x, scale, zero_point):
    # Per-tensor QuantizeLinear to float8e4m3fn (the zero point's type; saturating) and back.
    from onnxscript import opset23

    return opset23.DequantizeLinear(opset23.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def _quantize_fp8_onnx(x, scale, zero_point):
    from onnxscript import opset23

    return opset23.QuantizeLinear(x, scale, zero_point)


def _dequantize_fp8_tensor_onnx(x, scale, zero_point):
    from onnxscript import opset23

    return opset23.DequantizeLinear(x, scale, zero_point)


def _fake_quantize_fp8_per_token_onnx(x):
    # Per-token scales computed in the graph, applied as a blocked QuantizeLinear whose one block is
    # the whole last axis (scale [..., 1]): standard Q/DQ, so ONNX Runtime runs it bit-exactly and
    # TensorRT's parser takes it (a TensorRT-RTX build accepts it; a Cast-to-FP8 form it refuses).
    from onnxscript import opset23

    amax = opset23.ReduceMax(opset23.Abs(x), opset23.Constant(value_ints=[-1]), keepdims=1)
    scale = opset23.Max(opset23.Div(amax, opset23.CastLike(FP8_MAX, x)), opset23.CastLike(MIN_SCALE, x))
    block = x.shape[-1]
    q = opset23.QuantizeLinear(x, scale, axis=-1, block_size=block, output_dtype=onnx.TensorProto.FLOAT8E4M3FN)
    return opset23.DequantizeLinear(q, scale, axis=-1, block_size=block)


TRANSLATION_TABLE = {
    torch.ops.qwen3next.quantize_fp8.default: _quantize_fp8_onnx,
    torch.ops.qwen3next.dequantize_fp8_tensor.default: _dequantize_fp8_tensor_onnx,
    torch.ops.qwen3next.fake_quantize_fp8_per_token.default: _fake_quantize_fp8_per_token_onnx,
    torch.ops.qwen3next.fake_quantize_fp8.default: _fake_quantize_fp8_onnx,
    torch.ops.qwen3next.dequantize_fp8.default: _dequantize_fp8_onnx,
    torch.ops.qwen3next.causal_conv_with_state.default: _conv_onnx,
    torch.ops.qwen3next.linear_attention.default: _linear_attention_onnx,
    torch.ops.qwen3next.moe.default: _moe_onnx,
}


# ------------------------------------------------------------------------------------------------
# The kernels the exported layers run with


def _conv_kernel(x, weight, state):
    bias = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
    return torch.ops.qwen3next.causal_conv_with_state(x, weight.to(x.dtype), bias, state.to(x.dtype))


def _linear_attention_kernel(q, k, v, state, g, beta, num_k_heads, num_v_heads, scale):
    # The scan runs in float32 end to end: the decay lives in log space and compounds over the
    # whole sequence, so it must not be rounded to 16 bits; the state is float32 anyway.
    f32 = torch.float32
    out, state = torch.ops.qwen3next.linear_attention(
        q.to(f32), k.to(f32), v.to(f32), state.to(f32), g.to(f32), beta.to(f32), num_k_heads, num_v_heads, float(scale)
    )
    return out, state


def _attention_kernel(q, k, v, scale, key_mask=None):
    # One ONNX (opset 23) Attention node with a single output: TensorRT maps it to its native
    # attention layer. The mask lets query i (absolute position P+i) see keys j <= P+i that the
    # key mask marks as real tokens.
    T, S = q.shape[2], k.shape[2]
    visible = torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + (S - T)
    if key_mask is not None:
        visible = visible[None, None] & key_mask[:, None, None, :]
    # enable_gqa only when heads are shared: the ONNX translation of SDPA refuses it for plain
    # multi-head attention (num_key_value_heads == num_attention_heads)
    gqa = q.shape[1] != k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)


def export_kernels(moe_weights=None) -> Kernels:
    """Kernels for tracing. `moe_weights(block) -> (fc1, fc1_bias, fc2, fc2_bias)` gives a MoE block's
    stacked expert tensors, registered as buffers of the traced module so they become initializers."""

    def routed_experts(block, x, router_logits):
        fc1, fc1_bias, fc2, fc2_bias = moe_weights(block)
        return torch.ops.qwen3next.moe(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, block.top_k, int(block.norm_topk_prob))

    return Kernels(
        causal_conv=_conv_kernel,
        linear_attention=_linear_attention_kernel,
        attention=_attention_kernel,
        routed_experts=routed_experts,
    )


def stack_experts(block) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 [E, 2I, H] with rows gate_0, up_0, gate_1, up_1, ... and fc2 [E, H, I] from per-expert weights."""
    gate = torch.stack([e.gate_proj.weight.detach() for e in block.experts])
    up = torch.stack([e.up_proj.weight.detach() for e in block.experts])
    fc1 = torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1], gate.shape[2])
    fc2 = torch.stack([e.down_proj.weight.detach() for e in block.experts])
    return fc1, fc2


__all__ = ["CUSTOM_OPS", "MS_DOMAIN", "TRANSLATION_TABLE", "export_kernels", "stack_experts"]
