/*
 * glance-client-check: drives backends/glance.c against a real glance-api, one case per run, for
 * tests/integration/test-glance-client.sh (which also checks the stored bytes independently).
 *
 * The image stream is a deterministic pseudo-random byte sequence (splitmix64 of the 8-byte
 * block index plus a seed), so any reader can regenerate it: "gen" writes it to stdout. Uploads
 * pull it in odd-sized reads (1 byte to ~190 KiB, never what libcurl asks for) to exercise short
 * reads.
 *
 * Usage: glance-client-check [-s API_SERVER]... CASE [ARGS]
 *   (API_SERVER defaults to $GLANCE_URL)
 *   create NAME                  POST like nova-api; prints the id
 *   update ID                    nova's snapshot PATCH; checks the result
 *   upload ID SIZE SEED [exact]  stream SIZE bytes (chunked, or Content-Length with "exact");
 *                                prints "bytes md5 sha256 algo os_hash_value seconds"
 *   gen SIZE SEED                the same bytes to stdout
 *   delete ID
 *   missing | deleted-mid-upload | source-fails | reupload ID | short-source | long-source |
 *   failover | all-dead | stalled-upload | hung-server | unavailable | token-not-leaked |
 *   bad-location | location URL [SIZE] | throughput MIB
 * Each case prints "ok CASE: ..." or "FAIL CASE: ..." and exits 0 or 1 (2: usage).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "cleanup.h"
#include "err.h"
#include "glance.h"
#include "util.h"

#define MIB (1024u * 1024u)

static char *servers[8];
static size_t n_servers;
static const char *case_name = "?";

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int
fail(const char *fmt, ...)
{
    va_list ap;
    printf("FAIL %s: ", case_name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    return 1;
}

static int
ok(const char *fmt, ...)
{
    va_list ap;
    printf("ok %s: ", case_name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    return 0;
}

static double
now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- The deterministic stream ---- */

static uint64_t
splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Bytes [pos, pos+n) of the stream for seed (little-endian blocks). */
static void
stream_fill(uint64_t seed, uint64_t pos, unsigned char *buf, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint64_t block = (pos + i) / 8, v = splitmix64(block ^ (seed * 0x2545f4914f6cdd1dULL));
        unsigned off = (unsigned)((pos + i) % 8);
        if (off == 0 && n - i >= 8) {
            for (unsigned b = 0; b < 8; b++)
                buf[i + b] = (unsigned char)(v >> (8 * b));
            i += 8;
            continue;
        }
        buf[i++] = (unsigned char)(v >> (8 * off));
    }
}

struct gen {
    uint64_t seed, size, pos;
    uint64_t chunk_state; /* drives the odd read sizes */
    bool odd_reads;
    uint64_t extra; /* produce this many bytes beyond size (long-source) */
    /* Hooks at a byte position. */
    uint64_t fail_at; /* 0: never; else fail when pos reaches it */
    uint64_t hook_at;
    void (*hook)(struct gen *g);
    void *hook_data;
    bool hook_done;
};

static int
gen_read(void *opaque, void *buf, size_t len, size_t *ret_n, struct agent_err *err)
{
    struct gen *g = opaque;
    uint64_t end = g->size + g->extra;
    size_t n = len;

    if (g->hook && !g->hook_done && g->pos >= g->hook_at) {
        g->hook_done = true;
        g->hook(g);
    }
    if (g->fail_at && g->pos >= g->fail_at)
        return agent_err_set(err, -EPIPE, "test source: disk view vanished at byte %" PRIu64,
                             g->pos);
    if (g->odd_reads) {
        g->chunk_state = splitmix64(g->chunk_state);
        size_t want = (size_t)(g->chunk_state % (190u * 1024u)) | 1u;
        if (g->chunk_state % 17 == 0)
            want = 1;
        if (want < n)
            n = want;
    }
    if (n > end - g->pos)
        n = (size_t)(end - g->pos);
    stream_fill(g->seed, g->pos, buf, n);
    g->pos += n;
    *ret_n = n;
    return 0;
}

/* ---- Helpers ---- */

static int
client(long num_retries, const char *token, struct glance_client **ret, struct agent_err *err)
{
    return glance_client_new(servers, num_retries, token,
                             "req-6c0e7b2a-1f2e-4a57-9f0e-2b1d3c4e5f60", ret, err);
}

