/* The image service client (Glance v2 over HTTP), and the agent's only user of libcurl. It does
 * what nova-compute's snapshot does with Glance through glanceclient: GET the image nova-api
 * created, PATCH its properties the way warlock's JSON patch does ("replace" what exists, "add"
 * the rest), stream the snapshot into PUT /v2/images/{id}/file straight from the encoder's pull
 * callback (no copy on the host), hashing md5, sha256 and Glance's os_hash algorithm on the way,
 * then GET the image again and refuse anything but an active image whose size and hashes match
 * the bytes that went out. One easy handle per client keeps the connection alive; each request
 * resets it, sets every timeout, and walks the api_servers list with nova's num_retries, retrying
 * only while no byte of an image stream has been pulled (the source cannot rewind). Also here:
 * libcurl's process-wide setup and version line. */

#define _GNU_SOURCE /* asprintf, memmem, explicit_bzero */
#include "glance.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "backend.h"
#include "cleanup.h"
#include "err.h"
#include "log.h"
#include "util.h"

/* Largest response body kept (image documents are a few KiB; a long location list stays far
 * below). A bigger answer is an error rather than unbounded memory. */
#define RESPONSE_MAX (8u * 1024u * 1024u)
/* libcurl's upload buffer, so each read callback asks the source for up to this much. */
#define UPLOAD_BUFFER_SIZE (1024L * 1024L)
/* Cap of the doubling pause between rounds over the server list, as a multiple of the first. */
#define BACKOFF_MAX_FACTOR 8L

int
http_global_init(struct agent_err *err)
{
    CURLcode c = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (c != CURLE_OK)
        return agent_err_set(err, -EIO, "libcurl: curl_global_init: %s", curl_easy_strerror(c));
    return 0;
}

void
http_global_cleanup(void)
{
    curl_global_cleanup();
}

size_t
http_library_versions(char *buf, size_t size)
{
    int n = snprintf(buf, size, "libcurl %s\n", curl_version_info(CURLVERSION_NOW)->version);
    return n < 0 ? 0 : (size_t)n;
}

struct glance_client {
    char **servers; /* normalised base URLs, NULL-terminated */
    size_t n_servers;
    size_t current; /* the server tried first: the one that answered last */
    long num_retries;
    char *token_header; /* "X-Auth-Token: ..." or NULL; never logged */
    char *request_id;   /* or NULL */
    struct glance_options opt;
    CURL *curl;
    char errbuf[CURL_ERROR_SIZE];
};

static void
slist_freep(struct curl_slist **l)
{
    curl_slist_free_all(*l);
}

static double
now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void
sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* ---- Image statuses ---- */

static const char *const image_status_names[GLANCE_IMAGE_STATUS_MAX] = {
    [GLANCE_IMAGE_QUEUED] = "queued",
    [GLANCE_IMAGE_SAVING] = "saving",
    [GLANCE_IMAGE_ACTIVE] = "active",
    [GLANCE_IMAGE_KILLED] = "killed",
    [GLANCE_IMAGE_DELETED] = "deleted",
    [GLANCE_IMAGE_PENDING_DELETE] = "pending_delete",
    [GLANCE_IMAGE_DEACTIVATED] = "deactivated",
    [GLANCE_IMAGE_UPLOADING] = "uploading",
    [GLANCE_IMAGE_IMPORTING] = "importing",
    [GLANCE_IMAGE_STATUS_UNKNOWN] = "unknown",
};

const char *
glance_image_status_to_string(enum glance_image_status s)
{
    if ((unsigned)s >= GLANCE_IMAGE_STATUS_MAX)
        return NULL;
    return image_status_names[s];
}

enum glance_image_status
glance_image_status_from_string(const char *s)
{
    if (!s)
        return GLANCE_IMAGE_STATUS_UNKNOWN;
    for (int i = 0; i < GLANCE_IMAGE_STATUS_UNKNOWN; i++)
        if (strcmp(s, image_status_names[i]) == 0)
            return (enum glance_image_status)i;
    return GLANCE_IMAGE_STATUS_UNKNOWN;
}

/* ---- Pure helpers: status mapping, error text, JSON patch ---- */

int
glance_http_status_to_errno(long status)
{
    if (status >= 100 && status < 300)
        return 0;
    if (status >= 300 && status < 400)
        return -EPROTO;
    switch (status) {
    case 401:
    case 403:
        return -EACCES;
    case 404:
    case 410:
        return -ENOENT;
    case 409:
        return -EBUSY;
    case 413:
        return -EFBIG;
    }
    if (status >= 400 && status < 500)
        return -EINVAL;
    return -EIO;
}

/* What a failed status means for the image, for the error message. */
static const char *
status_meaning(long status)
{
    switch (status) {
    case 400:
        return "bad request";
    case 401:
        return "not authenticated";
    case 403:
        return "forbidden";
    case 404:
        return "image not found: deleted or never existed";
    case 410:
        return "image deleted";
    case 409:
        return "conflict: image busy or not in the right state";
    case 413:
        return "store full or over quota";
    case 415:
        return "unsupported media type";
    case 502:
    case 503:
    case 504:
        return "service unavailable";
    }
    if (status >= 300 && status < 400)
        return "unexpected redirect";
    if (status >= 500)
        return "server error";
    return "rejected";
}

/* The three gateway/overload answers that mean "this server cannot take it now, another may". */
static bool
status_try_next_server(long status)
{
    return status == 502 || status == 503 || status == 504;
}

/* Append text[0..len) to buf as one line: markup dropped, a few entities decoded, whitespace
 * runs folded to one space, control bytes dropped. *pos is the length so far. */
static void
flatten_text(const char *text, size_t len, char *buf, size_t size, size_t *pos)
{
    static const struct {
        const char *name;
        char c;
    } entities[] = {
        {"&amp;", '&'}, {"&lt;", '<'},  {"&gt;", '>'},   {"&quot;", '"'},
        {"&#39;", '\''}, {"&#x27;", '\''}, {"&nbsp;", ' '},
    };
    bool space = *pos > 0;

    for (size_t i = 0; i < len && *pos + 1 < size; i++) {
        unsigned char ch = (unsigned char)text[i];
        if (ch == '<') {
            const char *end = memchr(text + i, '>', len - i);
            if (!end)
                break;
            i = (size_t)(end - text);
            space = true;
            continue;
        }
        if (ch == '&') {
            for (size_t e = 0; e < ELEMENTSOF(entities); e++) {
                size_t el = strlen(entities[e].name);
                if (len - i >= el && strncasecmp(text + i, entities[e].name, el) == 0) {
                    ch = (unsigned char)entities[e].c;
                    i += el - 1;
                    break;
                }
            }
        }
        if (ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v') {
            space = true;
            continue;
        }
        if (ch < 0x20 || ch == 0x7f)
            continue;
        if (space && *pos > 0) {
            buf[(*pos)++] = ' ';
            if (*pos + 1 >= size)
                break;
        }
        space = false;
        buf[(*pos)++] = (char)ch;
    }
    buf[*pos] = '\0';
}

