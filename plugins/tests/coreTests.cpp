/*
 * CPU tests of the plain C++ rules: attribute parsing, shape rules, chunk selection,
 * shared-memory budgets and workspace layout.
 */
#include "linearAttentionConfig.h"
#include "testHarness.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

using namespace dijiang;

namespace
{

struct Fields
{
    int32_t qHeads{9};
    int32_t kvHeads{9};
    float scale{1.F};
    std::string rule{"gated"};
    int32_t chunk{64};
    std::vector<FieldView> views;

    Fields& build(bool withChunk = true)
    {
        views.clear();
        views.push_back({"q_num_heads", &qHeads, FieldKind::kINT32, 1});
        views.push_back({"kv_num_heads", &kvHeads, FieldKind::kINT32, 1});
        views.push_back({"scale", &scale, FieldKind::kFLOAT32, 1});
        views.push_back({"update_rule", rule.c_str(), FieldKind::kCHAR, static_cast<int32_t>(rule.size())});
        if (withChunk)
        {
            views.push_back({"chunk_size", &chunk, FieldKind::kINT32, 1});
        }
        return *this;
    }

    bool parse(Attributes& attrs, std::string& error) const
    {
        return parseAttributes(views.data(), static_cast<int32_t>(views.size()), attrs, error);
    }
};

bool contains(std::string const& haystack, char const* needle)
{
    return haystack.find(needle) != std::string::npos;
}

void testParseValid()
{
    Fields f;
    Attributes attrs;
    std::string error;
    CHECK(f.build().parse(attrs, error));
    CHECK(error.empty());
    CHECK(attrs.numHeads == 9);
    CHECK(attrs.scale == 1.F);
    CHECK(attrs.rule == UpdateRule::kGATED);
    CHECK(attrs.chunkSize == 64);

    // chunk_size is optional; plugin_version / plugin_namespace are accepted and ignored.
    f.rule = "linear";
    f.build(false);
    char const version[] = "1";
    char const ns[] = "dijiang";
    f.views.push_back({"plugin_version", version, FieldKind::kCHAR, 2});
    f.views.push_back({"plugin_namespace", ns, FieldKind::kCHAR, 7});
    CHECK(f.parse(attrs, error));
    CHECK(attrs.rule == UpdateRule::kLINEAR);
    CHECK(attrs.chunkSize == kDefaultChunkSize);

    // Serialized strings carry their NUL; int64 / float64 producers are accepted too.
    char const ruleWithNul[] = "gated";
    int64_t heads64 = 4;
    double scale64 = 0.5;
    std::vector<FieldView> views{{"q_num_heads", &heads64, FieldKind::kINT64, 1},
        {"kv_num_heads", &heads64, FieldKind::kINT64, 1}, {"scale", &scale64, FieldKind::kFLOAT64, 1},
        {"update_rule", ruleWithNul, FieldKind::kCHAR, 6}};
    CHECK(parseAttributes(views.data(), 4, attrs, error));
    CHECK(attrs.numHeads == 4 && attrs.scale == 0.5F && attrs.rule == UpdateRule::kGATED);
    CHECK(attrs.workspaceBytes == kWorkspaceBytesUnset);

    // workspace_bytes: written by getFieldsToSerialize, int64 (or int32), zero allowed.
    int64_t workspace = int64_t{5} << 32;
    views.push_back({"workspace_bytes", &workspace, FieldKind::kINT64, 1});
    CHECK(parseAttributes(views.data(), 5, attrs, error));
    CHECK(attrs.workspaceBytes == (int64_t{5} << 32));
    workspace = 0;
    CHECK(parseAttributes(views.data(), 5, attrs, error) && attrs.workspaceBytes == 0);
}

void testParseInvalid()
{
    Attributes attrs;
    std::string error;
    {
        Fields f;
        f.kvHeads = 3;
        CHECK(!f.build().parse(attrs, error));
        CHECK(contains(error, "kv_num_heads"));
    }
    {
        Fields f;
        f.rule = "gated_delta";
        CHECK(!f.build().parse(attrs, error));
        CHECK(contains(error, "gated_delta"));
    }
    {
        Fields f;
        f.qHeads = 0;
        f.kvHeads = 0;
        CHECK(!f.build().parse(attrs, error));
        CHECK(contains(error, "q_num_heads"));
    }
    {
        Fields f;
        f.chunk = 0;
        CHECK(!f.build().parse(attrs, error));
        CHECK(contains(error, "chunk_size"));
    }
    {
        Fields f;
        f.scale = std::nanf("");
        CHECK(!f.build().parse(attrs, error));
        CHECK(contains(error, "scale"));
    }
    {
        Fields f;
        f.build();
        f.views.erase(f.views.begin() + 2); // scale
        CHECK(!f.parse(attrs, error));
        CHECK(contains(error, "missing") && contains(error, "scale"));
    }
    {
        Fields f;
        f.build();
        f.views[0].kind = FieldKind::kFLOAT32;
        CHECK(!f.parse(attrs, error));
        CHECK(contains(error, "q_num_heads") && contains(error, "integer"));
    }
    {
        Fields f;
        f.build();
        f.views.push_back(f.views[0]);
        CHECK(!f.parse(attrs, error));
        CHECK(contains(error, "more than once"));
    }
    {
        Fields f;
        int32_t one = 1;
        f.build();
        f.views.push_back({"is_causal", &one, FieldKind::kINT32, 1});
        CHECK(!f.parse(attrs, error));
        CHECK(contains(error, "is_causal"));
    }
    {
        Fields f;
        f.build();
        f.views[0].length = 2;
        CHECK(!f.parse(attrs, error));
    }
    {
        Fields f;
        int64_t negative = -1;
        f.build();
        f.views.push_back({"workspace_bytes", &negative, FieldKind::kINT64, 1});
        CHECK(!f.parse(attrs, error));
        CHECK(contains(error, "workspace_bytes"));
        f.views.back().kind = FieldKind::kFLOAT32;
        CHECK(!f.parse(attrs, error));
        CHECK(contains(error, "workspace_bytes") && contains(error, "integer"));
    }
    CHECK(!parseAttributes(nullptr, 1, attrs, error));
}

void testEffectiveScale()
{
    Attributes attrs;
    attrs.scale = 1.F;
    CHECK(effectiveScale(attrs, 64) == 1.F);
    attrs.scale = 0.F; // ONNX: 0 means 1/sqrt(dk)
    CHECK(std::fabs(effectiveScale(attrs, 64) - 0.125F) < 1e-7F);
}

Shape shape(std::initializer_list<int64_t> dims)
{
    Shape s;
    s.rank = static_cast<int32_t>(dims.size());
    int32_t i = 0;
    for (int64_t d : dims)
    {
        s.d[i++] = d;
    }
    return s;
}

void testShapes()
{
    Attributes attrs;
    attrs.numHeads = 9;
    attrs.rule = UpdateRule::kGATED;
    std::string error;
    Shape in[5] = {shape({3, 7, 576}), shape({3, 7, 576}), shape({3, 7, 576}), shape({3, 9, 64, 64}), shape({3, 7, 9})};
    CHECK(checkShapes(attrs, in, 5, error));
    Problem p;
    CHECK(deriveProblem(attrs, in, 5, p, error));
    CHECK(p.batch == 3 && p.seqLen == 7 && p.numHeads == 9 && p.headDimK == 64 && p.headDimV == 64);

    // Build-time descriptors: dynamic batch and sequence.
    Shape dyn[5] = {shape({-1, -1, 576}), shape({-1, -1, 576}), shape({-1, -1, 576}), shape({-1, 9, 64, 64}),
        shape({-1, -1, 9})};
    CHECK(checkShapes(attrs, dyn, 5, error));
    CHECK(!deriveProblem(attrs, dyn, 5, p, error));

    // dv != dk is allowed.
    Shape rect[5] = {shape({2, 5, 288}), shape({2, 5, 288}), shape({2, 5, 1152}), shape({2, 9, 32, 128}),
        shape({2, 5, 9})};
    CHECK(checkShapes(attrs, rect, 5, error));

    Shape bad[5] = {in[0], in[1], in[2], in[3], in[4]};
    bad[2] = shape({3, 7, 512});
    CHECK(!checkShapes(attrs, bad, 5, error) && contains(error, "value"));
    bad[2] = in[2];
    bad[1] = shape({3, 6, 576});
    CHECK(!checkShapes(attrs, bad, 5, error) && contains(error, "sequence"));
    bad[1] = in[1];
    bad[3] = shape({3, 8, 64, 64});
    CHECK(!checkShapes(attrs, bad, 5, error));
    bad[3] = shape({3, 9, 64});
    CHECK(!checkShapes(attrs, bad, 5, error) && contains(error, "rank"));
    bad[3] = in[3];
    bad[4] = shape({3, 7, 576});
    CHECK(!checkShapes(attrs, bad, 5, error) && contains(error, "decay"));
    bad[4] = in[4];
    bad[0] = shape({4, 7, 576});
    CHECK(!checkShapes(attrs, bad, 5, error) && contains(error, "batch"));

    // The linear rule takes no decay input.
    CHECK(!checkShapes(attrs, in, 4, error));
    attrs.rule = UpdateRule::kLINEAR;
    CHECK(checkShapes(attrs, in, 4, error));
    CHECK(!checkShapes(attrs, in, 5, error));
}

void testChunkSelection()
{
    CHECK(selectChunkSize(64, 64, 64) == 64);
    CHECK(selectChunkSize(64, 64, 1000) == 64);
    CHECK(selectChunkSize(64, 64, 40) == 32);
    CHECK(selectChunkSize(64, 64, 1) == 16);
    CHECK(selectChunkSize(32, 32, 64) == 64);
    CHECK(selectChunkSize(128, 128, 64) == 32); // 64-token chunk of dk=128 exceeds the budget
    CHECK(selectChunkSize(256, 256, 64) == 32);
    CHECK(selectChunkSize(100000, 64, 64) == 0);
    CHECK(selectChunkSize(0, 64, 64) == 0);
    for (int64_t dk : {16, 32, 64, 96, 128, 256, 512})
    {
        int32_t const c = selectChunkSize(dk, 64, 64);
        CHECK(c > 0);
        CHECK(prefillOutputSharedBytes(c, dk) <= kPortableSharedMemoryBudget);
        CHECK(prefillStateSharedBytes(c, dk) <= kPortableSharedMemoryBudget);
    }
}

void testWorkspace()
{
    WorkspaceLayout layout;
    Problem p{3, 513, 9, 64, 64};
    CHECK(prefillWorkspaceLayout(p, 64, layout));
    CHECK(layout.chunk == 64 && layout.numChunks == 9);
    size_t const states = size_t{3} * 9 * 9 * 64 * 64 * sizeof(float);
    CHECK(layout.stateBytes >= states && layout.stateBytes % kWorkspaceAlignment == 0);
    CHECK(layout.decayOffset == layout.stateBytes);
    CHECK(layout.totalBytes >= layout.decayOffset + size_t{3} * 9 * 9 * sizeof(float));

    // Monotone in batch and sequence length, so the profile maximum covers every shape.
    size_t previous = 0;
    for (int64_t t = 1; t <= 300; t += 7)
    {
        Problem q{2, t, 9, 64, 64};
        CHECK(prefillWorkspaceLayout(q, 64, layout));
        CHECK(layout.totalBytes >= previous);
        previous = layout.totalBytes;
    }
    Problem empty{0, 0, 9, 64, 64};
    CHECK(prefillWorkspaceLayout(empty, 64, layout) && layout.totalBytes == 0);

    Problem huge{int64_t{1} << 40, int64_t{1} << 40, 9, 64, 64};
    CHECK(!prefillWorkspaceLayout(huge, 64, layout));
    Problem unsupported{1, 8, 9, 100000, 64};
    CHECK(!prefillWorkspaceLayout(unsupported, 64, layout));
}

} // namespace

int main()
{
    testParseValid();
    testParseInvalid();
    testEffectiveScale();
    testShapes();
    testChunkSelection();
    testWorkspace();
    return TEST_MAIN_RESULT("dijiang_core_tests");
}