/* An image created the way nova-api's create_image() does (flow step 1). */
static int
create_nova_image(struct glance_client *c, const char *name, char *ret_id,
                  struct agent_err *err)
{
    _cleanup_(glance_image_release) struct glance_image img = {0};
    const struct glance_prop props[] = {
        {"min_disk", "1"},
        {"min_ram", "0"},
        {"base_image_ref", "155d900f-4e14-4e4c-a73d-069cbf4541e6"},
        {"hw_qemu_guest_agent", "yes"},
        {"owner_user_name", "demo"},
        {"owner_project_name", "demo"},
        {"boot_roles", "reader,member"},
        {"instance_uuid", "178b0921-8f85-4257-88b6-2e743b5a975c"},
        {"user_id", "8a3f8c4e2b2a4e0f9d1c6b5a4e3d2c1b"},
        {"image_type", "snapshot"},
        {"name", name},
        {"visibility", "private"},
    };
    int r = glance_image_create(c, props, ELEMENTSOF(props), &img, err);
    if (r < 0)
        return r;
    if (img.status != GLANCE_IMAGE_QUEUED)
        return agent_err_set(err, -EPROTO, "new image is %s, not queued", img.status_text);
    util_strlcpy(ret_id, img.id, GLANCE_ID_MAX);
    return 0;
}

/* What nova's libvirt snapshot() sets before the upload (flow: the PATCH). */
static int
nova_update(struct glance_client *c, const char *id, const char *disk_format,
            struct agent_err *err)
{
    const struct glance_prop props[] = {
        {"image_location", "snapshot"},
        {"image_state", "available"},
        {"owner_id", "6f70656e737461636b20342065766572"},
        {"disk_format", disk_format},
        {"container_format", "bare"},
    };
    return glance_image_update(c, id, props, ELEMENTSOF(props), err);
}

static int
status_of(struct glance_client *c, const char *id, enum glance_image_status *ret,
          struct agent_err *err)
{
    _cleanup_(glance_image_release) struct glance_image img = {0};
    int r = glance_image_get(c, id, &img, err);
    if (r < 0)
        return r;
    *ret = img.status;
    return 0;
}

/* Wait up to 15 s for the image to leave "saving" (Glance notices a dropped upload a little
 * after the client gave up). */
static int
settled_status(struct glance_client *c, const char *id, enum glance_image_status *ret,
               struct agent_err *err)
{
    for (int i = 0; i < 150; i++) {
        int r = status_of(c, id, ret, err);
        if (r < 0 || *ret != GLANCE_IMAGE_SAVING)
            return r;
        usleep(100000);
    }
    return 0;
}

static void
delete_quietly(struct glance_client *c, const char *id)
{
    struct agent_err e = {0};
    glance_image_delete(c, id, &e);
}

/* A loopback URL nobody listens on: bind port 0, note the port, close. */
static char *
dead_url(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    char *url = NULL;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0
        || getsockname(fd, (struct sockaddr *)&a, &l) < 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    close(fd);
    if (asprintf(&url, "http://127.0.0.1:%u", ntohs(a.sin_port)) < 0)
        return NULL;
    return url;
}

static int
do_upload(struct glance_client *c, const char *id, struct gen *g, bool exact,
          struct glance_upload_result *res, struct agent_err *err)
{
    struct glance_upload_source src = {.read = gen_read, .opaque = g,
                                       .size = exact ? (int64_t)g->size : -1};
    return glance_image_upload(c, id, &src, res, err);
}

/* ---- Cases ---- */

static int
case_create(const char *name)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct agent_err err = {0};
    char id[GLANCE_ID_MAX];

    if (client(0, NULL, &c, &err) < 0 || create_nova_image(c, name, id, &err) < 0)
        return fail("%s", err.msg);
    printf("%s\n", id);
    return 0;
}

static int
case_update(const char *id)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    _cleanup_(glance_image_release) struct glance_image img = {0};
    struct agent_err err = {0};

    if (client(0, NULL, &c, &err) < 0 || nova_update(c, id, "raw", &err) < 0
        || glance_image_get(c, id, &img, &err) < 0)
        return fail("%s", err.msg);
    static const char *const expect[][2] = {
        {"image_location", "snapshot"}, {"image_state", "available"},
        {"owner_id", "6f70656e737461636b20342065766572"}, {"disk_format", "raw"},
        {"container_format", "bare"}, {"image_type", "snapshot"},
        {"base_image_ref", "155d900f-4e14-4e4c-a73d-069cbf4541e6"},
    };
    for (size_t i = 0; i < ELEMENTSOF(expect); i++) {
        const char *v = glance_image_property(&img, expect[i][0]);
        if (!v || strcmp(v, expect[i][1]) != 0)
            return fail("%s is '%s', expected '%s'", expect[i][0], v ? v : "(none)",
                        expect[i][1]);
    }
    if (!img.disk_format || strcmp(img.disk_format, "raw") != 0
        || img.status != GLANCE_IMAGE_QUEUED)
        return fail("fields: disk_format %s, status %s", img.disk_format, img.status_text);
    /* Same values again: nothing to change, no PATCH; a changed one is a "replace". */
    if (nova_update(c, id, "raw", &err) < 0)
        return fail("second update: %s", err.msg);
    const struct glance_prop change[] = {{"image_state", "pending"}, {"min_disk", "2"}};
    glance_image_release(&img);
    if (glance_image_update(c, id, change, ELEMENTSOF(change), &err) < 0
        || glance_image_get(c, id, &img, &err) < 0)
        return fail("replace: %s", err.msg);
    if (strcmp(glance_image_property(&img, "image_state"), "pending") != 0)
        return fail("image_state not replaced");
    const struct glance_prop back[] = {{"image_state", "available"}};
    if (glance_image_update(c, id, back, 1, &err) < 0)
        return fail("%s", err.msg);
    return ok("add/replace properties and formats as nova does");
}

