/*
 * Single-token step: S' = exp(g) S + k v^T, o = scale * q^T S'.
 *
 * Decode is bound by reading and writing the dk x dv fp32 state once per head, so
 * the kernel is organised around streaming the state: a block owns 32 consecutive
 * value columns of one head (one 128-byte line per state row and warp) and its
 * 8 warps walk the key rows. Every state element is read and then written by the
 * same thread, so past_state and present_state may be the same buffer.
 */
#include "kernelCommon.cuh"
#include "launchers.h"

namespace dijiang
{
namespace kernels
{
namespace
{

constexpr int32_t kDecodeCols = 32;
constexpr int32_t kDecodeRowGroups = 8;

template <typename T>
__global__ void __launch_bounds__(kDecodeCols* kDecodeRowGroups) linearAttentionDecodeKernel(T const* __restrict__ query,
    T const* __restrict__ key, T const* __restrict__ value, float const* stateIn, T const* __restrict__ decay,
    T* __restrict__ output, float* stateOut, int32_t headDimK, int32_t headDimV, float scale)
{
    // q and k of this head, shared by all columns.
    extern __shared__ float qk[];
    float* const sq = qk;
    float* const sk = qk + headDimK;
    __shared__ float partial[kDecodeRowGroups][kDecodeCols + 1];

    // With T == 1 the packed [B, 1, H*d] activations index as [(b*H + h)*d], i.e. by bh.
    int64_t const bh = blockIdx.x;
    int32_t const tx = threadIdx.x;
    int32_t const ty = threadIdx.y;
    int32_t const tid = ty * kDecodeCols + tx;

    for (int32_t i = tid; i < headDimK; i += kDecodeCols * kDecodeRowGroups)
    {
        sq[i] = toFloat(query[bh * headDimK + i]);
        sk[i] = toFloat(key[bh * headDimK + i]);
    }
    float const a = decay != nullptr ? expf(toFloat(decay[bh])) : 1.F;
    __syncthreads();

    int32_t const j = blockIdx.y * kDecodeCols + tx;
    float acc = 0.F;
    if (j < headDimV)
    {
        float const vj = toFloat(value[bh * headDimV + j]);
        int64_t const base = bh * headDimK * headDimV + j;
        // No __restrict__ on the state: in-place updates are part of the contract.
#pragma unroll 4
        for (int32_t i = ty; i < headDimK; i += kDecodeRowGroups)
        {
            int64_t const idx = base + static_cast<int64_t>(i) * headDimV;
            float const s = fmaf(a, stateIn[idx], sk[i] * vj);
            stateOut[idx] = s;
            acc = fmaf(sq[i], s, acc);
        }
    }
    partial[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && j < headDimV)
    {
        float sum = 0.F;
#pragma unroll
        for (int32_t r = 0; r < kDecodeRowGroups; ++r)
        {
            sum += partial[r][tx];
        }
        output[bh * headDimV + j] = fromFloat<T>(scale * sum);
    }
}

template <typename T>
dijiang_status_t launchDecodeTyped(LaunchArgs const& args, cudaStream_t stream)
{
    int64_t const heads = args.batch * args.numHeads;
    dim3 const grid(static_cast<uint32_t>(heads),
        static_cast<uint32_t>((args.headDimV + kDecodeCols - 1) / kDecodeCols));
    dim3 const block(kDecodeCols, kDecodeRowGroups);
    size_t const smem = 2 * sizeof(float) * static_cast<size_t>(args.headDimK);
    linearAttentionDecodeKernel<T><<<grid, block, smem, stream>>>(static_cast<T const*>(args.query),
        static_cast<T const*>(args.key), static_cast<T const*>(args.value), args.pastState,
        static_cast<T const*>(args.decay), static_cast<T*>(args.output), args.presentState,
        static_cast<int32_t>(args.headDimK), static_cast<int32_t>(args.headDimV), args.scale);
    return cudaGetLastError() == cudaSuccess ? DIJIANG_STATUS_SUCCESS : DIJIANG_STATUS_CUDA_ERROR;
}

} // namespace

dijiang_status_t launchDecode(LaunchArgs const& args, cudaStream_t stream)
{
    return args.dtype == DIJIANG_DTYPE_FLOAT16 ? launchDecodeTyped<__half>(args, stream)
                                               : launchDecodeTyped<float>(args, stream);
}

} // namespace kernels
} // namespace dijiang
