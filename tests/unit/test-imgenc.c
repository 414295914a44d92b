/* Unit tests for backends/imgenc.c, the streaming image encoder. Each case encodes a disk
 * described by an extent map from a generated in-memory source (its content is a function of the
 * offset, so a 2 TiB disk costs nothing), writes the stream to a file under /tmp (the test writes
 * files, the encoder never does) and lets qemu-img judge it: `check` must be clean, `compare`
 * against the source written out as a sparse raw file must find them identical, `info` must show
 * the virtual size and `map` must show DATA clusters as data, ZERO-only clusters as present zeros
 * and untouched clusters as absent. The source also checks that it is read only inside DATA
 * extents, in increasing order within each pass. qemu-img (qemu-utils, installed by
 * deploy/install-packages.sh) is required. */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "err.h"
#include "imgenc.h"
#include "test.h"

extern char **environ;

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)
#define TiB (UINT64_C(1) << 40)
#define MAX_EXTENTS 256
#define NO_FAIL UINT64_MAX
#define D IMGENC_EXTENT_DATA
#define Z IMGENC_EXTENT_ZERO

enum pattern {
    PAT_TEXT,   /* compresses well */
    PAT_RANDOM, /* does not compress */
    PAT_MIXED,  /* 16 KiB blocks of text, random bytes or zeros */
    PAT_ZERO,   /* DATA extents that happen to hold zeros */
    PAT_VARIED, /* as PAT_MIXED, but each 2 KiB of text starts with 600..1300 random bytes */
};

