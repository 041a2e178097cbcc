// Internal: SplitMix64, token sampling and prefill chunk plans, as the Python runtime does them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace dj {

// Steele, Lea and Flood's SplitMix64: the whole generator is one 64-bit word,
// saved in state files, so a resumed session draws what it would have drawn.
struct SplitMix64 {
    uint64_t state;
    explicit SplitMix64(uint64_t seed = 0) : state(seed) {}
    uint64_t next_u64() {
        state += 0x9E3779B97F4A7C15ull;
        uint64_t z = state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }
};

uint64_t fresh_seed();

struct SamplingParams {
    // Doubles, as Python's floats are: the float64 steps then see the same values.
    double temperature = 0.0;
    int32_t top_k = 0;
    double top_p = 1.0;
    double min_p = 0.0;
    double repetition_penalty = 1.0;
    double presence_penalty = 0.0;
    double frequency_penalty = 0.0;

    // Throws Error(DJ_ERR_INVALID_ARGUMENT) naming the field, as SamplingParams does in Python.
    void validate() const;
    bool greedy() const { return temperature == 0.0; }
    bool penalised() const { return repetition_penalty != 1.0 || presence_penalty != 0.0 || frequency_penalty != 0.0; }
};

// TokenSampler of runtime/sampling.py. `seen` counts every token in the
// context, `generated` the tokens generated in this run (both may be empty
// when no penalty applies). Sampling draws one uniform from `rng`.
int32_t sample_token(const float* logits, int32_t vocab, const SamplingParams& p, const std::vector<int32_t>* seen,
                     const std::vector<int32_t>* generated, SplitMix64& rng);

// plan_chunks of runtime/chunks.py: (length, real tokens) chunks covering n
// tokens, the largest length while it fits, then the cheapest cover of the
// rest (same dynamic programme, same tie-breaking).
std::vector<std::pair<int32_t, int32_t>> plan_chunks(int64_t n, std::vector<int32_t> lengths, int32_t overhead = 8);

// numpy's pairwise summation of float64 (np.sum), so top-p cuts where Python's does.
double pairwise_sum(const double* a, size_t n);

}  // namespace dj
