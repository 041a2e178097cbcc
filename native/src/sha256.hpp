// Internal: SHA-256 (FIPS 180-4), for the state file's trailer.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace dj {

class Sha256 {
public:
    Sha256();
    void update(const void* data, size_t size);
    std::array<uint8_t, 32> digest();  // finishes; the object must not be updated after
    static std::array<uint8_t, 32> of(const void* data, size_t size);
    static std::string hex(const std::array<uint8_t, 32>& d);

private:
    void block(const uint8_t* p);
    uint32_t h_[8];
    uint8_t buf_[64];
    size_t used_ = 0;
    uint64_t total_ = 0;
};

}  // namespace dj
