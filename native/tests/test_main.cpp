#include <cstdio>
#include <cstring>

#include "check.hpp"

int g_failures = 0;

std::map<std::string, std::function<int(int, char**)>>& test_suites() {
    static std::map<std::string, std::function<int(int, char**)>> suites;
    return suites;
}

int main(int argc, char** argv) {
    if (argc < 2 || !test_suites().count(argv[1])) {
        std::fprintf(stderr, "usage: dj_tests SUITE [ARGS]; suites:");
        for (const auto& s : test_suites()) std::fprintf(stderr, " %s", s.first.c_str());
        std::fprintf(stderr, "\n");
        return 2;
    }
    int rc = test_suites()[argv[1]](argc - 1, argv + 1);
    if (rc != 0) return rc;  // 77: skipped
    if (g_failures) {
        std::fprintf(stderr, "%s: %d check(s) failed\n", argv[1], g_failures);
        return 1;
    }
    std::printf("%s: all checks passed\n", argv[1]);
    return 0;
}
