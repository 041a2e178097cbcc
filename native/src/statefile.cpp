#include "statefile.hpp"

#include <algorithm>
#include <cstring>

#include "common.hpp"
#include "sha256.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the state file is little-endian; this runtime copies tensors as they are in memory"
#endif

namespace dj {

namespace {

const uint8_t kMagic[8] = {'D', 'J', 'S', 'T', 'A', 'T', 'E', 0};
const uint32_t kVersion = 1;
const size_t kAlign = 64, kDigest = 32, kPrefix = 16;

size_t aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

json::Value shape_value(const std::vector<int64_t>& dims) {
    json::Value v = json::Value::array();
    for (int64_t d : dims) v.push(json::Value::integer(d));
    return v;
}

uint32_t read_u32(const uint8_t* p) {
    return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

void write_u32(uint8_t* p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

std::string short_fp(const std::string& fp) { return fp.substr(0, 12); }

std::string shape_text(const std::vector<int64_t>& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
}

}  // namespace

void check_same_model(const ModelIdentity& got, const ModelIdentity& want, const std::string& source) {
    if (got.num_layers != want.num_layers || got.state_shape != want.state_shape || got.vocab_size != want.vocab_size)
        fail(DJ_ERR_STATE_FILE, source + ": state of a model with " + std::to_string(got.num_layers) + " layers x " +
                                    shape_text(got.state_shape) + ", vocabulary " + std::to_string(got.vocab_size) +
                                    "; this model has " + std::to_string(want.num_layers) + " layers x " +
                                    shape_text(want.state_shape) + ", vocabulary " + std::to_string(want.vocab_size));
    if (got.fingerprint != want.fingerprint)
        fail(DJ_ERR_STATE_FILE, source + ": written by another model (fingerprint " + short_fp(got.fingerprint) +
                                    ", this export is " + short_fp(want.fingerprint) + ")");
}

std::vector<uint8_t> SequenceState::to_bytes() const {
    size_t layer_floats = 1;
    for (int64_t d : model.state_shape) layer_floats *= static_cast<size_t>(d);
    if (layers.size() != static_cast<size_t>(model.num_layers))
        fail(DJ_ERR_STATE_FILE, "state has " + std::to_string(layers.size()) + " layers, the model " +
                                    std::to_string(model.num_layers));
    struct Entry {
        std::string name, dtype;
        std::vector<int64_t> shape;
        const void* data;
        size_t nbytes, offset;
    };
    std::vector<Entry> entries;
    for (size_t i = 0; i < layers.size(); ++i) {
        if (layers[i].size() != layer_floats) fail(DJ_ERR_STATE_FILE, "state layer " + std::to_string(i) + " has the wrong size");
        entries.push_back({"state." + std::to_string(i), "float32", model.state_shape, layers[i].data(),
                           layer_floats * 4, 0});
    }
    entries.push_back({"tokens", "int32", {static_cast<int64_t>(tokens.size())}, tokens.data(), tokens.size() * 4, 0});
    if (has_logits) {
        if (logits.size() != static_cast<size_t>(model.vocab_size)) fail(DJ_ERR_STATE_FILE, "logits have the wrong size");
        entries.push_back({"logits", "float32", {static_cast<int64_t>(logits.size())}, logits.data(), logits.size() * 4, 0});
    }
    size_t offset = 0;
    json::Value tensors = json::Value::array();
    for (auto& e : entries) {
        e.offset = offset;
        json::Value t = json::Value::object();
        t.set("name", json::Value::string(e.name));
        t.set("dtype", json::Value::string(e.dtype));
        t.set("shape", shape_value(e.shape));
        t.set("offset", json::Value::integer(static_cast<int64_t>(e.offset)));
        t.set("nbytes", json::Value::integer(static_cast<int64_t>(e.nbytes)));
        tensors.push(t);
        offset = aligned(offset + e.nbytes);
    }
    // Key order as the Python writer's, so equal states give equal headers.
    json::Value m = json::Value::object();
    m.set("fingerprint", json::Value::string(model.fingerprint));
    m.set("num_layers", json::Value::integer(model.num_layers));
    m.set("state_shape", shape_value(model.state_shape));
    m.set("vocab_size", json::Value::integer(model.vocab_size));
    m.set("checkpoint_sha256",
          model.checkpoint_sha256.empty() ? json::Value::null() : json::Value::string(model.checkpoint_sha256));
    json::Value header = json::Value::object();
    header.set("model", m);
    header.set("position", json::Value::integer(static_cast<int64_t>(tokens.size())));
    header.set("tensors", tensors);
    if (has_rng) {
        json::Value s = json::Value::object();
        s.set("rng", json::Value::string("splitmix64"));
        s.set("state", json::Value::uinteger(rng_state));
        header.set("sampler", s);
    } else {
        header.set("sampler", json::Value::null());
    }
    header.set("created_by", json::Value::string(created_by));
    header.set("extra", extra.is_object() ? extra : json::Value::object());
    std::string raw = json::dump(header);
    size_t start = aligned(kPrefix + raw.size());
    std::vector<uint8_t> buf(start + offset + kDigest, 0);
    std::memcpy(buf.data(), kMagic, 8);
    write_u32(buf.data() + 8, kVersion);
    write_u32(buf.data() + 12, static_cast<uint32_t>(raw.size()));
    std::memcpy(buf.data() + kPrefix, raw.data(), raw.size());
    for (const auto& e : entries)
        if (e.nbytes) std::memcpy(buf.data() + start + e.offset, e.data, e.nbytes);
    auto digest = Sha256::of(buf.data(), buf.size() - kDigest);
    std::memcpy(buf.data() + buf.size() - kDigest, digest.data(), kDigest);
    return buf;
}

SequenceState SequenceState::from_bytes(const uint8_t* data, size_t size, const ModelIdentity* expect,
                                        const std::string& source) {
    auto fail_state = [&](const std::string& what) -> void { fail(DJ_ERR_STATE_FILE, source + ": " + what); };
    if (size < kPrefix || std::memcmp(data, kMagic, 8) != 0) fail_state("not a dijiang-deploy state file (bad magic)");
    uint32_t version = read_u32(data + 8), header_len = read_u32(data + 12);
    if (version != kVersion)
        fail_state("state format version " + std::to_string(version) + "; this build reads version " +
                   std::to_string(kVersion));
    size_t start = aligned(kPrefix + static_cast<size_t>(header_len));
    if (size < start + kDigest)
        fail_state("truncated (" + std::to_string(size) + " bytes, the header alone needs " +
                   std::to_string(start + kDigest) + ")");
    json::Value header;
    try {
        header = json::parse(std::string(reinterpret_cast<const char*>(data + kPrefix), header_len));
    } catch (const std::runtime_error& e) {
        fail_state(std::string("damaged header (") + e.what() + ")");
    }
    struct Entry {
        std::string dtype;
        std::vector<int64_t> shape;
        size_t offset = 0, nbytes = 0;
    };
    std::vector<std::pair<std::string, Entry>> entries;
    size_t payload = 0;
    const json::Value* tensors = header.is_object() ? header.find("tensors") : nullptr;
    if (!tensors || !tensors->is_array()) fail_state("damaged header (no tensor list)");
    for (const auto& t : tensors->items()) {
        const json::Value* name = t.is_object() ? t.find("name") : nullptr;
        const json::Value* dtype = t.is_object() ? t.find("dtype") : nullptr;
        const json::Value* shape = t.is_object() ? t.find("shape") : nullptr;
        const json::Value* off = t.is_object() ? t.find("offset") : nullptr;
        const json::Value* nb = t.is_object() ? t.find("nbytes") : nullptr;
        if (!name || !name->is_string() || !dtype || !dtype->is_string() || !shape || !shape->is_array() || !off ||
            !off->is_uint() || !nb || !nb->is_uint() || off->as_uint() > (1ull << 40) || nb->as_uint() > (1ull << 40))
            fail_state("damaged header (malformed tensor entry)");
        Entry e;
        e.dtype = dtype->as_string();
        for (const auto& d : shape->items()) {
            if (!d.is_uint()) fail_state("malformed state file (" + name->as_string() + ": bad shape)");
            e.shape.push_back(d.as_int());
        }
        e.offset = static_cast<size_t>(off->as_uint());
        e.nbytes = static_cast<size_t>(nb->as_uint());
        payload = std::max(payload, e.offset + e.nbytes);
        entries.emplace_back(name->as_string(), e);
    }
    size_t want = start + aligned(payload) + kDigest;
    if (size < want) fail_state("truncated (" + std::to_string(size) + " bytes, expected " + std::to_string(want) + ")");
    if (size > want) fail_state(std::to_string(size - want) + " unexpected trailing bytes");
    auto digest = Sha256::of(data, size - kDigest);
    if (std::memcmp(digest.data(), data + size - kDigest, kDigest) != 0) fail_state("damaged (checksum mismatch)");

    SequenceState s;
    const json::Value* m = header.find("model");
    auto malformed = [&](const std::string& what) { fail_state("malformed state file (" + what + ")"); };
    if (!m || !m->is_object()) malformed("no model");
    const json::Value* fp = m->find("fingerprint");
    const json::Value* nl = m->find("num_layers");
    const json::Value* ss = m->find("state_shape");
    const json::Value* vs = m->find("vocab_size");
    if (!fp || !fp->is_string() || !nl || !nl->is_int() || !ss || !ss->is_array() || !vs || !vs->is_int())
        malformed("model identity");
    s.model.fingerprint = fp->as_string();
    s.model.num_layers = static_cast<int32_t>(nl->as_int());
    for (const auto& d : ss->items()) {
        if (!d.is_int()) malformed("state_shape");
        s.model.state_shape.push_back(d.as_int());
    }
    s.model.vocab_size = static_cast<int32_t>(vs->as_int());
    const json::Value* ck = m->find("checkpoint_sha256");
    if (ck && ck->is_string()) s.model.checkpoint_sha256 = ck->as_string();

    auto tensor = [&](const std::string& name, const char* dtype) -> const Entry& {
        for (const auto& e : entries)
            if (e.first == name) {
                if (e.second.dtype != dtype) malformed(name + ": dtype " + e.second.dtype + ", expected " + dtype);
                size_t count = 1;
                for (int64_t d : e.second.shape) count *= static_cast<size_t>(d);
                if (count * 4 != e.second.nbytes)
                    malformed(name + ": " + std::to_string(e.second.nbytes) + " bytes for its shape");
                return e.second;
            }
        malformed("no tensor '" + name + "'");
        fail(DJ_ERR_INTERNAL, "unreachable");
    };
    if (s.model.num_layers < 0 || s.model.num_layers > 100000) malformed("num_layers");
    size_t layer_floats = 1;
    for (int64_t d : s.model.state_shape) layer_floats *= static_cast<size_t>(d < 0 ? 0 : d);
    for (int32_t i = 0; i < s.model.num_layers; ++i) {
        const Entry& e = tensor("state." + std::to_string(i), "float32");
        if (e.shape != s.model.state_shape)
            malformed("state layer " + std::to_string(i) + " has shape " + shape_text(e.shape) + ", the model needs " +
                      shape_text(s.model.state_shape));
        std::vector<float> layer(layer_floats);
        std::memcpy(layer.data(), data + start + e.offset, e.nbytes);
        s.layers.push_back(std::move(layer));
    }
    const Entry& tk = tensor("tokens", "int32");
    if (tk.shape.size() != 1) malformed("token history must be 1-D");
    s.tokens.resize(static_cast<size_t>(tk.shape[0]));
    if (tk.nbytes) std::memcpy(s.tokens.data(), data + start + tk.offset, tk.nbytes);
    for (int32_t t : s.tokens)
        if (t < 0 || t >= s.model.vocab_size)
            malformed("token history holds ids outside the vocabulary 0.." + std::to_string(s.model.vocab_size - 1));
    for (const auto& e : entries)
        if (e.first == "logits") {
            const Entry& lg = tensor("logits", "float32");
            if (lg.shape.size() != 1 || lg.shape[0] != s.model.vocab_size)
                malformed("logits have shape " + shape_text(lg.shape) + ", the model needs [" +
                          std::to_string(s.model.vocab_size) + "]");
            s.has_logits = true;
            s.logits.resize(static_cast<size_t>(s.model.vocab_size));
            std::memcpy(s.logits.data(), data + start + lg.offset, lg.nbytes);
        }
    const json::Value* pos = header.find("position");
    if (!pos || !pos->is_int() || pos->as_int() != static_cast<int64_t>(s.tokens.size()))
        malformed("position " + (pos ? json::dump(*pos) : std::string("None")) + " but " +
                  std::to_string(s.tokens.size()) + " tokens");
    const json::Value* sampler = header.find("sampler");
    if (sampler && !sampler->is_null()) {
        const json::Value* rng = sampler->is_object() ? sampler->find("rng") : nullptr;
        const json::Value* st = sampler->is_object() ? sampler->find("state") : nullptr;
        if (!rng || !rng->is_string() || rng->as_string() != "splitmix64" || !st || !(st->is_int() || st->is_uint()))
            malformed("unknown sampler state " + json::dump(*sampler).substr(0, 80));
        s.has_rng = true;
        s.rng_state = st->as_uint();  // Python masks to 64 bits as well
    }
    const json::Value* by = header.find("created_by");
    s.created_by = by && by->is_string() ? by->as_string() : "?";
    const json::Value* extra = header.find("extra");
    if (extra && extra->is_object()) s.extra = *extra;
    if (expect) check_same_model(s.model, *expect, source);
    return s;
}

SequenceState SequenceState::load(const std::string& path, const ModelIdentity* expect) {
    if (!path_exists(path) || is_directory(path)) fail(DJ_ERR_STATE_FILE, path + ": no such state file");
    std::vector<uint8_t> data = read_file(path);
    return from_bytes(data.data(), data.size(), expect, path);
}

void SequenceState::save(const std::string& path) const {
    std::vector<uint8_t> data = to_bytes();
    write_file_atomic(path, data.data(), data.size());
}

}  // namespace dj
