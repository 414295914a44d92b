/*
 * ca-writer: the test guest's disk writer, and the host-side helper that lays the base region
 * down when the guest disk is built.
 *
 * In the guest (started by /init, linked -static so it needs nothing from the initramfs) it
 * writes sequence-numbered blocks to the ring region of the virtio disk (layout.h), one at a
 * time: O_DIRECT pwrite, then fdatasync, and only then the next sequence number. The disk's
 * history is therefore a strict sequence, and any point-in-time image of it must show, for
 * every slot, exactly the latest write not newer than the newest write it shows at all; the
 * host-side checker (tests/tools/imgcheck.c) tests exactly that. On start it scans the ring and
 * continues after the highest valid sequence number, so guest reboots extend the same history.
 *
 * It prints a heartbeat line to stdout (the serial console) every --hb-ms milliseconds:
 *   CA-HB seq=<last completed seq> t=<CLOCK_MONOTONIC s.ms> lat_max_us=<max write+sync latency
 *   since the previous heartbeat> writes=<writes since start>
 * Guest time stops while the VM is paused, so a pause shows up as a gap between the host-side
 * arrival times of consecutive heartbeats, and a slow disk as lat_max_us.
 *
 * Host modes: --format-base FILE writes the base region's pattern into a raw image file;
 * --print-layout prints layout.h's constants as shell assignments for the build script.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "layout.h"

#define SCAN_CHUNK  (1024u * 1024u)

struct writer_opts {
    const char *dev;
    unsigned wps;               /* writes per second, 0 = unpaced */
    unsigned hb_ms;             /* heartbeat period, 0 = none */
    uint64_t count;             /* stop after this many writes, 0 = never */
};

static volatile sig_atomic_t stop_requested;

static void
on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static uint64_t
mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void
sleep_until_ns(uint64_t deadline)
{
    struct timespec ts = {
        .tv_sec = (time_t)(deadline / 1000000000ull),
        .tv_nsec = (long)(deadline % 1000000000ull),
    };

    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !stop_requested)
        ;
}

static int
parse_u64(const char *s, uint64_t max, uint64_t *ret)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || v > max)
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

static int
pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));

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

static int
device_size(int fd, uint64_t *ret_size)
{
    struct stat st;
    uint64_t size;

    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) < 0)
            return -errno;
    } else {
        size = (uint64_t)st.st_size;
    }
    *ret_size = size;
    return 0;
}

/* Highest valid sequence number in the ring (0 if none); counts non-empty invalid blocks. */
static int
scan_ring(int fd, uint64_t *ret_highest, unsigned *ret_invalid)
{
    unsigned char *buf = NULL;
    uint64_t highest = 0;
    unsigned invalid = 0;
    int r;

    if (posix_memalign((void **)&buf, LAYOUT_BLOCK_SIZE, SCAN_CHUNK) != 0)
        return -ENOMEM;
    for (uint64_t off = 0; off < LAYOUT_RING_LEN; off += SCAN_CHUNK) {
        r = pread_full(fd, buf, SCAN_CHUNK, LAYOUT_RING_OFFSET + off);
        if (r < 0)
            goto cleanup;
        for (unsigned i = 0; i < SCAN_CHUNK / LAYOUT_BLOCK_SIZE; i++) {
            uint32_t slot = (uint32_t)(off / LAYOUT_BLOCK_SIZE) + i;
            uint64_t seq = 0;
            enum layout_block_state st;

            st = layout_block_check(buf + (size_t)i * LAYOUT_BLOCK_SIZE, slot, &seq);
            if (st == LAYOUT_BLOCK_VALID && seq > highest)
                highest = seq;
            else if (st != LAYOUT_BLOCK_VALID && st != LAYOUT_BLOCK_EMPTY)
                invalid++;
        }
    }
    *ret_highest = highest;
    *ret_invalid = invalid;
    r = 0;
 cleanup:
    free(buf);
    return r;
}

