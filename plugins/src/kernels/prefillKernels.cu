/*
 * Chunked prefill. With G_r the inclusive cumulative log decay inside a chunk
 * (r = 0..C-1) and S_0 the state entering the chunk:
 *
 *   o_r = scale * ( exp(G_r) q_r^T S_0 + sum_{m<=r} exp(G_r - G_m) (q_r . k_m) v_m )
 *   S_C = exp(G_{C-1}) S_0 + sum_m exp(G_{C-1} - G_m) k_m v_m^T
 *
 * Every exponent that is evaluated is a sum of per-token log decays over t >= m,
 * hence <= 0: no factor grows, and the masked (m > r) exponents are never formed.
 *
 * Three launches, each parallel over (batch*head, chunk, 64-wide value tile) so that
 * even a small batch fills the GPU:
 *   1. chunkStateKernel   D_c = sum_m exp(G_last - G_m) k_m v_m^T and G_last per chunk
 *   2. stateScanKernel    S_in(c) for every chunk (sequential over chunks, one thread per
 *                         state element) and the final state
 *   3. chunkOutputKernel  intra-chunk causal product plus the inter-chunk term from S_in(c)
 * The workspace holds one dk x dv state per chunk: D_c is replaced by S_in(c) in place.
 * past_state is read only by the scan, which also writes present_state element by
 * element, so the two may alias.
 *
 * Blocks have 256 threads viewed as a 16 x 16 grid (tx = tid % 16, ty = tid / 16);
 * a thread owns rows ty + 16a and columns tx + 16b of a tile, which keeps a half-warp's
 * shared-memory reads either broadcast (same row) or on consecutive banks.
 */
#include "kernelCommon.cuh"
#include "launchers.h"
#include "linearAttentionConfig.h"

#include <algorithm>

