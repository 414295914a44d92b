/* Notification builders: the bodies nova-compute (Zed) and oslo.messaging publish around an
 * instance snapshot, rebuilt in C from the request the agent received. Three layers:
 *
 *   1. A serializer that writes a jansson tree exactly as Python's json.dumps() does with its
 *      defaults (", "/": " separators, ensure_ascii with lower-case \uXXXX and surrogate pairs,
 *      DEL escaped, "/" not escaped, floats as repr(), objects in insertion order). jansson's own
 *      dumper differs on floats (%.17g: 0.1 → 0.10000000000000001), on the case of \u escapes and
 *      on DEL, so it is not used for bodies.
 *   2. Payload builders that follow nova's code field by field (nova/notifications/base.py
 *      info_from_instance, nova/notifications/objects/instance.py, nova/exception_wrapper.py),
 *      reading the Instance primitive of the cast and the worker's view of the current state.
 *   3. oslo.messaging's framing: the sanitised context (notifier._sanitize_context rebuilds a
 *      RequestContext from a few safe keys, so auth_token, service_catalog, remote_address and the
 *      original timestamp are gone), message_id/timestamp per notify call, a fresh _unique_id per
 *      published copy, one copy per driver and topic.
 * Where nova would consult its database for something the cast does not carry, the choice made is
 * documented at the spot. */

#include "notify.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "cleanup.h"
#include "doc.h"
#include "err.h"
#include "request.h"
#include "util.h"

/* ---- growable string buffer ------------------------------------------------------------- */

struct sbuf {
    char *p;
    size_t len, cap;
    bool oom; /* sticky: checked once when the buffer is taken */
};

