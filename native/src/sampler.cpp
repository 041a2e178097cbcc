#include "sampler.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "common.hpp"

namespace dj {

uint64_t fresh_seed() {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

void SamplingParams::validate() const {
    auto bad = [](const char* name, const char* rule, double v) {
        fail(DJ_ERR_INVALID_ARGUMENT, std::string(name) + " must be " + rule + ", got " + std::to_string(v));
    };
    for (double v : {temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty})
        if (!std::isfinite(v)) fail(DJ_ERR_INVALID_ARGUMENT, "sampling parameters must be finite numbers");
    if (temperature < 0) bad("temperature", ">= 0", temperature);
    if (top_k < 0) bad("top_k", ">= 0", top_k);
    if (!(top_p > 0 && top_p <= 1)) bad("top_p", "in (0, 1]", top_p);
    if (!(min_p >= 0 && min_p < 1)) bad("min_p", "in [0, 1)", min_p);
    if (repetition_penalty <= 0) bad("repetition_penalty", "> 0", repetition_penalty);
    if (presence_penalty < -2 || presence_penalty > 2) bad("presence_penalty", "in [-2, 2]", presence_penalty);
    if (frequency_penalty < -2 || frequency_penalty > 2) bad("frequency_penalty", "in [-2, 2]", frequency_penalty);
}

double pairwise_sum(const double* a, size_t n) {
    // numpy's pairwise_sum: blocks of up to 128 summed with 8 accumulators,
    // halves (multiples of 8) above that.
    if (n < 8) {
        double r = 0.0;
        for (size_t i = 0; i < n; ++i) r += a[i];
        return r;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        size_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + static_cast<size_t>(j)];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) res += a[i];
        return res;
    }
    size_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

int32_t sample_token(const float* logits, int32_t vocab, const SamplingParams& p, const std::vector<int32_t>* seen,
                     const std::vector<int32_t>* generated, SplitMix64& rng) {
    const size_t v = static_cast<size_t>(vocab);
    // Penalties in float32, with numpy's promotions: the repetition rule is a
    // float32 op, the OpenAI rules are computed in float64 and stored back.
    std::vector<float> adjusted;
    const float* x32 = logits;
    if (p.penalised() && seen && generated) {
        adjusted.assign(logits, logits + v);
        if (p.repetition_penalty != 1.0) {
            // numpy: float32 array / Python float is a float32 division.
            float rp = static_cast<float>(p.repetition_penalty);
            for (size_t i = 0; i < v; ++i)
                if ((*seen)[i] > 0) adjusted[i] = adjusted[i] > 0 ? adjusted[i] / rp : adjusted[i] * rp;
        }
        if (p.frequency_penalty != 0.0)
            for (size_t i = 0; i < v; ++i)
                adjusted[i] = static_cast<float>(static_cast<double>(adjusted[i]) -
                                                 p.frequency_penalty * (*generated)[i]);
        if (p.presence_penalty != 0.0)
            for (size_t i = 0; i < v; ++i)
                adjusted[i] = static_cast<float>(static_cast<double>(adjusted[i]) -
                                                 p.presence_penalty * ((*generated)[i] > 0 ? 1.0 : 0.0));
        x32 = adjusted.data();
    }
    if (p.greedy()) {
        size_t best = 0;
        for (size_t i = 1; i < v; ++i)
            if (x32[i] > x32[best]) best = i;
        return static_cast<int32_t>(best);
    }
    const double temp = p.temperature;
    std::vector<double> x(v);
    for (size_t i = 0; i < v; ++i) x[i] = static_cast<double>(x32[i]) / temp;
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < v) {
        std::vector<double> tmp(x);
        size_t at = v - static_cast<size_t>(p.top_k);
        std::nth_element(tmp.begin(), tmp.begin() + static_cast<std::ptrdiff_t>(at), tmp.end());
        double kth = tmp[at];
        for (double& e : x)
            if (!(e >= kth)) e = -std::numeric_limits<double>::infinity();
    }
    double mx = *std::max_element(x.begin(), x.end());
    std::vector<double> weights(v);
    for (size_t i = 0; i < v; ++i) weights[i] = std::exp(x[i] - mx);

