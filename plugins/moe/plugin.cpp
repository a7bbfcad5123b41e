// TensorRT IPluginV3 op com.microsoft::MoE (activation swiglu, swiglu_fusion 1) -> q3n_moe / q3n_moe_fp8
// (kernel.cu). The C++ twin of binding.py: same fields, shapes, dtypes, checks; plus an FP8 form.
//
// Float form, 6 inputs: input [N, H] (or [B, T, H]), router_probs [N, E] (router logits),
// fc1_experts_weights [E, 2I, H] (gate/up rows interleaved), fc1_experts_bias [E, 2I],
// fc2_experts_weights [E, H, I], fc2_experts_bias [E, H]; one float dtype for all.
// FP8 form, 8 inputs: fc1 / fc2 float8 e4m3, then their float32 128x128 block scales [E, 2*ceil(I/128),
// ceil(H/128)] (gate blocks, then up blocks: the checkpoint's two scale tensors) and [E, ceil(H/128),
// ceil(I/128)] (README.md); the biases keep the activations' dtype and are ignored (the FP8 kernels have
// none: `build` folds only graphs whose biases are zero). engines/fold.py writes this form.
// Output: like input.
#include "../cpp/plugin.h"

namespace q3n_trt {
namespace {

constexpr int32_t kFloatInputs = 6;
constexpr int32_t kFp8Inputs = 8;

std::string validate(Values const& v) {
    if (v.s("activation_type") != "swiglu" || v.i("swiglu_fusion") != 1)
        return "activation_type '" + v.s("activation_type") + "' with swiglu_fusion " +
               std::to_string(v.i("swiglu_fusion")) +
               ": only swiglu with interleaved gate/up rows (swiglu_fusion=1) is implemented";
    if (v.i("use_sparse_mixer") != 0) return "use_sparse_mixer=1 is not implemented";
    if (v.i("k") < 1) return "k=" + std::to_string(v.i("k")) + " must be >= 1";
    return {};
}

int32_t outputTypes(DataType* out, int32_t, DataType const* in, int32_t) {
    out[0] = in[0];
    return 0;
}

int32_t outputShapes(Values const&, DimsExprs const* in, int32_t nbIn, DimsExprs* out, int32_t, nvinfer1::IExprBuilder&) {
    if (nbIn != kFloatInputs && nbIn != kFp8Inputs) return -1;
    out[0] = in[0];
    return 0;
}

bool supports(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbIn, int32_t) {
    if (nbIn != kFloatInputs && nbIn != kFp8Inputs) return false;
    DataType t = io[pos].desc.type;
    if (nbIn == kFp8Inputs) {
        if (pos == 2 || pos == 4) return t == DataType::kFP8;
        if (pos == 6 || pos == 7) return t == DataType::kFLOAT;
    }
    return isFloatType(t) && t == io[0].desc.type;
}

struct Sizes {
    int64_t tokens, hidden, inter, experts;
};

Sizes sizesOf(nvinfer1::Dims const& x, nvinfer1::Dims const& fc1) {
    return {volume(x, 0, x.nbDims - 1), fc1.d[2], fc1.d[1] / 2, fc1.d[0]};
}

size_t workspace(Values const& v, DynamicPluginTensorDesc const* in, int32_t) {
    if (in[0].max.nbDims < 1 || in[2].max.nbDims != 3) return 0;
    Sizes s = sizesOf(in[0].max, in[2].max);
    return q3n_moe_workspace_size(static_cast<int>(s.tokens), static_cast<int>(s.experts), v.i("k"),
                                  static_cast<int>(s.hidden), static_cast<int>(s.inter));
}

int32_t enqueue(Values const& v, PluginTensorDesc const* in, int32_t nbIn, PluginTensorDesc const*,
                void const* const* inputs, void* const* outputs, void* ws, cudaStream_t stream) {
    if (in[0].dims.nbDims < 1 || in[2].dims.nbDims != 3) return -2;  // Q3N_ERR_BAD_SHAPE
    Sizes s = sizesOf(in[0].dims, in[2].dims);
    int k = v.i("k");
    if (k > s.experts) return -4;  // Q3N_ERR_BAD_ATTRIBUTE: top-k of fewer experts
    int tokens = static_cast<int>(s.tokens), hidden = static_cast<int>(s.hidden), inter = static_cast<int>(s.inter),
        experts = static_cast<int>(s.experts);
    size_t bytes = q3n_moe_workspace_size(tokens, experts, k, hidden, inter);
    int normalize = v.i("normalize_routing_weights");
    if (nbIn == kFp8Inputs) {
        auto blocks = [](int64_t n) { return (n + 127) / 128; };
        nvinfer1::Dims const &s1 = in[6].dims, &s2 = in[7].dims;
        if (s1.nbDims != 3 || s1.d[0] != s.experts || s1.d[1] != 2 * blocks(s.inter) || s1.d[2] != blocks(s.hidden) ||
            s2.nbDims != 3 || s2.d[0] != s.experts || s2.d[1] != blocks(s.hidden) || s2.d[2] != blocks(s.inter))
            return -2;  // Q3N_ERR_BAD_SHAPE: scales not of the layout above
    }
    if (nbIn == kFp8Inputs)
        return q3n_moe_fp8(inputs[0], inputs[1], static_cast<unsigned char const*>(inputs[2]),
                           static_cast<float const*>(inputs[6]), static_cast<unsigned char const*>(inputs[4]),
                           static_cast<float const*>(inputs[7]), outputs[0], tokens, hidden, inter, experts, k,
                           normalize, dtypeCode(in[0].type), ws, bytes, stream);
    return q3n_moe(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5], outputs[0], tokens, hidden, inter,
                   experts, k, normalize, dtypeCode(in[0].type), ws, bytes, stream);
}

FieldValue intField(int32_t i) { return FieldValue{Kind::kInt, i, 0.f, {}}; }
FieldValue floatField(float f) { return FieldValue{Kind::kFloat, 0, f, {}}; }

}  // namespace

OpDef const& moeOp() {
    static OpDef const op{
        "MoE",
        1,
        {
            {"k", intField(1)},
            {"activation_type", FieldValue{Kind::kString, 0, 0.f, "swiglu"}},
            {"swiglu_fusion", intField(1)},
            {"normalize_routing_weights", intField(1)},
            {"use_sparse_mixer", intField(0)},
            {"activation_alpha", floatField(1.0f)},
            {"activation_beta", floatField(0.0f)},
        },
        kFloatInputs,
        kFp8Inputs,
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