size_t
glance_error_text(const char *body, size_t len, char *buf, size_t size)
{
    size_t pos = 0;

    if (size == 0)
        return 0;
    buf[0] = '\0';
    if (!body || len == 0)
        return 0;

    json_auto_t *doc = json_loadb(body, len, 0, NULL);
    if (json_is_object(doc)) {
        /* Glance (webob) sends {"message", "code", "title"}; Keystone-style proxies nest
         * {"error": {"message"}}. */
        const json_t *m = json_object_get(doc, "message");
        const json_t *e = json_object_get(doc, "error");
        if (!json_is_string(m) && json_is_object(e))
            m = json_object_get(e, "message");
        if (!json_is_string(m))
            m = json_object_get(doc, "title");
        if (json_is_string(m))
            flatten_text(json_string_value(m), json_string_length(m), buf, size, &pos);
    } else {
        /* webob's HTML page repeats the status in <title> and <h1>: keep what follows. */
        const char *text = body, *end = body + len;
        const char *h1 = memmem(body, len, "</h1>", 5);
        if (h1)
            text = h1 + 5;
        flatten_text(text, (size_t)(end - text), buf, size, &pos);
    }

    /* Trim, and never end inside a UTF-8 sequence (the text may travel in JSON). */
    while (pos > 0 && buf[pos - 1] == ' ')
        pos--;
    if (pos > 0 && ((unsigned char)buf[pos - 1] & 0x80)) {
        size_t start = pos - 1, need;
        while (start > 0 && ((unsigned char)buf[start] & 0xc0) == 0x80)
            start--;
        unsigned char lead = (unsigned char)buf[start];
        need = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 1;
        if (pos - start < need)
            pos = start;
    }
    buf[pos] = '\0';
    return pos;
}

enum attr_kind {
    ATTR_STRING,
    ATTR_INTEGER,
    ATTR_BOOLEAN,
    ATTR_READONLY,
};

/* Glance v2's core image attributes (the image schema's properties), by how a client may set
 * them. Everything else is a custom property: a string. */
static const struct {
    const char *name;
    enum attr_kind kind;
} core_attrs[] = {
    {"name", ATTR_STRING},
    {"disk_format", ATTR_STRING},
    {"container_format", ATTR_STRING},
    {"visibility", ATTR_STRING},
    {"owner", ATTR_STRING},
    {"min_disk", ATTR_INTEGER},
    {"min_ram", ATTR_INTEGER},
    {"protected", ATTR_BOOLEAN},
    {"os_hidden", ATTR_BOOLEAN},
    {"id", ATTR_READONLY},
    {"status", ATTR_READONLY},
    {"size", ATTR_READONLY},
    {"virtual_size", ATTR_READONLY},
    {"checksum", ATTR_READONLY},
    {"os_hash_algo", ATTR_READONLY},
    {"os_hash_value", ATTR_READONLY},
    {"created_at", ATTR_READONLY},
    {"updated_at", ATTR_READONLY},
    {"locations", ATTR_READONLY},
    {"direct_url", ATTR_READONLY},
    {"tags", ATTR_READONLY},
    {"self", ATTR_READONLY},
    {"file", ATTR_READONLY},
    {"schema", ATTR_READONLY},
    {"stores", ATTR_READONLY},
};

/* The kind of attribute name is; *ret_core tells a core attribute from a custom property. */
static enum attr_kind
attr_kind_of(const char *name, bool *ret_core)
{
    for (size_t i = 0; i < ELEMENTSOF(core_attrs); i++)
        if (strcmp(name, core_attrs[i].name) == 0) {
            *ret_core = true;
            return core_attrs[i].kind;
        }
    *ret_core = false;
    return ATTR_STRING;
}

/* The JSON value to send for p->value (not NULL), typed as the schema wants it. */
static int
prop_value_json(const struct glance_prop *p, json_t **ret, struct agent_err *err)
{
    bool core;
    json_t *v = NULL;
    long l;
    bool b;

    switch (attr_kind_of(p->name, &core)) {
    case ATTR_READONLY:
        return agent_err_set(err, -EINVAL, "glance: image attribute '%s' is read-only", p->name);
    case ATTR_INTEGER:
        if (util_parse_long(p->value, 0, LONG_MAX, &l) < 0)
            return agent_err_set(err, -EINVAL, "glance: image attribute '%s' needs an integer >= 0,"
                                 " not '%s'", p->name, p->value);
        v = json_integer(l);
        break;
    case ATTR_BOOLEAN:
        if (util_parse_bool(p->value, &b) < 0)
            return agent_err_set(err, -EINVAL, "glance: image attribute '%s' needs a boolean,"
                                 " not '%s'", p->name, p->value);
        v = json_boolean(b);
        break;
    case ATTR_STRING:
        v = json_string(p->value);
        if (!v)
            return agent_err_set(err, -EINVAL, "glance: value of image property '%s' is not"
                                 " valid UTF-8", p->name);
        break;
    }
    if (!v)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    *ret = v;
    return 0;
}

/* "/" plus name escaped as an RFC 6901 JSON pointer token (~ -> ~0, / -> ~1). */
static char *
json_pointer_for(const char *name)
{
    size_t n = 2;
    for (const char *s = name; *s; s++)
        n += (*s == '~' || *s == '/') ? 2 : 1;
    char *p = malloc(n), *o = p;
    if (!p)
        return NULL;
    *o++ = '/';
    for (const char *s = name; *s; s++) {
        if (*s == '~' || *s == '/') {
            *o++ = '~';
            *o++ = *s == '~' ? '0' : '1';
        } else {
            *o++ = *s;
        }
    }
    *o = '\0';
    return p;
}

static int
check_prop_name(const struct glance_prop *p, struct agent_err *err)
{
    if (!p->name || !*p->name)
        return agent_err_set(err, -EINVAL, "glance: image property without a name");
    return 0;
}

