/*
 * TensorRT IPluginV3 implementation of the DiJiang linear-attention node
 * (plugins/README.md). One plugin class, one creator class, registered once in
 * the project's namespace.
 */
#ifndef DIJIANG_LINEAR_ATTENTION_PLUGIN_H
#define DIJIANG_LINEAR_ATTENTION_PLUGIN_H

#include "NvInferRuntime.h"
#include "NvInferVersion.h"

#include "linearAttentionConfig.h"

#include <string>
#include <vector>

// Only IPluginV3 / IPluginV3One* / IPluginCreatorV3One interfaces are used, all of which exist
// since TensorRT 10.0; the library is compiled and tested against 10.14 headers only.
#if NV_TENSORRT_MAJOR < 10
#error "IPluginV3 needs TensorRT 10.0 or newer"
#endif

namespace dijiang
{
namespace plugin
{

// dijiang_deploy/contract/names.py: OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE.
constexpr char const* kPLUGIN_VERSION{"1"};
constexpr char const* kDIJIANG_PLUGIN_NAME{"DiJiangLinearAttention"};
constexpr char const* kDIJIANG_PLUGIN_NAMESPACE{"dijiang"};

class LinearAttentionPlugin : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime
{
public:
    LinearAttentionPlugin(std::string pluginName, std::string pluginNamespace, Attributes const& attrs);
    LinearAttentionPlugin(LinearAttentionPlugin const& other);
    LinearAttentionPlugin& operator=(LinearAttentionPlugin const&) = delete;
    ~LinearAttentionPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    bool checkIO(int32_t nbInputs, int32_t nbOutputs) const noexcept;
    //! Workspace for the largest shapes of the profile (inputs[i].max). False with a message
    //! when the profile's shapes cannot be run.
    bool profileWorkspace(
        nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs, int64_t& bytes, std::string& error) const;
    void initFieldsToSerialize();

    std::string mPluginName;
    std::string mNamespace;
    Attributes mAttrs;

    // Backing storage for getFieldsToSerialize(); PluginField only points at it.
    int32_t mKvNumHeads{0};
    std::string mRuleName;
    std::string mDescription;
    std::vector<nvinfer1::PluginField> mDataToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
};

class LinearAttentionPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    LinearAttentionPluginCreator(char const* pluginName, char const* pluginNamespace);
    ~LinearAttentionPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::string mPluginName;
    std::string mNamespace;
    std::vector<nvinfer1::PluginField> mPluginAttributes;
    nvinfer1::PluginFieldCollection mFC{};
};

//! Logs through the ILoggerFinder handed to setLoggerFinder(), or TensorRT's own logger
//! when the library was loaded without one.
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

} // namespace plugin
} // namespace dijiang

#endif // DIJIANG_LINEAR_ATTENTION_PLUGIN_H
