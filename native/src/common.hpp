// Internal: the error type every layer throws and the C API turns into a status.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dijiang.h"

namespace dj {

// One-line message plus the C status it maps to. Internals throw it; only the
// C API boundary (api.cpp) catches, so no error path can lose its status.
class Error : public std::runtime_error {
public:
    Error(dj_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    dj_status status() const { return status_; }

private:
    dj_status status_;
};

[[noreturn]] inline void fail(dj_status status, const std::string& message) { throw Error(status, message); }

// Whole file into memory; DJ_ERR_NOT_FOUND when it does not exist, DJ_ERR_IO otherwise.
std::vector<uint8_t> read_file(const std::string& path);
std::string read_text_file(const std::string& path);
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
std::string join_path(const std::string& folder, const std::string& name);
// Write through a temporary sibling, fsync, rename, fsync the folder, so a
// failed save leaves the previous file as it was (what the Python runtime does).
void write_file_atomic(const std::string& path, const uint8_t* data, size_t size);

// UTF-8 helpers. decode_utf8 reads one code point at `i` (advancing it) and
// returns -1 for an invalid sequence, consuming its maximal invalid prefix.
int32_t decode_utf8(const std::string& s, size_t& i);
void append_utf8(std::string& out, uint32_t cp);
// Bytes to text the way Rust's String::from_utf8_lossy does: each maximal
// invalid subpart becomes one U+FFFD (Hugging Face's byte-level decoder uses it).
std::string utf8_lossy(const std::string& bytes);
// Length of the longest prefix of `s[from..]` that is a complete-or-truncated
// valid UTF-8 sequence tail: how many trailing bytes a stream must hold back.
size_t utf8_incomplete_tail(const std::string& s);

double now_seconds();

}  // namespace dj