/* Append {"op": op, "path": "/name"[, "value": v]} to patch; takes v (also on failure). */
static int
patch_append(json_t *patch, const char *op, const char *name, json_t *v, struct agent_err *err)
{
    _cleanup_free_ char *path = json_pointer_for(name);
    json_t *o;

    if (!path) {
        json_decref(v);
        return agent_err_set(err, -ENOMEM, "glance: out of memory building a JSON patch");
    }
    /* "o" hands v to the new object, and jansson releases it when packing fails. */
    o = v ? json_pack("{s:s, s:s, s:o}", "op", op, "path", path, "value", v)
          : json_pack("{s:s, s:s}", "op", op, "path", path);
    if (!o)
        return agent_err_set(err, -EINVAL, "glance: cannot build the JSON patch entry for '%s'"
                             " (name not valid UTF-8?)", name);
    if (json_array_append_new(patch, o) < 0)
        return agent_err_set(err, -ENOMEM, "glance: out of memory building a JSON patch");
    return 0;
}

/* The patch for props against the image document (see glance_image_update()). */
static int
patch_build(const json_t *image, const struct glance_prop *props, size_t n, json_t **ret,
            struct agent_err *err)
{
    json_auto_t *patch = json_array();
    int r;

    if (!patch)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    for (size_t i = 0; i < n; i++) {
        const struct glance_prop *p = &props[i];
        const json_t *cur;
        json_t *v = NULL;
        bool core;

        r = check_prop_name(p, err);
        if (r < 0)
            return r;
        cur = json_object_get(image, p->name);
        if (!p->value) {
            enum attr_kind k = attr_kind_of(p->name, &core);
            if (core)
                return agent_err_set(err, -EINVAL, "glance: image attribute '%s' cannot be"
                                     " removed%s", p->name, k == ATTR_READONLY ? "" : ", only set");
            if (!cur)
                continue;
            r = patch_append(patch, "remove", p->name, NULL, err);
            if (r < 0)
                return r;
            continue;
        }
        r = prop_value_json(p, &v, err);
        if (r < 0)
            return r;
        if (cur && json_equal(cur, v)) {
            json_decref(v);
            continue;
        }
        /* Glance answers 409 to "replace" of a property the image lacks, and nova (warlock)
         * sends "replace" for everything the image already has, null core attributes included. */
        r = patch_append(patch, cur ? "replace" : "add", p->name, v, err);
        if (r < 0)
            return r;
    }
    *ret = TAKE_PTR(patch);
    return 0;
}

int
glance_patch_build(const char *image_json, const struct glance_prop *props, size_t n,
                   char **ret_patch, struct agent_err *err)
{
    json_error_t jerr;
    json_auto_t *image = json_loads(image_json ? image_json : "", 0, &jerr);
    json_auto_t *patch = NULL;
    int r;

    if (!json_is_object(image))
        return agent_err_set(err, -EINVAL, "glance: image document is not a JSON object: %s",
                             image ? "wrong type" : jerr.text);
    r = patch_build(image, props, n, &patch, err);
    if (r < 0)
        return r;
    char *s = json_dumps(patch, JSON_COMPACT);
    if (!s)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    *ret_patch = s;
    return 0;
}

/* ---- Images ---- */

void
glance_image_release(struct glance_image *img)
{
    if (!img)
        return;
    json_decref(img->doc);
    *img = (struct glance_image){0};
}

const char *
glance_image_property(const struct glance_image *img, const char *name)
{
    if (!img || !img->doc || !name)
        return NULL;
    return json_string_value(json_object_get(img->doc, name));
}

size_t
glance_image_location_count(const struct glance_image *img)
{
    if (!img || !img->doc)
        return 0;
    return json_array_size(json_object_get(img->doc, "locations"));
}

const char *
glance_image_location_url(const struct glance_image *img, size_t i)
{
    if (!img || !img->doc)
        return NULL;
    json_t *loc = json_array_get(json_object_get(img->doc, "locations"), i);
    return json_string_value(json_object_get(loc, "url"));
}

/* Fill *ret from Glance's image document; takes doc. */
static int
image_from_doc(json_t *doc, struct glance_image *ret, struct agent_err *err)
{
    json_auto_t *d = doc;
    const json_t *size;
    struct glance_image img = {0};

    if (!json_is_object(d))
        return agent_err_set(err, -EPROTO, "glance: image document is not a JSON object");
    img.id = json_string_value(json_object_get(d, "id"));
    if (!img.id)
        return agent_err_set(err, -EPROTO, "glance: image document without an id");
    img.name = json_string_value(json_object_get(d, "name"));
    img.status_text = json_string_value(json_object_get(d, "status"));
    img.status = glance_image_status_from_string(img.status_text);
    size = json_object_get(d, "size");
    img.size = json_is_integer(size) ? (int64_t)json_integer_value(size) : -1;
    img.disk_format = json_string_value(json_object_get(d, "disk_format"));
    img.container_format = json_string_value(json_object_get(d, "container_format"));
    img.checksum = json_string_value(json_object_get(d, "checksum"));
    img.os_hash_algo = json_string_value(json_object_get(d, "os_hash_algo"));
    img.os_hash_value = json_string_value(json_object_get(d, "os_hash_value"));
    img.doc = TAKE_PTR(d);
    *ret = img;
    return 0;
}

/* ---- The client ---- */

void
glance_options_default(struct glance_options *ret)
{
    *ret = (struct glance_options){
        .connect_timeout_ms = GLANCE_CONNECT_TIMEOUT_MS,
        .low_speed_limit = GLANCE_LOW_SPEED_LIMIT,
        .low_speed_time = GLANCE_LOW_SPEED_TIME,
        .request_timeout_ms = GLANCE_REQUEST_TIMEOUT_MS,
        .retry_backoff_ms = GLANCE_RETRY_BACKOFF_MS,
    };
}

int
glance_client_set_options(struct glance_client *c, const struct glance_options *opt,
                          struct agent_err *err)
{
    if (opt->connect_timeout_ms < 0 || opt->low_speed_limit < 0 || opt->low_speed_time < 0
        || opt->request_timeout_ms < 0 || opt->retry_backoff_ms < 0)
        return agent_err_set(err, -EINVAL, "glance: negative timeout in client options");
    c->opt = *opt;
    return 0;
}

static bool
header_value_ok(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return false;
    return true;
}

/* Image ids go into URL paths: accept what Glance's UUIDs are made of, nothing that could
 * change the path. */
