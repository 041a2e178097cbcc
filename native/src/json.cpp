#include "json.hpp"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include "common.hpp"

namespace dj {
namespace json {

Value Value::boolean(bool b) {
    Value v;
    v.type_ = Type::Bool;
    v.b_ = b;
    return v;
}
Value Value::number(double d) {
    Value v;
    v.type_ = Type::Number;
    v.d_ = d;
    return v;
}
Value Value::integer(int64_t i) {
    Value v;
    v.type_ = Type::Number;
    v.d_ = static_cast<double>(i);
    v.int_kind_ = 1;
    v.i_ = i;
    return v;
}
Value Value::uinteger(uint64_t u) {
    if (u <= static_cast<uint64_t>(INT64_MAX)) return integer(static_cast<int64_t>(u));
    Value v;
    v.type_ = Type::Number;
    v.d_ = static_cast<double>(u);
    v.int_kind_ = 2;
    v.u_ = u;
    return v;
}
Value Value::string(std::string s) {
    Value v;
    v.type_ = Type::String;
    v.s_ = std::move(s);
    return v;
}
Value Value::array() {
    Value v;
    v.type_ = Type::Array;
    return v;
}
Value Value::object() {
    Value v;
    v.type_ = Type::Object;
    return v;
}

const Value* Value::find(const std::string& key) const {
    for (auto it = members_.rbegin(); it != members_.rend(); ++it)
        if (it->first == key) return &it->second;
    return nullptr;
}

void Value::set(const std::string& key, Value v) {
    for (auto& m : members_)
        if (m.first == key) {
            m.second = std::move(v);
            return;
        }
    members_.emplace_back(key, std::move(v));
}

namespace {

class Parser {
public:
    explicit Parser(const std::string& t) : t_(t) {}

    Value document() {
        space();
        Value v = value(0);
        space();
        if (p_ != t_.size()) error("unexpected text after the value");
        return v;
    }

private:
    const std::string& t_;
    size_t p_ = 0;

    [[noreturn]] void error(const std::string& what) const {
        size_t line = 1, col = 1;
        for (size_t i = 0; i < p_ && i < t_.size(); ++i) {
            if (t_[i] == '\n') {
                ++line;
                col = 1;
            } else {
                ++col;
            }
        }
        throw std::runtime_error("line " + std::to_string(line) + " column " + std::to_string(col) + ": " + what);
    }

    void space() {
        while (p_ < t_.size() && (t_[p_] == ' ' || t_[p_] == '\t' || t_[p_] == '\n' || t_[p_] == '\r')) ++p_;
    }

    bool literal(const char* word) {
        size_t n = std::char_traits<char>::length(word);
        if (t_.compare(p_, n, word) == 0) {
            p_ += n;
            return true;
        }
        return false;
    }

    Value value(int depth) {
        if (depth > 512) error("nested too deeply");
        if (p_ >= t_.size()) error("unexpected end of input");
        char c = t_[p_];
        if (c == '{') return object(depth);
        if (c == '[') return array(depth);
        if (c == '"') return Value::string(string());
        if (c == 't' && literal("true")) return Value::boolean(true);
        if (c == 'f' && literal("false")) return Value::boolean(false);
        if (c == 'n' && literal("null")) return Value::null();
        if (c == '-' || (c >= '0' && c <= '9')) return number();
        // Python writes NaN and Infinity for non-finite floats; accept them.
        if (literal("NaN")) return Value::number(std::nan(""));
        if (literal("Infinity")) return Value::number(INFINITY);
        if (literal("-Infinity")) return Value::number(-INFINITY);
        error(std::string("unexpected character '") + c + "'");
    }

