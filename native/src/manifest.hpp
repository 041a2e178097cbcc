// Internal: manifest.json, chat_format.json and the model identity state files record.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "json.hpp"

namespace dj {

struct TensorSpec {
    std::string name;
    std::string dtype;
    std::vector<int64_t> dims;  // -1 for a symbolic dimension
};

// What a state belongs to (ModelIdentity of the Python contract).
struct ModelIdentity {
    std::string fingerprint;
    int32_t num_layers = 0;
    std::vector<int64_t> state_shape;  // [H, d, d]
    int32_t vocab_size = 0;
    std::string checkpoint_sha256;     // empty: null
};

struct Manifest {
    std::string folder;
    std::string model_file;
    std::string flavor;
    std::string weights;
    std::string logits;  // "last" or "all"
    std::string logits_dtype;
    int32_t max_chunk = 0;
    int32_t num_layers = 0;
    std::vector<int64_t> state_shape;
    int32_t vocab_size = 0;
    int64_t position_limit = -1;  // -1: geometric decay, unbounded
    std::vector<int32_t> eos_token_ids;
    std::string fingerprint;
    std::string checkpoint_sha256;
    std::vector<TensorSpec> inputs, outputs;

    // Throws Error: DJ_ERR_NOT_FOUND (no folder, no manifest), DJ_ERR_BAD_EXPORT
    // (malformed, inconsistent, foreign format, no model_fingerprint).
    static Manifest load(const std::string& folder);
    ModelIdentity identity() const;
    size_t state_floats() const;  // one layer
    std::vector<int32_t> prefill_lengths() const;  // powers of two up to max_chunk, and max_chunk
};

// ChatFormat of the Python contract: per-role prefix/suffix strings.
struct ChatFormat {
    std::string system_first_prefix, preamble, generation_prompt;
    std::string prefix_user, prefix_assistant;
    std::string suffix_system, suffix_user, suffix_assistant;

    static ChatFormat load(const std::string& path);  // DJ_ERR_CHAT when malformed
};

struct Message {
    std::string role, content;
};

// ChatFormat.render: throws Error(DJ_ERR_CHAT) for an empty conversation or a
// system message after the first.
std::string render_chat(const ChatFormat& fmt, const std::vector<Message>& messages, bool add_generation_prompt);

}  // namespace dj