static int
case_upload(const char *id, uint64_t size, uint64_t seed, bool exact)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct gen g = {.seed = seed, .size = size, .odd_reads = true, .chunk_state = seed};
    struct glance_upload_result res;
    struct agent_err err = {0};

    if (client(0, NULL, &c, &err) < 0 || do_upload(c, id, &g, exact, &res, &err) < 0)
        return fail("%s (after %" PRIu64 " bytes)", err.msg, g.pos);
    if (res.bytes != size)
        return fail("result says %" PRIu64 " bytes, sent %" PRIu64, res.bytes, size);
    printf("%" PRIu64 " %s %s %s %s %.3f\n", res.bytes, res.md5, res.sha256, res.os_hash_algo,
           res.os_hash_value, res.elapsed);
    return 0;
}

static int
case_gen(uint64_t size, uint64_t seed)
{
    static unsigned char buf[MIB];
    struct gen g = {.seed = seed, .size = size, .odd_reads = false};
    struct agent_err err = {0};

    while (g.pos < size) {
        size_t n = 0;
        gen_read(&g, buf, sizeof(buf), &n, &err);
        if (fwrite(buf, 1, n, stdout) != n)
            return 2;
    }
    return fflush(stdout) == 0 ? 0 : 2;
}

static int
case_delete(const char *id)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct agent_err err = {0};
    enum glance_image_status st;
    int r;

    if (client(0, NULL, &c, &err) < 0 || glance_image_delete(c, id, &err) < 0)
        return fail("%s", err.msg);
    agent_err_clear(&err);
    r = status_of(c, id, &st, &err);
    if (r != -ENOENT)
        return fail("GET after delete: %d %s", r, err.msg);
    agent_err_clear(&err);
    r = glance_image_delete(c, id, &err);
    if (r != -ENOENT)
        return fail("second delete: %d, expected -ENOENT", r);
    return ok("deleted; GET and a second DELETE say -ENOENT (%s)", err.msg);
}

static int
case_missing(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct gen g = {.seed = 1, .size = 4 * MIB, .odd_reads = true};
    struct glance_upload_result res;
    struct agent_err err = {0};
    char id[37];

    util_random_uuid(id);
    if (client(0, NULL, &c, &err) < 0)
        return fail("%s", err.msg);
    int r = do_upload(c, id, &g, false, &res, &err);
    if (r != -ENOENT || !strstr(err.msg, "deleted") || !strstr(err.msg, id))
        return fail("got %d '%s', expected -ENOENT naming the image", r, err.msg);
    if (g.pos != 0)
        return fail("%" PRIu64 " bytes pulled from the source", g.pos);
    return ok("%s", err.msg);
}

struct deleter {
    const char *id;
    int r;
    struct agent_err err;
};

static void *
deleter_thread(void *p)
{
    struct deleter *d = p;
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;

    d->r = client(0, NULL, &c, &d->err);
    if (d->r == 0)
        d->r = glance_image_delete(c, d->id, &d->err);
    return NULL;
}

/* At half the stream: another thread, with its own client, deletes the image; the stream goes
 * on once the DELETE was answered. */
static void
delete_hook(struct gen *g)
{
    struct deleter *d = g->hook_data;
    pthread_t t;

    if (pthread_create(&t, NULL, deleter_thread, d) != 0) {
        d->r = -EAGAIN;
        return;
    }
    pthread_join(t, NULL);
}

static int
case_deleted_mid_upload(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct glance_upload_result res;
    struct agent_err err = {0};
    char id[GLANCE_ID_MAX];
    int r;

    if (client(0, NULL, &c, &err) < 0 || create_nova_image(c, "ca-test-deleted", id, &err) < 0
        || nova_update(c, id, "raw", &err) < 0)
        return fail("setup: %s", err.msg);
    struct deleter d = {.id = id};
    struct gen g = {.seed = 7, .size = 64 * MIB, .odd_reads = true, .chunk_state = 7,
                    .hook_at = 32 * MIB, .hook = delete_hook, .hook_data = &d};
    r = do_upload(c, id, &g, false, &res, &err);
    if (d.r != 0) {
        delete_quietly(c, id);
        return fail("the delete from the other thread failed: %s", d.err.msg);
    }
    if (r != -ENOENT || !strstr(err.msg, "image deleted"))
        return fail("got %d '%s', expected -ENOENT saying image deleted", r, err.msg);
    return ok("%s", err.msg);
}

