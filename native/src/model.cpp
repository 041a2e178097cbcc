#include "model.hpp"

#include <algorithm>

#include "common.hpp"
#include "dijiang.h"

#define DJ_STR2(x) #x
#define DJ_STR(x) DJ_STR2(x)

namespace dj {

namespace {

const std::string kCreatedBy = "dijiang-deploy " DJ_STR(DIJIANG_VERSION_MAJOR) "." DJ_STR(DIJIANG_VERSION_MINOR) "." DJ_STR(
    DIJIANG_VERSION_PATCH) " (c)";

// The eos token string of tokenizer_config.json (a string or an AddedToken dict).
std::string config_token(const std::string& folder, const char* key) {
    std::string path = join_path(folder, "tokenizer_config.json");
    if (!path_exists(path)) return std::string();
    json::Value v = json::parse_file(path, DJ_ERR_TOKENIZER);
    const json::Value* t = v.is_object() ? v.find(key) : nullptr;
    if (t && t->is_object()) t = t->find("content");
    return t && t->is_string() ? t->as_string() : std::string();
}

bool starts_with(const std::vector<int32_t>& a, const std::vector<int32_t>& prefix) {
    return a.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), a.begin());
}

}  // namespace

std::unique_ptr<Model> Model::open(const std::string& folder, const ModelOptions& options) {
    auto m = std::make_unique<Model>();
    m->manifest = Manifest::load(folder);
    m->identity = m->manifest.identity();
    if (options.load_tokenizer) {
        std::string tj = join_path(folder, "tokenizer.json"), tc = join_path(folder, "tokenizer_config.json");
        if (path_exists(tj)) {
            m->tokenizer = std::make_unique<Tokenizer>(Tokenizer::from_file(tj));
            std::string eos = config_token(folder, "eos_token");
            if (!eos.empty()) {
                int32_t id = m->tokenizer->token_id(eos);
                if (id >= 0) m->eos.insert(id);
            }
        } else if (path_exists(tc)) {
            fail(DJ_ERR_TOKENIZER, folder + ": tokenizer_config.json but no tokenizer.json; copy it from the checkpoint, "
                                            "or pass token ids (load_tokenizer = 0)");
        }
    }
    for (int32_t id : m->manifest.eos_token_ids) m->eos.insert(id);
    std::string cf = join_path(folder, "chat_format.json");
    if (path_exists(cf)) m->chat = std::make_unique<ChatFormat>(ChatFormat::load(cf));
    if (options.backend == "ort") m->graph = open_ort_graph(m->manifest, options.backend_options);
    else if (options.backend == "trt") m->graph = open_trt_graph(m->manifest, options.backend_options);
    else fail(DJ_ERR_INVALID_ARGUMENT, "unknown backend '" + options.backend + "'; use ort or trt");
    return m;
}

const Tokenizer& Model::require_tokenizer() const {
    if (!tokenizer) fail(DJ_ERR_TOKENIZER, "no tokenizer in this export folder: pass token ids instead of text");
    return *tokenizer;
}

void Model::check_tokens(const int32_t* ids, size_t n) const {
    for (size_t i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= manifest.vocab_size)
            fail(DJ_ERR_INVALID_ARGUMENT, "token id " + std::to_string(ids[i]) + " is outside this model's vocabulary 0.." +
                                              std::to_string(manifest.vocab_size - 1));
}

void Model::check_length(int64_t total) const {
    if (manifest.position_limit >= 0 && total > manifest.position_limit)
        fail(DJ_ERR_POSITION_LIMIT, std::to_string(total) + " tokens are past this model's limit of " +
                                        std::to_string(manifest.position_limit) +
                                        " positions (its decay tables are not geometric, so they cannot be extended)");
}

Session::Session(Model& m) : model(m), lane_(m.graph->lane()) {}

void Session::append(const std::vector<int32_t>& ids) {
    model.check_tokens(ids.data(), ids.size());
    if (ids.empty()) return;
    model.check_length(position() + static_cast<int64_t>(ids.size()));
    double t0 = now_seconds();
    size_t at = 0;
    std::vector<int64_t> chunk, mask;
    logits.resize(static_cast<size_t>(model.manifest.vocab_size));
    for (const auto& c : plan_chunks(static_cast<int64_t>(ids.size()), model.graph->lengths())) {
        // Left padding with mask 0: the state passes padding through unchanged.
        chunk.assign(static_cast<size_t>(c.first), 0);
        mask.assign(static_cast<size_t>(c.first), 0);
        size_t pad = static_cast<size_t>(c.first - c.second);
        for (size_t k = 0; k < static_cast<size_t>(c.second); ++k) {
            chunk[pad + k] = ids[at + k];
            mask[pad + k] = 1;
        }
        lane_->step(chunk.data(), mask.data(), c.first, logits.data());
        at += static_cast<size_t>(c.second);
    }
    has_logits = true;
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    generated_from_ = tokens.size();
    last_prefill_tokens = static_cast<int64_t>(ids.size());
    last_prefill_seconds = now_seconds() - t0;
}

