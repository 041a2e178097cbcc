/*
 * Tensor-core versions of the prefill chunk-state and chunk-output kernels.
 * prefillKernels.cu states the algorithm and holds the FMA versions, the state
 * scan and the dispatch; the workspace and the results are the same.
 *
 * The four products of a chunk (decayed K^T V, Q K^T, masked scores x V and
 * Q x S_in) run as TF32 WMMA (m16n16k8, fp32 accumulation, sm_80+). TF32 keeps
 * 10 mantissa bits, which alone would cost the fp32 operands about three decimal
 * digits, so each fp32 operand x is split into x_hi = tf32(x) and
 * x_lo = tf32(x - x_hi) and a product becomes lo*hi + hi*lo + hi*hi ("3xTF32"),
 * about as accurate as an fp32 FMA loop (~2^-21 relative). fp16 activations are
 * exact in TF32 (same 10-bit mantissa, wider exponent), so a product with an
 * fp16 operand drops its lo term; only the quantities formed in fp32 inside the
 * kernel (decayed keys, masked scores, the incoming state) are split then.
 *
 * Each of the 8 warps owns whole 16 x 16 output fragments; fragments entirely
 * above the causal diagonal are neither computed nor read.
 */
#include "launchers.h"
#include "prefillCommon.cuh"

#include <mma.h>
#include <type_traits>

namespace dijiang
{
namespace kernels
{
namespace
{

constexpr int32_t kWarps = kThreads / 32;
constexpr int32_t kLdV = kTileV + kTensorCorePad;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
namespace wm = nvcuda::wmma;
using AccFrag = wm::fragment<wm::accumulator, 16, 16, 8, float>;
template <typename Layout>
using AFrag = wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, Layout>;
template <typename Layout>
using BFrag = wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, Layout>;

//! Loads an fp32 tile and rounds it to TF32 (hi); unless exact, lo gets the rounding remainder.
template <bool kExact, typename Frag>
__device__ __forceinline__ void loadSplit(Frag& hi, Frag& lo, float const* p, unsigned ld)
{
    wm::load_matrix_sync(hi, p, ld);
#pragma unroll
    for (int32_t t = 0; t < hi.num_elements; ++t)
    {
        float const x = hi.x[t];
        float const h = wm::__float_to_tf32(x);
        hi.x[t] = h;
        if constexpr (!kExact)
        {
            lo.x[t] = wm::__float_to_tf32(x - h);
        }
    }
}

//! acc += a * b, with the lo terms of the operands that are not exact in TF32 (small terms first).
template <bool kExactA, bool kExactB, typename FA, typename FB>
__device__ __forceinline__ void mmaSplit(AccFrag& acc, FA const& aHi, FA const& aLo, FB const& bHi, FB const& bLo)
{
    if constexpr (!kExactA)
    {
        wm::mma_sync(acc, aLo, bHi, acc);
    }
    if constexpr (!kExactB)
    {
        wm::mma_sync(acc, aHi, bLo, acc);
    }
    wm::mma_sync(acc, aHi, bHi, acc);
}
#endif

template <typename T>
constexpr bool kExactInTf32 = std::is_same<T, __half>::value;

template <int32_t C, typename T>
__global__ void __launch_bounds__(kThreads) chunkStateKernelTc(T const* __restrict__ key, T const* __restrict__ value,
    T const* __restrict__ decay, float* __restrict__ chunkStates, float* __restrict__ chunkDecay, int64_t seqLen,
    int64_t numHeads, int64_t numChunks, int32_t headDimK, int32_t headDimV)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    extern __shared__ __align__(128) float smem[];
    int32_t const ldk = headDimK + kTensorCorePad;
    float* const K = smem;             // C x ldk, rows weighted by exp(G_last - G_m)
    float* const V = K + C * ldk;      // C x kLdV
    float* const G = V + C * kLdV;     // C

    ChunkCoords const cc = chunkCoords<C>(seqLen, numHeads, numChunks);
    chunkLogDecayPrefix<C>(decay, (cc.b * seqLen + cc.firstToken) * numHeads + cc.h, numHeads, cc.len, G);
    loadValueTile<C>(value, cc, seqLen, numHeads, headDimV, V, kLdV);
    __syncthreads();

