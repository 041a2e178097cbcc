/*
 * C API: argument validation and dispatch to the decode / chunked prefill launchers.
 */
#include "dijiang/linear_attention.h"
#include "launchers.h"
#include "linearAttentionConfig.h"

#include <cstdint>
#include <limits>

namespace
{

using dijiang::kernels::LaunchArgs;

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;
//! q and k of one head are staged as fp32 in (static-limit) shared memory by the decode kernel.
constexpr int64_t kMaxDecodeHeadDimK = 4096;

bool validDtype(dijiang_dtype_t dtype)
{
    return dtype == DIJIANG_DTYPE_FLOAT32 || dtype == DIJIANG_DTYPE_FLOAT16;
}

bool validRule(dijiang_update_rule_t rule)
{
    return rule == DIJIANG_RULE_GATED || rule == DIJIANG_RULE_LINEAR;
}

//! Checks everything common to all entry points and fills args. Pointers may be null
//! only when there is nothing to read or write.
dijiang_status_t makeArgs(dijiang_dtype_t dtype, dijiang_update_rule_t rule, int64_t batch, int64_t seqLen,
    int64_t numHeads, int64_t headDimK, int64_t headDimV, float scale, void const* query, void const* key,
    void const* value, float const* pastState, void const* decay, void* output, float* presentState, LaunchArgs& args)
{
    if (!validDtype(dtype) || !validRule(rule) || batch < 0 || seqLen < 0 || numHeads <= 0 || headDimK <= 0
        || headDimV <= 0)
    {
        return DIJIANG_STATUS_INVALID_ARGUMENT;
    }
    bool const gated = rule == DIJIANG_RULE_GATED;
    if (batch > 0)
    {
        if (pastState == nullptr || presentState == nullptr)
        {
            return DIJIANG_STATUS_INVALID_ARGUMENT;
        }
        if (seqLen > 0
            && (query == nullptr || key == nullptr || value == nullptr || output == nullptr
                || (gated && decay == nullptr)))
        {
            return DIJIANG_STATUS_INVALID_ARGUMENT;
        }
    }
    // Element offsets are computed in int64 inside the kernels; the per-head sizes are int32.
    if (headDimK > std::numeric_limits<int32_t>::max() || headDimV > std::numeric_limits<int32_t>::max()
        || numHeads > kMaxGridX || (batch > 0 && numHeads > kMaxGridX / batch))
    {
        return DIJIANG_STATUS_UNSUPPORTED;
    }
    dijiang::Attributes attrs;
    attrs.scale = scale;
    args = LaunchArgs{dtype, gated, batch, seqLen, numHeads, headDimK, headDimV,
        dijiang::effectiveScale(attrs, headDimK), query, key, value, pastState, gated ? decay : nullptr, output,
        presentState};
    return DIJIANG_STATUS_SUCCESS;
}

dijiang_status_t copyState(LaunchArgs const& args, cudaStream_t stream)
{
    if (args.batch == 0 || args.pastState == args.presentState)
    {
        return DIJIANG_STATUS_SUCCESS;
    }
    size_t const bytes = sizeof(float) * static_cast<size_t>(args.batch * args.numHeads * args.headDimK)
        * static_cast<size_t>(args.headDimV);
    return cudaMemcpyAsync(args.presentState, args.pastState, bytes, cudaMemcpyDeviceToDevice, stream) == cudaSuccess
        ? DIJIANG_STATUS_SUCCESS
        : DIJIANG_STATUS_CUDA_ERROR;
}

dijiang_status_t decode(LaunchArgs const& args, cudaStream_t stream)
{
    if (args.seqLen != 1)
    {
        return DIJIANG_STATUS_INVALID_ARGUMENT;
    }
    if (args.headDimK > kMaxDecodeHeadDimK || (args.headDimV + 31) / 32 > kMaxGridY)
    {
        return DIJIANG_STATUS_UNSUPPORTED;
    }
    if (args.batch == 0)
    {
        return DIJIANG_STATUS_SUCCESS;
    }
    return dijiang::kernels::launchDecode(args, stream);
}

dijiang_status_t prefill(
    LaunchArgs const& args, int32_t chunkHint, void* workspace, size_t workspaceSize, cudaStream_t stream)
{
    dijiang::Problem const problem{args.batch, args.seqLen, args.numHeads, args.headDimK, args.headDimV};
    dijiang::WorkspaceLayout layout;
    if (!dijiang::prefillWorkspaceLayout(problem, chunkHint, layout)
        || (args.headDimV + dijiang::kPrefillTileV - 1) / dijiang::kPrefillTileV > kMaxGridY
        || (layout.numChunks > 0 && args.batch * args.numHeads > kMaxGridX / layout.numChunks))
    {
        return DIJIANG_STATUS_UNSUPPORTED;
    }
    if (args.seqLen == 0)
    {
        return copyState(args, stream);
    }
    if (args.batch == 0)
    {
        return DIJIANG_STATUS_SUCCESS;
    }
    if (workspace == nullptr || workspaceSize < layout.totalBytes)
    {
        return DIJIANG_STATUS_INSUFFICIENT_WORKSPACE;
    }
    auto* const base = static_cast<char*>(workspace);
    return dijiang::kernels::launchPrefill(args, layout.chunk, layout.numChunks, reinterpret_cast<float*>(base),
        reinterpret_cast<float*>(base + layout.decayOffset), stream);
}

} // namespace

