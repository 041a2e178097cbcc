// TensorRT engine folders (`dijiang-deploy build`): libnvinfer and the CUDA
// runtime are loaded at run time, so libdijiang links and starts without them
// and says so clearly when an engine folder is opened on a machine without
// TensorRT. UNVERIFIED ON HARDWARE: no TensorRT library was available where
// this was written; it compiles against the TensorRT 10 headers the project uses.
#include "backend.hpp"
#include "common.hpp"
#include "json.hpp"

namespace dj {
namespace {

struct EngineInfo {
    std::string engine_file = "model.engine", plugin_library;
    bool plugins_serialized = false;
};

EngineInfo read_engine_json(const std::string& folder) {
    std::string path = join_path(folder, "engine.json");
    if (!path_exists(path))
        fail(DJ_ERR_BAD_EXPORT, folder + ": no engine.json (not a TensorRT engine folder of dijiang-deploy build)");
    json::Value v = json::parse_file(path, DJ_ERR_BAD_EXPORT);
    const json::Value* format = v.is_object() ? v.find("format") : nullptr;
    if (!format || !format->is_string() || format->as_string() != "dijiang-trt/1")
        fail(DJ_ERR_BAD_EXPORT, path + ": unknown engine manifest format");
    EngineInfo info;
    if (const json::Value* f = v.find("engine_file"); f && f->is_string()) info.engine_file = f->as_string();
    if (const json::Value* f = v.find("plugin_library"); f && f->is_string()) info.plugin_library = f->as_string();
    if (const json::Value* f = v.find("plugins_serialized"); f && f->is_bool()) info.plugins_serialized = f->as_bool();
    return info;
}

}  // namespace
}  // namespace dj

#ifndef DIJIANG_WITH_TRT

namespace dj {
std::unique_ptr<Graph> open_trt_graph(const Manifest& m, const BackendOptions&) {
    read_engine_json(m.folder);  // folder errors first, as with TensorRT
    fail(DJ_ERR_BACKEND_UNAVAILABLE,
         "this libdijiang was built without the TensorRT headers (configure with DIJIANG_TENSORRT_INCLUDE_DIR)");
}
}  // namespace dj

#else

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

#include "NvInferRuntime.h"

namespace dj {

namespace {

// The CUDA runtime calls the backend makes, resolved from libcudart at run time.
struct Cuda {
    void* handle = nullptr;
    decltype(&cudaMalloc) malloc = nullptr;
    decltype(&cudaFree) free = nullptr;
    decltype(&cudaMemcpyAsync) memcpy_async = nullptr;
    decltype(&cudaMemsetAsync) memset_async = nullptr;
    decltype(&cudaStreamCreate) stream_create = nullptr;
    decltype(&cudaStreamDestroy) stream_destroy = nullptr;
    decltype(&cudaStreamSynchronize) stream_sync = nullptr;
    decltype(&cudaGetErrorString) error_string = nullptr;

    void load() {
        const char* names[] = {"libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"};
        for (const char* n : names)
            if ((handle = dlopen(n, RTLD_NOW | RTLD_LOCAL))) break;
        if (!handle)
            fail(DJ_ERR_BACKEND_UNAVAILABLE, "the TensorRT backend needs the CUDA runtime (libcudart.so) on the library path");
        auto sym = [&](const char* name) {
            void* p = dlsym(handle, name);
            if (!p) fail(DJ_ERR_BACKEND_UNAVAILABLE, std::string("libcudart has no ") + name);
            return p;
        };
        malloc = reinterpret_cast<decltype(malloc)>(sym("cudaMalloc"));
        free = reinterpret_cast<decltype(free)>(sym("cudaFree"));
        memcpy_async = reinterpret_cast<decltype(memcpy_async)>(sym("cudaMemcpyAsync"));
        memset_async = reinterpret_cast<decltype(memset_async)>(sym("cudaMemsetAsync"));
        stream_create = reinterpret_cast<decltype(stream_create)>(sym("cudaStreamCreate"));
        stream_destroy = reinterpret_cast<decltype(stream_destroy)>(sym("cudaStreamDestroy"));
        stream_sync = reinterpret_cast<decltype(stream_sync)>(sym("cudaStreamSynchronize"));
        error_string = reinterpret_cast<decltype(error_string)>(sym("cudaGetErrorString"));
    }

