"""TensorRT binding of com.microsoft::MoE (activation swiglu, swiglu_fusion 1) -> q3n_moe.

Inputs: input [N, H] (or [B, T, H]), router_probs [N, E] (router logits), fc1_experts_weights
[E, 2I, H] (gate/up rows interleaved), fc1_experts_bias [E, 2I], fc2_experts_weights [E, H, I],
fc2_experts_bias [E, H]; output: like input. One float dtype for all.
"""

from ..opspec import Field, OpSpec, dims, dtype_code, float_types, ptr


def _shapes(values, inputs, builder, trt):
    return [trt.DimsExprs(inputs[0])]


def _dtypes(input_types, trt):
    return [input_types[0]]


def _supports(pos, descs, num_inputs, trt):
    return descs[pos].type in float_types(trt) and descs[pos].type == descs[0].type


def _validate(values):
    if values["activation_type"] != "swiglu" or values["swiglu_fusion"] != 1:
        return f"activation_type {values['activation_type']!r} with swiglu_fusion {values['swiglu_fusion']}: only swiglu with interleaved gate/up rows (swiglu_fusion=1) is implemented"
    if values["use_sparse_mixer"]:
        return "use_sparse_mixer=1 is not implemented"
    if values["k"] < 1:
        return f"k={values['k']} must be >= 1"
    return None


def _sizes(input_dims, fc1_dims):
    tokens = 1
    for d in input_dims[:-1]:
        tokens *= d
    experts, two_inter, hidden = fc1_dims
    return tokens, hidden, two_inter // 2, experts


def _workspace(values, inputs, outputs):
    from qwen3next_trt.plugins.torch_ops import load_library

    tokens, hidden, inter, experts = _sizes([int(d) for d in inputs[0].max], [int(d) for d in inputs[2].max])
    return load_library().q3n_moe_workspace_size(tokens, experts, values["k"], hidden, inter)


def _enqueue(values, input_desc, output_desc, inputs, outputs, workspace, stream, lib, trt):
    tokens, hidden, inter, experts = _sizes(dims(input_desc[0]), dims(input_desc[2]))
    if values["k"] > experts:
        return -1
    size = lib.q3n_moe_workspace_size(tokens, experts, values["k"], hidden, inter)
    return lib.q3n_moe(
        ptr(inputs[0]), ptr(inputs[1]), ptr(inputs[2]), ptr(inputs[3]), ptr(inputs[4]), ptr(inputs[5]),
        ptr(outputs[0]), tokens, hidden, inter, experts, values["k"], values["normalize_routing_weights"],
        dtype_code(trt, input_desc[0].type), ptr(workspace), size, ptr(stream),
    )


SPEC = OpSpec(
    name="MoE",
    num_outputs=1,
    fields=[
        Field("k", "int", 1),
        Field("activation_type", "str", "swiglu"),
        Field("swiglu_fusion", "int", 1),
        Field("normalize_routing_weights", "int", 1),
        Field("use_sparse_mixer", "int", 0),
        Field("activation_alpha", "float", 1.0),
        Field("activation_beta", "float", 0.0),
    ],
    output_shapes=_shapes,
    output_dtypes=_dtypes,
    supports=_supports,
    enqueue=_enqueue,
    workspace=_workspace,
    validate=_validate,
)