static int
check_id(const char *id, struct agent_err *err)
{
    size_t n = id ? strlen(id) : 0;

    if (n == 0 || n >= GLANCE_ID_MAX)
        return agent_err_set(err, -EINVAL, "glance: bad image id '%s'", id ? id : "(null)");
    for (size_t i = 0; i < n; i++) {
        char ch = id[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
              || ch == '-'))
            return agent_err_set(err, -EINVAL, "glance: bad image id '%s'", id);
    }
    return 0;
}

/* One api_servers entry as a base URL: "http://" added when no scheme is given (as nova does),
 * trailing slashes and a version suffix ("/v2", "/v2.1") dropped (as glanceclient does). */
static int
normalize_server(const char *entry, char **ret, struct agent_err *err)
{
    const char *s = entry;
    _cleanup_free_ char *url = NULL;
    size_t n;

    while (*s == ' ')
        s++;
    n = strlen(s);
    while (n > 0 && s[n - 1] == ' ')
        n--;
    if (n == 0)
        return agent_err_set(err, -EINVAL, "glance: empty entry in api_servers");
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= 0x20 || s[i] == 0x7f)
            return agent_err_set(err, -EINVAL, "glance: api_servers entry '%s' contains"
                                 " whitespace or control characters", entry);
    const char *sep = memmem(s, n, "://", 3);
    if (!sep) {
        if (asprintf(&url, "http://%.*s", (int)n, s) < 0)
            return agent_err_set(err, -ENOMEM, "glance: out of memory");
    } else {
        size_t sl = (size_t)(sep - s);
        if (!((sl == 4 && strncasecmp(s, "http", 4) == 0)
              || (sl == 5 && strncasecmp(s, "https", 5) == 0)))
            return agent_err_set(err, -EINVAL, "glance: api_servers entry '%s': scheme must be"
                                 " http or https", entry);
        url = util_strndup(s, n);
        if (!url)
            return agent_err_set(err, -ENOMEM, "glance: out of memory");
    }

    char *host = strstr(url, "://") + 3;
    n = strlen(url);
    for (;;) {
        while (n > (size_t)(host - url) && url[n - 1] == '/')
            n--;
        /* A trailing "/v<digits>[.<digits>]" segment. */
        size_t i = n;
        while (i > 0 && ((url[i - 1] >= '0' && url[i - 1] <= '9') || url[i - 1] == '.'))
            i--;
        if (i < n && i >= 2 && url[i - 1] == 'v' && url[i - 2] == '/'
            && i - 2 > (size_t)(host - url) && url[i] != '.') {
            n = i - 2;
            continue;
        }
        break;
    }
    url[n] = '\0';
    if (n == (size_t)(host - url))
        return agent_err_set(err, -EINVAL, "glance: api_servers entry '%s' has no host", entry);
    *ret = TAKE_PTR(url);
    return 0;
}

void
glance_client_free(struct glance_client *c)
{
    if (!c)
        return;
    if (c->curl)
        curl_easy_cleanup(c->curl);
    util_strv_free(c->servers);
    if (c->token_header) {
        /* Do not leave the token in freed heap memory. */
        explicit_bzero(c->token_header, strlen(c->token_header));
        free(c->token_header);
    }
    free(c->request_id);
    free(c);
}

int
glance_client_new(char *const *api_servers, long num_retries, const char *auth_token,
                  const char *request_id, struct glance_client **ret, struct agent_err *err)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    size_t n = util_strv_length(api_servers);
    int r;

    if (n == 0)
        return agent_err_set(err, -EINVAL, "glance: no api_servers given");
    if (num_retries < 0)
        return agent_err_set(err, -EINVAL, "glance: num_retries must be >= 0, not %ld",
                             num_retries);
    if (auth_token && !header_value_ok(auth_token))
        return agent_err_set(err, -EINVAL, "glance: auth token contains control characters");
    if (request_id && !header_value_ok(request_id))
        return agent_err_set(err, -EINVAL, "glance: request id contains control characters");

    c = calloc(1, sizeof(*c));
    if (!c)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    c->servers = calloc(n + 1, sizeof(char *));
    if (!c->servers)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    for (size_t i = 0; i < n; i++) {
        r = normalize_server(api_servers[i], &c->servers[i], err);
        if (r < 0)
            return r;
    }
    c->n_servers = n;
    c->num_retries = num_retries;
    if (auth_token && *auth_token && asprintf(&c->token_header, "X-Auth-Token: %s", auth_token) < 0)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    if (request_id && *request_id && !(c->request_id = strdup(request_id)))
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    glance_options_default(&c->opt);
    c->curl = curl_easy_init();
    if (!c->curl)
        return agent_err_set(err, -ENOMEM, "glance: curl_easy_init failed");
    *ret = TAKE_PTR(c);
    return 0;
}

/* ---- Requests ---- */

struct response {
    long status;
    const char *server; /* borrowed from the client: who answered (or failed last) */
    char *body;
    size_t len, cap;
    bool too_big;
};

static void
response_reset(struct response *r)
{
    free(r->body);
    *r = (struct response){0};
}

static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct response *r = userdata;
    size_t n = size * nmemb;

    if (r->len + n + 1 > RESPONSE_MAX) {
        r->too_big = true;
        return 0;
    }
    if (r->len + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + n + 1)
            cap *= 2;
        char *b = realloc(r->body, cap);
        if (!b)
            return 0;
        r->body = b;
        r->cap = cap;
    }
    memcpy(r->body + r->len, ptr, n);
    r->len += n;
    r->body[r->len] = '\0';
    return n;
}

/* The digests computed over an image stream: md5 (Glance's checksum), sha256 (for the caller's
 * records) and Glance's os_hash algorithm, which shares a context when it is one of those two. */
struct digests {
    EVP_MD_CTX *ctx[3]; /* md5, sha256, os_hash (NULL when shared) */
    int os_index;
    char algo[GLANCE_ALGO_MAX];
};

/* Python hashlib names (what Glance's hashing_algorithm holds) to OpenSSL's. */
static const EVP_MD *
digest_for_algo(const char *algo)
{
    static const struct {
        const char *py, *ossl;
    } names[] = {
        {"md5", "MD5"},           {"sha1", "SHA1"},           {"sha224", "SHA224"},
        {"sha256", "SHA256"},     {"sha384", "SHA384"},       {"sha512", "SHA512"},
        {"sha512_224", "SHA512-224"}, {"sha512_256", "SHA512-256"}, {"sha3_224", "SHA3-224"},
        {"sha3_256", "SHA3-256"}, {"sha3_384", "SHA3-384"},   {"sha3_512", "SHA3-512"},
        {"blake2b", "BLAKE2B-512"}, {"blake2s", "BLAKE2S-256"},
    };
    for (size_t i = 0; i < ELEMENTSOF(names); i++)
        if (strcasecmp(algo, names[i].py) == 0)
            return EVP_get_digestbyname(names[i].ossl);
    return NULL;
}