    std::vector<size_t> cand;
    std::vector<double> w;
    if (p.top_p < 1.0) {
        const double top_p = p.top_p;
        double total = pairwise_sum(weights.data(), v);
        size_t alive = 0;
        for (double e : weights) alive += e != 0.0;
        size_t n = std::min<size_t>(alive, 64);
        // Most likely first, lower id first among equals; widened only when
        // the candidates hold less than top_p of the probability.
        auto before = [&](size_t a, size_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
        std::vector<size_t> order(v);
        for (size_t i = 0; i < v; ++i) order[i] = i;
        std::vector<double> cum;
        for (;;) {
            size_t take = std::min(n, v);
            std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(take), order.end(), before);
            cand.assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n < v ? n : v));
            cum.resize(cand.size());
            double run = 0.0;
            for (size_t i = 0; i < cand.size(); ++i) {
                run += weights[cand[i]];
                cum[i] = run / total;
            }
            if (cum.back() >= top_p || n >= alive) break;
            n = std::min(alive, 2 * n);
        }
        size_t cut = static_cast<size_t>(std::lower_bound(cum.begin(), cum.end(), top_p) - cum.begin()) + 1;
        cand.resize(std::min(cut, cand.size()));
    } else {
        for (size_t i = 0; i < v; ++i)
            if (weights[i] != 0.0) cand.push_back(i);
    }
    for (size_t c : cand) w.push_back(weights[c]);
    if (p.min_p > 0.0 && !w.empty()) {
        double wmax = *std::max_element(w.begin(), w.end());
        double floor = p.min_p * wmax;
        std::vector<size_t> kc;
        std::vector<double> kw;
        for (size_t i = 0; i < w.size(); ++i)
            if (w[i] >= floor) {
                kc.push_back(cand[i]);
                kw.push_back(w[i]);
            }
        cand.swap(kc);
        w.swap(kw);
    }
    if (cand.empty()) fail(DJ_ERR_INTERNAL, "no token left to sample from (non-finite logits?)");
    std::vector<double> cum(w.size());
    double run = 0.0;
    for (size_t i = 0; i < w.size(); ++i) cum[i] = run += w[i];
    double target = rng.uniform() * cum.back();
    size_t i = static_cast<size_t>(std::upper_bound(cum.begin(), cum.end(), target) - cum.begin());
    return static_cast<int32_t>(cand[std::min(i, cand.size() - 1)]);
}

std::vector<std::pair<int32_t, int32_t>> plan_chunks(int64_t n, std::vector<int32_t> lengths, int32_t overhead) {
    if (n < 0) fail(DJ_ERR_INVALID_ARGUMENT, "n must be >= 0");
    std::sort(lengths.begin(), lengths.end());
    lengths.erase(std::unique(lengths.begin(), lengths.end()), lengths.end());
    int32_t biggest = lengths.back();
    std::vector<std::pair<int32_t, int32_t>> out;
    while (n >= biggest) {
        out.emplace_back(biggest, biggest);
        n -= biggest;
    }
    if (!n) return out;
    // best[r]: (cost, first chunk of the cheapest plan for r tokens); the rest
    // of the plan is best[r - take]'s. Ties keep the first (shortest) length,
    // as Python's min() does.
    std::vector<int64_t> cost(static_cast<size_t>(n) + 1, 0);
    std::vector<std::pair<int32_t, int32_t>> first(static_cast<size_t>(n) + 1);
    for (int64_t r = 1; r <= n; ++r) {
        int64_t best = -1;
        for (int32_t len : lengths) {
            int32_t take = static_cast<int32_t>(std::min<int64_t>(len, r));
            int64_t c = cost[static_cast<size_t>(r - take)] + overhead + len;
            if (best < 0 || c < best) {
                best = c;
                first[static_cast<size_t>(r)] = {len, take};
            }
        }
        cost[static_cast<size_t>(r)] = best;
    }
    for (int64_t r = n; r > 0; r -= first[static_cast<size_t>(r)].second) out.push_back(first[static_cast<size_t>(r)]);
    return out;
}

}  // namespace dj
