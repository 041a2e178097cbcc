// The C API: every entry point turns exceptions into a status and a thread-local message.
#include <cstdlib>
#include <cstring>
#include <new>

#include "common.hpp"
#include "dijiang.h"
#include "model.hpp"

struct dj_model {
    std::unique_ptr<dj::Model> impl;
};

struct dj_session {
    std::unique_ptr<dj::Session> impl;
};

namespace {

thread_local std::string g_last_error;

dj_status set_error(dj_status status, const std::string& message) {
    // One line, as promised: backends sometimes return several.
    std::string line = message;
    for (char& c : line)
        if (c == '\n' || c == '\r') c = ' ';
    g_last_error = line;
    return status;
}

template <typename F>
dj_status guard(F&& body) {
    try {
        body();
        return DJ_OK;
    } catch (const dj::Error& e) {
        return set_error(e.status(), e.what());
    } catch (const std::bad_alloc&) {
        return set_error(DJ_ERR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
        return set_error(DJ_ERR_INTERNAL, std::string("internal error: ") + e.what());
    } catch (...) {
        return set_error(DJ_ERR_INTERNAL, "internal error");
    }
}

void need(const void* p, const char* what) {
    if (!p) dj::fail(DJ_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
}

// Options structs carry their size, so an older caller's smaller struct is
// read only as far as it goes (later fields keep their defaults).
template <typename T>
T read_struct(const T* given, const T& defaults) {
    T out = defaults;
    if (given) {
        size_t n = given->struct_size;
        if (n == 0 || n > sizeof(T)) n = sizeof(T);
        std::memcpy(static_cast<void*>(&out), given, n);
        out.struct_size = sizeof(T);
    }
    return out;
}

dj::SamplingParams to_params(const dj_sampling& s) {
    dj::SamplingParams p;
    p.temperature = s.temperature;
    p.top_k = s.top_k;
    p.top_p = s.top_p;
    p.min_p = s.min_p;
    p.repetition_penalty = s.repetition_penalty;
    p.presence_penalty = s.presence_penalty;
    p.frequency_penalty = s.frequency_penalty;
    return p;
}

dj::GenerateOptions to_options(const dj_generate_options* given) {
    dj_generate_options d;
    dj_generate_options_init(&d);
    dj_generate_options o = read_struct(given, d);
    dj_sampling sd;
    dj_sampling_init(&sd);
    dj_sampling s = read_struct(&o.sampling, sd);
    dj::GenerateOptions out;
    out.max_new_tokens = o.max_new_tokens;
    out.sampling = to_params(s);
    out.has_seed = s.has_seed != 0;
    out.seed = s.seed;
    if (o.n_stop_tokens) {
        need(o.stop_tokens, "stop_tokens");
        out.stop_tokens.assign(o.stop_tokens, o.stop_tokens + o.n_stop_tokens);
    }
    out.feed_last = o.feed_last != 0;
    return out;
}

void fill_result(const dj::GenerationOutput& g, dj_token* tokens, size_t capacity, dj_generation* result) {
    if (tokens)
        for (size_t i = 0; i < g.tokens.size() && i < capacity; ++i) tokens[i] = g.tokens[i];
    if (result) {
        result->n_tokens = static_cast<int32_t>(g.tokens.size());
        result->finish_reason = static_cast<dj_finish_reason>(g.finish);
        result->decode_steps = g.decode_steps;
        result->decode_seconds = g.decode_seconds;
        result->prompt_tokens = g.prompt_tokens;
        result->prefill_seconds = g.prefill_seconds;
    }
}

dj::TokenCallback wrap(dj_token_callback cb, void* user) {
    if (!cb) return nullptr;
    return [cb, user](int32_t token, const std::string& text) { return cb(user, token, text.data(), text.size()) != 0; };
}

}  // namespace

extern "C" {

const char* dj_last_error(void) { return g_last_error.c_str(); }

const char* dj_status_name(dj_status status) {
    switch (status) {
        case DJ_OK: return "DJ_OK";
        case DJ_ERR_INVALID_ARGUMENT: return "DJ_ERR_INVALID_ARGUMENT";
        case DJ_ERR_NOT_FOUND: return "DJ_ERR_NOT_FOUND";
        case DJ_ERR_BAD_EXPORT: return "DJ_ERR_BAD_EXPORT";
        case DJ_ERR_TOKENIZER: return "DJ_ERR_TOKENIZER";
        case DJ_ERR_BACKEND_UNAVAILABLE: return "DJ_ERR_BACKEND_UNAVAILABLE";
        case DJ_ERR_BACKEND: return "DJ_ERR_BACKEND";
        case DJ_ERR_STATE_FILE: return "DJ_ERR_STATE_FILE";
        case DJ_ERR_POSITION_LIMIT: return "DJ_ERR_POSITION_LIMIT";
        case DJ_ERR_IO: return "DJ_ERR_IO";
        case DJ_ERR_BUFFER_TOO_SMALL: return "DJ_ERR_BUFFER_TOO_SMALL";
        case DJ_ERR_CHAT: return "DJ_ERR_CHAT";
        case DJ_ERR_EMPTY_SESSION: return "DJ_ERR_EMPTY_SESSION";
        case DJ_ERR_OUT_OF_MEMORY: return "DJ_ERR_OUT_OF_MEMORY";
        case DJ_ERR_INTERNAL: return "DJ_ERR_INTERNAL";
    }
    return "DJ_ERR_UNKNOWN";
}

#define DJ_STR2(x) #x
#define DJ_STR(x) DJ_STR2(x)
const char* dj_version(void) {
    return DJ_STR(DIJIANG_VERSION_MAJOR) "." DJ_STR(DIJIANG_VERSION_MINOR) "." DJ_STR(DIJIANG_VERSION_PATCH);
}

void dj_model_options_init(dj_model_options* o) {
    if (!o) return;
    std::memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->backend = DJ_BACKEND_ORT;
    o->load_tokenizer = 1;
}

dj_status dj_model_open(const char* folder, const dj_model_options* options, dj_model** out) {
    if (out) *out = nullptr;
    return guard([&] {
        need(folder, "folder");
        need(out, "out");
        dj_model_options d;
        dj_model_options_init(&d);
        dj_model_options o = read_struct(options, d);
        dj::ModelOptions mo;
        if (o.backend == DJ_BACKEND_ORT) mo.backend = "ort";
        else if (o.backend == DJ_BACKEND_TRT) mo.backend = "trt";
        else dj::fail(DJ_ERR_INVALID_ARGUMENT, "unknown backend " + std::to_string(static_cast<int>(o.backend)));
        if (o.ort_library) mo.backend_options.ort_library = o.ort_library;
        if (o.trt_library) mo.backend_options.trt_library = o.trt_library;
        if (o.trt_plugin_library) mo.backend_options.trt_plugin_library = o.trt_plugin_library;
        mo.backend_options.threads = o.intra_op_threads;
        mo.load_tokenizer = o.load_tokenizer != 0;
        auto m = std::make_unique<dj_model>();
        m->impl = dj::Model::open(folder, mo);
        *out = m.release();
    });
}

void dj_model_close(dj_model* model) { delete model; }

int32_t dj_model_vocab_size(const dj_model* m) { return m ? m->impl->manifest.vocab_size : 0; }
int32_t dj_model_num_layers(const dj_model* m) { return m ? m->impl->manifest.num_layers : 0; }
int32_t dj_model_max_chunk(const dj_model* m) { return m ? m->impl->manifest.max_chunk : 0; }
size_t dj_model_state_bytes(const dj_model* m) {
    return m ? m->impl->manifest.state_floats() * 4 * static_cast<size_t>(m->impl->manifest.num_layers) : 0;
}
int64_t dj_model_position_limit(const dj_model* m) { return m ? m->impl->manifest.position_limit : -1; }
const char* dj_model_fingerprint(const dj_model* m) { return m ? m->impl->manifest.fingerprint.c_str() : ""; }
const char* dj_model_backend_name(const dj_model* m) { return m ? m->impl->graph->name() : ""; }
int dj_model_has_tokenizer(const dj_model* m) { return m && m->impl->tokenizer ? 1 : 0; }
int dj_model_has_chat_format(const dj_model* m) { return m && m->impl->chat ? 1 : 0; }
int dj_model_is_eos(const dj_model* m, dj_token t) { return m && m->impl->eos.count(t) ? 1 : 0; }

dj_status dj_tokenize(const dj_model* model, const char* text, size_t text_len, dj_token* tokens, size_t capacity,
                      size_t* n_tokens) {
    return guard([&] {
        need(model, "model");
        need(n_tokens, "n_tokens");
        if (text_len) need(text, "text");
        std::vector<int32_t> ids = model->impl->require_tokenizer().encode(std::string(text ? text : "", text_len));
        *n_tokens = ids.size();
        if (ids.size() > capacity)
            dj::fail(DJ_ERR_BUFFER_TOO_SMALL, "the text is " + std::to_string(ids.size()) + " tokens, the buffer holds " +
                                                  std::to_string(capacity));
        if (!ids.empty()) {
            need(tokens, "tokens");
            std::memcpy(tokens, ids.data(), ids.size() * sizeof(dj_token));
        }
    });
}

dj_status dj_detokenize(const dj_model* model, const dj_token* tokens, size_t n_tokens, int skip_special, char* text,
                        size_t capacity, size_t* text_len) {
    return guard([&] {
        need(model, "model");
        need(text_len, "text_len");
        if (n_tokens) need(tokens, "tokens");
        model->impl->check_tokens(tokens, n_tokens);
        std::string s = model->impl->require_tokenizer().decode(std::vector<int32_t>(tokens, tokens + n_tokens),
                                                               skip_special != 0);
        *text_len = s.size();
        if (s.size() > capacity)
            dj::fail(DJ_ERR_BUFFER_TOO_SMALL, "the text is " + std::to_string(s.size()) + " bytes, the buffer holds " +
                                                  std::to_string(capacity));
        if (!s.empty()) {
            need(text, "text");
            std::memcpy(text, s.data(), s.size());
        }
    });
}

dj_status dj_session_create(dj_model* model, dj_session** out) {
    if (out) *out = nullptr;
    return guard([&] {
        need(model, "model");
        need(out, "out");
        auto s = std::make_unique<dj_session>();
        s->impl = std::make_unique<dj::Session>(*model->impl);
        *out = s.release();
    });
}

void dj_session_free(dj_session* session) { delete session; }

dj_status dj_session_reset(dj_session* s) {
    return guard([&] {
        need(s, "session");
        s->impl->reset();
    });
}

dj_status dj_session_fork(const dj_session* s, dj_session** out) {
    if (out) *out = nullptr;
    return guard([&] {
        need(s, "session");
        need(out, "out");
        auto f = std::make_unique<dj_session>();
        f->impl = std::make_unique<dj::Session>(s->impl->model);
        f->impl->restore(s->impl->snapshot());
        *out = f.release();
    });
}

int64_t dj_session_position(const dj_session* s) { return s ? s->impl->position() : 0; }

const dj_token* dj_session_tokens(const dj_session* s, size_t* n) {
    if (n) *n = s ? s->impl->tokens.size() : 0;
    return s ? s->impl->tokens.data() : nullptr;
}

const float* dj_session_logits(const dj_session* s) {
    return s && s->impl->has_logits ? s->impl->logits.data() : nullptr;
}

dj_status dj_session_append_tokens(dj_session* s, const dj_token* tokens, size_t n) {
    return guard([&] {
        need(s, "session");
        if (n) need(tokens, "tokens");
        s->impl->append(std::vector<int32_t>(tokens, tokens + n));
    });
}

dj_status dj_session_append_text(dj_session* s, const char* text, size_t len, size_t* n_fed) {
    if (n_fed) *n_fed = 0;
    return guard([&] {
        need(s, "session");
        if (len) need(text, "text");
        std::vector<int32_t> ids = s->impl->model.require_tokenizer().encode(std::string(text ? text : "", len));
        s->impl->append(ids);
        if (n_fed) *n_fed = ids.size();
    });
}

void dj_sampling_init(dj_sampling* s) {
    if (!s) return;
    std::memset(s, 0, sizeof *s);
    s->struct_size = sizeof *s;
    s->top_p = 1.0;
    s->repetition_penalty = 1.0;
}

dj_status dj_session_sample(dj_session* s, const dj_sampling* sampling, dj_token* token) {
    return guard([&] {
        need(s, "session");
        need(token, "token");
        dj_sampling d;
        dj_sampling_init(&d);
        dj_sampling p = read_struct(sampling, d);
        *token = s->impl->sample(to_params(p), p.has_seed != 0, p.seed);
    });
}

dj_status dj_session_feed_token(dj_session* s, dj_token token) {
    return guard([&] {
        need(s, "session");
        s->impl->model.check_tokens(&token, 1);
        s->impl->model.check_length(s->impl->position() + 1);
        s->impl->feed_token(token);
    });
}

dj_status dj_session_set_seed(dj_session* s, uint64_t seed) {
    return guard([&] {
        need(s, "session");
        s->impl->rng = dj::SplitMix64(seed);
        s->impl->has_rng = true;
    });
}

void dj_generate_options_init(dj_generate_options* o) {
    if (!o) return;
    std::memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->max_new_tokens = 128;
    dj_sampling_init(&o->sampling);
    o->feed_last = 1;
}

dj_status dj_session_generate(dj_session* s, const dj_generate_options* options, dj_token_callback callback,
                              void* user_data, dj_token* tokens, size_t capacity, dj_generation* result) {
    return guard([&] {
        need(s, "session");
        dj::GenerationOutput g = s->impl->generate(to_options(options), wrap(callback, user_data));
        g.prompt_tokens = static_cast<int32_t>(s->impl->last_prefill_tokens);
        g.prefill_seconds = s->impl->last_prefill_seconds;
        fill_result(g, tokens, capacity, result);
    });
}

dj_status dj_session_chat(dj_session* s, const char* role, const char* content, const dj_generate_options* options,
                          dj_token_callback callback, void* user_data, dj_generation* result) {
    return guard([&] {
        need(s, "session");
        need(content, "content");
        dj::GenerationOutput g = s->impl->chat(role ? role : "user", content, to_options(options), wrap(callback, user_data));
        fill_result(g, nullptr, 0, result);
    });
}

size_t dj_session_message_count(const dj_session* s) { return s ? s->impl->messages.size() : 0; }

dj_status dj_session_message(const dj_session* s, size_t index, const char** role, const char** content) {
    return guard([&] {
        need(s, "session");
        if (index >= s->impl->messages.size())
            dj::fail(DJ_ERR_INVALID_ARGUMENT, "message " + std::to_string(index) + " of " +
                                                  std::to_string(s->impl->messages.size()));
        if (role) *role = s->impl->messages[index].role.c_str();
        if (content) *content = s->impl->messages[index].content.c_str();
    });
}

dj_status dj_session_save(const dj_session* s, const char* path) {
    return guard([&] {
        need(s, "session");
        need(path, "path");
        s->impl->snapshot().save(path);
    });
}

dj_status dj_session_load(dj_session* s, const char* path) {
    return guard([&] {
        need(s, "session");
        need(path, "path");
        s->impl->restore(dj::SequenceState::load(path, &s->impl->model.identity));
    });
}

dj_status dj_session_save_to_buffer(const dj_session* s, void** data, size_t* size) {
    if (data) *data = nullptr;
    if (size) *size = 0;
    return guard([&] {
        need(s, "session");
        need(data, "data");
        need(size, "size");
        std::vector<uint8_t> bytes = s->impl->snapshot().to_bytes();
        void* p = std::malloc(bytes.size());
        if (!p) throw std::bad_alloc();
        std::memcpy(p, bytes.data(), bytes.size());
        *data = p;
        *size = bytes.size();
    });
}

dj_status dj_session_load_from_buffer(dj_session* s, const void* data, size_t size) {
    return guard([&] {
        need(s, "session");
        need(data, "data");
        s->impl->restore(
            dj::SequenceState::from_bytes(static_cast<const uint8_t*>(data), size, &s->impl->model.identity, "state"));
    });
}

void dj_free(void* data) { std::free(data); }

}  // extern "C"