    Value object(int depth) {
        ++p_;
        Value v = Value::object();
        space();
        if (p_ < t_.size() && t_[p_] == '}') {
            ++p_;
            return v;
        }
        for (;;) {
            space();
            if (p_ >= t_.size() || t_[p_] != '"') error("expected a member name");
            std::string key = string();
            space();
            if (p_ >= t_.size() || t_[p_] != ':') error("expected ':'");
            ++p_;
            space();
            Value item = value(depth + 1);
            v.append_member(std::move(key), std::move(item));
            space();
            if (p_ < t_.size() && t_[p_] == ',') {
                ++p_;
                continue;
            }
            if (p_ < t_.size() && t_[p_] == '}') {
                ++p_;
                return v;
            }
            error("expected ',' or '}'");
        }
    }

    Value array(int depth) {
        ++p_;
        Value v = Value::array();
        space();
        if (p_ < t_.size() && t_[p_] == ']') {
            ++p_;
            return v;
        }
        for (;;) {
            space();
            v.push(value(depth + 1));
            space();
            if (p_ < t_.size() && t_[p_] == ',') {
                ++p_;
                continue;
            }
            if (p_ < t_.size() && t_[p_] == ']') {
                ++p_;
                return v;
            }
            error("expected ',' or ']'");
        }
    }

    unsigned hex4() {
        if (p_ + 4 > t_.size()) error("truncated \\u escape");
        unsigned u = 0;
        for (int k = 0; k < 4; ++k) {
            char c = t_[p_++];
            u <<= 4;
            if (c >= '0' && c <= '9') u |= static_cast<unsigned>(c - '0');
            else if (c >= 'a' && c <= 'f') u |= static_cast<unsigned>(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') u |= static_cast<unsigned>(c - 'A' + 10);
            else error("bad \\u escape");
        }
        return u;
    }

    std::string string() {
        ++p_;  // opening quote
        std::string out;
        for (;;) {
            if (p_ >= t_.size()) error("unterminated string");
            char c = t_[p_];
            if (c == '"') {
                ++p_;
                return out;
            }
            if (static_cast<unsigned char>(c) < 0x20) error("control character in a string");
            if (c != '\\') {
                // Copy a run of plain bytes at once (tokenizer files are mostly this).
                size_t start = p_;
                while (p_ < t_.size() && t_[p_] != '"' && t_[p_] != '\\' && static_cast<unsigned char>(t_[p_]) >= 0x20)
                    ++p_;
                out.append(t_, start, p_ - start);
                continue;
            }
            ++p_;
            if (p_ >= t_.size()) error("unterminated escape");
            char e = t_[p_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned u = hex4();
                    if (u >= 0xD800 && u <= 0xDBFF && p_ + 6 <= t_.size() && t_[p_] == '\\' && t_[p_ + 1] == 'u') {
                        size_t save = p_;
                        p_ += 2;
                        unsigned lo = hex4();
                        if (lo >= 0xDC00 && lo <= 0xDFFF) {
                            append_utf8(out, 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00));
                            break;
                        }
                        p_ = save;
                    }
                    // A lone surrogate has no UTF-8 form.
                    append_utf8(out, (u >= 0xD800 && u <= 0xDFFF) ? 0xFFFD : u);
                    break;
                }
                default: error(std::string("bad escape '\\") + e + "'");
            }
        }
    }