static int
case_source_fails(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct glance_upload_result res;
    struct agent_err err = {0};
    enum glance_image_status st;
    char id[GLANCE_ID_MAX], want[128];
    int r, rr;

    if (client(0, NULL, &c, &err) < 0 || create_nova_image(c, "ca-test-srcfail", id, &err) < 0
        || nova_update(c, id, "raw", &err) < 0)
        return fail("setup: %s", err.msg);
    struct gen g = {.seed = 3, .size = 64 * MIB, .odd_reads = true, .chunk_state = 3,
                    .fail_at = 10 * MIB};
    r = do_upload(c, id, &g, false, &res, &err);
    snprintf(want, sizeof(want), "test source: disk view vanished at byte %" PRIu64, g.pos);
    struct agent_err e2 = {0};
    rr = settled_status(c, id, &st, &e2);
    delete_quietly(c, id);
    if (r != -EPIPE || strcmp(err.msg, want) != 0)
        return fail("got %d '%s', expected -EPIPE '%s'", r, err.msg, want);
    if (res.bytes != g.pos || res.bytes < 10 * MIB)
        return fail("result bytes %" PRIu64 ", source at %" PRIu64, res.bytes, g.pos);
    if (rr < 0)
        return fail("GET after the abort: %s", e2.msg);
    if (st != GLANCE_IMAGE_QUEUED)
        return fail("image is %s after the aborted upload, expected queued",
                    glance_image_status_to_string(st));
    return ok("callback's error returned as is ('%s'), image back to queued", err.msg);
}

static int
case_reupload(const char *id)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct gen g = {.seed = 9, .size = 4 * MIB, .odd_reads = true};
    struct glance_upload_result res;
    struct agent_err err = {0};

    if (client(0, NULL, &c, &err) < 0)
        return fail("%s", err.msg);
    int r = do_upload(c, id, &g, false, &res, &err);
    if (r != -EBUSY || !strstr(err.msg, "409"))
        return fail("got %d '%s', expected -EBUSY (409)", r, err.msg);
    if (g.pos != 0)
        return fail("%" PRIu64 " bytes pulled though glance refused up front", g.pos);
    return ok("%s; 0 bytes pulled (Expect: 100-continue)", err.msg);
}

/* Declared size and actual stream disagree: refused, image not active. */
static int
case_size_mismatch(bool longer)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct glance_upload_result res;
    struct agent_err err = {0};
    enum glance_image_status st;
    char id[GLANCE_ID_MAX];

    if (client(0, NULL, &c, &err) < 0 || create_nova_image(c, "ca-test-size", id, &err) < 0
        || nova_update(c, id, "raw", &err) < 0)
        return fail("setup: %s", err.msg);
    struct gen g = {.seed = 5, .size = 3 * MIB + 17, .odd_reads = true, .chunk_state = 5};
    struct glance_upload_source src = {.read = gen_read, .opaque = &g,
                                       .size = (int64_t)g.size + (longer ? 0 : 1000)};
    if (longer)
        g.extra = 1000;
    int r = glance_image_upload(c, id, &src, &res, &err);
    struct agent_err e2 = {0};
    int rr = settled_status(c, id, &st, &e2);
    delete_quietly(c, id);
    if (r != -EIO || !strstr(err.msg, longer ? "longer than its declared size" : "short of its"))
        return fail("got %d '%s'", r, err.msg);
    if (rr < 0 || st == GLANCE_IMAGE_ACTIVE)
        return fail("image %s after a bad stream: %s", glance_image_status_to_string(st), e2.msg);
    return ok("%s; image %s", err.msg, glance_image_status_to_string(st));
}

