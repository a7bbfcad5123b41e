// Generic IPluginV3 / IPluginCreatorV3One over the OpDefs, the library's entry points for TensorRT
// (getCreators, setLoggerFinder) and its registration at dlopen time for hosts that only dlopen
// (Triton's TensorRT backend).
#include "plugin.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>

using namespace nvinfer1;

namespace q3n_trt {
namespace {

// Asked at every message, not once at load: a finder may answer the logger of whichever builder or
// runtime is calling at that moment (TensorRT-RTX 1.7's answers none at all, measured).
ILoggerFinder* gLoggerFinder = nullptr;
IErrorRecorder* gRecorder = nullptr;
// Process-wide, not per thread: TensorRT-RTX's logger finder answers no logger (measured, 1.7), so a
// host asks q3n_plugin_last_error() after a failed parse, from whichever thread.
std::mutex gErrorMutex;
std::string gLastError;

}  // namespace

void logMessage(ILogger::Severity severity, std::string const& message) {
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    if (logger) logger->log(severity, message.c_str());
}

void reportError(std::string const& message) {
    {
        std::lock_guard<std::mutex> lock(gErrorMutex);
        gLastError = message;
    }
    logMessage(ILogger::Severity::kERROR, message);
    if (gRecorder) gRecorder->reportError(ErrorCode::kINVALID_ARGUMENT, message.c_str());
}

FieldValue const& Values::at(char const* name) const {
    for (size_t k = 0; k < names.size(); ++k)
        if (std::strcmp(names[k], name) == 0) return values[k];
    // Only the OpDefs ask, with their own field names: reaching this is a bug in an OpDef.
    static FieldValue const missing{};
    return missing;
}

int dtypeCode(DataType t) {
    switch (t) {
        case DataType::kFLOAT: return 0;
        case DataType::kHALF: return 1;
        case DataType::kBF16: return 2;
        default: return -1;
    }
}

bool isFloatType(DataType t) { return dtypeCode(t) >= 0; }

int64_t volume(Dims const& d, int32_t first, int32_t last) {
    int64_t n = 1;
    for (int32_t k = first; k < last && k < d.nbDims; ++k) n *= d.d[k];
    return n;
}

std::string oneOf(FieldValue const& v, std::vector<char const*> const& allowed) {
    for (char const* a : allowed)
        if (v.s == a) return {};
    std::string text = "expected one of";
    for (char const* a : allowed) text += std::string(" '") + a + "'";
    return text + ", got '" + v.s + "'";
}

namespace {

char const* kindName(Kind k) { return k == Kind::kInt ? "an integer" : k == Kind::kFloat ? "a float" : "a string"; }

// A field as the parser or a plan gives it -> value of the declared kind; the error text otherwise.
std::string readField(PluginField const& f, FieldValue& out) {
    if (f.data == nullptr || f.length < (out.kind == Kind::kString ? 0 : 1))
        return std::string("expected ") + kindName(out.kind) + ", got no data";
    switch (out.kind) {
        case Kind::kInt:
            if (f.type == PluginFieldType::kINT32) {
                out.i = *static_cast<int32_t const*>(f.data);
                return {};
            }
            if (f.type == PluginFieldType::kINT64) {
                int64_t v = *static_cast<int64_t const*>(f.data);
                if (v < INT32_MIN || v > INT32_MAX) return "expected a 32-bit integer, got " + std::to_string(v);
                out.i = static_cast<int32_t>(v);
                return {};
            }
            break;
        case Kind::kFloat:
            if (f.type == PluginFieldType::kFLOAT32) {
                out.f = *static_cast<float const*>(f.data);
                return {};
            }
            if (f.type == PluginFieldType::kFLOAT64) {
                out.f = static_cast<float>(*static_cast<double const*>(f.data));
                return {};
            }
            break;
        case Kind::kString:
            if (f.type == PluginFieldType::kCHAR) {
                char const* s = static_cast<char const*>(f.data);
                out.s.assign(s, strnlen(s, static_cast<size_t>(f.length)));
                return {};
            }
            break;
    }
    return std::string("expected ") + kindName(out.kind) + ", got PluginFieldType " +
           std::to_string(static_cast<int>(f.type));
}

class Plugin final : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
public:
    Plugin(OpDef const& op, Values values) : mOp(op), mValues(std::move(values)) { buildSerialFields(); }

    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        switch (type) {
            case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
            case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
            case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override {
        try {
            return new Plugin(mOp, mValues);
        } catch (...) {
            return nullptr;
        }
    }

    AsciiChar const* getPluginName() const noexcept override { return mOp.name; }
    AsciiChar const* getPluginVersion() const noexcept override { return kPluginVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    int32_t getNbOutputs() const noexcept override { return mOp.nbOutputs; }
    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbIn, DynamicPluginTensorDesc const*,
                            int32_t) noexcept override {
        mNbInputs = nbIn;
        return 0;
    }
    int32_t getOutputDataTypes(DataType* out, int32_t nbOut, DataType const* in, int32_t nbIn) const noexcept override {
        if (!countsOk(nbIn, nbOut)) return -1;
        return mOp.outputTypes(out, nbOut, in, nbIn);
    }
    int32_t getOutputShapes(DimsExprs const* in, int32_t nbIn, DimsExprs const*, int32_t, DimsExprs* out,
                            int32_t nbOut, IExprBuilder& builder) noexcept override {
        if (!countsOk(nbIn, nbOut)) return -1;
        return mOp.outputShapes(mValues, in, nbIn, out, nbOut, builder);
    }
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbIn,
                                   int32_t nbOut) noexcept override {
        if (!countsOk(nbIn, nbOut) || pos < 0 || pos >= nbIn + nbOut) return false;
        if (io[pos].desc.format != TensorFormat::kLINEAR) return false;
        return mOp.supports(pos, io, nbIn, nbOut);
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nbIn, DynamicPluginTensorDesc const*,
                            int32_t nbOut) const noexcept override {
        if (!countsOk(nbIn, nbOut) || mOp.workspace == nullptr) return 0;
        return mOp.workspace(mValues, in, nbIn);
    }