extern "C" {

DIJIANG_API size_t dijiang_linear_attention_workspace_size(int64_t batch, int64_t seq_len, int64_t num_heads,
    int64_t head_dim_k, int64_t head_dim_v, int32_t chunk_size_hint)
{
    dijiang::WorkspaceLayout layout;
    dijiang::Problem const problem{batch, seq_len, num_heads, head_dim_k, head_dim_v};
    return dijiang::prefillWorkspaceLayout(problem, chunk_size_hint, layout) ? layout.totalBytes
                                                                            : std::numeric_limits<size_t>::max();
}

DIJIANG_API int32_t dijiang_linear_attention_chunk_size(int64_t head_dim_k, int64_t head_dim_v, int32_t chunk_size_hint)
{
    return dijiang::selectChunkSize(head_dim_k, head_dim_v, chunk_size_hint);
}

DIJIANG_API dijiang_status_t dijiang_linear_attention_decode(dijiang_dtype_t dtype, dijiang_update_rule_t rule,
    int64_t batch, int64_t num_heads, int64_t head_dim_k, int64_t head_dim_v, float scale, void const* query,
    void const* key, void const* value, float const* past_state, void const* decay, void* output, float* present_state,
    cudaStream_t stream)
{
    LaunchArgs args;
    dijiang_status_t const status = makeArgs(dtype, rule, batch, 1, num_heads, head_dim_k, head_dim_v, scale, query,
        key, value, past_state, decay, output, present_state, args);
    return status == DIJIANG_STATUS_SUCCESS ? decode(args, stream) : status;
}

DIJIANG_API dijiang_status_t dijiang_linear_attention_prefill(dijiang_dtype_t dtype, dijiang_update_rule_t rule,
    int64_t batch, int64_t seq_len, int64_t num_heads, int64_t head_dim_k, int64_t head_dim_v, float scale,
    int32_t chunk_size_hint, void const* query, void const* key, void const* value, float const* past_state,
    void const* decay, void* output, float* present_state, void* workspace, size_t workspace_size,
    cudaStream_t stream)
{
    LaunchArgs args;
    dijiang_status_t const status = makeArgs(dtype, rule, batch, seq_len, num_heads, head_dim_k, head_dim_v, scale,
        query, key, value, past_state, decay, output, present_state, args);
    return status == DIJIANG_STATUS_SUCCESS ? prefill(args, chunk_size_hint, workspace, workspace_size, stream)
                                            : status;
}

DIJIANG_API dijiang_status_t dijiang_linear_attention_forward(dijiang_dtype_t dtype, dijiang_update_rule_t rule,
    int64_t batch, int64_t seq_len, int64_t num_heads, int64_t head_dim_k, int64_t head_dim_v, float scale,
    int32_t chunk_size_hint, void const* query, void const* key, void const* value, float const* past_state,
    void const* decay, void* output, float* present_state, void* workspace, size_t workspace_size,
    cudaStream_t stream)
{
    LaunchArgs args;
    dijiang_status_t const status = makeArgs(dtype, rule, batch, seq_len, num_heads, head_dim_k, head_dim_v, scale,
        query, key, value, past_state, decay, output, present_state, args);
    if (status != DIJIANG_STATUS_SUCCESS)
    {
        return status;
    }
    if (seq_len == 1 && head_dim_k <= kMaxDecodeHeadDimK)
    {
        return decode(args, stream);
    }
    return prefill(args, chunk_size_hint, workspace, workspace_size, stream);
}

DIJIANG_API char const* dijiang_status_string(dijiang_status_t status)
{
    switch (status)
    {
    case DIJIANG_STATUS_SUCCESS: return "success";
    case DIJIANG_STATUS_INVALID_ARGUMENT: return "invalid argument";
    case DIJIANG_STATUS_UNSUPPORTED: return "unsupported shape";
    case DIJIANG_STATUS_INSUFFICIENT_WORKSPACE: return "insufficient workspace";
    case DIJIANG_STATUS_CUDA_ERROR: return "CUDA error";
    }
    return "unknown status";
}

} // extern "C"
