"""TensorRT binding of com.microsoft::CausalConvWithState -> q3n_causal_conv_with_state (kernel.cu).

Inputs: input [B, C, T], weight [C, 1, K], bias [C], past_state [B, C, K-1]; outputs: output
[B, C, T], present_state [B, C, K-1]. One float dtype for all (float32, float16, bfloat16).
"""

from ..opspec import Field, OpSpec, dims, dtype_code, float_types, ptr

ACTIVATIONS = {"none": 0, "silu": 1}


def _shapes(values, inputs, builder, trt):
    return [trt.DimsExprs(inputs[0]), trt.DimsExprs(inputs[3])]


def _dtypes(input_types, trt):
    return [input_types[0], input_types[0]]


def _supports(pos, descs, num_inputs, trt):
    # every tensor in the first input's float type
    return descs[pos].type in float_types(trt) and descs[pos].type == descs[0].type


def _enqueue(values, input_desc, output_desc, inputs, outputs, workspace, stream, lib, trt):
    B, C, T = dims(input_desc[0])
    K = dims(input_desc[1])[-1]
    return lib.q3n_causal_conv_with_state(
        ptr(inputs[0]), ptr(inputs[1]), ptr(inputs[2]), ptr(inputs[3]), ptr(outputs[0]), ptr(outputs[1]),
        B, C, T, K, ACTIVATIONS[values["activation"]], dtype_code(trt, input_desc[0].type), ptr(stream),
    )


SPEC = OpSpec(
    name="CausalConvWithState",
    num_outputs=2,
    fields=[
        Field("activation", "str", "silu", lambda v: None if v in ACTIVATIONS else f"expected one of {sorted(ACTIVATIONS)}, got {v!r}"),
        Field("ndim", "int", 1, lambda v: None if v == 1 else f"only 1-D convolution is supported, got {v}"),
    ],
    output_shapes=_shapes,
    output_dtypes=_dtypes,
    supports=_supports,
    enqueue=_enqueue,
)
