// Drives libqwen3next_trt_plugins.so the way TensorRT does, without TensorRT or a GPU in the process.
//
//   harness LIB            reads commands on stdin, one JSON line out per command:
//     creators                                   every creator: name, version, namespace, interface, fields
//     create OP NAME PHASE [field=T:value ...]   createPlugin (T: i int32, l int64, f float32, d float64,
//                                                s string, h float16 = a type no field takes); the plugin
//                                                becomes the current one
//     types T...                                 getOutputDataTypes(input DataType codes)
//     shapes DIMS...                             getOutputShapes, inputs 2x5x64 ... as constant exprs
//     supports POS FMT T...                      supportsFormatCombination (inputs then outputs)
//     workspace DIMS...                          getWorkspaceSize, inputs' max dims
//     enqueue SPEC                               on the GPU, as an execution context does: configurePlugin,
//                                                onShapeChange, a workspace of getWorkspaceSize bytes
//                                                filled with garbage, enqueue on a stream; SPEC lists one
//                                                tensor a line, "in|out DTYPE DIMS FILE" (raw bytes):
//                                                inputs are read from FILE, outputs (NaN-filled first)
//                                                written there
//   harness selfreg REGISTRY_LIB LIB [LIB2]      dlopen a stand-in TensorRT runtime (registry.cpp), then the
//                                                library; report what its load-time registration did, then
//                                                act as loadLibrary does (getCreators + registerCreator);
//                                                then dlopen LIB2 (a copy of LIB) and report its registration
#include "NvInferRuntime.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

std::string esc(std::string const& s) {
    std::string o = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') o += '\\', o += c;
        else if (static_cast<unsigned char>(c) < 0x20) o += ' ';
        else o += c;
    }
    return o + "\"";
}

struct Logger : ILogger {
    std::vector<std::string> messages;
    void log(Severity severity, AsciiChar const* msg) noexcept override {
        messages.push_back(std::to_string(static_cast<int>(severity)) + ":" + msg);
    }
};
struct Finder : ILoggerFinder {
    Logger logger;
    ILogger* findLogger() override { return &logger; }
};

// A constant-folding IExprBuilder: every expression has a value, so shapes can be compared as numbers.
struct ConstExpr : apiv::VDimensionExpr {
    int64_t v;
    explicit ConstExpr(int64_t value) : v(value) {}
    bool isConstant() const override { return true; }
    int64_t getConstantValue() const override { return v; }
    bool isSizeTensor() const override { return false; }
};
struct Expr : IDimensionExpr {
    explicit Expr(apiv::VDimensionExpr* impl) { mImpl = impl; }
};
struct Exprs : apiv::VExprBuilder {
    std::vector<std::unique_ptr<ConstExpr>> impls;
    std::vector<std::unique_ptr<Expr>> exprs;
    IDimensionExpr const* constant(int64_t value) override {
        impls.push_back(std::make_unique<ConstExpr>(value));
        exprs.push_back(std::make_unique<Expr>(impls.back().get()));
        return exprs.back().get();
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
        int64_t x = a.getConstantValue(), y = b.getConstantValue(), r = 0;
        switch (op) {
            case DimensionOperation::kSUM: r = x + y; break;
            case DimensionOperation::kPROD: r = x * y; break;
            case DimensionOperation::kMAX: r = x > y ? x : y; break;
            case DimensionOperation::kMIN: r = x < y ? x : y; break;
            case DimensionOperation::kSUB: r = x - y; break;
            case DimensionOperation::kEQUAL: r = x == y; break;
            case DimensionOperation::kLESS: r = x < y; break;
            case DimensionOperation::kFLOOR_DIV: r = x / y; break;
            case DimensionOperation::kCEIL_DIV: r = (x + y - 1) / y; break;
        }
        return constant(r);
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
        return nullptr;
    }
};
struct Builder : IExprBuilder {
    explicit Builder(apiv::VExprBuilder* impl) { mImpl = impl; }
};

