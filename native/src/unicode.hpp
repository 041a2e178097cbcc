// Internal: the Unicode properties the GPT-2 / LLaMA-3 split patterns use.
#pragma once

#include <cstdint>

namespace dj {

bool is_letter(uint32_t cp);  // \p{L}
bool is_number(uint32_t cp);  // \p{N}
bool is_space(uint32_t cp);   // \s (Oniguruma, Unicode): White_Space
const char* unicode_version();

}  // namespace dj