static uint64_t
make_run_id(void)
{
    uint64_t id = 0;

    /* getrandom may block very early in boot before the pool is ready: GRND_NONBLOCK, and fall
     * back to the clock, which is good enough to tell runs apart. */
    if (getrandom(&id, sizeof(id), GRND_NONBLOCK) != (ssize_t)sizeof(id))
        id = layout_mix64(mono_ns() ^ ((uint64_t)getpid() << 32));
    return id;
}

static int
run_writer(const struct writer_opts *o)
{
    unsigned char *blk = NULL;
    uint64_t size = 0, seq, highest = 0, writes = 0, lat_max = 0, period, next, next_hb, run_id;
    unsigned invalid = 0, errors = 0;
    int fd, r;

    fd = open(o->dev, O_RDWR | O_DIRECT | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "CA-WRITER error: open %s: %s\n", o->dev, strerror(errno));
        return 1;
    }
    r = device_size(fd, &size);
    if (r < 0) {
        fprintf(stderr, "CA-WRITER error: size of %s: %s\n", o->dev, strerror(-r));
        close(fd);
        return 1;
    }
    if (size < LAYOUT_RING_OFFSET + LAYOUT_RING_LEN) {
        fprintf(stderr, "CA-WRITER error: %s is %" PRIu64 " bytes, ring needs %llu\n",
                o->dev, size, LAYOUT_RING_OFFSET + LAYOUT_RING_LEN);
        close(fd);
        return 1;
    }
    r = scan_ring(fd, &highest, &invalid);
    if (r < 0) {
        fprintf(stderr, "CA-WRITER error: scanning ring of %s: %s\n", o->dev, strerror(-r));
        close(fd);
        return 1;
    }
    if (posix_memalign((void **)&blk, LAYOUT_BLOCK_SIZE, LAYOUT_BLOCK_SIZE) != 0) {
        close(fd);
        return 1;
    }

    run_id = make_run_id();
    printf("CA-WRITER start dev=%s resume_after=%" PRIu64 " invalid=%u wps=%u hb_ms=%u "
           "run_id=%016" PRIx64 "\n", o->dev, highest, invalid, o->wps, o->hb_ms, run_id);
    fflush(stdout);

    period = o->wps ? 1000000000ull / o->wps : 0;
    next = mono_ns();
    next_hb = next + (uint64_t)o->hb_ms * 1000000ull;
    seq = highest + 1;
    while (!stop_requested && (o->count == 0 || writes < o->count)) {
        uint64_t t0 = mono_ns(), t1;

        layout_block_fill(blk, seq, t0, run_id);
        r = pwrite_full(fd, blk, LAYOUT_BLOCK_SIZE, layout_ring_slot_offset(layout_ring_slot(seq)));
        if (r == 0 && fdatasync(fd) < 0)
            r = -errno;
        if (r < 0) {
            /* Retry the same sequence number: the history must stay gap-free. */
            if (errors++ < 10 || errors % 100 == 0)
                printf("CA-WRITER error seq=%" PRIu64 ": %s (retrying)\n", seq, strerror(-r));
            fflush(stdout);
            sleep_until_ns(mono_ns() + 1000000000ull);
            continue;
        }
        t1 = mono_ns();
        if (t1 - t0 > lat_max)
            lat_max = t1 - t0;
        if (writes++ == 0) {
            printf("CA-WRITER running first_seq=%" PRIu64 "\n", seq);
            fflush(stdout);
        }
        if (o->hb_ms && t1 >= next_hb) {
            printf("CA-HB seq=%" PRIu64 " t=%" PRIu64 ".%03" PRIu64 " lat_max_us=%" PRIu64
                   " writes=%" PRIu64 "\n", seq, (uint64_t)(t1 / 1000000000u),
                   (uint64_t)((t1 / 1000000u) % 1000u), (uint64_t)(lat_max / 1000u), writes);
            fflush(stdout);
            lat_max = 0;
            next_hb = t1 + (uint64_t)o->hb_ms * 1000000ull;
        }
        seq++;
        if (period) {
            next += period;
            /* After a long stall (VM paused, host busy) do not burst to catch up. */
            if (next + 1000000000ull < t1)
                next = t1;
            sleep_until_ns(next);
        }
    }
    printf("CA-WRITER stop last_seq=%" PRIu64 " writes=%" PRIu64 "\n", seq - 1, writes);
    fflush(stdout);
    free(blk);
    close(fd);
    return 0;
}

