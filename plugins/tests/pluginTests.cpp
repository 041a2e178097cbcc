/*
 * CPU tests of libdijiang_trt_plugins.so without a TensorRT runtime: the library is
 * dlopen-ed the way IPluginRegistry::loadLibrary does it (which also proves it has no
 * unresolved libnvinfer symbols), and the creator and plugin are driven through the
 * TensorRT interfaces. getOutputShapes (needs TensorRT's IExprBuilder) and enqueue calls
 * that reach a kernel launch (need a GPU) are left to builds with a real TensorRT; enqueue
 * calls refused before any CUDA call are tested here.
 */
#include "NvInferRuntime.h"
#include "NvInferVersion.h"

#include "linearAttentionConfig.h"
#include "testHarness.h"

#include <cstring>
#include <dlfcn.h>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
using SetLoggerFinder = void (*)(ILoggerFinder*);
using CompiledVersion = int32_t (*)();

class CapturingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            last = msg;
            lastSeverity = severity;
            ++count;
        }
    }
    std::string last;
    Severity lastSeverity{Severity::kINFO};
    int32_t count{0};
};

class Finder : public ILoggerFinder
{
public:
    explicit Finder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};

struct Fields
{
    int32_t heads{9};
    int32_t kvHeads{9};
    float scale{1.F};
    std::string rule{"gated"};
    int32_t chunk{64};
    bool withWorkspace{false}; //!< what a serialized plugin carries; the ONNX parser never passes it
    int64_t workspace{0};
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};

    PluginFieldCollection const* build()
    {
        fields = {PluginField("q_num_heads", &heads, PluginFieldType::kINT32, 1),
            PluginField("kv_num_heads", &kvHeads, PluginFieldType::kINT32, 1),
            PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
            PluginField("update_rule", rule.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(rule.size())),
            PluginField("chunk_size", &chunk, PluginFieldType::kINT32, 1),
            PluginField("plugin_version", "1", PluginFieldType::kCHAR, 1),
            PluginField("plugin_namespace", "dijiang", PluginFieldType::kCHAR, 7)};
        if (withWorkspace)
        {
            fields.emplace_back("workspace_bytes", &workspace, PluginFieldType::kINT64, 1);
        }
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return &fc;
    }
};

Dims dims(std::initializer_list<int64_t> extents)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(extents.size());
    int32_t i = 0;
    for (int64_t e : extents)
    {
        d.d[i++] = e;
    }
    return d;
}

DynamicPluginTensorDesc desc(Dims const& d, DataType type, Dims const& max)
{
    DynamicPluginTensorDesc t{};
    t.desc.dims = d;
    t.desc.type = type;
    t.desc.format = TensorFormat::kLINEAR;
    t.min = max;
    t.opt = max;
    t.max = max;
    return t;
}

//! The serialized workspace_bytes, or -1 when the collection lacks it.
int64_t serializedWorkspace(PluginFieldCollection const* fc)
{
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (std::strcmp(f.name, "workspace_bytes") == 0 && f.type == PluginFieldType::kINT64 && f.length == 1)
        {
            return *static_cast<int64_t const*>(f.data);
        }
    }
    return -1;
}

