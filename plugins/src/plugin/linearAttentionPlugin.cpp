#include "linearAttentionPlugin.h"

#include "dijiang/linear_attention.h"

#include <exception>
#include <limits>
#include <sstream>

using namespace nvinfer1;

namespace dijiang
{
namespace plugin
{
namespace
{

constexpr int32_t kNB_OUTPUTS = 2;
constexpr int32_t kPAST_STATE = 3;

FieldKind toFieldKind(PluginFieldType type) noexcept
{
    switch (type)
    {
    case PluginFieldType::kINT32: return FieldKind::kINT32;
    case PluginFieldType::kINT64: return FieldKind::kINT64;
    case PluginFieldType::kFLOAT32: return FieldKind::kFLOAT32;
    case PluginFieldType::kFLOAT64: return FieldKind::kFLOAT64;
    case PluginFieldType::kCHAR: return FieldKind::kCHAR;
    default: return FieldKind::kOTHER;
    }
}

bool toShape(Dims const& dims, Shape& shape) noexcept
{
    if (dims.nbDims < 0 || dims.nbDims > Shape::kMaxRank)
    {
        return false;
    }
    shape.rank = dims.nbDims;
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        shape.d[i] = dims.d[i];
    }
    return true;
}

bool isActivationType(DataType type) noexcept
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

} // namespace

LinearAttentionPlugin::LinearAttentionPlugin(std::string pluginName, std::string pluginNamespace, Attributes const& attrs)
    : mPluginName(std::move(pluginName))
    , mNamespace(std::move(pluginNamespace))
    , mAttrs(attrs)
{
    // A build-phase instance learns its workspace in configurePlugin(); until then none is reserved.
    if (mAttrs.workspaceBytes < 0)
    {
        mAttrs.workspaceBytes = 0;
    }
    initFieldsToSerialize();
}

LinearAttentionPlugin::LinearAttentionPlugin(LinearAttentionPlugin const& other)
    : LinearAttentionPlugin(other.mPluginName, other.mNamespace, other.mAttrs)
{
}

void LinearAttentionPlugin::initFieldsToSerialize()
{
    mKvNumHeads = mAttrs.numHeads;
    mRuleName = toString(mAttrs.rule);
    std::ostringstream desc;
    desc << "update_rule=" << mRuleName << " heads=" << mAttrs.numHeads << " scale=" << mAttrs.scale
         << " chunk_size=" << mAttrs.chunkSize;
    mDescription = desc.str();

    mDataToSerialize.clear();
    mDataToSerialize.emplace_back("q_num_heads", &mAttrs.numHeads, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("kv_num_heads", &mKvNumHeads, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("scale", &mAttrs.scale, PluginFieldType::kFLOAT32, 1);
    mDataToSerialize.emplace_back(
        "update_rule", mRuleName.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mRuleName.size() + 1));
    mDataToSerialize.emplace_back("chunk_size", &mAttrs.chunkSize, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("workspace_bytes", &mAttrs.workspaceBytes, PluginFieldType::kINT64, 1);
    mFCToSerialize.nbFields = static_cast<int32_t>(mDataToSerialize.size());
    mFCToSerialize.fields = mDataToSerialize.data();
}

IPluginCapability* LinearAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* LinearAttentionPlugin::clone() noexcept
{
    try
    {
        return new LinearAttentionPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, mPluginName + ": clone failed: " + e.what());
    }
    return nullptr;
}

char const* LinearAttentionPlugin::getPluginName() const noexcept
{
    return mPluginName.c_str();
}

char const* LinearAttentionPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* LinearAttentionPlugin::getPluginNamespace() const noexcept
{
    return mNamespace.c_str();
}

int32_t LinearAttentionPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

bool LinearAttentionPlugin::checkIO(int32_t nbInputs, int32_t nbOutputs) const noexcept
{
    return nbInputs == numInputs(mAttrs.rule) && nbOutputs == kNB_OUTPUTS;
}

int32_t LinearAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || !checkIO(nbInputs, nbOutputs))
    {
        logMessage(ILogger::Severity::kERROR,
            mPluginName + ": expects " + std::to_string(numInputs(mAttrs.rule)) + " inputs and 2 outputs for update_rule '"
                + mRuleName + "'");
        return -1;
    }
    try
    {
        Shape shapes[5];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            if (!toShape(in[i].desc.dims, shapes[i]))
            {
                logMessage(ILogger::Severity::kERROR, mPluginName + ": input rank out of range");
                return -1;
            }
        }
        std::string error;
        if (!checkShapes(mAttrs, shapes, nbInputs, error))
        {
            logMessage(ILogger::Severity::kERROR, mPluginName + ": " + error);
            return -1;
        }
        if (shapes[kPAST_STATE].d[2] > 0 && shapes[kPAST_STATE].d[3] > 0
            && selectChunkSize(shapes[kPAST_STATE].d[2], shapes[kPAST_STATE].d[3], mAttrs.chunkSize) == 0)
        {
            logMessage(ILogger::Severity::kERROR,
                mPluginName + ": head size dk=" + std::to_string(shapes[kPAST_STATE].d[2])
                    + " is too large for the prefill kernels");
            return -1;
        }
        // getWorkspaceSize() returns the same number for these descriptors, and that is what
        // TensorRT reserves; serialized with the engine, it is what enqueue() checks against.
        int64_t bytes = 0;
        if (!profileWorkspace(in, nbInputs, bytes, error))
        {
            logMessage(ILogger::Severity::kERROR, mPluginName + ": " + error);
            return -1;
        }
        mAttrs.workspaceBytes = bytes;
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, mPluginName + ": " + e.what());
        return -1;
    }
    return 0;
}