static uint64_t
mix64(uint64_t x)
{
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

/* One of the plain patterns over [o, o + len). */
static void
fill_plain(enum pattern pat, uint8_t *buf, size_t len, uint64_t o)
{
    static const char text[] = "the quick brown fox jumps over the lazy dog; 0123456789 ";
    uint64_t word = mix64(o >> 3);

    for (size_t i = 0; i < len; i++, o++) {
        if (pat == PAT_TEXT) {
            buf[i] = (uint8_t)text[(o + (o >> 10)) % (sizeof(text) - 1)];
        } else if (pat == PAT_RANDOM) {
            if ((o & 7) == 0)
                word = mix64(o >> 3);
            buf[i] = (uint8_t)(word >> ((o & 7) * 8));
        } else {
            buf[i] = 0;
        }
    }
}

/* The content of the source at [off, off + len): a function of the offset only. The mixed
 * patterns decide per 16 KiB block, and per 2 KiB piece for the random prefix of PAT_VARIED. */
static void
fill(enum pattern pat, uint8_t *buf, size_t len, uint64_t off)
{
    while (len > 0) {
        size_t n = 2048 - (off & 2047), cut = 0;
        enum pattern p = pat;
        if (n > len)
            n = len;
        if (pat == PAT_MIXED || pat == PAT_VARIED) {
            uint64_t h = mix64(off >> 14) % 4;
            p = h == 0 ? PAT_RANDOM : h == 1 ? PAT_ZERO : PAT_TEXT;
            if (pat == PAT_VARIED && p == PAT_TEXT) {
                uint64_t prefix = 600 + mix64(off >> 11) % 700, in = off & 2047;
                cut = prefix > in ? (size_t)(prefix - in) : 0;
                if (cut > n)
                    cut = n;
            }
        }
        fill_plain(PAT_RANDOM, buf, cut, off);
        fill_plain(p, buf + cut, n - cut, off + cut);
        buf += n;
        off += n;
        len -= n;
    }
}

/* The fake NBD export. */
struct src {
    const struct imgenc_extent *x;
    size_t n;
    enum pattern pat;
    enum pattern pat_after; /* content once flip_after bytes were read */
    uint64_t flip_after;
    uint64_t fail_at;       /* a read covering this offset fails with -EIO */
    uint64_t last_end;
    unsigned passes;
    unsigned bad_reads;
    uint64_t bytes;
};

static int
src_pread(void *opaque, void *buf, size_t len, uint64_t offset, struct agent_err *err)
{
    struct src *s = opaque;
    bool inside = false;

    for (size_t i = 0; i < s->n; i++)
        if (s->x[i].type == D && offset >= s->x[i].offset &&
            offset + len <= s->x[i].offset + s->x[i].length)
            inside = true;
    if (!inside || len == 0 || len > IMGENC_READ_MAX) {
        fprintf(stderr, "  bad read: %zu bytes at %" PRIu64 "\n", len, offset);
        s->bad_reads++;
    }
    if (s->passes == 0 || offset < s->last_end)
        s->passes++;
    s->last_end = offset + len;
    if (s->fail_at >= offset && s->fail_at < offset + len)
        return agent_err_set(err, -EIO, "test source: injected failure at %" PRIu64, offset);
    fill(s->bytes >= s->flip_after ? s->pat_after : s->pat, buf, len, offset);
    s->bytes += len;
    return 0;
}

/* Run argv with stdout and stderr to log; returns the exit status, or -errno. */
static int
run(const char *log, char *const argv[])
{
    posix_spawn_file_actions_t fa;
    pid_t pid;
    int st, r;

    posix_spawn_file_actions_init(&fa);
    /* No O_CLOEXEC: this is the child's stdout. */
    posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    r = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (r != 0)
        return -r;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -errno;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void
print_file(const char *path)
{
    _cleanup_fclose_ FILE *f = fopen(path, "re");
    char line[512];
    int n = 0;

    while (f && fgets(line, sizeof(line), f) && n++ < 40)
        fprintf(stderr, "  | %s", line);
}

static char dir[] = "/tmp/test-imgenc-XXXXXX";
static char src_path[64], out_path[64], log_path[64];

/* Run a qemu-img command line, CHECK its exit status is 0, print its output otherwise. */
static bool
qemu_img(char *const argv[])
{
    int r = run(log_path, argv);
    CHECK(r == 0, "%s %s exited %d", argv[0], argv[1], r);
    if (r != 0)
        print_file(log_path);
    return r == 0;
}

/* Write the source disk as a sparse raw file. */
static int
write_source(const struct src *s, uint64_t vsize)
{
    _cleanup_close_ int fd = open(src_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    _cleanup_free_ uint8_t *buf = malloc(MiB);

    if (fd < 0 || !buf || ftruncate(fd, (off_t)vsize) < 0)
        return -errno;
    for (size_t i = 0; i < s->n; i++) {
        if (s->x[i].type != D)
            continue;
        for (uint64_t o = s->x[i].offset; o < s->x[i].offset + s->x[i].length;) {
            size_t len = (size_t)(s->x[i].offset + s->x[i].length - o);
            if (len > MiB)
                len = MiB;
            fill(s->pat, buf, len, o);
            if (pwrite(fd, buf, len, (off_t)o) != (ssize_t)len)
                return -EIO;
            o += len;
        }
    }
    return 0;
}

enum kind { K_UNALLOC, K_ZERO, K_STORED };

/* What a guest cluster should be in the image. */
static enum kind
cluster_kind(const struct src *s, uint64_t g, uint64_t csize, bool compress)
{
    uint64_t a = g * csize, b = a + csize;
    bool any = false, data = false, nonzero = false;
    uint8_t buf[65536];

    for (size_t i = 0; i < s->n; i++) {
        uint64_t xa = s->x[i].offset, xb = xa + s->x[i].length;
        if (xb <= a || xa >= b)
            continue;
        any = true;
        if (s->x[i].type != D)
            continue;
        data = true;
        if (compress && !nonzero) {
            uint64_t from = xa > a ? xa : a, to = xb < b ? xb : b;
            fill(s->pat, buf, (size_t)(to - from), from);
            for (size_t k = 0; k < to - from && !nonzero; k++)
                nonzero = buf[k] != 0;
        }
    }
    if (data && (nonzero || !compress))
        return K_STORED;
    return any ? K_ZERO : K_UNALLOC;
}

/* qemu-img map: stored clusters are data, ZERO-only (and, compressed, all-zero DATA) clusters
 * are present zeros, untouched clusters are absent zeros. */
static void
check_map(const struct src *s, uint64_t vsize, uint64_t csize, bool compress)
{
    char *argv[] = {"qemu-img", "map", "--output=json", "-f", "qcow2", out_path, NULL};
    json_error_t jerr;

    if (!qemu_img(argv))
        return;
    json_t *map = json_load_file(log_path, 0, &jerr);
    CHECK(json_is_array(map), "map output: %s", jerr.text);
    uint64_t covered = 0;
    size_t i;
    json_t *m;
    json_array_foreach(map, i, m) {
        uint64_t start = (uint64_t)json_integer_value(json_object_get(m, "start"));
        uint64_t len = (uint64_t)json_integer_value(json_object_get(m, "length"));
        bool present = json_is_true(json_object_get(m, "present"));
        bool zero = json_is_true(json_object_get(m, "zero"));
        bool data = json_is_true(json_object_get(m, "data"));
        CHECK(start == covered, "map entry at %" PRIu64 ", expected %" PRIu64, start, covered);
        covered = start + len;
        CHECK(data != zero, "map [%" PRIu64 ", +%" PRIu64 "): data %d zero %d", start, len, data,
              zero);
        if (!present) {
            for (size_t k = 0; k < s->n; k++) {
                uint64_t xa = s->x[k].offset / csize * csize;
                uint64_t xb = (s->x[k].offset + s->x[k].length + csize - 1) / csize * csize;
                CHECK(xb <= start || xa >= start + len,
                      "map [%" PRIu64 ", +%" PRIu64 ") absent, but extent %zu touches it",
                      start, len, k);
            }
            continue;
        }
        enum kind want = data ? K_STORED : K_ZERO;
        for (uint64_t g = start / csize; g < (start + len + csize - 1) / csize; g++) {
            enum kind k = cluster_kind(s, g, csize, compress);
            CHECK(k == want, "map: cluster %" PRIu64 " is %s, expected kind %d", g,
                  data ? "data" : "zero", k);
            if (k != want)
                break;
        }
    }
    CHECK(covered == vsize, "map covers %" PRIu64 " of %" PRIu64, covered, vsize);
    json_decref(map);
}

static void
check_info(uint64_t vsize, uint64_t csize)
{
    char *argv[] = {"qemu-img", "info", "--output=json", "-f", "qcow2", out_path, NULL};
    json_error_t jerr;

    if (!qemu_img(argv))
        return;
    json_t *info = json_load_file(log_path, 0, &jerr);
    CHECK(json_is_object(info), "info output: %s", jerr.text);
    CHECK((uint64_t)json_integer_value(json_object_get(info, "virtual-size")) == vsize,
          "virtual-size %" JSON_INTEGER_FORMAT,
          json_integer_value(json_object_get(info, "virtual-size")));
    CHECK((uint64_t)json_integer_value(json_object_get(info, "cluster-size")) == csize,
          "cluster-size %" JSON_INTEGER_FORMAT,
          json_integer_value(json_object_get(info, "cluster-size")));
    json_decref(info);
}

/* Pull the whole image through a buffer of readsz bytes into out_path. Returns the encoder's
 * error, if any; *ret_n is what was written. */
static int
encode_to_file(struct imgenc *e, size_t readsz, uint64_t *ret_n, struct agent_err *err)
{
    _cleanup_close_ int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    _cleanup_free_ uint8_t *buf = malloc(readsz);
    uint64_t total = 0;

    if (fd < 0 || !buf)
        return -errno;
    for (;;) {
        size_t n;
        int r = imgenc_read(e, buf, readsz, &n, err);
        if (r < 0)
            return r;
        if (n == 0)
            break;
        if (write(fd, buf, n) != (ssize_t)n)
            return -EIO;
        total += n;
        if (imgenc_bytes_out(e) != total)
            return -EPROTO;
    }
    *ret_n = total;
    return 0;
}

struct tcase {
    const char *name;
    uint64_t vsize;
    struct imgenc_extent x[8];
    enum imgenc_format fmt;
    bool compress;
    unsigned cbits;
    enum pattern pat;
    size_t readsz;
    void (*gen)(struct imgenc_extent *x, size_t *n); /* extents made by code instead of x */
};

/* 3 GiB with about 80 small extents, every L2 table boundary crossed by one DATA and one ZERO
 * extent. */
static void
gen_many(struct imgenc_extent *x, size_t *n)
{
    size_t k = 0;
    for (uint64_t i = 0; i < 80; i++) {
        uint64_t off = i * 37 * MiB + i * 4099;
        x[k++] = (struct imgenc_extent){off, 100 * KiB + i * 13, i % 5 == 4 ? Z : D};
        if (i % 14 == 13) {
            uint64_t b = (i / 14 + 1) * 512 * MiB;
            x[k++] = (struct imgenc_extent){b - 100000, 200000, D};
            x[k++] = (struct imgenc_extent){b + 104096, 2 * MiB, Z};
        }
    }
    *n = k;
}

/* The whole 16 MiB disk as DATA: with 512-byte clusters, 512 L2 tables, 8 L1 clusters, ~130
 * refcount blocks and 3 refcount table clusters. */
static void
gen_full16(struct imgenc_extent *x, size_t *n)
{
    x[0] = (struct imgenc_extent){0, 16 * MiB - 4096, D};
    x[1] = (struct imgenc_extent){16 * MiB - 4096, 4096, Z};
    *n = 2;
}

/* 12 MiB with 2 KiB clusters (refcount blocks of 2 MiB): runs of compressed clusters of 2
 * or 3 sectors packed back to back, so that they straddle host clusters and refcount blocks,
 * uncompressed ones aligned after them, all-zero ones skipped; 4 refcount blocks. */
static void
gen_small_clusters(struct imgenc_extent *x, size_t *n)
{
    uint64_t split = 5 * MiB + 2048 + 77;
    x[0] = (struct imgenc_extent){0, split, D};
    x[1] = (struct imgenc_extent){split, 300 * KiB, Z};
    x[2] = (struct imgenc_extent){6 * MiB, 6 * MiB - 1024, D};
    *n = 3;
}

/* The virtual sizes of the odd-sized cases. */
#define ODD_QCOW2 (10 * MiB + 3584)
#define ODD_RAW UINT64_C(1000003)

static const struct tcase cases[] = {
    {"empty disk", 1 * GiB, {{0}}, IMGENC_FORMAT_QCOW2, false, 0, PAT_TEXT, 65536, NULL},
    {"zero-size disk", 0, {{0}}, IMGENC_FORMAT_QCOW2, false, 0, PAT_TEXT, 65536, NULL},
    {"one DATA cluster", 64 * MiB, {{64 * KiB, 64 * KiB, D}}, IMGENC_FORMAT_QCOW2, false, 0,
     PAT_RANDOM, 65536, NULL},
    {"unaligned extents", 8 * MiB,
     {{1000, 5000, D}, {70000, 130000, D}, {200000, 100, Z}, {300000, 1, D},
      {1 * MiB + 3, 2 * MiB, Z}, {5 * MiB - 10, 20, D}},
     IMGENC_FORMAT_QCOW2, false, 0, PAT_RANDOM, 12345, NULL},
    {"ZERO extents", 64 * MiB,
     {{0, 4 * MiB, Z}, {4 * MiB, 1 * MiB, D}, {5 * MiB, 7 * MiB + 512, Z},
      {32 * MiB, 100, Z}, {40 * MiB, 64 * KiB, D}, {41 * MiB, 23 * MiB, Z}},
     IMGENC_FORMAT_QCOW2, false, 0, PAT_TEXT, 1 * MiB, NULL},
    {"data at the end of an odd-sized disk", ODD_QCOW2,
     {{0, 512, D}, {ODD_QCOW2 - 1000, 1000, D}}, IMGENC_FORMAT_QCOW2, false, 0, PAT_RANDOM,
     4096, NULL},
    {"2 TiB with 3 small extents", 2 * TiB,
     {{0, 4096, D}, {1 * TiB + 12345, 100 * KiB, D}, {2 * TiB - 3 * MiB, 2 * MiB, Z}},
     IMGENC_FORMAT_QCOW2, false, 0, PAT_RANDOM, 65536, NULL},
    {"many extents crossing L2 boundaries", 3 * GiB, {{0}}, IMGENC_FORMAT_QCOW2, false, 0,
     PAT_RANDOM, 65536, gen_many},
    {"512-byte clusters, multi-block metadata", 16 * MiB, {{0}}, IMGENC_FORMAT_QCOW2, false, 9,
     PAT_TEXT, 100000, gen_full16},
    {"raw", 64 * MiB,
     {{1000, 5000, D}, {10000, 10000, Z}, {1 * MiB, 10 * MiB + 7, D}, {63 * MiB, 1 * MiB, D}},
     IMGENC_FORMAT_RAW, false, 0, PAT_RANDOM, 65536, NULL},
    {"raw odd size", ODD_RAW, {{0, 1, D}, {500000, 1000, Z}, {ODD_RAW - 3, 3, D}},
     IMGENC_FORMAT_RAW, false, 0, PAT_RANDOM, 7777, NULL},
    {"raw empty", 0, {{0}}, IMGENC_FORMAT_RAW, false, 0, PAT_RANDOM, 65536, NULL},
    {"compressed, compressible", 64 * MiB,
     {{12345, 3 * MiB, D}, {4 * MiB, 4 * MiB, Z}, {20 * MiB + 512, 2 * MiB + 99, D}},
     IMGENC_FORMAT_QCOW2, true, 0, PAT_TEXT, 65536, NULL},
    {"compressed, incompressible", 16 * MiB, {{1 * MiB + 512, 3 * MiB - 512, D}},
     IMGENC_FORMAT_QCOW2, true, 0, PAT_RANDOM, 65536, NULL},
    {"compressed, mixed", 16 * MiB, {{0, 6 * MiB, D}, {8 * MiB, 1 * MiB, Z}},
     IMGENC_FORMAT_QCOW2, true, 0, PAT_MIXED, 30000, NULL},
    {"compressed, DATA holding zeros", 16 * MiB, {{0, 2 * MiB, D}, {3 * MiB, 4096, D}},
     IMGENC_FORMAT_QCOW2, true, 0, PAT_ZERO, 65536, NULL},
    {"compressed, 2 KiB clusters, multi-block", 12 * MiB, {{0}}, IMGENC_FORMAT_QCOW2, true, 11,
     PAT_VARIED, 65536, gen_small_clusters},
    {"compressed, 2 TiB sparse", 2 * TiB, {{5 * GiB, 4096, D}, {1 * TiB, 64 * KiB, Z}},
     IMGENC_FORMAT_QCOW2, true, 0, PAT_TEXT, 65536, NULL},
};

static bool
under_memory_tool(void)
{
#if defined(__SANITIZE_ADDRESS__)
    return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    return true;
#endif
#endif
    const char *p = getenv("LD_PRELOAD");
    return p && strstr(p, "vgpreload");
}

static void
run_case(const struct tcase *c)
{
    struct imgenc_extent x[MAX_EXTENTS];
    size_t n = 0;
    struct agent_err err = {0};
    _cleanup_(imgenc_freep) struct imgenc *e = NULL;
    struct imgenc_stats st;
    uint64_t csize = UINT64_C(1) << (c->cbits ? c->cbits : 16), data_len = 0, written = 0;
    struct timespec t0, t1;

    test_begin(c->name);
    if (c->gen) {
        c->gen(x, &n);
    } else {
        while (n < ELEMENTSOF(c->x) && c->x[n].length > 0) {
            x[n] = c->x[n];
            n++;
        }
    }
    for (size_t i = 0; i < n; i++)
        if (x[i].type == D)
            data_len += x[i].length;

    struct src s = {.x = x, .n = n, .pat = c->pat, .pat_after = c->pat, .flip_after = UINT64_MAX,
                    .fail_at = NO_FAIL};
    struct imgenc_options o = {.virtual_size = c->vsize, .extents = x, .n_extents = n,
                               .format = c->fmt, .compress = c->compress,
                               .cluster_bits = c->cbits, .pread = src_pread, .opaque = &s};
    int r = imgenc_new(&o, &e, &err);
    CHECK(r == 0, "imgenc_new: %d %s", r, err.msg);
    if (r < 0)
        goto out;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    r = imgenc_prepare(e, &err);
    CHECK(r == 0, "imgenc_prepare: %d %s", r, err.msg);
    uint64_t size = imgenc_size(e);
    CHECK(size > 0 || c->vsize == 0, "size unknown after prepare");
    r = encode_to_file(e, c->readsz, &written, &err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK(r == 0, "encode: %d %s", r, err.msg);
    if (r < 0)
        goto out;

    struct stat sb;
    CHECK(stat(out_path, &sb) == 0 && (uint64_t)sb.st_size == written, "file size");
    CHECK(written == size, "wrote %" PRIu64 " bytes, imgenc_size said %" PRIu64, written, size);
    imgenc_get_stats(e, &st);
    CHECK(st.bytes_out == written, "bytes_out %" PRIu64, st.bytes_out);
    CHECK(s.bad_reads == 0, "%u reads outside DATA extents", s.bad_reads);
    unsigned passes = c->compress ? 2 : 1;
    CHECK(s.passes == (data_len ? passes : 0), "%u passes over the source", s.passes);
    CHECK(st.data_bytes_read == passes * data_len, "read %" PRIu64 " bytes of %" PRIu64 " DATA",
          st.data_bytes_read, data_len);
    /* The bound of imgenc.h: buffers, the extent copy and compressed size codes only. */
    uint64_t mem_bound = 5 * MiB + n * sizeof(struct imgenc_extent) + data_len / csize + 2;
    CHECK(st.mem_bytes <= mem_bound, "encoder holds %" PRIu64 " bytes", st.mem_bytes);
    printf("  %-40s %10" PRIu64 " bytes out, %5" PRIu64 " KiB held, %.3f s\n", c->name, written,
           st.mem_bytes / KiB,
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);

    r = write_source(&s, c->vsize);
    CHECK(r == 0, "writing the source file: %d", r);
    if (c->fmt == IMGENC_FORMAT_RAW) {
        char *cmp[] = {"qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", src_path,
                       out_path, NULL};
        CHECK(written == c->vsize, "raw size");
        qemu_img(cmp);
        goto out;
    }
    uint64_t n_gc = (c->vsize + csize - 1) / csize;
    CHECK(st.clusters_stored + st.zero_clusters == n_gc, "stored %" PRIu64 " + zero %" PRIu64,
          st.clusters_stored, st.zero_clusters);
    if (!c->compress || c->pat == PAT_RANDOM)
        CHECK(st.clusters_compressed == 0, "%" PRIu64 " compressed", st.clusters_compressed);
    else if (c->pat == PAT_TEXT)
        CHECK(st.clusters_compressed == st.clusters_stored, "%" PRIu64 " of %" PRIu64
              " compressed", st.clusters_compressed, st.clusters_stored);
    if (c->pat == PAT_ZERO)
        CHECK(st.clusters_stored == 0, "%" PRIu64 " zero clusters stored", st.clusters_stored);
    char *check[] = {"qemu-img", "check", "-f", "qcow2", out_path, NULL};
    char *cmp[] = {"qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", src_path, out_path,
                   NULL};
    qemu_img(check);
    qemu_img(cmp);
    check_info(c->vsize, csize);
    if (c->vsize > 0) /* qemu-img maps an empty disk as one empty entry */
        check_map(&s, c->vsize, csize, c->compress);

out:
    unlink(src_path);
    unlink(out_path);
    test_end();
}

/* The source fails part-way (or changes between the two compressed passes): imgenc_read()
 * returns the source's error and keeps returning it. */
static void
test_failures(void)
{
    static const struct imgenc_extent x[] = {{0, 4 * MiB, D}, {5 * MiB, 6 * MiB, D}};
    static const struct {
        const char *name;
        enum imgenc_format fmt;
        bool compress;
        uint64_t fail_at, flip_after;
        int ret;
        const char *msg;
    } t[] = {
        {"read error, raw", IMGENC_FORMAT_RAW, false, 7 * MiB, UINT64_MAX, -EIO, "injected"},
        {"read error, qcow2", IMGENC_FORMAT_QCOW2, false, 7 * MiB, UINT64_MAX, -EIO, "injected"},
        {"read error, compressed", IMGENC_FORMAT_QCOW2, true, 9 * MiB, UINT64_MAX, -EIO,
         "injected"},
        {"source changed between passes", IMGENC_FORMAT_QCOW2, true, NO_FAIL, 10 * MiB, -EIO,
         "changed between"},
    };

    for (size_t i = 0; i < ELEMENTSOF(t); i++) {
        _cleanup_(imgenc_freep) struct imgenc *e = NULL;
        struct agent_err err = {0};
        uint64_t n = 0;
        struct src s = {.x = x, .n = ELEMENTSOF(x), .pat = PAT_TEXT, .pat_after = PAT_RANDOM,
                        .flip_after = t[i].flip_after, .fail_at = t[i].fail_at};
        struct imgenc_options o = {.virtual_size = 16 * MiB, .extents = x,
                                   .n_extents = ELEMENTSOF(x), .format = t[i].fmt,
                                   .compress = t[i].compress, .pread = src_pread, .opaque = &s};

        test_begin(t[i].name);
        int r = imgenc_new(&o, &e, &err);
        CHECK(r == 0, "imgenc_new: %d", r);
        if (r == 0) {
            r = encode_to_file(e, 65536, &n, &err);
            CHECK(r == t[i].ret, "ret %d, expected %d", r, t[i].ret);
            CHECK(err.code == t[i].ret && strstr(err.msg, t[i].msg), "err %d \"%s\"", err.code,
                  err.msg);
            CHECK(imgenc_bytes_out(e) < 11 * MiB, "%" PRIu64 " bytes before the error",
                  imgenc_bytes_out(e));
            uint8_t b[16];
            size_t got = 99;
            struct agent_err err2 = {0};
            r = imgenc_read(e, b, sizeof(b), &got, &err2);
            CHECK(r == t[i].ret && got == 99, "read after failure: %d, %zu bytes", r, got);
        }
        unlink(out_path);
        test_end();
    }
}

static void
test_invalid(void)
{
    static const struct {
        const char *name;
        uint64_t vsize;
        struct imgenc_extent x[3];
        enum imgenc_format fmt;
        bool compress;
        unsigned cbits;
        bool no_pread;
        int ret;
    } t[] = {
        {"zero length", 1 * MiB, {{0, 512, D}, {4096, 0, D}}, IMGENC_FORMAT_QCOW2, false, 0,
         false, -EINVAL},
        {"overlap", 1 * MiB, {{0, 8192, D}, {4096, 512, Z}}, IMGENC_FORMAT_QCOW2, false, 0,
         false, -EINVAL},
        {"unsorted", 1 * MiB, {{8192, 512, D}, {0, 512, D}}, IMGENC_FORMAT_RAW, false, 0, false,
         -EINVAL},
        {"beyond virtual size", 1 * MiB, {{1 * MiB - 512, 1024, D}}, IMGENC_FORMAT_QCOW2, false,
         0, false, -EINVAL},
        {"offset beyond virtual size", 1 * MiB, {{2 * MiB, 1, Z}}, IMGENC_FORMAT_RAW, false, 0,
         false, -EINVAL},
        {"length wraps around", 1 * MiB, {{4096, UINT64_MAX - 100, D}}, IMGENC_FORMAT_QCOW2,
         false, 0, false, -EINVAL},
        {"unknown extent type", 1 * MiB, {{0, 512, (enum imgenc_extent_type)7}},
         IMGENC_FORMAT_QCOW2, false, 0, false, -EINVAL},
        {"compressed raw", 1 * MiB, {{0, 512, D}}, IMGENC_FORMAT_RAW, true, 0, false, -EINVAL},
        {"unknown format", 1 * MiB, {{0, 512, D}}, IMGENC_FORMAT_MAX, false, 0, false, -EINVAL},
        {"qcow2 size not in sectors", 1000, {{0, 512, D}}, IMGENC_FORMAT_QCOW2, false, 0, false,
         -EINVAL},
        {"cluster_bits 8", 1 * MiB, {{0, 512, D}}, IMGENC_FORMAT_QCOW2, false, 8, false, -EINVAL},
        {"cluster_bits 17", 1 * MiB, {{0, 512, D}}, IMGENC_FORMAT_QCOW2, false, 17, false,
         -EINVAL},
        {"no pread", 1 * MiB, {{0, 512, D}}, IMGENC_FORMAT_QCOW2, false, 0, true, -EINVAL},
        {"qcow2 too large", UINT64_C(1) << 62, {{0, 512, D}}, IMGENC_FORMAT_QCOW2, false, 0,
         false, -EFBIG},
        {"raw too large", UINT64_MAX, {{0, 512, D}}, IMGENC_FORMAT_RAW, false, 0, false, -EFBIG},
    };

    for (size_t i = 0; i < ELEMENTSOF(t); i++) {
        struct imgenc *e = (struct imgenc *)&e; /* must stay untouched */
        struct agent_err err = {0};
        struct src s = {0};
        size_t n = 0;

        test_begin(t[i].name);
        while (n < ELEMENTSOF(t[i].x) && (t[i].x[n].length > 0 || t[i].x[n].offset > 0))
            n++;
        struct imgenc_options o = {.virtual_size = t[i].vsize, .extents = t[i].x, .n_extents = n,
                                   .format = t[i].fmt, .compress = t[i].compress,
                                   .cluster_bits = t[i].cbits,
                                   .pread = t[i].no_pread ? NULL : src_pread, .opaque = &s};
        int r = imgenc_new(&o, &e, &err);
        CHECK(r == t[i].ret, "ret %d, expected %d", r, t[i].ret);
        CHECK(err.code == r && err.msg[0], "err %d \"%s\"", err.code, err.msg);
        CHECK(e == (struct imgenc *)&e, "output written on failure");
        if (r == 0 && e != (struct imgenc *)&e)
            imgenc_free(e);
        test_end();
    }

    test_begin("NULL-safe");
    imgenc_free(NULL);
    CHECK(imgenc_size(NULL) == 0 && imgenc_bytes_out(NULL) == 0, "NULL accessors");
    test_end();
}

static void
test_names(void)
{
    enum imgenc_format f = IMGENC_FORMAT_MAX;

    test_begin("names");
    CHECK_STREQ(imgenc_format_to_string(IMGENC_FORMAT_QCOW2), "qcow2");
    CHECK_STREQ(imgenc_format_to_string(IMGENC_FORMAT_RAW), "raw");
    CHECK(imgenc_format_to_string(IMGENC_FORMAT_MAX) == NULL, "format MAX has a name");
    CHECK_STREQ(imgenc_extent_type_to_string(IMGENC_EXTENT_ZERO), "zero");
    CHECK(imgenc_format_from_string("qcow2", &f) == 0 && f == IMGENC_FORMAT_QCOW2, "qcow2");
    CHECK(imgenc_format_from_string("vmdk", &f) == -EINVAL && f == IMGENC_FORMAT_QCOW2, "vmdk");
    test_end();
}

int
main(void)
{
    char *version[] = {"qemu-img", "--version", NULL};

    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(src_path, sizeof(src_path), "%s/src.raw", dir);
    snprintf(out_path, sizeof(out_path), "%s/out.img", dir);
    snprintf(log_path, sizeof(log_path), "%s/qemu-img.log", dir);
    int r = run(log_path, version);
    if (r != 0) {
        fprintf(stderr, "test-imgenc: qemu-img not usable (%s); install qemu-utils "
                "(deploy/install-packages.sh services)\n", r < 0 ? strerror(-r) : "failed");
        unlink(log_path);
        rmdir(dir);
        return 1;
    }

    test_names();
    test_invalid();
    for (size_t i = 0; i < ELEMENTSOF(cases); i++)
        run_case(&cases[i]);
    test_failures();

    /* Everything above, the 2 TiB disks included, fits in a few MiB of resident memory. Memory
     * tools add their own, so only a plain build checks. */
    struct rusage ru;
    if (!under_memory_tool() && getrusage(RUSAGE_SELF, &ru) == 0) {
        test_begin("peak RSS");
        CHECK(ru.ru_maxrss < 32 * 1024, "peak RSS %ld KiB", ru.ru_maxrss);
        printf("  peak RSS %ld KiB\n", ru.ru_maxrss);
        test_end();
    }

    unlink(log_path);
    rmdir(dir);
    return test_done();
}
