// dijiang.hpp compiles under -Wall -Wextra -Werror and turns statuses into exceptions.
#include <cstdio>
#include <cstring>

#include "dijiang.hpp"

int main() {
    int failures = 0;
    try {
        dijiang::Model m("/nonexistent/export-for-hpp-test");
        ++failures;
        std::fprintf(stderr, "opening a missing folder did not throw\n");
    } catch (const dijiang::Error& e) {
        if (e.status() != DJ_ERR_NOT_FOUND || !std::strstr(e.what(), "no such file or directory")) {
            ++failures;
            std::fprintf(stderr, "unexpected error %d: %s\n", static_cast<int>(e.status()), e.what());
        }
    }
    try {
        dijiang::check(DJ_OK);
    } catch (const dijiang::Error&) {
        ++failures;
    }
    if (failures) return 1;
    std::printf("cpp_wrapper: all checks passed\n");
    return 0;
}
