// decode_step: one decode step of a Qwen3-Next per-layer TensorRT engine set, batch 1, from C++.
//
//   decode_step [--plugins LIB.so] [--token ID] [--past N] [--runs N] EMBED LAYER... FINAL
//
// The engines are given in model order: embed, every decoder layer, final (the norm + logits graph).
// Nothing is read from the `.engine.json` files beside them: each engine's inputs and outputs are
// found by name through TensorRT's I/O tensor API, so no JSON parser is needed. What it does:
// the token goes through embed, the hidden state through each layer ("hidden" in, "hidden_out"
// out) and into final; every state input (DeltaNet conv / recurrent state, attention past K/V)
// starts at zero, as for the first token of a sequence; it prints the argmax of the logits and the
// time of each engine. A generation loop would, after each step, feed every `*_out` / `present_*`
// output back as the matching state input and grow `past` by one; that is left out to stay short.
// See README.md next to this file for building and running it.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

[[noreturn]] void fail(std::string const& message) {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    std::exit(1);
}

void checkCuda(cudaError_t status, std::string const& what) {
    if (status != cudaSuccess) fail(what + ": " + cudaGetErrorString(status));
}

// TensorRT reports why a call failed (a missing plugin creator, an engine of another version)
// only through the logger: show warnings and errors.
class Logger : public ILogger {
    void log(Severity severity, char const* message) noexcept override {
        if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", message);
    }
};

size_t elementSize(DataType type) {
    switch (type) {
        case DataType::kFLOAT: case DataType::kINT32: return 4;
        case DataType::kHALF: case DataType::kBF16: return 2;
        case DataType::kINT8: case DataType::kUINT8: case DataType::kBOOL: case DataType::kFP8: return 1;
        case DataType::kINT64: return 8;
        default: return 0;  // packed sub-byte types: not at the I/O of these engines
    }
}

std::string str(Dims const& d) {
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
    return s + "]";
}

int64_t volume(Dims const& d) {
    int64_t n = 1;
    for (int32_t i = 0; i < d.nbDims; ++i) n *= d.d[i];
    return n;
}

// One small integer value per element, in the tensor's own type (token id, position, mask ones).
std::vector<uint8_t> filled(DataType type, int64_t count, int64_t value, std::string const& where) {
    std::vector<uint8_t> bytes(static_cast<size_t>(count) * elementSize(type));
    for (int64_t i = 0; i < count; ++i) {
        uint8_t* p = bytes.data() + i * elementSize(type);
        if (type == DataType::kINT64) std::memcpy(p, &value, 8);
        else if (type == DataType::kINT32) { int32_t v = static_cast<int32_t>(value); std::memcpy(p, &v, 4); }
        else if (type == DataType::kFLOAT) { float v = static_cast<float>(value); std::memcpy(p, &v, 4); }
        else if (type == DataType::kBOOL || type == DataType::kUINT8) *p = static_cast<uint8_t>(value);
        else fail(where + ": unexpected data type " + std::to_string(static_cast<int>(type)));
    }
    return bytes;
}