static int
case_failover(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    _cleanup_free_ char *dead = dead_url();
    struct glance_upload_result res;
    struct agent_err err = {0};
    char id[GLANCE_ID_MAX];
    int r;

    if (!dead || n_servers != 1)
        return fail("needs exactly one live server and a free port");
    /* nova-style entry without a scheme, with a version suffix: both normalised away. */
    _cleanup_free_ char *live = NULL;
    const char *hostport = strstr(servers[0], "://") ? strstr(servers[0], "://") + 3 : servers[0];
    if (asprintf(&live, "%s/v2/", hostport) < 0)
        return fail("oom");
    char *list[] = {dead, live, NULL};
    if (glance_client_new(list, 0, NULL, NULL, &c, &err) < 0)
        return fail("%s", err.msg);
    struct glance_options o;
    glance_options_default(&o);
    o.connect_timeout_ms = 2000;
    if (glance_client_set_options(c, &o, &err) < 0)
        return fail("%s", err.msg);

    double t0 = now_seconds();
    r = create_nova_image(c, "ca-test-failover", id, &err);
    if (r < 0)
        return fail("create with %s dead first: %s", dead, err.msg);
    struct gen g = {.seed = 11, .size = 2 * MIB + 1, .odd_reads = true, .chunk_state = 11};
    r = nova_update(c, id, "raw", &err);
    if (r == 0)
        r = do_upload(c, id, &g, false, &res, &err);
    delete_quietly(c, id);
    if (r < 0)
        return fail("%s", err.msg);
    return ok("[%s, %s]: create, update, upload (%" PRIu64 " bytes) and delete in %.2f s", dead,
              live, res.bytes, now_seconds() - t0);
}

static int
case_all_dead(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    _cleanup_free_ char *d1 = dead_url(), *d2 = dead_url();
    _cleanup_(glance_image_release) struct glance_image img = {0};
    struct gen g = {.seed = 1, .size = MIB, .odd_reads = true};
    struct glance_upload_result res;
    struct agent_err err = {0};
    char *list[] = {d1, d2, NULL};
    struct glance_options o;

    if (!d1 || !d2)
        return fail("no free ports");
    if (glance_client_new(list, 2, NULL, NULL, &c, &err) < 0)
        return fail("%s", err.msg);
    glance_options_default(&o);
    o.retry_backoff_ms = 200;
    glance_client_set_options(c, &o, &err);

    double t0 = now_seconds();
    int r = glance_image_get(c, "4021271f-0003-4e31-96ec-4692b1c88ffc", &img, &err);
    double dt = now_seconds() - t0;
    if (r != -ECONNREFUSED || !err.retryable || !strstr(err.msg, "6 attempts")
        || !strstr(err.msg, "no API server answered") || !strstr(err.msg, "Connection refused"))
        return fail("got %d retryable=%d '%s'", r, err.retryable, err.msg);
    /* Two pauses between the three rounds: 200 + 400 ms. */
    if (dt < 0.55)
        return fail("gave up after %.3f s: no backoff between rounds", dt);
    struct agent_err e2 = {0};
    r = do_upload(c, "4021271f-0003-4e31-96ec-4692b1c88ffc", &g, false, &res, &e2);
    if (r != -ECONNREFUSED || g.pos != 0)
        return fail("upload: %d '%s', %" PRIu64 " bytes pulled", r, e2.msg, g.pos);
    return ok("%.2f s: %s", dt, err.msg);
}

/* ---- A misbehaving server on loopback (a thread): answers GET with a queued image, then
 * either hangs on PUT (reads the headers, then nothing: the upload stalls) or answers 503. ---- */

enum fake_mode {
    FAKE_HANG_PUT,
    FAKE_UNAVAILABLE,
};

struct fake {
    int fd;
    enum fake_mode mode;
    volatile bool stop;
    volatile int requests;
    pthread_t thread;
    char url[64];
};

static void
fake_reply(int fd, const char *status, const char *body)
{
    char head[256];
    int n = snprintf(head, sizeof(head), "HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n", status, strlen(body));
    if (write(fd, head, (size_t)n) < 0 || write(fd, body, strlen(body)) < 0)
        return;
}

