// Internal: a small JSON reader/writer (RFC 8259) for manifests, tokenizers and state headers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dijiang.h"

namespace dj {
namespace json {

enum class Type { Null, Bool, Number, String, Array, Object };

// A parsed value. Objects keep their members in file order (a state header is
// written back in the order Python writes it). Integers are kept exactly
// (SplitMix64 states span all of uint64), beside their double value.
class Value {
public:
    Value() = default;
    static Value null() { return Value(); }
    static Value boolean(bool b);
    static Value number(double d);
    static Value integer(int64_t i);
    static Value uinteger(uint64_t u);
    static Value string(std::string s);
    static Value array();
    static Value object();

    Type type() const { return type_; }
    bool is_null() const { return type_ == Type::Null; }
    bool is_bool() const { return type_ == Type::Bool; }
    bool is_number() const { return type_ == Type::Number; }
    bool is_string() const { return type_ == Type::String; }
    bool is_array() const { return type_ == Type::Array; }
    bool is_object() const { return type_ == Type::Object; }
    // A number written without fraction or exponent that fits int64 / uint64.
    bool is_int() const { return type_ == Type::Number && int_kind_ == 1; }
    bool is_uint() const { return type_ == Type::Number && (int_kind_ == 2 || (int_kind_ == 1 && i_ >= 0)); }

    bool as_bool() const { return b_; }
    double as_double() const { return d_; }
    int64_t as_int() const { return i_; }
    uint64_t as_uint() const { return int_kind_ == 2 ? u_ : static_cast<uint64_t>(i_); }
    const std::string& as_string() const { return s_; }

    // Arrays.
    size_t size() const { return items_.size(); }
    const Value& operator[](size_t i) const { return items_[i]; }
    void push(Value v) { items_.push_back(std::move(v)); }
    const std::vector<Value>& items() const { return items_; }

    // Objects: find returns nullptr when absent.
    const Value* find(const std::string& key) const;
    void set(const std::string& key, Value v);
    // Appends without looking for an earlier member of that name (parsing:
    // find() searches from the end, so the last duplicate wins, as in Python).
    void append_member(std::string key, Value v) { members_.emplace_back(std::move(key), std::move(v)); }
    const std::vector<std::pair<std::string, Value>>& members() const { return members_; }

private:
    Type type_ = Type::Null;
    bool b_ = false;
    double d_ = 0.0;
    int int_kind_ = 0;  // 0: not an integer, 1: int64, 2: uint64 above int64's range
    int64_t i_ = 0;
    uint64_t u_ = 0;
    std::string s_;
    std::vector<Value> items_;
    std::vector<std::pair<std::string, Value>> members_;
};

// Throws std::runtime_error with "line L column C: what" on malformed input.
Value parse(const std::string& text);

// The JSON document in the file at `path`. A read error keeps its own status;
// text that is not JSON fails with `status` and the path, since which kind of
// folder the file belongs to decides what the caller should be told.
Value parse_file(const std::string& path, dj_status status);
// Compact, as Python's json.dumps(..., separators=(",", ":")) with
// ensure_ascii=True writes it: non-ASCII as \uXXXX (lowercase hex), so the
// header bytes equal the Python runtime's.
std::string dump(const Value& v);
// Python's json string escaping for one string (with the quotes).
std::string quote(const std::string& s);

}  // namespace json
}  // namespace dj