static void
digests_free(struct digests *d)
{
    for (size_t i = 0; i < ELEMENTSOF(d->ctx); i++) {
        EVP_MD_CTX_free(d->ctx[i]);
        d->ctx[i] = NULL;
    }
}

static int
digests_init(struct digests *d, const char *algo, struct agent_err *err)
{
    const EVP_MD *md[3] = {EVP_md5(), EVP_sha256(), digest_for_algo(algo)};

    *d = (struct digests){0};
    if (!md[2] || util_strlcpy(d->algo, algo, sizeof(d->algo)) >= sizeof(d->algo))
        return agent_err_set(err, -EINVAL, "glance: unsupported os_hash algorithm '%s'", algo);
    for (char *p = d->algo; *p; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p - 'A' + 'a');
    d->os_index = strcmp(d->algo, "md5") == 0 ? 0 : strcmp(d->algo, "sha256") == 0 ? 1 : 2;
    for (int i = 0; i < 3; i++) {
        if (i == 2 && d->os_index != 2)
            break;
        d->ctx[i] = EVP_MD_CTX_new();
        if (!d->ctx[i] || EVP_DigestInit_ex(d->ctx[i], md[i], NULL) != 1) {
            /* A FIPS-only OpenSSL refuses md5, which Glance's checksum needs. */
            int r = d->ctx[i] ? -EOPNOTSUPP : -ENOMEM;
            digests_free(d);
            return agent_err_set(err, r, "glance: cannot set up the %s digest (libcrypto)",
                                 i == 0 ? "md5" : i == 1 ? "sha256" : algo);
        }
    }
    return 0;
}

static bool
digests_update(struct digests *d, const void *buf, size_t n)
{
    for (size_t i = 0; i < ELEMENTSOF(d->ctx); i++)
        if (d->ctx[i] && EVP_DigestUpdate(d->ctx[i], buf, n) != 1)
            return false;
    return true;
}