static void *
fake_thread(void *p)
{
    struct fake *f = p;

    for (;;) {
        char buf[8192];
        size_t len = 0;
        int c = accept4(f->fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            return NULL;
        while (len + 1 < sizeof(buf)) {
            ssize_t n = read(c, buf + len, sizeof(buf) - 1 - len);
            if (n <= 0)
                break;
            len += (size_t)n;
            buf[len] = '\0';
            if (strstr(buf, "\r\n\r\n"))
                break;
        }
        buf[len] = '\0';
        f->requests++;
        if (f->mode == FAKE_UNAVAILABLE) {
            fake_reply(c, "503 Service Unavailable",
                       "{\"message\": \"fake glance is overloaded\", \"code\": \"503\"}");
        } else if (strncmp(buf, "GET ", 4) == 0) {
            fake_reply(c, "200 OK", "{\"id\": \"4021271f-0003-4e31-96ec-4692b1c88ffc\","
                       " \"status\": \"queued\", \"size\": null, \"os_hash_algo\": null}");
        } else {
            /* Never read the body, never answer: the sender's window fills and it stalls. */
            while (!f->stop)
                usleep(20000);
        }
        close(c);
        if (f->stop)
            return NULL;
    }
}

static int
fake_start(struct fake *f, enum fake_mode mode)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    int rcvbuf = 4096;

    *f = (struct fake){.mode = mode};
    f->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (f->fd < 0)
        return -errno;
    /* A small receive buffer makes the stall start after little data. */
    setsockopt(f->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    if (bind(f->fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(f->fd, 8) < 0
        || getsockname(f->fd, (struct sockaddr *)&a, &l) < 0) {
        close(f->fd);
        return -errno;
    }
    snprintf(f->url, sizeof(f->url), "http://127.0.0.1:%u", ntohs(a.sin_port));
    if (pthread_create(&f->thread, NULL, fake_thread, f) != 0) {
        close(f->fd);
        return -EAGAIN;
    }
    return 0;
}

static void
fake_stop(struct fake *f)
{
    f->stop = true;
    shutdown(f->fd, SHUT_RDWR);
    pthread_join(f->thread, NULL);
    close(f->fd);
}

/* Upload bytes went out, then the server stopped reading: the low-speed limit aborts the
 * transfer, and it is not retried (the other server is live but the stream cannot rewind). */
static int
case_stalled_upload(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct gen g = {.seed = 2, .size = 256 * MIB, .odd_reads = true, .chunk_state = 2};
    struct glance_upload_result res;
    struct agent_err err = {0};
    struct glance_options o;
    struct fake f;

    if (fake_start(&f, FAKE_HANG_PUT) < 0)
        return fail("cannot start the fake server");
    char *list[] = {f.url, servers[0], NULL};
    glance_options_default(&o);
    o.low_speed_limit = 1024;
    o.low_speed_time = 2;
    if (glance_client_new(list, 1, NULL, NULL, &c, &err) < 0
        || glance_client_set_options(c, &o, &err) < 0) {
        fake_stop(&f);
        return fail("%s", err.msg);
    }
    double t0 = now_seconds();
    int r = do_upload(c, "4021271f-0003-4e31-96ec-4692b1c88ffc", &g, false, &res, &err);
    double dt = now_seconds() - t0;
    int requests = f.requests;
    fake_stop(&f);
    if (r != -ETIMEDOUT || !strstr(err.msg, "not retried") || res.bytes == 0 || !err.retryable)
        return fail("got %d retryable=%d '%s' after %" PRIu64 " bytes", r, err.retryable,
                    err.msg, res.bytes);
    if (dt > 15 || requests != 2)
        return fail("took %.1f s, %d requests to the stalled server (expected GET + PUT)", dt,
                    requests);
    return ok("aborted after %.1f s, %" PRIu64 " bytes, no retry: %s", dt, res.bytes, err.msg);
}

/* A server that accepts connections but never answers: the metadata timeout fails it over. */
static int
case_hung_server(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    _cleanup_(glance_client_freep) struct glance_client *c2 = NULL;
    _cleanup_(glance_image_release) struct glance_image img = {0};
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    struct agent_err err = {0}, e2 = {0};
    struct glance_options o;
    char url[64], id[GLANCE_ID_MAX];
    _cleanup_close_ int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 8) < 0
        || getsockname(fd, (struct sockaddr *)&a, &l) < 0)
        return fail("cannot listen");
    snprintf(url, sizeof(url), "http://127.0.0.1:%u", ntohs(a.sin_port));
    char *list[] = {url, servers[0], NULL};
    glance_options_default(&o);
    o.request_timeout_ms = 1000;
    if (glance_client_new(list, 0, NULL, NULL, &c, &err) < 0
        || glance_client_set_options(c, &o, &err) < 0)
        return fail("%s", err.msg);
    double t0 = now_seconds();
    if (create_nova_image(c, "ca-test-hung", id, &err) < 0)
        return fail("create with a hung server first: %s", err.msg);
    double dt = now_seconds() - t0;
    delete_quietly(c, id);

    char *only[] = {url, NULL};
    if (glance_client_new(only, 0, NULL, NULL, &c2, &e2) < 0
        || glance_client_set_options(c2, &o, &e2) < 0)
        return fail("%s", e2.msg);
    int r = glance_image_get(c2, "4021271f-0003-4e31-96ec-4692b1c88ffc", &img, &e2);
    if (r != -ETIMEDOUT || !e2.retryable)
        return fail("hung server alone: %d '%s'", r, e2.msg);
    return ok("failed over after %.1f s; alone: %s", dt, e2.msg);
}

/* 503 from the first server: the request goes to the next; from every server: -EIO, retryable,
 * with the server's text. */