    float const gLast = G[C - 1];
    for (int32_t e = threadIdx.x; e < C * headDimK; e += kThreads)
    {
        int32_t const r = e / headDimK;
        int32_t const i = e - r * headDimK;
        float k = 0.F;
        if (r < cc.len)
        {
            int64_t const row = (cc.b * seqLen + cc.firstToken + r) * numHeads + cc.h;
            k = toFloat(key[row * headDimK + i]) * expf(gLast - G[r]);
        }
        K[r * ldk + i] = k;
    }
    __syncthreads();

    // D (dk x tile) = K^T V: A = K^T is K read column-major.
    int32_t const colFrags = min(kTileV, headDimV - cc.col0) / 16;
    int32_t const frags = headDimK / 16 * colFrags;
    float* const out = chunkStates + (cc.bh * numChunks + cc.chunkIndex) * headDimK * headDimV + cc.col0;
    for (int32_t f = threadIdx.x / 32; f < frags; f += kWarps)
    {
        int32_t const i0 = f / colFrags * 16;
        int32_t const j0 = f % colFrags * 16;
        AccFrag acc;
        wm::fill_fragment(acc, 0.F);
        for (int32_t m0 = 0; m0 < C; m0 += 8)
        {
            AFrag<wm::col_major> aHi, aLo;
            BFrag<wm::row_major> bHi, bLo;
            loadSplit<false>(aHi, aLo, K + m0 * ldk + i0, ldk);
            loadSplit<kExactInTf32<T>>(bHi, bLo, V + m0 * kLdV + j0, kLdV);
            mmaSplit<false, kExactInTf32<T>>(acc, aHi, aLo, bHi, bLo);
        }
        wm::store_matrix_sync(out + static_cast<int64_t>(i0) * headDimV + j0, acc, headDimV, wm::mem_row_major);
    }
    if (blockIdx.y == 0 && threadIdx.x == 0)
    {
        chunkDecay[cc.bh * numChunks + cc.chunkIndex] = gLast;
    }
#endif
}

template <int32_t C, typename T>
__global__ void __launch_bounds__(kThreads) chunkOutputKernelTc(T const* __restrict__ query,
    T const* __restrict__ key, T const* __restrict__ value, T const* __restrict__ decay,
    float const* __restrict__ chunkStates, T* __restrict__ output, int64_t seqLen, int64_t numHeads,
    int64_t numChunks, int32_t headDimK, int32_t headDimV, float scale)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int32_t kRowFrags = C / 16;
    constexpr int32_t kLdA = C + kTensorCorePad;
    // Output fragments per warp: the C x 64 tile has kRowFrags * 4 of them.
    constexpr int32_t kAccPerWarp = (kRowFrags * (kTileV / 16) + kWarps - 1) / kWarps;
    constexpr bool kExact = kExactInTf32<T>;
    static_assert(C % 16 == 0, "chunk must be a multiple of 16");

    extern __shared__ __align__(128) float smem[];
    int32_t const ldq = headDimK + kTensorCorePad;
    float* const Q = smem;             // C x ldq
    float* const K = Q + C * ldq;      // C x ldq
    float* const V = K + C * ldq;      // C x kLdV
    float* const O = V + C * kLdV;     // C x kLdV: output tile
    float* const A = O + C * kLdV;     // C x kLdA: decayed causal scores
    float* const G = A + C * kLdA;     // C

    ChunkCoords const cc = chunkCoords<C>(seqLen, numHeads, numChunks);
    int32_t const warp = threadIdx.x / 32;
    chunkLogDecayPrefix<C>(decay, (cc.b * seqLen + cc.firstToken) * numHeads + cc.h, numHeads, cc.len, G);
    loadValueTile<C>(value, cc, seqLen, numHeads, headDimV, V, kLdV);
    for (int32_t e = threadIdx.x; e < C * headDimK; e += kThreads)
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

    // Raw scores Q K^T for the fragments on or below the diagonal (B = K^T is K read column-major).
    for (int32_t f = warp; f < kRowFrags * kRowFrags; f += kWarps)
    {
        int32_t const r0 = f / kRowFrags * 16;
        int32_t const m0 = f % kRowFrags * 16;
        if (m0 > r0)
        {
            continue;
        }
        AccFrag acc;
        wm::fill_fragment(acc, 0.F);
        for (int32_t i0 = 0; i0 < headDimK; i0 += 8)
        {
            AFrag<wm::row_major> aHi, aLo;
            BFrag<wm::col_major> bHi, bLo;
            loadSplit<kExact>(aHi, aLo, Q + r0 * ldq + i0, ldq);
            loadSplit<kExact>(bHi, bLo, K + m0 * ldq + i0, ldq);
            mmaSplit<kExact, kExact>(acc, aHi, aLo, bHi, bLo);
        }
        wm::store_matrix_sync(A + r0 * kLdA + m0, acc, kLdA, wm::mem_row_major);
    }

