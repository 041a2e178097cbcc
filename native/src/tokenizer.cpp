#include "tokenizer.hpp"

#include <algorithm>
#include <queue>

#include "common.hpp"
#include "unicode.hpp"

namespace dj {

namespace {

const char* kGpt2Pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const char* kLlama3Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

[[noreturn]] void unsupported(const std::string& source, const std::string& what) {
    fail(DJ_ERR_TOKENIZER, source + ": " + what + " (the native runtime implements byte-level BPE tokenizers only)");
}

std::string type_of(const json::Value* v) {
    if (!v || !v->is_object()) return "";
    const json::Value* t = v->find("type");
    return t && t->is_string() ? t->as_string() : "";
}

bool flag(const json::Value& obj, const char* key, bool def) {
    const json::Value* v = obj.find(key);
    return v && v->is_bool() ? v->as_bool() : def;
}

// Code points of a UTF-8 string with the byte offset of each (and one past the end).
struct Decoded {
    std::vector<uint32_t> cp;
    std::vector<size_t> at;
};

Decoded decode_all(const std::string& s) {
    Decoded d;
    size_t i = 0;
    while (i < s.size()) {
        d.at.push_back(i);
        int32_t c = decode_utf8(s, i);
        d.cp.push_back(c < 0 ? 0xFFFD : static_cast<uint32_t>(c));
    }
    d.at.push_back(s.size());
    return d;
}

inline bool is_other(uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }
inline bool is_newline(uint32_t c) { return c == '\r' || c == '\n'; }

// \s+(?!\S)|\s+ at a whitespace run starting at i: the run, less its last
// character when a non-space follows (that one goes with the next word).
size_t match_space_tail(const std::vector<uint32_t>& cp, size_t i) {
    size_t n = cp.size(), k = i;
    while (k < n && is_space(cp[k])) ++k;
    if (k == n) return n;
    return k - i >= 2 ? k - 1 : k;
}

// Each matcher returns the end of the match at i, the way a backtracking
// engine (Oniguruma, which Hugging Face tokenizers uses) tries the pattern's
// alternatives in order. Every position matches one of them, so the pieces
// tile the text.
size_t match_gpt2(const std::vector<uint32_t>& cp, size_t i) {
    size_t n = cp.size();
    uint32_t c = cp[i];
    if (c == '\'' && i + 1 < n) {
        uint32_t d = cp[i + 1];
        if (d == 's' || d == 't' || d == 'm' || d == 'd') return i + 2;
        if (i + 2 < n) {
            uint32_t e = cp[i + 2];
            if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l')) return i + 3;
        }
    }
    size_t j = (c == ' ' && i + 1 < n) ? i + 1 : i;
    for (auto cls : {is_letter, is_number, is_other}) {
        size_t s = (j != i && cls(cp[j])) ? j : i;
        if (cls(cp[s])) {
            while (s < n && cls(cp[s])) ++s;
            return s;
        }
    }
    return match_space_tail(cp, i);
}

bool fold_eq(uint32_t c, char lower) {
    if (c == static_cast<uint32_t>(lower) || c == static_cast<uint32_t>(lower - 32)) return true;
    // Unicode simple case folding: U+017F LATIN SMALL LETTER LONG S folds to 's'.
    return lower == 's' && c == 0x17F;
}

size_t match_llama3(const std::vector<uint32_t>& cp, size_t i) {
    size_t n = cp.size();
    uint32_t c = cp[i];
    if (c == '\'' && i + 1 < n) {
        uint32_t d = cp[i + 1];
        if (fold_eq(d, 's') || fold_eq(d, 't') || fold_eq(d, 'm') || fold_eq(d, 'd')) return i + 2;
        if (i + 2 < n) {
            uint32_t e = cp[i + 2];
            if ((fold_eq(d, 'r') && fold_eq(e, 'e')) || (fold_eq(d, 'v') && fold_eq(e, 'e')) ||
                (fold_eq(d, 'l') && fold_eq(e, 'l')))
                return i + 3;
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    {
        size_t s = i;
        if (!is_newline(c) && !is_letter(c) && !is_number(c) && i + 1 < n && is_letter(cp[i + 1])) s = i + 1;
        if (is_letter(cp[s])) {
            while (s < n && is_letter(cp[s])) ++s;
            return s;
        }
    }
    // \p{N}{1,3}
    if (is_number(c)) {
        size_t s = i;
        while (s < n && s - i < 3 && is_number(cp[s])) ++s;
        return s;
    }
    //  ?[^\s\p{L}\p{N}]+[\r\n]*
    {
        size_t s = (c == ' ' && i + 1 < n && is_other(cp[i + 1])) ? i + 1 : i;
        if (is_other(cp[s])) {
            while (s < n && is_other(cp[s])) ++s;
            while (s < n && is_newline(cp[s])) ++s;
            return s;
        }
    }
    // \s*[\r\n]+ : greedy \s* gives back up to the run's last line break.
    {
        size_t k = i;
        while (k < n && is_space(cp[k])) ++k;
        for (size_t p = k; p > i; --p)
            if (is_newline(cp[p - 1])) return p;
    }
    return match_space_tail(cp, i);
}

// Splits `piece` with a pattern; Isolated: matches and the gaps between them are pieces.
void split_into(const std::string& piece, const PreTokenizerStep& step, std::vector<std::string>& out) {
    if (step.pattern == SplitPattern::None) {
        out.push_back(piece);
        return;
    }
    Decoded d = decode_all(piece);
    size_t n = d.cp.size(), i = 0;
    if (step.pattern == SplitPattern::Digits) {
        while (i < n) {
            size_t j = i + 1;
            if (is_number(d.cp[i])) {
                if (!step.individual_digits)
                    while (j < n && is_number(d.cp[j])) ++j;
            } else {
                while (j < n && !is_number(d.cp[j])) ++j;
            }
            out.push_back(piece.substr(d.at[i], d.at[j] - d.at[i]));
            i = j;
        }
        return;
    }
    while (i < n) {
        size_t j = step.pattern == SplitPattern::Gpt2 ? match_gpt2(d.cp, i) : match_llama3(d.cp, i);
        if (j <= i) j = i + 1;  // cannot happen for these patterns; never loop forever
        out.push_back(piece.substr(d.at[i], d.at[j] - d.at[i]));
        i = j;
    }
}

PreTokenizerStep parse_step(const json::Value& p, const std::string& source) {
    std::string type = type_of(&p);
    PreTokenizerStep step;
    if (type == "ByteLevel") {
        step.byte_level = true;
        step.add_prefix_space = flag(p, "add_prefix_space", true);
        step.pattern = flag(p, "use_regex", true) ? SplitPattern::Gpt2 : SplitPattern::None;
    } else if (type == "Split") {
        const json::Value* pat = p.find("pattern");
        const json::Value* re = pat && pat->is_object() ? pat->find("Regex") : nullptr;
        if (!re || !re->is_string()) unsupported(source, "a Split pre-tokenizer without a Regex pattern");
        if (re->as_string() == kGpt2Pattern) step.pattern = SplitPattern::Gpt2;
        else if (re->as_string() == kLlama3Pattern) step.pattern = SplitPattern::Llama3;
        else unsupported(source, "a Split pattern other than GPT-2's or LLaMA-3's (" + re->as_string().substr(0, 60) + ")");
        const json::Value* behavior = p.find("behavior");
        if (!behavior || !behavior->is_string() || behavior->as_string() != "Isolated" || flag(p, "invert", false))
            unsupported(source, "a Split pre-tokenizer that is not behavior Isolated, invert false");
    } else if (type == "Digits") {
        step.pattern = SplitPattern::Digits;
        step.individual_digits = flag(p, "individual_digits", false);
    } else {
        unsupported(source, "pre-tokenizer " + (type.empty() ? std::string("(none)") : type));
    }
    return step;
}

}  // namespace

Tokenizer Tokenizer::from_file(const std::string& path) {
    std::string text = read_text_file(path);
    json::Value root;
    try {
        root = json::parse(text);
    } catch (const std::runtime_error& e) {
        fail(DJ_ERR_TOKENIZER, path + ": not valid JSON (" + e.what() + ")");
    }
    return from_json(root, path);
}

Tokenizer Tokenizer::from_json(const json::Value& root, const std::string& source) {
    if (!root.is_object()) fail(DJ_ERR_TOKENIZER, source + ": not a tokenizer.json object");
    Tokenizer t;
    const json::Value* model = root.find("model");
    std::string mtype = type_of(model);
    if (mtype.empty() && model && model->find("merges")) mtype = "BPE";  // old files omit the type
    if (mtype != "BPE") unsupported(source, "model type " + (mtype.empty() ? std::string("(none)") : mtype));
    auto nonempty_string = [&](const char* key) {
        const json::Value* v = model->find(key);
        return v && v->is_string() && !v->as_string().empty();
    };
    if (nonempty_string("continuing_subword_prefix") || nonempty_string("end_of_word_suffix"))
        unsupported(source, "BPE with a subword prefix or word suffix");
    if (flag(*model, "byte_fallback", false)) unsupported(source, "BPE with byte_fallback (SentencePiece style)");
    const json::Value* dropout = model->find("dropout");
    if (dropout && !dropout->is_null()) unsupported(source, "BPE dropout");
    t.ignore_merges_ = flag(*model, "ignore_merges", false);

    const json::Value* norm = root.find("normalizer");
    if (norm && !norm->is_null()) {
        const json::Value* list = norm->find("normalizers");
        if (!(type_of(norm) == "Sequence" && list && list->is_array() && list->size() == 0))
            unsupported(source, "normalizer " + type_of(norm));
    }
    const json::Value* pre = root.find("pre_tokenizer");
    if (!pre || pre->is_null()) unsupported(source, "no pre-tokenizer (not byte-level)");
    if (type_of(pre) == "Sequence") {
        const json::Value* list = pre->find("pretokenizers");
        if (!list || !list->is_array()) unsupported(source, "a malformed Sequence pre-tokenizer");
        for (const auto& p : list->items()) t.steps_.push_back(parse_step(p, source));
    } else {
        t.steps_.push_back(parse_step(*pre, source));
    }
    int byte_levels = 0;
    for (const auto& s : t.steps_) byte_levels += s.byte_level;
    if (byte_levels != 1 || !t.steps_.back().byte_level)
        unsupported(source, "a pre-tokenizer that does not end in one ByteLevel step");
    const json::Value* dec = root.find("decoder");
    if (type_of(dec) != "ByteLevel") unsupported(source, "decoder " + (type_of(dec).empty() ? "(none)" : type_of(dec)));

    // GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves,
    // the others take the code points from 256 up, in byte order.
    int next = 256;
    for (int b = 0; b < 256; ++b) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(next++);
        append_utf8(t.byte_to_char_[b], cp);
        t.char_to_byte_[cp] = static_cast<uint8_t>(b);
    }

    const json::Value* vocab = model->find("vocab");
    if (!vocab || !vocab->is_object()) fail(DJ_ERR_TOKENIZER, source + ": BPE model without a vocab object");
    int32_t max_id = -1;
    t.vocab_.reserve(vocab->members().size() * 2);
    for (const auto& m : vocab->members()) {
        if (!m.second.is_int() || m.second.as_int() < 0 || m.second.as_int() > INT32_MAX)
            fail(DJ_ERR_TOKENIZER, source + ": vocab entry " + json::quote(m.first) + " has no valid id");
        int32_t id = static_cast<int32_t>(m.second.as_int());
        t.vocab_[m.first] = id;
        max_id = std::max(max_id, id);
    }
    const json::Value* added = root.find("added_tokens");
    if (added && added->is_array()) {
        for (const auto& a : added->items()) {
            const json::Value* id = a.find("id");
            const json::Value* content = a.find("content");
            if (!id || !id->is_int() || !content || !content->is_string() || content->as_string().empty())
                fail(DJ_ERR_TOKENIZER, source + ": malformed added token");
            AddedToken at{static_cast<int32_t>(id->as_int()), content->as_string(), flag(a, "special", false),
                          flag(a, "lstrip", false), flag(a, "rstrip", false), flag(a, "single_word", false),
                          flag(a, "normalized", true)};
            t.added_tokens_.push_back(at);
            max_id = std::max(max_id, at.id);
        }
    }
    t.id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
    t.special_.assign(t.id_to_token_.size(), false);
    t.added_.assign(t.id_to_token_.size(), false);
    for (const auto& kv : t.vocab_) t.id_to_token_[static_cast<size_t>(kv.second)] = kv.first;
    for (const auto& a : t.added_tokens_) {
        t.id_to_token_[static_cast<size_t>(a.id)] = a.content;
        t.special_[static_cast<size_t>(a.id)] = a.special;
        t.added_[static_cast<size_t>(a.id)] = true;
    }
    const json::Value* unk = model->find("unk_token");
    if (unk && unk->is_string()) t.unk_id_ = t.token_id(unk->as_string());

    const json::Value* merges = model->find("merges");
    if (!merges || !merges->is_array()) fail(DJ_ERR_TOKENIZER, source + ": BPE model without a merges list");
    t.merges_.reserve(merges->size() * 2);
    uint64_t rank = 0;
    for (const auto& m : merges->items()) {
        std::string a, b;
        if (m.is_string()) {  // "a b" (tokenizers < 0.20)
            size_t sp = m.as_string().find(' ');
            if (sp == std::string::npos || m.as_string().find(' ', sp + 1) != std::string::npos)
                fail(DJ_ERR_TOKENIZER, source + ": malformed merge " + json::quote(m.as_string()));
            a = m.as_string().substr(0, sp);
            b = m.as_string().substr(sp + 1);
        } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
            a = m[0].as_string();
            b = m[1].as_string();
        } else {
            fail(DJ_ERR_TOKENIZER, source + ": malformed merge entry");
        }
        auto ia = t.vocab_.find(a), ib = t.vocab_.find(b), ic = t.vocab_.find(a + b);
        if (ia == t.vocab_.end() || ib == t.vocab_.end() || ic == t.vocab_.end())
            fail(DJ_ERR_TOKENIZER, source + ": merge " + json::quote(a + " " + b) + " uses a token outside the vocab");
        uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) | static_cast<uint32_t>(ib->second);
        // A repeated pair keeps its first (best) rank.
        t.merges_.emplace(key, (rank << 32) | static_cast<uint32_t>(ic->second));
        ++rank;
    }
    return t;
}

