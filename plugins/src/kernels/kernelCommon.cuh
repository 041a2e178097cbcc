/*
 * Device helpers shared by the decode and prefill kernels.
 */
#ifndef DIJIANG_KERNEL_COMMON_CUH
#define DIJIANG_KERNEL_COMMON_CUH

#include <cuda_fp16.h>
#include <cstdint>

namespace dijiang
{
namespace kernels
{

// Activations are fp16 or fp32 in memory; all arithmetic is fp32.
__device__ __forceinline__ float toFloat(float v)
{
    return v;
}

__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);

template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

//! Writes the inclusive prefix sum of the per-token log decays of one chunk to G[0, C).
//! Must be called by all threads of the block; warp 0 does the scan with shuffles so the
//! C-long dependency chain costs two log2(32) steps instead of C shared-memory round trips.
//! Tokens past the end of the sequence get g = 0 (like padding tokens), which makes
//! G[C - 1] the decay of the whole (possibly partial) chunk. Without decay (the "linear"
//! rule) G is all zeros.
template <int32_t C, typename T>
__device__ __forceinline__ void chunkLogDecayPrefix(
    T const* __restrict__ decay, int64_t firstIndex, int64_t tokenStride, int32_t len, float* G)
{
    static_assert(C <= 64, "one warp scans at most two 32-token halves");
    if (threadIdx.x < 32)
    {
        int32_t const lane = threadIdx.x;
        float lo = 0.F;
        float hi = 0.F;
        if (decay != nullptr)
        {
            if (lane < C && lane < len)
            {
                lo = toFloat(decay[firstIndex + lane * tokenStride]);
            }
            if (lane + 32 < C && lane + 32 < len)
            {
                hi = toFloat(decay[firstIndex + (lane + 32) * tokenStride]);
            }
        }
#pragma unroll
        for (int32_t offset = 1; offset < 32; offset <<= 1)
        {
            float const l = __shfl_up_sync(0xffffffffU, lo, offset);
            float const h = __shfl_up_sync(0xffffffffU, hi, offset);
            if (lane >= offset)
            {
                lo += l;
                hi += h;
            }
        }
        float const loTotal = __shfl_sync(0xffffffffU, lo, 31);
        if (lane < C)
        {
            G[lane] = lo;
        }
        if (lane + 32 < C)
        {
            G[lane + 32] = hi + loTotal;
        }
    }
}

} // namespace kernels
} // namespace dijiang

#endif // DIJIANG_KERNEL_COMMON_CUH