static int
case_unavailable(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    _cleanup_(glance_client_freep) struct glance_client *c2 = NULL;
    _cleanup_(glance_image_release) struct glance_image img = {0};
    struct agent_err err = {0}, e2 = {0};
    struct glance_options o;
    char id[GLANCE_ID_MAX];
    struct fake f;

    if (fake_start(&f, FAKE_UNAVAILABLE) < 0)
        return fail("cannot start the fake server");
    char *list[] = {f.url, servers[0], NULL};
    char *only[] = {f.url, NULL};
    glance_options_default(&o);
    o.retry_backoff_ms = 50;
    int r = glance_client_new(list, 0, NULL, NULL, &c, &err);
    if (r == 0)
        r = create_nova_image(c, "ca-test-503", id, &err);
    if (r == 0)
        delete_quietly(c, id);
    int first = f.requests;
    int r2 = glance_client_new(only, 1, NULL, NULL, &c2, &e2);
    if (r2 == 0)
        r2 = glance_client_set_options(c2, &o, &e2);
    if (r2 == 0)
        r2 = glance_image_get(c2, "4021271f-0003-4e31-96ec-4692b1c88ffc", &img, &e2);
    int total = f.requests;
    fake_stop(&f);
    if (r < 0 || first != 1)
        return fail("503 then live: %d '%s', %d requests to the 503 server", r, err.msg, first);
    if (r2 != -EIO || !e2.retryable || !strstr(e2.msg, "503")
        || !strstr(e2.msg, "fake glance is overloaded") || total - first != 2)
        return fail("503 only: %d retryable=%d '%s', %d tries", r2, e2.retryable, e2.msg,
                    total - first);
    return ok("failed over past a 503; alone (num_retries 1, 2 tries): %s", e2.msg);
}

static int
case_token_not_leaked(void)
{
    static const char token[] = "gAAAAABsecret-token-must-not-leak";
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    _cleanup_(glance_image_release) struct glance_image img = {0};
    _cleanup_free_ char *dead = dead_url();
    struct agent_err err = {0}, e2 = {0}, e3 = {0};
    char id[37];
    char *list[] = {servers[0], NULL};

    util_random_uuid(id);
    if (glance_client_new(list, 0, token, NULL, &c, &err) < 0)
        return fail("%s", err.msg);
    int r = glance_image_get(c, id, &img, &err);
    if (r != -ENOENT || strstr(err.msg, "secret-token"))
        return fail("%d '%s'", r, err.msg);
    glance_client_free(c);
    c = NULL;
    char *dl[] = {dead, NULL};
    if (glance_client_new(dl, 0, token, NULL, &c, &e2) < 0)
        return fail("%s", e2.msg);
    r = glance_image_delete(c, id, &e2);
    if (r != -ECONNREFUSED || strstr(e2.msg, "secret-token"))
        return fail("%d '%s'", r, e2.msg);
    r = glance_client_new(dl, 0, "bad\r\nX-Injected: 1", NULL, &c, &e3);
    if (r != -EINVAL)
        return fail("a token with CR LF was accepted");
    return ok("404 and connection errors name no token; CR/LF in a token refused");
}

static int
case_bad_location(void)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct agent_err err = {0}, e2 = {0};
    char id[GLANCE_ID_MAX];

    if (client(0, NULL, &c, &err) < 0 || create_nova_image(c, "ca-test-badloc", id, &err) < 0)
        return fail("setup: %s", err.msg);
    /* Glance refuses file:// locations from clients (restricted scheme). */
    int r = glance_image_add_location(c, id, "file:///etc/passwd", "{}", &err);
    int r2 = glance_image_add_location(c, id, "rbd://x/images/y/snap", "[1]", &e2);
    delete_quietly(c, id);
    if (r != -EINVAL || !strstr(err.msg, "PATCH") || !strstr(err.msg, "400"))
        return fail("file:// location: %d '%s', expected -EINVAL from a 400", r, err.msg);
    if (r2 != -EINVAL)
        return fail("metadata not an object accepted: %d", r2);
    return ok("%s", err.msg);
}

static int
case_location(const char *url, int64_t size)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    _cleanup_(glance_image_release) struct glance_image img = {0};
    struct agent_err err = {0};
    char id[GLANCE_ID_MAX];
    int r;

    if (client(0, NULL, &c, &err) < 0 || create_nova_image(c, "ca-test-rbdloc", id, &err) < 0)
        return fail("setup: %s", err.msg);
    /* nova's direct snapshot: formats first (update), then the location. */
    r = nova_update(c, id, "raw", &err);
    if (r == 0)
        r = glance_image_add_location(c, id, url, NULL, &err);
    if (r == 0)
        r = glance_image_get(c, id, &img, &err);
    if (r < 0) {
        delete_quietly(c, id);
        return fail("%s", err.msg);
    }
    if (img.status != GLANCE_IMAGE_ACTIVE || (size >= 0 && img.size != size)) {
        delete_quietly(c, id);
        return fail("image %s, size %" PRId64 " after add location", img.status_text, img.size);
    }
    printf("%s\n", id);
    return ok("location %s: image active, size %" PRId64, url, img.size);
}