namespace dijiang
{
namespace kernels
{
namespace
{

constexpr int32_t kThreads = 256;
constexpr int32_t kGrid = 16;
constexpr int32_t kTileV = kPrefillTileV;
constexpr int32_t kColsPerThread = kTileV / kGrid;
constexpr int32_t kStageRows = kPrefillStageRows;
constexpr int32_t kScanThreads = 256;

static_assert(kThreads == kGrid * kGrid, "16 x 16 thread grid");
static_assert(kTileV % kGrid == 0 && kStageRows % kGrid == 0, "tiles are multiples of the thread grid");

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

//! Loads the chunk's value columns [col0, col0 + kTileV) into V (C x kTileV), zero-padded.
template <int32_t C, typename T>
__device__ __forceinline__ void loadValueTile(T const* __restrict__ value, ChunkCoords const& cc, int64_t seqLen,
    int64_t numHeads, int32_t headDimV, float* V)
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
        V[e] = v;
    }
}

template <int32_t C, typename T>
__global__ void __launch_bounds__(kThreads) chunkStateKernel(T const* __restrict__ key, T const* __restrict__ value,
    T const* __restrict__ decay, float* __restrict__ chunkStates, float* __restrict__ chunkDecay, int64_t seqLen,
    int64_t numHeads, int64_t numChunks, int32_t headDimK, int32_t headDimV)
{
    extern __shared__ float smem[];
    float* const K = smem;                  // C x dk, rows pre-weighted by exp(G_last - G_m)
    float* const V = K + C * headDimK;      // C x kTileV
    float* const G = V + C * kTileV;        // C

    ChunkCoords const cc = chunkCoords<C>(seqLen, numHeads, numChunks);
    int32_t const tid = threadIdx.x;

    chunkLogDecayPrefix<C>(decay, (cc.b * seqLen + cc.firstToken) * numHeads + cc.h, numHeads, cc.len, G);
    loadValueTile<C>(value, cc, seqLen, numHeads, headDimV, V);
    __syncthreads();

    float const gLast = G[C - 1];
    for (int32_t e = tid; e < C * headDimK; e += kThreads)
    {
        int32_t const r = e / headDimK;
        int32_t const i = e - r * headDimK;
        float k = 0.F;
        if (r < cc.len)
        {
            int64_t const row = (cc.b * seqLen + cc.firstToken + r) * numHeads + cc.h;
            k = toFloat(key[row * headDimK + i]) * expf(gLast - G[r]);
        }
        K[e] = k;
    }
    __syncthreads();

    int32_t const tx = tid % kGrid;
    int32_t const ty = tid / kGrid;
    float* const out = chunkStates + (cc.bh * numChunks + cc.chunkIndex) * headDimK * headDimV;
    for (int32_t i0 = 0; i0 < headDimK; i0 += kStageRows)
    {
        float acc[kStageRows / kGrid][kColsPerThread] = {};
        for (int32_t m = 0; m < C; ++m)
        {
            float kv[kStageRows / kGrid];
#pragma unroll
            for (int32_t a = 0; a < kStageRows / kGrid; ++a)
            {
                int32_t const i = i0 + ty + a * kGrid;
                kv[a] = i < headDimK ? K[m * headDimK + i] : 0.F;
            }
#pragma unroll
            for (int32_t b = 0; b < kColsPerThread; ++b)
            {
                float const v = V[m * kTileV + tx + b * kGrid];
#pragma unroll
                for (int32_t a = 0; a < kStageRows / kGrid; ++a)
                {
                    acc[a][b] = fmaf(kv[a], v, acc[a][b]);
                }
            }
        }
#pragma unroll
        for (int32_t a = 0; a < kStageRows / kGrid; ++a)
        {
            int32_t const i = i0 + ty + a * kGrid;
#pragma unroll
            for (int32_t b = 0; b < kColsPerThread; ++b)
            {
                int32_t const j = cc.col0 + tx + b * kGrid;
                if (i < headDimK && j < headDimV)
                {
                    out[static_cast<int64_t>(i) * headDimV + j] = acc[a][b];
                }
            }
        }
    }
    if (blockIdx.y == 0 && tid == 0)
    {
        chunkDecay[cc.bh * numChunks + cc.chunkIndex] = gLast;
    }
}

__global__ void __launch_bounds__(kScanThreads) stateScanKernel(float const* stateIn, float* stateOut,
    float* __restrict__ chunkStates, float const* __restrict__ chunkDecay, int64_t numHeadsTotal, int64_t stateSize,
    int64_t numChunks)
{
    // The chain through s is sequential over chunks, but the loads are not: they are issued
    // kScanUnroll chunks ahead so the loop waits on memory once per group, not once per chunk.
    constexpr int32_t kScanUnroll = 8;
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * kScanThreads + threadIdx.x;
    if (idx >= numHeadsTotal * stateSize)
    {
        return;
    }
    int64_t const bh = idx / stateSize;
    int64_t const e = idx - bh * stateSize;
    float s = stateIn[idx];
    float* slot = chunkStates + bh * numChunks * stateSize + e;
    float const* decay = chunkDecay + bh * numChunks;
    int64_t c = 0;
    for (; c + kScanUnroll <= numChunks; c += kScanUnroll, slot += kScanUnroll * stateSize)
    {
        float delta[kScanUnroll];
        float factor[kScanUnroll];
#pragma unroll
        for (int32_t u = 0; u < kScanUnroll; ++u)
        {
            delta[u] = slot[u * stateSize];
            factor[u] = expf(decay[c + u]);
        }
#pragma unroll
        for (int32_t u = 0; u < kScanUnroll; ++u)
        {
            slot[u * stateSize] = s; // the output kernel reads the state entering chunk c + u from here
            s = fmaf(factor[u], s, delta[u]);
        }
    }
    for (; c < numChunks; ++c, slot += stateSize)
    {
        float const delta = *slot;
        *slot = s;
        s = fmaf(expf(decay[c]), s, delta);
    }
    stateOut[idx] = s;
}

template <int32_t C, typename T>
__global__ void __launch_bounds__(kThreads) chunkOutputKernel(T const* __restrict__ query, T const* __restrict__ key,
    T const* __restrict__ value, T const* __restrict__ decay, float const* __restrict__ chunkStates,
    T* __restrict__ output, int64_t seqLen, int64_t numHeads, int64_t numChunks, int32_t headDimK, int32_t headDimV,
    float scale)
{
    constexpr int32_t kRows = C / kGrid; // chunk rows (and score columns) per thread
    static_assert(C % kGrid == 0, "chunk must be a multiple of 16");

    int32_t const ldq = headDimK + 1;
    extern __shared__ float smem[];
    float* const Q = smem;                    // C x (dk + 1)
    float* const K = Q + C * ldq;             // C x (dk + 1)
    float* const V = K + C * ldq;             // C x kTileV
    float* const A = V + C * kTileV;          // C x (C + 1): decayed causal scores
    float* const S = A + C * (C + 1);         // kStageRows x kTileV: rows of S_in
    float* const G = S + kStageRows * kTileV; // C

    ChunkCoords const cc = chunkCoords<C>(seqLen, numHeads, numChunks);
    int32_t const tid = threadIdx.x;
    int32_t const tx = tid % kGrid;
    int32_t const ty = tid / kGrid;

    chunkLogDecayPrefix<C>(decay, (cc.b * seqLen + cc.firstToken) * numHeads + cc.h, numHeads, cc.len, G);
    loadValueTile<C>(value, cc, seqLen, numHeads, headDimV, V);
    for (int32_t e = tid; e < C * headDimK; e += kThreads)
    {
        int32_t const r = e / headDimK;
        int32_t const i = e - r * headDimK;
        float q = 0.F;
        float k = 0.F;
        if (r < cc.len)
        {
            int64_t const idx = ((cc.b * seqLen + cc.firstToken + r) * numHeads + cc.h) * headDimK + i;
            q = toFloat(query[idx]);
            k = toFloat(key[idx]);
        }
        Q[r * ldq + i] = q;
        K[r * ldq + i] = k;
    }
    __syncthreads();

    // Scores A[r][m] = exp(G_r - G_m) (q_r . k_m) for m <= r, else 0.
    {
        float acc[kRows][kRows] = {};
        for (int32_t i = 0; i < headDimK; ++i)
        {
            float qv[kRows];
            float kv[kRows];
#pragma unroll
            for (int32_t a = 0; a < kRows; ++a)
            {
                qv[a] = Q[(ty + a * kGrid) * ldq + i];
                kv[a] = K[(tx + a * kGrid) * ldq + i];
            }
#pragma unroll
            for (int32_t a = 0; a < kRows; ++a)
            {
#pragma unroll
                for (int32_t b = 0; b < kRows; ++b)
                {
                    acc[a][b] = fmaf(qv[a], kv[b], acc[a][b]);
                }
            }
        }
#pragma unroll
        for (int32_t a = 0; a < kRows; ++a)
        {
            int32_t const r = ty + a * kGrid;
#pragma unroll
            for (int32_t b = 0; b < kRows; ++b)
            {
                int32_t const m = tx + b * kGrid;
                A[r * (C + 1) + m] = m <= r ? acc[a][b] * expf(G[r] - G[m]) : 0.F;
            }
        }
    }
    __syncthreads();

    float intra[kRows][kColsPerThread] = {};
    for (int32_t m = 0; m < C; ++m)
    {
        float v[kColsPerThread];
#pragma unroll
        for (int32_t b = 0; b < kColsPerThread; ++b)
        {
            v[b] = V[m * kTileV + tx + b * kGrid];
        }
#pragma unroll
        for (int32_t a = 0; a < kRows; ++a)
        {
            float const s = A[(ty + a * kGrid) * (C + 1) + m];
#pragma unroll
            for (int32_t b = 0; b < kColsPerThread; ++b)
            {
                intra[a][b] = fmaf(s, v[b], intra[a][b]);
            }
        }
    }

    // Inter-chunk term q_r^T S_in, streaming S_in through shared memory kStageRows rows at a time.
    float const* const stateIn = chunkStates + (cc.bh * numChunks + cc.chunkIndex) * headDimK * headDimV;
    float inter[kRows][kColsPerThread] = {};
    for (int32_t i0 = 0; i0 < headDimK; i0 += kStageRows)
    {
        int32_t const rows = min(kStageRows, headDimK - i0);
        __syncthreads(); // previous stage fully consumed
        for (int32_t e = tid; e < kStageRows * kTileV; e += kThreads)
        {
            int32_t const ii = e / kTileV;
            int32_t const j = cc.col0 + e % kTileV;
            S[e] = ii < rows && j < headDimV ? stateIn[static_cast<int64_t>(i0 + ii) * headDimV + j] : 0.F;
        }
        __syncthreads();
        for (int32_t ii = 0; ii < rows; ++ii)
        {
            float s[kColsPerThread];
#pragma unroll
            for (int32_t b = 0; b < kColsPerThread; ++b)
            {
                s[b] = S[ii * kTileV + tx + b * kGrid];
            }
#pragma unroll
            for (int32_t a = 0; a < kRows; ++a)
            {
                float const q = Q[(ty + a * kGrid) * ldq + i0 + ii];
#pragma unroll
                for (int32_t b = 0; b < kColsPerThread; ++b)
                {
                    inter[a][b] = fmaf(q, s[b], inter[a][b]);
                }
            }
        }
    }

#pragma unroll
    for (int32_t a = 0; a < kRows; ++a)
    {
        int32_t const r = ty + a * kGrid;
        if (r >= cc.len)
        {
            continue;
        }
        float const carry = expf(G[r]);
        int64_t const row = (cc.b * seqLen + cc.firstToken + r) * numHeads + cc.h;
#pragma unroll
        for (int32_t b = 0; b < kColsPerThread; ++b)
        {
            int32_t const j = cc.col0 + tx + b * kGrid;
            if (j < headDimV)
            {
                output[row * headDimV + j] = fromFloat<T>(scale * fmaf(carry, inter[a][b], intra[a][b]));
            }
        }
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

template <int32_t C, typename T>
dijiang_status_t launchPrefillTyped(LaunchArgs const& args, int64_t numChunks, float* chunkStates, float* chunkDecay,
    cudaStream_t stream)
{
    int32_t device = 0;
    int32_t smemLimit = 0;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&smemLimit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    {
        return DIJIANG_STATUS_CUDA_ERROR;
    }
    size_t const stateSmem = prefillStateSharedBytes(C, args.headDimK);
    size_t const outputSmem = prefillOutputSharedBytes(C, args.headDimK);
    dijiang_status_t status = prepareSharedMemory(chunkStateKernel<C, T>, stateSmem, smemLimit);
    if (status == DIJIANG_STATUS_SUCCESS)
    {
        status = prepareSharedMemory(chunkOutputKernel<C, T>, outputSmem, smemLimit);
    }
    if (status != DIJIANG_STATUS_SUCCESS)
    {
        return status;
    }

    int64_t const heads = args.batch * args.numHeads;
    int32_t const dk = static_cast<int32_t>(args.headDimK);
    int32_t const dv = static_cast<int32_t>(args.headDimV);
    T const* const decay = static_cast<T const*>(args.gated ? args.decay : nullptr);
    dim3 const chunkGrid(static_cast<uint32_t>(heads * numChunks), static_cast<uint32_t>((dv + kTileV - 1) / kTileV));

    chunkStateKernel<C, T><<<chunkGrid, kThreads, stateSmem, stream>>>(static_cast<T const*>(args.key),
        static_cast<T const*>(args.value), decay, chunkStates, chunkDecay, args.seqLen, args.numHeads, numChunks, dk,
        dv);

    int64_t const stateSize = args.headDimK * args.headDimV;
    int64_t const scanBlocks = (heads * stateSize + kScanThreads - 1) / kScanThreads;
    stateScanKernel<<<static_cast<uint32_t>(scanBlocks), kScanThreads, 0, stream>>>(
        args.pastState, args.presentState, chunkStates, chunkDecay, heads, stateSize, numChunks);

    chunkOutputKernel<C, T><<<chunkGrid, kThreads, outputSmem, stream>>>(static_cast<T const*>(args.query),
        static_cast<T const*>(args.key), static_cast<T const*>(args.value), decay, chunkStates,
        static_cast<T*>(args.output), args.seqLen, args.numHeads, numChunks, dk, dv, args.scale);

    return cudaGetLastError() == cudaSuccess ? DIJIANG_STATUS_SUCCESS : DIJIANG_STATUS_CUDA_ERROR;
}

template <typename T>
dijiang_status_t launchPrefillChunk(
    LaunchArgs const& args, int32_t chunk, int64_t numChunks, float* chunkStates, float* chunkDecay, cudaStream_t stream)
{
    switch (chunk)
    {
    case 64: return launchPrefillTyped<64, T>(args, numChunks, chunkStates, chunkDecay, stream);
    case 32: return launchPrefillTyped<32, T>(args, numChunks, chunkStates, chunkDecay, stream);
    case 16: return launchPrefillTyped<16, T>(args, numChunks, chunkStates, chunkDecay, stream);
    default: return DIJIANG_STATUS_UNSUPPORTED;
    }
}

} // namespace

dijiang_status_t launchPrefill(LaunchArgs const& args, int32_t chunk, int64_t numChunks, float* stateWorkspace,
    float* chunkDecayWorkspace, cudaStream_t stream)
{
    return args.dtype == DIJIANG_DTYPE_FLOAT16
        ? launchPrefillChunk<__half>(args, chunk, numChunks, stateWorkspace, chunkDecayWorkspace, stream)
        : launchPrefillChunk<float>(args, chunk, numChunks, stateWorkspace, chunkDecayWorkspace, stream);
}

} // namespace kernels
} // namespace dijiang