    // enqueue is not told the input count; ops with optional inputs need it, and TensorRT calls
    // this with it before enqueue whenever shapes change.
    int32_t onShapeChange(PluginTensorDesc const*, int32_t nbIn, PluginTensorDesc const*, int32_t) noexcept override {
        mNbInputs = nbIn;
        return 0;
    }
    int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const* outDesc, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        int32_t rc = mOp.enqueue(mValues, inDesc, mNbInputs, outDesc, inputs, outputs, workspace, stream);
        if (rc != 0) reportError(std::string("plugin ") + mOp.name + ": kernel returned error code " + std::to_string(rc));
        return rc;
    }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mCollection; }

private:
    bool countsOk(int32_t nbIn, int32_t nbOut) const {
        return nbOut == mOp.nbOutputs && nbIn >= mOp.minInputs && nbIn <= mOp.maxInputs;
    }
    void buildSerialFields() {
        mFields.clear();
        for (size_t k = 0; k < mValues.names.size(); ++k) {
            FieldValue const& v = mValues.values[k];
            char const* n = mValues.names[k];
            if (v.kind == Kind::kInt)
                mFields.emplace_back(n, &v.i, PluginFieldType::kINT32, 1);
            else if (v.kind == Kind::kFloat)
                mFields.emplace_back(n, &v.f, PluginFieldType::kFLOAT32, 1);
            else
                mFields.emplace_back(n, v.s.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(v.s.size() + 1));
        }
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    OpDef const& mOp;
    Values mValues;
    int32_t mNbInputs = 0;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

class Creator final : public IPluginCreatorV3One {
public:
    explicit Creator(OpDef const& op) : mOp(op) {
        for (FieldDef const& f : op.fields) {
            PluginFieldType t = f.fallback.kind == Kind::kInt     ? PluginFieldType::kINT32
                                : f.fallback.kind == Kind::kFloat ? PluginFieldType::kFLOAT32
                                                                  : PluginFieldType::kCHAR;
            mFields.emplace_back(f.name, nullptr, t, 1);
        }
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
        try {
            Values values;
            for (FieldDef const& f : mOp.fields) {
                values.names.push_back(f.name);
                values.values.push_back(f.fallback);
            }
            std::string problems;
            auto add = [&problems](std::string const& p) { problems += (problems.empty() ? "" : "; ") + p; };
            for (int32_t k = 0; fc != nullptr && k < fc->nbFields; ++k) {
                PluginField const& pf = fc->fields[k];
                for (size_t j = 0; pf.name != nullptr && j < values.names.size(); ++j) {
                    if (std::strcmp(pf.name, values.names[j]) != 0) continue;
                    std::string e = readField(pf, values.values[j]);
                    if (!e.empty()) add(std::string(pf.name) + ": " + e);
                }
            }
            for (size_t j = 0; problems.empty() && j < mOp.fields.size(); ++j) {
                if (mOp.fields[j].check == nullptr) continue;
                std::string e = mOp.fields[j].check(values.values[j]);
                if (!e.empty()) add(std::string(mOp.fields[j].name) + ": " + e);
            }
            if (problems.empty() && mOp.validate != nullptr) {
                std::string e = mOp.validate(values);
                if (!e.empty()) add(e);
            }
            if (!problems.empty()) {
                reportError(std::string("node '") + (name ? name : "") + "': plugin " + mOp.name + ": " + problems);
                return nullptr;
            }
            return new Plugin(mOp, std::move(values));
        } catch (std::exception const& e) {
            reportError(std::string("plugin ") + mOp.name + ": " + e.what());
            return nullptr;
        }
    }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }
    AsciiChar const* getPluginName() const noexcept override { return mOp.name; }
    AsciiChar const* getPluginVersion() const noexcept override { return kPluginVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

private:
    OpDef const& mOp;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

IPluginCreatorInterface* const* creatorList(int32_t& n) {
    static Creator conv(causalConvOp()), attention(linearAttentionOp()), moe(moeOp());
    static IPluginCreatorInterface* const list[] = {&attention, &conv, &moe};
    n = static_cast<int32_t>(sizeof(list) / sizeof(list[0]));
    return list;
}

// -- registration when dlopened -------------------------------------------------------------------
// IPluginRegistry's virtual layout changed between TensorRT 10.x and 11.x (deprecated methods
// removed), so calling it through headers of another major jumps into the wrong slot (a segfault
// under TensorRT-RTX 1.7 with 10.14 headers, PLATFORM.md). The library registers only with a
// runtime whose registry layout is that of the headers it was compiled with.
struct RuntimeLib {
    char const* soname;
    int registryMajor;  // the TensorRT major whose IPluginRegistry layout the library has
};
// TensorRT-RTX 1.x: the 11.x layout (measured with 1.7, probes/cpp_plugin/README.md).
RuntimeLib const kRuntimes[] = {
    {"libtensorrt_rtx.so.1", 11}, {"libnvinfer.so.11", 11}, {"libnvinfer.so.10", 10},
    {"libnvinfer_lean.so.11", 11}, {"libnvinfer_lean.so.10", 10},
};

// Whether `registry` already holds a creator of this name / version / namespace. Through getAllCreators:
// a miss in getCreator is reported by TensorRT as an API usage error in the host's log.
bool alreadyRegistered(IPluginRegistry& registry, IPluginCreatorV3One const& c) {
    int32_t n = 0;
    IPluginCreatorInterface* const* all = registry.getAllCreators(&n);
    for (int32_t k = 0; all != nullptr && k < n; ++k) {
        if (all[k] == nullptr || std::strcmp(all[k]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) continue;
        auto const* other = static_cast<IPluginCreatorV3One const*>(all[k]);
        if (std::strcmp(other->getPluginName(), c.getPluginName()) == 0 &&
            std::strcmp(other->getPluginVersion(), c.getPluginVersion()) == 0 &&
            std::strcmp(other->getPluginNamespace(), c.getPluginNamespace()) == 0)
            return true;
    }
    return false;
}

std::mutex gRegMutex;
IPluginRegistry* gSelfRegistry = nullptr;
std::vector<IPluginCreatorInterface*> gSelfRegistered;
std::string gSelfStatus = "not attempted";

void selfRegister() {
    std::lock_guard<std::mutex> lock(gRegMutex);
    for (RuntimeLib const& rt : kRuntimes) {
        void* handle = dlopen(rt.soname, RTLD_NOW | RTLD_NOLOAD);
        if (handle == nullptr) continue;
        using GetRegistry = IPluginRegistry* (*)();
        auto getRegistry = reinterpret_cast<GetRegistry>(dlsym(handle, "getPluginRegistry"));
        if (getRegistry == nullptr) {
            dlclose(handle);
            continue;
        }
        if (rt.registryMajor != NV_TENSORRT_MAJOR) {
            gSelfStatus = std::string("not registered with ") + rt.soname + ": its plugin registry has TensorRT " +
                          std::to_string(rt.registryMajor) + ".x's layout, this library was compiled with TensorRT " +
                          std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) +
                          " headers; load it with loadLibrary / trtexec --dynamicPlugins, or rebuild it with "
                          "TENSORRT_ROOT set to that TensorRT";
            dlclose(handle);
            return;
        }
        IPluginRegistry* registry = getRegistry();
        dlclose(handle);  // the runtime was loaded by someone else and stays loaded
        if (registry == nullptr) continue;
        int32_t n = 0;
        IPluginCreatorInterface* const* list = creatorList(n);
        int registered = 0, present = 0;
        for (int32_t k = 0; k < n; ++k) {
            auto* c = static_cast<IPluginCreatorV3One*>(list[k]);
            // Another copy of the creators (an earlier load) already serves these names: a second
            // registration would be refused anyway.
            if (alreadyRegistered(*registry, *c)) {
                ++present;
                continue;
            }
            if (registry->registerCreator(*list[k], kPluginNamespace)) {
                gSelfRegistered.push_back(list[k]);
                ++registered;
            }
        }
        gSelfRegistry = registry;
        gRecorder = registry->getErrorRecorder();
        gSelfStatus = std::string("registered ") + std::to_string(registered) + " of " + std::to_string(n) +
                      " creators with " + rt.soname + (present ? " (" + std::to_string(present) + " already there)" : "");
        return;
    }
    gSelfStatus = "not registered: no TensorRT runtime library loaded in this process";
}

// A static object rather than __attribute__((constructor)): its constructor runs after the globals
// above are initialised (declaration order within this file), a constructor function might not.
struct RegisterOnLoad {
    RegisterOnLoad() { selfRegister(); }
} const gRegisterOnLoad;

}  // namespace
}  // namespace q3n_trt