Dims parseDims(std::string const& text) {
    Dims d{};
    std::stringstream ss(text);
    std::string part;
    while (std::getline(ss, part, 'x') && d.nbDims < Dims::MAX_DIMS) d.d[d.nbDims++] = std::atoll(part.c_str());
    return d;
}

std::string fieldJson(PluginField const& f) {
    std::string v;
    switch (f.type) {
        case PluginFieldType::kINT32: v = std::to_string(*static_cast<int32_t const*>(f.data)); break;
        case PluginFieldType::kFLOAT32: {
            char buf[64];
            std::snprintf(buf, sizeof buf, "%.9g", *static_cast<float const*>(f.data));
            v = buf;
            break;
        }
        case PluginFieldType::kCHAR:
            v = esc(std::string(static_cast<char const*>(f.data), strnlen(static_cast<char const*>(f.data), f.length)));
            break;
        default: v = "null";
    }
    return "{\"name\":" + esc(f.name) + ",\"type\":" + std::to_string(static_cast<int>(f.type)) +
           ",\"length\":" + std::to_string(f.length) + ",\"value\":" + v + "}";
}

std::string fieldsJson(PluginFieldCollection const* fc, bool values) {
    std::string o = "[";
    for (int32_t k = 0; fc && k < fc->nbFields; ++k) {
        PluginField const& f = fc->fields[k];
        o += (k ? "," : "");
        o += values ? fieldJson(f)
                    : "{\"name\":" + esc(f.name) + ",\"type\":" + std::to_string(static_cast<int>(f.type)) + "}";
    }
    return o + "]";
}

std::string kind(IVersionedInterface* i) { return i ? esc(i->getInterfaceInfo().kind) : "null"; }

using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);

struct Session {
    void* lib = nullptr;
    Finder finder;
    std::vector<IPluginCreatorV3One*> creators;
    std::unique_ptr<IPluginV3> plugin;
    IPluginV3OneBuild* build = nullptr;
    IPluginV3OneRuntime* runtime = nullptr;

    IPluginCreatorV3One* creator(std::string const& name) {
        for (auto* c : creators)
            if (name == c->getPluginName()) return c;
        return nullptr;
    }

    std::string lastError() {
        auto fn = reinterpret_cast<size_t (*)(char*, size_t)>(dlsym(lib, "q3n_plugin_last_error"));
        char buf[4096] = {0};
        if (fn) fn(buf, sizeof buf);
        return buf;
    }

