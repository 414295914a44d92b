#pragma once
/* A minimal table-driven test harness: CHECK() records a failure with the current case name and
 * goes on; test_done() prints the "N passed, N failed" line ctest logs show and returns the exit
 * status. */

#include <stdio.h>
#include <string.h>

static const char *test_case = "?";
static int test_checks_failed;
static int test_cases_run;
static int test_cases_failed;
static int test_case_failed_flag;

static inline void
test_begin(const char *name)
{
    test_case = name;
    test_cases_run++;
    test_case_failed_flag = 0;
}

static inline void
test_end(void)
{
    if (test_case_failed_flag)
        test_cases_failed++;
}

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        if (!(cond)) {                                                            \
            fprintf(stderr, "FAIL %s:%d [%s]: ", __FILE__, __LINE__, test_case); \
            fprintf(stderr, __VA_ARGS__);                                         \
            fputc('\n', stderr);                                                  \
            test_checks_failed++;                                                 \
            test_case_failed_flag = 1;                                            \
        }                                                                         \
    } while (0)

#define CHECK_STREQ(a, b)                                                                    \
    do {                                                                                     \
        const char *ca_ = (a), *cb_ = (b);                                                   \
        CHECK(ca_ && cb_ && strcmp(ca_, cb_) == 0, "%s == \"%s\", expected \"%s\"", #a,      \
              ca_ ? ca_ : "(null)", cb_ ? cb_ : "(null)");                                   \
    } while (0)

static inline int
test_done(void)
{
    printf("%d passed, %d failed\n", test_cases_run - test_cases_failed, test_cases_failed);
    return test_checks_failed ? 1 : 0;
}