static void
to_hex(const unsigned char *b, unsigned n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (unsigned i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

static int
digests_final(struct digests *d, struct glance_upload_result *res, struct agent_err *err)
{
    char *out[3] = {res->md5, res->sha256, res->os_hash_value};

    for (int i = 0; i < 3; i++) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned n = 0;
        if (!d->ctx[i])
            continue;
        if (EVP_DigestFinal_ex(d->ctx[i], md, &n) != 1 || 2 * n >= GLANCE_HEX_MAX)
            return agent_err_set(err, -EIO, "glance: finishing a digest failed");
        to_hex(md, n, out[i]);
    }
    if (d->os_index != 2)
        util_strlcpy(res->os_hash_value, out[d->os_index], GLANCE_HEX_MAX);
    util_strlcpy(res->os_hash_algo, d->algo, sizeof(res->os_hash_algo));
    return 0;
}

/* State of one image stream, shared by every attempt of the PUT. */
struct upload {
    const struct glance_upload_source *src;
    int64_t remaining; /* of a declared size; -1 when unknown */
    uint64_t pulled;   /* bytes read from the source (and given to libcurl) */
    bool done;
    int read_r; /* < 0: the source (or our check of it) failed; read_err says why */
    struct agent_err read_err;
    struct digests dg;
};

static size_t
read_cb(char *buf, size_t size, size_t nitems, void *userdata)
{
    struct upload *u = userdata;
    size_t len = size * nitems, n = 0;
    int r;

    if (u->done)
        return 0;
    if (u->remaining >= 0 && (uint64_t)u->remaining < len)
        len = (size_t)u->remaining;
    if (len == 0) {
        u->done = true;
        return 0;
    }
    r = u->src->read(u->src->opaque, buf, len, &n, &u->read_err);
    if (r < 0) {
        u->read_r = r;
        return CURL_READFUNC_ABORT;
    }
    if (n > len) {
        u->read_r = agent_err_set(&u->read_err, -EINVAL, "glance: image source returned %zu"
                                  " bytes for a %zu-byte read", n, len);
        return CURL_READFUNC_ABORT;
    }
    if (n == 0) {
        u->done = true;
        if (u->remaining > 0) {
            u->read_r = agent_err_set(&u->read_err, -EIO, "glance: image source ended after %"
                                      PRIu64 " bytes, %" PRId64 " short of its declared size",
                                      u->pulled, u->remaining);
            return CURL_READFUNC_ABORT;
        }
        return 0;
    }
    if (!digests_update(&u->dg, buf, n)) {
        u->read_r = agent_err_set(&u->read_err, -EIO, "glance: digest update failed");
        return CURL_READFUNC_ABORT;
    }
    u->pulled += n;
    if (u->remaining >= 0) {
        u->remaining -= (int64_t)n;
        if (u->remaining == 0) {
            /* The declared size is reached: the source must be at its end too, or Glance would
             * store a truncated image with a "matching" size. */
            char probe;
            size_t m = 0;
            r = u->src->read(u->src->opaque, &probe, 1, &m, &u->read_err);
            if (r < 0) {
                u->read_r = r;
                return CURL_READFUNC_ABORT;
            }
            if (m > 0) {
                u->read_r = agent_err_set(&u->read_err, -EIO, "glance: image source is longer"
                                          " than its declared size of %" PRIu64 " bytes",
                                          u->pulled);
                return CURL_READFUNC_ABORT;
            }
            u->done = true;
        }
    }
    return n;
}

struct request {
    const char *method;       /* GET, POST, PATCH, PUT (image data only), DELETE */
    const char *path;         /* "/v2/images/..." */
    const char *content_type; /* of body or of the upload; NULL without a body */
    const char *body;
    size_t body_len;
    struct upload *up; /* PUT of image data, else NULL */
};

/* A transport failure as -errno; *ret_conn says whether another server (or a later try) could
 * do better: the request did not get an answer. */
static int
curl_code_to_errno(CURLcode cc, bool *ret_conn)
{
    *ret_conn = true;
    switch (cc) {
    case CURLE_COULDNT_CONNECT:
        return -ECONNREFUSED;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return -EHOSTUNREACH;
    case CURLE_OPERATION_TIMEDOUT:
        return -ETIMEDOUT;
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
        return -ECONNRESET;
    default:
        break;
    }
    *ret_conn = false;
    switch (cc) {
    case CURLE_OUT_OF_MEMORY:
        return -ENOMEM;
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
        return -EINVAL;
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
        return -EACCES;
    case CURLE_WRITE_ERROR:
        return -EMSGSIZE;
    default:
        return -EIO;
    }
}

/* Send rq once to server. Returns 0 when an HTTP answer came (resp->status, resp->body), or
 * -errno with err set; *ret_conn as curl_code_to_errno(). */
static int
perform_once(struct glance_client *c, const char *server, const struct request *rq,
             struct response *resp, bool *ret_conn, struct agent_err *err)
{
    _cleanup_free_ char *url = NULL, *ctype = NULL, *reqid = NULL;
    _cleanup_(slist_freep) struct curl_slist *hdrs = NULL;
    struct curl_slist *l;
    CURL *h = c->curl;
    CURLcode cc;
    double t0;
    int r;

    *ret_conn = false;
    if (asprintf(&url, "%s%s", server, rq->path) < 0)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    if (rq->content_type && asprintf(&ctype, "Content-Type: %s", rq->content_type) < 0)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    if (c->request_id && asprintf(&reqid, "X-OpenStack-Request-ID: %s", c->request_id) < 0)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");

    /* Headers: the token line is built once in the client; libcurl copies each line. */
    const char *lines[] = {
        "Accept: application/json",
        ctype,
        c->token_header,
        reqid,
        /* Ask before sending image data: Glance answers 404/409/415 before reading the body,
         * so a refused upload never pulls (and wastes) a byte of the stream. */
        rq->up ? "Expect: 100-continue" : NULL,
    };
    for (size_t i = 0; i < ELEMENTSOF(lines); i++) {
        if (!lines[i])
            continue;
        l = curl_slist_append(hdrs, lines[i]);
        if (!l)
            return agent_err_set(err, -ENOMEM, "glance: out of memory");
        hdrs = l;
    }

    /* Reset keeps the connection cache: keep-alive survives, no option leaks between calls. */
    curl_easy_reset(h);
    c->errbuf[0] = '\0';
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, c->errbuf);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, c->opt.connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, c->opt.low_speed_limit);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, c->opt.low_speed_time);
    /* An upload takes as long as the disk is big; the low-speed limit bounds it instead. */
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, rq->up ? 0L : c->opt.request_timeout_ms);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPIDLE, 30L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPINTVL, 10L);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "compute-agent/" AGENT_VERSION);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, resp);

    if (rq->up) {
        curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, read_cb);
        curl_easy_setopt(h, CURLOPT_READDATA, rq->up);
        /* -1: HTTP/1.1 chunked transfer encoding, like nova's generator body. */
        curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)rq->up->src->size);
        curl_easy_setopt(h, CURLOPT_UPLOAD_BUFFERSIZE, UPLOAD_BUFFER_SIZE);
    } else if (strcmp(rq->method, "GET") == 0) {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    } else if (rq->body) {
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, rq->body);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
        if (strcmp(rq->method, "POST") != 0)
            curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, rq->method);
    } else {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, rq->method);
    }

    t0 = now_seconds();
    cc = curl_easy_perform(h);
    resp->server = server;
    if (cc == CURLE_OK) {
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &resp->status);
        log_debug(LOG_GLANCE, "glance: %s %s: HTTP %ld in %.3f s", rq->method, url, resp->status,
                  now_seconds() - t0);
        return 0;
    }

    log_debug(LOG_GLANCE, "glance: %s %s: %s (%s) after %.3f s", rq->method, url,
              curl_easy_strerror(cc), c->errbuf, now_seconds() - t0);
    if (rq->up && rq->up->read_r < 0) {
        char ebuf[64];
        /* The source failed (or broke its declared size): its error, not libcurl's abort. */
        if (rq->up->read_err.code < 0 && err && err->code == 0)
            *err = rq->up->read_err;
        else
            agent_err_set(err, rq->up->read_r, "glance: %s %s: image source failed after %"
                          PRIu64 " bytes: %s", rq->method, url, rq->up->pulled,
                          strerror_r(-rq->up->read_r, ebuf, sizeof(ebuf)));
        return rq->up->read_r;
    }
    if (resp->too_big)
        return agent_err_set(err, -EMSGSIZE, "glance: %s %s: response larger than %u bytes",
                             rq->method, url, RESPONSE_MAX);

    r = curl_code_to_errno(cc, ret_conn);
    /* libcurl's buffer says what failed ("Failed to connect to 127.0.0.1 port 9292 after 0 ms:
     * Couldn't connect to server"); the OS error says why ("Connection refused"). */
    long os_errno = 0;
    char detail[CURL_ERROR_SIZE + 64], ebuf[64];
    curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &os_errno);
    if (os_errno > 0)
        snprintf(detail, sizeof(detail), "%s (%s)", c->errbuf[0] ? c->errbuf
                 : curl_easy_strerror(cc), strerror_r((int)os_errno, ebuf, sizeof(ebuf)));
    else
        snprintf(detail, sizeof(detail), "%s", c->errbuf[0] ? c->errbuf : curl_easy_strerror(cc));
    if (rq->up && rq->up->pulled > 0)
        return agent_err_set_retryable(err, r, "glance: %s %s: failed after %" PRIu64 " bytes"
                                       " of image data, not retried (the stream cannot be"
                                       " replayed): %s", rq->method, url, rq->up->pulled, detail);
    if (*ret_conn || r == -EIO)
        return agent_err_set_retryable(err, r, "glance: %s %s: %s", rq->method, url, detail);
    return agent_err_set(err, r, "glance: %s %s: %s", rq->method, url, detail);
}

/* Send rq, failing over between servers and retrying rounds as the header describes. Returns 0
 * with the last HTTP answer in resp (any status: see http_error()) or -errno with err set. */
static int
client_request(struct glance_client *c, const struct request *rq, struct response *resp,
               struct agent_err *err)
{
    struct agent_err last = {0};
    long backoff = c->opt.retry_backoff_ms;
    unsigned attempts = 0;
    int last_r = 0;

