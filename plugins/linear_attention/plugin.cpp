// TensorRT IPluginV3 op com.microsoft::LinearAttention (update_rule gated_delta) -> q3n_linear_attention
// (kernel.cu). The C++ twin of binding.py: same fields, shapes, dtypes, checks.
//
// Inputs: query, key [B, T, Hk*Dk], value [B, T, Hv*Dv], past_state [B, Hv, Dk, Dv] float32, decay
// [B, T, Hv] (log space), beta [B, T, Hv]; outputs: output [B, T, Hv*Dv], present_state float32.
#include "../cpp/plugin.h"

#include <cmath>

namespace q3n_trt {
namespace {

std::string validate(Values const& v) {
    int32_t hk = v.i("q_num_heads"), hv = v.i("kv_num_heads");
    if (hk < 1 || hv < 1 || hv % hk != 0)
        return "kv_num_heads=" + std::to_string(hv) + " must be a positive multiple of q_num_heads=" + std::to_string(hk);
    if (v.s("update_rule") != "gated_delta")
        return "update_rule '" + v.s("update_rule") + "': only 'gated_delta' is implemented";
    return {};
}

int32_t outputTypes(DataType* out, int32_t, DataType const* in, int32_t) {
    out[0] = in[2];
    out[1] = DataType::kFLOAT;
    return 0;
}

int32_t outputShapes(Values const&, DimsExprs const* in, int32_t, DimsExprs* out, int32_t, nvinfer1::IExprBuilder&) {
    out[0] = in[2];
    out[1] = in[3];
    return 0;
}

bool supports(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbIn, int32_t) {
    // The recurrent states stay float32 whatever the activations' dtype: the scan accumulates in them.
    if (pos == 3 || pos == nbIn + 1) return io[pos].desc.type == DataType::kFLOAT;
    return isFloatType(io[pos].desc.type) && io[pos].desc.type == io[0].desc.type;
}

// batch, seq, head dims from the q / v dims; false when they do not split into the heads.
struct Sizes {
    int batch, seq, dk, dv;
};
bool sizesOf(Values const& v, nvinfer1::Dims const& q, nvinfer1::Dims const& val, Sizes& s) {
    int32_t hk = v.i("q_num_heads"), hv = v.i("kv_num_heads");
    if (q.nbDims != 3 || val.nbDims != 3 || q.d[2] % hk != 0 || val.d[2] % hv != 0) return false;
    s = {static_cast<int>(q.d[0]), static_cast<int>(q.d[1]), static_cast<int>(q.d[2] / hk), static_cast<int>(val.d[2] / hv)};
    return true;
}

// The split prefill's factors, for the largest shapes (the size only grows with batch and seq).
size_t workspace(Values const& v, DynamicPluginTensorDesc const* in, int32_t) {
    Sizes s{};
    if (!sizesOf(v, in[0].max, in[2].max, s)) return 0;
    return q3n_linear_attention_workspace_size(s.batch, s.seq, v.i("q_num_heads"), v.i("kv_num_heads"), s.dk, s.dv);
}

int32_t enqueue(Values const& v, PluginTensorDesc const* in, int32_t, PluginTensorDesc const*,
                void const* const* inputs, void* const* outputs, void* ws, cudaStream_t stream) {
    Sizes s{};
    if (!sizesOf(v, in[0].dims, in[2].dims, s)) return -2;  // Q3N_ERR_BAD_SHAPE
    int32_t hk = v.i("q_num_heads"), hv = v.i("kv_num_heads");
    float scale = v.f("scale") > 0.f ? v.f("scale") : 1.0f / std::sqrt(static_cast<float>(s.dk));
    size_t bytes = q3n_linear_attention_workspace_size(s.batch, s.seq, hk, hv, s.dk, s.dv);
    return q3n_linear_attention(inputs[0], inputs[1], inputs[2], static_cast<float const*>(inputs[3]), inputs[4],
                                inputs[5], outputs[0], static_cast<float*>(outputs[1]), s.batch, s.seq, hk, hv, s.dk,
                                s.dv, scale, dtypeCode(in[0].type), ws, bytes, stream);
}

FieldValue intField(int32_t i) { return FieldValue{Kind::kInt, i, 0.f, {}}; }

}  // namespace

OpDef const& linearAttentionOp() {
    static OpDef const op{
        "LinearAttention",
        2,
        {
            {"q_num_heads", intField(0)},
            {"kv_num_heads", intField(0)},
            {"update_rule", FieldValue{Kind::kString, 0, 0.f, "gated_delta"}},
            // 0: 1/sqrt(key head dim), as ONNX Runtime's default
            {"scale", FieldValue{Kind::kFloat, 0, 0.f, {}}},
            {"chunk_size", intField(64)},
        },
        6,
        6,
        validate,
        outputTypes,
        outputShapes,
        supports,
        workspace,
        enqueue,
    };
    return op;
}

}  // namespace q3n_trt