void Session::feed_token(int32_t token) {
    const int64_t one_id = token, one = 1;
    logits.resize(static_cast<size_t>(model.manifest.vocab_size));
    lane_->step(&one_id, &one, 1, logits.data());
    has_logits = true;
    tokens.push_back(token);
}

int32_t Session::sample(const SamplingParams& p, bool has_seed, uint64_t seed) {
    if (!has_logits) fail(DJ_ERR_EMPTY_SESSION, "the session is empty: append a prompt before sampling");
    p.validate();
    if (!has_rng) {
        rng = SplitMix64(has_seed ? seed : fresh_seed());
        has_rng = true;
    }
    std::vector<int32_t> seen, generated;
    if (p.penalised()) {
        size_t v = static_cast<size_t>(model.manifest.vocab_size);
        seen.assign(v, 0);
        generated.assign(v, 0);
        for (size_t i = 0; i < tokens.size(); ++i) {
            ++seen[static_cast<size_t>(tokens[i])];
            if (i >= generated_from_) ++generated[static_cast<size_t>(tokens[i])];
        }
    }
    return sample_token(logits.data(), model.manifest.vocab_size, p, &seen, &generated, rng);
}

GenerationOutput Session::generate(const GenerateOptions& o, const TokenCallback& cb) {
    if (!has_logits) fail(DJ_ERR_EMPTY_SESSION, "the session is empty: append a prompt before generating");
    if (o.max_new_tokens < 1)
        fail(DJ_ERR_INVALID_ARGUMENT, "max_new_tokens must be >= 1, got " + std::to_string(o.max_new_tokens));
    o.sampling.validate();
    model.check_tokens(o.stop_tokens.data(), o.stop_tokens.size());
    // A seed reseeds; otherwise the session's generator goes on (or starts fresh), as in Python.
    if (o.has_seed || !has_rng) {
        rng = SplitMix64(o.has_seed ? o.seed : fresh_seed());
        has_rng = true;
    }
    const size_t v = static_cast<size_t>(model.manifest.vocab_size);
    std::vector<int32_t> seen, gen;
    bool penalised = o.sampling.penalised();
    if (penalised) {
        seen.assign(v, 0);
        gen.assign(v, 0);
        for (int32_t t : tokens) ++seen[static_cast<size_t>(t)];
    }
    std::unique_ptr<StreamDecoder> decoder;
    if (model.tokenizer) decoder = std::make_unique<StreamDecoder>(model.tokenizer.get());
    GenerationOutput out;
    const int64_t limit = model.manifest.position_limit;
    double t0 = now_seconds();
    bool cancelled = false;
    while (static_cast<int32_t>(out.tokens.size()) < o.max_new_tokens) {
        int32_t token = sample_token(logits.data(), model.manifest.vocab_size, o.sampling, penalised ? &seen : nullptr,
                                     penalised ? &gen : nullptr, rng);
        if (model.eos.count(token)) {
            out.finish = Finish::Eos;
            break;
        }
        out.tokens.push_back(token);
        if (penalised) {
            ++seen[static_cast<size_t>(token)];
            ++gen[static_cast<size_t>(token)];
        }
        std::string text = decoder ? decoder->push(token) : std::string();
        out.text += text;
        if (cb && cb(token, text)) {
            out.finish = Finish::Callback;
            cancelled = true;
            break;
        }
        if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), token) != o.stop_tokens.end()) {
            out.finish = Finish::Stop;
            break;
        }
        if (limit >= 0 && position() + 1 >= limit) {
            out.finish = Finish::PositionLimit;
            break;
        }
        if (static_cast<int32_t>(out.tokens.size()) == o.max_new_tokens) break;
        feed_token(token);
        ++out.decode_steps;
    }
    if (decoder) {
        std::string tail = decoder->flush();
        if (!tail.empty()) {
            out.text += tail;
            if (cb && !cancelled) cb(-1, tail);
        }
    }
    if (!out.tokens.empty() && o.feed_last &&
        (out.finish == Finish::Length || out.finish == Finish::Stop || out.finish == Finish::Callback))
        feed_token(out.tokens.back());
    out.decode_seconds = now_seconds() - t0;
    generated_from_ = tokens.size();
    return out;
}

