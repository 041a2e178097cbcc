// Internal: the model and session behind the C API, a port of runtime/model.py and runtime/session.py.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "backend.hpp"
#include "manifest.hpp"
#include "sampler.hpp"
#include "statefile.hpp"
#include "tokenizer.hpp"

namespace dj {

struct ModelOptions {
    std::string backend = "ort";
    BackendOptions backend_options;
    bool load_tokenizer = true;
};

class Model {
public:
    // Throws Error. Reads the manifest, then the tokenizer and chat format
    // (cheap, and their errors do not need a graph), then opens the graph.
    static std::unique_ptr<Model> open(const std::string& folder, const ModelOptions& options);

    Manifest manifest;
    ModelIdentity identity;
    std::unique_ptr<Tokenizer> tokenizer;  // null: token ids only
    std::unique_ptr<ChatFormat> chat;      // null: no chat_format.json
    std::unique_ptr<Graph> graph;
    std::set<int32_t> eos;

    const Tokenizer& require_tokenizer() const;
    void check_tokens(const int32_t* ids, size_t n) const;
    void check_length(int64_t total) const;
};

struct GenerateOptions {
    int32_t max_new_tokens = 128;
    SamplingParams sampling;
    bool has_seed = false;
    uint64_t seed = 0;
    std::vector<int32_t> stop_tokens;
    bool feed_last = true;
};

enum class Finish { Eos = 0, Length = 1, Stop = 2, PositionLimit = 3, Callback = 4 };

struct GenerationOutput {
    std::vector<int32_t> tokens;
    std::string text;
    Finish finish = Finish::Length;
    int32_t decode_steps = 0;
    double decode_seconds = 0.0;
    int32_t prompt_tokens = 0;
    double prefill_seconds = 0.0;
};

// token, text; return true to stop. Token -1: the text still pending at the end.
using TokenCallback = std::function<bool(int32_t, const std::string&)>;

class Session {
public:
    explicit Session(Model& model);

    Model& model;
    std::vector<int32_t> tokens;
    bool has_logits = false;
    std::vector<float> logits;
    bool has_rng = false;
    SplitMix64 rng;
    std::vector<Message> messages;
    json::Value extra = json::Value::object();
    int32_t rewinds = 0;
    int64_t last_prefill_tokens = 0;
    double last_prefill_seconds = 0.0;

    int64_t position() const { return static_cast<int64_t>(tokens.size()); }
    void append(const std::vector<int32_t>& ids);
    void feed_token(int32_t token);
    int32_t sample(const SamplingParams& p, bool has_seed, uint64_t seed);
    GenerationOutput generate(const GenerateOptions& o, const TokenCallback& cb);
    GenerationOutput chat(const std::string& role, const std::string& content, const GenerateOptions& o,
                          const TokenCallback& cb);

    SequenceState snapshot() const;
    void restore(const SequenceState& s);
    void reset();

private:
    std::unique_ptr<Lane> lane_;
    std::unique_ptr<SequenceState> checkpoint_;
    // Index in `tokens` where the pull loop's generated tokens begin (the
    // presence and frequency penalties count only those).
    size_t generated_from_ = 0;

    void continue_to(const std::vector<int32_t>& ids);
    void close_turn(const std::string& text);
    bool rewind_to(const std::vector<int32_t>& ids);
};

}  // namespace dj
