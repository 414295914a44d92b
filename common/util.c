/* Parsing and string helpers shared by the config reader, the RPC layer and the backends.
 * libc only, no logging: callers turn a negative return into an agent_err with context. */

#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/types.h>

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

static int
random_bytes(unsigned char *b, size_t n)
{
    size_t got = 0;

    while (got < n) {
        ssize_t k = getrandom(b + got, n - got, 0);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        got += (size_t)k;
    }
    return 0;
}

static void
to_hex(const unsigned char *b, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[2 * n] = '\0';
}

int
util_random_hex(char *buf, size_t nbytes)
{
    unsigned char b[64];
    int r;

    if (nbytes > sizeof(b))
        return -EINVAL;
    r = random_bytes(b, nbytes);
    if (r < 0)
        return r;
    to_hex(b, nbytes, buf);
    return 0;
}

int
util_random_uuid(char *buf)
{
    unsigned char b[16];
    char hex[33];
    int r = random_bytes(b, sizeof(b));

    if (r < 0)
        return r;
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40); /* version 4 */
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    to_hex(b, sizeof(b), hex);
    snprintf(buf, 37, "%.8s-%.4s-%.4s-%.4s-%.12s", hex, hex + 8, hex + 12, hex + 16, hex + 20);
    return 0;
}
