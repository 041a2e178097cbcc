// Unit tests of libdijiang's internals. Each check compares against an
// independent source: published test vectors (SHA-256, SplitMix64), a second
// implementation (incremental vs one-shot hashing, brute-force chunk plans,
// whole vs streamed decoding), or Hugging Face tokenizers' own output
// (tokenizer_fixtures, written by gen_tokenizer_fixtures.py).
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.hpp"
#include "json.hpp"
#include "manifest.hpp"
#include "sampler.hpp"
#include "sha256.hpp"
#include "statefile.hpp"
#include "tokenizer.hpp"
#include "unicode.hpp"

using dj::json::Value;

namespace {

// Every scratch folder a suite makes, removed when the test binary exits.
class ScratchDirs {
public:
    ~ScratchDirs() {
        std::error_code ignored;
        for (const auto& dir : dirs_) std::filesystem::remove_all(dir, ignored);
    }
    std::string make() {
        std::string tmpl = (std::filesystem::temp_directory_path() / "dj_tests_XXXXXX").string();
        if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed for " + tmpl);
        dirs_.push_back(tmpl);
        return tmpl;
    }

private:
    std::vector<std::string> dirs_;
};

std::string scratch_dir() {
    static ScratchDirs dirs;
    return dirs.make();
}

std::string scratch(const std::string& name) { return scratch_dir() + "/" + name; }

void write(const std::string& path, const std::string& text) {
    std::ofstream(path, std::ios::binary) << text;
}

}  // namespace

DJ_SUITE(json) {
    Value v = dj::json::parse(
        R"({"a": [1, -2, 3.5, 1e3, true, false, null], "big": 18446744073709551615, "s": "x\"\\\/\n\u00e9\ud83d\ude00"})");
    CHECK(v.is_object());
    const Value* a = v.find("a");
    CHECK(a && a->is_array() && a->size() == 7);
    CHECK((*a)[0].is_int() && (*a)[0].as_int() == 1);
    CHECK((*a)[1].as_int() == -2);
    CHECK(!(*a)[2].is_int() && (*a)[2].as_double() == 3.5);
    CHECK(!(*a)[3].is_int() && (*a)[3].as_double() == 1000.0);
    CHECK((*a)[4].as_bool() && !(*a)[5].as_bool() && (*a)[6].is_null());
    CHECK(v.find("big")->is_uint() && v.find("big")->as_uint() == 18446744073709551615ull);
    CHECK_EQ(v.find("s")->as_string(), std::string("x\"\\/\n\xC3\xA9\xF0\x9F\x98\x80"));
    // Python's json.dumps(..., separators=(",", ":")) with ensure_ascii: these bytes exactly.
    CHECK_EQ(dj::json::quote("\xC3\xA9\xF0\x9F\x98\x80\x1F\x7F\t\"\\"),
             std::string("\"\\u00e9\\ud83d\\ude00\\u001f\\u007f\\t\\\"\\\\\""));
    CHECK_EQ(dj::json::dump(dj::json::parse(R"({"k":[1,{"x":null}],"u":18446744073709551615})")),
             std::string(R"({"k":[1,{"x":null}],"u":18446744073709551615})"));
    // Duplicate keys: the last wins, as in Python.
    CHECK_EQ(dj::json::parse(R"({"k": 1, "k": 2})").find("k")->as_int(), 2);
    for (const char* bad : {"{", "[1,]", "{\"a\" 1}", "\"abc", "01x", "[1] 2", "{\"a\":tru}", "\"\\x\""}) {
        bool threw = false;
        try {
            dj::json::parse(bad);
        } catch (const std::runtime_error&) {
            threw = true;
        }
        CHECK(threw);
    }
    return 0;
}

