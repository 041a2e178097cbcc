// A minimal test harness: CHECK macros count failures; suites are looked up by name.
#pragma once

#include <cstdio>
#include <functional>
#include <map>
#include <string>

#include "common.hpp"

extern int g_failures;

std::map<std::string, std::function<int(int, char**)>>& test_suites();

struct SuiteRegistrar {
    SuiteRegistrar(const char* name, std::function<int(int, char**)> fn) { test_suites()[name] = std::move(fn); }
};

#define DJ_SUITE(name)                                                      \
    static int suite_##name(int argc, char** argv);                         \
    static SuiteRegistrar registrar_##name(#name, suite_##name);            \
    static int suite_##name([[maybe_unused]] int argc, [[maybe_unused]] char** argv)

#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            ++g_failures;                                                                 \
            std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
        }                                                                                 \
    } while (0)

#define CHECK_EQ(a, b)                                                                               \
    do {                                                                                             \
        auto va_ = (a);                                                                              \
        auto vb_ = (b);                                                                              \
        if (!(va_ == vb_)) {                                                                         \
            ++g_failures;                                                                            \
            std::fprintf(stderr, "%s:%d: CHECK_EQ(%s, %s) failed\n", __FILE__, __LINE__, #a, #b);    \
        }                                                                                            \
    } while (0)

// expr must throw dj::Error with `want_status` and a message containing `substr`.
#define CHECK_ERROR(expr, want_status, substr)                                                                   \
    do {                                                                                                    \
        try {                                                                                               \
            (void)(expr);                                                                                   \
            ++g_failures;                                                                                   \
            std::fprintf(stderr, "%s:%d: %s did not throw\n", __FILE__, __LINE__, #expr);                   \
        } catch (const dj::Error& e_) {                                                                     \
            if (e_.status() != (want_status) || std::string(e_.what()).find(substr) == std::string::npos) {      \
                ++g_failures;                                                                               \
                std::fprintf(stderr, "%s:%d: %s threw status %d '%s', expected %d with '%s'\n", __FILE__,   \
                             __LINE__, #expr, static_cast<int>(e_.status()), e_.what(),                     \
                             static_cast<int>(want_status), substr);                                             \
            }                                                                                               \
        }                                                                                                   \
    } while (0)
