#include "linearAttentionConfig.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace dijiang
{
namespace
{

bool equals(char const* a, char const* b) noexcept
{
    return a != nullptr && b != nullptr && std::strcmp(a, b) == 0;
}

//! Reads an integer attribute; frontends hand ints over as int32 or int64.
bool readInt(FieldView const& f, int64_t& value, std::string& error)
{
    if (f.data == nullptr || f.length != 1)
    {
        error = std::string("field '") + f.name + "' must hold exactly one integer";
        return false;
    }
    switch (f.kind)
    {
    case FieldKind::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
    case FieldKind::kINT64: value = *static_cast<int64_t const*>(f.data); return true;
    default: error = std::string("field '") + f.name + "' must be an integer (int32 or int64)"; return false;
    }
}

bool readFloat(FieldView const& f, double& value, std::string& error)
{
    if (f.data == nullptr || f.length != 1)
    {
        error = std::string("field '") + f.name + "' must hold exactly one float";
        return false;
    }
    switch (f.kind)
    {
    case FieldKind::kFLOAT32: value = *static_cast<float const*>(f.data); return true;
    case FieldKind::kFLOAT64: value = *static_cast<double const*>(f.data); return true;
    default: error = std::string("field '") + f.name + "' must be a float (float32 or float64)"; return false;
    }
}

//! Strings arrive with or without their terminating NUL depending on the producer
//! (the ONNX parser passes size(), serialized fields include the NUL), so stop at either.
bool readString(FieldView const& f, std::string& value, std::string& error)
{
    if (f.kind != FieldKind::kCHAR || f.data == nullptr || f.length < 0)
    {
        error = std::string("field '") + f.name + "' must be a string";
        return false;
    }
    auto const* chars = static_cast<char const*>(f.data);
    size_t n = 0;
    while (n < static_cast<size_t>(f.length) && chars[n] != '\0')
    {
        ++n;
    }
    value.assign(chars, n);
    return true;
}

bool checkedMul(size_t a, size_t b, size_t& out) noexcept
{
    if (a != 0 && b > std::numeric_limits<size_t>::max() / a)
    {
        return false;
    }
    out = a * b;
    return true;
}

size_t roundUp(size_t value, size_t alignment) noexcept
{
    return (value + alignment - 1) / alignment * alignment;
}

std::string dimsToString(Shape const& s)
{
    std::string out = "[";
    for (int32_t i = 0; i < s.rank; ++i)
    {
        out += (i ? ", " : "") + std::to_string(s.d[i]);
    }
    return out + "]";
}

} // namespace

char const* toString(UpdateRule rule) noexcept
{
    return rule == UpdateRule::kGATED ? "gated" : "linear";
}

int32_t numInputs(UpdateRule rule) noexcept
{
    return rule == UpdateRule::kGATED ? 5 : 4;
}

bool parseAttributes(FieldView const* fields, int32_t nbFields, Attributes& attrs, std::string& error)
{
    error.clear();
    if (nbFields < 0 || (nbFields > 0 && fields == nullptr))
    {
        error = "null field collection";
        return false;
    }

    bool haveQHeads = false;
    bool haveKvHeads = false;
    bool haveScale = false;
    bool haveRule = false;
    bool haveChunk = false;
    bool haveWorkspace = false;
    int64_t qHeads = 0;
    int64_t kvHeads = 0;
    Attributes parsed;

    auto duplicate = [&](bool& seen, char const* name) {
        if (seen)
        {
            error = std::string("field '") + name + "' given more than once";
            return true;
        }
        seen = true;
        return false;
    };

    for (int32_t i = 0; i < nbFields; ++i)
    {
        FieldView const& f = fields[i];
        if (f.name == nullptr)
        {
            error = "field without a name";
            return false;
        }
        if (equals(f.name, "q_num_heads"))
        {
            if (duplicate(haveQHeads, f.name) || !readInt(f, qHeads, error))
            {
                return false;
            }
        }
        else if (equals(f.name, "kv_num_heads"))
        {
            if (duplicate(haveKvHeads, f.name) || !readInt(f, kvHeads, error))
            {
                return false;
            }
        }
        else if (equals(f.name, "scale"))
        {
            double scale = 0.0;
            if (duplicate(haveScale, f.name) || !readFloat(f, scale, error))
            {
                return false;
            }
            if (!std::isfinite(scale) || std::fabs(scale) > std::numeric_limits<float>::max())
            {
                error = "field 'scale' must be a finite float32 value";
                return false;
            }
            parsed.scale = static_cast<float>(scale);
        }
        else if (equals(f.name, "update_rule"))
        {
            std::string rule;
            if (duplicate(haveRule, f.name) || !readString(f, rule, error))
            {
                return false;
            }
            if (rule == "gated")
            {
                parsed.rule = UpdateRule::kGATED;
            }
            else if (rule == "linear")
            {
                parsed.rule = UpdateRule::kLINEAR;
            }
            else
            {
                error = "field 'update_rule' is '" + rule + "'; only 'gated' and 'linear' are supported";
                return false;
            }
        }
        else if (equals(f.name, "chunk_size"))
        {
            int64_t chunk = 0;
            if (duplicate(haveChunk, f.name) || !readInt(f, chunk, error))
            {
                return false;
            }
            if (chunk <= 0 || chunk > std::numeric_limits<int32_t>::max())
            {
                error = "field 'chunk_size' must be a positive int32, got " + std::to_string(chunk);
                return false;
            }
            parsed.chunkSize = static_cast<int32_t>(chunk);
        }
        else if (equals(f.name, "workspace_bytes"))
        {
            int64_t bytes = 0;
            if (duplicate(haveWorkspace, f.name) || !readInt(f, bytes, error))
            {
                return false;
            }
            if (bytes < 0)
            {
                error = "field 'workspace_bytes' must be >= 0, got " + std::to_string(bytes);
                return false;
            }
            parsed.workspaceBytes = bytes;
        }
        else if (equals(f.name, "plugin_version") || equals(f.name, "plugin_namespace"))
        {
            // Consumed by the ONNX parser to find this creator; they carry no semantics here.
        }
        else
        {
            // An attribute we do not understand could change the math; refuse rather than guess.
            error = std::string("unknown field '") + f.name + "'";
            return false;
        }
    }

    if (!haveQHeads || !haveKvHeads || !haveScale || !haveRule)
    {
        error = std::string("missing required field '")
            + (!haveQHeads ? "q_num_heads" : !haveKvHeads ? "kv_num_heads" : !haveScale ? "scale" : "update_rule")
            + "'";
        return false;
    }
    if (qHeads <= 0 || qHeads > std::numeric_limits<int32_t>::max())
    {
        error = "field 'q_num_heads' must be a positive int32, got " + std::to_string(qHeads);
        return false;
    }
    if (kvHeads != qHeads)
    {
        error = "field 'kv_num_heads' (" + std::to_string(kvHeads) + ") must equal 'q_num_heads' ("
            + std::to_string(qHeads) + "); grouped heads are not supported";
        return false;
    }
    parsed.numHeads = static_cast<int32_t>(qHeads);
    attrs = parsed;
    return true;
}

float effectiveScale(Attributes const& attrs, int64_t headDimK) noexcept
{
    if (attrs.scale == 0.F && headDimK > 0)
    {
        return static_cast<float>(1.0 / std::sqrt(static_cast<double>(headDimK)));
    }
    return attrs.scale;
}

bool checkShapes(Attributes const& attrs, Shape const* inputs, int32_t nbInputs, std::string& error)
{
    static char const* const kNames[] = {"query", "key", "value", "past_state", "decay"};
    static constexpr int32_t kRanks[] = {3, 3, 3, 4, 3};
    error.clear();
    int32_t const expected = numInputs(attrs.rule);
    if (nbInputs != expected || inputs == nullptr)
    {
        error = "update_rule '" + std::string(toString(attrs.rule)) + "' takes " + std::to_string(expected)
            + " inputs, got " + std::to_string(nbInputs);
        return false;
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (inputs[i].rank != kRanks[i])
        {
            error = std::string("input '") + kNames[i] + "' must have rank " + std::to_string(kRanks[i]) + ", got "
                + dimsToString(inputs[i]);
            return false;
        }
        for (int32_t d = 0; d < inputs[i].rank; ++d)
        {
            if (inputs[i].d[d] < -1)
            {
                error = std::string("input '") + kNames[i] + "' has invalid extents " + dimsToString(inputs[i]);
                return false;
            }
        }
    }

    // Each rule: (input a, dim a) must equal factor * (input b, dim b) when both are known.
    struct Rule
    {
        int32_t a, da, b, db;
        int64_t factor;
        char const* what;
    };
    int64_t const h = attrs.numHeads;
    Rule const rules[] = {
        {1, 0, 0, 0, 1, "batch"},
        {2, 0, 0, 0, 1, "batch"},
        {3, 0, 0, 0, 1, "batch"},
        {1, 1, 0, 1, 1, "sequence length"},
        {2, 1, 0, 1, 1, "sequence length"},
        {1, 2, 0, 2, 1, "packed key width"},
        {0, 2, 3, 2, h, "packed query width (q_num_heads * dk)"},
        {2, 2, 3, 3, h, "packed value width (q_num_heads * dv)"},
        {4, 0, 0, 0, 1, "batch"},
        {4, 1, 0, 1, 1, "sequence length"},
    };
    for (Rule const& r : rules)
    {
        if (r.a >= nbInputs || r.b >= nbInputs)
        {
            continue;
        }
        int64_t const va = inputs[r.a].d[r.da];
        int64_t const vb = inputs[r.b].d[r.db];
        if (va >= 0 && vb >= 0 && va != r.factor * vb)
        {
            error = std::string("inconsistent ") + r.what + ": " + kNames[r.a] + " " + dimsToString(inputs[r.a])
                + " vs " + kNames[r.b] + " " + dimsToString(inputs[r.b]);
            return false;
        }
    }
    if (inputs[3].d[1] >= 0 && inputs[3].d[1] != h)
    {
        error = "past_state " + dimsToString(inputs[3]) + " must have q_num_heads (" + std::to_string(h)
            + ") heads in dimension 1";
        return false;
    }
    if (nbInputs == 5 && inputs[4].d[2] >= 0 && inputs[4].d[2] != h)
    {
        error = "decay " + dimsToString(inputs[4]) + " must be [B, T, q_num_heads]; per-key-dimension decay is not "
                "supported";
        return false;
    }
    for (int32_t d = 2; d < 4; ++d)
    {
        if (inputs[3].d[d] == 0)
        {
            error = "past_state " + dimsToString(inputs[3]) + " must have non-zero head sizes";
            return false;
        }
    }
    return true;
}

bool deriveProblem(Attributes const& attrs, Shape const* inputs, int32_t nbInputs, Problem& problem, std::string& error)
{
    if (!checkShapes(attrs, inputs, nbInputs, error))
    {
        return false;
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        for (int32_t d = 0; d < inputs[i].rank; ++d)
        {
            if (inputs[i].d[d] < 0)
            {
                error = "input " + std::to_string(i) + " has unresolved extents " + dimsToString(inputs[i]);
                return false;
            }
        }
    }
    problem.batch = inputs[0].d[0];
    problem.seqLen = inputs[0].d[1];
    problem.numHeads = attrs.numHeads;
    problem.headDimK = inputs[3].d[2];
    problem.headDimV = inputs[3].d[3];
    return true;
}

size_t prefillStateSharedBytes(int32_t chunk, int64_t headDimK) noexcept
{
    auto const c = static_cast<size_t>(chunk);
    auto const dk = static_cast<size_t>(headDimK);
    return sizeof(float) * (c * dk + c * kPrefillTileV + c);
}

size_t prefillOutputSharedBytes(int32_t chunk, int64_t headDimK) noexcept
{
    auto const c = static_cast<size_t>(chunk);
    auto const dk = static_cast<size_t>(headDimK);
    // Q and K rows are padded by one float so that the 16 rows a half-warp reads together
    // fall into distinct banks; same for the score matrix.
    return sizeof(float)
        * (2 * c * (dk + 1) + c * kPrefillTileV + c * (c + 1) + static_cast<size_t>(kPrefillStageRows) * kPrefillTileV
            + c);
}

int32_t selectChunkSize(int64_t headDimK, int64_t headDimV, int32_t hint) noexcept
{
    if (headDimK <= 0 || headDimV <= 0 || headDimK > (int64_t{1} << 20))
    {
        return 0;
    }
    for (int32_t const c : kSupportedChunkSizes)
    {
        bool const withinHint = c <= hint || c == kSupportedChunkSizes[sizeof(kSupportedChunkSizes) / sizeof(int32_t) - 1];
        if (withinHint && prefillOutputSharedBytes(c, headDimK) <= kPortableSharedMemoryBudget
            && prefillStateSharedBytes(c, headDimK) <= kPortableSharedMemoryBudget)
        {
            return c;
        }
    }
    return 0;
}

bool prefillWorkspaceLayout(Problem const& p, int32_t chunkHint, WorkspaceLayout& layout) noexcept
{
    layout = WorkspaceLayout{};
    if (p.batch < 0 || p.seqLen < 0 || p.numHeads <= 0)
    {
        return false;
    }
    int32_t const chunk = selectChunkSize(p.headDimK, p.headDimV, chunkHint);
    if (chunk == 0)
    {
        return false;
    }
    int64_t const numChunks = (p.seqLen + chunk - 1) / chunk;
    size_t heads = 0;
    size_t slots = 0;
    size_t stateElems = 0;
    size_t stateBytes = 0;
    size_t decayBytes = 0;
    if (!checkedMul(static_cast<size_t>(p.batch), static_cast<size_t>(p.numHeads), heads)
        || !checkedMul(heads, static_cast<size_t>(numChunks), slots)
        || !checkedMul(static_cast<size_t>(p.headDimK), static_cast<size_t>(p.headDimV), stateElems)
        || !checkedMul(slots, stateElems, stateBytes) || !checkedMul(stateBytes, sizeof(float), stateBytes)
        || !checkedMul(slots, sizeof(float), decayBytes)
        || stateBytes > std::numeric_limits<size_t>::max() / 2 - decayBytes - 2 * kWorkspaceAlignment)
    {
        return false;
    }
    layout.chunk = chunk;
    layout.numChunks = numChunks;
    layout.stateBytes = roundUp(stateBytes, kWorkspaceAlignment);
    layout.decayOffset = layout.stateBytes;
    layout.totalBytes = layout.stateBytes + roundUp(decayBytes, kWorkspaceAlignment);
    return true;
}

} // namespace dijiang