    std::string create(std::istringstream& in) {
        std::string op, name, phase, arg;
        in >> op >> name >> phase;
        IPluginCreatorV3One* c = creator(op);
        if (!c) return "{\"error\":\"no creator " + op + "\"}";
        std::vector<PluginField> fields;
        std::vector<std::unique_ptr<char[]>> storage;
        while (in >> arg) {
            size_t eq = arg.find('='), colon = arg.find(':', eq);
            std::string fname = arg.substr(0, eq), t = arg.substr(eq + 1, colon - eq - 1), v = arg.substr(colon + 1);
            storage.push_back(std::make_unique<char[]>(fname.size() + 1));
            std::strcpy(storage.back().get(), fname.c_str());
            char const* n = storage.back().get();
            storage.push_back(std::make_unique<char[]>(v.size() + 16));
            char* data = storage.back().get();
            if (t == "i") {
                int32_t x = std::atoi(v.c_str());
                std::memcpy(data, &x, 4);
                fields.emplace_back(n, data, PluginFieldType::kINT32, 1);
            } else if (t == "l") {
                int64_t x = std::atoll(v.c_str());
                std::memcpy(data, &x, 8);
                fields.emplace_back(n, data, PluginFieldType::kINT64, 1);
            } else if (t == "f") {
                float x = std::strtof(v.c_str(), nullptr);
                std::memcpy(data, &x, 4);
                fields.emplace_back(n, data, PluginFieldType::kFLOAT32, 1);
            } else if (t == "d") {
                double x = std::strtod(v.c_str(), nullptr);
                std::memcpy(data, &x, 8);
                fields.emplace_back(n, data, PluginFieldType::kFLOAT64, 1);
            } else if (t == "h") {
                std::memset(data, 0, 2);
                fields.emplace_back(n, data, PluginFieldType::kFLOAT16, 1);
            } else {  // as TensorRT's ONNX parser passes strings: the characters, no terminator counted
                std::memcpy(data, v.c_str(), v.size() + 1);
                fields.emplace_back(n, data, PluginFieldType::kCHAR, static_cast<int32_t>(v.size()));
            }
        }
        PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
        finder.logger.messages.clear();
        IPluginV3* p = c->createPlugin(name.c_str(), &fc, phase == "runtime" ? TensorRTPhase::kRUNTIME : TensorRTPhase::kBUILD);
        std::string logged = "[";
        for (size_t k = 0; k < finder.logger.messages.size(); ++k) logged += (k ? "," : "") + esc(finder.logger.messages[k]);
        logged += "]";
        if (!p) {
            plugin.reset();
            build = nullptr;
            return "{\"ok\":false,\"error\":" + esc(lastError()) + ",\"logged\":" + logged + "}";
        }
        plugin.reset(p);
        auto* core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
        build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
        auto* run = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        runtime = run;
        std::string serialized = fieldsJson(run->getFieldsToSerialize(), true);
        // What a plan stores is the serialized fields: rebuilding from them must give them back.
        IPluginV3* again = c->createPlugin(name.c_str(), run->getFieldsToSerialize(), TensorRTPhase::kRUNTIME);
        std::string roundTrip = again ? fieldsJson(static_cast<IPluginV3OneRuntime*>(
                                                       again->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                                                       ->getFieldsToSerialize(),
                                                   true)
                                      : "null";
        delete again;
        std::unique_ptr<IPluginV3> cloned(p->clone());
        std::string cloneFields = "null", cloneName = "null";
        if (cloned) {
            auto* ccore = static_cast<IPluginV3OneCore*>(cloned->getCapabilityInterface(PluginCapabilityType::kCORE));
            auto* crun = static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
            cloneFields = fieldsJson(crun->getFieldsToSerialize(), true);
            cloneName = esc(ccore->getPluginName());
        }
        std::unique_ptr<IPluginV3> attached(run->attachToContext(nullptr));
        return "{\"ok\":true,\"logged\":" + logged + ",\"name\":" + esc(core->getPluginName()) +
               ",\"version\":" + esc(core->getPluginVersion()) + ",\"namespace\":" + esc(core->getPluginNamespace()) +
               ",\"interfaces\":[" + kind(core) + "," + kind(build) + "," + kind(run) + "]" +
               ",\"nb_outputs\":" + std::to_string(build->getNbOutputs()) + ",\"fields\":" + serialized +
               ",\"round_trip\":" + roundTrip + ",\"clone_name\":" + cloneName + ",\"clone_fields\":" + cloneFields +
               ",\"attached\":" + (attached ? "true" : "false") + "}";
    }

    std::string types(std::istringstream& in) {
        std::vector<DataType> inputs;
        int t;
        while (in >> t) inputs.push_back(static_cast<DataType>(t));
        int32_t nbOut = build->getNbOutputs();
        std::vector<DataType> out(nbOut, static_cast<DataType>(99));
        int32_t rc = build->getOutputDataTypes(out.data(), nbOut, inputs.data(), static_cast<int32_t>(inputs.size()));
        std::string o = "{\"rc\":" + std::to_string(rc) + ",\"out\":[";
        for (int32_t k = 0; k < nbOut; ++k) o += (k ? "," : "") + std::to_string(static_cast<int>(out[k]));
        return o + "]}";
    }

    std::string shapes(std::istringstream& in) {
        Exprs impl;
        Builder builder(&impl);
        std::vector<DimsExprs> inputs;
        std::string text;
        while (in >> text) {
            Dims d = parseDims(text);
            DimsExprs e{};
            e.nbDims = d.nbDims;
            for (int32_t k = 0; k < d.nbDims; ++k) e.d[k] = builder.constant(d.d[k]);
            inputs.push_back(e);
        }
        int32_t nbOut = build->getNbOutputs();
        std::vector<DimsExprs> out(nbOut);
        int32_t rc = build->getOutputShapes(inputs.data(), static_cast<int32_t>(inputs.size()), nullptr, 0, out.data(),
                                            nbOut, builder);
        std::string o = "{\"rc\":" + std::to_string(rc) + ",\"out\":[";
        for (int32_t k = 0; rc == 0 && k < nbOut; ++k) {
            o += std::string(k ? "," : "") + "[";
            for (int32_t j = 0; j < out[k].nbDims; ++j)
                o += (j ? "," : "") + (out[k].d[j] ? std::to_string(out[k].d[j]->getConstantValue()) : "null");
            o += "]";
        }
        return o + "]}";
    }

    std::string supports(std::istringstream& in) {
        int32_t pos, fmt, t;
        in >> pos >> fmt;
        std::vector<DynamicPluginTensorDesc> io;
        while (in >> t) {
            DynamicPluginTensorDesc d{};
            d.desc.type = static_cast<DataType>(t);
            d.desc.format = static_cast<TensorFormat>(fmt);
            io.push_back(d);
        }
        int32_t nbOut = build->getNbOutputs(), nbIn = static_cast<int32_t>(io.size()) - nbOut;
        bool ok = build->supportsFormatCombination(pos, io.data(), nbIn, nbOut);
        return std::string("{\"supported\":") + (ok ? "true" : "false") + "}";
    }

    std::string workspace(std::istringstream& in) {
        std::vector<DynamicPluginTensorDesc> inputs;
        std::string text;
        while (in >> text) {
            DynamicPluginTensorDesc d{};
            d.max = d.opt = d.desc.dims = parseDims(text);
            d.min = d.max;
            d.desc.type = DataType::kFLOAT;
            inputs.push_back(d);
        }
        int32_t nbOut = build->getNbOutputs();
        std::vector<DynamicPluginTensorDesc> outputs(nbOut);
        size_t bytes = build->getWorkspaceSize(inputs.data(), static_cast<int32_t>(inputs.size()), outputs.data(), nbOut);
        return "{\"bytes\":" + std::to_string(bytes) + "}";
    }

    static size_t elementSize(DataType t) {
        switch (t) {
            case DataType::kFLOAT:
            case DataType::kINT32: return 4;
            case DataType::kHALF:
            case DataType::kBF16: return 2;
            case DataType::kINT64: return 8;
            default: return 1;
        }
    }

    std::string enqueue(std::istringstream& in) {
        struct Tensor {
            bool output;
            PluginTensorDesc desc;
            std::string path;
            size_t bytes;
            void* device;
        };
        std::string specPath, io, dimsText, file;
        int type;
        in >> specPath;
        std::ifstream spec(specPath);
        std::vector<Tensor> tensors;
        while (spec >> io >> type >> dimsText >> file) {
            Tensor t{io == "out", {}, file, 0, nullptr};
            t.desc.dims = parseDims(dimsText);
            t.desc.type = static_cast<DataType>(type);
            t.desc.format = TensorFormat::kLINEAR;
            t.desc.scale = 1.0F;
            size_t n = 1;
            for (int32_t k = 0; k < t.desc.dims.nbDims; ++k) n *= static_cast<size_t>(t.desc.dims.d[k]);
            t.bytes = n * elementSize(t.desc.type);
            tensors.push_back(t);
        }
        std::vector<PluginTensorDesc> inDesc, outDesc;
        std::vector<DynamicPluginTensorDesc> inDyn, outDyn;
        std::vector<void*> inPtr, outPtr;
        cudaError_t err = cudaSuccess;
        for (auto& t : tensors) {
            err = cudaMalloc(&t.device, std::max<size_t>(t.bytes, 1));
            if (err != cudaSuccess) return "{\"error\":" + esc(cudaGetErrorString(err)) + "}";
            if (t.output) {
                cudaMemset(t.device, 0xFF, t.bytes);  // NaN in every float type: an output left unwritten shows
            } else {
                std::vector<char> host(t.bytes);
                std::ifstream f(t.path, std::ios::binary);
                f.read(host.data(), static_cast<std::streamsize>(t.bytes));
                if (static_cast<size_t>(f.gcount()) != t.bytes) return "{\"error\":" + esc("short input file " + t.path) + "}";
                cudaMemcpy(t.device, host.data(), t.bytes, cudaMemcpyHostToDevice);
            }
            DynamicPluginTensorDesc d{};
            d.desc = t.desc;
            d.min = d.opt = d.max = t.desc.dims;
            (t.output ? outDesc : inDesc).push_back(t.desc);
            (t.output ? outDyn : inDyn).push_back(d);
            (t.output ? outPtr : inPtr).push_back(t.device);
        }
        int32_t nbIn = static_cast<int32_t>(inDesc.size()), nbOut = static_cast<int32_t>(outDesc.size());
        int32_t configured = build->configurePlugin(inDyn.data(), nbIn, outDyn.data(), nbOut);
        int32_t shaped = runtime->onShapeChange(inDesc.data(), nbIn, outDesc.data(), nbOut);
        size_t wsBytes = build->getWorkspaceSize(inDyn.data(), nbIn, outDyn.data(), nbOut);
        void* workspace = nullptr;
        cudaMalloc(&workspace, std::max<size_t>(wsBytes, 1));
        cudaMemset(workspace, 0xA5, wsBytes);  // TensorRT hands over whatever the last user left there
        cudaStream_t stream;
        cudaStreamCreate(&stream);
        int32_t rc = runtime->enqueue(inDesc.data(), outDesc.data(), inPtr.data(), outPtr.data(), workspace, stream);
        err = cudaStreamSynchronize(stream);
        for (auto& t : tensors) {
            if (t.output && err == cudaSuccess) {
                std::vector<char> host(t.bytes);
                cudaMemcpy(host.data(), t.device, t.bytes, cudaMemcpyDeviceToHost);
                std::ofstream(t.path, std::ios::binary).write(host.data(), static_cast<std::streamsize>(t.bytes));
            }
            cudaFree(t.device);
        }
        cudaFree(workspace);
        cudaStreamDestroy(stream);
        return "{\"rc\":" + std::to_string(rc) + ",\"configure\":" + std::to_string(configured) +
               ",\"shape_change\":" + std::to_string(shaped) + ",\"workspace\":" + std::to_string(wsBytes) +
               ",\"cuda\":" + esc(cudaGetErrorString(err)) + ",\"error\":" + esc(lastError()) + "}";
    }

    int serve(char const* path) {
        lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            std::printf("{\"error\":%s}\n", esc(dlerror()).c_str());
            return 2;
        }
        auto setLoggerFinder = reinterpret_cast<void (*)(ILoggerFinder*)>(dlsym(lib, "setLoggerFinder"));
        auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
        if (!setLoggerFinder || !getCreators) {
            std::printf("{\"error\":\"getCreators or setLoggerFinder not exported\"}\n");
            return 2;
        }
        setLoggerFinder(&finder);  // the order TensorRT's loadLibrary uses
        int32_t n = 0;
        IPluginCreatorInterface* const* list = getCreators(n);
        std::string listing = "[";
        for (int32_t k = 0; k < n; ++k) {
            InterfaceInfo info = list[k]->getInterfaceInfo();
            listing += std::string(k ? "," : "") + "{\"interface\":" + esc(info.kind) + ",\"interface_version\":[" +
                       std::to_string(info.major) + "," + std::to_string(info.minor) + "]";
            if (std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0) {
                auto* c = static_cast<IPluginCreatorV3One*>(list[k]);
                creators.push_back(c);
                listing += ",\"name\":" + esc(c->getPluginName()) + ",\"version\":" + esc(c->getPluginVersion()) +
                           ",\"namespace\":" + esc(c->getPluginNamespace()) +
                           ",\"fields\":" + fieldsJson(c->getFieldNames(), false);
            }
            listing += "}";
        }
        listing += "]";
        std::string line;
        while (std::getline(std::cin, line)) {
            std::istringstream in(line);
            std::string cmd;
            in >> cmd;
            std::string out;
            if (cmd == "creators") out = "{\"creators\":" + listing + "}";
            else if (cmd == "create") out = create(in);
            else if (!build) out = "{\"error\":\"no current plugin\"}";
            else if (cmd == "types") out = types(in);
            else if (cmd == "shapes") out = shapes(in);
            else if (cmd == "supports") out = supports(in);
            else if (cmd == "workspace") out = workspace(in);
            else if (cmd == "enqueue") out = enqueue(in);
            else out = "{\"error\":\"unknown command\"}";
            std::printf("%s\n", out.c_str());
            std::fflush(stdout);
        }
        return 0;
    }
};