DJ_SUITE(sha256) {
    // FIPS 180-4 / NIST CAVP example values.
    auto hex = [](const std::string& s) { return dj::Sha256::hex(dj::Sha256::of(s.data(), s.size())); };
    CHECK_EQ(hex(""), std::string("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    CHECK_EQ(hex("abc"), std::string("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    CHECK_EQ(hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
             std::string("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
    std::string million(1000000, 'a');
    CHECK_EQ(hex(million), std::string("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
    // Incremental updates in random pieces give the one-shot digest.
    std::mt19937 gen(7);
    std::string data(10007, '\0');
    for (char& c : data) c = static_cast<char>(gen());
    dj::Sha256 inc;
    size_t at = 0;
    while (at < data.size()) {
        size_t n = std::min<size_t>(gen() % 150, data.size() - at);
        inc.update(data.data() + at, n);
        at += n;
    }
    CHECK(inc.digest() == dj::Sha256::of(data.data(), data.size()));
    return 0;
}

DJ_SUITE(unicode) {
    CHECK(dj::is_letter('a') && dj::is_letter(0xE9) && dj::is_letter(0x4E2D) && dj::is_letter(0x3042));
    CHECK(!dj::is_letter('1') && !dj::is_letter(' ') && !dj::is_letter(0x1F600));
    CHECK(dj::is_number('7') && dj::is_number(0x0663) && dj::is_number(0xB2) && dj::is_number(0x2165));
    CHECK(dj::is_space(' ') && dj::is_space('\n') && dj::is_space(0x85) && dj::is_space(0xA0) && dj::is_space(0x3000) &&
          dj::is_space(0x2028));
    // U+001C..U+001F are str.isspace() in Python but not White_Space, which \s means.
    CHECK(!dj::is_space(0x1C) && !dj::is_space(0x200B));
    CHECK(std::strlen(dj::unicode_version()) > 0);
    return 0;
}

DJ_SUITE(sampler) {
    // docs/state-format.md's reference values for seed 0.
    dj::SplitMix64 r(0);
    CHECK_EQ(r.next_u64(), 0xE220A8397B1DCDAFull);
    CHECK_EQ(r.next_u64(), 0x6E789E6AA1B965F4ull);
    CHECK_EQ(r.next_u64(), 0x06C45D188009454Full);
    dj::SplitMix64 u(42);
    for (int i = 0; i < 1000; ++i) {
        double x = u.uniform();
        CHECK(x >= 0.0 && x < 1.0);
    }
    const int V = 8;
    float logits[V] = {0.5f, 2.0f, -1.0f, 1.5f, 0.0f, 1.9f, -3.0f, 0.1f};
    dj::SamplingParams greedy;
    dj::SplitMix64 rng(1);
    CHECK_EQ(dj::sample_token(logits, V, greedy, nullptr, nullptr, rng), 1);
    CHECK_EQ(rng.state, 1ull);  // greedy draws nothing
    dj::SamplingParams k1;
    k1.temperature = 1.0;
    k1.top_k = 1;
    dj::SamplingParams p_small;
    p_small.temperature = 1.0;
    p_small.top_p = 0.01;
    dj::SamplingParams k2;
    k2.temperature = 1.0;
    k2.top_k = 2;
    for (int i = 0; i < 200; ++i) {
        CHECK_EQ(dj::sample_token(logits, V, k1, nullptr, nullptr, rng), 1);
        CHECK_EQ(dj::sample_token(logits, V, p_small, nullptr, nullptr, rng), 1);
        int t = dj::sample_token(logits, V, k2, nullptr, nullptr, rng);
        CHECK(t == 1 || t == 5);
    }
    // Temperature 1 draws follow softmax(logits): frequencies within 5 standard errors.
    dj::SamplingParams t1;
    t1.temperature = 1.0;
    const int N = 40000;
    int counts[V] = {0};
    for (int i = 0; i < N; ++i) ++counts[dj::sample_token(logits, V, t1, nullptr, nullptr, rng)];
    double z = 0;
    for (float l : logits) z += std::exp(static_cast<double>(l));
    for (int i = 0; i < V; ++i) {
        double p = std::exp(static_cast<double>(logits[i])) / z;
        double se = std::sqrt(p * (1 - p) / N);
        CHECK(std::fabs(counts[i] / static_cast<double>(N) - p) < 5 * se + 1e-9);
    }
    // top_p keeps the smallest most-likely set holding top_p: here {1, 5, 3}.
    dj::SamplingParams p80;
    p80.temperature = 1.0;
    p80.top_p = 0.8;
    for (int i = 0; i < 300; ++i) {
        int t = dj::sample_token(logits, V, p80, nullptr, nullptr, rng);
        CHECK(t == 1 || t == 5 || t == 3);
    }
    // The repetition penalty (CTRL rule) moves greedy off a seen token.
    std::vector<int32_t> seen(V, 0), gen(V, 0);
    seen[1] = 1;
    dj::SamplingParams rep;
    rep.repetition_penalty = 2.0;
    CHECK_EQ(dj::sample_token(logits, V, rep, &seen, &gen, rng), 5);
    dj::SamplingParams freq;
    freq.frequency_penalty = 1.0;
    gen[1] = 1;
    CHECK_EQ(dj::sample_token(logits, V, freq, &seen, &gen, rng), 5);
    // min_p 0.9 leaves tokens within 10% of the best's probability: 1 and 5.
    dj::SamplingParams mp;
    mp.temperature = 1.0;
    mp.min_p = 0.9;
    for (int i = 0; i < 100; ++i) {
        int t = dj::sample_token(logits, V, mp, nullptr, nullptr, rng);
        CHECK(t == 1 || t == 5);
    }
    // numpy's pairwise summation equals a plain sum for exactly representable values.
    std::vector<double> ones(1000, 0.25);
    CHECK_EQ(dj::pairwise_sum(ones.data(), ones.size()), 250.0);
    dj::SamplingParams bad;
    bad.top_p = 0.0;
    CHECK_ERROR(bad.validate(), DJ_ERR_INVALID_ARGUMENT, "top_p");
    bad = dj::SamplingParams();
    bad.temperature = -1;
    CHECK_ERROR(bad.validate(), DJ_ERR_INVALID_ARGUMENT, "temperature");
    bad = dj::SamplingParams();
    bad.repetition_penalty = 0;
    CHECK_ERROR(bad.validate(), DJ_ERR_INVALID_ARGUMENT, "repetition_penalty");
    return 0;
}

DJ_SUITE(chunks) {
    std::vector<int32_t> lengths = {1, 2, 4, 8, 16, 32, 64};
    using Plan = std::vector<std::pair<int32_t, int32_t>>;
    // runtime/chunks.py's examples, in the order its plan_chunks returns them.
    CHECK((dj::plan_chunks(100, lengths) == Plan{{64, 64}, {4, 4}, {32, 32}}));
    CHECK((dj::plan_chunks(63, lengths) == Plan{{64, 63}}));
    CHECK(dj::plan_chunks(0, lengths).empty());
    // Against a brute force over every cover of the remainder: same cost, covers n.
    std::vector<int32_t> small = {1, 2, 4, 8, 16};
    for (int64_t n = 1; n <= 40; ++n) {
        Plan plan = dj::plan_chunks(n, small);
        int64_t covered = 0, cost = 0;
        for (auto [len, real] : plan) {
            CHECK(real >= 1 && real <= len);
            covered += real;
            cost += 8 + len;
        }
        CHECK_EQ(covered, n);
        int64_t full = (n / 16) * 16;
        std::vector<int64_t> best(static_cast<size_t>(n - full) + 1, INT64_MAX);
        best[0] = 0;
        for (int64_t r = 1; r <= n - full; ++r)
            for (int32_t len : small)
                for (int64_t take = 1; take <= std::min<int64_t>(len, r); ++take)
                    if (best[static_cast<size_t>(r - take)] != INT64_MAX)
                        best[static_cast<size_t>(r)] = std::min(best[static_cast<size_t>(r)],
                                                                best[static_cast<size_t>(r - take)] + 8 + len);
        CHECK_EQ(cost, (n / 16) * (8 + 16) + best[static_cast<size_t>(n - full)]);
    }
    return 0;
}

namespace {

dj::ModelIdentity identity(const std::string& fp) {
    dj::ModelIdentity id;
    id.fingerprint = fp;
    id.num_layers = 3;
    id.state_shape = {2, 4, 4};
    id.vocab_size = 50;
    id.checkpoint_sha256 = "ab12";
    return id;
}

dj::SequenceState random_state(const dj::ModelIdentity& id, uint32_t seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal;
    dj::SequenceState s;
    s.model = id;
    for (int i = 0; i < id.num_layers; ++i) {
        std::vector<float> layer(32);
        for (float& x : layer) x = normal(gen);
        s.layers.push_back(layer);
    }
    for (int i = 0; i < 17; ++i) s.tokens.push_back(static_cast<int32_t>(gen() % 50));
    s.has_logits = true;
    for (int i = 0; i < 50; ++i) s.logits.push_back(normal(gen));
    s.has_rng = true;
    s.rng_state = 0xFEDCBA9876543210ull;  // above int64's range: must survive JSON
    s.created_by = "test";
    Value msgs = Value::array();
    Value m = Value::object();
    m.set("role", Value::string("user"));
    m.set("content", Value::string("h\xC3\xA9llo \xF0\x9F\x8E\x89"));
    msgs.push(m);
    s.extra.set("messages", msgs);
    return s;
}

}  // namespace

DJ_SUITE(statefile) {
    std::string fp(64, 'a'), other(64, 'b');
    dj::ModelIdentity id = identity(fp);
    dj::SequenceState s = random_state(id, 3);
    std::vector<uint8_t> bytes = s.to_bytes();
    CHECK(std::memcmp(bytes.data(), "DJSTATE\0", 8) == 0);
    uint32_t hlen;
    std::memcpy(&hlen, bytes.data() + 12, 4);
    size_t start = (16 + hlen + 63) / 64 * 64;
    // Layers at 0, 128, 256; tokens (68 bytes) at 384; logits (200) at 512; 768 in all, then the digest.
    CHECK_EQ(bytes.size(), start + 768 + 32);
    dj::SequenceState back = dj::SequenceState::from_bytes(bytes.data(), bytes.size(), &id, "t");
    CHECK(back.layers == s.layers && back.tokens == s.tokens && back.logits == s.logits);
    CHECK(back.has_rng && back.rng_state == s.rng_state && back.model.checkpoint_sha256 == "ab12");
    CHECK_EQ(back.extra.find("messages")->items()[0].find("content")->as_string(), std::string("h\xC3\xA9llo \xF0\x9F\x8E\x89"));
    // The same state writes the same bytes (the header is deterministic).
    CHECK(back.to_bytes() == bytes);

    auto load = [&](const std::vector<uint8_t>& b, const dj::ModelIdentity* e) {
        return dj::SequenceState::from_bytes(b.data(), b.size(), e, "f.djstate");
    };
    std::vector<uint8_t> cut(bytes.begin(), bytes.end() - 1);
    CHECK_ERROR(load(cut, &id), DJ_ERR_STATE_FILE, "f.djstate: truncated");
    std::vector<uint8_t> tiny(bytes.begin(), bytes.begin() + 40);
    CHECK_ERROR(load(tiny, &id), DJ_ERR_STATE_FILE, "truncated");
    std::vector<uint8_t> longer(bytes);
    longer.push_back(0);
    CHECK_ERROR(load(longer, &id), DJ_ERR_STATE_FILE, "1 unexpected trailing bytes");
    std::vector<uint8_t> tampered(bytes);
    tampered[start + 5] ^= 0x01;
    CHECK_ERROR(load(tampered, &id), DJ_ERR_STATE_FILE, "damaged (checksum mismatch)");
    std::vector<uint8_t> magic(bytes);
    magic[0] = 'X';
    CHECK_ERROR(load(magic, &id), DJ_ERR_STATE_FILE, "bad magic");
    std::vector<uint8_t> version(bytes);
    version[8] = 2;
    CHECK_ERROR(load(version, &id), DJ_ERR_STATE_FILE, "state format version 2; this build reads version 1");
    dj::ModelIdentity foreign = identity(other);
    CHECK_ERROR(load(bytes, &foreign), DJ_ERR_STATE_FILE, "written by another model (fingerprint aaaaaaaaaaaa");
    dj::ModelIdentity shaped = identity(fp);
    shaped.num_layers = 4;
    CHECK_ERROR(load(bytes, &shaped), DJ_ERR_STATE_FILE, "state of a model with 3 layers");
    // A header edit with a recomputed checksum is caught by the consistency checks.
    std::string header(reinterpret_cast<const char*>(bytes.data()) + 16, hlen);
    size_t at = header.find("\"position\":17");
    CHECK(at != std::string::npos);
    std::vector<uint8_t> edited(bytes);
    edited[16 + at + 12] = '6';
    auto d = dj::Sha256::of(edited.data(), edited.size() - 32);
    std::memcpy(edited.data() + edited.size() - 32, d.data(), 32);
    CHECK_ERROR(load(edited, &id), DJ_ERR_STATE_FILE, "malformed state file (position 16 but 17 tokens)");

    std::string path = scratch("s.djstate");
    s.save(path);
    dj::SequenceState f = dj::SequenceState::load(path, &id);
    CHECK(f.layers == s.layers);
    CHECK_ERROR(dj::SequenceState::load(path + ".missing", &id), DJ_ERR_STATE_FILE, "no such state file");
    // Without logits and RNG (a fresh session) the optional parts stay absent.
    dj::SequenceState empty;
    empty.model = id;
    empty.layers.assign(3, std::vector<float>(32, 0.0f));
    std::vector<uint8_t> eb = empty.to_bytes();
    dj::SequenceState eback = load(eb, &id);
    CHECK(!eback.has_logits && !eback.has_rng && eback.tokens.empty());
    return 0;
}

namespace {

const char* kManifest = R"({
  "model_file": "model.onnx", "flavor": "inline", "opset": 23, "dtype": "fp32", "weights": "fp32",
  "logits": "last", "max_chunk": 16,
  "inputs": [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
             {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"},
             {"name": "past_position", "shape": ["batch"], "dtype": "int64"},
             {"name": "past_state.0", "shape": ["batch", 2, 4, 4], "dtype": "float32"}],
  "outputs": [{"name": "logits", "shape": ["batch", 1, 10], "dtype": "float32"},
              {"name": "present_state.0", "shape": ["batch", 2, 4, 4], "dtype": "float32"}],
  "num_layers": 1, "state_shape": [2, 4, 4], "decay": "geometric", "position_limit": null,
  "vocab_size": 10, "eos_token_id": [3, 4], "source": {"sha256": "cafe"}, "format": "dijiang-onnx/1",
  "model_fingerprint": "FP")";

std::string manifest_folder(const std::string& text) {
    std::string dir = scratch_dir();
    write(dir + "/manifest.json", text);
    return dir;
}

std::string with_fp(std::string text, const std::string& fp, const std::string& tail = "}") {
    text.replace(text.find("FP"), 2, fp);
    return text + tail;
}

}  // namespace

DJ_SUITE(manifest) {
    std::string fp(64, 'c');
    dj::Manifest m = dj::Manifest::load(manifest_folder(with_fp(kManifest, fp)));
    CHECK_EQ(m.num_layers, 1);
    CHECK_EQ(m.vocab_size, 10);
    CHECK_EQ(m.fingerprint, fp);
    CHECK((m.eos_token_ids == std::vector<int32_t>{3, 4}));
    CHECK_EQ(m.checkpoint_sha256, std::string("cafe"));
    CHECK((m.prefill_lengths() == std::vector<int32_t>{1, 2, 4, 8, 16}));
    CHECK_ERROR(dj::Manifest::load("/nonexistent/folder"), DJ_ERR_NOT_FOUND, "no such file or directory");
    CHECK_ERROR(dj::Manifest::load(scratch_dir()), DJ_ERR_NOT_FOUND, "no manifest.json");
    CHECK_ERROR(dj::Manifest::load(manifest_folder("{not json")), DJ_ERR_BAD_EXPORT, "not valid JSON");
    std::string no_fp = kManifest;
    no_fp.replace(no_fp.find(",\n  \"model_fingerprint\": \"FP\""), std::string(",\n  \"model_fingerprint\": \"FP\"").size(), "");
    CHECK_ERROR(dj::Manifest::load(manifest_folder(no_fp + "}")), DJ_ERR_BAD_EXPORT, "re-export with dijiang-deploy 0.2+");
    std::string wrong_format = with_fp(kManifest, fp);
    wrong_format.replace(wrong_format.find("dijiang-onnx/1"), 14, "other/9");
    CHECK_ERROR(dj::Manifest::load(manifest_folder(wrong_format)), DJ_ERR_BAD_EXPORT, "unknown manifest format");
    std::string layers = with_fp(kManifest, fp);
    layers.replace(layers.find("\"num_layers\": 1"), 15, "\"num_layers\": 2");
    CHECK_ERROR(dj::Manifest::load(manifest_folder(layers)), DJ_ERR_BAD_EXPORT, "manifest is inconsistent");
    std::string vocab = with_fp(kManifest, fp);
    vocab.replace(vocab.find("\"vocab_size\": 10"), 16, "\"vocab_size\": 11");
    CHECK_ERROR(dj::Manifest::load(manifest_folder(vocab)), DJ_ERR_BAD_EXPORT, "vocab_size 11");
    std::string shape = with_fp(kManifest, fp);
    shape.replace(shape.find("\"state_shape\": [2, 4, 4]"), 24, "\"state_shape\": [2, 4]");
    CHECK_ERROR(dj::Manifest::load(manifest_folder(shape)), DJ_ERR_BAD_EXPORT, "state_shape must be");
    return 0;
}

DJ_SUITE(chat) {
    dj::ChatFormat f;
    f.system_first_prefix = "<s>";
    f.preamble = "<default>";
    f.prefix_user = "[u]";
    f.prefix_assistant = "[a]";
    f.suffix_system = "</s>";
    f.suffix_user = "[/u]";
    f.suffix_assistant = "[/a]";
    f.generation_prompt = "[a]";
    using M = std::vector<dj::Message>;
    CHECK_EQ(dj::render_chat(f, M{{"user", "hi"}}, true), std::string("<default>[u]hi[/u][a]"));
    CHECK_EQ(dj::render_chat(f, M{{"system", "S"}, {"user", "a"}, {"assistant", "b"}}, false),
             std::string("<s>S</s>[u]a[/u][a]b[/a]"));
    CHECK_ERROR(dj::render_chat(f, M{}, true), DJ_ERR_CHAT, "at least one message");
    CHECK_ERROR(dj::render_chat(f, M{{"user", "a"}, {"system", "b"}}, true), DJ_ERR_CHAT, "only at the start");
    std::string path = scratch("chat_format.json");
    write(path, R"({"version": 1, "system_first_prefix": "<s>", "preamble": "", "prefix": {"user": "U", "assistant": "A"},
                    "suffix": {"system": "", "user": "", "assistant": ""}, "generation_prompt": "A"})");
    CHECK_EQ(dj::ChatFormat::load(path).prefix_user, std::string("U"));
    write(path, R"({"version": 2})");
    CHECK_ERROR(dj::ChatFormat::load(path), DJ_ERR_CHAT, "malformed chat format");
    return 0;
}

namespace {

// A byte-level BPE tokenizer.json built here: every byte's character, and merges
// "h e" -> "he", "he l" -> "hel", "l l" -> "ll", "hel l" -> "hell" (rank order matters).
std::string tiny_tokenizer(const std::string& pre, const std::string& extra_added = "") {
    std::string vocab;
    int id = 0;
    auto add = [&](const std::string& tok) {
        vocab += (vocab.empty() ? "" : ",") + dj::json::quote(tok) + ":" + std::to_string(id++);
    };
    int next = 256;
    for (int b = 0; b < 256; ++b) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        std::string s;
        dj::append_utf8(s, printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(next++));
        add(s);
    }
    for (const char* t : {"he", "hel", "ll", "hell", "\xC4\xA0h"}) add(t);
    return std::string(R"({"version": "1.0", "added_tokens": [{"id": 300, "content": "<|end|>", "special": true,
        "lstrip": false, "rstrip": false, "single_word": false, "normalized": false})") + extra_added +
           R"(], "normalizer": null, "pre_tokenizer": )" + pre +
           R"(, "decoder": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {)" + vocab +
           R"(}, "merges": ["h e", ["he", "l"], "l l", "hel l", "Ġ h"]}})";
}

}  // namespace

DJ_SUITE(tokenizer_unit) {
    const std::string bl = R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})";
    dj::Tokenizer t = dj::Tokenizer::from_json(dj::json::parse(tiny_tokenizer(bl)), "tiny");
    int32_t he = t.token_id("he"), hel = t.token_id("hel"), hell = t.token_id("hell"), o = t.token_id("o");
    // "hello": h e -> he (rank 0), he l -> hel (1) before l l (2), hel l -> hell (3).
    CHECK((t.encode("hello") == std::vector<int32_t>{hell, o}));
    CHECK((t.encode("hel") == std::vector<int32_t>{hel}));
    CHECK((t.encode("he<|end|>he") == std::vector<int32_t>{he, 300, he}));
    CHECK_EQ(t.decode(t.encode("he<|end|>he"), true), std::string("hehe"));
    CHECK_EQ(t.decode(t.encode("he<|end|>he"), false), std::string("he<|end|>he"));
    std::string mixed = "caf\xC3\xA9 \xF0\x9F\x98\x80  x\n\n\ty";
    CHECK_EQ(t.decode(t.encode(mixed), true), mixed);
    // GPT-2 split: contractions, a space joins the next word, a whitespace run gives its last space away.
    using P = std::vector<std::string>;
    CHECK((t.pre_tokenize("I'm here") == P{"I", "'m", " here"}));
    CHECK((t.pre_tokenize("a  b") == P{"a", " ", " b"}));
    CHECK((t.pre_tokenize("x \n") == P{"x", " \n"}));
    CHECK((t.pre_tokenize("x2024 ok!?") == P{"x", "2024", " ok", "!?"}));
    const std::string l3 = R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": )" +
                           dj::json::quote(
                               "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+") +
                           R"(}, "behavior": "Isolated", "invert": false},
                           {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]})";
    dj::Tokenizer t3 = dj::Tokenizer::from_json(dj::json::parse(tiny_tokenizer(l3)), "l3");
    CHECK((t3.pre_tokenize("I'M 12345 ?ok\n\n  z") == P{"I", "'M", " ", "123", "45", " ?", "ok", "\n\n", " ", " z"}));
    // Anything but byte-level BPE is refused with a clear error.
    std::string wp = tiny_tokenizer(bl);
    wp.replace(wp.find("\"type\": \"BPE\""), 13, "\"type\": \"WordPiece\"");
    CHECK_ERROR(dj::Tokenizer::from_json(dj::json::parse(wp), "wp.json"), DJ_ERR_TOKENIZER, "model type WordPiece");
    std::string meta = tiny_tokenizer(R"({"type": "Metaspace"})");
    CHECK_ERROR(dj::Tokenizer::from_json(dj::json::parse(meta), "m.json"), DJ_ERR_TOKENIZER, "pre-tokenizer Metaspace");
    std::string re = tiny_tokenizer(R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "\\w+"},
        "behavior": "Isolated", "invert": false}, {"type": "ByteLevel", "use_regex": false}]})");
    CHECK_ERROR(dj::Tokenizer::from_json(dj::json::parse(re), "r.json"), DJ_ERR_TOKENIZER, "Split pattern other than");
    // lstrip/rstrip added tokens swallow the whitespace around them.
    dj::Tokenizer ts = dj::Tokenizer::from_json(
        dj::json::parse(tiny_tokenizer(bl, R"(, {"id": 301, "content": "<m>", "special": false, "lstrip": true,
            "rstrip": true, "single_word": false, "normalized": false})")), "s");
    CHECK((ts.encode("he  <m>  he") == std::vector<int32_t>{he, 301, he}));

    // Lossy UTF-8 as Rust's from_utf8_lossy: one U+FFFD per maximal invalid subpart.
    const std::string fffd = "\xEF\xBF\xBD";
    CHECK_EQ(dj::utf8_lossy("a\xE2\x82"), "a" + fffd);
    CHECK_EQ(dj::utf8_lossy("\xF0\x9F\x98x"), fffd + "x");
    CHECK_EQ(dj::utf8_lossy("\xC0\x80"), fffd + fffd);
    CHECK_EQ(dj::utf8_lossy("\xED\xA0\x80"), fffd + fffd + fffd);
    CHECK_EQ(dj::utf8_lossy("\xFF\xE2\x82\xAC"), fffd + "\xE2\x82\xAC");
    // Streamed pieces join to the whole decode, for random byte-token sequences.
    std::mt19937 gen(11);
    for (int trial = 0; trial < 300; ++trial) {
        std::vector<int32_t> ids;
        for (int k = 0; k < 12; ++k) ids.push_back(static_cast<int32_t>(gen() % (trial % 2 ? 256 : 300)));
        dj::StreamDecoder sd(&t);
        std::string joined;
        for (int32_t id : ids) joined += sd.push(id);
        joined += sd.flush();
        CHECK_EQ(joined, t.decode(ids, true));
    }
    return 0;
}