    for (long round = 0; round <= c->num_retries; round++) {
        if (round > 0) {
            log_debug(LOG_GLANCE, "glance: %s %s: every server failed, round %ld of %ld in %ld"
                      " ms", rq->method, rq->path, round + 1, c->num_retries + 1, backoff);
            sleep_ms(backoff);
            if (backoff < c->opt.retry_backoff_ms * BACKOFF_MAX_FACTOR)
                backoff *= 2;
        }
        for (size_t k = 0; k < c->n_servers; k++) {
            size_t idx = (c->current + k) % c->n_servers;
            struct agent_err e = {0};
            bool conn = false;
            int r;

            response_reset(resp);
            attempts++;
            r = perform_once(c, c->servers[idx], rq, resp, &conn, &e);
            bool replayable = !rq->up || (rq->up->pulled == 0 && rq->up->read_r == 0);
            if (r == 0) {
                if (!status_try_next_server(resp->status) || !replayable) {
                    c->current = idx;
                    return 0;
                }
                last_r = 0;
                continue;
            }
            if (!conn || !replayable) {
                if (err && err->code == 0)
                    *err = e;
                return r;
            }
            last = e;
            last_r = r;
        }
    }
    if (last_r == 0)
        return 0; /* the last answer was a 502/503/504: the caller reports it */
    const char *last_msg = last.msg;
    if (strncmp(last_msg, "glance: ", 8) == 0)
        last_msg += 8;
    return agent_err_set_retryable(err, last_r, "glance: %s %s: no API server answered (%u"
                                   " attempt%s: %zu server%s, num_retries %ld); last: %s",
                                   rq->method, rq->path, attempts, attempts == 1 ? "" : "s",
                                   c->n_servers, c->n_servers == 1 ? "" : "s", c->num_retries,
                                   last_msg);
}

/* err for a non-2xx answer. */
static int
http_error(const struct request *rq, const struct response *resp, struct agent_err *err)
{
    char text[AGENT_ERR_MSG_MAX];
    char sent[64] = "";
    int r = glance_http_status_to_errno(resp->status);

    if (r == 0)
        r = -EPROTO;
    glance_error_text(resp->body, resp->len, text, sizeof(text));
    if (rq->up)
        snprintf(sent, sizeof(sent), " after %" PRIu64 " bytes", rq->up->pulled);
    if (resp->status >= 500)
        return agent_err_set_retryable(err, r, "glance: %s %s%s: HTTP %ld (%s)%s: %s",
                                       rq->method, resp->server, rq->path, resp->status,
                                       status_meaning(resp->status), sent, text);
    return agent_err_set(err, r, "glance: %s %s%s: HTTP %ld (%s)%s: %s", rq->method,
                         resp->server, rq->path, resp->status, status_meaning(resp->status),
                         sent, text);
}

/* client_request() plus: anything but 2xx is an error. */
static int
client_call(struct glance_client *c, const struct request *rq, struct response *resp,
            struct agent_err *err)
{
    int r = client_request(c, rq, resp, err);
    if (r < 0)
        return r;
    if (resp->status < 200 || resp->status >= 300)
        return http_error(rq, resp, err);
    return 0;
}

static void
response_freep(struct response *r)
{
    free(r->body);
}

/* Parse the image document in a 2xx answer into *ret. */
static int
image_from_response(const struct request *rq, const struct response *resp,
                    struct glance_image *ret, struct agent_err *err)
{
    json_error_t jerr;
    json_t *doc = json_loadb(resp->body ? resp->body : "", resp->len, 0, &jerr);

    if (!doc)
        return agent_err_set(err, -EPROTO, "glance: %s %s%s: answer is not JSON: %s",
                             rq->method, resp->server, rq->path, jerr.text);
    return image_from_doc(doc, ret, err);
}

/* GET the image as a document (for update) or as struct glance_image. */
static int
get_image_doc(struct glance_client *c, const char *id, json_t **ret, struct agent_err *err)
{
    _cleanup_(response_freep) struct response resp = {0};
    _cleanup_free_ char *path = NULL;
    json_error_t jerr;
    int r;

    if (asprintf(&path, "/v2/images/%s", id) < 0)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    struct request rq = {.method = "GET", .path = path};
    r = client_call(c, &rq, &resp, err);
    if (r < 0)
        return r;
    json_t *doc = json_loadb(resp.body ? resp.body : "", resp.len, 0, &jerr);
    if (!json_is_object(doc)) {
        json_decref(doc);
        return agent_err_set(err, -EPROTO, "glance: GET %s%s: answer is not a JSON object%s%s",
                             resp.server, path, doc ? "" : ": ", doc ? "" : jerr.text);
    }
    *ret = doc;
    return 0;
}

int
glance_image_get(struct glance_client *c, const char *id, struct glance_image *ret,
                 struct agent_err *err)
{
    json_t *doc = NULL;
    int r = check_id(id, err);

    if (r < 0)
        return r;
    r = get_image_doc(c, id, &doc, err);
    if (r < 0)
        return r;
    return image_from_doc(doc, ret, err);
}

int
glance_image_create(struct glance_client *c, const struct glance_prop *props, size_t n,
                    struct glance_image *ret, struct agent_err *err)
{
    _cleanup_(response_freep) struct response resp = {0};
    _cleanup_free_ char *body = NULL;
    json_auto_t *o = json_object();
    int r;

    if (!o)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *v = NULL;
        r = check_prop_name(&props[i], err);
        if (r < 0)
            return r;
        if (!props[i].value)
            return agent_err_set(err, -EINVAL, "glance: image property '%s' without a value",
                                 props[i].name);
        r = prop_value_json(&props[i], &v, err);
        if (r < 0)
            return r;
        if (json_object_set_new(o, props[i].name, v) < 0)
            return agent_err_set(err, -ENOMEM, "glance: out of memory");
    }
    body = json_dumps(o, JSON_COMPACT);
    if (!body)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");

    struct request rq = {.method = "POST", .path = "/v2/images", .content_type = "application/json",
                         .body = body, .body_len = strlen(body)};
    r = client_call(c, &rq, &resp, err);
    if (r < 0)
        return r;
    return image_from_response(&rq, &resp, ret, err);
}

/* PATCH /v2/images/{id} with a JSON patch document. */
static int
send_patch(struct glance_client *c, const char *id, const json_t *patch, struct agent_err *err)
{
    _cleanup_(response_freep) struct response resp = {0};
    _cleanup_free_ char *path = NULL, *body = NULL;

    if (asprintf(&path, "/v2/images/%s", id) < 0 || !(body = json_dumps(patch, JSON_COMPACT)))
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    struct request rq = {.method = "PATCH", .path = path,
                         .content_type = "application/openstack-images-v2.1-json-patch",
                         .body = body, .body_len = strlen(body)};
    return client_call(c, &rq, &resp, err);
}