    // Inter-chunk term Q S_in, the state fragments read straight from the workspace.
    int32_t const colFrags = min(kTileV, headDimV - cc.col0) / 16;
    int32_t const frags = kRowFrags * colFrags;
    float const* const stateIn = chunkStates + (cc.bh * numChunks + cc.chunkIndex) * headDimK * headDimV + cc.col0;
    AccFrag acc[kAccPerWarp];
#pragma unroll
    for (int32_t a = 0; a < kAccPerWarp; ++a)
    {
        wm::fill_fragment(acc[a], 0.F);
    }
    for (int32_t i0 = 0; i0 < headDimK; i0 += 8)
    {
#pragma unroll
        for (int32_t a = 0; a < kAccPerWarp; ++a)
        {
            int32_t const f = warp + a * kWarps;
            if (f < frags)
            {
                AFrag<wm::row_major> aHi, aLo;
                BFrag<wm::row_major> bHi, bLo;
                loadSplit<kExact>(aHi, aLo, Q + f / colFrags * 16 * ldq + i0, ldq);
                loadSplit<false>(bHi, bLo, stateIn + static_cast<int64_t>(i0) * headDimV + f % colFrags * 16,
                    headDimV);
                mmaSplit<kExact, false>(acc[a], aHi, aLo, bHi, bLo);
            }
        }
    }
#pragma unroll
    for (int32_t a = 0; a < kAccPerWarp; ++a)
    {
        int32_t const f = warp + a * kWarps;
        if (f < frags)
        {
            wm::store_matrix_sync(O + f / colFrags * 16 * kLdV + f % colFrags * 16, acc[a], kLdV, wm::mem_row_major);
        }
    }
    __syncthreads();

    // Decay: scores by exp(G_r - G_m) under the causal mask, the inter term by exp(G_r).
    for (int32_t e = threadIdx.x; e < C * C; e += kThreads)
    {
        int32_t const r = e / C;
        int32_t const m = e - r * C;
        A[r * kLdA + m] = m <= r ? A[r * kLdA + m] * expf(G[r] - G[m]) : 0.F;
    }
    for (int32_t e = threadIdx.x; e < C * kTileV; e += kThreads)
    {
        int32_t const r = e / kTileV;
        O[r * kLdV + e % kTileV] *= expf(G[r]);
    }
    __syncthreads();

    // Intra-chunk term: O += A V over the columns m <= the fragment's last row.
#pragma unroll
    for (int32_t a = 0; a < kAccPerWarp; ++a)
    {
        int32_t const f = warp + a * kWarps;
        if (f < frags)
        {
            int32_t const r0 = f / colFrags * 16;
            int32_t const j0 = f % colFrags * 16;
            wm::load_matrix_sync(acc[a], O + r0 * kLdV + j0, kLdV, wm::mem_row_major);
            for (int32_t m0 = 0; m0 < r0 + 16; m0 += 8)
            {
                AFrag<wm::row_major> aHi, aLo;
                BFrag<wm::row_major> bHi, bLo;
                loadSplit<false>(aHi, aLo, A + r0 * kLdA + m0, kLdA);
                loadSplit<kExact>(bHi, bLo, V + m0 * kLdV + j0, kLdV);
                mmaSplit<false, kExact>(acc[a], aHi, aLo, bHi, bLo);
            }
            wm::store_matrix_sync(O + r0 * kLdV + j0, acc[a], kLdV, wm::mem_row_major);
        }
    }
    __syncthreads();

