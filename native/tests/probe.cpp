// dj_probe: internals of libdijiang on the command line, for tests/test_native.py
// to compare with the Python runtime and Hugging Face tokenizers.
//
//   dj_probe tokenize TOKENIZER_JSON TEXTS_JSON     -> {"ids": [[...]], "decoded": [...], "streamed": [...]}
//   dj_probe plan LENGTHS(comma) N_MAX              -> [[[len, real], ...] for n in 0..N_MAX]
//   dj_probe sample LOGITS_F32 V ROWS SEED T K P MIN_P REP PRES FREQ  -> [token per row]
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.hpp"
#include "json.hpp"
#include "sampler.hpp"
#include "tokenizer.hpp"

using dj::json::Value;

static int tokenize(const char* tok_path, const char* texts_path) {
    dj::Tokenizer t = dj::Tokenizer::from_file(tok_path);
    Value texts = dj::json::parse(dj::read_text_file(texts_path));
    Value ids = Value::array(), decoded = Value::array(), streamed = Value::array();
    for (const auto& text : texts.items()) {
        std::vector<int32_t> e = t.encode(text.as_string());
        Value row = Value::array();
        for (int32_t id : e) row.push(Value::integer(id));
        ids.push(row);
        decoded.push(Value::string(t.decode(e, true)));
        dj::StreamDecoder sd(&t);
        std::string joined;
        for (int32_t id : e) joined += sd.push(id);
        streamed.push(Value::string(joined + sd.flush()));
    }
    Value out = Value::object();
    out.set("ids", ids);
    out.set("decoded", decoded);
    out.set("streamed", streamed);
    std::printf("%s\n", dj::json::dump(out).c_str());
    return 0;
}

static int plan(const char* lengths_arg, const char* nmax_arg) {
    std::vector<int32_t> lengths;
    std::string s = lengths_arg;
    size_t at = 0;
    while (at < s.size()) {
        size_t c = s.find(',', at);
        lengths.push_back(std::atoi(s.substr(at, c == std::string::npos ? std::string::npos : c - at).c_str()));
        if (c == std::string::npos) break;
        at = c + 1;
    }
    Value all = Value::array();
    for (long n = 0; n <= std::atol(nmax_arg); ++n) {
        Value p = Value::array();
        for (auto [len, real] : dj::plan_chunks(n, lengths)) {
            Value c = Value::array();
            c.push(Value::integer(len));
            c.push(Value::integer(real));
            p.push(c);
        }
        all.push(p);
    }
    std::printf("%s\n", dj::json::dump(all).c_str());
    return 0;
}

static int sample(char** a) {
    std::vector<uint8_t> raw = dj::read_file(a[0]);
    int32_t v = std::atoi(a[1]), rows = std::atoi(a[2]);
    if (raw.size() != static_cast<size_t>(v) * static_cast<size_t>(rows) * 4) {
        std::fprintf(stderr, "logits file has the wrong size\n");
        return 2;
    }
    const float* logits = reinterpret_cast<const float*>(raw.data());
    dj::SplitMix64 rng(std::strtoull(a[3], nullptr, 10));
    dj::SamplingParams p;
    p.temperature = std::atof(a[4]);
    p.top_k = std::atoi(a[5]);
    p.top_p = std::atof(a[6]);
    p.min_p = std::atof(a[7]);
    p.repetition_penalty = std::atof(a[8]);
    p.presence_penalty = std::atof(a[9]);
    p.frequency_penalty = std::atof(a[10]);
    p.validate();
    // As TokenSampler with an empty prompt: each drawn token is observed.
    std::vector<int32_t> seen(static_cast<size_t>(v), 0), gen(static_cast<size_t>(v), 0);
    Value out = Value::array();
    for (int32_t r = 0; r < rows; ++r) {
        int32_t t = dj::sample_token(logits + static_cast<size_t>(r) * static_cast<size_t>(v), v, p, &seen, &gen, rng);
        ++seen[static_cast<size_t>(t)];
        ++gen[static_cast<size_t>(t)];
        out.push(Value::integer(t));
    }
    std::printf("%s\n", dj::json::dump(out).c_str());
    return 0;
}

int main(int argc, char** argv) {
    try {
        std::string cmd = argc > 1 ? argv[1] : "";
        if (cmd == "tokenize" && argc == 4) return tokenize(argv[2], argv[3]);
        if (cmd == "plan" && argc == 4) return plan(argv[2], argv[3]);
        if (cmd == "sample" && argc == 13) return sample(argv + 2);
        std::fprintf(stderr, "usage: dj_probe tokenize|plan|sample ...\n");
        return 2;
    } catch (const dj::Error& e) {
        std::fprintf(stderr, "dj_probe: %s\n", e.what());
        return 1;
    }
}
