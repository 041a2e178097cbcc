// ONNX Runtime through its stable C API, loaded at run time (dlopen + OrtGetApiBase):
// the library needs no ONNX Runtime at link time, and one build runs with any
// library at least as new as the header it was compiled against.
#include <dlfcn.h>
#include <glob.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "backend.hpp"
#include "common.hpp"
#include "json.hpp"
#include "onnxruntime_c_api.h"

#ifndef DIJIANG_DEFAULT_ORT_LIBRARY
#define DIJIANG_DEFAULT_ORT_LIBRARY ""
#endif

namespace dj {

float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                ++e;
                mant <<= 1;
            } while (!(mant & 0x400));
            bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

namespace {

// The process's ONNX Runtime: one library, one OrtEnv (ORT wants one per
// process), shared by every model. Never unloaded: ORT's threads and
// allocators do not survive dlclose.
struct OrtRuntime {
    void* handle = nullptr;
    const OrtApi* api = nullptr;
    OrtEnv* env = nullptr;
    std::string path, version;
};

std::mutex g_ort_mutex;
OrtRuntime g_ort;

std::vector<std::string> ort_candidates(const std::string& explicit_path) {
    std::vector<std::string> out;
    if (!explicit_path.empty()) return {explicit_path};
    if (const char* env = std::getenv("DIJIANG_ORT_LIBRARY"); env && *env) return {env};
    if (*DIJIANG_DEFAULT_ORT_LIBRARY) out.push_back(DIJIANG_DEFAULT_ORT_LIBRARY);
    if (const char* venv = std::getenv("VIRTUAL_ENV"); venv && *venv) {
        glob_t g;
        std::string pattern = std::string(venv) + "/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*";
        if (glob(pattern.c_str(), 0, nullptr, &g) == 0)
            for (size_t i = 0; i < g.gl_pathc; ++i) out.push_back(g.gl_pathv[i]);
        globfree(&g);
    }
    out.push_back("libonnxruntime.so");
    out.push_back("libonnxruntime.so.1");
    return out;
}

const OrtApi* load_ort(const std::string& explicit_path) {
    std::lock_guard<std::mutex> lock(g_ort_mutex);
    if (g_ort.api) return g_ort.api;
    std::string tried;
    for (const auto& path : ort_candidates(explicit_path)) {
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            const char* err = dlerror();
            tried += "\n  " + path + ": " + (err ? err : "not loadable");
            continue;
        }
        using GetApiBase = const OrtApiBase* (*)();
        auto get_base = reinterpret_cast<GetApiBase>(dlsym(h, "OrtGetApiBase"));
        if (!get_base) {
            tried += "\n  " + path + ": no OrtGetApiBase (not ONNX Runtime)";
            continue;
        }
        const OrtApiBase* base = get_base();
        const OrtApi* api = base->GetApi(ORT_API_VERSION);
        if (!api)
            fail(DJ_ERR_BACKEND_UNAVAILABLE, path + ": ONNX Runtime " + base->GetVersionString() +
                                                 " does not provide C API version " + std::to_string(ORT_API_VERSION) +
                                                 " (needs ONNX Runtime 1." + std::to_string(ORT_API_VERSION) + "+)");
        OrtEnv* env = nullptr;
        if (OrtStatus* st = api->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "dijiang", &env)) {
            std::string msg = api->GetErrorMessage(st);
            api->ReleaseStatus(st);
            fail(DJ_ERR_BACKEND, "ONNX Runtime could not start (" + msg + ")");
        }
        g_ort = {h, api, env, path, base->GetVersionString()};
        return api;
    }
    // Joined on one line: the C API promises one-line messages.
    std::string flat;
    for (char c : tried) flat += c == '\n' ? ';' : c;
    fail(DJ_ERR_BACKEND_UNAVAILABLE,
         "ONNX Runtime library not found (set DIJIANG_ORT_LIBRARY to libonnxruntime.so; tried" + flat + ")");
}

class OrtGraph;

void check(const OrtApi* api, OrtStatus* st, const std::string& what) {
    if (!st) return;
    std::string msg = api->GetErrorMessage(st);
    api->ReleaseStatus(st);
    size_t nl = msg.find('\n');
    if (nl != std::string::npos) msg = msg.substr(0, nl);
    fail(DJ_ERR_BACKEND, what + " (" + msg.substr(0, 300) + ")");
}