IPluginV3OneRuntime* runtimeOf(IPluginV3* plugin)
{
    return plugin == nullptr
        ? nullptr
        : static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

//! Runs enqueue on a gated float32 problem of the given batch and sequence length (H = 9,
//! dk = dv = 64) with pointers that must never be dereferenced: these calls have to be
//! refused, or finish as no-ops, before any CUDA call.
int32_t enqueueRefusedOnHost(IPluginV3OneRuntime* runtime, int64_t batch, int64_t seqLen, bool withWorkspacePointer)
{
    alignas(16) static char dummy[64];
    PluginTensorDesc in[5]{};
    PluginTensorDesc out[2]{};
    Dims const act = dims({batch, seqLen, 576});
    Dims const state = dims({batch, 9, 64, 64});
    Dims const inDims[5] = {act, act, act, state, dims({batch, seqLen, 9})};
    for (int32_t i = 0; i < 5; ++i)
    {
        in[i].dims = inDims[i];
        in[i].type = DataType::kFLOAT;
        in[i].format = TensorFormat::kLINEAR;
    }
    out[0] = in[0];
    out[1] = in[3];
    void const* inputs[5] = {dummy, dummy, dummy, dummy, dummy};
    void* outputs[2] = {dummy, dummy};
    return runtime->enqueue(in, out, inputs, outputs, withWorkspacePointer ? dummy : nullptr, nullptr);
}

//! enqueue checks the call against the workspace TensorRT reserved (workspace_bytes), and the
//! kernel API refuses a short one before any CUDA call.
void testWorkspaceAtRuntime(IPluginCreatorV3One* creator, CapturingLogger& logger)
{
    size_t const needed = [] {
        dijiang::WorkspaceLayout layout;
        return dijiang::prefillWorkspaceLayout(dijiang::Problem{2, 7, 9, 64, 64}, 64, layout) ? layout.totalBytes
                                                                                            : size_t{0};
    }();
    CHECK(needed > 0);

    Fields shortWs;
    shortWs.withWorkspace = true;
    shortWs.workspace = static_cast<int64_t>(needed) - 1;
    std::unique_ptr<IPluginV3> plugin{creator->createPlugin("attn", shortWs.build(), TensorRTPhase::kRUNTIME)};
    CHECK(plugin != nullptr);
    if (plugin)
    {
        int32_t const before = logger.count;
        CHECK(enqueueRefusedOnHost(runtimeOf(plugin.get()), 2, 7, true) != 0);
        CHECK(logger.count == before + 1 && logger.lastSeverity == ILogger::Severity::kERROR);
        CHECK(logger.last.find("insufficient workspace") != std::string::npos);
        CHECK(logger.last.find(std::to_string(needed) + " bytes") != std::string::npos);
        CHECK(logger.last.find("reserved " + std::to_string(needed - 1)) != std::string::npos);
        // An empty batch launches nothing and succeeds.
        CHECK(enqueueRefusedOnHost(runtimeOf(plugin.get()), 0, 7, true) == 0);
    }

    // Enough bytes but no buffer is refused the same way.
    Fields nullWs;
    nullWs.withWorkspace = true;
    nullWs.workspace = static_cast<int64_t>(needed);
    std::unique_ptr<IPluginV3> nullPlugin{creator->createPlugin("attn", nullWs.build(), TensorRTPhase::kRUNTIME)};
    CHECK(nullPlugin != nullptr);
    if (nullPlugin)
    {
        CHECK(enqueueRefusedOnHost(runtimeOf(nullPlugin.get()), 2, 7, false) != 0);
        CHECK(logger.last.find("insufficient workspace") != std::string::npos
            && logger.last.find("null workspace pointer") != std::string::npos);
    }

    // A build-phase instance reserves nothing until configurePlugin sizes the profile.
    Fields unconfigured;
    std::unique_ptr<IPluginV3> fresh{creator->createPlugin("attn", unconfigured.build(), TensorRTPhase::kBUILD)};
    CHECK(fresh != nullptr);
    if (fresh)
    {
        CHECK(serializedWorkspace(runtimeOf(fresh.get())->getFieldsToSerialize()) == 0);
        CHECK(enqueueRefusedOnHost(runtimeOf(fresh.get()), 2, 7, true) != 0);
        CHECK(logger.last.find("insufficient workspace") != std::string::npos);
    }

    // A runtime instance must be told what was reserved.
    int32_t const before = logger.count;
    CHECK(creator->createPlugin("attn", unconfigured.build(), TensorRTPhase::kRUNTIME) == nullptr);
    CHECK(logger.count > before && logger.last.find("workspace_bytes") != std::string::npos);
    Fields negative;
    negative.withWorkspace = true;
    negative.workspace = -5;
    CHECK(creator->createPlugin("attn", negative.build(), TensorRTPhase::kRUNTIME) == nullptr);
    CHECK(logger.last.find("workspace_bytes") != std::string::npos);
}

void testPlugin(IPluginCreatorV3One* creator, CapturingLogger& logger)
{
    Fields f;
    std::unique_ptr<IPluginV3> plugin{creator->createPlugin("attn", f.build(), TensorRTPhase::kBUILD)};
    CHECK(plugin != nullptr);
    if (!plugin)
    {
        return;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(core != nullptr && build != nullptr && runtime != nullptr);
    CHECK(std::strcmp(core->getPluginName(), creator->getPluginName()) == 0);
    CHECK(std::strcmp(core->getPluginNamespace(), creator->getPluginNamespace()) == 0);
    CHECK(std::strcmp(core->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0);
    CHECK(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0);
    CHECK(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0);
    CHECK(build->getNbOutputs() == 2);

    DataType outTypes[2];
    DataType const halfIn[5] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kFLOAT, DataType::kHALF};
    CHECK(build->getOutputDataTypes(outTypes, 2, halfIn, 5) == 0);
    CHECK(outTypes[0] == DataType::kHALF && outTypes[1] == DataType::kFLOAT);
    DataType const intIn[5] = {DataType::kINT32, DataType::kINT32, DataType::kINT32, DataType::kFLOAT, DataType::kINT32};
    CHECK(build->getOutputDataTypes(outTypes, 2, intIn, 5) != 0);
    CHECK(build->getOutputDataTypes(outTypes, 2, halfIn, 4) != 0); // gated takes decay

    // I/O: q k v past decay | output present, dynamic batch and sequence.
    Dims const q = dims({-1, -1, 576});
    Dims const st = dims({-1, 9, 64, 64});
    Dims const g = dims({-1, -1, 9});
    Dims const qMax = dims({3, 513, 576});
    Dims const stMax = dims({3, 9, 64, 64});
    Dims const gMax = dims({3, 513, 9});
    DynamicPluginTensorDesc io[7] = {desc(q, DataType::kHALF, qMax), desc(q, DataType::kHALF, qMax),
        desc(q, DataType::kHALF, qMax), desc(st, DataType::kFLOAT, stMax), desc(g, DataType::kHALF, gMax),
        desc(q, DataType::kHALF, qMax), desc(st, DataType::kFLOAT, stMax)};
    for (int32_t pos = 0; pos < 7; ++pos)
    {
        CHECK(build->supportsFormatCombination(pos, io, 5, 2));
    }
    io[3].desc.type = DataType::kHALF;
    CHECK(!build->supportsFormatCombination(3, io, 5, 2)); // state is float32 only
    io[3].desc.type = DataType::kFLOAT;
    io[1].desc.type = DataType::kFLOAT;
    CHECK(!build->supportsFormatCombination(1, io, 5, 2)); // activations share one type
    io[1].desc.type = DataType::kHALF;
    io[0].desc.format = TensorFormat::kHWC8;
    CHECK(!build->supportsFormatCombination(0, io, 5, 2));
    io[0].desc.format = TensorFormat::kLINEAR;
    io[0].desc.type = DataType::kINT8;
    CHECK(!build->supportsFormatCombination(0, io, 5, 2));
    io[0].desc.type = DataType::kHALF;
    CHECK(!build->supportsFormatCombination(0, io, 4, 2));

    CHECK(build->configurePlugin(io, 5, io + 5, 2) == 0);
    int32_t const logged = logger.count;
    DynamicPluginTensorDesc badIo[7];
    std::copy(io, io + 7, badIo);
    badIo[4].desc.dims = dims({-1, -1, 576}); // per-key-dimension decay
    CHECK(build->configurePlugin(badIo, 5, badIo + 5, 2) != 0);
    CHECK(logger.count > logged && logger.last.find("decay") != std::string::npos);

    dijiang::WorkspaceLayout layout;
    CHECK(dijiang::prefillWorkspaceLayout(dijiang::Problem{3, 513, 9, 64, 64}, 64, layout));
    CHECK(build->getWorkspaceSize(io, 5, io + 5, 2) == layout.totalBytes);
    DynamicPluginTensorDesc decodeIo[7];
    std::copy(io, io + 7, decodeIo);
    for (int32_t i : {0, 1, 2, 4, 5})
    {
        decodeIo[i].max.d[1] = 1;
    }
    CHECK(build->getWorkspaceSize(decodeIo, 5, decodeIo + 5, 2) == 0);

    // A workspace that cannot be sized is an error in the log, not a silent 0.
    int32_t countBefore = logger.count;
    CHECK(build->getWorkspaceSize(io, 4, io + 5, 2) == 0);
    CHECK(logger.count > countBefore && logger.lastSeverity == ILogger::Severity::kERROR
        && logger.last.find("cannot size the workspace") != std::string::npos);
    DynamicPluginTensorDesc hugeIo[7];
    std::copy(io, io + 7, hugeIo);
    for (int32_t i : {0, 1, 5})
    {
        hugeIo[i].max = dims({3, 513, 9 * 4096}); // dk = 4096 has no prefill chunk that fits
    }
    hugeIo[3].max = dims({3, 9, 4096, 64});
    hugeIo[6].max = dims({3, 9, 4096, 64});
    countBefore = logger.count;
    CHECK(build->getWorkspaceSize(hugeIo, 5, hugeIo + 5, 2) == 0);
    CHECK(logger.count > countBefore && logger.lastSeverity == ILogger::Severity::kERROR
        && logger.last.find("cannot size the workspace") != std::string::npos);
    CHECK(build->configurePlugin(hugeIo, 5, hugeIo + 5, 2) != 0);

    // configurePlugin fixes the profile's workspace and serializes it for the runtime instance.
    CHECK(build->configurePlugin(decodeIo, 5, decodeIo + 5, 2) == 0);
    CHECK(serializedWorkspace(runtime->getFieldsToSerialize()) == 0);
    CHECK(build->configurePlugin(io, 5, io + 5, 2) == 0);
    CHECK(serializedWorkspace(runtime->getFieldsToSerialize()) == static_cast<int64_t>(layout.totalBytes));

    PluginTensorDesc rt[7];
    Dims const shapes[7] = {dims({2, 7, 576}), dims({2, 7, 576}), dims({2, 7, 576}), dims({2, 9, 64, 64}),
        dims({2, 7, 9}), dims({2, 7, 576}), dims({2, 9, 64, 64})};
    for (int32_t i = 0; i < 7; ++i)
    {
        rt[i] = io[i].desc;
        rt[i].dims = shapes[i];
    }
    CHECK(runtime->onShapeChange(rt, 5, rt + 5, 2) == 0);
    rt[2].dims = dims({2, 6, 576});
    CHECK(runtime->onShapeChange(rt, 5, rt + 5, 2) != 0);

    // Serialization round trip through the runtime phase; the workspace travels with it.
    PluginFieldCollection const* serialized = runtime->getFieldsToSerialize();
    CHECK(serialized != nullptr && serialized->nbFields == 6);
    std::unique_ptr<IPluginV3> restored{creator->createPlugin("attn", serialized, TensorRTPhase::kRUNTIME)};
    CHECK(restored != nullptr);
    if (restored)
    {
        auto* restoredBuild
            = static_cast<IPluginV3OneBuild*>(restored->getCapabilityInterface(PluginCapabilityType::kBUILD));
        CHECK(std::string(restoredBuild->getMetadataString()) == build->getMetadataString());
        CHECK(std::string(build->getMetadataString()).find("update_rule=gated") != std::string::npos);
        CHECK(serializedWorkspace(runtimeOf(restored.get())->getFieldsToSerialize())
            == static_cast<int64_t>(layout.totalBytes));
        // A prefill longer than the profile maximum (513) needs more than was reserved.
        int32_t const countBefore2 = logger.count;
        CHECK(enqueueRefusedOnHost(runtimeOf(restored.get()), 3, 1025, true) != 0);
        CHECK(logger.count > countBefore2 && logger.last.find("insufficient workspace") != std::string::npos);
    }
    std::unique_ptr<IPluginV3> cloned{plugin->clone()};
    CHECK(cloned != nullptr);
    CHECK(serializedWorkspace(runtimeOf(cloned.get())->getFieldsToSerialize()) == static_cast<int64_t>(layout.totalBytes));
    std::unique_ptr<IPluginV3> attached{runtime->attachToContext(nullptr)};
    CHECK(attached != nullptr);
    CHECK(serializedWorkspace(runtimeOf(attached.get())->getFieldsToSerialize())
        == static_cast<int64_t>(layout.totalBytes));

    // Invalid attributes are refused with a message naming the field.
    Fields bad;
    bad.kvHeads = 3;
    int32_t const before = logger.count;
    CHECK(creator->createPlugin("attn", bad.build(), TensorRTPhase::kBUILD) == nullptr);
    CHECK(logger.count > before && logger.last.find("kv_num_heads") != std::string::npos);
    CHECK(creator->createPlugin("attn", nullptr, TensorRTPhase::kBUILD) == nullptr);

    testWorkspaceAtRuntime(creator, logger);

    // The linear rule has four inputs.
    Fields linear;
    linear.rule = "linear";
    std::unique_ptr<IPluginV3> linearPlugin{creator->createPlugin("attn", linear.build(), TensorRTPhase::kBUILD)};
    CHECK(linearPlugin != nullptr);
    if (linearPlugin)
    {
        auto* lb = static_cast<IPluginV3OneBuild*>(linearPlugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
        DynamicPluginTensorDesc lio[6] = {io[0], io[1], io[2], io[3], io[5], io[6]};
        CHECK(lb->configurePlugin(lio, 4, lio + 4, 2) == 0);
        CHECK(lb->supportsFormatCombination(5, lio, 4, 2));
        CHECK(!lb->supportsFormatCombination(4, io, 5, 2));
    }
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libdijiang_trt_plugins.so\n", argv[0]);
        return 2;
    }
    // RTLD_NOW: any unresolved symbol fails here rather than at first use.
    void* handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 1;
    }
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
    auto compiledVersion = reinterpret_cast<CompiledVersion>(dlsym(handle, "dijiangTrtPluginCompiledVersion"));
    CHECK(getCreators != nullptr && setLoggerFinder != nullptr && compiledVersion != nullptr);
    if (getCreators == nullptr || setLoggerFinder == nullptr || compiledVersion == nullptr)
    {
        return TEST_MAIN_RESULT("dijiang_plugin_tests");
    }
    // This test is compiled with the same headers as the library.
    CHECK(compiledVersion() == static_cast<int32_t>(NV_TENSORRT_VERSION));

    CapturingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    int32_t nbCreators = -1;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    CHECK(nbCreators == 1 && creators != nullptr);
    for (int32_t i = 0; creators != nullptr && i < nbCreators; ++i)
    {
        CHECK(std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        // Nothing in TensorRT's global (empty) namespace, where standard op names live.
        CHECK(creator->getPluginNamespace() != nullptr && creator->getPluginNamespace()[0] != '\0');
        CHECK(std::strcmp(creator->getPluginName(), "LinearAttention") != 0);
    }
    if (nbCreators >= 1 && creators != nullptr)
    {
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
        CHECK(std::strcmp(creator->getPluginName(), "DiJiangLinearAttention") == 0);
        CHECK(std::strcmp(creator->getPluginNamespace(), "dijiang") == 0);
        CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
        PluginFieldCollection const* names = creator->getFieldNames();
        CHECK(names != nullptr && names->nbFields == 8);
        testPlugin(creator, logger);
    }
    // The library stays loaded: TensorRT does not unload plugin libraries while creators are in use.
    return TEST_MAIN_RESULT("dijiang_plugin_tests");
}
