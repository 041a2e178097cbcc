// Internal: what a session needs from a backend: a lane of one sequence's buffers, stepped a chunk at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace dj {

// One sequence's state and IO buffers, allocated once. Not thread-safe; each
// session owns one.
class Lane {
public:
    virtual ~Lane() = default;
    // Run one chunk: ids/mask [length] (left-padded, mask 0 on padding).
    // Writes the logits after the chunk's last position, float32 [vocab].
    virtual void step(const int64_t* ids, const int64_t* mask, int32_t length, float* logits) = 0;
    virtual void read_state(std::vector<std::vector<float>>& layers) = 0;
    // nullptr: zeros (a new sequence).
    virtual void write_state(const std::vector<std::vector<float>>* layers, int64_t position) = 0;
};

// An opened step graph, shared by every session of a model (thread-safe).
class Graph {
public:
    virtual ~Graph() = default;
    virtual std::unique_ptr<Lane> lane() = 0;
    // Chunk lengths its lanes step: the prefill plan is made of these.
    virtual std::vector<int32_t> lengths() const = 0;
    virtual const char* name() const = 0;
};

struct BackendOptions {
    std::string ort_library, trt_library, trt_plugin_library;
    int32_t threads = 0;
};

std::unique_ptr<Graph> open_ort_graph(const Manifest& m, const BackendOptions& o);
std::unique_ptr<Graph> open_trt_graph(const Manifest& m, const BackendOptions& o);

// IEEE half to float (fp16 exports give float16 logits).
float half_to_float(uint16_t h);

}  // namespace dj