class OrtLane : public Lane {
public:
    OrtLane(const OrtApi* api, OrtSession* session, const Manifest& m, std::vector<int32_t> lengths)
        : api_(api), session_(session), m_(m), lengths_(std::move(lengths)) {
        check(api_, api_->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem_), "CreateCpuMemoryInfo");
        const int64_t shape_state[4] = {1, m.state_shape[0], m.state_shape[1], m.state_shape[2]};
        size_t floats = m.state_floats();
        for (int side = 0; side < 2; ++side) {
            states_[side].resize(static_cast<size_t>(m.num_layers));
            for (auto& layer : states_[side]) layer.assign(floats, 0.0f);
            for (auto& layer : states_[side])
                state_values_[side].push_back(value(layer.data(), floats * 4, shape_state, 4,
                                                    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
        }
        const int64_t one = 1;
        position_value_ = value(&position_, 8, &one, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
        half_ = m.logits_dtype == "float16";
        for (int32_t len : lengths_) {
            Slot s;
            s.length = len;
            s.ids.assign(static_cast<size_t>(len), 0);
            s.mask.assign(static_cast<size_t>(len), 0);
            s.out_len = m.logits == "last" ? 1 : len;
            s.logits.assign(static_cast<size_t>(s.out_len) * static_cast<size_t>(m.vocab_size) * (half_ ? 2 : 4), 0);
            const int64_t shape_ids[2] = {1, len};
            const int64_t shape_logits[3] = {1, s.out_len, m.vocab_size};
            s.ids_value = value(s.ids.data(), s.ids.size() * 8, shape_ids, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
            s.mask_value = value(s.mask.data(), s.mask.size() * 8, shape_ids, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
            s.logits_value = value(s.logits.data(), s.logits.size(), shape_logits, 3,
                                   half_ ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
            slots_.push_back(std::move(s));
        }
    }

    ~OrtLane() override {
        for (auto& s : slots_) {
            for (OrtIoBinding* b : s.bindings)
                if (b) api_->ReleaseIoBinding(b);
            api_->ReleaseValue(s.ids_value);
            api_->ReleaseValue(s.mask_value);
            api_->ReleaseValue(s.logits_value);
        }
        for (auto& side : state_values_)
            for (OrtValue* v : side) api_->ReleaseValue(v);
        api_->ReleaseValue(position_value_);
        api_->ReleaseMemoryInfo(mem_);
    }

    void step(const int64_t* ids, const int64_t* mask, int32_t length, float* logits) override {
        Slot* s = nullptr;
        for (auto& slot : slots_)
            if (slot.length == length) s = &slot;
        if (!s) fail(DJ_ERR_INTERNAL, "step length " + std::to_string(length) + " has no buffers");
        std::memcpy(s->ids.data(), ids, static_cast<size_t>(length) * 8);
        std::memcpy(s->mask.data(), mask, static_cast<size_t>(length) * 8);
        OrtIoBinding*& io = s->bindings[current_];
        if (!io) io = bind(*s, current_);
        check(api_, api_->RunWithBinding(session_, nullptr, io), "ONNX Runtime step failed");
        current_ = 1 - current_;
        for (int32_t i = 0; i < length; ++i) position_ += mask[i];
        size_t v = static_cast<size_t>(m_.vocab_size);
        size_t last = static_cast<size_t>(s->out_len - 1) * v;
        if (half_) {
            const uint16_t* h = reinterpret_cast<const uint16_t*>(s->logits.data()) + last;
            for (size_t i = 0; i < v; ++i) logits[i] = half_to_float(h[i]);
        } else {
            std::memcpy(logits, reinterpret_cast<const float*>(s->logits.data()) + last, v * 4);
        }
    }

    void read_state(std::vector<std::vector<float>>& layers) override { layers = states_[current_]; }

    void write_state(const std::vector<std::vector<float>>* layers, int64_t position) override {
        for (size_t i = 0; i < states_[current_].size(); ++i) {
            auto& dst = states_[current_][i];
            if (layers) std::memcpy(dst.data(), (*layers)[i].data(), dst.size() * 4);
            else std::fill(dst.begin(), dst.end(), 0.0f);
        }
        position_ = position;
    }

private:
    struct Slot {
        int32_t length = 0, out_len = 1;
        std::vector<int64_t> ids, mask;
        std::vector<uint8_t> logits;
        OrtValue *ids_value = nullptr, *mask_value = nullptr, *logits_value = nullptr;
        OrtIoBinding* bindings[2] = {nullptr, nullptr};  // per ping-pong side
    };

    const OrtApi* api_;
    OrtSession* session_;
    const Manifest& m_;
    std::vector<int32_t> lengths_;
    OrtMemoryInfo* mem_ = nullptr;
    // Two state sets: a step reads one and writes the other, so no output
    // aliases an input (as runtime/ort_backend.py does).
    std::vector<std::vector<float>> states_[2];
    std::vector<OrtValue*> state_values_[2];
    int current_ = 0;
    int64_t position_ = 0;
    OrtValue* position_value_ = nullptr;
    bool half_ = false;
    std::vector<Slot> slots_;

    OrtValue* value(void* data, size_t bytes, const int64_t* shape, size_t rank, ONNXTensorElementDataType type) {
        OrtValue* v = nullptr;
        check(api_, api_->CreateTensorWithDataAsOrtValue(mem_, data, bytes, shape, rank, type, &v), "CreateTensor");
        return v;
    }

    OrtIoBinding* bind(Slot& s, int src) {
        OrtIoBinding* io = nullptr;
        check(api_, api_->CreateIoBinding(session_, &io), "CreateIoBinding");
        try {
            check(api_, api_->BindInput(io, "input_ids", s.ids_value), "bind input_ids");
            check(api_, api_->BindInput(io, "attention_mask", s.mask_value), "bind attention_mask");
            check(api_, api_->BindInput(io, "past_position", position_value_), "bind past_position");
            for (int32_t i = 0; i < m_.num_layers; ++i) {
                std::string in = "past_state." + std::to_string(i), out = "present_state." + std::to_string(i);
                check(api_, api_->BindInput(io, in.c_str(), state_values_[src][static_cast<size_t>(i)]), "bind " + in);
                check(api_, api_->BindOutput(io, out.c_str(), state_values_[1 - src][static_cast<size_t>(i)]), "bind " + out);
            }
            check(api_, api_->BindOutput(io, "logits", s.logits_value), "bind logits");
        } catch (...) {
            api_->ReleaseIoBinding(io);
            throw;
        }
        return io;
    }
};

class OrtGraph : public Graph {
public:
    OrtGraph(const Manifest& m, const BackendOptions& o) : m_(m) {
        if (m.flavor == "plugin")
            fail(DJ_ERR_BACKEND_UNAVAILABLE, m.folder + ": this export uses the 'plugin' attention op, which only "
                                                        "TensorRT runs natively (--backend trt); export another flavor");
        std::string path = join_path(m.folder, m.model_file);
        if (!path_exists(path)) fail(DJ_ERR_BAD_EXPORT, path + ": model file named by the manifest is missing");
        api_ = load_ort(o.ort_library);
        OrtSessionOptions* so = nullptr;
        check(api_, api_->CreateSessionOptions(&so), "CreateSessionOptions");
        int32_t threads = o.threads;
        if (threads <= 0)
            if (const char* env = std::getenv("DIJIANG_THREADS"); env && *env) threads = std::atoi(env);
        try {
            // The Python runtime's settings, so both run the same optimized graph.
            check(api_, api_->SetSessionGraphOptimizationLevel(so, ORT_ENABLE_ALL), "graph optimization level");
            if (threads > 0) check(api_, api_->SetIntraOpNumThreads(so, threads), "intra-op threads");
            check(api_, api_->SetSessionLogSeverityLevel(so, 3), "log level");
            OrtStatus* st = api_->CreateSession(g_ort.env, path.c_str(), so, &session_);
            if (st) {
                std::string msg = api_->GetErrorMessage(st);
                api_->ReleaseStatus(st);
                size_t nl = msg.find('\n');
                fail(DJ_ERR_BAD_EXPORT, path + ": ONNX Runtime cannot load the graph (" +
                                            msg.substr(0, std::min<size_t>(nl, 300)) + ")");
            }
        } catch (...) {
            api_->ReleaseSessionOptions(so);
            throw;
        }
        api_->ReleaseSessionOptions(so);
        try {
            check_io();
            check_metadata();
        } catch (...) {
            api_->ReleaseSession(session_);
            throw;
        }
    }

    ~OrtGraph() override {
        if (session_) api_->ReleaseSession(session_);
    }

    std::unique_ptr<Lane> lane() override { return std::make_unique<OrtLane>(api_, session_, m_, lengths()); }
    std::vector<int32_t> lengths() const override { return m_.prefill_lengths(); }
    const char* name() const override { return "ort"; }

private:
    const Manifest& m_;
    const OrtApi* api_ = nullptr;
    OrtSession* session_ = nullptr;

    static std::string dtype_name(ONNXTensorElementDataType t) {
        switch (t) {
            case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
            case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
            case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
            default: return "type " + std::to_string(static_cast<int>(t));
        }
    }

    // check_graph of the Python manifest: names, dtypes, static dimensions.
    void check_io() {
        OrtAllocator* alloc = nullptr;
        check(api_, api_->GetAllocatorWithDefaultOptions(&alloc), "allocator");
        for (int out = 0; out < 2; ++out) {
            const std::vector<TensorSpec>& specs = out ? m_.outputs : m_.inputs;
            size_t n = 0;
            check(api_, out ? api_->SessionGetOutputCount(session_, &n) : api_->SessionGetInputCount(session_, &n), "IO count");
            if (n != specs.size())
                fail(DJ_ERR_BAD_EXPORT, "manifest does not match the graph: " + std::to_string(n) +
                                            (out ? " outputs" : " inputs") + " in the graph, " +
                                            std::to_string(specs.size()) + " in the manifest");
            for (size_t i = 0; i < n; ++i) {
                char* name = nullptr;
                check(api_, out ? api_->SessionGetOutputName(session_, i, alloc, &name)
                                : api_->SessionGetInputName(session_, i, alloc, &name), "IO name");
                std::string got = name;
                if (OrtStatus* fs = api_->AllocatorFree(alloc, name)) api_->ReleaseStatus(fs);
                OrtTypeInfo* info = nullptr;
                check(api_, out ? api_->SessionGetOutputTypeInfo(session_, i, &info)
                                : api_->SessionGetInputTypeInfo(session_, i, &info), "IO type");
                const OrtTensorTypeAndShapeInfo* ti = nullptr;
                ONNXTensorElementDataType et = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
                size_t rank = 0;
                std::vector<int64_t> dims;
                OrtStatus* st = api_->CastTypeInfoToTensorInfo(info, &ti);
                if (!st && ti) st = api_->GetTensorElementType(ti, &et);
                if (!st && ti) st = api_->GetDimensionsCount(ti, &rank);
                if (!st && ti) {
                    dims.resize(rank);
                    st = api_->GetDimensions(ti, dims.data(), rank);
                }
                api_->ReleaseTypeInfo(info);
                check(api_, st, "IO shape");
                const TensorSpec& want = specs[i];
                if (got != want.name || dtype_name(et) != want.dtype)
                    fail(DJ_ERR_BAD_EXPORT, "manifest does not match the graph: " + std::string(out ? "output " : "input ") +
                                                std::to_string(i) + " is " + got + " (" + dtype_name(et) +
                                                ") in the graph, " + want.name + " (" + want.dtype + ") in the manifest");
                bool agree = dims.size() == want.dims.size();
                for (size_t k = 0; agree && k < dims.size(); ++k)
                    agree = dims[k] < 0 || want.dims[k] < 0 || dims[k] == want.dims[k];
                if (!agree)
                    fail(DJ_ERR_BAD_EXPORT, "manifest does not match the graph: " + got +
                                                " has another shape in the graph than in the manifest (re-export the folder)");
            }
        }
    }

    // check_metadata of the Python manifest: the graph's quantization record agrees with `weights`.
    void check_metadata() {
        OrtAllocator* alloc = nullptr;
        check(api_, api_->GetAllocatorWithDefaultOptions(&alloc), "allocator");
        OrtModelMetadata* meta = nullptr;
        check(api_, api_->SessionGetModelMetadata(session_, &meta), "model metadata");
        char* raw = nullptr;
        OrtStatus* st = api_->ModelMetadataLookupCustomMetadataMap(meta, alloc, "dijiang_deploy.quantization", &raw);
        api_->ReleaseModelMetadata(meta);
        check(api_, st, "model metadata");
        std::string graph;
        bool has_record = raw != nullptr;
        if (raw) {
            std::string text = raw;
            if (OrtStatus* fs = api_->AllocatorFree(alloc, raw)) api_->ReleaseStatus(fs);
            try {
                json::Value v = json::parse(text);
                const json::Value* w = v.is_object() ? v.find("weights") : nullptr;
                if (w && w->is_string()) graph = w->as_string();
            } catch (const std::runtime_error&) {
                fail(DJ_ERR_BAD_EXPORT, "the graph's dijiang_deploy.quantization metadata is not valid JSON");
            }
        }
        bool integer = m_.weights == "int8" || m_.weights == "int4";
        if (integer && graph != m_.weights)
            fail(DJ_ERR_BAD_EXPORT, "manifest says weights " + m_.weights + " but the graph is " +
                                        (graph.empty() ? std::string("not quantized") : graph) +
                                        ": the folder mixes files from different exports; re-export it");
        if (!integer && has_record)
            fail(DJ_ERR_BAD_EXPORT, "manifest says weights " + m_.weights + " but the graph is " + graph +
                                        ": re-export the folder");
    }
};

}  // namespace

std::unique_ptr<Graph> open_ort_graph(const Manifest& m, const BackendOptions& o) {
    return std::make_unique<OrtGraph>(m, o);
}

}  // namespace dj
