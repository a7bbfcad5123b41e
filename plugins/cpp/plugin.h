// The C++ TensorRT plugin library (libqwen3next_trt_plugins.so): one generic IPluginV3 class and one
// IPluginCreatorV3One class, each op described by an OpDef (plugins/<op>/plugin.cpp) that mirrors the
// Python binding's OpSpec (plugins/<op>/binding.py): same name, version "1", namespace "", fields.
//
// TensorRT headers stay out of the .cu files (PLATFORM.md: their anonymous namespaces clash under
// nvcc), so the ops reach the kernels only through the C launch functions declared below.
#pragma once

#include "NvInferRuntime.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// The kernels' C entry points (plugins/*/kernel.cu, compiled by nvcc into the same library).
extern "C" {
int q3n_causal_conv_with_state(const void* x, const void* weight, const void* bias, const void* past_state, void* y,
                               void* present_state, int batch, int channels, int seq, int kernel, int activation,
                               int dtype, cudaStream_t stream);
int q3n_linear_attention(const void* q, const void* k, const void* v, const float* past_state, const void* decay,
                         const void* beta, void* out, float* present_state, int batch, int seq, int num_k_heads,
                         int num_v_heads, int head_k_dim, int head_v_dim, float scale, int dtype, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);
size_t q3n_linear_attention_workspace_size(int batch, int seq, int num_k_heads, int num_v_heads, int head_k_dim,
                                           int head_v_dim);
size_t q3n_moe_workspace_size(int tokens, int experts, int top_k, int hidden, int inter);
int q3n_moe(const void* x, const void* router_logits, const void* fc1, const void* fc1_bias, const void* fc2,
            const void* fc2_bias, void* out, int tokens, int hidden, int inter, int experts, int top_k, int normalize,
            int dtype, void* workspace, size_t workspace_bytes, cudaStream_t stream);
int q3n_moe_fp8(const void* x, const void* router_logits, const unsigned char* fc1, const float* scale1,
                const unsigned char* fc2, const float* scale2, void* out, int tokens, int hidden, int inter,
                int experts, int top_k, int normalize, int dtype, void* workspace, size_t workspace_bytes,
                cudaStream_t stream);
}

namespace q3n_trt {

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginTensorDesc;

constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";

enum class Kind { kInt, kFloat, kString };

// One creator field: its ONNX attribute name, kind, default, and an optional check of its value alone
// (returns the expectation it violates, empty when fine). Checks that need several fields go in
// OpDef::validate.
struct FieldValue {
    Kind kind = Kind::kInt;
    int32_t i = 0;
    float f = 0.f;
    std::string s;
};

struct FieldDef {
    char const* name;
    FieldValue fallback;
    std::string (*check)(FieldValue const&) = nullptr;
};

class Values {
public:
    std::vector<char const*> names;
    std::vector<FieldValue> values;
    FieldValue const& at(char const* name) const;
    int32_t i(char const* name) const { return at(name).i; }
    float f(char const* name) const { return at(name).f; }
    std::string const& s(char const* name) const { return at(name).s; }
};

struct OpDef {
    char const* name;
    int32_t nbOutputs;
    std::vector<FieldDef> fields;
    // Input counts the op accepts (the ONNX node's inputs after the parser).
    int32_t minInputs;
    int32_t maxInputs;
    std::string (*validate)(Values const&);
    int32_t (*outputTypes)(DataType* out, int32_t nbOut, DataType const* in, int32_t nbIn);
    int32_t (*outputShapes)(Values const&, DimsExprs const* in, int32_t nbIn, DimsExprs* out, int32_t nbOut,
                            nvinfer1::IExprBuilder& builder);
    bool (*supports)(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbIn, int32_t nbOut);
    size_t (*workspace)(Values const&, DynamicPluginTensorDesc const* in, int32_t nbIn);
    int32_t (*enqueue)(Values const&, PluginTensorDesc const* in, int32_t nbIn, PluginTensorDesc const* out,
                       void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream);
};

// The ops, defined in plugins/<op>/plugin.cpp.
OpDef const& causalConvOp();
OpDef const& linearAttentionOp();
OpDef const& moeOp();

// Shared helpers for the OpDefs.
int dtypeCode(DataType t);  // the kernels' dtype code (common.cuh), -1 for others
bool isFloatType(DataType t);
int64_t volume(nvinfer1::Dims const& d, int32_t first, int32_t last);  // product of d[first..last)
std::string oneOf(FieldValue const& v, std::vector<char const*> const& allowed);

// Errors go to TensorRT's logger (setLoggerFinder) and, once the library registered itself with a
// registry, to that registry's error recorder; the last one is kept for q3n_plugin_last_error().
void reportError(std::string const& message);
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message);

}  // namespace q3n_trt