DJ_SUITE(tokenizer_fixtures) {
    // Files written by gen_tokenizer_fixtures.py with Hugging Face tokenizers:
    // NAME.json (a tokenizer) and NAME.expected.json ({"texts", "ids", "decoded"}).
    if (argc < 2) return 2;
    std::string dir = argv[1];
    std::string index_path = dir + "/index.json";
    struct stat st;
    if (::stat(index_path.c_str(), &st) != 0) {
        std::fprintf(stderr, "no fixtures in %s (Hugging Face tokenizers missing?): skipped\n", dir.c_str());
        return 77;
    }
    Value index = dj::json::parse(dj::read_text_file(index_path));
    int cases = 0;
    for (const auto& name : index.items()) {
        dj::Tokenizer t = dj::Tokenizer::from_file(dir + "/" + name.as_string() + ".json");
        Value exp = dj::json::parse(dj::read_text_file(dir + "/" + name.as_string() + ".expected.json"));
        const Value& texts = *exp.find("texts");
        const Value& ids = *exp.find("ids");
        const Value& decoded = *exp.find("decoded");
        for (size_t i = 0; i < texts.size(); ++i) {
            std::vector<int32_t> want;
            for (const auto& v : ids[i].items()) want.push_back(static_cast<int32_t>(v.as_int()));
            std::vector<int32_t> got = t.encode(texts[i].as_string());
            if (got != want) {
                ++g_failures;
                std::fprintf(stderr, "%s: text %zu %s: %zu ids, expected %zu\n", name.as_string().c_str(), i,
                             dj::json::quote(texts[i].as_string()).substr(0, 60).c_str(), got.size(), want.size());
            }
            if (t.decode(want, true) != decoded[i].as_string()) {
                ++g_failures;
                std::fprintf(stderr, "%s: decode of text %zu differs\n", name.as_string().c_str(), i);
            }
            ++cases;
        }
    }
    std::printf("tokenizer_fixtures: %d texts compared\n", cases);
    return 0;
}
