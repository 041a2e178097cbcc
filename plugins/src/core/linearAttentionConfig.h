/*
 * Plain C++ (no CUDA, no TensorRT) rules shared by the kernels, the TensorRT
 * plugin and the CPU unit tests: attribute parsing/validation, shape rules,
 * chunk-length selection, shared-memory layout sizes and workspace sizes.
 * Keeping them here means the kernel library and the plugin cannot disagree
 * about, e.g., how much workspace a shape needs.
 */
#ifndef DIJIANG_LINEAR_ATTENTION_CONFIG_H
#define DIJIANG_LINEAR_ATTENTION_CONFIG_H

#include <cstddef>
#include <cstdint>
#include <string>

namespace dijiang
{

constexpr int32_t kDefaultChunkSize = 64;
//! Chunk lengths the prefill kernels are instantiated for, largest first.
constexpr int32_t kSupportedChunkSizes[] = {64, 32, 16};
//! Value columns handled by one prefill block; dv is tiled by this.
constexpr int32_t kPrefillTileV = 64;
//! Rows of the incoming state staged in shared memory at a time by the output kernel,
//! so its footprint does not grow with dk.
constexpr int32_t kPrefillStageRows = 64;
//! Dynamic shared memory one prefill block may use. sm_86/sm_89 allow 99 KiB per block
//! (the smallest opt-in limit among the architectures we build for); keeping the choice
//! device-independent makes the chunk length, and therefore the workspace size, a pure
//! function of the shape that TensorRT can query at build time.
constexpr size_t kPortableSharedMemoryBudget = 96 * 1024;

enum class UpdateRule : int32_t
{
    kGATED = 0,
    kLINEAR = 1
};

char const* toString(UpdateRule rule) noexcept;

//! Number of plugin inputs for a rule: query, key, value, past_state (+ decay when gated).
int32_t numInputs(UpdateRule rule) noexcept;

//! workspaceBytes when the fields did not carry workspace_bytes.
constexpr int64_t kWorkspaceBytesUnset = -1;

struct Attributes
{
    int32_t numHeads{0};
    float scale{1.F};
    UpdateRule rule{UpdateRule::kGATED};
    int32_t chunkSize{kDefaultChunkSize};
    //! Not a node attribute: the workspace TensorRT reserves for the plugin, fixed when the engine is
    //! built and serialized with it, so that the runtime instance can check each call against it.
    int64_t workspaceBytes{kWorkspaceBytesUnset};
};

//! Type tag of a field, mirroring the TensorRT PluginFieldType values we accept.
enum class FieldKind : int32_t
{
    kINT32,
    kINT64,
    kFLOAT32,
    kFLOAT64,
    kCHAR,
    kOTHER
};

//! A non-owning view of one attribute, independent of TensorRT's PluginField.
struct FieldView
{
    char const* name{nullptr};
    void const* data{nullptr};
    FieldKind kind{FieldKind::kOTHER};
    int32_t length{0};
};

//! Parses and validates the node attributes and the serialized workspace_bytes field (optional,
//! a non-negative integer). On failure returns false and sets error to a message naming the
//! field; on success error is left empty.
bool parseAttributes(FieldView const* fields, int32_t nbFields, Attributes& attrs, std::string& error);

//! The output scale actually applied: ONNX defines scale == 0 as 1/sqrt(dk).
float effectiveScale(Attributes const& attrs, int64_t headDimK) noexcept;

//! Tensor extents; -1 marks a dimension unknown at build time.
struct Shape
{
    static constexpr int32_t kMaxRank = 8;
    int32_t rank{0};
    int64_t d[kMaxRank]{};
};

struct Problem
{
    int64_t batch{0};
    int64_t seqLen{0};
    int64_t numHeads{0};
    int64_t headDimK{0};
    int64_t headDimV{0};
};

//! Checks the contract's shape rules on whatever is known. Unknown (-1) extents are
//! skipped, so this works on build-time descriptors. Returns false with a message.
bool checkShapes(Attributes const& attrs, Shape const* inputs, int32_t nbInputs, std::string& error);

//! Derives the problem size from fully known input shapes (after checkShapes rules).
bool deriveProblem(Attributes const& attrs, Shape const* inputs, int32_t nbInputs, Problem& problem, std::string& error);

//! Chunk length used by the prefill kernels, or 0 when no supported length fits.
int32_t selectChunkSize(int64_t headDimK, int64_t headDimV, int32_t hint) noexcept;

//! Dynamic shared memory of the prefill state kernel (per chunk K, V and decay weights).
size_t prefillStateSharedBytes(int32_t chunk, int64_t headDimK) noexcept;

//! Dynamic shared memory of the prefill output kernel (Q, K, V, masked scores, staged state rows).
size_t prefillOutputSharedBytes(int32_t chunk, int64_t headDimK) noexcept;

//! Layout of the prefill workspace: per (batch, head, chunk) a dk x dv float32 state,
//! then per (batch, head, chunk) one float32 log decay of the whole chunk.
struct WorkspaceLayout
{
    int32_t chunk{0};
    int64_t numChunks{0};
    size_t stateBytes{0};  //!< bytes of the state region, padded to kWorkspaceAlignment
    size_t decayOffset{0}; //!< byte offset of the chunk-decay region
    size_t totalBytes{0};
};

constexpr size_t kWorkspaceAlignment = 256;

//! Returns false when the head sizes are unsupported or the size overflows.
bool prefillWorkspaceLayout(Problem const& problem, int32_t chunkHint, WorkspaceLayout& layout) noexcept;

} // namespace dijiang

#endif // DIJIANG_LINEAR_ATTENTION_CONFIG_H
