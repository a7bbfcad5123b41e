"""TensorRT binding of com.microsoft::LinearAttention (update_rule gated_delta) -> q3n_linear_attention.

Inputs: query, key [B, T, Hk*Dk], value [B, T, Hv*Dv], past_state [B, Hv, Dk, Dv] float32, decay
[B, T, Hv] (log space), beta [B, T, Hv]; outputs: output [B, T, Hv*Dv], present_state float32.
q/k/v/decay/beta/output share one float dtype; the states are float32 always.
"""

from ..opspec import Field, OpSpec, dims, dtype_code, float_types, ptr

MAX_HEAD_DIM = 256


def _shapes(values, inputs, builder, trt):
    return [trt.DimsExprs(inputs[2]), trt.DimsExprs(inputs[3])]


def _dtypes(input_types, trt):
    return [input_types[2], trt.DataType.FLOAT]


def _supports(pos, descs, num_inputs, trt):
    state = pos in (3, num_inputs + 1)
    if state:
        return descs[pos].type == trt.DataType.FLOAT
    return descs[pos].type in float_types(trt) and descs[pos].type == descs[0].type


def _validate(values):
    hk, hv = values["q_num_heads"], values["kv_num_heads"]
    if hk < 1 or hv < 1 or hv % hk:
        return f"kv_num_heads={hv} must be a positive multiple of q_num_heads={hk}"
    if values["update_rule"] != "gated_delta":
        return f"update_rule {values['update_rule']!r}: only 'gated_delta' is implemented"
    return None


def _sizes(values, q_dims, v_dims):
    B, T, qk = q_dims
    hk, hv = values["q_num_heads"], values["kv_num_heads"]
    return B, T, hk, hv, qk // hk, v_dims[-1] // hv


def _workspace(values, inputs, outputs):
    """The split prefill's factors, for the largest shapes (the size only grows with batch and seq)."""
    from qwen3next_trt.plugins.torch_ops import load_library

    return load_library().q3n_linear_attention_workspace_size(
        *_sizes(values, [int(d) for d in inputs[0].max], [int(d) for d in inputs[2].max]))


def _enqueue(values, input_desc, output_desc, inputs, outputs, workspace, stream, lib, trt):
    import ctypes

    B, T, hk, hv, dk, dv = _sizes(values, dims(input_desc[0]), dims(input_desc[2]))
    scale = values["scale"] if values["scale"] > 0 else dk**-0.5
    ws_bytes = lib.q3n_linear_attention_workspace_size(B, T, hk, hv, dk, dv)
    return lib.q3n_linear_attention(
        ptr(inputs[0]), ptr(inputs[1]), ptr(inputs[2]), ptr(inputs[3]), ptr(inputs[4]), ptr(inputs[5]),
        ptr(outputs[0]), ptr(outputs[1]), B, T, hk, hv, dk, dv, ctypes.c_float(scale),
        dtype_code(trt, input_desc[0].type), ptr(workspace), ws_bytes, ptr(stream),
    )


SPEC = OpSpec(
    name="LinearAttention",
    num_outputs=2,
    fields=[
        Field("q_num_heads", "int", 0),
        Field("kv_num_heads", "int", 0),
        Field("update_rule", "str", "gated_delta"),
        Field("scale", "float", 0.0),  # 0: 1/sqrt(key head dim), as ONNX Runtime's default
        Field("chunk_size", "int", 64),
    ],
    output_shapes=_shapes,
    output_dtypes=_dtypes,
    supports=_supports,
    workspace=_workspace,
    enqueue=_enqueue,
    validate=_validate,
)
