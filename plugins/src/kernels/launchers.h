/*
 * Internal launchers, called by the C API after argument validation.
 */
#ifndef DIJIANG_LAUNCHERS_H
#define DIJIANG_LAUNCHERS_H

#include "dijiang/linear_attention.h"

namespace dijiang
{
namespace kernels
{

struct LaunchArgs
{
    dijiang_dtype_t dtype;
    bool gated;
    int64_t batch;
    int64_t seqLen;
    int64_t numHeads;
    int64_t headDimK;
    int64_t headDimV;
    float scale;
    void const* query;
    void const* key;
    void const* value;
    float const* pastState;
    void const* decay; //!< nullptr for the linear rule
    void* output;
    float* presentState;
};

//! seqLen must be 1.
dijiang_status_t launchDecode(LaunchArgs const& args, cudaStream_t stream);

//! chunk must be one of kSupportedChunkSizes; workspace laid out as prefillWorkspaceLayout().
dijiang_status_t launchPrefill(LaunchArgs const& args, int32_t chunk, int64_t numChunks, float* stateWorkspace,
    float* chunkDecayWorkspace, cudaStream_t stream);

} // namespace kernels
} // namespace dijiang

#endif // DIJIANG_LAUNCHERS_H