static void
sb_free(struct sbuf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static bool
sb_reserve(struct sbuf *b, size_t extra)
{
    if (b->oom)
        return false;
    if (b->len + extra + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

static void
sb_putn(struct sbuf *b, const char *s, size_t n)
{
    if (!sb_reserve(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void
sb_puts(struct sbuf *b, const char *s)
{
    sb_putn(b, s, strlen(s));
}

static void
sb_putc(struct sbuf *b, char c)
{
    sb_putn(b, &c, 1);
}

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
sb_printf(struct sbuf *b, const char *fmt, ...)
{
    char small[128];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = true;
        return;
    }
    if ((size_t)n < sizeof(small)) {
        sb_putn(b, small, (size_t)n);
        return;
    }
    if (!sb_reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Hand out the buffer (NUL-terminated, never NULL on success) or NULL after an allocation
 * failure (the buffer is freed either way). */
static char *
sb_take(struct sbuf *b, size_t *ret_len)
{
    if (!b->oom && !b->p && sb_reserve(b, 0))
        b->p[0] = '\0';
    if (b->oom) {
        sb_free(b);
        return NULL;
    }
    if (ret_len)
        *ret_len = b->len;
    char *p = b->p;
    b->p = NULL;
    b->len = b->cap = 0;
    return p;
}

/* A jansson string from printf-style arguments; NULL on allocation failure. */
static json_t *jfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static json_t *
jfmt(const char *fmt, ...)
{
    char buf[256];
    va_list ap;

    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0)
        return NULL;
    if ((size_t)n < sizeof(buf))
        return json_string(buf);

    _cleanup_free_ char *p = malloc((size_t)n + 1);
    if (!p)
        return NULL;
    va_start(ap, fmt);
    vsnprintf(p, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return json_string(p);
}

/* ---- Python's json.dumps ---------------------------------------------------------------- */

/* Decode one UTF-8 sequence; an invalid byte decodes as itself (jansson strings are valid UTF-8,
 * so this only keeps the loop going on a programmer error). Returns the bytes consumed. */
static size_t
utf8_decode(const unsigned char *s, size_t n, uint32_t *ret_cp)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;

    if (c < 0x80) {
        *ret_cp = c;
        return 1;
    }
    if ((c & 0xe0) == 0xc0) {
        len = 2;
        cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3;
        cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
        len = 4;
        cp = c & 0x07;
    } else {
        *ret_cp = c;
        return 1;
    }
    if (len > n) {
        *ret_cp = c;
        return 1;
    }
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            *ret_cp = c;
            return 1;
        }
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    *ret_cp = cp;
    return len;
}

/* json.encoder.py_encode_basestring_ascii / c_encode_basestring_ascii. */
static void
py_dump_string(struct sbuf *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;

    sb_putc(b, '"');
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_decode(u + i, n - i, &cp);
        switch (cp) {
        case '"':
            sb_puts(b, "\\\"");
            continue;
        case '\\':
            sb_puts(b, "\\\\");
            continue;
        case '\n':
            sb_puts(b, "\\n");
            continue;
        case '\r':
            sb_puts(b, "\\r");
            continue;
        case '\t':
            sb_puts(b, "\\t");
            continue;
        case '\b':
            sb_puts(b, "\\b");
            continue;
        case '\f':
            sb_puts(b, "\\f");
            continue;
        default:
            break;
        }
        if (cp >= 0x20 && cp <= 0x7e)
            sb_putc(b, (char)cp);
        else if (cp < 0x10000)
            sb_printf(b, "\\u%04x", cp);
        else {
            cp -= 0x10000;
            sb_printf(b, "\\u%04x\\u%04x", 0xd800 | (cp >> 10), 0xdc00 | (cp & 0x3ff));
        }
    }
    sb_putc(b, '"');
}

/* float.__repr__: the shortest digit string that reads back as v, in positional notation when
 * the decimal exponent is in [-4, 16), else d[.ddd]e±XX; positional always has a '.'. */
static void
py_dump_float(struct sbuf *b, double v)
{
    char buf[40], digits[24];
    int prec, exp10;

    if (isnan(v)) {
        sb_puts(b, "NaN");
        return;
    }
    if (isinf(v)) {
        sb_puts(b, v < 0 ? "-Infinity" : "Infinity");
        return;
    }
    /* %.Ne is correctly rounded, so the first precision that round-trips is repr()'s digits. */
    for (prec = 0; prec < 17; prec++) {
        snprintf(buf, sizeof(buf), "%.*e", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    if (prec == 17)
        snprintf(buf, sizeof(buf), "%.*e", prec, v);

    /* buf is [-]d[.ddd]e±XX */
    const char *p = buf;
    bool neg = *p == '-';
    if (neg)
        p++;
    size_t nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p != '.')
            digits[nd++] = *p;
    digits[nd] = '\0';
    exp10 = (int)strtol(p + 1, NULL, 10);
    while (nd > 1 && digits[nd - 1] == '0')
        digits[--nd] = '\0';

    if (neg)
        sb_putc(b, '-');
    int decpt = exp10 + 1;
    if (decpt > -4 && decpt <= 16) {
        if (decpt <= 0) {
            sb_puts(b, "0.");
            for (int i = 0; i < -decpt; i++)
                sb_putc(b, '0');
            sb_puts(b, digits);
        } else if ((size_t)decpt >= nd) {
            sb_puts(b, digits);
            for (size_t i = nd; i < (size_t)decpt; i++)
                sb_putc(b, '0');
            sb_puts(b, ".0");
        } else {
            sb_putn(b, digits, (size_t)decpt);
            sb_putc(b, '.');
            sb_puts(b, digits + decpt);
        }
    } else {
        sb_putc(b, digits[0]);
        if (nd > 1) {
            sb_putc(b, '.');
            sb_puts(b, digits + 1);
        }
        sb_printf(b, "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
    }
}

static void
py_dump(struct sbuf *b, const json_t *j)
{
    /* jansson's iteration API takes non-const pointers; nothing is modified. */
    json_t *jm = (json_t *)j;
    const char *k;
    json_t *v;
    size_t i;
    bool first = true;

    switch (json_typeof(j)) {
    case JSON_OBJECT:
        sb_putc(b, '{');
        json_object_foreach (jm, k, v) {
            if (!first)
                sb_puts(b, ", ");
            first = false;
            py_dump_string(b, k, strlen(k));
            sb_puts(b, ": ");
            py_dump(b, v);
        }
        sb_putc(b, '}');
        break;
    case JSON_ARRAY:
        sb_putc(b, '[');
        json_array_foreach (jm, i, v) {
            if (i)
                sb_puts(b, ", ");
            py_dump(b, v);
        }
        sb_putc(b, ']');
        break;
    case JSON_STRING:
        py_dump_string(b, json_string_value(j), json_string_length(j));
        break;
    case JSON_INTEGER:
        sb_printf(b, "%" JSON_INTEGER_FORMAT, json_integer_value(j));
        break;
    case JSON_REAL:
        py_dump_float(b, json_real_value(j));
        break;
    case JSON_TRUE:
        sb_puts(b, "true");
        break;
    case JSON_FALSE:
        sb_puts(b, "false");
        break;
    case JSON_NULL:
        sb_puts(b, "null");
        break;
    }
}

/* ---- Python's repr() of the few things a legacy exception payload holds ------------------ */

/* str.isprintable() for non-ASCII code points, approximated without a Unicode database: the
 * control, format, separator (other than ASCII space), surrogate and private-use ranges are
 * non-printable; unassigned code points are taken as printable. */
static bool
py_isprintable(uint32_t cp)
{
    static const struct {
        uint32_t lo, hi;
    } nonprint[] = {
        {0x80, 0xa0},       {0xad, 0xad},       {0x600, 0x605},     {0x61c, 0x61c},
        {0x6dd, 0x6dd},     {0x70f, 0x70f},     {0x1680, 0x1680},   {0x180e, 0x180e},
        {0x2000, 0x200f},   {0x2028, 0x202f},   {0x205f, 0x2064},   {0x2066, 0x206f},
        {0x3000, 0x3000},   {0xd800, 0xf8ff},   {0xfeff, 0xfeff},   {0xfff9, 0xfffb},
        {0x110bd, 0x110bd}, {0x1d173, 0x1d17a}, {0xe0001, 0xe0001}, {0xe0020, 0xe007f},
        {0xf0000, 0x10ffff},
    };
    for (size_t i = 0; i < ELEMENTSOF(nonprint); i++)
        if (cp >= nonprint[i].lo && cp <= nonprint[i].hi)
            return false;
    return true;
}

/* repr(str): single quotes unless the text has a ' and no ". */
static void
py_repr_str(struct sbuf *b, const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t n = strlen(s);
    char q = (strchr(s, '\'') && !strchr(s, '"')) ? '"' : '\'';

    sb_putc(b, q);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = utf8_decode(u + i, n - i, &cp);
        if (cp == (uint32_t)q || cp == '\\') {
            sb_putc(b, '\\');
            sb_putc(b, (char)cp);
        } else if (cp == '\t')
            sb_puts(b, "\\t");
        else if (cp == '\n')
            sb_puts(b, "\\n");
        else if (cp == '\r')
            sb_puts(b, "\\r");
        else if (cp < 0x20 || cp == 0x7f)
            sb_printf(b, "\\x%02x", cp);
        else if (cp < 0x7f || py_isprintable(cp))
            sb_putn(b, s + i, len);
        else if (cp <= 0xff)
            sb_printf(b, "\\x%02x", cp);
        else if (cp <= 0xffff)
            sb_printf(b, "\\u%04x", cp);
        else
            sb_printf(b, "\\U%08x", cp);
        i += len;
    }
    sb_putc(b, q);
}

/* ---- time ------------------------------------------------------------------------------- */

/* A Python datetime as nova holds it: naive, UTC ("Z" or no zone) or with a fixed offset. */
struct pytime {
    int year, mon, day, hour, min, sec, usec;
    bool utc;
    char off[7]; /* "+HH:MM" when !utc */
};

static bool
parse_digits(const char **p, int n, int *ret)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if ((*p)[i] < '0' || (*p)[i] > '9')
            return false;
        v = v * 10 + ((*p)[i] - '0');
    }
    *p += n;
    *ret = v;
    return true;
}

/* Parse what iso8601.parse_date() accepts from nova: "YYYY-MM-DD[(T| )HH:MM[:SS[.f…]]]" followed
 * by nothing (UTC, iso8601's default zone), "Z", "±HH", "±HHMM" or "±HH:MM". */
static int
pytime_parse(const char *s, struct pytime *t)
{
    const char *p = s;
    int oh = 0, om = 0;

    *t = (struct pytime){.utc = true};
    if (!parse_digits(&p, 4, &t->year) || *p++ != '-' || !parse_digits(&p, 2, &t->mon) ||
        *p++ != '-' || !parse_digits(&p, 2, &t->day))
        return -EINVAL;
    if (*p == 'T' || *p == ' ') {
        p++;
        if (!parse_digits(&p, 2, &t->hour) || *p++ != ':' || !parse_digits(&p, 2, &t->min))
            return -EINVAL;
        if (*p == ':') {
            p++;
            if (!parse_digits(&p, 2, &t->sec))
                return -EINVAL;
            if (*p == '.' || *p == ',') {
                int scale = 100000;
                p++;
                if (*p < '0' || *p > '9')
                    return -EINVAL;
                for (; *p >= '0' && *p <= '9'; p++) {
                    t->usec += (*p - '0') * scale;
                    scale /= 10;
                }
            }
        }
    }
    if (*p == 'Z' && p[1] == '\0')
        return 0;
    if (*p == '\0')
        return 0;
    if (*p != '+' && *p != '-')
        return -EINVAL;
    char sign = *p++;
    if (!parse_digits(&p, 2, &oh))
        return -EINVAL;
    if (*p == ':')
        p++;
    if (*p && !parse_digits(&p, 2, &om))
        return -EINVAL;
    if (*p)
        return -EINVAL;
    if (t->mon < 1 || t->mon > 12 || t->day < 1 || t->day > 31 || t->hour > 23 || t->min > 59 ||
        t->sec > 60 || oh > 23 || om > 59)
        return -EINVAL;
    /* iso8601 returns datetime.timezone.utc only for "Z" or no zone; "+00:00" keeps its name. */
    t->utc = false;
    snprintf(t->off, sizeof(t->off), "%c%02d:%02d", sign, oh, om);
    return 0;
}

static void
pytime_from_us(int64_t us, struct pytime *t)
{
    int64_t secs = us / 1000000, rem = us % 1000000;
    struct tm tm;

    if (rem < 0) {
        rem += 1000000;
        secs--;
    }
    time_t tt = (time_t)secs;
    gmtime_r(&tt, &tm);
    *t = (struct pytime){.year = tm.tm_year + 1900, .mon = tm.tm_mon + 1, .day = tm.tm_mday,
                         .hour = tm.tm_hour, .min = tm.tm_min, .sec = tm.tm_sec,
                         .usec = (int)rem, .utc = true};
}

/* oslo_versionedobjects DateTimeField.to_primitive (_utils.isotime): seconds, then Z or zone. */
static json_t *
fmt_isotime(const struct pytime *t)
{
    return jfmt("%04d-%02d-%02dT%02d:%02d:%02d%s", t->year, t->mon, t->day, t->hour, t->min,
                t->sec, t->utc ? "Z" : t->off);
}

/* nova.utils.strtime / jsonutils' datetime rendering: "%Y-%m-%dT%H:%M:%S.%f", zone dropped. */
static json_t *
fmt_strtime(const struct pytime *t)
{
    return jfmt("%04d-%02d-%02dT%02d:%02d:%02d.%06d", t->year, t->mon, t->day, t->hour, t->min,
                t->sec, t->usec);
}

/* str(datetime): microseconds only when non-zero, zone as "+HH:MM" for an aware value. */
static json_t *
fmt_str(const struct pytime *t, bool aware)
{
    char us[8] = "";
    if (t->usec)
        snprintf(us, sizeof(us), ".%06d", t->usec);
    return jfmt("%04d-%02d-%02d %02d:%02d:%02d%s%s", t->year, t->mon, t->day, t->hour, t->min,
                t->sec, us, !aware ? "" : t->utc ? "+00:00" : t->off);
}

static int
pytime_cmp(const struct pytime *a, const struct pytime *b)
{
    const int av[] = {a->year, a->mon, a->day, a->hour, a->min, a->sec, a->usec};
    const int bv[] = {b->year, b->mon, b->day, b->hour, b->min, b->sec, b->usec};
    for (size_t i = 0; i < ELEMENTSOF(av); i++)
        if (av[i] != bv[i])
            return av[i] < bv[i] ? -1 : 1;
    return 0;
}

static bool
valid_date(int y, int m, int d)
{
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m < 1 || m > 12 || d < 1)
        return false;
    int md = mdays[m - 1];
    if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
        md = 29;
    return d <= md;
}

/* Move t by delta_s seconds (whole seconds only; t is naive UTC). */
static void
pytime_add(struct pytime *t, int64_t delta_s)
{
    struct tm tm = {.tm_year = t->year - 1900, .tm_mon = t->mon - 1, .tm_mday = t->day,
                    .tm_hour = t->hour, .tm_min = t->min, .tm_sec = t->sec};
    int usec = t->usec;
    pytime_from_us(((int64_t)timegm(&tm) + delta_s) * 1000000, t);
    t->usec = usec;
}

/* The start of the current audit period: the end of nova.utils.last_completed_audit_period(unit)
 * at now ("month", "day@18", …; an unknown unit is treated as "hour", as nova's else branch does).
 * -EINVAL where nova raises (bad offset, a day the month does not have). */
static int
audit_period_start(const char *spec, const struct pytime *now, struct pytime *ret)
{
    char unit[16];
    long offset = 0;
    const char *at = strchr(spec, '@');
    size_t ul = at ? (size_t)(at - spec) : strlen(spec);
    struct pytime end = {0};

    if (ul >= sizeof(unit))
        ul = sizeof(unit) - 1;
    memcpy(unit, spec, ul);
    unit[ul] = '\0';
    if (at && util_parse_long(at + 1, -1000000, 1000000, &offset) < 0)
        return -EINVAL;

    if (strcmp(unit, "month") == 0) {
        if (offset == 0)
            offset = 1;
        end = (struct pytime){.year = now->year, .mon = now->mon, .day = (int)offset};
        if (!valid_date(end.year, end.mon, end.day))
            return -EINVAL;
        if (pytime_cmp(&end, now) >= 0) {
            end.mon--;
            if (end.mon < 1) {
                end.mon = 12;
                end.year--;
            }
            if (!valid_date(end.year, end.mon, end.day))
                return -EINVAL;
        }
    } else if (strcmp(unit, "year") == 0) {
        if (offset == 0)
            offset = 1;
        end = (struct pytime){.year = now->year, .mon = (int)offset, .day = 1};
        if (!valid_date(end.year, end.mon, 1))
            return -EINVAL;
        if (pytime_cmp(&end, now) >= 0)
            end.year--;
    } else if (strcmp(unit, "day") == 0) {
        if (offset < 0 || offset > 23)
            return -EINVAL;
        end = (struct pytime){.year = now->year, .mon = now->mon, .day = now->day,
                              .hour = (int)offset};
        if (pytime_cmp(&end, now) >= 0)
            pytime_add(&end, -86400);
    } else {
        if (offset < 0 || offset > 59)
            return -EINVAL;
        end = *now;
        end.min = (int)offset;
        end.sec = end.usec = 0;
        if (pytime_cmp(&end, now) >= 0)
            pytime_add(&end, -3600);
    }
    end.utc = true;
    *ret = end;
    return 0;
}

/* ---- clock and ids ---------------------------------------------------------------------- */

static int64_t
clock_now(const struct rpc_notify_options *o)
{
    struct timespec ts;

    if (o->clock_us)
        return o->clock_us(o->userdata);
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* uuid.uuid4(): 16 random bytes with the version (4) and RFC 4122 variant bits set. */
static int
new_uuid(const struct rpc_notify_options *o, uint8_t u[16], struct agent_err *err)
{
    int r;

    if (o->random_uuid) {
        r = o->random_uuid(o->userdata, u);
        if (r < 0)
            return agent_err_set(err, r, "notification: random source failed");
    } else {
        size_t got = 0;
        while (got < 16) {
            ssize_t n = getrandom(u + got, 16 - got, 0);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return agent_err_set(err, -errno, "notification: getrandom: %m");
            }
            got += (size_t)n;
        }
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    return 0;
}

/* str(uuid) with dashes, or uuid.hex without. out holds 37 bytes. */
static void
uuid_format(const uint8_t u[16], bool dashes, char out[37])
{
    static const char hex[] = "0123456789abcdef";
    size_t k = 0;
    for (size_t i = 0; i < 16; i++) {
        if (dashes && (i == 4 || i == 6 || i == 8 || i == 10))
            out[k++] = '-';
        out[k++] = hex[u[i] >> 4];
        out[k++] = hex[u[i] & 0xf];
    }
    out[k] = '\0';
}

/* ---- jansson helpers -------------------------------------------------------------------- */

/* Add key: value (stolen) to o; -ENOMEM if value is NULL or the insertion fails. Setting an
 * existing key keeps its position, as assigning to a Python dict key does. */
static int
oset(json_t *o, const char *key, json_t *value)
{
    if (!value)
        return -ENOMEM;
    return json_object_set_new(o, key, value) < 0 ? -ENOMEM : 0;
}

/* Deep copy of obj[key], null when absent; NULL on allocation failure. */
static json_t *
jcopy(const json_t *obj, const char *key)
{
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    return v ? json_deep_copy(v) : json_null();
}

/* Python truthiness of a JSON value (absent is None). */
static bool
jtruthy(const json_t *v)
{
    if (!v)
        return false;
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return json_object_size(v) > 0;
    case JSON_ARRAY:
        return json_array_size(v) > 0;
    case JSON_STRING:
        return json_string_length(v) > 0;
    case JSON_INTEGER:
        return json_integer_value(v) != 0;
    case JSON_REAL:
        return json_real_value(v) != 0.0;
    case JSON_TRUE:
        return true;
    case JSON_FALSE:
    case JSON_NULL:
        return false;
    }
    return false;
}

static const char *
jstr(const json_t *obj, const char *key)
{
    return json_string_value(obj ? json_object_get(obj, key) : NULL);
}

/* A nova versioned-object primitive {"nova_object.name", …, "nova_object.data": data (stolen)}, as
 * emitted after obj_reset_changes() (no "nova_object.changes"). */
static json_t *
nova_object(const char *name, const char *version, json_t *data)
{
    json_t *o = json_object();
    if (!o || !data || oset(o, "nova_object.name", json_string(name)) < 0 ||
        oset(o, "nova_object.namespace", json_string("nova")) < 0 ||
        oset(o, "nova_object.version", json_string(version)) < 0) {
        json_decref(o);
        json_decref(data);
        return NULL;
    }
    if (oset(o, "nova_object.data", data) < 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* String.coerce of oslo.versionedobjects, as DictOfStringsField applies it to each value:
 * str(value) for str, int (bool included) and float; anything else makes nova fail. */
static json_t *
coerce_string(const json_t *v)
{
    struct sbuf b = {0};

    switch (json_typeof(v)) {
    case JSON_STRING:
        return json_deep_copy(v);
    case JSON_INTEGER:
        return jfmt("%" JSON_INTEGER_FORMAT, json_integer_value(v));
    case JSON_TRUE:
        return json_string("True");
    case JSON_FALSE:
        return json_string("False");
    case JSON_REAL: {
        py_dump_float(&b, json_real_value(v));
        _cleanup_free_ char *s = sb_take(&b, NULL);
        return s ? json_string(s) : NULL;
    }
    default:
        return NULL;
    }
}

/* DictOfStringsField: a copy of in with every value coerced. NULL with *ret_r set on failure. */
static json_t *
dict_of_strings(const json_t *in, int *ret_r)
{
    json_t *out = json_object();
    const char *k;
    json_t *v;

    *ret_r = -ENOMEM;
    if (!out)
        return NULL;
    json_object_foreach ((json_t *)in, k, v) {
        json_t *s = coerce_string(v);
        if (!s) {
            *ret_r = (json_is_string(v) || json_is_number(v) || json_is_boolean(v)) ? -ENOMEM
                                                                                       : -EINVAL;
            json_decref(out);
            return NULL;
        }
        if (oset(out, k, s) < 0) {
            json_decref(out);
            return NULL;
        }
    }
    *ret_r = 0;
    return out;
}

/* IPAddressField: str(netaddr.IPAddress(value)), i.e. the canonical text (IPv6 in lower case with
 * the longest zero run compressed, which glibc's inet_ntop also does). Non-addresses are copied. */
static json_t *
ip_canonical(const json_t *v)
{
    unsigned char a[16];
    char out[INET6_ADDRSTRLEN];
    const char *s = json_string_value(v);

    if (!s)
        return v ? json_deep_copy(v) : json_null();
    if (inet_pton(AF_INET6, s, a) == 1 && inet_ntop(AF_INET6, a, out, sizeof(out)))
        return json_string(out);
    if (inet_pton(AF_INET, s, a) == 1 && inet_ntop(AF_INET, a, out, sizeof(out)))
        return json_string(out);
    return json_deep_copy(v);
}

/* ---- the request's Instance ------------------------------------------------------------- */

struct ninst {
    const json_t *msg;     /* the inner message: _context_*, args */
    const json_t *data;    /* Instance nova_object.data */
    const json_t *flavor;  /* Flavor nova_object.data, NULL if absent */
    const json_t *sysmeta; /* system_metadata, NULL if absent */
};

static int
ninst_get(const struct rpc_request *req, struct ninst *ni, struct agent_err *err)
{
    const json_t *prim = req && req->doc ? rpc_doc_instance(req->doc) : NULL;
    const json_t *data = json_object_get(prim, "nova_object.data");

    if (!json_is_object(data))
        return agent_err_set(err, -EINVAL, "notification: the request has no Instance object");
    ni->msg = req->doc->msg;
    ni->data = data;
    ni->flavor = json_object_get(json_object_get(data, "flavor"), "nova_object.data");
    if (!json_is_object(ni->flavor))
        ni->flavor = NULL;
    ni->sysmeta = json_object_get(data, "system_metadata");
    if (!json_is_object(ni->sysmeta))
        ni->sysmeta = NULL;
    return 0;
}

int
rpc_instance_state_from_request(const struct rpc_request *req,
                                struct rpc_instance_state *ret_st, struct agent_err *err)
{
    struct ninst ni;
    int r = ninst_get(req, &ni, err);

    if (r < 0)
        return r;
    *ret_st = (struct rpc_instance_state){
        .vm_state = jstr(ni.data, "vm_state"),
        .task_state = jstr(ni.data, "task_state"),
        .power_state = (int)json_integer_value(json_object_get(ni.data, "power_state")),
        .updated_at = jstr(ni.data, "updated_at"),
    };
    return 0;
}

static json_t *
jstr_or_null(const char *s)
{
    return s ? json_string(s) : json_null();
}

/* ---- the sanitised context -------------------------------------------------------------- */

static const json_t *
ctx_get(const json_t *msg, const char *key)
{
    char k[64];
    snprintf(k, sizeof(k), "_context_%s", key);
    return json_object_get(msg, k);
}

static void
put_identity_part(struct sbuf *b, const json_t *v)
{
    if (!jtruthy(v))
        sb_putc(b, '-');
    else if (json_is_string(v))
        sb_puts(b, json_string_value(v));
    else
        py_dump(b, v);
}

/* What oslo.messaging puts in _context_*: notifier._sanitize_context() keeps user_id, project_id,
 * domain, user_domain, project_domain, is_admin, request_id, global_request_id, roles,
 * user_name, project_name, system_scope, and nova's RequestContext.from_dict() rebuilds the rest
 * with defaults, so auth_token is null, service_catalog [], remote_address null, read_deleted "no",
 * is_admin_project true and timestamp is the time of sanitising. elevated: the context went
 * through RequestContext.elevated() (is_admin, "admin" appended to roles). Keys without the
 * "_context_" prefix, in nova's to_dict() order. */
static json_t *
build_context(const json_t *msg, bool elevated, int64_t now_us)
{
    const json_t *uid = ctx_get(msg, "user_id"), *pid = ctx_get(msg, "project_id");
    const json_t *roles = ctx_get(msg, "roles"), *v;
    struct pytime now;
    struct sbuf idt = {0};
    /* Declared before the first goto: the cleanup also runs when a jump skips its assignment. */
    _cleanup_free_ char *identity = NULL;
    json_t *c = json_object(), *rl = NULL;
    bool has_admin = false;
    size_t i;
    int r = 0;

    if (!c)
        return NULL;
    /* nova's RequestContext.__init__ sets user_id/project_id only when truthy. */
    uid = jtruthy(uid) ? uid : NULL;
    pid = jtruthy(pid) ? pid : NULL;

    rl = json_array();
    if (!rl)
        goto fail;
    if (json_is_array(roles)) {
        json_array_foreach ((json_t *)roles, i, v) {
            if (json_is_string(v) && strcmp(json_string_value(v), "admin") == 0)
                has_admin = true;
            if (json_array_append_new(rl, json_deep_copy(v)) < 0)
                goto fail;
        }
    }
    if (elevated && !has_admin && json_array_append_new(rl, json_string("admin")) < 0)
        goto fail;

    put_identity_part(&idt, uid);
    sb_putc(&idt, ' ');
    put_identity_part(&idt, pid);
    sb_putc(&idt, ' ');
    put_identity_part(&idt, ctx_get(msg, "domain"));
    sb_putc(&idt, ' ');
    put_identity_part(&idt, ctx_get(msg, "user_domain"));
    sb_putc(&idt, ' ');
    put_identity_part(&idt, ctx_get(msg, "project_domain"));
    identity = sb_take(&idt, NULL);
    if (!identity)
        goto fail;

    const json_t *is_admin = ctx_get(msg, "is_admin");
    pytime_from_us(now_us, &now);

    r |= oset(c, "user", uid ? json_deep_copy(uid) : json_null());
    r |= oset(c, "project_id", pid ? json_deep_copy(pid) : json_null());
    r |= oset(c, "system_scope", jcopy(msg, "_context_system_scope"));
    r |= oset(c, "project", pid ? json_deep_copy(pid) : json_null());
    r |= oset(c, "domain", jcopy(msg, "_context_domain"));
    r |= oset(c, "user_domain", jcopy(msg, "_context_user_domain"));
    r |= oset(c, "project_domain", jcopy(msg, "_context_project_domain"));
    /* A null is_admin would make nova ask its policy engine; the agent says false. */
    r |= oset(c, "is_admin", json_boolean(elevated || json_is_true(is_admin)));
    r |= oset(c, "read_only", json_false());
    r |= oset(c, "show_deleted", json_false());
    r |= oset(c, "auth_token", json_null());
    /* Without a request_id oslo.context would invent one per context; nova always sends one. */
    r |= oset(c, "request_id", jtruthy(ctx_get(msg, "request_id"))
                                   ? json_deep_copy(ctx_get(msg, "request_id"))
                                   : json_null());
    r |= oset(c, "global_request_id", jcopy(msg, "_context_global_request_id"));
    r |= oset(c, "resource_uuid", json_null());
    r |= oset(c, "roles", json_incref(rl));
    r |= oset(c, "user_identity", json_string(identity));
    r |= oset(c, "is_admin_project", json_true());
    r |= oset(c, "user_id", uid ? json_deep_copy(uid) : json_null());
    r |= oset(c, "read_deleted", json_string("no"));
    r |= oset(c, "remote_address", json_null());
    r |= oset(c, "timestamp", fmt_strtime(&now));
    r |= oset(c, "quota_class", json_null());
    r |= oset(c, "user_name", jcopy(msg, "_context_user_name"));
    r |= oset(c, "service_catalog", json_array());
    r |= oset(c, "project_name", jcopy(msg, "_context_project_name"));
    if (r < 0)
        goto fail;
    json_decref(rl);
    return c;

fail:
    json_decref(rl);
    json_decref(c);
    return NULL;
}

/* ---- framing and fan-out ---------------------------------------------------------------- */

struct emitter {
    const struct rpc_notify_options *o;
    const json_t *msg;
    struct rpc_notification **v;
    size_t n, cap;
};

void
rpc_notification_free(struct rpc_notification *n)
{
    if (!n)
        return;
    free(n->exchange);
    free(n->routing_key);
    free(n->body);
    free(n->event_type);
    free(n->priority);
    free(n);
}

void
rpc_notification_freev(struct rpc_notification **v)
{
    if (!v)
        return;
    for (size_t i = 0; v[i]; i++)
        rpc_notification_free(v[i]);
    free(v);
}

size_t
rpc_notification_count(struct rpc_notification *const *v)
{
    size_t n = 0;
    while (v && v[n])
        n++;
    return n;
}

static int
emitter_push(struct emitter *em, struct rpc_notification *n)
{
    if (em->n + 2 > em->cap) {
        size_t cap = em->cap ? em->cap * 2 : 8;
        struct rpc_notification **v = realloc(em->v, cap * sizeof(*v));
        if (!v) {
            rpc_notification_free(n);
            return -ENOMEM;
        }
        em->v = v;
        em->cap = cap;
    }
    em->v[em->n++] = n;
    em->v[em->n] = NULL;
    return 0;
}

static struct rpc_notification **
emitter_take(struct emitter *em)
{
    if (!em->v) {
        em->v = calloc(1, sizeof(*em->v));
        if (!em->v)
            return NULL;
    }
    struct rpc_notification **v = em->v;
    em->v = NULL;
    em->n = em->cap = 0;
    return v;
}

static bool
has_driver(char *const *drivers, const char *name)
{
    for (size_t i = 0; drivers && drivers[i]; i++)
        if (strcmp(drivers[i], name) == 0)
            return true;
    return false;
}

/* Is the versioned notifier enabled? nova.rpc.if_notifications_enabled: the format includes
 * versioned and the driver list is not exactly ["noop"] (oslo's Notifier.is_enabled()). */
static bool
versioned_enabled(const struct rpc_notify_options *o)
{
    if (o->format != RPC_NOTIFY_FORMAT_VERSIONED && o->format != RPC_NOTIFY_FORMAT_BOTH)
        return false;
    return !(util_strv_length(o->drivers) == 1 && strcmp(o->drivers[0], "noop") == 0);
}

static bool
legacy_enabled(const struct rpc_notify_options *o)
{
    return o->format == RPC_NOTIFY_FORMAT_UNVERSIONED || o->format == RPC_NOTIFY_FORMAT_BOTH;
}

static char *
lowercase_dup(const char *s)
{
    char *d = strdup(s);
    for (char *p = d; p && *p; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p - 'A' + 'a');
    return d;
}

/* One oslo Notifier._notify() call: sanitise the context (clock read), stamp message_id and
 * timestamp (clock read), then hand the same message to each wire driver, which sends it to each
 * topic with a fresh _unique_id. send false: a notifier with the noop driver, which still does the
 * first part (so the clock and ids line up with nova's) but puts nothing on the bus. */
static int
emit(struct emitter *em, bool versioned, bool send, bool elevated, const char *event_type,
     const char *priority, json_t *payload, struct agent_err *err)
{
    const struct rpc_notify_options *o = em->o;
    json_auto_t *pl = payload;
    json_auto_t *ctx = NULL, *m = NULL;
    struct pytime ts;
    uint8_t u[16];
    char id[37];
    int r;

    if (!pl)
        return -ENOMEM;
    ctx = build_context(em->msg, elevated, clock_now(o));
    if (!ctx)
        return -ENOMEM;
    pytime_from_us(clock_now(o), &ts);
    r = new_uuid(o, u, err);
    if (r < 0)
        return r;
    if (!send)
        return 0;

    uuid_format(u, true, id);
    m = json_object();
    if (!m)
        return -ENOMEM;
    r = oset(m, "message_id", json_string(id));
    if (r >= 0 && versioned)
        r = oset(m, "publisher_id", jfmt("nova-compute:%s", o->host ? o->host : ""));
    else if (r >= 0)
        r = oset(m, "publisher_id", jfmt("compute.%s", o->host ? o->host : ""));
    if (r >= 0)
        r = oset(m, "event_type", json_string(event_type));
    if (r >= 0)
        r = oset(m, "priority", json_string(priority));
    if (r >= 0)
        r = oset(m, "payload", json_incref(pl));
    if (r >= 0)
        r = oset(m, "timestamp", fmt_str(&ts, false));
    if (r >= 0)
        r = oset(m, "_unique_id", json_null());
    const char *k;
    json_t *v;
    json_object_foreach (ctx, k, v) {
        char key[64];
        snprintf(key, sizeof(key), "_context_%s", k);
        if (r >= 0)
            r = oset(m, key, json_incref(v));
    }
    if (r < 0)
        return r;

    char *const *topics = versioned ? o->versioned_topics : o->topics;
    _cleanup_free_ char *prio = lowercase_dup(priority);
    if (!prio)
        return -ENOMEM;
    /* oslo's entry-point order: messaging (1.0, no envelope), then messagingv2. */
    static const struct {
        const char *name;
        bool envelope;
    } wire[] = {{"messaging", false}, {"messagingv2", true}};
    for (size_t d = 0; d < ELEMENTSOF(wire); d++) {
        if (!has_driver(o->drivers, wire[d].name))
            continue;
        for (size_t t = 0; topics && topics[t]; t++) {
            struct sbuf inner = {0}, body = {0};
            r = new_uuid(o, u, err);
            if (r < 0)
                return r;
            uuid_format(u, false, id);
            r = oset(m, "_unique_id", json_string(id));
            if (r < 0)
                return r;
            py_dump(&inner, m);
            if (wire[d].envelope) {
                sb_puts(&body, "{\"oslo.version\": \"2.0\", \"oslo.message\": ");
                py_dump_string(&body, inner.p ? inner.p : "", inner.len);
                sb_putc(&body, '}');
                if (inner.oom)
                    body.oom = true;
                sb_free(&inner);
            } else
                body = inner;

            struct rpc_notification *n = calloc(1, sizeof(*n));
            if (!n) {
                sb_free(&body);
                return -ENOMEM;
            }
            n->body = sb_take(&body, &n->body_len);
            n->exchange = strdup(o->control_exchange ? o->control_exchange : "nova");
            n->event_type = strdup(event_type);
            n->priority = strdup(priority);
            size_t rkl = strlen(topics[t]) + 1 + strlen(prio) + 1;
            n->routing_key = malloc(rkl);
            if (n->routing_key)
                snprintf(n->routing_key, rkl, "%s.%s", topics[t], prio);
            if (!n->body || !n->exchange || !n->event_type || !n->priority || !n->routing_key) {
                rpc_notification_free(n);
                return -ENOMEM;
            }
            r = emitter_push(em, n);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

/* ---- legacy payload: nova.notifications.base.info_from_instance ------------------------- */

/* null_safe_isotime(datetime) → strtime, or "" for None. */
static json_t *
legacy_isotime(const json_t *v)
{
    struct pytime t;
    if (!jtruthy(v))
        return json_string("");
    if (json_is_string(v) && pytime_parse(json_string_value(v), &t) == 0)
        return fmt_strtime(&t);
    return json_deep_copy(v);
}

static json_t *
flavor_int(const struct ninst *ni, const char *key)
{
    return jcopy(ni->flavor, key);
}

static int
legacy_info(const struct rpc_notify_options *o, const struct ninst *ni,
            const struct rpc_instance_state *st, json_t **ret, struct agent_err *err)
{
    const json_t *d = ni->data, *v;
    json_auto_t *p = json_object();
    struct pytime t;
    const char *k;
    int r = 0;

    if (!p)
        return -ENOMEM;
    r |= oset(p, "tenant_id", jcopy(d, "project_id"));
    r |= oset(p, "user_id", jcopy(d, "user_id"));
    r |= oset(p, "instance_id", jcopy(d, "uuid"));
    r |= oset(p, "display_name", jcopy(d, "display_name"));
    r |= oset(p, "reservation_id", jcopy(d, "reservation_id"));
    r |= oset(p, "hostname", jcopy(d, "hostname"));
    /* flavor.get('name', ''): the default only when the field is not set at all. */
    v = ni->flavor ? json_object_get(ni->flavor, "name") : NULL;
    r |= oset(p, "instance_type", v ? json_deep_copy(v) : json_string(""));
    r |= oset(p, "instance_type_id", jcopy(d, "instance_type_id"));
    v = ni->flavor ? json_object_get(ni->flavor, "flavorid") : NULL;
    r |= oset(p, "instance_flavor_id", v ? json_deep_copy(v) : json_string(""));
    r |= oset(p, "architecture", jcopy(d, "architecture"));
    r |= oset(p, "memory_mb", flavor_int(ni, "memory_mb"));
    const json_t *rg = ni->flavor ? json_object_get(ni->flavor, "root_gb") : NULL;
    const json_t *eg = ni->flavor ? json_object_get(ni->flavor, "ephemeral_gb") : NULL;
    if (!json_is_integer(rg) || !json_is_integer(eg))
        return agent_err_set(err, -EINVAL,
                             "notification: the instance's flavor has no root_gb/ephemeral_gb");
    r |= oset(p, "disk_gb", json_integer(json_integer_value(rg) + json_integer_value(eg)));
    r |= oset(p, "vcpus", flavor_int(ni, "vcpus"));
    r |= oset(p, "root_gb", flavor_int(ni, "root_gb"));
    r |= oset(p, "ephemeral_gb", flavor_int(ni, "ephemeral_gb"));
    r |= oset(p, "host", jcopy(d, "host"));
    r |= oset(p, "node", jcopy(d, "node"));
    r |= oset(p, "availability_zone", jcopy(d, "availability_zone"));
    v = json_object_get(d, "cell_name");
    r |= oset(p, "cell_name", jtruthy(v) ? json_deep_copy(v) : json_string(""));
    /* str(instance.created_at): "None" for None. */
    v = json_object_get(d, "created_at");
    if (json_is_string(v) && pytime_parse(json_string_value(v), &t) == 0)
        r |= oset(p, "created_at", fmt_str(&t, true));
    else
        r |= oset(p, "created_at", json_string("None"));
    r |= oset(p, "terminated_at", legacy_isotime(json_object_get(d, "terminated_at")));
    r |= oset(p, "deleted_at", legacy_isotime(json_object_get(d, "deleted_at")));
    r |= oset(p, "launched_at", legacy_isotime(json_object_get(d, "launched_at")));
    const char *image_ref = jstr(d, "image_ref");
    if (o->image_api_base)
        r |= oset(p, "image_ref_url",
                  jfmt("%s/images/%s", o->image_api_base, image_ref ? image_ref : "None"));
    else
        r |= oset(p, "image_ref_url", jcopy(d, "image_ref"));
    r |= oset(p, "os_type", jcopy(d, "os_type"));
    r |= oset(p, "kernel_id", jcopy(d, "kernel_id"));
    r |= oset(p, "ramdisk_id", jcopy(d, "ramdisk_id"));
    r |= oset(p, "state", jstr_or_null(st->vm_state));
    r |= oset(p, "state_description", json_string(st->task_state ? st->task_state : ""));
    /* int(progress) if progress else '' */
    v = json_object_get(d, "progress");
    r |= oset(p, "progress",
              jtruthy(v) && json_is_integer(v) ? json_deep_copy(v) : json_string(""));
    r |= oset(p, "access_ip_v4", ip_canonical(json_object_get(d, "access_ip_v4")));
    r |= oset(p, "access_ip_v6", ip_canonical(json_object_get(d, "access_ip_v6")));
    if (r < 0)
        return -ENOMEM;

    json_t *im = json_object();
    if (oset(p, "image_meta", im) < 0)
        return -ENOMEM;
    if (ni->sysmeta)
        json_object_foreach ((json_t *)ni->sysmeta, k, v)
            if (strncmp(k, "image_", 6) == 0 && oset(im, k + 6, json_deep_copy(v)) < 0)
                return -ENOMEM;
    v = json_object_get(d, "metadata");
    /* An Instance always has its metadata loaded when nova casts it; absent, it would be read
     * from the database. The agent sends {}. */
    if (oset(p, "metadata", v ? json_deep_copy(v) : json_object()) < 0)
        return -ENOMEM;
    *ret = TAKE_PTR(p);
    return 0;
}

/* ---- versioned payloads: nova/notifications/objects/instance.py ------------------------- */

static json_t *
versioned_datetime(const json_t *v)
{
    struct pytime t;
    if (json_is_string(v) && pytime_parse(json_string_value(v), &t) == 0)
        return fmt_isotime(&t);
    return v ? json_deep_copy(v) : json_null();
}

/* FlavorPayload 1.4 from instance.flavor. "projects" is not loaded on an instance's flavor, so
 * nova's lazy-load fails and the field is None; any other missing field is None the same way. */
static int
flavor_payload(const json_t *f, json_t **ret)
{
    static const char *const keys[] = {"flavorid", "memory_mb", "vcpus", "root_gb", "ephemeral_gb",
                                       "name", "swap", "rxtx_factor", "vcpu_weight", "disabled",
                                       "is_public", "extra_specs", "projects", "description"};
    json_t *d = json_object();
    int r;

    if (!d)
        return -ENOMEM;
    for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
        const json_t *v = f ? json_object_get(f, keys[i]) : NULL;
        json_t *c;
        if (!v || json_is_null(v))
            c = json_null();
        else if (strcmp(keys[i], "rxtx_factor") == 0 && json_is_integer(v))
            c = json_real((double)json_integer_value(v)); /* FloatField: float(value) */
        else if (strcmp(keys[i], "extra_specs") == 0 && json_is_object(v)) {
            c = dict_of_strings(v, &r);
            if (!c) {
                json_decref(d);
                return r;
            }
        } else
            c = json_deep_copy(v);
        if (oset(d, keys[i], c) < 0) {
            json_decref(d);
            return -ENOMEM;
        }
    }
    *ret = nova_object("FlavorPayload", "1.4", d);
    return *ret ? 0 : -ENOMEM;
}

/* IpPayload.from_network_info(instance.get_network_info()): one entry per fixed IP of each VIF
 * with a network. */
static int
ip_payloads(const json_t *data, json_t **ret)
{
    const json_t *ic = json_object_get(json_object_get(data, "info_cache"), "nova_object.data");
    const json_t *nw = json_object_get(ic, "network_info");
    json_auto_t *parsed = NULL;
    json_auto_t *list = json_array();
    size_t i, j, k;
    const json_t *vif, *subnet, *ip;
    int r;

    if (!list)
        return -ENOMEM;
    if (json_is_string(nw)) {
        parsed = json_loadb(json_string_value(nw), json_string_length(nw), 0, NULL);
        if (!parsed)
            return -EINVAL;
        nw = parsed;
    }
    if (!json_is_array(nw)) {
        *ret = TAKE_PTR(list);
        return 0;
    }
    json_array_foreach ((json_t *)nw, i, vif) {
        const json_t *net = json_object_get(vif, "network");
        if (!jtruthy(net))
            continue;
        json_array_foreach (json_object_get(net, "subnets"), j, subnet) {
            json_array_foreach (json_object_get(subnet, "ips"), k, ip) {
                json_t *d = json_object();
                const json_t *mac = json_object_get(vif, "address");
                const json_t *meta = json_object_get(vif, "meta");
                const json_t *ver = json_object_get(ip, "version");
                const json_t *addr = json_object_get(ip, "address");
                if (!d)
                    return -ENOMEM;
                r = oset(d, "label", jcopy(net, "label"));
                /* MACAddressField: lower case, '-' → ':' */
                if (r >= 0 && json_is_string(mac)) {
                    _cleanup_free_ char *m = lowercase_dup(json_string_value(mac));
                    for (char *c = m; c && *c; c++)
                        if (*c == '-')
                            *c = ':';
                    r = oset(d, "mac", m ? json_string(m) : NULL);
                } else if (r >= 0)
                    r = oset(d, "mac", jcopy(vif, "address"));
                if (r >= 0) {
                    json_t *ms = json_is_object(meta) ? dict_of_strings(meta, &r) : json_object();
                    r = ms ? oset(d, "meta", ms) : (r < 0 ? r : -ENOMEM);
                }
                if (r >= 0)
                    r = oset(d, "port_uuid", jcopy(vif, "id"));
                /* nova's IP model computes a missing version from the address. */
                if (r >= 0 && !jtruthy(ver) && json_is_string(addr))
                    r = oset(d, "version",
                             json_integer(strchr(json_string_value(addr), ':') ? 6 : 4));
                else if (r >= 0)
                    r = oset(d, "version", json_deep_copy(ver));
                if (r >= 0)
                    r = oset(d, "address", ip_canonical(addr));
                if (r >= 0)
                    r = oset(d, "device_name", jcopy(vif, "devname"));
                if (r < 0) {
                    json_decref(d);
                    return r;
                }
                if (json_array_append_new(list, nova_object("IpPayload", "1.0", d)) < 0)
                    return -ENOMEM;
            }
        }
    }
    *ret = TAKE_PTR(list);
    return 0;
}

static json_t *
power_state_name(int ps)
{
    /* InstancePowerState.ALL, indexed by nova's power_state code. */
    static const char *const names[] = {"pending", "running", NULL, "paused",
                                        "shutdown", NULL, "crashed", "suspended"};
    if (ps < 0 || (size_t)ps >= ELEMENTSOF(names) || !names[ps])
        return NULL;
    return json_string(names[ps]);
}

/* InstancePayload's fields, in its `fields` order, appended to p (a subclass's own fields come
 * first, already in p). ctx_msg supplies the (unsanitised) request context: request_id only when
 * the context has a project and a user, as InstancePayload.__init__ says. */
static int
instance_payload_fields(json_t *p, const struct ninst *ni, const struct rpc_instance_state *st,
                        struct agent_err *err)
{
    static const struct {
        const char *key, *field;
    } plain1[] = {
        {"uuid", "uuid"},
        {"user_id", "user_id"},
        {"tenant_id", "project_id"},
        {"reservation_id", "reservation_id"},
        {"display_name", "display_name"},
        {"display_description", "display_description"},
        {"host_name", "hostname"},
        {"host", "host"},
        {"node", "node"},
        {"os_type", "os_type"},
        {"architecture", "architecture"},
        {"availability_zone", "availability_zone"},
    };
    const json_t *d = ni->data, *v;
    json_t *c = NULL;
    int r = 0;

    for (size_t i = 0; i < ELEMENTSOF(plain1); i++)
        if (oset(p, plain1[i].key, jcopy(d, plain1[i].field)) < 0)
            return -ENOMEM;
    r = flavor_payload(ni->flavor, &c);
    if (r < 0)
        return agent_err_set(err, r, "notification: the instance's flavor cannot be rendered");
    r = 0;
    r |= oset(p, "flavor", c);
    r |= oset(p, "image_uuid", jcopy(d, "image_ref"));
    r |= oset(p, "key_name", jcopy(d, "key_name"));
    r |= oset(p, "kernel_id", jcopy(d, "kernel_id"));
    r |= oset(p, "ramdisk_id", jcopy(d, "ramdisk_id"));
    r |= oset(p, "created_at", versioned_datetime(json_object_get(d, "created_at")));
    r |= oset(p, "launched_at", versioned_datetime(json_object_get(d, "launched_at")));
    r |= oset(p, "terminated_at", versioned_datetime(json_object_get(d, "terminated_at")));
    r |= oset(p, "deleted_at", versioned_datetime(json_object_get(d, "deleted_at")));
    if (st->updated_at) {
        json_auto_t *u = json_string(st->updated_at);
        if (!u)
            return -ENOMEM;
        r |= oset(p, "updated_at", versioned_datetime(u));
    } else
        r |= oset(p, "updated_at", json_null());
    r |= oset(p, "state", jstr_or_null(st->vm_state));
    if (r < 0)
        return -ENOMEM;
    c = power_state_name(st->power_state);
    if (!c)
        return agent_err_set(err, -EINVAL, "notification: power state %d is not one of nova's",
                             st->power_state);
    r |= oset(p, "power_state", c);
    r |= oset(p, "task_state", jstr_or_null(st->task_state));
    r |= oset(p, "progress", jcopy(d, "progress"));
    if (r < 0)
        return -ENOMEM;
    r = ip_payloads(d, &c);
    if (r < 0)
        return agent_err_set(err, r, "notification: the instance's network_info cannot be read");
    r = oset(p, "ip_addresses", c);
    /* BlockDevicePayload.from_instance(): None unless [notifications]bdms_in_notifications (off
     * by default), and the agent does not read block device mappings. */
    r |= oset(p, "block_devices", json_null());
    if (r < 0)
        return -ENOMEM;
    v = json_object_get(d, "metadata");
    if (json_is_object(v)) {
        c = dict_of_strings(v, &r);
        if (!c)
            return agent_err_set(err, r, "notification: instance metadata holds a non-string");
    } else
        c = json_object();
    r = 0;
    r |= oset(p, "metadata", c);
    r |= oset(p, "locked", jcopy(d, "locked"));
    r |= oset(p, "auto_disk_config",
              json_string(jtruthy(json_object_get(d, "auto_disk_config")) ? "AUTO" : "MANUAL"));
    const json_t *uid = ctx_get(ni->msg, "user_id"), *pid = ctx_get(ni->msg, "project_id");
    uid = jtruthy(uid) ? uid : NULL;
    pid = jtruthy(pid) ? pid : NULL;
    if (uid && pid && jtruthy(ctx_get(ni->msg, "request_id")))
        r |= oset(p, "request_id", json_deep_copy(ctx_get(ni->msg, "request_id")));
    else
        r |= oset(p, "request_id", json_null());
    r |= oset(p, "action_initiator_user", uid ? json_deep_copy(uid) : json_null());
    r |= oset(p, "action_initiator_project", pid ? json_deep_copy(pid) : json_null());
    v = ni->sysmeta ? json_object_get(ni->sysmeta, "locked_reason") : NULL;
    r |= oset(p, "locked_reason", v ? json_deep_copy(v) : json_null());
    return r < 0 ? -ENOMEM : 0;
}

/* ---- builders --------------------------------------------------------------------------- */

static int
finish(struct emitter *em, int r, struct rpc_notification ***ret_v, struct agent_err *err)
{
    if (r >= 0) {
        struct rpc_notification **v = emitter_take(em);
        if (v) {
            *ret_v = v;
            return 0;
        }
        r = -ENOMEM;
    }
    rpc_notification_freev(em->v);
    em->v = NULL;
    if (r == -ENOMEM)
        agent_err_set(err, r, "notification: out of memory");
    return r;
}

static bool
wire_configured(const struct rpc_notify_options *o)
{
    return has_driver(o->drivers, "messaging") || has_driver(o->drivers, "messagingv2");
}

int
rpc_notify_snapshot(const struct rpc_notify_options *o, const struct rpc_request *req,
                    const struct rpc_instance_state *st, enum rpc_notify_phase phase,
                    struct rpc_notification ***ret_v, struct agent_err *err)
{
    struct emitter em = {.o = o};
    struct ninst ni;
    json_t *pl = NULL;
    char ev[64];
    int r;

    if (phase < 0 || phase >= RPC_NOTIFY_PHASE_MAX)
        return agent_err_set(err, -EINVAL, "notification: bad phase %d", (int)phase);
    r = ninst_get(req, &ni, err);
    if (r < 0)
        return r;
    em.msg = ni.msg;

    /* notify_about_instance_usage(): the legacy notifier always runs (noop when the format is
     * versioned). */
    r = legacy_info(o, &ni, st, &pl, err);
    if (r >= 0) {
        snprintf(ev, sizeof(ev), "compute.instance.snapshot.%s", rpc_notify_phase_to_string(phase));
        r = emit(&em, false, legacy_enabled(o) && wire_configured(o), true, ev, "INFO",
                 TAKE_PTR(pl), err);
    }
    if (r >= 0 && versioned_enabled(o)) {
        json_t *d = json_object();
        r = d ? 0 : -ENOMEM;
        if (r >= 0)
            r = oset(d, "snapshot_image_id", jstr_or_null(req->image_id));
        if (r >= 0)
            r = oset(d, "fault", json_null());
        if (r >= 0)
            r = oset(d, "request_id", json_null());
        if (r >= 0)
            r = instance_payload_fields(d, &ni, st, err);
        if (r >= 0) {
            snprintf(ev, sizeof(ev), "instance.snapshot.%s", rpc_notify_phase_to_string(phase));
            r = emit(&em, true, wire_configured(o), true, ev, "INFO",
                     nova_object("InstanceActionSnapshotPayload", "1.9", TAKE_PTR(d)), err);
        }
        json_decref(d);
    }
    return finish(&em, r, ret_v, err);
}

static bool
streq_null(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

int
rpc_notify_instance_update(const struct rpc_notify_options *o, const struct rpc_request *req,
                           const struct rpc_instance_state *old_st,
                           const struct rpc_instance_state *new_st,
                           struct rpc_notification ***ret_v, struct agent_err *err)
{
    struct emitter em = {.o = o};
    struct ninst ni;
    struct pytime now, start, end;
    json_auto_t *pl = NULL;
    int r;

    if (o->notify_on_state_change == RPC_NOTIFY_STATE_CHANGE_NONE)
        return finish(&em, 0, ret_v, err);
    r = ninst_get(req, &ni, err);
    if (r < 0)
        return r;
    em.msg = ni.msg;

    /* send_update(): a state change, or else a plain update with the current states. In
     * _compute_states_payload() every None is replaced by the instance's current value. */
    bool change = !streq_null(old_st->vm_state, new_st->vm_state) ||
                  (o->notify_on_state_change == RPC_NOTIFY_STATE_CHANGE_VM_AND_TASK_STATE &&
                   !streq_null(old_st->task_state, new_st->task_state));
    const char *old_vm = change && old_st->vm_state ? old_st->vm_state : new_st->vm_state;
    const char *old_task = change && old_st->task_state ? old_st->task_state : new_st->task_state;

    /* audit_period_bounds(current_period=True): [end of the last completed period, utcnow()]. */
    pytime_from_us(clock_now(o), &now);
    r = audit_period_start(o->audit_period ? o->audit_period : "month", &now, &start);
    if (r < 0)
        return agent_err_set(err, r, "notification: bad instance_usage_audit_period '%s'",
                             o->audit_period);
    pytime_from_us(clock_now(o), &end);

    r = legacy_info(o, &ni, new_st, &pl, err);
    if (r < 0)
        return finish(&em, r, ret_v, err);
    r |= oset(pl, "old_state", jstr_or_null(old_vm));
    r |= oset(pl, "state", jstr_or_null(new_st->vm_state));
    r |= oset(pl, "old_task_state", jstr_or_null(old_task));
    r |= oset(pl, "new_task_state", jstr_or_null(new_st->task_state));
    r |= oset(pl, "audit_period_beginning", fmt_strtime(&start));
    r |= oset(pl, "audit_period_ending", fmt_strtime(&end));
    if (r < 0)
        return finish(&em, -ENOMEM, ret_v, err);
    r = emit(&em, false, legacy_enabled(o) && wire_configured(o), false, "compute.instance.update",
             "INFO", json_incref(pl), err);

    if (r >= 0 && versioned_enabled(o)) {
        json_t *su = json_object(), *ap = json_object(), *d = json_object();
        if (!su || !ap || !d)
            r = -ENOMEM;
        if (r >= 0)
            r = oset(su, "old_state", jstr_or_null(old_vm));
        if (r >= 0)
            r = oset(su, "state", jstr_or_null(new_st->vm_state));
        if (r >= 0)
            r = oset(su, "old_task_state", jstr_or_null(old_task));
        if (r >= 0)
            r = oset(su, "new_task_state", jstr_or_null(new_st->task_state));
        /* AuditPeriodPayload's DateTimeFields drop the microseconds. */
        start.utc = end.utc = true;
        if (r >= 0)
            r = oset(ap, "audit_period_beginning", fmt_isotime(&start));
        if (r >= 0)
            r = oset(ap, "audit_period_ending", fmt_isotime(&end));
        if (r >= 0)
            r = oset(d, "state_update", nova_object("InstanceStateUpdatePayload", "1.0",
                                                    json_incref(su)));
        if (r >= 0)
            r = oset(d, "audit_period", nova_object("AuditPeriodPayload", "1.0", json_incref(ap)));
        if (r >= 0)
            r = oset(d, "old_display_name", json_null());
        if (r >= 0) {
            /* [tag.tag for tag in instance.tags.objects]: the conductor reads tags from its
             * database; the agent uses the cast's TagList if there is one, else []. */
            json_t *tags = json_array();
            const json_t *objs = json_object_get(
                json_object_get(json_object_get(ni.data, "tags"), "nova_object.data"), "objects");
            size_t i;
            const json_t *t;
            json_array_foreach ((json_t *)objs, i, t) {
                const json_t *tag = json_object_get(json_object_get(t, "nova_object.data"), "tag");
                if (tags && tag && json_array_append_new(tags, json_deep_copy(tag)) < 0) {
                    json_decref(tags);
                    tags = NULL;
                }
            }
            r = oset(d, "tags", tags);
        }
        if (r >= 0)
            r = instance_payload_fields(d, &ni, new_st, err);
        if (r >= 0)
            r = emit(&em, true, wire_configured(o), false, "instance.update", "INFO",
                     nova_object("InstanceUpdatePayload", "2.0", json_incref(d)), err);
        json_decref(su);
        json_decref(ap);
        json_decref(d);
    }
    return finish(&em, r, ret_v, err);
}

/* ---- error notifications: nova.exception_wrapper ---------------------------------------- */

/* Classes that mix in NovaObjectDictCompat: jsonutils.to_primitive renders them through
 * iteritems() (fields only, plus obj_extra_fields); every other object through its __dict__. */
static bool
dict_compat(const char *name)
{
    static const char *const names[] = {
        "BlockDeviceMapping", "Flavor", "Instance", "InstanceAction", "InstanceActionEvent",
        "InstanceFault", "InstanceGroup", "InstanceNUMACell", "InstanceNUMATopology", "KeyPair",
        "Service",
    };
    for (size_t i = 0; i < ELEMENTSOF(names); i++)
        if (strcmp(name, names[i]) == 0)
            return true;
    return false;
}

static bool
is_nova_object(const json_t *v)
{
    return json_is_object(v) && json_is_string(json_object_get(v, "nova_object.name")) &&
           json_is_object(json_object_get(v, "nova_object.data"));
}

/* jsonutils.to_primitive(max_depth=3) */
#define TO_PRIMITIVE_MAX_DEPTH 3

static json_t *to_primitive(const json_t *v, int level, const char *instance_name);

/* A field value as the object holds it after from_primitive, then to_primitive'd: datetimes as
 * "%Y-%m-%dT%H:%M:%S.%f", IP addresses canonical, the info cache's network_info (a JSON string
 * in the primitive) as the NetworkInfo list. */
static json_t *
field_to_primitive(const char *key, const json_t *v, int level)
{
    struct pytime t;
    size_t kl = strlen(key);

    if (json_is_string(v) && kl > 3 && strcmp(key + kl - 3, "_at") == 0 &&
        pytime_parse(json_string_value(v), &t) == 0)
        return fmt_strtime(&t);
    if (json_is_string(v) && (strcmp(key, "access_ip_v4") == 0 || strcmp(key, "access_ip_v6") == 0))
        return ip_canonical(v);
    if (json_is_string(v) && strcmp(key, "network_info") == 0) {
        json_auto_t *nw = json_loadb(json_string_value(v), json_string_length(v), 0, NULL);
        if (nw)
            return to_primitive(nw, level, NULL);
    }
    return to_primitive(v, level, NULL);
}

static json_t *
object_to_primitive(const json_t *prim, int level, const char *instance_name)
{
    const char *name = json_string_value(json_object_get(prim, "nova_object.name"));
    const json_t *data = json_object_get(prim, "nova_object.data");
    const json_t *objs = json_object_get(data, "objects");
    size_t nl = strlen(name);
    const char *k;
    json_t *v, *out;

    /* ObjectListBase iterates: a list, at the same depth. */
    if (nl > 4 && strcmp(name + nl - 4, "List") == 0 && json_is_array(objs))
        return to_primitive(objs, level, NULL);
    if (level + 1 > TO_PRIMITIVE_MAX_DEPTH)
        return json_null();
    out = json_object();
    if (!out)
        return NULL;
    if (dict_compat(name)) {
        json_object_foreach ((json_t *)data, k, v)
            if (oset(out, k, field_to_primitive(k, v, level + 1)) < 0)
                goto fail;
        if (instance_name && oset(out, "name", json_string(instance_name)) < 0)
            goto fail;
        return out;
    }
    /* __dict__: _changed_fields (a set; the primitive's order), _context, VERSION, _obj_<field>.
     * _context is null here; in nova it is the caller's RequestContext with its secrets. */
    const json_t *changes = json_object_get(prim, "nova_object.changes");
    if (oset(out, "_changed_fields",
             json_is_array(changes) ? json_deep_copy(changes) : json_array()) < 0 ||
        oset(out, "_context", json_null()) < 0 ||
        oset(out, "VERSION", jcopy(prim, "nova_object.version")) < 0)
        goto fail;
    json_object_foreach ((json_t *)data, k, v) {
        char key[128];
        snprintf(key, sizeof(key), "_obj_%s", k);
        if (oset(out, key, field_to_primitive(k, v, level + 1)) < 0)
            goto fail;
    }
    return out;

fail:
    json_decref(out);
    return NULL;
}

static json_t *
to_primitive(const json_t *v, int level, const char *instance_name)
{
    const char *k;
    json_t *e, *out;
    size_t i;

    if (is_nova_object(v))
        return object_to_primitive(v, level, instance_name);
    if (json_is_object(v)) {
        if (level > TO_PRIMITIVE_MAX_DEPTH)
            return json_null();
        out = json_object();
        json_object_foreach ((json_t *)v, k, e)
            if (!out || oset(out, k, to_primitive(e, level, NULL)) < 0) {
                json_decref(out);
                return NULL;
            }
        return out;
    }
    if (json_is_array(v)) {
        if (level > TO_PRIMITIVE_MAX_DEPTH)
            return json_null();
        out = json_array();
        json_array_foreach ((json_t *)v, i, e)
            if (!out || json_array_append_new(out, to_primitive(e, level, NULL)) < 0) {
                json_decref(out);
                return NULL;
            }
        return out;
    }
    return json_deep_copy(v);
}

/* Instance.name: CONF.instance_name_template % instance.id. Templates with one integer
 * conversion (%d %i %u %x %X %o %s with flags and width) are rendered; anything else (mapping
 * templates such as "%(uuid)s") falls back to the uuid, as nova does when formatting fails. */
static char *
instance_name(const char *tmpl, const json_t *data)
{
    const json_t *id = json_object_get(data, "id");
    const char *uuid = jstr(data, "uuid");
    struct sbuf b = {0};
    int convs = 0;

    if (!tmpl)
        tmpl = "instance-%08x";
    if (!json_is_integer(id))
        goto fallback;
    for (const char *p = tmpl; *p; p++) {
        if (*p != '%') {
            sb_putc(&b, *p);
            continue;
        }
        p++;
        if (*p == '%') {
            sb_putc(&b, '%');
            continue;
        }
        bool zero = false, left = false;
        for (; *p == '0' || *p == '-' || *p == ' ' || *p == '+' || *p == '#'; p++) {
            zero |= *p == '0';
            left |= *p == '-';
        }
        long width = 0;
        for (; *p >= '0' && *p <= '9'; p++)
            width = width * 10 + (*p - '0');
        if (width > 64 || !*p || !strchr("diuxXos", *p) || ++convs > 1)
            goto fallback;
        json_int_t val = json_integer_value(id);
        unsigned long long mag = val < 0 ? 0ULL - (unsigned long long)val : (unsigned long long)val;
        unsigned base = (*p == 'x' || *p == 'X') ? 16 : *p == 'o' ? 8 : 10;
        const char *dig = *p == 'X' ? "0123456789ABCDEF" : "0123456789abcdef";
        char num[72];
        size_t n = 0;
        do {
            num[n++] = dig[mag % base];
            mag /= base;
        } while (mag);
        size_t len = n + (val < 0);
        zero = zero && !left && *p != 's';
        if (val < 0 && zero)
            sb_putc(&b, '-');
        for (size_t i = len; !left && i < (size_t)width; i++)
            sb_putc(&b, zero ? '0' : ' ');
        if (val < 0 && !zero)
            sb_putc(&b, '-');
        while (n)
            sb_putc(&b, num[--n]);
        for (size_t i = len; left && i < (size_t)width; i++)
            sb_putc(&b, ' ');
    }
    if (convs == 1)
        return sb_take(&b, NULL);

fallback:
    sb_free(&b);
    return strdup(uuid ? uuid : "");
}

/* repr(exception): NovaException.__repr__ is str() of its __dict__ plus 'class'; a Python built-in
 * is Class('message'). */
static char *
exception_repr(const struct rpc_notify_fault *f)
{
    struct sbuf b = {0};
    const char *mod = f->exception_module;

    if (mod && strncmp(mod, "nova.", 5) == 0) {
        sb_puts(&b, "{'kwargs': {");
        for (size_t i = 0; i < f->n_kwargs; i++) {
            py_repr_str(&b, f->kwargs[i].key);
            sb_puts(&b, ": ");
            if (f->kwargs[i].value)
                py_repr_str(&b, f->kwargs[i].value);
            else
                sb_puts(&b, "None");
            sb_puts(&b, ", ");
        }
        sb_printf(&b, "'code': %d}, 'message': ", f->code);
        py_repr_str(&b, f->message ? f->message : "");
        sb_puts(&b, ", 'class': ");
        py_repr_str(&b, f->exception);
        sb_putc(&b, '}');
    } else {
        sb_puts(&b, f->exception);
        sb_putc(&b, '(');
        if (f->message)
            py_repr_str(&b, f->message);
        sb_putc(&b, ')');
    }
    return sb_take(&b, NULL);
}

/* ','.join(traceback.format_exception(…)) reduced to what the agent knows. */
static char *
synth_traceback(const struct rpc_notify_fault *f)
{
    struct sbuf b = {0};
    const char *mod = f->module_name ? f->module_name : "nova.compute.manager";

    sb_puts(&b, "Traceback (most recent call last):\n,  File \"");
    for (const char *p = mod; *p; p++)
        sb_putc(&b, *p == '.' ? '/' : *p);
    sb_printf(&b, ".py\", line 0, in %s\n,",
              f->function_name ? f->function_name : "snapshot_instance");
    if (f->exception_module && strcmp(f->exception_module, "builtins") != 0)
        sb_printf(&b, "%s.", f->exception_module);
    sb_puts(&b, f->exception);
    if (f->message && *f->message)
        sb_printf(&b, ": %s", f->message);
    sb_putc(&b, '\n');
    return sb_take(&b, NULL);
}

int
rpc_notify_error(const struct rpc_notify_options *o, const struct rpc_request *req,
                 const struct rpc_instance_state *st, const struct rpc_notify_fault *fault,
                 struct rpc_notification ***ret_v, struct agent_err *err)
{
    struct emitter em = {.o = o};
    struct ninst ni;
    json_auto_t *pl = NULL, *args = NULL;
    const char *k;
    json_t *v;
    int r;

    if (!fault || !fault->exception)
        return agent_err_set(err, -EINVAL, "notification: no exception class");
    r = ninst_get(req, &ni, err);
    if (r < 0)
        return r;
    em.msg = ni.msg;

    /* payload = {'exception': exc, 'args': call_dict}: call_dict is the method's keyword
     * arguments in the order the cast's args have them, minus self, context and "_pass" keys;
     * the Instance carries the worker's current state. */
    _cleanup_free_ char *repr = exception_repr(fault);
    _cleanup_free_ char *name = instance_name(o->instance_name_template, ni.data);
    json_auto_t *idata = json_deep_copy(ni.data);
    json_auto_t *iprim = json_deep_copy(rpc_doc_instance(req->doc));
    pl = json_object();
    args = json_object();
    if (!repr || !name || !idata || !iprim || !pl || !args)
        return finish(&em, -ENOMEM, ret_v, err);
    r = 0;
    r |= oset(idata, "vm_state", jstr_or_null(st->vm_state));
    r |= oset(idata, "task_state", jstr_or_null(st->task_state));
    r |= oset(idata, "power_state", json_integer(st->power_state));
    r |= oset(idata, "updated_at", jstr_or_null(st->updated_at));
    r |= oset(iprim, "nova_object.data", json_incref(idata));
    if (r < 0)
        return finish(&em, -ENOMEM, ret_v, err);
    json_object_foreach (json_object_get(ni.msg, "args"), k, v) {
        if (strstr(k, "_pass"))
            continue;
        if (strcmp(k, "instance") == 0)
            r = oset(args, k, to_primitive(iprim, 0, name));
        else
            r = oset(args, k, to_primitive(v, 0, NULL));
        if (r < 0)
            return finish(&em, r, ret_v, err);
    }
    if (oset(pl, "exception", json_string(repr)) < 0 || oset(pl, "args", json_incref(args)) < 0)
        return finish(&em, -ENOMEM, ret_v, err);
    r = emit(&em, false, legacy_enabled(o) && wire_configured(o), false, "snapshot_instance",
             "ERROR", json_incref(pl), err);

    if (r >= 0 && versioned_enabled(o)) {
        _cleanup_free_ char *tb = fault->traceback ? strdup(fault->traceback)
                                                   : synth_traceback(fault);
        json_t *d = json_object();
        r = tb && d ? 0 : -ENOMEM;
        if (r >= 0)
            r = oset(d, "module_name", jstr_or_null(fault->module_name));
        if (r >= 0)
            r = oset(d, "function_name", jstr_or_null(fault->function_name));
        if (r >= 0)
            r = oset(d, "exception", json_string(fault->exception));
        if (r >= 0)
            r = oset(d, "exception_message", json_string(fault->message ? fault->message : ""));
        if (r >= 0)
            r = oset(d, "traceback", json_string(tb));
        if (r >= 0)
            r = emit(&em, true, wire_configured(o), false, "compute.exception", "ERROR",
                     nova_object("ExceptionPayload", "1.1", json_incref(d)), err);
        json_decref(d);
    }
    return finish(&em, r, ret_v, err);
}

/* ---- enum tables ------------------------------------------------------------------------ */

static const char *const format_names[RPC_NOTIFY_FORMAT_MAX] = {
    [RPC_NOTIFY_FORMAT_UNVERSIONED] = "unversioned",
    [RPC_NOTIFY_FORMAT_VERSIONED] = "versioned",
    [RPC_NOTIFY_FORMAT_BOTH] = "both",
};

static const char *const state_change_names[RPC_NOTIFY_STATE_CHANGE_MAX] = {
    [RPC_NOTIFY_STATE_CHANGE_NONE] = "",
    [RPC_NOTIFY_STATE_CHANGE_VM_STATE] = "vm_state",
    [RPC_NOTIFY_STATE_CHANGE_VM_AND_TASK_STATE] = "vm_and_task_state",
};

static const char *const phase_names[RPC_NOTIFY_PHASE_MAX] = {
    [RPC_NOTIFY_PHASE_START] = "start",
    [RPC_NOTIFY_PHASE_END] = "end",
};

const char *
rpc_notify_format_to_string(enum rpc_notify_format f)
{
    return f >= 0 && f < RPC_NOTIFY_FORMAT_MAX ? format_names[f] : NULL;
}

int
rpc_notify_format_from_string(const char *s, enum rpc_notify_format *ret_f)
{
    for (int i = 0; s && i < RPC_NOTIFY_FORMAT_MAX; i++)
        if (strcmp(s, format_names[i]) == 0) {
            *ret_f = (enum rpc_notify_format)i;
            return 0;
        }
    return -EINVAL;
}

const char *
rpc_notify_state_change_to_string(enum rpc_notify_state_change s)
{
    return s >= 0 && s < RPC_NOTIFY_STATE_CHANGE_MAX ? state_change_names[s] : NULL;
}

int
rpc_notify_state_change_from_string(const char *s, enum rpc_notify_state_change *ret_s)
{
    if (!s)
        s = "";
    for (int i = 0; i < RPC_NOTIFY_STATE_CHANGE_MAX; i++)
        if (strcmp(s, state_change_names[i]) == 0) {
            *ret_s = (enum rpc_notify_state_change)i;
            return 0;
        }
    return -EINVAL;
}

const char *
rpc_notify_phase_to_string(enum rpc_notify_phase p)
{
    return p >= 0 && p < RPC_NOTIFY_PHASE_MAX ? phase_names[p] : NULL;
}
