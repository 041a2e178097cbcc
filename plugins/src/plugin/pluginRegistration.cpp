/*
 * Library entry points and registration.
 *
 * Two ways in, both supported:
 *  - IPluginRegistry::loadLibrary / trtexec --dynamicPlugins / plugins serialized into a
 *    version-compatible engine: TensorRT calls setLoggerFinder() and getCreators() and
 *    registers the creators itself, tied to the library handle.
 *  - a plain dlopen (Polygraphy --plugins, ctypes.CDLL): the static initialiser below
 *    registers the creators, the job REGISTER_TENSORRT_PLUGIN does in TensorRT's samples.
 *
 * REGISTER_TENSORRT_PLUGIN itself is not used because it calls getPluginRegistry() through
 * a link-time reference to libnvinfer, which would leave an undefined symbol in a library
 * built against headers only (and make dlopen fail wherever libnvinfer was loaded with
 * RTLD_LOCAL, as Python does). Instead the registry is looked up in the already loaded
 * TensorRT library; when there is none, nothing is registered and getCreators() remains the
 * way in.
 *
 * When a library that registered itself statically is then handed to loadLibrary, TensorRT
 * refuses to register the same creators a second time and the load fails; getCreators()
 * therefore withdraws the static registrations before returning the list.
 */
#include "linearAttentionPlugin.h"

#include <cstdio>
#include <dlfcn.h>
#include <mutex>

using namespace nvinfer1;

namespace dijiang
{
namespace plugin
{
namespace
{

#define DIJIANG_STR2(x) #x
#define DIJIANG_STR(x) DIJIANG_STR2(x)

//! Finds a symbol of the TensorRT runtime that is already loaded in this process, without
//! ever loading it (RTLD_NOLOAD). Generic names are only taken from the TensorRT libraries.
void* findTensorRTSymbol(char const* name, bool searchGlobalScope) noexcept
{
    if (searchGlobalScope)
    {
        if (void* symbol = dlsym(RTLD_DEFAULT, name))
        {
            return symbol;
        }
    }
    static char const* const kLibraries[] = {
        "libnvinfer.so." DIJIANG_STR(NV_TENSORRT_MAJOR),
        "libnvinfer_lean.so." DIJIANG_STR(NV_TENSORRT_MAJOR),
        "libnvinfer_dispatch.so." DIJIANG_STR(NV_TENSORRT_MAJOR),
    };
    for (char const* library : kLibraries)
    {
        if (void* handle = dlopen(library, RTLD_LAZY | RTLD_NOLOAD))
        {
            void* symbol = dlsym(handle, name);
            dlclose(handle); // drops only the reference RTLD_NOLOAD added
            if (symbol != nullptr)
            {
                return symbol;
            }
        }
    }
    return nullptr;
}

class LoggerSource
{
public:
    void setFinder(ILoggerFinder* finder) noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (finder != nullptr)
        {
            mFinder = finder;
        }
    }

    ILogger* logger() noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder != nullptr)
        {
            return mFinder->findLogger();
        }
        using GetLogger = ILogger* (*) ();
        if (auto getLogger = reinterpret_cast<GetLogger>(findTensorRTSymbol("getLogger", false)))
        {
            return getLogger();
        }
        return nullptr;
    }

private:
    std::mutex mMutex;
    ILoggerFinder* mFinder{nullptr};
};

LoggerSource gLoggerSource;

// Only the project's namespace: a creator named after a standard ONNX op in the empty
// namespace could collide with TensorRT's own plugins and importers. The linear-attention
// flavor reaches this creator because dijiang-deploy build rewrites its LinearAttention nodes.
LinearAttentionPluginCreator gDiJiangCreator{kDIJIANG_PLUGIN_NAME, kDIJIANG_PLUGIN_NAMESPACE};
IPluginCreatorInterface* const gCreators[] = {&gDiJiangCreator};
constexpr int32_t kNB_CREATORS = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));

class StaticRegistration
{
public:
    StaticRegistration() noexcept
    {
        using GetPluginRegistry = IPluginRegistry* (*) ();
        auto getRegistry = reinterpret_cast<GetPluginRegistry>(findTensorRTSymbol("getPluginRegistry", true));
        IPluginRegistry* registry = getRegistry != nullptr ? getRegistry() : nullptr;
        if (registry == nullptr)
        {
            return;
        }
        std::lock_guard<std::mutex> lock(mMutex);
        mRegistry = registry;
        for (int32_t i = 0; i < kNB_CREATORS; ++i)
        {
            auto* creator = static_cast<LinearAttentionPluginCreator*>(gCreators[i]);
            mRegistered[i] = registry->registerCreator(*gCreators[i], creator->getPluginNamespace());
        }
    }

    //! Withdraws the static registrations so that TensorRT's loader can register the
    //! same creators under the library handle.
    void handOver() noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mRegistry == nullptr)
        {
            return;
        }
        for (int32_t i = 0; i < kNB_CREATORS; ++i)
        {
            if (mRegistered[i])
            {
                mRegistry->deregisterCreator(*gCreators[i]);
                mRegistered[i] = false;
            }
        }
    }

    // No deregistration on unload: at process exit TensorRT's registry may already be gone,
    // and TensorRT's own PluginRegistrar does not deregister either.

private:
    std::mutex mMutex;
    IPluginRegistry* mRegistry{nullptr};
    bool mRegistered[kNB_CREATORS]{};
};

StaticRegistration gStaticRegistration;

} // namespace

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    if (ILogger* logger = gLoggerSource.logger())
    {
        logger->log(severity, message.c_str());
    }
    else if (severity <= ILogger::Severity::kWARNING)
    {
        std::fprintf(stderr, "[dijiang_trt_plugins] %s\n", message.c_str());
    }
}

} // namespace plugin
} // namespace dijiang

// TENSORRTAPI expands to nothing outside TensorRT's own build, and this library is compiled
// with hidden visibility, so the entry points are exported explicitly.
#define DIJIANG_PLUGIN_EXPORT __attribute__((visibility("default")))

extern "C" DIJIANG_PLUGIN_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    dijiang::plugin::gStaticRegistration.handOver();
    nbCreators = dijiang::plugin::kNB_CREATORS;
    return dijiang::plugin::gCreators;
}

extern "C" DIJIANG_PLUGIN_EXPORT void setLoggerFinder(ILoggerFinder* finder)
{
    dijiang::plugin::gLoggerSource.setFinder(finder);
}

//! NV_TENSORRT_VERSION the library was compiled against (e.g. 100300 for 10.3.0), for
//! packaging checks and tests.
extern "C" DIJIANG_PLUGIN_EXPORT int32_t dijiangTrtPluginCompiledVersion()
{
    return static_cast<int32_t>(NV_TENSORRT_VERSION);
}
