/* Parser for oslo.messaging's transport_url, the way oslo's TransportURL.parse reads it: the
 * netloc holds comma-separated hosts, each with optional percent-encoded credentials and port;
 * the path is the virtual host. A broker without credentials gets kombu's guest/guest. */

#include "transport_url.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cleanup.h"
#include "err.h"
#include "util.h"

static int
hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = (char)tolower((unsigned char)c);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Percent-decode s[0..n) into a new string; NULL with *bad set on an invalid escape. */
static char *
pct_decode(const char *s, size_t n, int *bad)
{
    char *d = malloc(n + 1);
    size_t j = 0;

    if (!d)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%') {
            int hi, lo;
            if (i + 2 >= n) {
                free(d);
                *bad = 1;
                return NULL;
            }
            hi = hexval(s[i + 1]);
            lo = hexval(s[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
                free(d);
                *bad = 1;
                return NULL;
            }
            d[j++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            d[j++] = s[i];
        }
    }
    d[j] = '\0';
    return d;
}

void
rpc_transport_url_free(struct rpc_transport_url *u)
{
    if (!u)
        return;
    for (size_t i = 0; i < u->n_brokers; i++) {
        free(u->brokers[i].host);
        free(u->brokers[i].user);
        if (u->brokers[i].password) {
            /* Do not leave the secret in freed heap memory for a core dump to show. */
            explicit_bzero(u->brokers[i].password, strlen(u->brokers[i].password));
            free(u->brokers[i].password);
        }
    }
    free(u->brokers);
    free(u->vhost);
    free(u);
}

/* Parse one "[user[:pass]@]host[:port]" element of the netloc into b. */
static int
parse_broker(const char *s, size_t n, struct rpc_broker *b, struct agent_err *err)
{
    const char *at = NULL, *hp, *end = s + n, *colon;
    int bad = 0;

    for (const char *p = s; p < end; p++)
        if (*p == '@')
            at = p; /* the last '@' ends the credentials: a password may not contain a raw '@' */
    if (at) {
        const char *c = memchr(s, ':', (size_t)(at - s));
        size_t ulen = c ? (size_t)(c - s) : (size_t)(at - s);
        b->user = pct_decode(s, ulen, &bad);
        b->password = c ? pct_decode(c + 1, (size_t)(at - c - 1), &bad) : strdup("");
        if (bad)
            return agent_err_set(err, -EINVAL, "transport_url: invalid %%-escape in credentials");
        if (!b->user || !b->password)
            return -ENOMEM;
        hp = at + 1;
    } else {
        b->user = strdup("guest");
        b->password = strdup("guest");
        if (!b->user || !b->password)
            return -ENOMEM;
        hp = s;
    }

    if (hp < end && *hp == '[') {
        const char *rb = memchr(hp, ']', (size_t)(end - hp));
        if (!rb || rb == hp + 1)
            return agent_err_set(err, -EINVAL, "transport_url: bad IPv6 host");
        b->host = util_strndup(hp + 1, (size_t)(rb - hp - 1));
        colon = rb + 1 < end ? rb + 1 : NULL;
        if (colon && *colon != ':')
            return agent_err_set(err, -EINVAL, "transport_url: junk after IPv6 host");
    } else {
        colon = memchr(hp, ':', (size_t)(end - hp));
        size_t hlen = colon ? (size_t)(colon - hp) : (size_t)(end - hp);
        if (hlen == 0)
            return agent_err_set(err, -EINVAL, "transport_url: empty host name");
        b->host = util_strndup(hp, hlen);
    }
    if (!b->host)
        return -ENOMEM;
    for (const char *p = b->host; *p; p++)
        if (isspace((unsigned char)*p) || *p == '/' || *p == '?')
            return agent_err_set(err, -EINVAL, "transport_url: invalid host name '%s'", b->host);

    b->port = 5672;
    if (colon) {
        char portbuf[16];
        size_t plen = (size_t)(end - colon - 1);
        long port;
        if (plen == 0 || plen >= sizeof(portbuf))
            return agent_err_set(err, -EINVAL, "transport_url: bad port for host '%s'", b->host);
        memcpy(portbuf, colon + 1, plen);
        portbuf[plen] = '\0';
        if (util_parse_long(portbuf, 1, 65535, &port) < 0)
            return agent_err_set(err, -EINVAL, "transport_url: bad port '%s' for host '%s'",
                                 portbuf, b->host);
        b->port = (int)port;
    }
    return 0;
}

int
rpc_transport_url_parse(const char *url, struct rpc_transport_url **ret_url, struct agent_err *err)
{
    struct rpc_transport_url *u = NULL;
    const char *p, *netloc, *netend, *path_end;
    size_t cap = 1;
    int bad = 0, r;

    if (!url || strncmp(url, "rabbit://", 9) != 0)
        return agent_err_set(err, -EINVAL, "transport_url: scheme must be rabbit://");
    netloc = url + 9;
    netend = netloc + strcspn(netloc, "/?");
    if (netend == netloc)
        return agent_err_set(err, -EINVAL, "transport_url: no broker host");
    for (p = netloc; p < netend; p++)
        if (*p == ',')
            cap++;

    u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->brokers = calloc(cap, sizeof(*u->brokers));
    if (!u->brokers) {
        r = -ENOMEM;
        goto fail;
    }
    for (p = netloc; p < netend;) {
        const char *comma = memchr(p, ',', (size_t)(netend - p));
        const char *e = comma ? comma : netend;
        if (e == p) {
            r = agent_err_set(err, -EINVAL, "transport_url: empty host in list");
            goto fail;
        }
        r = parse_broker(p, (size_t)(e - p), &u->brokers[u->n_brokers++], err);
        if (r < 0)
            goto fail;
        p = comma ? comma + 1 : netend;
        if (comma && p == netend) {
            r = agent_err_set(err, -EINVAL, "transport_url: trailing comma in host list");
            goto fail;
        }
    }

    /* The path (minus its leading '/') is the virtual host; an empty one means "/". */
    path_end = netend + strcspn(netend, "?");
    if (*netend == '/' && path_end > netend + 1)
        u->vhost = pct_decode(netend + 1, (size_t)(path_end - netend - 1), &bad);
    else
        u->vhost = strdup("/");
    if (bad) {
        r = agent_err_set(err, -EINVAL, "transport_url: invalid %%-escape in virtual host");
        goto fail;
    }
    if (!u->vhost) {
        r = -ENOMEM;
        goto fail;
    }

    if (*path_end == '?') {
        _cleanup_(util_strv_freep) char **opts = NULL;
        r = util_split(path_end + 1, '&', &opts);
        if (r < 0)
            goto fail;
        for (size_t i = 0; opts[i]; i++) {
            const char *eq = strchr(opts[i], '=');
            bool on = false;
            if (strncmp(opts[i], "ssl=", 4) == 0 && eq &&
                (util_parse_bool(eq + 1, &on) < 0 || on)) {
                r = agent_err_set(err, -EOPNOTSUPP,
                                  "transport_url: TLS (%.*s) is not supported by this agent yet",
                                  (int)(eq - opts[i]), opts[i]);
                goto fail;
            }
        }
    }

    *ret_url = u;
    return 0;

fail:
    rpc_transport_url_free(u);
    return r;
}

void
rpc_broker_describe(const struct rpc_broker *b, char *buf, size_t size)
{
    bool v6 = strchr(b->host, ':') != NULL;
    snprintf(buf, size, "%s@%s%s%s:%d", b->user, v6 ? "[" : "", b->host, v6 ? "]" : "", b->port);
}