bool LinearAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || !checkIO(nbInputs, nbOutputs) || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    // The recurrent state is always float32 (it accumulates over the whole sequence);
    // every other tensor shares the activation type of the query.
    if (pos == kPAST_STATE || pos == nbInputs + 1)
    {
        return desc.type == DataType::kFLOAT;
    }
    if (pos == 0)
    {
        return isActivationType(desc.type);
    }
    return desc.type == inOut[0].desc.type;
}

int32_t LinearAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || !checkIO(nbInputs, nbOutputs)
        || !isActivationType(inputTypes[0]))
    {
        logMessage(ILogger::Severity::kERROR, mPluginName + ": query must be float32 or float16");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = DataType::kFLOAT;
    return 0;
}

int32_t LinearAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (inputs == nullptr || outputs == nullptr || !checkIO(nbInputs, nbOutputs) || inputs[0].nbDims != 3
        || inputs[kPAST_STATE].nbDims != 4)
    {
        logMessage(ILogger::Severity::kERROR,
            mPluginName + ": expects query [B, T, H*dk] and past_state [B, H, dk, dv]");
        return -1;
    }
    // output: [B, T, H * dv]; present_state has the shape of past_state.
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    outputs[0].d[2]
        = exprBuilder.operation(DimensionOperation::kPROD, *exprBuilder.constant(mAttrs.numHeads), *inputs[kPAST_STATE].d[3]);
    outputs[1] = inputs[kPAST_STATE];
    return outputs[0].d[2] != nullptr ? 0 : -1;
}

bool LinearAttentionPlugin::profileWorkspace(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, int64_t& bytes, std::string& error) const
{
    // The layout is monotone in batch and sequence length, so the profile maximum covers
    // every shape the profile admits.
    Shape shapes[5];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (!toShape(inputs[i].max, shapes[i]))
        {
            error = "input " + std::to_string(i) + " has an out-of-range rank in the profile maximum";
            return false;
        }
    }
    Problem problem;
    if (!deriveProblem(mAttrs, shapes, nbInputs, problem, error))
    {
        error = "profile maximum: " + error;
        return false;
    }
    bytes = 0;
    if (problem.seqLen <= 1)
    {
        return true; // the decode kernel needs no workspace
    }
    WorkspaceLayout layout;
    if (!prefillWorkspaceLayout(problem, mAttrs.chunkSize, layout)
        || layout.totalBytes > static_cast<size_t>(std::numeric_limits<int64_t>::max()))
    {
        error = "no prefill workspace size for the profile maximum (batch " + std::to_string(problem.batch)
            + ", sequence " + std::to_string(problem.seqLen) + ", dk " + std::to_string(problem.headDimK) + ", dv "
            + std::to_string(problem.headDimV) + "): unsupported head sizes or size overflow";
        return false;
    }
    bytes = static_cast<int64_t>(layout.totalBytes);
    return true;
}

