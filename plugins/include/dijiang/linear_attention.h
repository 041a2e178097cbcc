/*
 * DiJiang linear-attention kernels: plain C launch API.
 *
 * The semantics are those of plugins/README.md (ONNX LinearAttention, opset 27,
 * "gated" and "linear" update rules). Everything is passed as raw device
 * pointers so the kernels can be driven from the TensorRT plugin, from ctypes
 * in tests, or from any other host code without TensorRT.
 *
 * Layouts (row-major, contiguous):
 *   query, key   [B, T, H*dk]   dtype
 *   value        [B, T, H*dv]   dtype
 *   past_state   [B, H, dk, dv] float32
 *   decay        [B, T, H]      dtype, log-space (<= 0); NULL for "linear"
 *   output       [B, T, H*dv]   dtype
 *   present_state[B, H, dk, dv] float32; may be the same buffer as past_state
 *
 * scale == 0 means 1/sqrt(dk), as for the ONNX attribute.
 */
#ifndef DIJIANG_LINEAR_ATTENTION_H
#define DIJIANG_LINEAR_ATTENTION_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define DIJIANG_API __declspec(dllexport)
#else
#define DIJIANG_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum
{
    DIJIANG_DTYPE_FLOAT32 = 0,
    DIJIANG_DTYPE_FLOAT16 = 1
} dijiang_dtype_t;

typedef enum
{
    DIJIANG_RULE_GATED = 0,
    DIJIANG_RULE_LINEAR = 1
} dijiang_update_rule_t;

typedef enum
{
    DIJIANG_STATUS_SUCCESS = 0,
    DIJIANG_STATUS_INVALID_ARGUMENT = 1,
    /* Shape the kernels cannot run, e.g. a head size whose chunk does not fit in shared memory. */
    DIJIANG_STATUS_UNSUPPORTED = 2,
    DIJIANG_STATUS_INSUFFICIENT_WORKSPACE = 3,
    DIJIANG_STATUS_CUDA_ERROR = 4
} dijiang_status_t;

/*
 * Bytes of device workspace that dijiang_linear_attention_prefill() needs
 * (per-chunk states and chunk decays). _forward() needs the same amount when
 * seq_len > 1 and none for seq_len <= 1; _decode() never needs any. A pure
 * function of its arguments (no device query), so it can be evaluated at
 * TensorRT build time, and monotone in batch and seq_len, so the size for the
 * largest profile shape covers every smaller one. Returns SIZE_MAX when the
 * head sizes are unsupported.
 */
DIJIANG_API size_t dijiang_linear_attention_workspace_size(int64_t batch, int64_t seq_len, int64_t num_heads,
    int64_t head_dim_k, int64_t head_dim_v, int32_t chunk_size_hint);

/*
 * Chunk length the prefill kernels actually use for this head size and hint.
 * The hint is rounded down to a supported length (16, 32 or 64) and reduced
 * further until one chunk fits the portable shared-memory budget. Returns 0
 * when no chunk length fits. Results never depend on it beyond fp rounding.
 */
DIJIANG_API int32_t dijiang_linear_attention_chunk_size(int64_t head_dim_k, int64_t head_dim_v, int32_t chunk_size_hint);

/*
 * Single-token step (seq_len must be 1). Reads and writes the state once.
 * No workspace.
 */
DIJIANG_API dijiang_status_t dijiang_linear_attention_decode(dijiang_dtype_t dtype, dijiang_update_rule_t rule,
    int64_t batch, int64_t num_heads, int64_t head_dim_k, int64_t head_dim_v, float scale, void const* query,
    void const* key, void const* value, float const* past_state, void const* decay, void* output, float* present_state,
    cudaStream_t stream);

/*
 * Chunked prefill for any seq_len >= 1. Linear in seq_len; needs
 * dijiang_linear_attention_workspace_size() bytes of workspace.
 */
DIJIANG_API dijiang_status_t dijiang_linear_attention_prefill(dijiang_dtype_t dtype, dijiang_update_rule_t rule,
    int64_t batch, int64_t seq_len, int64_t num_heads, int64_t head_dim_k, int64_t head_dim_v, float scale,
    int32_t chunk_size_hint, void const* query, void const* key, void const* value, float const* past_state,
    void const* decay, void* output, float* present_state, void* workspace, size_t workspace_size,
    cudaStream_t stream);

/*
 * Dispatch: decode kernel when seq_len == 1, chunked prefill otherwise.
 * seq_len == 0 copies past_state to present_state.
 */
DIJIANG_API dijiang_status_t dijiang_linear_attention_forward(dijiang_dtype_t dtype, dijiang_update_rule_t rule,
    int64_t batch, int64_t seq_len, int64_t num_heads, int64_t head_dim_k, int64_t head_dim_v, float scale,
    int32_t chunk_size_hint, void const* query, void const* key, void const* value, float const* past_state,
    void const* decay, void* output, float* present_state, void* workspace, size_t workspace_size,
    cudaStream_t stream);

/* Static, human-readable name of a status code. */
DIJIANG_API char const* dijiang_status_string(dijiang_status_t status);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DIJIANG_LINEAR_ATTENTION_H */