    void check(cudaError_t e, const char* what) const {
        if (e != cudaSuccess) fail(DJ_ERR_BACKEND, std::string(what) + " failed (" + error_string(e) + ")");
    }
};

class Logger : public nvinfer1::ILogger {
public:
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kERROR) last = msg;
    }
    std::string last;
};

void* load_nvinfer(const std::string& explicit_path) {
    std::vector<std::string> names;
    if (!explicit_path.empty()) names.push_back(explicit_path);
    else if (const char* env = std::getenv("DIJIANG_TRT_LIBRARY"); env && *env) names.push_back(env);
    else names = {"libnvinfer.so.10", "libnvinfer.so"};
    std::string tried;
    for (const auto& n : names) {
        if (void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
        const char* err = dlerror();
        tried += "; " + n + ": " + (err ? err : "not loadable");
    }
    fail(DJ_ERR_BACKEND_UNAVAILABLE,
         "TensorRT library not found (set DIJIANG_TRT_LIBRARY to libnvinfer.so; tried" + tried.substr(1) + ")");
}

class TrtGraph;

class TrtLane : public Lane {
public:
    TrtLane(TrtGraph& g);
    ~TrtLane() override;
    void step(const int64_t* ids, const int64_t* mask, int32_t length, float* logits) override;
    void read_state(std::vector<std::vector<float>>& layers) override;
    void write_state(const std::vector<std::vector<float>>* layers, int64_t position) override;

private:
    struct Slot {
        int32_t length = 0, out_len = 1;
        void *ids = nullptr, *mask = nullptr, *logits = nullptr;
        nvinfer1::IExecutionContext* ctx[2] = {nullptr, nullptr};
    };
    TrtGraph& g_;
    cudaStream_t stream_ = nullptr;
    void* scratch_ = nullptr;
    void* position_ = nullptr;
    std::vector<void*> states_[2];
    std::vector<Slot> slots_;
    std::vector<uint8_t> host_logits_;
    int current_ = 0;
    int64_t position_host_ = 0;

    nvinfer1::IExecutionContext* context(Slot& s, int src);
};

class TrtGraph : public Graph {
public:
    TrtGraph(const Manifest& m, const BackendOptions& o) : m_(m) {
        // The destructor does not run when the constructor throws: release what was made.
        try {
            EngineInfo info = read_engine_json(m.folder);
            std::string engine_path = join_path(m.folder, info.engine_file);
            if (!path_exists(engine_path)) fail(DJ_ERR_BAD_EXPORT, engine_path + ": engine file named by engine.json is missing");
            void* lib = load_nvinfer(o.trt_library);
            cuda_.load();
            using Create = void* (*)(void*, int32_t);
            auto create = reinterpret_cast<Create>(dlsym(lib, "createInferRuntime_INTERNAL"));
            if (!create) fail(DJ_ERR_BACKEND_UNAVAILABLE, "libnvinfer has no createInferRuntime_INTERNAL (not TensorRT 10?)");
            runtime_ = static_cast<nvinfer1::IRuntime*>(create(&logger_, NV_TENSORRT_VERSION));
            if (!runtime_) fail(DJ_ERR_BACKEND_UNAVAILABLE, "TensorRT refused to create a runtime (" + logger_.last + ")");
            if (info.plugins_serialized) {
                runtime_->setEngineHostCodeAllowed(true);
            } else {
                std::string plugin = o.trt_plugin_library;
                if (plugin.empty())
                    if (const char* env = std::getenv("DIJIANG_TRT_PLUGIN_LIB"); env && *env) plugin = env;
                if (plugin.empty() && !info.plugin_library.empty() && path_exists(info.plugin_library))
                    plugin = info.plugin_library;
                if (!plugin.empty() && !runtime_->getPluginRegistry().loadLibrary(plugin.c_str()))
                    fail(DJ_ERR_BACKEND_UNAVAILABLE, plugin + ": TensorRT cannot load the plugin library");
            }
            std::vector<uint8_t> blob = read_file(engine_path);
            engine_ = runtime_->deserializeCudaEngine(blob.data(), blob.size());
            if (!engine_)
                fail(DJ_ERR_BACKEND, engine_path + ": TensorRT cannot deserialize it (other TensorRT version or GPU? " +
                                         logger_.last + ")");
            check_io();
            for (int32_t len : lengths())
                if (profile_for(len) < 0)
                    fail(DJ_ERR_BAD_EXPORT, m.folder + ": no optimization profile accepts sequence length " +
                                                std::to_string(len) + "; rebuild the engine");
        } catch (...) {
            delete engine_;
            delete runtime_;
            throw;
        }
    }

    ~TrtGraph() override {
        delete engine_;
        delete runtime_;
    }

    std::unique_ptr<Lane> lane() override { return std::make_unique<TrtLane>(*this); }
    std::vector<int32_t> lengths() const override {
        if (m_.max_chunk == 1) return {1};
        return {1, m_.max_chunk};
    }
    const char* name() const override { return "trt"; }

    int profile_for(int32_t length) const {
        for (int32_t k = 0; k < engine_->getNbOptimizationProfiles(); ++k) {
            nvinfer1::Dims lo = engine_->getProfileShape("input_ids", k, nvinfer1::OptProfileSelector::kMIN);
            nvinfer1::Dims hi = engine_->getProfileShape("input_ids", k, nvinfer1::OptProfileSelector::kMAX);
            if (lo.nbDims == 2 && lo.d[1] <= length && length <= hi.d[1] && lo.d[0] <= 1 && 1 <= hi.d[0]) return k;
        }
        return -1;
    }

    const Manifest& m_;
    Cuda cuda_;
    Logger logger_;
    nvinfer1::IRuntime* runtime_ = nullptr;
    nvinfer1::ICudaEngine* engine_ = nullptr;

private:
    void check_io() {
        int32_t n = engine_->getNbIOTensors();
        size_t want = m_.inputs.size() + m_.outputs.size();
        if (n < 0 || static_cast<size_t>(n) != want)
            fail(DJ_ERR_BAD_EXPORT, m_.folder + ": engine has " + std::to_string(n) + " IO tensors, the manifest " +
                                        std::to_string(want));
        auto dtype = [](nvinfer1::DataType t) {
            switch (t) {
                case nvinfer1::DataType::kFLOAT: return std::string("float32");
                case nvinfer1::DataType::kHALF: return std::string("float16");
                case nvinfer1::DataType::kINT64: return std::string("int64");
                default: return std::string("other");
            }
        };
        for (int out = 0; out < 2; ++out)
            for (const TensorSpec& s : out ? m_.outputs : m_.inputs) {
                nvinfer1::TensorIOMode mode = engine_->getTensorIOMode(s.name.c_str());
                nvinfer1::TensorIOMode expect = out ? nvinfer1::TensorIOMode::kOUTPUT : nvinfer1::TensorIOMode::kINPUT;
                if (mode != expect) fail(DJ_ERR_BAD_EXPORT, m_.folder + ": engine IO differs from the manifest's (" + s.name + ")");
                if (dtype(engine_->getTensorDataType(s.name.c_str())) != s.dtype)
                    fail(DJ_ERR_BAD_EXPORT, m_.folder + ": tensor " + s.name + " has another dtype in the engine than " +
                                                s.dtype + " in the manifest");
            }
    }
};

TrtLane::TrtLane(TrtGraph& g) : g_(g) {
    const Cuda& c = g.cuda_;
    const Manifest& m = g.m_;
    c.check(c.stream_create(&stream_), "cudaStreamCreate");
    int64_t scratch = g.engine_->getDeviceMemorySizeV2();
    c.check(c.malloc(&scratch_, static_cast<size_t>(scratch > 0 ? scratch : 1)), "cudaMalloc");
    c.check(c.malloc(&position_, 8), "cudaMalloc");
    c.check(c.memset_async(position_, 0, 8, stream_), "cudaMemsetAsync");
    size_t bytes = m.state_floats() * 4;
    for (auto& side : states_)
        for (int32_t i = 0; i < m.num_layers; ++i) {
            void* p = nullptr;
            c.check(c.malloc(&p, bytes), "cudaMalloc");
            c.check(c.memset_async(p, 0, bytes, stream_), "cudaMemsetAsync");
            side.push_back(p);
        }
    size_t elem = m.logits_dtype == "float16" ? 2 : 4;
    for (int32_t len : g.lengths()) {
        Slot s;
        s.length = len;
        s.out_len = m.logits == "last" ? 1 : len;
        c.check(c.malloc(&s.ids, static_cast<size_t>(len) * 8), "cudaMalloc");
        c.check(c.malloc(&s.mask, static_cast<size_t>(len) * 8), "cudaMalloc");
        c.check(c.malloc(&s.logits, static_cast<size_t>(s.out_len) * static_cast<size_t>(m.vocab_size) * elem), "cudaMalloc");
        slots_.push_back(s);
    }
    host_logits_.resize(static_cast<size_t>(m.vocab_size) * elem);
    c.check(c.stream_sync(stream_), "cudaStreamSynchronize");
}

TrtLane::~TrtLane() {
    const Cuda& c = g_.cuda_;
    for (auto& s : slots_) {
        delete s.ctx[0];
        delete s.ctx[1];
        c.free(s.ids);
        c.free(s.mask);
        c.free(s.logits);
    }
    for (auto& side : states_)
        for (void* p : side) c.free(p);
    c.free(position_);
    c.free(scratch_);
    c.stream_destroy(stream_);
}

nvinfer1::IExecutionContext* TrtLane::context(Slot& s, int src) {
    if (s.ctx[src]) return s.ctx[src];
    const Manifest& m = g_.m_;
    auto* ctx = g_.engine_->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED);
    if (!ctx) fail(DJ_ERR_BACKEND, "TensorRT could not create an execution context (" + g_.logger_.last + ")");
    s.ctx[src] = ctx;
    // All contexts share one scratch buffer: a lane runs one step at a time on one stream.
    ctx->setDeviceMemoryV2(scratch_, g_.engine_->getDeviceMemorySizeV2());
    if (!ctx->setOptimizationProfileAsync(g_.profile_for(s.length), stream_))
        fail(DJ_ERR_BACKEND, "TensorRT refused the optimization profile for length " + std::to_string(s.length));
    nvinfer1::Dims ids_shape;
    ids_shape.nbDims = 2;
    ids_shape.d[0] = 1;
    ids_shape.d[1] = s.length;
    nvinfer1::Dims pos_shape;
    pos_shape.nbDims = 1;
    pos_shape.d[0] = 1;
    nvinfer1::Dims state_shape;
    state_shape.nbDims = 4;
    state_shape.d[0] = 1;
    for (int k = 0; k < 3; ++k) state_shape.d[k + 1] = m.state_shape[static_cast<size_t>(k)];
    auto input = [&](const std::string& name, const nvinfer1::Dims& d, void* p) {
        if (!ctx->setInputShape(name.c_str(), d) || !ctx->setTensorAddress(name.c_str(), p))
            fail(DJ_ERR_BACKEND, "TensorRT refused the shape or address of " + name);
    };
    input("input_ids", ids_shape, s.ids);
    input("attention_mask", ids_shape, s.mask);
    input("past_position", pos_shape, position_);
    for (int32_t i = 0; i < m.num_layers; ++i) {
        input("past_state." + std::to_string(i), state_shape, states_[src][static_cast<size_t>(i)]);
        std::string out = "present_state." + std::to_string(i);
        if (!ctx->setTensorAddress(out.c_str(), states_[1 - src][static_cast<size_t>(i)]))
            fail(DJ_ERR_BACKEND, "TensorRT refused the address of " + out);
    }
    if (!ctx->setTensorAddress("logits", s.logits)) fail(DJ_ERR_BACKEND, "TensorRT refused the address of logits");
    return ctx;
}