size_t LinearAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t nbOutputs) const noexcept
{
    // Returning 0 reserves nothing; enqueue() then refuses every prefill with "insufficient
    // workspace" instead of writing past a buffer, and the log says why.
    try
    {
        if (inputs == nullptr || !checkIO(nbInputs, nbOutputs))
        {
            logMessage(ILogger::Severity::kERROR,
                mPluginName + ": cannot size the workspace: expects " + std::to_string(numInputs(mAttrs.rule))
                    + " inputs and 2 outputs for update_rule '" + mRuleName + "'");
            return 0;
        }
        int64_t bytes = 0;
        std::string error;
        if (!profileWorkspace(inputs, nbInputs, bytes, error))
        {
            logMessage(ILogger::Severity::kERROR, mPluginName + ": cannot size the workspace: " + error);
            return 0;
        }
        return static_cast<size_t>(bytes);
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, mPluginName + ": cannot size the workspace: " + e.what());
    }
    return 0;
}

char const* LinearAttentionPlugin::getTimingCacheID() noexcept
{
    // Everything that changes the kernels' work is in the I/O shapes and types, except the
    // chunk length; the description string covers it.
    return mDescription.c_str();
}

char const* LinearAttentionPlugin::getMetadataString() noexcept
{
    return mDescription.c_str();
}

int32_t LinearAttentionPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || !checkIO(nbInputs, nbOutputs))
    {
        logMessage(ILogger::Severity::kERROR,
            mPluginName + ": expects " + std::to_string(numInputs(mAttrs.rule)) + " inputs and 2 outputs for update_rule '"
                + mRuleName + "'");
        return -1;
    }
    try
    {
        Shape shapes[5];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            if (!toShape(in[i].dims, shapes[i]))
            {
                logMessage(ILogger::Severity::kERROR, mPluginName + ": input rank out of range");
                return -1;
            }
        }
        Problem problem;
        std::string error;
        if (!deriveProblem(mAttrs, shapes, nbInputs, problem, error))
        {
            logMessage(ILogger::Severity::kERROR, mPluginName + ": " + error);
            return -1;
        }
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, mPluginName + ": " + e.what());
        return -1;
    }
    return 0;
}

int32_t LinearAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        int32_t const nbInputs = numInputs(mAttrs.rule);
        if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
        {
            logMessage(ILogger::Severity::kERROR, mPluginName + ": enqueue called without tensors");
            return -1;
        }
        Shape shapes[5];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            if (!toShape(inputDesc[i].dims, shapes[i]))
            {
                logMessage(ILogger::Severity::kERROR, mPluginName + ": input rank out of range");
                return -1;
            }
        }
        Problem problem;
        std::string error;
        if (!deriveProblem(mAttrs, shapes, nbInputs, problem, error))
        {
            logMessage(ILogger::Severity::kERROR, mPluginName + ": " + error);
            return -1;
        }
        dijiang_dtype_t const dtype
            = inputDesc[0].type == DataType::kHALF ? DIJIANG_DTYPE_FLOAT16 : DIJIANG_DTYPE_FLOAT32;
        bool const gated = mAttrs.rule == UpdateRule::kGATED;
        // What TensorRT reserved (workspace_bytes), not what this shape needs: the kernel API
        // compares the two before it launches anything.
        auto const reserved = static_cast<size_t>(mAttrs.workspaceBytes);

        dijiang_status_t const status = dijiang_linear_attention_forward(dtype,
            gated ? DIJIANG_RULE_GATED : DIJIANG_RULE_LINEAR, problem.batch, problem.seqLen, problem.numHeads,
            problem.headDimK, problem.headDimV, mAttrs.scale, mAttrs.chunkSize, inputs[0], inputs[1], inputs[2],
            static_cast<float const*>(inputs[kPAST_STATE]), gated ? inputs[4] : nullptr, outputs[0],
            static_cast<float*>(outputs[1]), workspace, reserved, stream);
        if (status == DIJIANG_STATUS_INSUFFICIENT_WORKSPACE)
        {
            WorkspaceLayout layout;
            std::string const needed = prefillWorkspaceLayout(problem, mAttrs.chunkSize, layout)
                ? std::to_string(layout.totalBytes)
                : std::string("an unknown number of");
            logMessage(ILogger::Severity::kERROR,
                mPluginName + ": enqueue failed: insufficient workspace: batch " + std::to_string(problem.batch)
                    + ", sequence " + std::to_string(problem.seqLen) + " needs " + needed
                    + " bytes, TensorRT reserved " + std::to_string(reserved)
                    + (workspace == nullptr ? " (null workspace pointer)" : ""));
            return -1;
        }
        if (status != DIJIANG_STATUS_SUCCESS)
        {
            logMessage(ILogger::Severity::kERROR, mPluginName + ": enqueue failed: " + dijiang_status_string(status));
            return -1;
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, mPluginName + ": enqueue failed: " + e.what());
    }
    return -1;
}

