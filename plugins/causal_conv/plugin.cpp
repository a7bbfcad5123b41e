// TensorRT IPluginV3 op com.microsoft::CausalConvWithState -> q3n_causal_conv_with_state (kernel.cu).
// The C++ twin of binding.py: same fields, shapes, dtypes, checks.
//
// Inputs: input [B, C, T], weight [C, 1, K], bias [C], past_state [B, C, K-1]; outputs: output
// [B, C, T], present_state [B, C, K-1]. One float dtype for all (float32, float16, bfloat16).
#include "../cpp/plugin.h"

namespace q3n_trt {
namespace {

std::vector<char const*> const kActivations{"none", "silu"};

std::string checkActivation(FieldValue const& v) { return oneOf(v, kActivations); }

std::string checkNdim(FieldValue const& v) {
    return v.i == 1 ? std::string() : "only 1-D convolution is supported, got " + std::to_string(v.i);
}

int32_t outputTypes(DataType* out, int32_t, DataType const* in, int32_t) {
    out[0] = in[0];
    out[1] = in[0];
    return 0;
}

int32_t outputShapes(Values const&, DimsExprs const* in, int32_t, DimsExprs* out, int32_t, nvinfer1::IExprBuilder&) {
    out[0] = in[0];
    out[1] = in[3];
    return 0;
}

bool supports(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) {
    return isFloatType(io[pos].desc.type) && io[pos].desc.type == io[0].desc.type;
}

int32_t enqueue(Values const& v, PluginTensorDesc const* in, int32_t, PluginTensorDesc const*,
                void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) {
    auto const& x = in[0].dims;
    if (x.nbDims != 3 || in[1].dims.nbDims < 1) return -2;  // Q3N_ERR_BAD_SHAPE
    int kernel = static_cast<int>(in[1].dims.d[in[1].dims.nbDims - 1]);
    int activation = v.s("activation") == "silu" ? 1 : 0;
    return q3n_causal_conv_with_state(inputs[0], inputs[1], inputs[2], inputs[3], outputs[0], outputs[1],
                                      static_cast<int>(x.d[0]), static_cast<int>(x.d[1]), static_cast<int>(x.d[2]),
                                      kernel, activation, dtypeCode(in[0].type), stream);
}

}  // namespace

OpDef const& causalConvOp() {
    static OpDef const op{
        "CausalConvWithState",
        2,
        {
            {"activation", FieldValue{Kind::kString, 0, 0.f, "silu"}, checkActivation},
            {"ndim", FieldValue{Kind::kInt, 1, 0.f, {}}, checkNdim},
        },
        4,
        4,
        nullptr,
        outputTypes,
        outputShapes,
        supports,
        nullptr,
        enqueue,
    };
    return op;
}

}  // namespace q3n_trt