int32_t Tokenizer::token_id(const std::string& token) const {
    for (const auto& a : added_tokens_)
        if (a.content == token) return a.id;
    auto it = vocab_.find(token);
    return it == vocab_.end() ? -1 : it->second;
}

bool Tokenizer::is_special(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id) < special_.size() && special_[static_cast<size_t>(id)];
}

std::vector<std::string> Tokenizer::pre_tokenize(const std::string& segment) const {
    std::vector<std::string> pieces{segment};
    for (const auto& step : steps_) {
        std::vector<std::string> next;
        for (auto& p : pieces) {
            if (step.byte_level && step.add_prefix_space && (p.empty() || p[0] != ' ')) p = " " + p;
            split_into(p, step, next);
        }
        pieces.swap(next);
    }
    return pieces;
}

void Tokenizer::bpe(const std::string& word, std::vector<int32_t>& out) const {
    if (ignore_merges_) {
        auto it = vocab_.find(word);
        if (it != vocab_.end()) {
            out.push_back(it->second);
            return;
        }
    }
    struct Symbol {
        int32_t id;
        int prev, next;
        bool alive;
    };
    std::vector<Symbol> sym;
    size_t i = 0;
    while (i < word.size()) {
        size_t start = i;
        decode_utf8(word, i);
        auto it = vocab_.find(word.substr(start, i - start));
        int32_t id = it != vocab_.end() ? it->second : unk_id_;
        if (id < 0) continue;  // no unk token: the character is dropped, as Hugging Face does
        int k = static_cast<int>(sym.size());
        sym.push_back({id, k - 1, k + 1, true});
    }
    if (sym.empty()) return;
    sym.back().next = -1;
    // Lowest rank first, leftmost among equal ranks; stale entries are skipped
    // when popped (the pair no longer exists or no longer makes that token).
    struct Cand {
        uint32_t rank;
        int pos;
        int32_t new_id;
        bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> queue;
    auto lookup = [&](int32_t a, int32_t b, uint64_t& found) {
        auto it = merges_.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b));
        if (it == merges_.end()) return false;
        found = it->second;
        return true;
    };
    auto consider = [&](int pos) {
        int nx = sym[static_cast<size_t>(pos)].next;
        if (nx < 0) return;
        uint64_t m;
        if (lookup(sym[static_cast<size_t>(pos)].id, sym[static_cast<size_t>(nx)].id, m))
            queue.push({static_cast<uint32_t>(m >> 32), pos, static_cast<int32_t>(m & 0xFFFFFFFFu)});
    };
    for (int k = 0; k + 1 < static_cast<int>(sym.size()); ++k) consider(k);
    while (!queue.empty()) {
        Cand c = queue.top();
        queue.pop();
        Symbol& left = sym[static_cast<size_t>(c.pos)];
        if (!left.alive || left.next < 0) continue;
        Symbol& right = sym[static_cast<size_t>(left.next)];
        uint64_t m;
        if (!lookup(left.id, right.id, m) || static_cast<int32_t>(m & 0xFFFFFFFFu) != c.new_id) continue;
        left.id = c.new_id;
        right.alive = false;
        left.next = right.next;
        if (right.next >= 0) sym[static_cast<size_t>(right.next)].prev = c.pos;
        if (left.prev >= 0) consider(left.prev);
        consider(c.pos);
    }
    for (const auto& s : sym)
        if (s.alive) out.push_back(s.id);
}

