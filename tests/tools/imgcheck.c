/*
 * ca-imgcheck: proves that a disk image of the test guest is one consistent point in time.
 *
 * The guest's writer (deploy/guest/writer.c) writes sequence numbers 1, 2, 3, ... to the ring
 * region, each write completed before the next starts; deploy/guest/layout.h maps each
 * sequence number to a slot. An image is a consistent point in time if, with S the highest
 * valid sequence number found, every slot holds exactly the latest write <= S that maps to it
 * (or is still all zeros when none does), no block is torn or foreign, and the base region
 * still holds its build-time pattern (which lives only in the backing file, so a missing
 * backing chain shows up here). A snapshot that mixes two moments fails: some slot then holds
 * a write older than S allows.
 *
 * Usage: ca-imgcheck [-f raw|qcow2] [-m MIN_SEQ] [-M MAX_SEQ] [-v] IMAGE
 * Exit 0: consistent (one summary line); 1: inconsistent (what was expected vs found, per
 * slot or block); 2: usage or I/O error. -f qcow2 converts to a temporary raw file first with
 * `qemu-img convert -U` (the caller makes sure the image is not being written meanwhile).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../deploy/guest/layout.h"

#define CHUNK           (1024u * 1024u)
#define MAX_REPORTS     20u

extern char **environ;

struct check_opts {
    const char *image;
    bool qcow2;
    bool verbose;
    uint64_t min_seq;
    uint64_t max_seq;
};

struct check_result {
    uint64_t highest;
    unsigned slots_written;
    unsigned ring_errors;
    unsigned base_errors;
    unsigned reports;
};

static int
parse_u64(const char *s, uint64_t *ret)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-')
        return -EINVAL;
    *ret = v;
    return 0;
}

static int
pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        done += (size_t)n;
    }
    return 0;
}

/* Print one inconsistency, at most MAX_REPORTS of them; the summary gives the totals. */
static void
report(struct check_result *res, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
report(struct check_result *res, const char *fmt, ...)
{
    va_list ap;

    if (res->reports++ >= MAX_REPORTS) {
        if (res->reports == MAX_REPORTS + 1)
            printf("ca-imgcheck: (further inconsistencies not listed)\n");
        return;
    }
    va_start(ap, fmt);
    fputs("ca-imgcheck: ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
}

static int
check_base(int fd, struct check_result *res)
{
    unsigned char *buf, expect[LAYOUT_BLOCK_SIZE];
    int r = 0;

    buf = malloc(CHUNK);
    if (!buf)
        return -ENOMEM;
    for (uint64_t off = 0; off < LAYOUT_BASE_LEN; off += CHUNK) {
        r = pread_full(fd, buf, CHUNK, LAYOUT_BASE_OFFSET + off);
        if (r < 0)
            goto cleanup;
        for (unsigned i = 0; i < CHUNK / LAYOUT_BLOCK_SIZE; i++) {
            uint64_t abs = LAYOUT_BASE_OFFSET + off + (uint64_t)i * LAYOUT_BLOCK_SIZE;
            const unsigned char *got = buf + (size_t)i * LAYOUT_BLOCK_SIZE;
            unsigned w;

            layout_pattern_fill(expect, abs / LAYOUT_BLOCK_SIZE);
            if (memcmp(got, expect, LAYOUT_BLOCK_SIZE) == 0)
                continue;
            res->base_errors++;
            for (w = 0; w < LAYOUT_BLOCK_SIZE / 8u; w++)
                if (memcmp(got + 8u * w, expect + 8u * w, 8) != 0)
                    break;
            {
                uint64_t want, have;

                memcpy(&want, expect + 8u * w, 8);
                memcpy(&have, got + 8u * w, 8);
                report(res, "base block %" PRIu64 " (offset %" PRIu64 "): byte %u expected "
                       "pattern 0x%016" PRIx64 ", found 0x%016" PRIx64,
                       abs / LAYOUT_BLOCK_SIZE, abs, 8u * w, want, have);
            }
        }
    }
 cleanup:
    free(buf);
    return r;
}

static int
check_ring(int fd, const struct check_opts *o, struct check_result *res)
{
    unsigned char *ring;
    uint64_t *seqs = NULL;
    unsigned char *states = NULL;
    uint64_t highest = 0;
    int r;

    ring = malloc(LAYOUT_RING_LEN);
    seqs = calloc(LAYOUT_RING_SLOTS, sizeof(*seqs));
    states = calloc(LAYOUT_RING_SLOTS, 1);
    if (!ring || !seqs || !states) {
        r = -ENOMEM;
        goto cleanup;
    }
    for (uint64_t off = 0; off < LAYOUT_RING_LEN; off += CHUNK) {
        r = pread_full(fd, ring + off, CHUNK, LAYOUT_RING_OFFSET + off);
        if (r < 0)
            goto cleanup;
    }

    /* Pass 1: classify every slot and find the newest write the image holds. */
    for (uint32_t slot = 0; slot < LAYOUT_RING_SLOTS; slot++) {
        uint64_t seq = 0;
        enum layout_block_state st;

        st = layout_block_check(ring + (size_t)slot * LAYOUT_BLOCK_SIZE, slot, &seq);
        states[slot] = (unsigned char)st;
        seqs[slot] = seq;
        if (st == LAYOUT_BLOCK_VALID) {
            res->slots_written++;
            if (seq > highest)
                highest = seq;
        }
    }
    res->highest = highest;

    /* Pass 2: every slot must hold exactly the latest write <= highest that maps to it. */
    for (uint32_t slot = 0; slot < LAYOUT_RING_SLOTS; slot++) {
        uint64_t want = layout_ring_expected(highest, slot);
        uint64_t off = layout_ring_slot_offset(slot);
        enum layout_block_state st = states[slot];

        if (st != LAYOUT_BLOCK_VALID && st != LAYOUT_BLOCK_EMPTY) {
            res->ring_errors++;
            report(res, "ring slot %" PRIu32 " (offset %" PRIu64 "): expected seq %" PRIu64
                   ", found an invalid block (%s)", slot, off, want,
                   layout_block_state_to_string(st));
        } else if (st == LAYOUT_BLOCK_EMPTY && want != 0) {
            res->ring_errors++;
            report(res, "ring slot %" PRIu32 " (offset %" PRIu64 "): expected seq %" PRIu64
                   ", found never-written (zeros)", slot, off, want);
        } else if (st == LAYOUT_BLOCK_VALID && seqs[slot] != want) {
            res->ring_errors++;
            report(res, "ring slot %" PRIu32 " (offset %" PRIu64 "): expected seq %" PRIu64
                   ", found seq %" PRIu64 " (%s by %" PRIu64 " writes)", slot, off, want,
                   seqs[slot], seqs[slot] < want ? "stale" : "ahead",
                   seqs[slot] < want ? want - seqs[slot] : seqs[slot] - want);
        } else if (o->verbose) {
            printf("ring slot %" PRIu32 ": seq %" PRIu64 " ok\n", slot, seqs[slot]);
        }
    }
    r = 0;
 cleanup:
    free(ring);
    free(seqs);
    free(states);
    return r;
}

/* Convert a qcow2 image to a fresh temporary raw file; caller unlinks *ret_path and frees it. */
static int
convert_qcow2(const char *image, char **ret_path)
{
    const char *tmpdir = getenv("TMPDIR");
    char *path = NULL;
    pid_t pid;
    int fd, status, r;

    if (!tmpdir || !*tmpdir)
        tmpdir = "/tmp";
    if (asprintf(&path, "%s/ca-imgcheck.XXXXXX", tmpdir) < 0)
        return -ENOMEM;
    fd = mkostemp(path, O_CLOEXEC);
    if (fd < 0) {
        r = -errno;
        free(path);
        return r;
    }
    close(fd);

    {
        char *const argv[] = {
            "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
            (char *)image, path, NULL,
        };

        r = posix_spawnp(&pid, "qemu-img", NULL, NULL, argv, environ);
    }
    if (r != 0) {
        fprintf(stderr, "ca-imgcheck: cannot run qemu-img: %s\n", strerror(r));
        r = -r;
        goto fail;
    }
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            r = -errno;
            goto fail;
        }
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "ca-imgcheck: qemu-img convert of %s failed\n", image);
        r = -EIO;
        goto fail;
    }
    *ret_path = path;
    return 0;
 fail:
    unlink(path);
    free(path);
    return r;
}