static int
format_base(const char *path)
{
    unsigned char blk[LAYOUT_BLOCK_SIZE];
    int fd, r = 0;

    fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "ca-writer: open %s: %s\n", path, strerror(errno));
        return 1;
    }
    for (uint64_t b = 0; b < LAYOUT_BASE_BLOCKS; b++) {
        uint64_t off = LAYOUT_BASE_OFFSET + b * LAYOUT_BLOCK_SIZE;

        layout_pattern_fill(blk, off / LAYOUT_BLOCK_SIZE);
        r = pwrite_full(fd, blk, sizeof(blk), off);
        if (r < 0) {
            fprintf(stderr, "ca-writer: write %s: %s\n", path, strerror(-r));
            break;
        }
    }
    if (close(fd) < 0 && r == 0) {
        fprintf(stderr, "ca-writer: close %s: %s\n", path, strerror(errno));
        r = -EIO;
    }
    return r < 0 ? 1 : 0;
}

static void
print_layout(void)
{
    printf("LAYOUT_BLOCK_SIZE=%u\n", LAYOUT_BLOCK_SIZE);
    printf("LAYOUT_BASE_OFFSET=%llu\n", LAYOUT_BASE_OFFSET);
    printf("LAYOUT_BASE_LEN=%llu\n", LAYOUT_BASE_LEN);
    printf("LAYOUT_RING_OFFSET=%llu\n", LAYOUT_RING_OFFSET);
    printf("LAYOUT_RING_SLOTS=%u\n", LAYOUT_RING_SLOTS);
    printf("LAYOUT_RING_LEN=%" PRIu64 "\n", (uint64_t)LAYOUT_RING_LEN);
    printf("LAYOUT_FS_OFFSET=%llu\n", LAYOUT_FS_OFFSET);
    printf("LAYOUT_FS_LEN=%llu\n", LAYOUT_FS_LEN);
    printf("LAYOUT_MIN_DISK=%llu\n", LAYOUT_MIN_DISK);
}

static void
usage(FILE *f)
{
    fprintf(f,
            "usage: ca-writer [--dev PATH] [--wps N] [--hb-ms N] [--count N]\n"
            "       ca-writer --format-base RAW_IMAGE\n"
            "       ca-writer --print-layout\n"
            "  --dev PATH    disk to write (default /dev/vda)\n"
            "  --wps N       writes per second, 0 = as fast as possible (default 200)\n"
            "  --hb-ms N     heartbeat period in ms, 0 = none (default 100)\n"
            "  --count N     stop after N writes (default: run until SIGTERM)\n");
}

int
main(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "dev", required_argument, NULL, 'd' },
        { "wps", required_argument, NULL, 'w' },
        { "hb-ms", required_argument, NULL, 'b' },
        { "count", required_argument, NULL, 'n' },
        { "format-base", required_argument, NULL, 'F' },
        { "print-layout", no_argument, NULL, 'L' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct writer_opts o = { .dev = "/dev/vda", .wps = 200, .hb_ms = 100, .count = 0 };
    struct sigaction sa = { .sa_handler = on_signal };
    const char *base_path = NULL;
    bool layout = false;
    uint64_t v;
    int c;

    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'd':
            o.dev = optarg;
            break;
        case 'w':
        case 'b':
            if (parse_u64(optarg, 1000000, &v) < 0) {
                fprintf(stderr, "ca-writer: bad number '%s'\n", optarg);
                return 2;
            }
            if (c == 'w')
                o.wps = (unsigned)v;
            else
                o.hb_ms = (unsigned)v;
            break;
        case 'n':
            if (parse_u64(optarg, UINT64_MAX, &o.count) < 0) {
                fprintf(stderr, "ca-writer: bad number '%s'\n", optarg);
                return 2;
            }
            break;
        case 'F':
            base_path = optarg;
            break;
        case 'L':
            layout = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (layout) {
        print_layout();
        return 0;
    }
    if (base_path)
        return format_base(base_path);

    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    return run_writer(&o);
}