IPluginV3* LinearAttentionPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // No per-context resources: the workspace comes from TensorRT with every enqueue.
    return clone();
}

PluginFieldCollection const* LinearAttentionPlugin::getFieldsToSerialize() noexcept
{
    return &mFCToSerialize;
}

LinearAttentionPluginCreator::LinearAttentionPluginCreator(char const* pluginName, char const* pluginNamespace)
    : mPluginName(pluginName)
    , mNamespace(pluginNamespace)
{
    mPluginAttributes.emplace_back("q_num_heads", nullptr, PluginFieldType::kINT32, 1);
    mPluginAttributes.emplace_back("kv_num_heads", nullptr, PluginFieldType::kINT32, 1);
    mPluginAttributes.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mPluginAttributes.emplace_back("update_rule", nullptr, PluginFieldType::kCHAR, 0);
    mPluginAttributes.emplace_back("chunk_size", nullptr, PluginFieldType::kINT32, 1);
    mPluginAttributes.emplace_back("workspace_bytes", nullptr, PluginFieldType::kINT64, 1);
    mPluginAttributes.emplace_back("plugin_version", nullptr, PluginFieldType::kCHAR, 0);
    mPluginAttributes.emplace_back("plugin_namespace", nullptr, PluginFieldType::kCHAR, 0);
    mFC.nbFields = static_cast<int32_t>(mPluginAttributes.size());
    mFC.fields = mPluginAttributes.data();
}

char const* LinearAttentionPluginCreator::getPluginName() const noexcept
{
    return mPluginName.c_str();
}

char const* LinearAttentionPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* LinearAttentionPluginCreator::getPluginNamespace() const noexcept
{
    return mNamespace.c_str();
}

PluginFieldCollection const* LinearAttentionPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* LinearAttentionPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    // Build and runtime phases parse the same fields: getFieldsToSerialize() writes the
    // attributes back under their ONNX names, plus workspace_bytes.
    try
    {
        std::string const where = mPluginName + " (" + (name != nullptr ? name : "unnamed") + ")";
        if (fc == nullptr)
        {
            logMessage(ILogger::Severity::kERROR, where + ": null PluginFieldCollection");
            return nullptr;
        }
        std::vector<FieldView> views;
        views.reserve(static_cast<size_t>(fc->nbFields > 0 ? fc->nbFields : 0));
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            views.push_back(FieldView{f.name, f.data, toFieldKind(f.type), f.length});
        }
        Attributes attrs;
        std::string error;
        if (!parseAttributes(views.data(), static_cast<int32_t>(views.size()), attrs, error))
        {
            logMessage(ILogger::Severity::kERROR, where + ": " + error);
            return nullptr;
        }
        // Without it the runtime instance cannot know what TensorRT reserved, and a guess is how a
        // prefill writes past its workspace.
        if (phase == TensorRTPhase::kRUNTIME && attrs.workspaceBytes == kWorkspaceBytesUnset)
        {
            logMessage(ILogger::Severity::kERROR,
                where + ": serialized plugin has no 'workspace_bytes' field; rebuild the engine with this library");
            return nullptr;
        }
        return new LinearAttentionPlugin(mPluginName, mNamespace, attrs);
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, mPluginName + ": createPlugin failed: " + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace dijiang