using namespace q3n_trt;

#define Q3N_EXPORT extern "C" __attribute__((visibility("default")))

Q3N_EXPORT void setLoggerFinder(ILoggerFinder* finder) {
    gLoggerFinder = finder;
    logMessage(ILogger::Severity::kVERBOSE, std::string("qwen3next-trt plugins: ") + gSelfStatus);
}

// TensorRT's loadLibrary (and trtexec --dynamicPlugins) registers whatever this returns. If the
// library already registered itself when it was dlopened, those registrations are withdrawn first,
// so the registry holds each creator once and loadLibrary's handle owns them.
Q3N_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    {
        std::lock_guard<std::mutex> lock(gRegMutex);
        if (gSelfRegistry != nullptr && !gSelfRegistered.empty()) {
            for (IPluginCreatorInterface* c : gSelfRegistered) gSelfRegistry->deregisterCreator(*c);
            gSelfRegistered.clear();
            gSelfStatus += "; handed over to loadLibrary";
        }
    }
    return creatorList(nbCreators);
}

// For tests and `qwen3next-trt plugin-library`: what happened at load time, which headers, last error.
Q3N_EXPORT char const* q3n_plugin_self_registration() { return gSelfStatus.c_str(); }
Q3N_EXPORT int q3n_plugin_header_version() {
    return NV_TENSORRT_MAJOR * 10000 + NV_TENSORRT_MINOR * 100 + NV_TENSORRT_PATCH;
}
// Copies the last error into buf (size bytes, NUL-terminated); returns its full length.
Q3N_EXPORT size_t q3n_plugin_last_error(char* buf, size_t size) {
    std::lock_guard<std::mutex> lock(gErrorMutex);
    if (buf != nullptr && size > 0) {
        size_t n = gLastError.size() < size - 1 ? gLastError.size() : size - 1;
        std::memcpy(buf, gLastError.data(), n);
        buf[n] = '\0';
    }
    return gLastError.size();
}