int
glance_image_update(struct glance_client *c, const char *id, const struct glance_prop *props,
                    size_t n, struct agent_err *err)
{
    json_auto_t *image = NULL;
    json_auto_t *patch = NULL;
    int r = check_id(id, err);

    if (r < 0)
        return r;
    r = get_image_doc(c, id, &image, err);
    if (r < 0)
        return r;
    r = patch_build(image, props, n, &patch, err);
    if (r < 0)
        return r;
    if (json_array_size(patch) == 0)
        return 0;
    return send_patch(c, id, patch, err);
}

int
glance_image_add_location(struct glance_client *c, const char *id, const char *url,
                          const char *metadata_json, struct agent_err *err)
{
    json_auto_t *meta = NULL;
    json_auto_t *patch = NULL;
    json_error_t jerr;
    int r = check_id(id, err);

    if (r < 0)
        return r;
    if (util_isempty(url))
        return agent_err_set(err, -EINVAL, "glance: empty location url for image %s", id);
    meta = metadata_json ? json_loads(metadata_json, 0, &jerr) : json_object();
    if (!json_is_object(meta))
        return agent_err_set(err, -EINVAL, "glance: location metadata is not a JSON object%s%s",
                             meta ? "" : ": ", meta ? "" : jerr.text);
    patch = json_pack("[{s:s, s:s, s:{s:s, s:O}}]", "op", "add", "path", "/locations/-",
                      "value", "url", url, "metadata", meta);
    if (!patch)
        return agent_err_set(err, -EINVAL, "glance: cannot build the location patch (url not"
                             " UTF-8?)");
    return send_patch(c, id, patch, err);
}

int
glance_image_delete(struct glance_client *c, const char *id, struct agent_err *err)
{
    _cleanup_(response_freep) struct response resp = {0};
    _cleanup_free_ char *path = NULL;
    int r = check_id(id, err);

    if (r < 0)
        return r;
    if (asprintf(&path, "/v2/images/%s", id) < 0)
        return agent_err_set(err, -ENOMEM, "glance: out of memory");
    struct request rq = {.method = "DELETE", .path = path};
    return client_call(c, &rq, &resp, err);
}

/* After the 204: what Glance stored must be what we sent. */
static int
verify_upload(const char *id, const struct glance_image *img,
              const struct glance_upload_result *res, struct agent_err *err)
{
    const char *ours = NULL;

    if (img->status != GLANCE_IMAGE_ACTIVE)
        return agent_err_set(err, -EIO, "glance: image %s after upload: status '%s', expected"
                             " active", id, img->status_text ? img->status_text : "(none)");
    if (img->size < 0 || (uint64_t)img->size != res->bytes)
        return agent_err_set(err, -EIO, "glance: image %s after upload: size %" PRId64 ", but %"
                             PRIu64 " bytes were sent", id, img->size, res->bytes);
    if (!img->checksum || strcasecmp(img->checksum, res->md5) != 0)
        return agent_err_set(err, -EIO, "glance: image %s after upload: checksum (md5) %s, the"
                             " bytes sent have %s", id, img->checksum ? img->checksum : "null",
                             res->md5);
    if (!img->os_hash_algo)
        return agent_err_set(err, -EIO, "glance: image %s after upload: no os_hash_algo", id);
    if (strcasecmp(img->os_hash_algo, res->os_hash_algo) == 0)
        ours = res->os_hash_value;
    else if (strcasecmp(img->os_hash_algo, "sha256") == 0)
        ours = res->sha256;
    else if (strcasecmp(img->os_hash_algo, "md5") == 0)
        ours = res->md5;
    if (!ours)
        return agent_err_set(err, -EIO, "glance: image %s after upload: os_hash_algo is %s but"
                             " the agent computed %s (set the upload's hash algorithm to glance's"
                             " hashing_algorithm)", id, img->os_hash_algo, res->os_hash_algo);
    if (!img->os_hash_value || strcasecmp(img->os_hash_value, ours) != 0)
        return agent_err_set(err, -EIO, "glance: image %s after upload: os_hash_value (%s) %s,"
                             " the bytes sent have %s", id, img->os_hash_algo,
                             img->os_hash_value ? img->os_hash_value : "null", ours);
    return 0;
}

int
glance_image_upload(struct glance_client *c, const char *id,
                    const struct glance_upload_source *src, struct glance_upload_result *res,
                    struct agent_err *err)
{
    _cleanup_(glance_image_release) struct glance_image img = {0};
    _cleanup_(response_freep) struct response resp = {0};
    _cleanup_free_ char *path = NULL;
    struct upload u = {.src = src};
    const char *algo;
    double t0;
    int r;

    *res = (struct glance_upload_result){0};
    r = check_id(id, err);
    if (r < 0)
        return r;
    if (!src || !src->read || src->size < -1)
        return agent_err_set(err, -EINVAL, "glance: upload of image %s without a valid source", id);

    /* nova GETs the image right before the PUT too; here it also finds the hash algorithm and
     * fails a deleted image before the stream is started. */
    r = glance_image_get(c, id, &img, err);
    if (r < 0)
        return r;
    algo = src->hash_algo ? src->hash_algo : img.os_hash_algo ? img.os_hash_algo : "sha512";
    r = digests_init(&u.dg, algo, err);
    if (r < 0)
        return r;
    u.remaining = src->size;
    if (asprintf(&path, "/v2/images/%s/file", id) < 0) {
        r = agent_err_set(err, -ENOMEM, "glance: out of memory");
        goto cleanup;
    }

    struct request rq = {.method = "PUT", .path = path,
                         .content_type = "application/octet-stream", .up = &u};
    t0 = now_seconds();
    r = client_call(c, &rq, &resp, err);
    res->elapsed = now_seconds() - t0;
    res->bytes = u.pulled;
    if (r < 0)
        goto cleanup;
    r = digests_final(&u.dg, res, err);
    if (r < 0)
        goto cleanup;
    log_debug(LOG_GLANCE, "glance: image %s: %" PRIu64 " bytes in %.3f s, %s %s", id, res->bytes,
              res->elapsed, res->os_hash_algo, res->os_hash_value);

    glance_image_release(&img);
    r = glance_image_get(c, id, &img, err);
    if (r < 0)
        goto cleanup;
    r = verify_upload(id, &img, res, err);

 cleanup:
    digests_free(&u.dg);
    return r;
}
