// dijiang.hpp: header-only C++17 RAII wrapper over the C API in dijiang.h.
//
//   dijiang::Model model("export/");
//   dijiang::Session s(model);
//   s.append_text("The capital of France is");
//   s.generate(32, {}, [](dj_token, std::string_view text) { std::cout << text; return true; });
//
// Failures throw dijiang::Error (status + the library's one-line message).
#ifndef DIJIANG_HPP
#define DIJIANG_HPP

#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dijiang.h"

namespace dijiang {

class Error : public std::runtime_error {
public:
    Error(dj_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    dj_status status() const noexcept { return status_; }

private:
    dj_status status_;
};

inline void check(dj_status status) {
    if (status != DJ_OK) throw Error(status, dj_last_error());
}

class Model {
public:
    explicit Model(const std::string& folder, const dj_model_options* options = nullptr) {
        check(dj_model_open(folder.c_str(), options, &m_));
    }
    ~Model() { dj_model_close(m_); }
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;
    Model(Model&& o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
    Model& operator=(Model&& o) noexcept {
        std::swap(m_, o.m_);
        return *this;
    }

    dj_model* get() const noexcept { return m_; }
    int32_t vocab_size() const { return dj_model_vocab_size(m_); }
    std::string fingerprint() const { return dj_model_fingerprint(m_); }
    bool is_eos(dj_token t) const { return dj_model_is_eos(m_, t) != 0; }

    std::vector<dj_token> tokenize(std::string_view text) const {
        size_t n = 0;
        std::vector<dj_token> out(text.size() + 8);
        dj_status st = dj_tokenize(m_, text.data(), text.size(), out.data(), out.size(), &n);
        if (st == DJ_ERR_BUFFER_TOO_SMALL) {
            out.resize(n);
            st = dj_tokenize(m_, text.data(), text.size(), out.data(), out.size(), &n);
        }
        check(st);
        out.resize(n);
        return out;
    }

    std::string detokenize(const std::vector<dj_token>& ids, bool skip_special = true) const {
        size_t n = 0;
        std::string out(ids.size() * 8 + 16, '\0');
        dj_status st = dj_detokenize(m_, ids.data(), ids.size(), skip_special, &out[0], out.size(), &n);
        if (st == DJ_ERR_BUFFER_TOO_SMALL) {
            out.resize(n);
            st = dj_detokenize(m_, ids.data(), ids.size(), skip_special, &out[0], out.size(), &n);
        }
        check(st);
        out.resize(n);
        return out;
    }

private:
    dj_model* m_ = nullptr;
};

// Return false to stop generating.
using TokenHandler = std::function<bool(dj_token, std::string_view)>;

class Session {
public:
    explicit Session(const Model& model) { check(dj_session_create(model.get(), &s_)); }
    ~Session() { dj_session_free(s_); }
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;
    Session(Session&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}

    dj_session* get() const noexcept { return s_; }
    int64_t position() const { return dj_session_position(s_); }
    void reset() { check(dj_session_reset(s_)); }
    void append(const std::vector<dj_token>& ids) { check(dj_session_append_tokens(s_, ids.data(), ids.size())); }
    size_t append_text(std::string_view text) {
        size_t n = 0;
        check(dj_session_append_text(s_, text.data(), text.size(), &n));
        return n;
    }
    dj_token sample(const dj_sampling* sampling = nullptr) {
        dj_token t = 0;
        check(dj_session_sample(s_, sampling, &t));
        return t;
    }
    void feed(dj_token t) { check(dj_session_feed_token(s_, t)); }

    std::vector<dj_token> generate(int32_t max_new_tokens, const dj_sampling* sampling = nullptr,
                                   TokenHandler on_token = nullptr, dj_generation* result = nullptr) {
        dj_generate_options o;
        dj_generate_options_init(&o);
        o.max_new_tokens = max_new_tokens;
        if (sampling) o.sampling = *sampling;
        std::vector<dj_token> out(static_cast<size_t>(max_new_tokens > 0 ? max_new_tokens : 0));
        dj_generation g{};
        check(dj_session_generate(s_, &o, on_token ? &Session::trampoline : nullptr, &on_token, out.data(), out.size(), &g));
        out.resize(static_cast<size_t>(g.n_tokens));
        if (result) *result = g;
        return out;
    }

    dj_generation chat(const std::string& content, const dj_generate_options* options = nullptr,
                       TokenHandler on_token = nullptr, const char* role = "user") {
        dj_generation g{};
        check(dj_session_chat(s_, role, content.c_str(), options, on_token ? &Session::trampoline : nullptr, &on_token, &g));
        return g;
    }

    void save(const std::string& path) const { check(dj_session_save(s_, path.c_str())); }
    void load(const std::string& path) { check(dj_session_load(s_, path.c_str())); }
    std::vector<uint8_t> to_bytes() const {
        void* data = nullptr;
        size_t size = 0;
        check(dj_session_save_to_buffer(s_, &data, &size));
        std::vector<uint8_t> out(static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + size);
        dj_free(data);
        return out;
    }
    void from_bytes(const std::vector<uint8_t>& bytes) {
        check(dj_session_load_from_buffer(s_, bytes.data(), bytes.size()));
    }

private:
    dj_session* s_ = nullptr;

    static int trampoline(void* user, dj_token token, const char* text, size_t len) {
        auto* handler = static_cast<TokenHandler*>(user);
        return (*handler)(token, std::string_view(text, len)) ? 0 : 1;
    }
};

}  // namespace dijiang

#endif  // DIJIANG_HPP
