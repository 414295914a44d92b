/* Unit tests for common/util.c: boolean and integer parsing as oslo.config accepts them, and
 * list splitting. */

#include <errno.h>
#include <stdbool.h>

#include "cleanup.h"
#include "test.h"
#include "util.h"

int
main(void)
{
    static const struct {
        const char *name, *in;
        int ret;
        bool val;
    } bools[] = {
        {"true", "true", 0, true},   {"True", "True", 0, true},  {"YES", "YES", 0, true},
        {"on", "on", 0, true},       {"1", "1", 0, true},        {"false", "false", 0, false},
        {"no", "no", 0, false},      {"Off", "Off", 0, false},   {"0", "0", 0, false},
        {"empty", "", -EINVAL, false}, {"maybe", "maybe", -EINVAL, false},
        {"2", "2", -EINVAL, false},  {"truex", "truex", -EINVAL, false},
    };
    for (size_t i = 0; i < ELEMENTSOF(bools); i++) {
        bool b = !bools[i].val;
        test_begin(bools[i].name);
        int r = util_parse_bool(bools[i].in, &b);
        CHECK(r == bools[i].ret, "ret %d, expected %d", r, bools[i].ret);
        if (r == 0)
            CHECK(b == bools[i].val, "value %d", b);
        test_end();
    }

    static const struct {
        const char *name, *in;
        long min, max;
        int ret;
        long val;
    } longs[] = {
        {"plain", "42", 0, 100, 0, 42},        {"spaces", "  7 ", 0, 100, 0, 7},
        {"negative", "-3", -5, 5, 0, -3},      {"below min", "-1", 0, 5, -ERANGE, 0},
        {"above max", "6", 0, 5, -ERANGE, 0},  {"junk", "5x", 0, 100, -EINVAL, 0},
        {"empty", "", 0, 100, -EINVAL, 0},     {"overflow", "99999999999999999999", 0, 5, -ERANGE, 0},
        {"float", "1.5", 0, 100, -EINVAL, 0},
    };
    for (size_t i = 0; i < ELEMENTSOF(longs); i++) {
        long v = -12345;
        test_begin(longs[i].name);
        int r = util_parse_long(longs[i].in, longs[i].min, longs[i].max, &v);
        CHECK(r == longs[i].ret, "ret %d, expected %d", r, longs[i].ret);
        if (r == 0)
            CHECK(v == longs[i].val, "value %ld", v);
        else
            CHECK(v == -12345, "output written on failure");
        test_end();
    }

    static const struct {
        const char *name, *in;
        const char *out[5];
    } splits[] = {
        {"one", "a", {"a", NULL}},
        {"trim", " a , b ,c ", {"a", "b", "c", NULL}},
        {"empties dropped", ",a,,b,", {"a", "b", NULL}},
        {"empty", "", {NULL}},
    };
    for (size_t i = 0; i < ELEMENTSOF(splits); i++) {
        _cleanup_(util_strv_freep) char **v = NULL;
        test_begin(splits[i].name);
        CHECK(util_split(splits[i].in, ',', &v) == 0, "split failed");
        size_t n = 0;
        while (splits[i].out[n])
            n++;
        CHECK(util_strv_length(v) == n, "length %zu, expected %zu", util_strv_length(v), n);
        for (size_t k = 0; k < n && k < util_strv_length(v); k++)
            CHECK_STREQ(v[k], splits[i].out[k]);
        test_end();
    }

    test_begin("strlcpy truncates");
    char buf[4];
    CHECK(util_strlcpy(buf, "abcdef", sizeof(buf)) == 6, "return value");
    CHECK_STREQ(buf, "abc");
    test_end();

    return test_done();
}
