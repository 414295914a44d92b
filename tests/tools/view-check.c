/* view-check: drives the qcow2 disk backend the way the worker will, for the integration tests
 * (tests/integration/test-qcow2-view.sh). Opens the backend, opens a view of a domain's root
 * disk, checks the extent map, writes the view as a raw image (ZERO extents left as sparse
 * holes), closes the view and prints one JSON line: the view_info, sizes and per-phase times.
 *
 *   view-check --uri URI --uuid UUID [--quiesce none|try|required] [--no-live]
 *              [--scratch DIR] [--job-id ID] [--agent-timeout S] [--root-dev /dev/vdX]
 *              [--hold-ms MS] [--abandon] [--debug] --out RAW_FILE
 *   view-check --uri URI --uuid UUID --cleanup --job-id ID [--scratch DIR]
 *
 * --hold-ms keeps the view open that long after reading it (the test looks at libvirt's state
 * meanwhile); --abandon exits right after reading without closing the view, as a crashed agent
 * would; --cleanup runs the backend's cleanup_job for a job id, as the journal does after a
 * restart. Exit 0 on success, 1 on failure (the JSON line then has "ok":false and the error). */

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "cleanup.h"
#include "err.h"
#include "log.h"
#include "util.h"

static int64_t
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* s as a JSON string (quotes included); NULL as null. */
static void
json_str(FILE *f, const char *s)
{
    if (!s) {
        fputs("null", f);
        return;
    }
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static int
fail_json(const char *stage, const struct agent_err *err)
{
    printf("{\"ok\":false,\"stage\":");
    json_str(stdout, stage);
    printf(",\"code\":%d,\"error\":", err->code);
    json_str(stdout, err->msg);
    printf("}\n");
    fflush(stdout);
    return 1;
}

/* The contract the worker relies on: extents sorted, non-overlapping, non-empty, inside the
 * disk, covering it whole, and allocated_bytes their DATA sum. */
static int
check_extents(const struct disk_view *v, size_t *ret_data, struct agent_err *err)
{
    uint64_t next = 0, data = 0;
    size_t nd = 0;

    for (size_t i = 0; i < v->n_extents; i++) {
        const struct imgenc_extent *e = &v->extents[i];
        if (e->length == 0 || e->offset != next || e->length > v->virtual_size - e->offset ||
            (e->type != IMGENC_EXTENT_DATA && e->type != IMGENC_EXTENT_ZERO))
            return agent_err_set(err, -EPROTO, "extent %zu (%" PRIu64 "+%" PRIu64 " type %d) "
                                 "breaks the map at %" PRIu64, i, e->offset, e->length,
                                 (int)e->type, next);
        if (i > 0 && e->type == v->extents[i - 1].type)
            return agent_err_set(err, -EPROTO, "extents %zu and %zu not merged", i - 1, i);
        if (e->type == IMGENC_EXTENT_DATA) {
            data += e->length;
            nd++;
        }
        next = e->offset + e->length;
    }
    if (next != v->virtual_size)
        return agent_err_set(err, -EPROTO, "extents end at %" PRIu64 ", disk at %" PRIu64, next,
                             v->virtual_size);
    if (data != v->allocated_bytes)
        return agent_err_set(err, -EPROTO, "allocated_bytes %" PRIu64 " but DATA extents sum to "
                             "%" PRIu64, v->allocated_bytes, data);
    *ret_data = nd;
    return 0;
}

/* Write the view to path as a raw image; returns the time spent in pread. */
static int
write_raw(const struct disk_view *v, const char *path, int64_t *ret_read_ms, struct agent_err *err)
{
    _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    _cleanup_free_ char *buf = malloc(IMGENC_READ_MAX);
    int64_t read_ms = 0;

    if (fd < 0)
        return agent_err_set(err, -errno, "open %s: %s", path, strerror(errno));
    if (!buf)
        return agent_err_set(err, -ENOMEM, "out of memory");
    if (ftruncate(fd, (off_t)v->virtual_size) < 0)
        return agent_err_set(err, -errno, "truncate %s: %s", path, strerror(errno));
    for (size_t i = 0; i < v->n_extents; i++) {
        const struct imgenc_extent *e = &v->extents[i];
        if (e->type != IMGENC_EXTENT_DATA)
            continue; /* a hole in the sparse file reads as zeros */
        for (uint64_t off = e->offset; off < e->offset + e->length;) {
            uint64_t left = e->offset + e->length - off;
            size_t n = left < IMGENC_READ_MAX ? (size_t)left : IMGENC_READ_MAX;
            int64_t t = now_ms();
            int r = v->pread(v->opaque, buf, n, off, err);
            read_ms += now_ms() - t;
            if (r < 0)
                return r;
            for (size_t done = 0; done < n;) {
                ssize_t w = pwrite(fd, buf + done, n - done, (off_t)(off + done));
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    return agent_err_set(err, -errno, "write %s: %s", path, strerror(errno));
                done += (size_t)w;
            }
            off += n;
        }
    }
    if (fsync(fd) < 0)
        return agent_err_set(err, -errno, "fsync %s: %s", path, strerror(errno));
    *ret_read_ms = read_ms;
    return 0;
}

static void
usage(FILE *f)
{
    fputs("usage: view-check --uri URI --uuid UUID [--quiesce none|try|required] [--no-live]\n"
          "                  [--scratch DIR] [--job-id ID] [--agent-timeout S]\n"
          "                  [--root-dev /dev/vdX] [--hold-ms MS] [--abandon] [--debug]\n"
          "                  --out RAW_FILE\n"
          "       view-check --uri URI --uuid UUID --cleanup --job-id ID [--scratch DIR]\n", f);
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"uri", required_argument, NULL, 'u'},
        {"uuid", required_argument, NULL, 'i'},
        {"quiesce", required_argument, NULL, 'q'},
        {"no-live", no_argument, NULL, 'n'},
        {"scratch", required_argument, NULL, 's'},
        {"job-id", required_argument, NULL, 'j'},
        {"agent-timeout", required_argument, NULL, 't'},
        {"root-dev", required_argument, NULL, 'r'},
        {"hold-ms", required_argument, NULL, 'H'},
        {"abandon", no_argument, NULL, 'A'},
        {"cleanup", no_argument, NULL, 'C'},
        {"debug", no_argument, NULL, 'd'},
        {"out", required_argument, NULL, 'o'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    struct disk_backend_config cfg = {0};
    struct snap_job job = {.scratch_dir = "/var/tmp/ca-view-check", .agent_timeout_s = 10};
    struct agent_err err = {0};
    const struct disk_backend_ops *ops;
    struct disk_view *v = NULL;
    void *h = NULL;
    const char *out = NULL;
    char job_id[64];
    long hold_ms = 0, l;
    bool abandon = false, cleanup = false;
    int64_t t0, t_open, t_read = 0, t_close = 0, read_ms = 0;
    size_t n_data = 0;
    int c, r, rc = 1;

    snprintf(job_id, sizeof(job_id), "vc-%ld", (long)getpid());
    job.job_id = job_id;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'u': cfg.connection_uri = optarg; break;
        case 'i': job.instance_uuid = optarg; break;
        case 'q':
            for (r = 0; r < QUIESCE_MODE_MAX; r++)
                if (strcmp(optarg, quiesce_mode_to_string((enum quiesce_mode)r)) == 0)
                    break;
            if (r == QUIESCE_MODE_MAX) {
                fprintf(stderr, "view-check: bad --quiesce '%s'\n", optarg);
                return 2;
            }
            job.quiesce = (enum quiesce_mode)r;
            break;
        case 'n': job.live_snapshot_disabled = true; break;
        case 's': job.scratch_dir = optarg; break;
        case 'j': job.job_id = optarg; break;
        case 't':
            if (util_parse_long(optarg, 0, 3600, &l) < 0) {
                fprintf(stderr, "view-check: bad --agent-timeout '%s'\n", optarg);
                return 2;
            }
            job.agent_timeout_s = (int)l;
            break;
        case 'r': job.root_device_name = optarg; break;
        case 'H':
            if (util_parse_long(optarg, 0, 3600000, &hold_ms) < 0) {
                fprintf(stderr, "view-check: bad --hold-ms '%s'\n", optarg);
                return 2;
            }
            break;
        case 'A': abandon = true; break;
        case 'C': cleanup = true; break;
        case 'd': log_set_debug_mask(1u << LOG_QCOW2); break;
        case 'o': out = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!cfg.connection_uri || !job.instance_uuid || (!out && !cleanup) || optind != argc) {
        usage(stderr);
        return 2;
    }

    if (backend_global_init(&err) < 0)
        return fail_json("init", &err);
    ops = backend_lookup("qcow2");
    if (!ops) {
        agent_err_set(&err, -ENOENT, "no complete backend 'qcow2'");
        rc = fail_json("lookup", &err);
        goto out;
    }
    if (ops->open(&cfg, &h, &err) < 0) {
        rc = fail_json("open", &err);
        goto out;
    }

    if (cleanup) {
        t0 = now_ms();
        if (!ops->cleanup_job || ops->cleanup_job(h, &job, &err) < 0) {
            rc = fail_json("cleanup_job", &err);
            goto out;
        }
        printf("{\"ok\":true,\"stage\":\"cleanup_job\",\"job_id\":");
        json_str(stdout, job.job_id);
        printf(",\"cleanup_ms\":%" PRId64 "}\n", now_ms() - t0);
        rc = 0;
        goto out;
    }

    r = ops->owns(h, &job, &err);
    if (r != 1) {
        if (r == 0)
            agent_err_set(&err, -ENOENT, "backend does not own the root disk of %s",
                          job.instance_uuid);
        rc = fail_json("owns", &err);
        goto out;
    }

    t0 = now_ms();
    if (ops->open_view(h, &job, &v, &err) < 0) {
        rc = fail_json("open_view", &err);
        goto out;
    }
    t_open = now_ms() - t0;

    if (check_extents(v, &n_data, &err) < 0) {
        rc = fail_json("extents", &err);
        goto close;
    }
    t0 = now_ms();
    if (write_raw(v, out, &read_ms, &err) < 0) {
        rc = fail_json("read", &err);
        goto close;
    }
    t_read = now_ms() - t0;
    if (abandon) {
        /* A crash: no close_view, no cleanup; the NBD client dies with the process. */
        printf("{\"ok\":true,\"stage\":\"abandoned\",\"job_id\":");
        json_str(stdout, job.job_id);
        printf(",\"path\":\"%s\"}\n", view_path_to_string(v->info.path));
        fflush(stdout);
        _exit(0);
    }
    if (hold_ms > 0) {
        struct timespec ts = {.tv_sec = hold_ms / 1000, .tv_nsec = (hold_ms % 1000) * 1000000};
        nanosleep(&ts, NULL);
    }
    rc = 0;
 close:
    t0 = now_ms();
    if (ops->close_view(h, v, &err) < 0) {
        rc = fail_json("close_view", &err);
        goto out;
    }
    t_close = now_ms() - t0;
    if (rc == 0) {
        const struct view_info *in = &v->info;
        double mib = (double)v->allocated_bytes / (1024.0 * 1024.0);
        printf("{\"ok\":true,\"job_id\":");
        json_str(stdout, job.job_id);
        printf(",\"path\":\"%s\",\"path_reason\":", view_path_to_string(in->path));
        json_str(stdout, in->path_reason);
        printf(",\"quiesce\":\"%s\",\"frozen\":%s,\"frozen_count\":%d,\"freeze_window_ms\":%"
               PRId64 ",\"quiesce_error\":", quiesce_mode_to_string(job.quiesce),
               in->frozen ? "true" : "false", in->frozen_count, in->freeze_window_ms);
        json_str(stdout, in->quiesce_error);
        printf(",\"downtime_ms\":%" PRId64 ",\"disk_target\":", in->downtime_ms);
        json_str(stdout, in->disk_target);
        printf(",\"disk_format\":");
        json_str(stdout, in->disk_format);
        printf(",\"virtual_size\":%" PRIu64 ",\"allocated_bytes\":%" PRIu64 ",\"extents\":%zu,"
               "\"data_extents\":%zu,\"open_ms\":%" PRId64 ",\"setup_ms\":%" PRId64
               ",\"map_ms\":%" PRId64 ",\"read_ms\":%" PRId64 ",\"copy_ms\":%" PRId64
               ",\"close_ms\":%" PRId64 ",\"read_mib_s\":%.1f}\n",
               v->virtual_size, v->allocated_bytes, v->n_extents, n_data, t_open,
               in->setup_ms, in->map_ms, read_ms, t_read, t_close,
               read_ms > 0 ? mib * 1000.0 / (double)read_ms : 0.0);
    }
 out:
    if (ops && v)
        ops->free_view(h, v);
    if (ops && h)
        ops->close(h);
    backend_global_cleanup();
    fflush(stdout);
    return rc;
}
