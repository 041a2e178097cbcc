// Internal: byte-level BPE from a Hugging Face tokenizer.json (GPT-2, SmolLM2, LLaMA-3 style).
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "json.hpp"

namespace dj {

// How a pre-tokenizer step splits text.
enum class SplitPattern {
    None,    // no split (ByteLevel with use_regex false)
    Gpt2,    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    Llama3,  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
    Digits,  // Digits pre-tokenizer: each digit alone (individual) or digit runs
};

struct PreTokenizerStep {
    SplitPattern pattern = SplitPattern::None;
    bool byte_level = false;        // the ByteLevel step (byte-to-unicode mapping)
    bool add_prefix_space = false;  // ByteLevel's option
    bool individual_digits = false; // Digits' option
};

struct AddedToken {
    int32_t id;
    std::string content;
    bool special, lstrip, rstrip, single_word, normalized;
};

class Tokenizer {
public:
    // Throws Error(DJ_ERR_TOKENIZER) for any tokenizer.json this class does not implement exactly.
    static Tokenizer from_json(const json::Value& root, const std::string& source);
    static Tokenizer from_file(const std::string& path);

    std::vector<int32_t> encode(const std::string& text) const;
    // Bytes a token contributes to decoded text (empty for a skipped special token).
    std::string token_bytes(int32_t id, bool skip_special) const;
    std::string decode(const std::vector<int32_t>& ids, bool skip_special) const;
    int32_t token_id(const std::string& token) const;  // -1 when absent
    int32_t vocab_size() const { return static_cast<int32_t>(id_to_token_.size()); }
    bool is_special(int32_t id) const;

    // Exposed for tests: the pre-tokenizer's pieces of one segment (UTF-8, before byte mapping).
    std::vector<std::string> pre_tokenize(const std::string& segment) const;

private:
    std::unordered_map<std::string, int32_t> vocab_;
    std::vector<std::string> id_to_token_;
    std::vector<bool> special_;
    std::vector<bool> added_;
    // (left id << 32 | right id) -> (rank << 32 | merged id)
    std::unordered_map<uint64_t, uint64_t> merges_;
    std::vector<AddedToken> added_tokens_;
    std::vector<PreTokenizerStep> steps_;
    bool ignore_merges_ = false;
    int32_t unk_id_ = -1;
    std::string byte_to_char_[256];         // GPT-2's bytes_to_unicode, as UTF-8
    std::unordered_map<uint32_t, uint8_t> char_to_byte_;

    void bpe(const std::string& word, std::vector<int32_t>& out) const;
    void encode_segment(const std::string& segment, std::vector<int32_t>& out) const;
};

// Incremental detokenization: bytes in, complete UTF-8 characters out. Invalid
// sequences become U+FFFD as they are found; an incomplete one at the end is
// held back, and flush() turns it into U+FFFD, so the pieces joined equal the
// whole-sequence decode.
class StreamDecoder {
public:
    explicit StreamDecoder(const Tokenizer* tok) : tok_(tok) {}
    std::string push(int32_t id);
    std::string flush();

private:
    const Tokenizer* tok_;
    std::string pending_;
};

}  // namespace dj