// A 16-bit float (IEEE half or bfloat16) read on the host, for the argmax of the logits.
float toFloat(uint16_t h, bool bf16) {
    uint32_t bits;
    if (bf16) {
        bits = static_cast<uint32_t>(h) << 16;
    } else {
        uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
        if (exponent == 0x1F) bits = sign | 0x7F800000u | (mantissa << 13);                  // inf / NaN
        else if (exponent != 0) bits = sign | ((exponent + 112) << 23) | (mantissa << 13);  // normal
        else {                                                                                // zero / subnormal
            float f = std::ldexp(static_cast<float>(mantissa), -24);
            return sign ? -f : f;
        }
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct Tensor {
    std::string name;
    bool isInput = false;
    DataType type = DataType::kFLOAT;
    Dims shape{};
    void* device = nullptr;
    bool owned = false;  // false: another engine's output, bound here as this engine's input
};

struct Stage {
    std::string path;
    std::unique_ptr<ICudaEngine> engine;
    std::unique_ptr<IExecutionContext> context;
    int32_t profile = 0;
    std::vector<Tensor> tensors;
    cudaEvent_t start = nullptr, stop = nullptr;

    Tensor* find(std::string const& name, bool input) {
        for (Tensor& t : tensors)
            if (t.name == name && t.isInput == input) return &t;
        return nullptr;
    }
};

std::vector<char> readFile(std::string const& path) {
    std::ifstream file(path, std::ios::binary | std::ios::ate);
    if (!file) fail(path + ": cannot open");
    std::vector<char> bytes(static_cast<size_t>(file.tellg()));
    if (bytes.empty()) fail(path + ": empty file, not an engine");
    file.seekg(0);
    if (!file.read(bytes.data(), static_cast<std::streamsize>(bytes.size()))) fail(path + ": cannot read");
    return bytes;
}

// The shape of one input for a decode step of batch 1 over `past` cached positions. The engine
// reports dynamic axes as -1; which axis is which follows from the exported graphs' port layouts
// (manifest.json): batch first everywhere, past on axis 2 of past_key / past_value, past + 1 on
// the mask's last axis; every other dynamic axis is the sequence axis: one new token.
Dims decodeShape(std::string const& name, Dims shape, int64_t past) {
    for (int32_t i = 0; i < shape.nbDims; ++i) {
        if (shape.d[i] != -1) continue;
        if (i == 0) shape.d[i] = 1;
        else if ((name == "past_key" || name == "past_value") && i == 2) shape.d[i] = past;
        else if (name == "attention_mask" && i == shape.nbDims - 1) shape.d[i] = past + 1;
        else shape.d[i] = 1;
    }
    return shape;
}

std::string version(int32_t v) {  // 101401 -> "10.14.1"
    return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

int64_t parseInt(char const* text, char const* flag, int64_t lowest) {
    char* end = nullptr;
    long long value = std::strtoll(text, &end, 10);
    if (!*text || *end || value < lowest)
        fail(std::string(flag) + ": expected a whole number >= " + std::to_string(lowest) + ", got '" + text + "'");
    return value;
}

}  // namespace

int main(int argc, char** argv) {
    std::string plugins;
    int64_t token = 0, past = 0, runs = 2;
    std::vector<std::string> paths;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        bool hasValue = i + 1 < argc;
        if (arg == "--plugins" && hasValue) plugins = argv[++i];
        else if (arg == "--token" && hasValue) token = parseInt(argv[++i], "--token", 0);
        else if (arg == "--past" && hasValue) past = parseInt(argv[++i], "--past", 0);
        else if (arg == "--runs" && hasValue) runs = parseInt(argv[++i], "--runs", 1);
        else if (arg.rfind("--", 0) == 0) fail("unknown option or missing value: " + arg);
        else paths.push_back(arg);
    }
    if (paths.size() < 2) {
        std::fprintf(stderr, "usage: %s [--plugins LIB.so] [--token ID] [--past N] [--runs N] EMBED LAYER... FINAL\n"
                             "  engines in model order: embed, each decoder layer, final\n", argv[0]);
        return 2;
    }
    // Read every file first: a wrong path is reported before any GPU work starts.
    std::vector<std::vector<char>> plans;
    for (std::string const& path : paths) plans.push_back(readFile(path));

    std::printf("TensorRT %s (compiled with %s headers)\n", version(getInferLibVersion()).c_str(),
                version(static_cast<int32_t>(NV_TENSORRT_VERSION)).c_str());
    cudaDeviceProp prop{};
    checkCuda(cudaGetDeviceProperties(&prop, 0), "CUDA device 0");
    std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    cudaStream_t stream;
    checkCuda(cudaStreamCreate(&stream), "cudaStreamCreate");

    Logger logger;
    std::unique_ptr<IRuntime> runtime{createInferRuntime(logger)};
    if (!runtime) fail("createInferRuntime failed");
    // A plan stores each plugin's name and fields only: the creators must be registered before
    // deserialising. loadLibrary calls the library's getCreators / setLoggerFinder (what trtexec
    // --dynamicPlugins does), on the runtime's registry as engines/session.py does. Plans that carry
    // the library (`build --embed-plugins`, trtexec --setPluginsToSerialize) may do without it.
    if (!plugins.empty() && !runtime->getPluginRegistry().loadLibrary(plugins.c_str()))
        fail(plugins + ": TensorRT did not load this plugin library (its message is above)");

    std::vector<Stage> stages(paths.size());
    for (size_t k = 0; k < stages.size(); ++k) {
        Stage& s = stages[k];
        s.path = paths[k];
        s.engine.reset(runtime->deserializeCudaEngine(plans[k].data(), plans[k].size()));
        if (!s.engine)
            fail(s.path + ": cannot deserialize (TensorRT's message is above: an engine of another TensorRT "
                          "version or GPU, or a plugin not registered: pass --plugins)");
        plans[k] = {};  // the engine holds its own copy of the weights
        s.context.reset(s.engine->createExecutionContext());
        if (!s.context) fail(s.path + ": createExecutionContext failed (out of GPU memory?)");
        // A layer engine with two optimization profiles holds prefill (0) and decode (1, seq = 1).
        s.profile = s.engine->getNbOptimizationProfiles() == 2 ? 1 : 0;
        if (!s.context->setOptimizationProfileAsync(s.profile, stream))
            fail(s.path + ": cannot select optimization profile " + std::to_string(s.profile));
        for (int32_t i = 0; i < s.engine->getNbIOTensors(); ++i) {
            Tensor t;
            t.name = s.engine->getIOTensorName(i);
            t.isInput = s.engine->getTensorIOMode(t.name.c_str()) == TensorIOMode::kINPUT;
            t.type = s.engine->getTensorDataType(t.name.c_str());
            if (elementSize(t.type) == 0) fail(s.path + ": tensor " + t.name + ": unsupported data type");
            s.tensors.push_back(t);
        }
        if (k == 0 && !s.find("input_ids", true)) fail(s.path + ": the first engine must be embed (input 'input_ids')");
        if (k + 1 == stages.size() && !s.find("logits", false))
            fail(s.path + ": the last engine must be final (output 'logits')");

        // Inputs: shapes within the chosen profile, then contents.
        for (Tensor& t : s.tensors) {
            if (!t.isInput) continue;
            std::string const where = s.path + ": input " + t.name;
            t.shape = decodeShape(t.name, s.engine->getTensorShape(t.name.c_str()), past);
            Dims lo = s.engine->getProfileShape(t.name.c_str(), s.profile, OptProfileSelector::kMIN);
            Dims hi = s.engine->getProfileShape(t.name.c_str(), s.profile, OptProfileSelector::kMAX);
            for (int32_t d = 0; lo.nbDims == t.shape.nbDims && d < t.shape.nbDims; ++d)
                if (t.shape.d[d] < lo.d[d] || t.shape.d[d] > hi.d[d])
                    fail(where + ": shape " + str(t.shape) + " outside profile " + std::to_string(s.profile) + " (min " +
                         str(lo) + ", max " + str(hi) + ")" + (t.name.rfind("past", 0) == 0 ? ": lower --past" : ""));
            if (!s.context->setInputShape(t.name.c_str(), t.shape)) fail(where + ": setInputShape " + str(t.shape) + " refused");
            size_t const bytes = static_cast<size_t>(volume(t.shape)) * elementSize(t.type);
            if (t.name == "hidden" && k > 0) {
                // The previous engine's activation output, used in place: no copy between engines.
                Stage& prev = stages[k - 1];
                Tensor* from = prev.find("hidden_out", false) ? prev.find("hidden_out", false) : prev.find("hidden", false);
                if (!from) fail(prev.path + ": no output 'hidden_out' or 'hidden' to feed " + s.path);
                if (from->type != t.type || volume(from->shape) != volume(t.shape))
                    fail(where + ": " + str(t.shape) + " does not match " + prev.path + "'s output " + from->name + " " +
                         str(from->shape) + " (data type or size): engines of different exports?");
                t.device = from->device;
                continue;
            }
            // A zero-length past is a zero-volume tensor, which still needs a non-null address.
            checkCuda(cudaMalloc(&t.device, bytes > 0 ? bytes : 256), where);
            t.owned = true;
            std::vector<uint8_t> host;
            if (t.name == "input_ids") host = filled(t.type, volume(t.shape), token, where);
            else if (t.name == "position_ids") host = filled(t.type, volume(t.shape), past, where);
            else if (t.name == "attention_mask") host = filled(t.type, volume(t.shape), 1, where);  // every key visible
            else if (t.name == "conv_state" || t.name == "recurrent_state" || t.name == "past_key" || t.name == "past_value")
                checkCuda(cudaMemset(t.device, 0, bytes), where);  // the state before the first token
            else fail(where + ": not an input of the embed / layer / final graphs (engines in the wrong order?)");
            if (!host.empty()) checkCuda(cudaMemcpy(t.device, host.data(), bytes, cudaMemcpyHostToDevice), where);
        }
        if (!s.context->allInputDimensionsSpecified()) fail(s.path + ": an input shape is still unset");
        // Outputs: their shapes follow from the input shapes.
        for (Tensor& t : s.tensors) {
            if (t.isInput) continue;
            t.shape = s.context->getTensorShape(t.name.c_str());
            if (volume(t.shape) < 0) fail(s.path + ": output " + t.name + ": shape " + str(t.shape) + " not known before running");
            size_t const bytes = static_cast<size_t>(volume(t.shape)) * elementSize(t.type);
            checkCuda(cudaMalloc(&t.device, bytes > 0 ? bytes : 256), s.path + ": output " + t.name);
            t.owned = true;
        }
        for (Tensor& t : s.tensors)
            if (!s.context->setTensorAddress(t.name.c_str(), t.device)) fail(s.path + ": setTensorAddress " + t.name + " refused");
        checkCuda(cudaEventCreate(&s.start), "cudaEventCreate");
        checkCuda(cudaEventCreate(&s.stop), "cudaEventCreate");
    }
    Tensor const& logits = *stages.back().find("logits", false);
    int64_t const vocab = logits.shape.d[logits.shape.nbDims - 1];
    if (token >= vocab) fail("--token " + std::to_string(token) + ": the vocabulary has " + std::to_string(vocab) + " tokens");

    // The step, `runs` times over the same inputs (nothing is fed back); the times shown are the last
    // run's: the first one also pays for lazy initialisation and the profile switch.
    for (int64_t run = 0; run < runs; ++run) {
        for (Stage& s : stages) {
            checkCuda(cudaEventRecord(s.start, stream), "cudaEventRecord");
            if (!s.context->enqueueV3(stream)) fail(s.path + ": enqueueV3 failed (TensorRT's message is above)");
            checkCuda(cudaEventRecord(s.stop, stream), "cudaEventRecord");
        }
        checkCuda(cudaStreamSynchronize(stream), "running the engines");
    }
    float total = 0;
    for (Stage& s : stages) {
        float ms = 0;
        checkCuda(cudaEventElapsedTime(&ms, s.start, s.stop), "cudaEventElapsedTime");
        total += ms;
        std::printf("%-40s profile %d  %8.3f ms\n", s.path.c_str(), s.profile, ms);
    }
    std::printf("%-40s            %8.3f ms\n", "total", total);

    // Logits [1, 1, vocab] of the one token: argmax on the host.
    std::vector<uint8_t> host(static_cast<size_t>(volume(logits.shape)) * elementSize(logits.type));
    checkCuda(cudaMemcpy(host.data(), logits.device, host.size(), cudaMemcpyDeviceToHost), "copying the logits");
    int64_t best = -1, nonFinite = 0;
    float bestValue = 0;
    for (int64_t i = 0; i < volume(logits.shape); ++i) {
        float v;
        if (logits.type == DataType::kFLOAT) std::memcpy(&v, host.data() + 4 * i, 4);
        else if (logits.type == DataType::kHALF || logits.type == DataType::kBF16) {
            uint16_t h;
            std::memcpy(&h, host.data() + 2 * i, 2);
            v = toFloat(h, logits.type == DataType::kBF16);
        } else fail("logits: expected float32, float16 or bfloat16");
        if (!std::isfinite(v)) ++nonFinite;
        else if (best < 0 || v > bestValue) best = i, bestValue = v;
    }
    if (nonFinite) std::fprintf(stderr, "warning: %lld of the logits are NaN or infinite\n", static_cast<long long>(nonFinite));
    std::printf("token %lld (past %lld) -> next token %lld (logit %.4f) (vocabulary %lld)\n", static_cast<long long>(token),
                static_cast<long long>(past), static_cast<long long>(best), bestValue, static_cast<long long>(vocab));

    for (Stage& s : stages) {
        for (Tensor& t : s.tensors)
            if (t.owned) cudaFree(t.device);
        cudaEventDestroy(s.start);
        cudaEventDestroy(s.stop);
    }
    cudaStreamDestroy(stream);
    return 0;
}
