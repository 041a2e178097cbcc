/*
 * Pieces shared by the FMA and tensor-core prefill kernels (prefillKernels.cu,
 * prefillTensorCoreKernels.cu): block shape, chunk coordinates, value-tile loads.
 */
#ifndef DIJIANG_PREFILL_COMMON_CUH
#define DIJIANG_PREFILL_COMMON_CUH

#include "kernelCommon.cuh"
#include "linearAttentionConfig.h"

namespace dijiang
{
namespace kernels
{

constexpr int32_t kThreads = 256;
constexpr int32_t kTileV = kPrefillTileV;

//! Where a block of a (batch*head*chunk, value tile) grid works.
struct ChunkCoords
{
    int64_t bh;
    int64_t b;
    int64_t h;
    int64_t chunkIndex;
    int64_t firstToken;
    int32_t len; //!< valid tokens in this chunk (the last chunk may be partial)
    int32_t col0;
};

template <int32_t C>
__device__ __forceinline__ ChunkCoords chunkCoords(int64_t seqLen, int64_t numHeads, int64_t numChunks)
{
    ChunkCoords cc;
    cc.bh = blockIdx.x / numChunks;
    cc.chunkIndex = blockIdx.x % numChunks;
    cc.b = cc.bh / numHeads;
    cc.h = cc.bh % numHeads;
    cc.firstToken = cc.chunkIndex * C;
    int64_t const remaining = seqLen - cc.firstToken;
    cc.len = static_cast<int32_t>(remaining < C ? remaining : C);
    cc.col0 = blockIdx.y * kTileV;
    return cc;
}

//! Loads the chunk's value columns [col0, col0 + kTileV) into V (C rows, stride ld), zero-padded.
template <int32_t C, typename T>
__device__ __forceinline__ void loadValueTile(T const* __restrict__ value, ChunkCoords const& cc, int64_t seqLen,
    int64_t numHeads, int32_t headDimV, float* V, int32_t ld = kTileV)
{
    for (int32_t e = threadIdx.x; e < C * kTileV; e += kThreads)
    {
        int32_t const r = e / kTileV;
        int32_t const j = cc.col0 + e % kTileV;
        float v = 0.F;
        if (r < cc.len && j < headDimV)
        {
            int64_t const row = (cc.b * seqLen + cc.firstToken + r) * numHeads + cc.h;
            v = toFloat(value[row * headDimV + j]);
        }
        V[r * ld + e % kTileV] = v;
    }
}

//! Kernels above 48 KiB of dynamic shared memory must opt in, and the device must allow it.
template <typename Kernel>
dijiang_status_t prepareSharedMemory(Kernel kernel, size_t bytes, int32_t deviceLimit)
{
    if (bytes > static_cast<size_t>(deviceLimit))
    {
        return DIJIANG_STATUS_UNSUPPORTED;
    }
    if (bytes > 48 * 1024
        && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes))
            != cudaSuccess)
    {
        return DIJIANG_STATUS_CUDA_ERROR;
    }
    return DIJIANG_STATUS_SUCCESS;
}

} // namespace kernels
} // namespace dijiang

#endif // DIJIANG_PREFILL_COMMON_CUH