static void
usage(FILE *f)
{
    fprintf(f,
            "usage: ca-imgcheck [-f raw|qcow2] [-m MIN_SEQ] [-M MAX_SEQ] [-v] IMAGE\n"
            "  Checks that IMAGE (a raw image of the test guest's disk, or qcow2 with -f qcow2)\n"
            "  is one consistent point in time of the guest writer's history.\n"
            "  -m N  also require the highest sequence number to be >= N\n"
            "  -M N  also require it to be <= N\n"
            "  -v    list every ring slot\n"
            "exit: 0 consistent, 1 inconsistent, 2 usage or I/O error\n");
}

int
main(int argc, char **argv)
{
    struct check_opts o = { .max_seq = UINT64_MAX };
    struct check_result res = { 0 };
    char *tmp_raw = NULL;
    const char *path;
    struct stat st;
    int fd = -1, c, r, ret = 2;

    while ((c = getopt(argc, argv, "f:m:M:vh")) != -1) {
        switch (c) {
        case 'f':
            if (strcmp(optarg, "qcow2") == 0) {
                o.qcow2 = true;
            } else if (strcmp(optarg, "raw") != 0) {
                fprintf(stderr, "ca-imgcheck: unknown format '%s'\n", optarg);
                return 2;
            }
            break;
        case 'm':
        case 'M':
            if (parse_u64(optarg, c == 'm' ? &o.min_seq : &o.max_seq) < 0) {
                fprintf(stderr, "ca-imgcheck: bad sequence number '%s'\n", optarg);
                return 2;
            }
            break;
        case 'v':
            o.verbose = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind + 1 != argc) {
        usage(stderr);
        return 2;
    }
    o.image = argv[optind];

    path = o.image;
    if (o.qcow2) {
        r = convert_qcow2(o.image, &tmp_raw);
        if (r < 0) {
            fprintf(stderr, "ca-imgcheck: %s: %s\n", o.image, strerror(-r));
            return 2;
        }
        path = tmp_raw;
    }

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "ca-imgcheck: open %s: %s\n", path, strerror(errno));
        goto cleanup;
    }
    if (fstat(fd, &st) < 0) {
        fprintf(stderr, "ca-imgcheck: stat %s: %s\n", path, strerror(errno));
        goto cleanup;
    }
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < LAYOUT_RING_OFFSET + LAYOUT_RING_LEN) {
        fprintf(stderr, "ca-imgcheck: %s is %lld bytes, smaller than the layout (%llu); "
                "is it a raw image?\n", path, (long long)st.st_size,
                LAYOUT_RING_OFFSET + LAYOUT_RING_LEN);
        goto cleanup;
    }

    r = check_base(fd, &res);
    if (r == 0)
        r = check_ring(fd, &o, &res);
    if (r < 0) {
        fprintf(stderr, "ca-imgcheck: reading %s: %s\n", path, strerror(-r));
        goto cleanup;
    }

    if (res.highest < o.min_seq) {
        report(&res, "highest seq %" PRIu64 " is below the required minimum %" PRIu64,
               res.highest, o.min_seq);
        res.ring_errors++;
    }
    if (res.highest > o.max_seq) {
        report(&res, "highest seq %" PRIu64 " is above the allowed maximum %" PRIu64,
               res.highest, o.max_seq);
        res.ring_errors++;
    }

    if (res.ring_errors == 0 && res.base_errors == 0) {
        printf("ca-imgcheck: OK %s: highest_seq=%" PRIu64 " slots_checked=%u slots_written=%u "
               "base_blocks=%u\n", o.image, res.highest, LAYOUT_RING_SLOTS, res.slots_written,
               LAYOUT_BASE_BLOCKS);
        ret = 0;
    } else {
        printf("ca-imgcheck: INCONSISTENT %s: highest_seq=%" PRIu64 " ring_errors=%u "
               "base_errors=%u (of %u slots, %u base blocks)\n", o.image, res.highest,
               res.ring_errors, res.base_errors, LAYOUT_RING_SLOTS, LAYOUT_BASE_BLOCKS);
        ret = 1;
    }
 cleanup:
    if (fd >= 0)
        close(fd);
    if (tmp_raw) {
        unlink(tmp_raw);
        free(tmp_raw);
    }
    return ret;
}
