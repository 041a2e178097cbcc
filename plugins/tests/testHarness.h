/*
 * Minimal test harness: CHECK records a failure and keeps going so one run reports
 * every broken expectation; main() returns non-zero when any check failed.
 */
#ifndef DIJIANG_TEST_HARNESS_H
#define DIJIANG_TEST_HARNESS_H

#include <cstdio>

namespace dijiang_test
{
inline int& failures()
{
    static int count = 0;
    return count;
}
inline int& checks()
{
    static int count = 0;
    return count;
}
} // namespace dijiang_test

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        ++dijiang_test::checks();                                                                                      \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++dijiang_test::failures();                                                                                \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);                              \
        }                                                                                                              \
    } while (0)

#define TEST_MAIN_RESULT(name)                                                                                         \
    (std::printf("%s: %d checks, %d failed\n", name, dijiang_test::checks(), dijiang_test::failures()),                \
        dijiang_test::failures() == 0 && dijiang_test::checks() > 0 ? 0 : 1)

#endif // DIJIANG_TEST_HARNESS_H
