/*
 * CPU tests of the kernel library's C API: size queries and argument validation.
 * Every call here is rejected (or answered) before any CUDA call, so no device is needed;
 * numerical tests live in tests/gpu/test_kernels_gpu.py.
 */
#include "dijiang/linear_attention.h"
#include "testHarness.h"

#include <cstdint>
#include <cstring>

namespace
{

void testQueries()
{
    CHECK(dijiang_linear_attention_chunk_size(64, 64, 64) == 64);
    CHECK(dijiang_linear_attention_chunk_size(128, 128, 64) == 32);
    CHECK(dijiang_linear_attention_chunk_size(64, 64, 20) == 16);
    CHECK(dijiang_linear_attention_chunk_size(1 << 20, 64, 64) == 0);

    size_t const ws = dijiang_linear_attention_workspace_size(3, 513, 9, 64, 64, 64);
    CHECK(ws >= size_t{3} * 9 * 9 * 64 * 64 * sizeof(float));
    CHECK(ws < SIZE_MAX);
    CHECK(dijiang_linear_attention_workspace_size(3, 512, 9, 64, 64, 64) < ws);
    CHECK(dijiang_linear_attention_workspace_size(1, 8, 9, 1 << 20, 64, 64) == SIZE_MAX);
    CHECK(dijiang_linear_attention_workspace_size(1, 8, 0, 64, 64, 64) == SIZE_MAX);

    CHECK(std::strcmp(dijiang_status_string(DIJIANG_STATUS_SUCCESS), "success") == 0);
    CHECK(std::strcmp(dijiang_status_string(static_cast<dijiang_status_t>(99)), "unknown status") == 0);
}

void testValidation()
{
    // Non-null but never dereferenced: validation fails before any launch.
    alignas(16) static char dummy[64];
    void* p = dummy;
    float* s = reinterpret_cast<float*>(dummy);

    CHECK(dijiang_linear_attention_decode(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 1, 1, 64, 64, 1.F, p, p, p, s,
              nullptr, p, s, nullptr)
        == DIJIANG_STATUS_INVALID_ARGUMENT); // gated needs decay
    CHECK(dijiang_linear_attention_decode(static_cast<dijiang_dtype_t>(7), DIJIANG_RULE_LINEAR, 1, 1, 64, 64, 1.F, p, p,
              p, s, nullptr, p, s, nullptr)
        == DIJIANG_STATUS_INVALID_ARGUMENT);
    CHECK(dijiang_linear_attention_decode(DIJIANG_DTYPE_FLOAT32, static_cast<dijiang_update_rule_t>(5), 1, 1, 64, 64,
              1.F, p, p, p, s, p, p, s, nullptr)
        == DIJIANG_STATUS_INVALID_ARGUMENT);
    CHECK(dijiang_linear_attention_decode(DIJIANG_DTYPE_FLOAT16, DIJIANG_RULE_LINEAR, 1, 0, 64, 64, 1.F, p, p, p, s,
              nullptr, p, s, nullptr)
        == DIJIANG_STATUS_INVALID_ARGUMENT); // no heads
    CHECK(dijiang_linear_attention_decode(DIJIANG_DTYPE_FLOAT16, DIJIANG_RULE_LINEAR, 1, 1, 64, 64, 1.F, p, p, p,
              nullptr, nullptr, p, s, nullptr)
        == DIJIANG_STATUS_INVALID_ARGUMENT); // no state
    CHECK(dijiang_linear_attention_decode(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_LINEAR, 1, 1, 8192, 64, 1.F, p, p, p, s,
              nullptr, p, s, nullptr)
        == DIJIANG_STATUS_UNSUPPORTED);
    // Empty batch: nothing to do, no device touched.
    CHECK(dijiang_linear_attention_decode(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 0, 9, 64, 64, 1.F, nullptr,
              nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr)
        == DIJIANG_STATUS_SUCCESS);

    size_t const ws = dijiang_linear_attention_workspace_size(3, 513, 9, 64, 64, 64);
    CHECK(dijiang_linear_attention_prefill(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 3, 513, 9, 64, 64, 1.F, 64, p, p,
              p, s, p, p, s, p, ws - 1, nullptr)
        == DIJIANG_STATUS_INSUFFICIENT_WORKSPACE);
    CHECK(dijiang_linear_attention_prefill(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 3, 513, 9, 64, 64, 1.F, 64, p, p,
              p, s, p, p, s, nullptr, ws, nullptr)
        == DIJIANG_STATUS_INSUFFICIENT_WORKSPACE);
    // The dispatching entry (what the plugin calls) checks the workspace it is given, not the size
    // the shape needs, and refuses before any launch.
    CHECK(dijiang_linear_attention_forward(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 3, 513, 9, 64, 64, 1.F, 64, p, p,
              p, s, p, p, s, p, ws - 1, nullptr)
        == DIJIANG_STATUS_INSUFFICIENT_WORKSPACE);
    CHECK(dijiang_linear_attention_forward(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 3, 2, 9, 64, 64, 1.F, 64, p, p, p,
              s, p, p, s, p, 0, nullptr)
        == DIJIANG_STATUS_INSUFFICIENT_WORKSPACE);
    CHECK(dijiang_linear_attention_prefill(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 3, 513, 9, 100000, 64, 1.F, 64, p,
              p, p, s, p, p, s, p, ws, nullptr)
        == DIJIANG_STATUS_UNSUPPORTED);
    CHECK(dijiang_linear_attention_prefill(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 3, -1, 9, 64, 64, 1.F, 64, p, p, p,
              s, p, p, s, p, ws, nullptr)
        == DIJIANG_STATUS_INVALID_ARGUMENT);
    CHECK(dijiang_linear_attention_forward(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 3, 7, 9, 64, 64, 1.F, 64, nullptr,
              p, p, s, p, p, s, p, ws, nullptr)
        == DIJIANG_STATUS_INVALID_ARGUMENT);
    // In-place with seq_len == 0 leaves the state as is without a copy.
    CHECK(dijiang_linear_attention_forward(DIJIANG_DTYPE_FLOAT32, DIJIANG_RULE_GATED, 3, 0, 9, 64, 64, 1.F, 64, nullptr,
              nullptr, nullptr, s, nullptr, nullptr, s, nullptr, 0, nullptr)
        == DIJIANG_STATUS_SUCCESS);
}

} // namespace

int main()
{
    testQueries();
    testValidation();
    return TEST_MAIN_RESULT("dijiang_kernel_api_tests");
}
