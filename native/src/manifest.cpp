#include "manifest.hpp"

#include "common.hpp"

namespace dj {

namespace {

const char* kFormat = "dijiang-onnx/1";

[[noreturn]] void bad(const std::string& path, const std::string& what) { fail(DJ_ERR_BAD_EXPORT, path + ": " + what); }

const json::Value& need(const json::Value& obj, const char* key, const std::string& path) {
    const json::Value* v = obj.find(key);
    if (!v) bad(path, std::string("malformed manifest (no '") + key + "')");
    return *v;
}

std::string need_string(const json::Value& obj, const char* key, const std::string& path) {
    const json::Value& v = need(obj, key, path);
    if (!v.is_string()) bad(path, std::string("malformed manifest ('") + key + "' must be a string)");
    return v.as_string();
}

int64_t positive(const json::Value& v, const char* what, const std::string& path) {
    if (!v.is_int() || v.as_int() <= 0)
        bad(path, std::string("malformed manifest: ") + what + " must be a positive integer, got " + json::dump(v));
    return v.as_int();
}

std::vector<TensorSpec> specs(const json::Value& list, const char* key, const std::string& path) {
    if (!list.is_array()) bad(path, std::string("malformed manifest ('") + key + "' must be a list)");
    std::vector<TensorSpec> out;
    for (const auto& t : list.items()) {
        if (!t.is_object()) bad(path, std::string("malformed manifest (an entry of '") + key + "' is not an object)");
        TensorSpec s;
        s.name = need_string(t, "name", path);
        s.dtype = need_string(t, "dtype", path);
        const json::Value& shape = need(t, "shape", path);
        if (!shape.is_array()) bad(path, "malformed manifest (" + s.name + " has no shape list)");
        for (const auto& d : shape.items()) s.dims.push_back(d.is_int() ? d.as_int() : -1);
        out.push_back(s);
    }
    return out;
}

bool shapes_agree(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i] >= 0 && b[i] >= 0 && a[i] != b[i]) return false;
    return true;
}

std::string dims_text(const std::vector<int64_t>& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + (d[i] < 0 ? std::string("?") : std::to_string(d[i]));
    return s + "]";
}

}  // namespace

Manifest Manifest::load(const std::string& folder) {
    if (!path_exists(folder)) fail(DJ_ERR_NOT_FOUND, folder + ": no such file or directory");
    if (!is_directory(folder)) fail(DJ_ERR_NOT_FOUND, folder + ": not a folder");
    std::string path = join_path(folder, "manifest.json");
    if (!path_exists(path)) fail(DJ_ERR_NOT_FOUND, folder + ": no manifest.json (not a dijiang-deploy export folder)");
    json::Value root = json::parse_file(path, DJ_ERR_BAD_EXPORT);
    if (!root.is_object()) bad(path, "unknown manifest format (not an object)");
    const json::Value* format = root.find("format");
    if (!format || !format->is_string() || format->as_string() != kFormat)
        bad(path, "unknown manifest format " + (format ? json::dump(*format) : std::string("None")));

    Manifest m;
    m.folder = folder;
    m.model_file = need_string(root, "model_file", path);
    m.flavor = need_string(root, "flavor", path);
    m.weights = need_string(root, "weights", path);
    m.logits = need_string(root, "logits", path);
    m.max_chunk = static_cast<int32_t>(positive(need(root, "max_chunk", path), "max_chunk", path));
    m.num_layers = static_cast<int32_t>(positive(need(root, "num_layers", path), "num_layers", path));
    m.vocab_size = static_cast<int32_t>(positive(need(root, "vocab_size", path), "vocab_size", path));
    const json::Value& shape = need(root, "state_shape", path);
    if (!shape.is_array() || shape.size() != 3)
        bad(path, "malformed manifest: state_shape must be [heads, d, d] (positive integers), got " + json::dump(shape));
    for (const auto& d : shape.items()) {
        if (!d.is_int() || d.as_int() <= 0)
            bad(path, "malformed manifest: state_shape must be [heads, d, d] (positive integers), got " + json::dump(shape));
        m.state_shape.push_back(d.as_int());
    }
    const json::Value* sd = root.find("state_dtype");
    if (sd && (!sd->is_string() || sd->as_string() != "float32"))
        bad(path, "malformed manifest: state_dtype must be one of ['float32'], got " + json::dump(*sd));
    const json::Value* limit = root.find("position_limit");
    if (limit && !limit->is_null()) m.position_limit = positive(*limit, "position_limit", path);
    const json::Value* eos = root.find("eos_token_id");
    if (eos && eos->is_int()) m.eos_token_ids.push_back(static_cast<int32_t>(eos->as_int()));
    if (eos && eos->is_array())
        for (const auto& e : eos->items())
            if (e.is_int()) m.eos_token_ids.push_back(static_cast<int32_t>(e.as_int()));
    const json::Value* source = root.find("source");
    if (source && source->is_object()) {
        const json::Value* sha = source->find("sha256");
        if (sha && sha->is_string()) m.checkpoint_sha256 = sha->as_string();
    }
    m.inputs = specs(need(root, "inputs", path), "inputs", path);
    m.outputs = specs(need(root, "outputs", path), "outputs", path);

    // check_consistent of the Python manifest: these sizes size every buffer.
    std::vector<std::string> want = {"input_ids", "attention_mask", "past_position"};
    for (int i = 0; i < m.num_layers; ++i) want.push_back("past_state." + std::to_string(i));
    bool names_ok = m.inputs.size() == want.size();
    for (size_t i = 0; names_ok && i < want.size(); ++i) names_ok = m.inputs[i].name == want[i];
    if (!names_ok)
        bad(path, "manifest is inconsistent: num_layers " + std::to_string(m.num_layers) +
                      " needs the inputs input_ids, attention_mask, past_position, past_state.0.." +
                      std::to_string(m.num_layers - 1) + ", but it lists " + std::to_string(m.inputs.size()) +
                      " inputs; re-export the folder");
    if (m.outputs.size() != static_cast<size_t>(m.num_layers) + 1)
        bad(path, "manifest is inconsistent: " + std::to_string(m.outputs.size()) + " outputs for " +
                      std::to_string(m.num_layers) + " layers");
    std::vector<int64_t> state = {-1, m.state_shape[0], m.state_shape[1], m.state_shape[2]};
    for (size_t i = 3; i < m.inputs.size(); ++i)
        if (!shapes_agree(m.inputs[i].dims, state) || m.inputs[i].dtype != "float32")
            bad(path, "manifest is inconsistent: state_shape " + dims_text(m.state_shape) + ", but " + m.inputs[i].name +
                          " is " + dims_text(m.inputs[i].dims));
    for (size_t i = 1; i < m.outputs.size(); ++i) {
        if (m.outputs[i].name != "present_state." + std::to_string(i - 1))
            bad(path, "manifest is inconsistent: output " + std::to_string(i) + " is " + m.outputs[i].name);
        if (!shapes_agree(m.outputs[i].dims, state) || m.outputs[i].dtype != "float32")
            bad(path, "manifest is inconsistent: state_shape " + dims_text(m.state_shape) + ", but " +
                          m.outputs[i].name + " is " + dims_text(m.outputs[i].dims));
    }
    const TensorSpec& lg = m.outputs[0];
    if (lg.name != "logits" || lg.dims.empty() || lg.dims.back() != m.vocab_size)
        bad(path, "manifest is inconsistent: vocab_size " + std::to_string(m.vocab_size) + ", but the first output is " +
                      lg.name + " " + dims_text(lg.dims));
    if (lg.dtype != "float32" && lg.dtype != "float16") bad(path, "logits dtype " + lg.dtype + " is not supported");
    m.logits_dtype = lg.dtype;
    if (m.logits != "last" && m.logits != "all") bad(path, "malformed manifest: logits must be 'last' or 'all'");
    for (int k = 0; k < 3; ++k)
        if (m.inputs[static_cast<size_t>(k)].dtype != "int64")
            bad(path, "manifest is inconsistent: " + m.inputs[static_cast<size_t>(k)].name + " must be int64");

    const json::Value* fp = root.find("model_fingerprint");
    if (!fp || !fp->is_string() || fp->as_string().size() != 64)
        bad(path, "no model_fingerprint: this export predates dijiang-deploy 0.2 (re-export with dijiang-deploy 0.2+)");
    m.fingerprint = fp->as_string();
    return m;
}

