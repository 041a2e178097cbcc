#include "unicode.hpp"

#include <cstddef>

namespace dj {

namespace {
struct CodeRange {
    uint32_t lo, hi;
};
}  // namespace

#include "unicode_tables.inc"

namespace {
template <size_t N>
bool in(const CodeRange (&table)[N], uint32_t cp) {
    size_t lo = 0, hi = N;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < table[mid].lo) hi = mid;
        else if (cp > table[mid].hi) lo = mid + 1;
        else return true;
    }
    return false;
}
}  // namespace

bool is_letter(uint32_t cp) {
    if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in(kLetter, cp);
}

bool is_number(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in(kNumber, cp);
}

bool is_space(uint32_t cp) {
    if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
    return in(kSpace, cp);
}

const char* unicode_version() { return DJ_UNICODE_VERSION; }

}  // namespace dj
