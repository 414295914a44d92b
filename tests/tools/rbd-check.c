/* rbd-check: drives the rbd disk backend (backends/rbd.c) against a Ceph pool without libvirt,
 * for tests/integration/test-rbd-backend.sh. One operation per run, one JSON line on stdout.
 *
 *   rbd-check COMMON view --out RAW_FILE [--extents]
 *   rbd-check COMMON direct --image-id ID --target-pool POOL [--fsid FSID]
 *                           [--flatten sync|background|never]
 *   rbd-check COMMON undo --image-id ID --target-pool POOL
 *   rbd-check COMMON flatten --image-id ID --target-pool POOL
 *   rbd-check COMMON cleanup | owns
 *   COMMON: [--conf CEPH_CONF] [--id USER] --pool POOL --uuid INSTANCE_UUID [--job-id ID]
 *           [--quiesce none|try|required] [--debug]
 *
 * view: open_view, check the extent map, write the view as a raw file (ZERO extents as sparse
 * holes), close_view; --extents also lists the DATA extents. There is no guest here, so there
 * are no quiesce_ops: --quiesce try records why the freeze was skipped, required fails.
 * Exit 0 on success, 1 on failure (the JSON line then has "ok":false, the stage, the negative
 * errno as "code" and the error text). */

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

/* The view contract: extents sorted, contiguous, non-empty, merged, covering the disk, and
 * allocated_bytes their DATA sum. */
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

/* Write the view to path as a raw file; *ret_read_ms is the time spent in pread. */
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
            continue;
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
    *ret_read_ms = read_ms;
    return 0;
}

static void
print_info(const struct view_info *in, enum quiesce_mode q)
{
    printf("\"path\":\"%s\",\"quiesce\":\"%s\",\"frozen\":%s,\"frozen_count\":%d,"
           "\"freeze_window_ms\":%" PRId64 ",\"quiesce_error\":", view_path_to_string(in->path),
           quiesce_mode_to_string(q), in->frozen ? "true" : "false", in->frozen_count,
           in->freeze_window_ms);
    json_str(stdout, in->quiesce_error);
    printf(",\"disk_format\":");
    json_str(stdout, in->disk_format);
    printf(",\"setup_ms\":%" PRId64 ",\"map_ms\":%" PRId64, in->setup_ms, in->map_ms);
}

static void
usage(FILE *f)
{
    fputs("usage: rbd-check [--conf C] [--id USER] --pool POOL --uuid UUID [--job-id ID]\n"
          "                 [--quiesce none|try|required] [--debug] COMMAND\n"
          "  view --out RAW [--extents]\n"
          "  direct --image-id ID --target-pool POOL [--fsid F] [--flatten sync|background|never]\n"
          "  undo --image-id ID --target-pool POOL\n"
          "  flatten --image-id ID --target-pool POOL\n"
          "  cleanup | owns\n", f);
}