void Tokenizer::encode_segment(const std::string& segment, std::vector<int32_t>& out) const {
    for (const auto& piece : pre_tokenize(segment)) {
        std::string mapped;
        mapped.reserve(piece.size() * 2);
        for (unsigned char b : piece) mapped += byte_to_char_[b];
        bpe(mapped, out);
    }
}

namespace {

bool word_char(uint32_t c) { return is_letter(c) || is_number(c) || c == '_'; }

// One pass of added-token splitting over `text`: leftmost-longest matches of
// `tokens` (Hugging Face's aho-corasick LeftmostLongest), with their
// lstrip/rstrip/single_word rules. Pieces are (token id or -1, text).
void split_added(const std::string& text, const std::vector<const AddedToken*>& tokens,
                 std::vector<std::pair<int32_t, std::string>>& out) {
    if (tokens.empty()) {
        out.emplace_back(-1, text);
        return;
    }
    size_t offset = 0, pos = 0, n = text.size();
    while (pos < n) {
        const AddedToken* best = nullptr;
        for (const AddedToken* t : tokens)
            if (t->content.size() <= n - pos && text.compare(pos, t->content.size(), t->content) == 0 &&
                (!best || t->content.size() > best->content.size()))
                best = t;
        if (!best) {
            ++pos;
            continue;
        }
        size_t start = pos, stop = pos + best->content.size();
        if (best->single_word) {
            bool before = false, after = false;
            if (start > 0) {
                size_t k = start - 1;
                while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
                size_t j = k;
                int32_t c = decode_utf8(text, j);
                before = c >= 0 && word_char(static_cast<uint32_t>(c));
            }
            if (stop < n) {
                size_t j = stop;
                int32_t c = decode_utf8(text, j);
                after = c >= 0 && word_char(static_cast<uint32_t>(c));
            }
            if (before || after) {
                ++pos;
                continue;
            }
        }
        if (best->lstrip) {
            while (start > offset) {
                size_t k = start - 1;
                while (k > offset && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
                size_t j = k;
                int32_t c = decode_utf8(text, j);
                if (c < 0 || !is_space(static_cast<uint32_t>(c))) break;
                start = k;
            }
        }
        if (best->rstrip) {
            while (stop < n) {
                size_t j = stop;
                int32_t c = decode_utf8(text, j);
                if (c < 0 || !is_space(static_cast<uint32_t>(c))) break;
                stop = j;
            }
        }
        if (start > offset) out.emplace_back(-1, text.substr(offset, start - offset));
        out.emplace_back(best->id, text.substr(start, stop - start));
        offset = pos = stop;
    }
    if (offset < n) out.emplace_back(-1, text.substr(offset));
}

}  // namespace

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
    // Tokens matched on the raw text first, then those matched after
    // normalization (there is no normalizer here, so on the same text), as
    // Hugging Face's AddedVocabulary does.
    std::vector<const AddedToken*> raw, normalized;
    for (const auto& a : added_tokens_) (a.normalized ? normalized : raw).push_back(&a);
    std::vector<std::pair<int32_t, std::string>> first, pieces;
    split_added(text, raw, first);
    for (auto& p : first) {
        if (p.first >= 0) pieces.push_back(std::move(p));
        else split_added(p.second, normalized, pieces);
    }
    std::vector<int32_t> out;
    for (const auto& p : pieces) {
        if (p.first >= 0) out.push_back(p.first);
        else if (!p.second.empty()) encode_segment(p.second, out);
    }
    return out;
}

