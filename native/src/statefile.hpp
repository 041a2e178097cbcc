// Internal: the state file (docs/state-format.md), byte-compatible with dijiang_deploy/contract/statefile.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "json.hpp"
#include "manifest.hpp"

namespace dj {

struct SequenceState {
    ModelIdentity model;
    std::vector<std::vector<float>> layers;  // per layer H*d*d
    std::vector<int32_t> tokens;
    bool has_logits = false;
    std::vector<float> logits;
    bool has_rng = false;
    uint64_t rng_state = 0;
    std::string created_by;
    json::Value extra = json::Value::object();

    std::vector<uint8_t> to_bytes() const;
    // Throws Error(DJ_ERR_STATE_FILE) naming `source` for every defect the
    // Python reader refuses; `expect` (may be null) must be the same model.
    static SequenceState from_bytes(const uint8_t* data, size_t size, const ModelIdentity* expect,
                                    const std::string& source);
    static SequenceState load(const std::string& path, const ModelIdentity* expect);
    void save(const std::string& path) const;
};

void check_same_model(const ModelIdentity& got, const ModelIdentity& want, const std::string& source);

}  // namespace dj