static int
case_throughput(uint64_t mib)
{
    _cleanup_(glance_client_freep) struct glance_client *c = NULL;
    struct glance_upload_result res;
    struct agent_err err = {0};
    char id[GLANCE_ID_MAX];

    if (client(0, NULL, &c, &err) < 0 || create_nova_image(c, "ca-test-throughput", id, &err) < 0
        || nova_update(c, id, "raw", &err) < 0)
        return fail("setup: %s", err.msg);
    struct gen g = {.seed = 42, .size = mib * MIB, .odd_reads = false};
    double t0 = now_seconds();
    int r = do_upload(c, id, &g, false, &res, &err);
    double total = now_seconds() - t0;
    delete_quietly(c, id);
    if (r < 0)
        return fail("%s", err.msg);
    return ok("%" PRIu64 " MiB: PUT %.2f s = %.1f MiB/s; with GET and verify %.2f s = %.1f MiB/s",
              mib, res.elapsed, (double)mib / res.elapsed, total, (double)mib / total);
}

static uint64_t
parse_u64(const char *s)
{
    long v;
    if (util_parse_long(s, 0, LONG_MAX, &v) < 0) {
        fprintf(stderr, "not a number: %s\n", s);
        exit(2);
    }
    return (uint64_t)v;
}

int
main(int argc, char **argv)
{
    struct agent_err err = {0};
    int opt;

    while ((opt = getopt(argc, argv, "s:")) != -1) {
        if (opt != 's' || n_servers + 1 >= ELEMENTSOF(servers)) {
            fprintf(stderr, "usage: %s [-s API_SERVER]... CASE [ARGS]\n", argv[0]);
            return 2;
        }
        servers[n_servers++] = optarg;
    }
    if (n_servers == 0 && getenv("GLANCE_URL"))
        servers[n_servers++] = getenv("GLANCE_URL");
    if (optind >= argc || n_servers == 0) {
        fprintf(stderr, "usage: %s [-s API_SERVER]... CASE [ARGS] (or set GLANCE_URL)\n",
                argv[0]);
        return 2;
    }
    if (http_global_init(&err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    const char *cmd = argv[optind];
    int nargs = argc - optind - 1;
    char **a = argv + optind + 1;
    int r = 2;
    case_name = cmd;

    if (strcmp(cmd, "create") == 0 && nargs == 1)
        r = case_create(a[0]);
    else if (strcmp(cmd, "update") == 0 && nargs == 1)
        r = case_update(a[0]);
    else if (strcmp(cmd, "upload") == 0 && (nargs == 3 || nargs == 4))
        r = case_upload(a[0], parse_u64(a[1]), parse_u64(a[2]),
                        nargs == 4 && strcmp(a[3], "exact") == 0);
    else if (strcmp(cmd, "gen") == 0 && nargs == 2)
        r = case_gen(parse_u64(a[0]), parse_u64(a[1]));
    else if (strcmp(cmd, "delete") == 0 && nargs == 1)
        r = case_delete(a[0]);
    else if (strcmp(cmd, "missing") == 0 && nargs == 0)
        r = case_missing();
    else if (strcmp(cmd, "deleted-mid-upload") == 0 && nargs == 0)
        r = case_deleted_mid_upload();
    else if (strcmp(cmd, "source-fails") == 0 && nargs == 0)
        r = case_source_fails();
    else if (strcmp(cmd, "reupload") == 0 && nargs == 1)
        r = case_reupload(a[0]);
    else if (strcmp(cmd, "short-source") == 0 && nargs == 0)
        r = case_size_mismatch(false);
    else if (strcmp(cmd, "long-source") == 0 && nargs == 0)
        r = case_size_mismatch(true);
    else if (strcmp(cmd, "failover") == 0 && nargs == 0)
        r = case_failover();
    else if (strcmp(cmd, "all-dead") == 0 && nargs == 0)
        r = case_all_dead();
    else if (strcmp(cmd, "stalled-upload") == 0 && nargs == 0)
        r = case_stalled_upload();
    else if (strcmp(cmd, "hung-server") == 0 && nargs == 0)
        r = case_hung_server();
    else if (strcmp(cmd, "unavailable") == 0 && nargs == 0)
        r = case_unavailable();
    else if (strcmp(cmd, "token-not-leaked") == 0 && nargs == 0)
        r = case_token_not_leaked();
    else if (strcmp(cmd, "bad-location") == 0 && nargs == 0)
        r = case_bad_location();
    else if (strcmp(cmd, "location") == 0 && (nargs == 1 || nargs == 2))
        r = case_location(a[0], nargs == 2 ? (int64_t)parse_u64(a[1]) : -1);
    else if (strcmp(cmd, "throughput") == 0 && nargs == 1)
        r = case_throughput(parse_u64(a[0]));
    else
        fprintf(stderr, "unknown case or wrong arguments: %s\n", cmd);

    http_global_cleanup();
    return r;
}