ModelIdentity Manifest::identity() const {
    ModelIdentity id;
    id.fingerprint = fingerprint;
    id.num_layers = num_layers;
    id.state_shape = state_shape;
    id.vocab_size = vocab_size;
    id.checkpoint_sha256 = checkpoint_sha256;
    return id;
}

size_t Manifest::state_floats() const {
    return static_cast<size_t>(state_shape[0] * state_shape[1] * state_shape[2]);
}

std::vector<int32_t> Manifest::prefill_lengths() const {
    std::vector<int32_t> out;
    for (int32_t n = 1; n < max_chunk; n *= 2) out.push_back(n);
    out.push_back(max_chunk);
    return out;
}

ChatFormat ChatFormat::load(const std::string& path) {
    json::Value root = json::parse_file(path, DJ_ERR_CHAT);
    auto str = [&](const json::Value* obj, const char* key) {
        const json::Value* v = obj && obj->is_object() ? obj->find(key) : nullptr;
        if (!v || !v->is_string()) fail(DJ_ERR_CHAT, path + ": malformed chat format (no string '" + key + "')");
        return v->as_string();
    };
    const json::Value* version = root.is_object() ? root.find("version") : nullptr;
    if (!version || !version->is_int() || version->as_int() != 1)
        fail(DJ_ERR_CHAT, path + ": malformed chat format (version " + (version ? json::dump(*version) : "None") + ")");
    ChatFormat f;
    f.system_first_prefix = str(&root, "system_first_prefix");
    f.preamble = str(&root, "preamble");
    f.generation_prompt = str(&root, "generation_prompt");
    const json::Value* prefix = root.find("prefix");
    const json::Value* suffix = root.find("suffix");
    f.prefix_user = str(prefix, "user");
    f.prefix_assistant = str(prefix, "assistant");
    f.suffix_system = str(suffix, "system");
    f.suffix_user = str(suffix, "user");
    f.suffix_assistant = str(suffix, "assistant");
    return f;
}

std::string render_chat(const ChatFormat& fmt, const std::vector<Message>& messages, bool add_generation_prompt) {
    if (messages.empty()) fail(DJ_ERR_CHAT, "a conversation needs at least one message");
    std::string out;
    size_t first = 0;
    if (messages[0].role == "system") {
        out += fmt.system_first_prefix + messages[0].content + fmt.suffix_system;
        first = 1;
    } else {
        out += fmt.preamble;
    }
    for (size_t i = first; i < messages.size(); ++i) {
        const Message& m = messages[i];
        if (m.role == "system") fail(DJ_ERR_CHAT, "a system message is supported only at the start of a conversation");
        if (m.role == "user") out += fmt.prefix_user + m.content + fmt.suffix_user;
        else if (m.role == "assistant") out += fmt.prefix_assistant + m.content + fmt.suffix_assistant;
        else fail(DJ_ERR_CHAT, "message role must be one of system, user, assistant, got '" + m.role + "'");
    }
    if (add_generation_prompt) out += fmt.generation_prompt;
    return out;
}

}  // namespace dj