void TrtLane::step(const int64_t* ids, const int64_t* mask, int32_t length, float* logits) {
    const Cuda& c = g_.cuda_;
    const Manifest& m = g_.m_;
    Slot* s = nullptr;
    for (auto& slot : slots_)
        if (slot.length == length) s = &slot;
    if (!s) fail(DJ_ERR_INTERNAL, "step length " + std::to_string(length) + " has no buffers");
    nvinfer1::IExecutionContext* ctx = context(*s, current_);
    size_t n = static_cast<size_t>(length) * 8;
    c.check(c.memcpy_async(s->ids, ids, n, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    c.check(c.memcpy_async(s->mask, mask, n, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    c.check(c.memcpy_async(position_, &position_host_, 8, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    if (!ctx->enqueueV3(stream_)) fail(DJ_ERR_BACKEND, "TensorRT enqueueV3 failed (" + g_.logger_.last + ")");
    size_t elem = m.logits_dtype == "float16" ? 2 : 4;
    size_t row = static_cast<size_t>(m.vocab_size) * elem;
    const uint8_t* last = static_cast<const uint8_t*>(s->logits) + static_cast<size_t>(s->out_len - 1) * row;
    c.check(c.memcpy_async(host_logits_.data(), last, row, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    c.check(c.stream_sync(stream_), "TensorRT step");
    current_ = 1 - current_;
    for (int32_t i = 0; i < length; ++i) position_host_ += mask[i];
    if (elem == 2) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(host_logits_.data());
        for (int32_t i = 0; i < m.vocab_size; ++i) logits[i] = half_to_float(h[i]);
    } else {
        std::memcpy(logits, host_logits_.data(), row);
    }
}

void TrtLane::read_state(std::vector<std::vector<float>>& layers) {
    const Cuda& c = g_.cuda_;
    size_t floats = g_.m_.state_floats();
    layers.assign(states_[current_].size(), std::vector<float>(floats));
    for (size_t i = 0; i < layers.size(); ++i)
        c.check(c.memcpy_async(layers[i].data(), states_[current_][i], floats * 4, cudaMemcpyDeviceToHost, stream_),
                "cudaMemcpyAsync");
    c.check(c.stream_sync(stream_), "cudaStreamSynchronize");
}

void TrtLane::write_state(const std::vector<std::vector<float>>* layers, int64_t position) {
    const Cuda& c = g_.cuda_;
    size_t bytes = g_.m_.state_floats() * 4;
    for (size_t i = 0; i < states_[current_].size(); ++i) {
        if (layers)
            c.check(c.memcpy_async(states_[current_][i], (*layers)[i].data(), bytes, cudaMemcpyHostToDevice, stream_),
                    "cudaMemcpyAsync");
        else
            c.check(c.memset_async(states_[current_][i], 0, bytes, stream_), "cudaMemsetAsync");
    }
    c.check(c.stream_sync(stream_), "cudaStreamSynchronize");
    position_host_ = position;
}

}  // namespace

std::unique_ptr<Graph> open_trt_graph(const Manifest& m, const BackendOptions& o) {
    return std::make_unique<TrtGraph>(m, o);
}

}  // namespace dj

#endif
