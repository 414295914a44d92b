/* Parsing and string helpers shared by the config reader, the RPC layer and the backends.
 * libc only, no logging: callers turn a negative return into an agent_err with context. */

#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cleanup.h"

int
util_parse_bool(const char *s, bool *ret_b)
{
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};

    if (!s)
        return -EINVAL;
    for (size_t i = 0; i < ELEMENTSOF(yes); i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *ret_b = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *ret_b = false;
            return 0;
        }
    }
    return -EINVAL;
}

int
util_parse_long(const char *s, long min, long max, long *ret_v)
{
    char *end;
    long v;

    if (!s)
        return -EINVAL;
    while (isspace((unsigned char)*s))
        s++;
    if (!*s)
        return -EINVAL;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno == ERANGE)
        return -ERANGE;
    if (end == s)
        return -EINVAL;
    while (isspace((unsigned char)*end))
        end++;
    if (*end)
        return -EINVAL;
    if (v < min || v > max)
        return -ERANGE;
    *ret_v = v;
    return 0;
}

size_t
util_strlcpy(char *dst, const char *src, size_t size)
{
    size_t len = strlen(src);

    if (size > 0) {
        size_t n = len < size - 1 ? len : size - 1;
        memcpy(dst, src, n);
        dst[n] = '\0';
    }
    return len;
}

char *
util_strndup(const char *s, size_t n)
{
    char *d = malloc(n + 1);

    if (!d)
        return NULL;
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

size_t
util_strv_length(char *const *v)
{
    size_t n = 0;

    while (v && v[n])
        n++;
    return n;
}

void
util_strv_free(char **v)
{
    if (!v)
        return;
    for (size_t i = 0; v[i]; i++)
        free(v[i]);
    free(v);
}

int
util_strv_dup(char *const *v, char ***ret_v)
{
    size_t n = util_strv_length(v);
    char **d;

    if (!v) {
        *ret_v = NULL;
        return 0;
    }
    d = calloc(n + 1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        d[i] = strdup(v[i]);
        if (!d[i]) {
            util_strv_free(d);
            return -ENOMEM;
        }
    }
    *ret_v = d;
    return 0;
}

int
util_split(const char *s, char sep, char ***ret_v)
{
    size_t cap = 1, n = 0;
    char **v;

    for (const char *p = s; *p; p++)
        if (*p == sep)
            cap++;
    v = calloc(cap + 1, sizeof(*v));
    if (!v)
        return -ENOMEM;
    for (const char *p = s;;) {
        const char *end = strchr(p, sep);
        const char *stop = end ? end : p + strlen(p);
        const char *a = p, *b = stop;

        while (a < b && isspace((unsigned char)*a))
            a++;
        while (b > a && isspace((unsigned char)b[-1]))
            b--;
        if (b > a) {
            v[n] = util_strndup(a, (size_t)(b - a));
            if (!v[n]) {
                util_strv_free(v);
                return -ENOMEM;
            }
            n++;
        }
        if (!end)
            break;
        p = end + 1;
    }
    *ret_v = v;
    return 0;
}