std::string Tokenizer::token_bytes(int32_t id, bool skip_special) const {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return std::string();
    if (skip_special && special_[static_cast<size_t>(id)]) return std::string();
    const std::string& tok = id_to_token_[static_cast<size_t>(id)];
    // The byte-level decoder maps each character back to its byte; a token
    // with a character outside the map contributes its own UTF-8 bytes.
    std::string bytes;
    size_t i = 0;
    while (i < tok.size()) {
        int32_t c = decode_utf8(tok, i);
        auto it = c < 0 ? char_to_byte_.end() : char_to_byte_.find(static_cast<uint32_t>(c));
        if (it == char_to_byte_.end()) return tok;
        bytes += static_cast<char>(it->second);
    }
    return bytes;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
    std::string bytes;
    for (int32_t id : ids) bytes += token_bytes(id, skip_special);
    return utf8_lossy(bytes);
}

std::string StreamDecoder::push(int32_t id) {
    pending_ += tok_->token_bytes(id, true);
    size_t hold = utf8_incomplete_tail(pending_);
    std::string ready = pending_.substr(0, pending_.size() - hold);
    pending_.erase(0, pending_.size() - hold);
    return utf8_lossy(ready);
}

std::string StreamDecoder::flush() {
    std::string out = utf8_lossy(pending_);
    pending_.clear();
    return out;
}

}  // namespace dj