int selfreg(char const* registryLib, char const* path, char const* second) {
    void* runtime = nullptr;
    if (std::strcmp(registryLib, "none") != 0) {
        runtime = dlopen(registryLib, RTLD_NOW | RTLD_GLOBAL);
        if (!runtime) {
            std::printf("{\"error\":%s}\n", esc(dlerror()).c_str());
            return 2;
        }
    }
    using Names = char const* (*)();
    Names names = runtime ? reinterpret_cast<Names>(dlsym(runtime, "fake_registry_names")) : nullptr;
    auto refused = runtime ? reinterpret_cast<int (*)()>(dlsym(runtime, "fake_registry_refused")) : nullptr;
    auto registry = runtime ? reinterpret_cast<IPluginRegistry* (*)()>(dlsym(runtime, "getPluginRegistry")) : nullptr;
    std::string before = names ? names() : "";
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        std::printf("{\"error\":%s}\n", esc(dlerror()).c_str());
        return 2;
    }
    auto status = reinterpret_cast<char const* (*)()>(dlsym(lib, "q3n_plugin_self_registration"));
    std::string onLoad = names ? names() : "", statusOnLoad = status();
    // What TensorRT's loadLibrary does next: getCreators, then registerCreator for each.
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    int32_t n = 0;
    IPluginCreatorInterface* const* list = getCreators(n);
    std::string afterGet = names ? names() : "";
    int accepted = 0;
    for (int32_t k = 0; registry && k < n; ++k) accepted += registry()->registerCreator(*list[k], "") ? 1 : 0;
    // A second copy of the library (another path) dlopened afterwards finds the names taken.
    std::string secondStatus;
    if (second != nullptr) {
        void* lib2 = dlopen(second, RTLD_NOW | RTLD_LOCAL);
        auto status2 = lib2 ? reinterpret_cast<char const* (*)()>(dlsym(lib2, "q3n_plugin_self_registration")) : nullptr;
        secondStatus = status2 ? status2() : dlerror();
    }
    auto getCreatorCalls = runtime ? reinterpret_cast<int (*)()>(dlsym(runtime, "fake_registry_get_creator_calls")) : nullptr;
    std::printf("{\"before\":%s,\"on_load\":%s,\"status\":%s,\"after_get_creators\":%s,\"after_load_library\":%s,"
                "\"accepted\":%d,\"refused\":%d,\"status_after\":%s,\"second_copy\":%s,\"get_creator_calls\":%d}\n",
                esc(before).c_str(), esc(onLoad).c_str(), esc(statusOnLoad).c_str(), esc(afterGet).c_str(),
                esc(names ? names() : "").c_str(), accepted, refused ? refused() : 0, esc(status()).c_str(),
                esc(secondStatus).c_str(), getCreatorCalls ? getCreatorCalls() : 0);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if ((argc == 4 || argc == 5) && std::strcmp(argv[1], "selfreg") == 0)
        return selfreg(argv[2], argv[3], argc == 5 ? argv[4] : nullptr);
    if (argc != 2) {
        std::fprintf(stderr, "usage: harness LIB < commands | harness selfreg REGISTRY_LIB|none LIB\n");
        return 2;
    }
    Session s;
    return s.serve(argv[1]);
}
