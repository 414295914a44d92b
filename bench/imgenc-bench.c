/* Benchmark of the streaming image encoder (backends/imgenc.c): encodes a sparse virtual disk
 * (default 4 GiB with 1 GiB of DATA in 2 MiB extents, plus ZERO extents) from an in-memory source
 * that copies from a 4 MiB pattern, and throws the image away 64 KiB at a time as libcurl's read
 * callback would. Each mode (raw, qcow2, compressed qcow2) runs in its own child process so that
 * its peak RSS is its own. Prints a markdown table, one row per mode: image size, wall time, DATA
 * read rate, image output rate and peak RSS (whole process: encoder, the 4 MiB pattern, libc).
 * The pattern is half random 4 KiB blocks, half text, so compression has real work to do.
 *
 *   bench-imgenc [VIRTUAL_GIB [DATA_GIB]] */

#define _GNU_SOURCE /* pipe2 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "err.h"
#include "imgenc.h"
#include "util.h"

#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)
#define PATTERN_SIZE (4 * MiB)
#define EXTENT_SIZE (2 * MiB)
#define SINK_CHUNK (64 * 1024) /* libcurl's default upload buffer */

struct pattern_src {
    uint8_t *pat;
};

static uint64_t
mix64(uint64_t x)
{
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

static void
make_pattern(uint8_t *p)
{
    static const char text[] = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do "
                               "eiusmod tempor incididunt ut labore et dolore magna aliqua. ";

    for (uint64_t blk = 0; blk < PATTERN_SIZE / 4096; blk++) {
        uint8_t *b = p + blk * 4096;
        if (mix64(blk) & 1) {
            for (size_t i = 0; i < 4096; i += 8) {
                uint64_t w = mix64(blk * 4096 + i);
                memcpy(b + i, &w, 8);
            }
        } else {
            for (size_t i = 0; i < 4096; i++)
                b[i] = (uint8_t)text[(i + blk * 7) % (sizeof(text) - 1)];
        }
    }
}

static int
pattern_pread(void *opaque, void *buf, size_t len, uint64_t offset, struct agent_err *err)
{
    const struct pattern_src *s = opaque;
    uint8_t *out = buf;

    (void)err;
    while (len > 0) {
        size_t at = (size_t)(offset % PATTERN_SIZE), n = PATTERN_SIZE - at;
        if (n > len)
            n = len;
        memcpy(out, s->pat + at, n);
        out += n;
        offset += n;
        len -= n;
    }
    return 0;
}

static double
now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

struct result {
    uint64_t bytes_out, clusters_stored, clusters_compressed;
    double seconds, sizing_seconds;
};

/* One mode, in a child process: fills *ret and returns the exit status for the parent. */
static int
bench_mode(enum imgenc_format fmt, bool compress, uint64_t vsize, uint64_t data,
           struct result *ret)
{
    _cleanup_free_ struct imgenc_extent *x = NULL;
    _cleanup_free_ uint8_t *sink = malloc(SINK_CHUNK);
    _cleanup_(imgenc_freep) struct imgenc *e = NULL;
    struct pattern_src src = {.pat = malloc(PATTERN_SIZE)};
    struct agent_err err = {0};
    struct imgenc_stats st;
    size_t n_data = (size_t)(data / EXTENT_SIZE), n = 0;
    uint64_t stride = vsize / n_data;
    int r;

    x = calloc(n_data * 2, sizeof(*x));
    if (!x || !sink || !src.pat) {
        free(src.pat);
        return 1;
    }
    make_pattern(src.pat);
    /* DATA extents spread over the disk, each followed by a ZERO extent of the same size. */
    for (size_t i = 0; i < n_data; i++) {
        x[n++] = (struct imgenc_extent){i * stride, EXTENT_SIZE, IMGENC_EXTENT_DATA};
        if (stride >= 2 * EXTENT_SIZE)
            x[n++] = (struct imgenc_extent){i * stride + EXTENT_SIZE, EXTENT_SIZE,
                                            IMGENC_EXTENT_ZERO};
    }
    struct imgenc_options o = {.virtual_size = vsize, .extents = x, .n_extents = n,
                               .format = fmt, .compress = compress, .pread = pattern_pread,
                               .opaque = &src};
    r = imgenc_new(&o, &e, &err);
    if (r < 0) {
        fprintf(stderr, "imgenc_new: %s\n", err.msg);
        free(src.pat);
        return 1;
    }
    double t0 = now();
    r = imgenc_prepare(e, &err);
    double t1 = now();
    for (size_t got = 1; r == 0 && got > 0;)
        r = imgenc_read(e, sink, SINK_CHUNK, &got, &err);
    double t2 = now();
    free(src.pat);
    if (r < 0) {
        fprintf(stderr, "imgenc_read: %s\n", err.msg);
        return 1;
    }
    imgenc_get_stats(e, &st);
    *ret = (struct result){.bytes_out = st.bytes_out, .clusters_stored = st.clusters_stored,
                           .clusters_compressed = st.clusters_compressed, .seconds = t2 - t0,
                           .sizing_seconds = t1 - t0};
    return 0;
}

int
main(int argc, char **argv)
{
    static const struct {
        enum imgenc_format fmt;
        bool compress;
    } modes[] = {
        {IMGENC_FORMAT_RAW, false},
        {IMGENC_FORMAT_QCOW2, false},
        {IMGENC_FORMAT_QCOW2, true},
    };
    long vgib = 4, dgib = 1;
    double notes_sizing = 0;
    uint64_t notes_c = 0, notes_s = 0;
    int rc = 0;

    if ((argc > 1 && util_parse_long(argv[1], 1, 1L << 20, &vgib) < 0) ||
        (argc > 2 && util_parse_long(argv[2], 1, vgib, &dgib) < 0) || argc > 3) {
        fprintf(stderr, "usage: %s [VIRTUAL_GIB [DATA_GIB]]\n", argv[0]);
        return 2;
    }
    printf("virtual disk %ld GiB, %ld GiB DATA in %" PRIu64 " MiB extents, sink reads of "
           "%d KiB\n\n", vgib, dgib, EXTENT_SIZE / MiB, SINK_CHUNK / 1024);
    printf("| mode | image MiB | seconds | DATA MiB/s | image MiB/s | peak RSS MiB |\n");
    printf("|---|---:|---:|---:|---:|---:|\n");
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        struct result res = {0};
        struct rusage ru;
        int pfd[2], st;

        if (pipe2(pfd, O_CLOEXEC) < 0) {
            perror("pipe2");
            return 1;
        }
        fflush(stdout); /* the child must not inherit unwritten output */
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            close(pfd[0]);
            int r = bench_mode(modes[i].fmt, modes[i].compress, (uint64_t)vgib * GiB,
                               (uint64_t)dgib * GiB, &res);
            if (write(pfd[1], &res, sizeof(res)) != (ssize_t)sizeof(res))
                r = 1;
            _exit(r);
        }
        close(pfd[1]);
        ssize_t got = read(pfd[0], &res, sizeof(res));
        close(pfd[0]);
        while (wait4(pid, &st, 0, &ru) < 0) {
            if (errno != EINTR) {
                perror("wait4");
                return 1;
            }
        }
        const char *name = modes[i].compress ? "qcow2 compressed"
                                             : imgenc_format_to_string(modes[i].fmt);
        if (got != (ssize_t)sizeof(res) || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            printf("| %s | failed | | | | |\n", name);
            rc = 1;
            continue;
        }
        printf("| %s | %.1f | %.2f | %.1f | %.1f | %.1f |\n", name,
               (double)res.bytes_out / MiB, res.seconds, (double)dgib * 1024 / res.seconds,
               (double)res.bytes_out / MiB / res.seconds, (double)ru.ru_maxrss / 1024);
        if (modes[i].compress) {
            notes_sizing = res.sizing_seconds;
            notes_c = res.clusters_compressed;
            notes_s = res.clusters_stored;
        }
    }
    if (notes_s > 0)
        printf("\ncompressed: sizing pass %.2f s; %" PRIu64 " of %" PRIu64
               " stored clusters compressed\n", notes_sizing, notes_c, notes_s);
    return rc;
}
