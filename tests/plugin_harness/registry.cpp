// A stand-in for a TensorRT runtime library (built with -soname libnvinfer.so.10, libtensorrt_rtx.so.1, ...):
// exports getPluginRegistry() with a registry that, like TensorRT's, refuses a second creator of the
// same name / version / namespace. The plugin library's load-time registration finds it by soname.
#include "NvInferRuntime.h"

#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

struct Entry {
    IPluginCreatorInterface* creator;
    std::string name, version, ns;
};

// IPluginCreatorInterface has no name accessor: the creators here are all IPluginCreatorV3One.
bool describe(IPluginCreatorInterface& c, std::string& name, std::string& version, std::string& ns) {
    if (std::strcmp(c.getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) return false;
    auto& v3 = static_cast<IPluginCreatorV3One&>(c);
    name = v3.getPluginName();
    version = v3.getPluginVersion();
    ns = v3.getPluginNamespace();
    return true;
}

class Registry final : public IPluginRegistry {
public:
    std::vector<Entry> entries;
    int refused = 0;
    IErrorRecorder* recorder = nullptr;

    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override {
        *n = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override {
        return nullptr;
    }
    void setErrorRecorder(IErrorRecorder* const r) noexcept override { recorder = r; }
    IErrorRecorder* getErrorRecorder() const noexcept override { return recorder; }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool registerCreator(IPluginCreatorInterface& c, AsciiChar const* const) noexcept override {
        Entry e{&c, {}, {}, {}};
        if (!describe(c, e.name, e.version, e.ns)) return false;
        for (Entry const& x : entries) {
            if (x.name == e.name && x.version == e.version && x.ns == e.ns) {
                ++refused;
                return false;
            }
        }
        entries.push_back(e);
        return true;
    }
    mutable std::vector<IPluginCreatorInterface*> listing;
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override {
        listing.clear();
        for (Entry const& e : entries) listing.push_back(e.creator);
        *n = static_cast<int32_t>(listing.size());
        return listing.data();
    }
    int getCreatorCalls = 0;
    IPluginCreatorInterface* getCreator(AsciiChar const* const name, AsciiChar const* const version,
                                        AsciiChar const* const ns) noexcept override {
        ++getCreatorCalls;  // TensorRT logs a miss here as an error: the library must not probe with it
        for (Entry const& x : entries)
            if (x.name == name && x.version == version && x.ns == (ns ? ns : "")) return x.creator;
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const& c) noexcept override {
        for (size_t k = 0; k < entries.size(); ++k) {
            if (entries[k].creator == &c) {
                entries.erase(entries.begin() + static_cast<long>(k));
                return true;
            }
        }
        return false;
    }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override {
        *n = 0;
        return nullptr;
    }
};

Registry gRegistry;
std::string gNames;

}  // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept { return &gRegistry; }

// Registered creator names, sorted order of registration, comma-separated.
extern "C" __attribute__((visibility("default"))) char const* fake_registry_names() {
    gNames.clear();
    for (Entry const& e : gRegistry.entries) gNames += (gNames.empty() ? "" : ",") + e.name;
    return gNames.c_str();
}
extern "C" __attribute__((visibility("default"))) int fake_registry_refused() { return gRegistry.refused; }
extern "C" __attribute__((visibility("default"))) int fake_registry_get_creator_calls() { return gRegistry.getCreatorCalls; }