bool Session::rewind_to(const std::vector<int32_t>& ids) {
    // The conversation's tokens diverge from what was fed: go back to the
    // last turn's checkpoint when it is still a prefix, else to the start.
    ++rewinds;
    if (checkpoint_ && starts_with(ids, checkpoint_->tokens)) {
        SequenceState ck = *checkpoint_;
        restore(ck);
        return true;
    }
    reset();
    return false;
}

void Session::continue_to(const std::vector<int32_t>& ids) {
    if (!starts_with(ids, tokens)) rewind_to(ids);
    append(std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(tokens.size()), ids.end()));
}

void Session::close_turn(const std::string& text) {
    std::vector<Message> closed_msgs = messages;
    closed_msgs.push_back({"assistant", text});
    std::vector<int32_t> closed = model.tokenizer->encode(render_chat(*model.chat, closed_msgs, false));
    if (!starts_with(closed, tokens)) {
        rewind_to(closed);
        int64_t pt = last_prefill_tokens;
        double ps = last_prefill_seconds;
        append(std::vector<int32_t>(closed.begin() + static_cast<std::ptrdiff_t>(tokens.size()), closed.end()));
        last_prefill_tokens = pt;  // what a turn reports is its prompt, not this repair
        last_prefill_seconds = ps;
    }
    messages = closed_msgs;
}

GenerationOutput Session::chat(const std::string& role, const std::string& content, const GenerateOptions& o,
                               const TokenCallback& cb) {
    const Tokenizer& tok = model.require_tokenizer();
    if (!model.chat)
        fail(DJ_ERR_CHAT, model.manifest.folder + ": no chat_format.json (re-export with dijiang-deploy 0.2+ from a "
                                                  "checkpoint with a chat template)");
    if (role != "system" && role != "user" && role != "assistant")
        fail(DJ_ERR_CHAT, "message role must be one of system, user, assistant, got '" + role + "'");
    std::vector<Message> msgs = messages;
    msgs.push_back({role, content});
    std::vector<int32_t> ids = tok.encode(render_chat(*model.chat, msgs, true));
    last_prefill_tokens = 0;
    last_prefill_seconds = 0.0;
    continue_to(ids);
    int64_t prompt_tokens = last_prefill_tokens;
    double prompt_seconds = last_prefill_seconds;
    checkpoint_ = std::make_unique<SequenceState>(snapshot());
    messages = msgs;
    GenerationOutput out = generate(o, cb);
    close_turn(out.text);
    out.prompt_tokens = static_cast<int32_t>(prompt_tokens);
    out.prefill_seconds = prompt_seconds;
    return out;
}

SequenceState Session::snapshot() const {
    SequenceState s;
    s.model = model.identity;
    lane_->read_state(s.layers);
    s.tokens = tokens;
    s.has_logits = has_logits;
    if (has_logits) s.logits = logits;
    s.has_rng = has_rng;
    s.rng_state = rng.state;
    s.created_by = kCreatedBy;
    s.extra = extra;
    json::Value list = json::Value::array();
    for (const auto& m : messages) {
        json::Value item = json::Value::object();
        item.set("role", json::Value::string(m.role));
        item.set("content", json::Value::string(m.content));
        list.push(item);
    }
    s.extra.set("messages", list);
    return s;
}

void Session::restore(const SequenceState& s) {
    check_same_model(s.model, model.identity, "state");
    std::vector<Message> msgs;
    if (const json::Value* list = s.extra.find("messages")) {
        if (!list->is_array()) fail(DJ_ERR_STATE_FILE, "state file: bad chat history (messages is not a list)");
        for (const auto& item : list->items()) {
            const json::Value* role = item.is_object() ? item.find("role") : nullptr;
            const json::Value* content = item.is_object() ? item.find("content") : nullptr;
            if (!role || !role->is_string() || !content || !content->is_string() ||
                (role->as_string() != "system" && role->as_string() != "user" && role->as_string() != "assistant"))
                fail(DJ_ERR_STATE_FILE, "state file: bad chat history (a message needs a known role and text content)");
            msgs.push_back({role->as_string(), content->as_string()});
        }
    }
    lane_->write_state(&s.layers, static_cast<int64_t>(s.tokens.size()));
    tokens = s.tokens;
    has_logits = s.has_logits;
    logits = s.has_logits ? s.logits : std::vector<float>();
    has_rng = s.has_rng;
    rng = SplitMix64(s.rng_state);
    messages = msgs;
    extra = s.extra;
    generated_from_ = tokens.size();
}

void Session::reset() {
    tokens.clear();
    has_logits = false;
    logits.clear();
    messages.clear();
    has_rng = false;
    checkpoint_.reset();
    extra = json::Value::object();
    generated_from_ = 0;
    lane_->write_state(nullptr, 0);
}

}  // namespace dj