    Value number() {
        size_t start = p_;
        bool integral = true;
        if (t_[p_] == '-') ++p_;
        if (p_ >= t_.size() || !(t_[p_] >= '0' && t_[p_] <= '9')) error("bad number");
        while (p_ < t_.size() && t_[p_] >= '0' && t_[p_] <= '9') ++p_;
        if (p_ < t_.size() && t_[p_] == '.') {
            integral = false;
            ++p_;
            if (p_ >= t_.size() || !(t_[p_] >= '0' && t_[p_] <= '9')) error("bad number");
            while (p_ < t_.size() && t_[p_] >= '0' && t_[p_] <= '9') ++p_;
        }
        if (p_ < t_.size() && (t_[p_] == 'e' || t_[p_] == 'E')) {
            integral = false;
            ++p_;
            if (p_ < t_.size() && (t_[p_] == '+' || t_[p_] == '-')) ++p_;
            if (p_ >= t_.size() || !(t_[p_] >= '0' && t_[p_] <= '9')) error("bad number");
            while (p_ < t_.size() && t_[p_] >= '0' && t_[p_] <= '9') ++p_;
        }
        std::string text = t_.substr(start, p_ - start);
        if (integral) {
            errno = 0;
            if (text[0] == '-') {
                long long v = std::strtoll(text.c_str(), nullptr, 10);
                if (errno == 0) return Value::integer(v);
            } else {
                unsigned long long v = std::strtoull(text.c_str(), nullptr, 10);
                if (errno == 0) return Value::uinteger(v);
            }
        }
        return Value::number(std::strtod(text.c_str(), nullptr));
    }
};

void dump_into(std::string& out, const Value& v) {
    switch (v.type()) {
        case Type::Null: out += "null"; break;
        case Type::Bool: out += v.as_bool() ? "true" : "false"; break;
        case Type::Number: {
            if (v.is_int()) {
                out += std::to_string(v.as_int());
            } else if (v.is_uint()) {
                out += std::to_string(v.as_uint());
            } else {
                double d = v.as_double();
                if (std::isnan(d)) out += "NaN";
                else if (std::isinf(d)) out += d > 0 ? "Infinity" : "-Infinity";
                else {
                    // Shortest text that reads back to the same double.
                    char buf[40];
                    for (int prec = 1; prec <= 17; ++prec) {
                        std::snprintf(buf, sizeof buf, "%.*g", prec, d);
                        if (std::strtod(buf, nullptr) == d) break;
                    }
                    out += buf;
                }
            }
            break;
        }
        case Type::String: out += quote(v.as_string()); break;
        case Type::Array: {
            out += '[';
            for (size_t i = 0; i < v.size(); ++i) {
                if (i) out += ',';
                dump_into(out, v[i]);
            }
            out += ']';
            break;
        }
        case Type::Object: {
            out += '{';
            bool first = true;
            for (const auto& m : v.members()) {
                if (!first) out += ',';
                first = false;
                out += quote(m.first);
                out += ':';
                dump_into(out, m.second);
            }
            out += '}';
            break;
        }
    }
}

}  // namespace

Value parse(const std::string& text) { return Parser(text).document(); }

std::string quote(const std::string& s) {
    static const char* hex = "0123456789abcdef";
    std::string out = "\"";
    auto u16 = [&](unsigned u) {
        out += "\\u";
        out += hex[(u >> 12) & 15];
        out += hex[(u >> 8) & 15];
        out += hex[(u >> 4) & 15];
        out += hex[u & 15];
    };
    size_t i = 0;
    while (i < s.size()) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') {
            out += static_cast<char>(c);
            ++i;
            continue;
        }
        if (c == '"') out += "\\\"";
        else if (c == '\\') out += "\\\\";
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (c == '\b') out += "\\b";
        else if (c == '\f') out += "\\f";
        if (c < 0x80) {
            if (c < 0x20 && c != '\n' && c != '\r' && c != '\t' && c != '\b' && c != '\f') u16(c);
            else if (c == 0x7F) u16(c);
            ++i;
            continue;
        }
        int32_t cp = decode_utf8(s, i);
        if (cp < 0) cp = 0xFFFD;
        if (cp >= 0x10000) {
            unsigned v = static_cast<unsigned>(cp) - 0x10000;
            u16(0xD800 + (v >> 10));
            u16(0xDC00 + (v & 0x3FF));
        } else {
            u16(static_cast<unsigned>(cp));
        }
    }
    out += '"';
    return out;
}

std::string dump(const Value& v) {
    std::string out;
    dump_into(out, v);
    return out;
}

Value parse_file(const std::string& path, dj_status status) {
    std::string text = read_text_file(path);
    try {
        return parse(text);
    } catch (const Error&) {
        throw;
    } catch (const std::runtime_error& e) {
        fail(status, path + ": not valid JSON (" + e.what() + ")");
    }
}

}  // namespace json
}  // namespace dj