    int32_t const cols = min(kTileV, headDimV - cc.col0);
    for (int32_t e = threadIdx.x; e < C * kTileV; e += kThreads)
    {
        int32_t const r = e / kTileV;
        int32_t const j = e % kTileV;
        if (r < cc.len && j < cols)
        {
            int64_t const row = (cc.b * seqLen + cc.firstToken + r) * numHeads + cc.h;
            output[row * headDimV + cc.col0 + j] = fromFloat<T>(scale * O[r * kLdV + j]);
        }
    }
#endif
}

template <int32_t C, typename T>
dijiang_status_t launchTyped(LaunchArgs const& args, int64_t numChunks, float* chunkStates, float* chunkDecay,
    int32_t smemLimit, bool outputStage, cudaStream_t stream)
{
    int32_t const dk = static_cast<int32_t>(args.headDimK);
    int32_t const dv = static_cast<int32_t>(args.headDimV);
    T const* const decay = static_cast<T const*>(args.gated ? args.decay : nullptr);
    dim3 const grid(static_cast<uint32_t>(args.batch * args.numHeads * numChunks),
        static_cast<uint32_t>((dv + kTileV - 1) / kTileV));
    if (!outputStage)
    {
        size_t const smem = prefillStateSharedBytesTensorCore(C, dk);
        dijiang_status_t const status = prepareSharedMemory(chunkStateKernelTc<C, T>, smem, smemLimit);
        if (status != DIJIANG_STATUS_SUCCESS)
        {
            return status;
        }
        chunkStateKernelTc<C, T><<<grid, kThreads, smem, stream>>>(static_cast<T const*>(args.key),
            static_cast<T const*>(args.value), decay, chunkStates, chunkDecay, args.seqLen, args.numHeads, numChunks,
            dk, dv);
    }
    else
    {
        size_t const smem = prefillOutputSharedBytesTensorCore(C, dk);
        dijiang_status_t const status = prepareSharedMemory(chunkOutputKernelTc<C, T>, smem, smemLimit);
        if (status != DIJIANG_STATUS_SUCCESS)
        {
            return status;
        }
        chunkOutputKernelTc<C, T><<<grid, kThreads, smem, stream>>>(static_cast<T const*>(args.query),
            static_cast<T const*>(args.key), static_cast<T const*>(args.value), decay, chunkStates,
            static_cast<T*>(args.output), args.seqLen, args.numHeads, numChunks, dk, dv, args.scale);
    }
    return cudaGetLastError() == cudaSuccess ? DIJIANG_STATUS_SUCCESS : DIJIANG_STATUS_CUDA_ERROR;
}

template <typename T>
dijiang_status_t launchChunk(LaunchArgs const& args, int32_t chunk, int64_t numChunks, float* chunkStates,
    float* chunkDecay, int32_t smemLimit, bool outputStage, cudaStream_t stream)
{
    switch (chunk)
    {
    case 64: return launchTyped<64, T>(args, numChunks, chunkStates, chunkDecay, smemLimit, outputStage, stream);
    case 32: return launchTyped<32, T>(args, numChunks, chunkStates, chunkDecay, smemLimit, outputStage, stream);
    case 16: return launchTyped<16, T>(args, numChunks, chunkStates, chunkDecay, smemLimit, outputStage, stream);
    default: return DIJIANG_STATUS_UNSUPPORTED;
    }
}

dijiang_status_t launchStage(LaunchArgs const& args, int32_t chunk, int64_t numChunks, float* chunkStates,
    float* chunkDecay, int32_t smemLimit, bool outputStage, cudaStream_t stream)
{
    if (!tensorCorePrefillEligible(args.headDimK, args.headDimV))
    {
        return DIJIANG_STATUS_UNSUPPORTED;
    }
    return args.dtype == DIJIANG_DTYPE_FLOAT16
        ? launchChunk<__half>(args, chunk, numChunks, chunkStates, chunkDecay, smemLimit, outputStage, stream)
        : launchChunk<float>(args, chunk, numChunks, chunkStates, chunkDecay, smemLimit, outputStage, stream);
}

} // namespace

dijiang_status_t launchChunkStatesTensorCore(LaunchArgs const& args, int32_t chunk, int64_t numChunks,
    float* chunkStates, float* chunkDecay, int32_t smemLimit, cudaStream_t stream)
{
    return launchStage(args, chunk, numChunks, chunkStates, chunkDecay, smemLimit, false, stream);
}

dijiang_status_t launchChunkOutputTensorCore(LaunchArgs const& args, int32_t chunk, int64_t numChunks,
    float* chunkStates, int32_t smemLimit, cudaStream_t stream)
{
    return launchStage(args, chunk, numChunks, chunkStates, nullptr, smemLimit, true, stream);
}

} // namespace kernels
} // namespace dijiang