static void
progress(void *ctx, uint64_t done, uint64_t total)
{
    unsigned *calls = ctx;
    (void)done;
    (void)total;
    (*calls)++;
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"conf", required_argument, NULL, 'c'},
        {"id", required_argument, NULL, 'u'},
        {"pool", required_argument, NULL, 'p'},
        {"uuid", required_argument, NULL, 'i'},
        {"job-id", required_argument, NULL, 'j'},
        {"quiesce", required_argument, NULL, 'q'},
        {"out", required_argument, NULL, 'o'},
        {"extents", no_argument, NULL, 'e'},
        {"image-id", required_argument, NULL, 'I'},
        {"target-pool", required_argument, NULL, 'T'},
        {"fsid", required_argument, NULL, 'F'},
        {"flatten", required_argument, NULL, 'f'},
        {"debug", no_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    struct disk_backend_config cfg = {0};
    struct snap_job job = {.scratch_dir = "/var/tmp/ca-rbd-check", .agent_timeout_s = 10};
    struct direct_target t = {.flatten = FLATTEN_NEVER};
    struct agent_err err = {0};
    const struct disk_backend_ops *ops = NULL;
    struct disk_view *v = NULL;
    void *h = NULL;
    const char *out = NULL, *cmd;
    bool list_extents = false;
    char job_id[64];
    int64_t t0, t_open, t_read = 0, read_ms = 0;
    size_t n_data = 0;
    int c, r, rc = 1;

    snprintf(job_id, sizeof(job_id), "rc-%ld", (long)getpid());
    job.job_id = job_id;
    /* GNU getopt permutes: options may come before or after the command. */
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'c': cfg.ceph_conf = optarg; break;
        case 'u': cfg.rbd_user = optarg; break;
        case 'p': cfg.rbd_pool = optarg; break;
        case 'i': job.instance_uuid = optarg; break;
        case 'j': job.job_id = optarg; break;
        case 'q':
            for (r = 0; r < QUIESCE_MODE_MAX; r++)
                if (strcmp(optarg, quiesce_mode_to_string((enum quiesce_mode)r)) == 0)
                    break;
            if (r == QUIESCE_MODE_MAX) {
                fprintf(stderr, "rbd-check: bad --quiesce '%s'\n", optarg);
                return 2;
            }
            job.quiesce = (enum quiesce_mode)r;
            break;
        case 'o': out = optarg; break;
        case 'e': list_extents = true; break;
        case 'I': t.image_id = optarg; break;
        case 'T': t.pool = optarg; break;
        case 'F': t.fsid = optarg; break;
        case 'f':
            for (r = 0; r < FLATTEN_POLICY_MAX; r++)
                if (strcmp(optarg, flatten_policy_to_string((enum flatten_policy)r)) == 0)
                    break;
            if (r == FLATTEN_POLICY_MAX) {
                fprintf(stderr, "rbd-check: bad --flatten '%s'\n", optarg);
                return 2;
            }
            t.flatten = (enum flatten_policy)r;
            break;
        case 'd': log_set_debug_mask(1u << LOG_RBD); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind + 1 != argc) {
        usage(stderr);
        return 2;
    }
    cmd = argv[optind];
    if (!cfg.rbd_pool || !job.instance_uuid ||
        (strcmp(cmd, "view") == 0 && !out) ||
        ((strcmp(cmd, "direct") == 0 || strcmp(cmd, "undo") == 0 ||
          strcmp(cmd, "flatten") == 0) && (!t.image_id || !t.pool))) {
        usage(stderr);
        return 2;
    }

    ops = backend_lookup("rbd");
    if (!ops) {
        agent_err_set(&err, -ENOENT, "no complete backend 'rbd'");
        return fail_json("lookup", &err);
    }
    t0 = now_ms();
    if (ops->open(&cfg, &h, &err) < 0) {
        rc = fail_json("open", &err);
        goto out;
    }
    t_open = now_ms() - t0;

    if (strcmp(cmd, "owns") == 0) {
        r = ops->owns(h, &job, &err);
        if (r < 0) {
            rc = fail_json("owns", &err);
            goto out;
        }
        printf("{\"ok\":true,\"owns\":%s,\"connect_ms\":%" PRId64 "}\n", r ? "true" : "false",
               t_open);
        rc = 0;
    } else if (strcmp(cmd, "cleanup") == 0) {
        t0 = now_ms();
        if (ops->cleanup_job(h, &job, &err) < 0) {
            rc = fail_json("cleanup_job", &err);
            goto out;
        }
        printf("{\"ok\":true,\"stage\":\"cleanup_job\",\"ms\":%" PRId64 "}\n", now_ms() - t0);
        rc = 0;
    } else if (strcmp(cmd, "direct") == 0) {
        struct direct_result res;
        t0 = now_ms();
        if (ops->direct_snapshot(h, &job, &t, &res, &err) < 0) {
            rc = fail_json("direct_snapshot", &err);
            goto out;
        }
        printf("{\"ok\":true,\"job_id\":");
        json_str(stdout, job.job_id);
        printf(",\"location\":");
        json_str(stdout, res.location);
        printf(",\"fsid\":");
        json_str(stdout, res.fsid);
        printf(",\"size\":%" PRIu64 ",\"parent_snap\":", res.size);
        json_str(stdout, res.parent_snap);
        printf(",\"flatten\":\"%s\",\"flatten_pending\":%s,\"direct_ms\":%" PRId64 ",",
               flatten_policy_to_string(t.flatten), res.flatten_pending ? "true" : "false",
               now_ms() - t0);
        print_info(&res.info, job.quiesce);
        printf("}\n");
        rc = 0;
    } else if (strcmp(cmd, "undo") == 0) {
        t0 = now_ms();
        if (ops->direct_undo(h, &job, &t, &err) < 0) {
            rc = fail_json("direct_undo", &err);
            goto out;
        }
        printf("{\"ok\":true,\"stage\":\"direct_undo\",\"ms\":%" PRId64 "}\n", now_ms() - t0);
        rc = 0;
    } else if (strcmp(cmd, "flatten") == 0) {
        unsigned calls = 0;
        t0 = now_ms();
        if (ops->flatten(h, &job, &t, progress, &calls, &err) < 0) {
            rc = fail_json("flatten", &err);
            goto out;
        }
        printf("{\"ok\":true,\"stage\":\"flatten\",\"flatten_ms\":%" PRId64 ",\"progress_calls\":"
               "%u}\n", now_ms() - t0, calls);
        rc = 0;
    } else if (strcmp(cmd, "view") == 0) {
        int64_t t_close;
        t0 = now_ms();
        if (ops->open_view(h, &job, &v, &err) < 0) {
            rc = fail_json("open_view", &err);
            goto out;
        }
        t_open = now_ms() - t0;
        if (check_extents(v, &n_data, &err) < 0) {
            fail_json("extents", &err);
            goto close;
        }
        t0 = now_ms();
        if (write_raw(v, out, &read_ms, &err) < 0) {
            fail_json("read", &err);
            goto close;
        }
        t_read = now_ms() - t0;
        rc = 0;
 close:
        t0 = now_ms();
        if (ops->close_view(h, v, &err) < 0) {
            rc = fail_json("close_view", &err);
            goto out;
        }
        t_close = now_ms() - t0;
        if (rc == 0) {
            double mib = (double)v->allocated_bytes / (1024.0 * 1024.0);
            printf("{\"ok\":true,\"job_id\":");
            json_str(stdout, job.job_id);
            printf(",");
            print_info(&v->info, job.quiesce);
            printf(",\"virtual_size\":%" PRIu64 ",\"allocated_bytes\":%" PRIu64 ",\"extents\":%zu,"
                   "\"data_extents\":%zu,\"open_ms\":%" PRId64 ",\"read_ms\":%" PRId64
                   ",\"copy_ms\":%" PRId64 ",\"close_ms\":%" PRId64 ",\"read_mib_s\":%.1f",
                   v->virtual_size, v->allocated_bytes, v->n_extents, n_data, t_open, read_ms,
                   t_read, t_close, read_ms > 0 ? mib * 1000.0 / (double)read_ms : 0.0);
            if (list_extents) {
                printf(",\"data\":[");
                for (size_t i = 0, k = 0; i < v->n_extents; i++) {
                    if (v->extents[i].type != IMGENC_EXTENT_DATA)
                        continue;
                    printf("%s[%" PRIu64 ",%" PRIu64 "]", k++ ? "," : "", v->extents[i].offset,
                           v->extents[i].length);
                }
                printf("]");
            }
            printf("}\n");
        }
    } else {
        usage(stderr);
        rc = 2;
    }
 out:
    if (ops && v)
        ops->free_view(h, v);
    if (ops && h)
        ops->close(h);
    fflush(stdout);
    return rc;
}
