/* The rbd backend: instance disks in Ceph, named as nova names them, <pool>/<instance_uuid>_disk
 * in [libvirt] images_rbd_pool. This file is the only user of librados and librbd in the agent.
 *
 * Two ways to snapshot a disk, both around one rbd snapshot named after the job
 * (<uuid>_disk@<job_id>) taken between a guest freeze and thaw (struct quiesce_ops: the worker
 * lends us the qcow2 backend's libvirt guest agent calls):
 *   - direct (nova's direct_snapshot): protect the snapshot, clone it into Glance's pool as the
 *     image id (clone v1: the parent snapshot must be protected), optionally flatten the clone,
 *     then give the clone the protected snapshot "snap" that Glance hands out. Nothing is copied
 *     unless flattened; Glance gets rbd://<fsid>/<pool>/<image_id>/snap.
 *   - the streaming fallback (open_view): the snapshot is opened read-only and read extent by
 *     extent (the extent map from rbd_diff_iterate2), the worker encodes and uploads it.
 *
 * What may outlive a crash, and who removes it, found from the job alone:
 *   <uuid>_disk@<job_id>         cleanup_job (a view's), or flatten/direct_undo (a direct one's,
 *                                which stays protected while the clone still depends on it)
 *   <t->pool>/<image_id>[@snap]  direct_undo
 * Ceph's order for taking a clone v1 apart is fixed: unprotect the clone's snapshot, remove it,
 * remove the clone, then unprotect the parent snapshot (EBUSY while any clone of it exists) and
 * remove it. An image with snapshots cannot be removed (ENOTEMPTY).
 *
 * Every call is bounded: client_mount_timeout, rados_mon_op_timeout and rados_osd_op_timeout are
 * set before connecting, so a dead cluster fails in about RADOS_TIMEOUT_S instead of hanging.
 * librados and librbd return -errno and carry no message of their own: errors are reported with
 * strerror() of that code. One rados cluster handle per backend handle, shared by every thread
 * (librados is thread-safe); each call opens its own ioctx and images. */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <rados/librados.h>
#include <rbd/features.h>
#include <rbd/librbd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
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

/* Mount (mon session + auth), any mon command, any OSD op: a dead or unreachable cluster fails
 * within this many seconds. An OSD op is one object (<= 4 MiB): fine on any healthy cluster. */
#define RADOS_TIMEOUT_S "15"
/* View reads: pieces of this size, this many in flight (see view_pread). */
#define READ_PIECE (1u * 1024 * 1024)
#define READ_INFLIGHT 8
/* The protected snapshot Glance's rbd store makes on every image and nova hands out. */
#define CLONE_SNAP "snap"
/* Features a clone keeps from its parent; layering (a clone) and deep-flatten (so flattening
 * also frees the clone's own snapshot from the parent) are always added. */
#define CLONE_KEEP_FEATURES                                                                    \
    (RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK | RBD_FEATURE_OBJECT_MAP |              \
     RBD_FEATURE_FAST_DIFF | RBD_FEATURE_DEEP_FLATTEN)
#define NAME_MAX_LEN 96

struct rbd_handle {
    rados_t cluster;
    char *pool;    /* the instance pool, [libvirt] images_rbd_pool */
    char fsid[64]; /* this cluster's */
};

/* ---- small helpers ------------------------------------------------------------------------ */

static int64_t
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Fill err with "rbd: <what>: <strerror>" for a librados/librbd return code r (< 0) and return
 * r. A timeout, a lost connection or a busy object is retryable. */
static int ceph_fail(struct agent_err *err, int r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int
ceph_fail(struct agent_err *err, int r, const char *fmt, ...)
{
    char what[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    if (r == -ETIMEDOUT || r == -ECONNREFUSED || r == -ESHUTDOWN || r == -ENOTCONN ||
        r == -EAGAIN || r == -EBUSY)
        return agent_err_set_retryable(err, r, "rbd: %s: %s", what, strerror(-r));
    return agent_err_set(err, r, "rbd: %s: %s", what, strerror(-r));
}

/* Add "; <text>" to a report already set (what a rollback could not undo): the first failure
 * keeps its code, the operator also learns what was left. */
static void err_append(struct agent_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
err_append(struct agent_err *err, const char *fmt, ...)
{
    size_t n;
    va_list ap;

    if (!err || err->code == 0)
        return;
    n = strlen(err->msg);
    if (n + 3 >= sizeof(err->msg))
        return;
    memcpy(err->msg + n, "; ", 3);
    n += 2;
    va_start(ap, fmt);
    vsnprintf(err->msg + n, sizeof(err->msg) - n, fmt, ap);
    va_end(ap);
}

/* Test-only fault switch (never in release builds): CA_TEST_RBD_FAIL_AT=<step> makes that step
 * fail with -EIO right after it succeeded, so the rollback of everything up to it is exercised.
 * Steps: snap, protect, clone, flatten, clone-snap, clone-protect. */
static int
test_fault(const struct snap_job *job, const char *step, struct agent_err *err)
{
    char res[32];

    snprintf(res, sizeof(res), "rbd-%s", step);
    snap_job_step(job, res, "done");
#ifndef NDEBUG
    const char *s = getenv("CA_TEST_RBD_FAIL_AT");
    if (s && strcmp(s, step) == 0)
        return agent_err_set(err, -EIO, "rbd: test fault after step '%s' "
                             "(CA_TEST_RBD_FAIL_AT)", step);
#else
    (void)step;
    (void)err;
#endif
    return 0;
}

static bool
job_id_valid(const char *id)
{
    size_t n = id ? strlen(id) : 0;

    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((id[i] >= 'a' && id[i] <= 'z') || (id[i] >= '0' && id[i] <= '9') || id[i] == '-'))
            return false;
    return true;
}

/* An rbd pool or image name we are willing to put into a spec: no '/', '@', blanks or control
 * characters (they would make "pool/image@snap" ambiguous). */
static bool
name_valid(const char *s)
{
    size_t n = s ? strlen(s) : 0;

    if (n == 0 || n > NAME_MAX_LEN)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= ' ' || c == '/' || c == '@' || c == 0x7f)
            return false;
    }
    return true;
}

/* Check the job and write the instance disk's name, <uuid>_disk, into buf. */
static int
job_check(const struct snap_job *job, char *disk, size_t size, struct agent_err *err)
{
    if (!job_id_valid(job->job_id))
        return agent_err_set(err, -EINVAL, "rbd: job id '%s' is not [a-z0-9-]{1,64}",
                             job->job_id ? job->job_id : "");
    if (!name_valid(job->instance_uuid))
        return agent_err_set(err, -EINVAL, "rbd: job %s: bad instance UUID '%s'", job->job_id,
                             job->instance_uuid ? job->instance_uuid : "");
    if ((size_t)snprintf(disk, size, "%s_disk", job->instance_uuid) >= size)
        return agent_err_set(err, -ENAMETOOLONG, "rbd: instance UUID '%s' too long",
                             job->instance_uuid);
    return 0;
}

static int
target_check(const struct direct_target *t, struct agent_err *err)
{
    if (!t || !name_valid(t->image_id) || !name_valid(t->pool))
        return agent_err_set(err, -EINVAL, "rbd: bad direct target '%s/%s'",
                             t && t->pool ? t->pool : "", t && t->image_id ? t->image_id : "");
    if ((unsigned)t->flatten >= FLATTEN_POLICY_MAX)
        return agent_err_set(err, -EINVAL, "rbd: bad flatten policy %d", (int)t->flatten);
    return 0;
}

/* An ioctx on pool. -ENOENT: no such pool. */
static int
ioctx_open(struct rbd_handle *h, const char *pool, rados_ioctx_t *ret, struct agent_err *err)
{
    int r = rados_ioctx_create(h->cluster, pool, ret);

    if (r < 0)
        return ceph_fail(err, r, "open pool '%s'", pool);
    return 0;
}

/* Open pool/name read-write at its head (snapshot create/remove, clone, flatten need it). */
static int
image_open(rados_ioctx_t io, const char *pool, const char *name, rbd_image_t *ret,
           struct agent_err *err)
{
    int r = rbd_open(io, name, ret, NULL);

    if (r < 0)
        return ceph_fail(err, r, "open image '%s/%s'", pool, name);
    return 0;
}

/* Remove snapshot snap of the open image if it exists, unprotecting it first. 0 when it is gone
 * (also when it never existed); -EBUSY when a clone still depends on it. */
static int
snap_remove_gone(rbd_image_t img, const char *pool, const char *name, const char *snap,
                 struct agent_err *err)
{
    bool exists = false;
    int prot = 0, r;

    r = rbd_snap_exists(img, snap, &exists);
    if (r < 0)
        return ceph_fail(err, r, "look up snapshot '%s/%s@%s'", pool, name, snap);
    if (!exists)
        return 0;
    r = rbd_snap_is_protected(img, snap, &prot);
    if (r == -ENOENT)
        return 0;
    if (r < 0)
        return ceph_fail(err, r, "protection of '%s/%s@%s'", pool, name, snap);
    if (prot) {
        r = rbd_snap_unprotect(img, snap);
        if (r == -EBUSY)
            return agent_err_set(err, -EBUSY, "rbd: snapshot '%s/%s@%s' still has clones "
                                 "(unprotect: %s)", pool, name, snap, strerror(EBUSY));
        /* -EINVAL: not protected (any more): someone got there first. */
        if (r < 0 && r != -EINVAL)
            return ceph_fail(err, r, "unprotect '%s/%s@%s'", pool, name, snap);
    }
    r = rbd_snap_remove(img, snap);
    if (r < 0 && r != -ENOENT)
        return ceph_fail(err, r, "remove snapshot '%s/%s@%s'", pool, name, snap);
    log_debug(LOG_RBD, "removed snapshot %s/%s@%s", pool, name, snap);
    return 0;
}

/* Open pool/name and remove its snapshot snap if present. A missing image counts as done. */
static int
image_snap_remove_gone(rados_ioctx_t io, const char *pool, const char *name, const char *snap,
                       struct agent_err *err)
{
    rbd_image_t img = NULL;
    int r = rbd_open(io, name, &img, NULL);

    if (r == -ENOENT)
        return 0;
    if (r < 0)
        return ceph_fail(err, r, "open image '%s/%s'", pool, name);
    r = snap_remove_gone(img, pool, name, snap, err);
    rbd_close(img);
    return r;
}

/* Remove pool/name and its snapshot CLONE_SNAP (a direct snapshot's clone). Gone is done. */
static int
clone_remove_gone(rados_ioctx_t io, const char *pool, const char *name, struct agent_err *err)
{
    int r = image_snap_remove_gone(io, pool, name, CLONE_SNAP, err);

    if (r < 0)
        return r;
    r = rbd_remove(io, name);
    if (r == -ENOENT)
        return 0;
    if (r < 0)
        return ceph_fail(err, r, "remove image '%s/%s'", pool, name);
    log_debug(LOG_RBD, "removed image %s/%s", pool, name);
    return 0;
}

/* ---- the point in time -------------------------------------------------------------------- */

/* Freeze the guest (job->quiesce through job->quiesce_ops), create snapshot job_id on the open
 * image, thaw (always, once frozen). Fills the freeze facts of info and *ret_created (the
 * snapshot exists and is ours to remove, also when a later part of this function failed).
 * QUIESCE_REQUIRED: a failed freeze fails with nothing done; QUIESCE_TRY: the snapshot is taken
 * anyway and info->quiesce_error says why it is only crash-consistent. A failed thaw fails. */
static int
take_snapshot(rbd_image_t img, const char *pool, const char *disk, const struct snap_job *job,
              struct view_info *info, bool *ret_created, struct agent_err *err)
{
    const struct quiesce_ops *q = job->quiesce_ops;
    bool frozen = false;
    int64_t t_freeze = 0, t_snap;
    int n = 0, r;

    info->frozen = false;
    info->frozen_count = 0;
    info->freeze_window_ms = -1;
    info->quiesce_error[0] = '\0';
    if (job->quiesce != QUIESCE_NONE) {
        struct agent_err ferr = {0};
        if (!q || !q->freeze || !q->thaw) {
            r = agent_err_set(&ferr, -EIO, "no guest quiesce available to the rbd backend");
        } else {
            t_freeze = now_ms();
            r = q->freeze(q->ctx, job, &n, &ferr);
        }
        if (r == 0) {
            frozen = true;
            info->frozen = n > 0;
            info->frozen_count = n;
        } else if (job->quiesce == QUIESCE_REQUIRED) {
            return agent_err_set(err, r < 0 ? r : -EIO, "rbd: quiesce required but the guest "
                                 "could not be frozen: %s", ferr.msg);
        } else {
            snprintf(info->quiesce_error, sizeof(info->quiesce_error), "%s", ferr.msg);
            log_debug(LOG_RBD, "job %s: freeze skipped: %s", job->job_id, ferr.msg);
        }
    }

    t_snap = now_ms();
    snap_job_step(job, "rbd-snap", "intent");
    r = rbd_snap_create(img, job->job_id);
    if (r < 0) {
        ceph_fail(err, r, "snapshot '%s/%s@%s'", pool, disk, job->job_id);
    } else {
        *ret_created = true;
        log_debug(LOG_RBD, "job %s: snapshot %s/%s@%s in %" PRId64 " ms", job->job_id, pool,
                  disk, job->job_id, now_ms() - t_snap);
        r = test_fault(job, "snap", err);
    }

    if (frozen) {
        struct agent_err terr = {0};
        int t = q->thaw(q->ctx, job, &terr);
        info->freeze_window_ms = now_ms() - t_freeze;
        if (t < 0 && r == 0)
            r = agent_err_set(err, t, "rbd: thaw after the snapshot: %s", terr.msg);
        else if (t < 0)
            err_append(err, "and the thaw failed: %s", terr.msg);
        else
            log_debug(LOG_RBD, "job %s: %d filesystem(s) frozen for %" PRId64 " ms",
                      job->job_id, n, info->freeze_window_ms);
    }
    return r;
}

/* ---- open, close, owns -------------------------------------------------------------------- */

static int
cephrbd_open(const struct disk_backend_config *cfg, void **ret_h, struct agent_err *err)
{
    static const char *const timeouts[] = {"client_mount_timeout", "rados_mon_op_timeout",
                                           "rados_osd_op_timeout"};
    const char *conf = util_isempty(cfg->ceph_conf) ? NULL : cfg->ceph_conf;
    const char *user = util_isempty(cfg->rbd_user) ? NULL : cfg->rbd_user;
    struct rbd_handle *h = NULL;
    rados_t c = NULL;
    int64_t pool_id;
    int r;

    if (!name_valid(cfg->rbd_pool))
        return agent_err_set(err, -EINVAL, "rbd: bad or missing pool name '%s' "
                             "([libvirt] images_rbd_pool)", cfg->rbd_pool ? cfg->rbd_pool : "");
    h = calloc(1, sizeof(*h));
    if (!h || !(h->pool = strdup(cfg->rbd_pool))) {
        r = agent_err_set(err, -ENOMEM, "rbd: out of memory");
        goto cleanup;
    }
    /* NULL id: librados's default, client.admin. */
    r = rados_create(&c, user);
    if (r < 0) {
        ceph_fail(err, r, "create cluster handle for client '%s'", user ? user : "admin");
        goto cleanup;
    }
    r = rados_conf_read_file(c, conf);
    if (r < 0) {
        ceph_fail(err, r, "read Ceph configuration '%s'", conf ? conf : "(default search path)");
        goto cleanup;
    }
    /* After the file, so ours win: the defaults are 300 s for the mount and forever for ops. */
    for (size_t i = 0; i < ELEMENTSOF(timeouts); i++) {
        r = rados_conf_set(c, timeouts[i], RADOS_TIMEOUT_S);
        if (r < 0) {
            ceph_fail(err, r, "set %s", timeouts[i]);
            goto cleanup;
        }
    }
    /* Backends never print: librados would write its own errors to stderr. */
    (void)rados_conf_set(c, "log_to_stderr", "false");
    (void)rados_conf_set(c, "err_to_stderr", "false");
    r = rados_connect(c);
    if (r < 0) {
        ceph_fail(err, r, "connect to the cluster of '%s' as client '%s'",
                  conf ? conf : "(default configuration)", user ? user : "admin");
        goto cleanup;
    }
    r = rados_cluster_fsid(c, h->fsid, sizeof(h->fsid));
    if (r < 0) {
        ceph_fail(err, r, "cluster fsid");
        goto cleanup;
    }
    pool_id = rados_pool_lookup(c, h->pool);
    if (pool_id < 0) {
        r = ceph_fail(err, (int)pool_id, "pool '%s' ([libvirt] images_rbd_pool)", h->pool);
        goto cleanup;
    }
    log_debug(LOG_RBD, "connected to cluster %s as client '%s', instance pool %s", h->fsid,
              user ? user : "admin", h->pool);
    h->cluster = TAKE_PTR(c);
    *ret_h = TAKE_PTR(h);
    r = 0;
 cleanup:
    if (c)
        rados_shutdown(c);
    if (h)
        free(h->pool);
    free(h);
    return r;
}

static void
cephrbd_close(void *hv)
{
    struct rbd_handle *h = hv;

    if (!h)
        return;
    if (h->cluster)
        rados_shutdown(h->cluster);
    free(h->pool);
    free(h);
}

static int
cephrbd_owns(void *hv, const struct snap_job *job, struct agent_err *err)
{
    struct rbd_handle *h = hv;
    rados_ioctx_t io = NULL;
    rbd_image_t img = NULL;
    char disk[NAME_MAX_LEN + 8];
    int r;

    if (!name_valid(job->instance_uuid))
        return agent_err_set(err, -EINVAL, "rbd: bad instance UUID '%s'",
                             job->instance_uuid ? job->instance_uuid : "");
    snprintf(disk, sizeof(disk), "%s_disk", job->instance_uuid);
    r = ioctx_open(h, h->pool, &io, err);
    if (r < 0)
        goto cleanup;
    r = rbd_open_read_only(io, disk, &img, NULL);
    if (r == -ENOENT) {
        r = 0;
    } else if (r < 0) {
        ceph_fail(err, r, "open image '%s/%s'", h->pool, disk);
    } else {
        r = 1;
    }
    log_debug(LOG_RBD, "instance %s: %s/%s %s", job->instance_uuid, h->pool, disk,
              r == 1 ? "exists" : r == 0 ? "does not exist" : "cannot be opened");
 cleanup:
    if (img)
        rbd_close(img);
    if (io)
        rados_ioctx_destroy(io);
    return r;
}

/* ---- the streaming view ------------------------------------------------------------------- */

struct view_priv {
    rados_ioctx_t io;
    rbd_image_t img; /* read-only, at the snapshot; NULL once closed */
    char *pool;
    char *disk;
    char *snap;      /* the job id */
    bool closed;     /* the snapshot is gone */
};

static void
view_priv_free(struct view_priv *p)
{
    if (!p)
        return;
    if (p->img)
        rbd_close(p->img);
    if (p->io)
        rados_ioctx_destroy(p->io);
    free(p->pool);
    free(p->disk);
    free(p->snap);
    free(p);
}

static void
view_free(struct disk_view *v)
{
    if (!v)
        return;
    view_priv_free(v->priv);
    free(v->extents);
    free(v);
}

static void
view_freep(struct disk_view **v)
{
    view_free(*v);
}

/* Exactly len bytes at offset of the snapshot. The range is split into READ_PIECE reads with
 * up to READ_INFLIGHT of them in flight: one synchronous 4 MiB read keeps one OSD op busy at a
 * time, parallel pieces roughly double the throughput on the one-OSD test cluster. Each piece is
 * bounded by rados_osd_op_timeout. */
static int
view_pread(void *opaque, void *buf, size_t len, uint64_t offset, struct agent_err *err)
{
    struct view_priv *p = opaque;
    size_t done = 0;

    if (!p || !p->img)
        return agent_err_set(err, -EBADF, "rbd: read from a closed view");
    while (done < len) {
        rbd_completion_t comp[READ_INFLIGHT];
        size_t piece[READ_INFLIGHT];
        size_t n = 0, at = done;
        int r = 0;

        for (; n < READ_INFLIGHT && at < len; n++) {
            piece[n] = len - at < READ_PIECE ? len - at : READ_PIECE;
            r = rbd_aio_create_completion(NULL, NULL, &comp[n]);
            if (r == 0) {
                r = rbd_aio_read2(p->img, offset + at, piece[n], (char *)buf + at, comp[n],
                                  LIBRADOS_OP_FLAG_FADVISE_SEQUENTIAL |
                                      LIBRADOS_OP_FLAG_FADVISE_NOCACHE);
                if (r < 0)
                    rbd_aio_release(comp[n]);
            }
            if (r < 0) {
                ceph_fail(err, r, "read %zu bytes at %" PRIu64 " of '%s/%s@%s'", piece[n],
                          offset + at, p->pool, p->disk, p->snap);
                break;
            }
            at += piece[n];
        }
        /* Every submitted read is waited for, also after an error: they write into buf. */
        for (size_t i = 0; i < n; i++) {
            ssize_t got;
            rbd_aio_wait_for_complete(comp[i]);
            got = rbd_aio_get_return_value(comp[i]);
            rbd_aio_release(comp[i]);
            if (r < 0)
                continue;
            if (got < 0)
                r = ceph_fail(err, (int)got, "read %zu bytes at %" PRIu64 " of '%s/%s@%s'",
                              piece[i], offset + done, p->pool, p->disk, p->snap);
            else if ((size_t)got != piece[i])
                r = agent_err_set(err, -EIO, "rbd: short read at %" PRIu64 " of '%s/%s@%s' "
                                  "(%zd of %zu bytes)", offset + done, p->pool, p->disk,
                                  p->snap, got, piece[i]);
            else
                done += piece[i];
        }
        if (r < 0)
            return r;
    }
    return 0;
}

struct range_vec {
    struct imgenc_extent *v;
    size_t n, cap;
};

/* rbd_diff_iterate2 callback: keep the ranges that hold data. */
static int
diff_range(uint64_t off, size_t len, int exists, void *arg)
{
    struct range_vec *rv = arg;

    if (!exists || len == 0)
        return 0;
    if (rv->n == rv->cap) {
        size_t cap = rv->cap ? rv->cap * 2 : 64;
        struct imgenc_extent *nv = reallocarray(rv->v, cap, sizeof(*nv));
        if (!nv)
            return -ENOMEM;
        rv->v = nv;
        rv->cap = cap;
    }
    rv->v[rv->n++] = (struct imgenc_extent){off, len, IMGENC_EXTENT_DATA};
    return 0;
}

static int
extent_cmp(const void *a, const void *b)
{
    const struct imgenc_extent *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Turn the data ranges into the view's map: sorted, merged, gaps as ZERO, covering [0, size).
 * librbd reports objects in order, but the sort and the union make no assumption about it. */
static int
extents_build(struct range_vec *rv, uint64_t size, struct disk_view *v)
{
    struct imgenc_extent *out;
    size_t n = 0;
    uint64_t pos = 0, data = 0;

    if (rv->n > 1)
        qsort(rv->v, rv->n, sizeof(*rv->v), extent_cmp);
    /* At most one ZERO before each DATA range, plus a trailing one. */
    out = calloc(2 * rv->n + 1, sizeof(*out));
    if (!out)
        return -ENOMEM;
    for (size_t i = 0; i < rv->n; i++) {
        uint64_t s = rv->v[i].offset, e;
        if (s >= size)
            break;
        e = rv->v[i].length > size - s ? size : s + rv->v[i].length;
        if (e <= pos)
            continue;
        if (s < pos)
            s = pos;
        if (n > 0 && out[n - 1].type == IMGENC_EXTENT_DATA && s == pos) {
            out[n - 1].length += e - s;
        } else {
            if (s > pos)
                out[n++] = (struct imgenc_extent){pos, s - pos, IMGENC_EXTENT_ZERO};
            out[n++] = (struct imgenc_extent){s, e - s, IMGENC_EXTENT_DATA};
        }
        data += e - s;
        pos = e;
    }
    if (pos < size)
        out[n++] = (struct imgenc_extent){pos, size - pos, IMGENC_EXTENT_ZERO};
    v->extents = out;
    v->n_extents = n;
    v->allocated_bytes = data;
    v->virtual_size = size;
    return 0;
}

/* Open the snapshot read-only and map it. */
static int
view_map(struct view_priv *p, struct disk_view *v, struct agent_err *err)
{
    struct range_vec rv = {0};
    uint64_t size;
    int r;

    r = rbd_open_read_only(p->io, p->disk, &p->img, p->snap);
    if (r < 0)
        return ceph_fail(err, r, "open '%s/%s@%s' read-only", p->pool, p->disk, p->snap);
    r = rbd_get_size(p->img, &size);
    if (r < 0)
        return ceph_fail(err, r, "size of '%s/%s@%s'", p->pool, p->disk, p->snap);
    /* From the beginning of time (NULL), exact ranges (not whole objects), and what a clone
     * reads through from its parent too: everything that reads as non-zero. */
    r = rbd_diff_iterate2(p->img, NULL, 0, size, 1, 0, diff_range, &rv);
    if (r < 0) {
        free(rv.v);
        return ceph_fail(err, r, "extent map of '%s/%s@%s'", p->pool, p->disk, p->snap);
    }
    r = extents_build(&rv, size, v);
    free(rv.v);
    if (r < 0)
        return agent_err_set(err, r, "rbd: out of memory");
    return 0;
}

static int
cephrbd_close_view(void *hv, struct disk_view *v, struct agent_err *err)
{
    struct view_priv *p;
    int r;

    (void)hv;
    if (!v || !(p = v->priv) || p->closed)
        return 0;
    if (p->img) {
        rbd_close(p->img);
        p->img = NULL;
    }
    r = image_snap_remove_gone(p->io, p->pool, p->disk, p->snap, err);
    if (r == 0)
        p->closed = true;
    log_debug(LOG_RBD, "job %s: view closed%s", p->snap, r < 0 ? ", with errors" : "");
    return r;
}

static void
cephrbd_free_view(void *hv, struct disk_view *v)
{
    (void)hv;
    view_free(v);
}

static int
cephrbd_open_view(void *hv, const struct snap_job *job, struct disk_view **ret_v,
                  struct agent_err *err)
{
    struct rbd_handle *h = hv;
    _cleanup_(view_freep) struct disk_view *v = NULL;
    struct view_priv *p = NULL;
    rbd_image_t src = NULL;
    bool created = false;
    char disk[NAME_MAX_LEN + 8];
    int64_t t0, t1;
    int r;

    r = job_check(job, disk, sizeof(disk), err);
    if (r < 0)
        return r;
    v = calloc(1, sizeof(*v));
    p = calloc(1, sizeof(*p));
    if (v)
        v->priv = p;
    if (!v || !p || !(p->pool = strdup(h->pool)) || !(p->disk = strdup(disk)) ||
        !(p->snap = strdup(job->job_id))) {
        if (v)
            v->priv = NULL;
        view_priv_free(p);
        return agent_err_set(err, -ENOMEM, "rbd: out of memory");
    }
    v->opaque = p;
    v->pread = view_pread;
    v->info.path = VIEW_PATH_RBD_SNAP;
    v->info.freeze_window_ms = -1;
    snprintf(v->info.disk_format, sizeof(v->info.disk_format), "raw");
    if (job->root_device_name && strncmp(job->root_device_name, "/dev/", 5) == 0)
        snprintf(v->info.disk_target, sizeof(v->info.disk_target), "%s",
                 job->root_device_name + 5);

    r = ioctx_open(h, h->pool, &p->io, err);
    if (r < 0)
        goto cleanup;
    r = image_open(p->io, h->pool, disk, &src, err);
    if (r < 0)
        goto cleanup;
    /* A retried job: its earlier snapshot is another point in time. */
    r = snap_remove_gone(src, h->pool, disk, job->job_id, err);
    if (r < 0)
        goto cleanup;

    t0 = now_ms();
    r = take_snapshot(src, h->pool, disk, job, &v->info, &created, err);
    t1 = now_ms();
    v->info.setup_ms = t1 - t0;
    if (r < 0)
        goto cleanup;
    /* The read-write handle (and its watch) is not needed while the view is read. */
    rbd_close(src);
    src = NULL;

    r = view_map(p, v, err);
    if (r < 0)
        goto cleanup;
    v->info.map_ms = now_ms() - t1;
    log_debug(LOG_RBD, "job %s: snapshot view of %s/%s: setup %" PRId64 " ms, map %" PRId64
              " ms, %zu extents, %" PRIu64 " of %" PRIu64 " bytes allocated, frozen %d (%" PRId64
              " ms)", job->job_id, h->pool, disk, v->info.setup_ms, v->info.map_ms, v->n_extents,
              v->allocated_bytes, v->virtual_size, v->info.frozen_count,
              v->info.freeze_window_ms);
    *ret_v = TAKE_PTR(v);
 cleanup:
    if (p->img && r < 0) {
        rbd_close(p->img);
        p->img = NULL;
    }
    if (r < 0 && created) {
        /* Nothing may be left behind. */
        struct agent_err cerr = {0};
        int c = src ? snap_remove_gone(src, h->pool, disk, job->job_id, &cerr)
                    : image_snap_remove_gone(p->io, h->pool, disk, job->job_id, &cerr);
        if (c < 0)
            err_append(err, "snapshot left for cleanup_job: %s", cerr.msg);
    }
    if (src)
        rbd_close(src);
    return r;
}

static int
cephrbd_session_id(void *hv, char *buf, size_t size)
{
    struct rbd_handle *h = hv;
    char *addrs = NULL;
    int r = rados_getaddrs(h->cluster, &addrs);

    /* The client's address ("127.0.0.1:0/<nonce>"): how librbd names an exclusive-lock owner. */
    if (r == 0 && addrs && strlen(addrs) < size)
        snprintf(buf, size, "%s", addrs);
    else if (r == 0)
        r = -ENAMETOOLONG;
    free(addrs);
    return r;
}

/* A crashed agent may still own the disk's exclusive lock (taken for its snapshot): every other
 * client, the guest's QEMU included, would wait for its watch to time out (~30 s) before getting
 * the lock back. Break it now if its owner is one of the agent's dead sessions. */
static void
break_dead_locks(rados_ioctx_t io, const char *pool, const char *name, char *const *dead)
{
    char *owners[8];
    size_t n = ELEMENTSOF(owners);
    rbd_lock_mode_t mode;
    rbd_image_t img = NULL;
    int r;

    if (!dead || !dead[0] || rbd_open(io, name, &img, NULL) < 0)
        return;

    r = rbd_lock_get_owners(img, &mode, owners, &n);
    if (r >= 0) {
        for (size_t i = 0; i < n; i++) {
            for (size_t k = 0; dead[k]; k++) {
                if (strcmp(owners[i], dead[k]) != 0)
                    continue;
                r = rbd_lock_break(img, mode, owners[i]);
                if (r < 0)
                    log_warning(LOG_RBD, "breaking the lock of dead agent session %s on %s/%s: "
                                "%s", owners[i], pool, name, strerror(-r));
                else
                    log_info(LOG_RBD, "broke the lock a dead agent session (%s) held on %s/%s",
                             owners[i], pool, name);
            }
        }
        rbd_lock_get_owners_cleanup(owners, n);
    }
    rbd_close(img);
}

/* The dead runs' clients still have watches on the images they had open: until Ceph times them
 * out (~30 s), every notification on those images (a snapshot of the instance disk included,
 * while the guest is frozen) waits for them. Blocklisting fences them and drops the watches at
 * once. Only the most recent sessions can still have any; an hour outlives any watch. */
#define FENCE_RECENT 4
#define FENCE_SECONDS 3600

static void
fence_dead_sessions(struct rbd_handle *h, char *const *dead)
{
    for (size_t k = 0; dead && dead[k] && k < FENCE_RECENT; k++) {
        int r = rados_blocklist_add(h->cluster, dead[k], FENCE_SECONDS);
        if (r < 0)
            log_warning(LOG_RBD, "blocklisting dead agent session %s: %s", dead[k], strerror(-r));
        else
            log_debug(LOG_RBD, "blocklisted dead agent session %s", dead[k]);
    }
}

static int
cephrbd_cleanup_job(void *hv, const struct snap_job *job, struct agent_err *err)
{
    struct rbd_handle *h = hv;
    rados_ioctx_t io = NULL;
    char disk[NAME_MAX_LEN + 8];
    int r;

    r = job_check(job, disk, sizeof(disk), err);
    if (r < 0)
        return r;
    r = ioctx_open(h, h->pool, &io, err);
    if (r < 0)
        goto cleanup;
    fence_dead_sessions(h, job->dead_sessions);
    break_dead_locks(io, h->pool, disk, job->dead_sessions);
    r = image_snap_remove_gone(io, h->pool, disk, job->job_id, err);
    if (r == -EBUSY)
        err_append(err, "a direct snapshot's clone still depends on it: flatten or "
                   "direct_undo it");
 cleanup:
    if (io)
        rados_ioctx_destroy(io);
    return r;
}

/* ---- direct snapshot: clone into the image store ------------------------------------------ */

struct progress_relay {
    void (*fn)(void *ctx, uint64_t done, uint64_t total);
    void *ctx;
};

static int
progress_relay(uint64_t done, uint64_t total, void *arg)
{
    struct progress_relay *pr = arg;

    if (pr && pr->fn)
        pr->fn(pr->ctx, done, total);
    return 0;
}

/* Does the open image (at whatever snapshot it is set to) still have a parent? 1, 0, -errno. */
static int
has_parent(rbd_image_t img)
{
    rbd_linked_image_spec_t pi;
    rbd_snap_spec_t ps;
    int r = rbd_get_parent(img, &pi, &ps);

    if (r == -ENOENT)
        return 0;
    if (r < 0)
        return r;
    rbd_linked_image_spec_cleanup(&pi);
    rbd_snap_spec_cleanup(&ps);
    return 1;
}

/* Flatten the open clone pool/name (a no-op when it is already flat) and check that its
 * snapshot CLONE_SNAP, if any, no longer refers to the parent either (deep-flatten): only then
 * can the parent snapshot be removed. */
static int
clone_flatten(rados_ioctx_t io, rbd_image_t cl, const char *pool, const char *name,
              struct progress_relay *pr, struct agent_err *err)
{
    rbd_image_t snap_img = NULL;
    int64_t t0 = now_ms();
    int r;

    r = has_parent(cl);
    if (r < 0)
        return ceph_fail(err, r, "parent of '%s/%s'", pool, name);
    if (r == 1) {
        r = rbd_flatten_with_progress(cl, progress_relay, pr);
        if (r < 0)
            return ceph_fail(err, r, "flatten '%s/%s'", pool, name);
        log_debug(LOG_RBD, "flattened %s/%s in %" PRId64 " ms", pool, name, now_ms() - t0);
    }
    r = test_fault(NULL, "flatten", err);
    if (r < 0)
        return r;

    r = rbd_open_read_only(io, name, &snap_img, CLONE_SNAP);
    if (r == -ENOENT)
        return 0;
    if (r < 0)
        return ceph_fail(err, r, "open '%s/%s@%s'", pool, name, CLONE_SNAP);
    r = has_parent(snap_img);
    rbd_close(snap_img);
    if (r < 0)
        return ceph_fail(err, r, "parent of '%s/%s@%s'", pool, name, CLONE_SNAP);
    if (r == 1)
        return agent_err_set(err, -EBUSY, "rbd: '%s/%s' is flat but its snapshot '%s' still "
                             "refers to the parent (clone without deep-flatten): the parent "
                             "snapshot cannot be removed", pool, name, CLONE_SNAP);
    return 0;
}

/* The clone's creation options: the parent's features (those a clone can have) plus layering
 * and deep-flatten, the parent's object size, clone format 1 (protected parent snapshot: the
 * order of teardown this file relies on, readable by every client). */
static int
clone_options(rbd_image_t src, rbd_image_options_t opts, uint64_t *ret_features)
{
    rbd_image_info_t info;
    uint64_t features = 0;
    int r;

    r = rbd_get_features(src, &features);
    if (r < 0)
        return r;
    r = rbd_stat(src, &info, sizeof(info));
    if (r < 0)
        return r;
    features = (features & CLONE_KEEP_FEATURES) | RBD_FEATURE_LAYERING | RBD_FEATURE_DEEP_FLATTEN;
    r = rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES, features);
    if (r == 0)
        r = rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_ORDER, (uint64_t)info.order);
    if (r == 0)
        r = rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_CLONE_FORMAT, 1);
    *ret_features = features;
    return r;
}

/* Permission refused in the image store's pool: the worker streams instead. */
static int
target_fail(struct agent_err *err, int r, const struct direct_target *t, const char *what)
{
    if (r == -EPERM || r == -EACCES)
        return agent_err_set(err, -EACCES, "rbd: %s '%s/%s': %s (no write access to the image "
                             "pool)", what, t->pool, t->image_id, strerror(-r));
    return ceph_fail(err, r, "%s '%s/%s'", what, t->pool, t->image_id);
}

static int
cephrbd_direct_snapshot(void *hv, const struct snap_job *job, const struct direct_target *t,
                        struct direct_result *res, struct agent_err *err)
{
    struct rbd_handle *h = hv;
    struct direct_result out = {0};
    struct view_info *info = &out.info;
    rados_ioctx_t sio = NULL, dio = NULL;
    rbd_image_t src = NULL, cl = NULL;
    rbd_image_options_t opts = NULL;
    bool snap_made = false, clone_made = false;
    bool csnap_made = false, csnap_prot = false;
    char disk[NAME_MAX_LEN + 8];
    uint64_t features = 0;
    int64_t t0 = now_ms(), t_pit = 0, t_clone = 0, t_flat = 0;
    int r;

    r = job_check(job, disk, sizeof(disk), err);
    if (r < 0)
        return r;
    r = target_check(t, err);
    if (r < 0)
        return r;
    if (!util_isempty(t->fsid) && strcasecmp(t->fsid, h->fsid) != 0)
        return agent_err_set(err, -EXDEV, "rbd: the image store is in cluster %s, the instance "
                             "disk in %s", t->fsid, h->fsid);
    info->path = VIEW_PATH_DIRECT;
    info->freeze_window_ms = -1;
    snprintf(info->disk_format, sizeof(info->disk_format), "raw");
    if (job->root_device_name && strncmp(job->root_device_name, "/dev/", 5) == 0)
        snprintf(info->disk_target, sizeof(info->disk_target), "%s", job->root_device_name + 5);

    r = ioctx_open(h, h->pool, &sio, err);
    if (r < 0)
        goto cleanup;
    r = rados_ioctx_create(h->cluster, t->pool, &dio);
    if (r == -ENOENT) {
        r = agent_err_set(err, -EOPNOTSUPP, "rbd: the image store's pool '%s' does not exist "
                          "in cluster %s", t->pool, h->fsid);
        goto cleanup;
    }
    if (r < 0) {
        target_fail(err, r, t, "open pool of");
        goto cleanup;
    }
    r = image_open(sio, h->pool, disk, &src, err);
    if (r < 0)
        goto cleanup;
    /* A retried job's snapshot without a clone: a stale point in time. With a clone (EBUSY) the
     * caller must direct_undo or flatten the earlier attempt first. */
    r = snap_remove_gone(src, h->pool, disk, job->job_id, err);
    if (r < 0)
        goto cleanup;

    r = take_snapshot(src, h->pool, disk, job, info, &snap_made, err);
    t_pit = now_ms();
    if (r < 0)
        goto cleanup;
    r = rbd_snap_protect(src, job->job_id);
    if (r < 0) {
        ceph_fail(err, r, "protect '%s/%s@%s'", h->pool, disk, job->job_id);
        goto cleanup;
    }
    r = test_fault(job, "protect", err);
    if (r < 0)
        goto cleanup;

    rbd_image_options_create(&opts);
    r = clone_options(src, opts, &features);
    if (r < 0) {
        ceph_fail(err, r, "clone options from '%s/%s'", h->pool, disk);
        goto cleanup;
    }
    r = rbd_clone3(sio, disk, job->job_id, dio, t->image_id, opts);
    if (r < 0) {
        target_fail(err, r, t, "clone into");
        goto cleanup;
    }
    clone_made = true;
    t_clone = now_ms();
    log_debug(LOG_RBD, "job %s: cloned %s/%s@%s to %s/%s (features 0x%" PRIx64 ") in %" PRId64
              " ms", job->job_id, h->pool, disk, job->job_id, t->pool, t->image_id, features,
              t_clone - t_pit);
    r = test_fault(job, "clone", err);
    if (r < 0)
        goto cleanup;
    r = rbd_open(dio, t->image_id, &cl, NULL);
    if (r < 0) {
        target_fail(err, r, t, "open clone");
        goto cleanup;
    }

    if (t->flatten == FLATTEN_SYNC) {
        r = clone_flatten(dio, cl, t->pool, t->image_id, NULL, err);
        if (r < 0)
            goto cleanup;
        /* The clone no longer needs the instance disk's snapshot. */
        r = snap_remove_gone(src, h->pool, disk, job->job_id, err);
        if (r < 0)
            goto cleanup;
        snap_made = false;
        t_flat = now_ms() - t_clone;
    }

    r = rbd_snap_create(cl, CLONE_SNAP);
    if (r < 0) {
        target_fail(err, r, t, "snapshot '" CLONE_SNAP "' of");
        goto cleanup;
    }
    csnap_made = true;
    r = test_fault(job, "clone-snap", err);
    if (r < 0)
        goto cleanup;
    r = rbd_snap_protect(cl, CLONE_SNAP);
    if (r < 0) {
        target_fail(err, r, t, "protect snapshot '" CLONE_SNAP "' of");
        goto cleanup;
    }
    csnap_prot = true;
    r = test_fault(job, "clone-protect", err);
    if (r < 0)
        goto cleanup;
    r = rbd_get_size(cl, &out.size);
    if (r < 0) {
        target_fail(err, r, t, "size of");
        goto cleanup;
    }

    snprintf(out.location, sizeof(out.location), "rbd://%s/%s/%s/%s", h->fsid, t->pool,
             t->image_id, CLONE_SNAP);
    snprintf(out.fsid, sizeof(out.fsid), "%s", h->fsid);
    if (t->flatten != FLATTEN_SYNC)
        snprintf(out.parent_snap, sizeof(out.parent_snap), "%s/%s@%s", h->pool, disk,
                 job->job_id);
    out.flatten_pending = t->flatten == FLATTEN_BACKGROUND;
    info->setup_ms = now_ms() - t0;
    log_debug(LOG_RBD, "job %s: direct snapshot %s (%s, %" PRIu64 " bytes): point in time %"
              PRId64 " ms, clone %" PRId64 " ms, flatten %" PRId64 " ms, total %" PRId64 " ms",
              job->job_id, out.location, flatten_policy_to_string(t->flatten), out.size,
              t_pit - t0, t_clone - t_pit, t_flat, info->setup_ms);
    *res = out;
    r = 0;
 cleanup:
    if (r < 0) {
        /* Roll back in the order Ceph requires: the clone's snapshot, the clone, then the
         * parent snapshot (unprotect fails while the clone exists). */
        struct agent_err rerr = {0};
        int c = 0;
        if (cl && csnap_prot && (c = rbd_snap_unprotect(cl, CLONE_SNAP)) < 0)
            ceph_fail(&rerr, c, "unprotect '%s/%s@%s'", t->pool, t->image_id, CLONE_SNAP);
        if (cl && csnap_made && c == 0 && (c = rbd_snap_remove(cl, CLONE_SNAP)) < 0)
            ceph_fail(&rerr, c, "remove '%s/%s@%s'", t->pool, t->image_id, CLONE_SNAP);
        if (cl) {
            rbd_close(cl);
            cl = NULL;
        }
        if (clone_made && c == 0 && (c = rbd_remove(dio, t->image_id)) < 0 && c != -ENOENT)
            ceph_fail(&rerr, c, "remove '%s/%s'", t->pool, t->image_id);
        if (c == 0 && snap_made)
            snap_remove_gone(src, h->pool, disk, job->job_id, &rerr);
        if (rerr.code != 0)
            err_append(err, "rollback incomplete (direct_undo retries): %s", rerr.msg);
        log_debug(LOG_RBD, "job %s: direct snapshot failed, rolled back%s", job->job_id,
                  rerr.code != 0 ? " with errors" : "");
    }
    if (opts)
        rbd_image_options_destroy(opts);
    if (cl)
        rbd_close(cl);
    if (src)
        rbd_close(src);
    if (dio)
        rados_ioctx_destroy(dio);
    if (sio)
        rados_ioctx_destroy(sio);
    return r;
}

static int
cephrbd_direct_undo(void *hv, const struct snap_job *job, const struct direct_target *t,
                    struct agent_err *err)
{
    struct rbd_handle *h = hv;
    rados_ioctx_t sio = NULL, dio = NULL;
    char disk[NAME_MAX_LEN + 8];
    int r;

    r = job_check(job, disk, sizeof(disk), err);
    if (r < 0)
        return r;
    r = target_check(t, err);
    if (r < 0)
        return r;
    r = ioctx_open(h, h->pool, &sio, err);
    if (r < 0)
        goto cleanup;
    r = rados_ioctx_create(h->cluster, t->pool, &dio);
    if (r == 0) {
        break_dead_locks(sio, h->pool, disk, job->dead_sessions);
        break_dead_locks(dio, t->pool, t->image_id, job->dead_sessions);
        r = clone_remove_gone(dio, t->pool, t->image_id, err);
    } else if (r != -ENOENT) /* no such pool: no clone in it */
        ceph_fail(err, r, "open pool '%s'", t->pool);
    else
        r = 0;
    /* Only once the clone is gone can its parent snapshot go. */
    if (r == 0)
        r = image_snap_remove_gone(sio, h->pool, disk, job->job_id, err);
    log_debug(LOG_RBD, "job %s: direct snapshot %s/%s undone%s", job->job_id, t->pool,
              t->image_id, r < 0 ? " with errors" : "");
 cleanup:
    if (dio)
        rados_ioctx_destroy(dio);
    if (sio)
        rados_ioctx_destroy(sio);
    return r;
}

/* A flatten killed midway (the agent crashed) must not be resumed with the clone's object map as
 * it is: Ceph 16 then skips objects whose copy-up the dead run left unfinished and cuts the
 * parent off under them, and they read back as zeros, in the clone and in the snapshot Glance
 * serves (reproduced with the rbd CLI alone: kill -9 an `rbd flatten` of a deep-flatten clone
 * with a snapshot, run it again). Resumed without the object map, every object is checked on the
 * OSDs and the copy is exact. So for a resumed flatten: object-map and fast-diff off, flatten,
 * then on again with both maps (head and @snap) rebuilt. */
static int
object_map_off(rbd_image_t cl, const char *pool, const char *name, uint64_t *ret_off,
               struct agent_err *err)
{
    uint64_t features = 0, off;
    int r;

    *ret_off = 0;
    r = rbd_get_features(cl, &features);
    if (r < 0)
        return ceph_fail(err, r, "features of '%s/%s'", pool, name);
    off = features & (RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF);
    if (!off || has_parent(cl) != 1)
        return 0;
    r = rbd_update_features(cl, off, 0);
    if (r < 0)
        return ceph_fail(err, r, "disable the object map of '%s/%s'", pool, name);
    *ret_off = off;
    log_info(LOG_RBD, "resuming the interrupted flatten of %s/%s without its object map", pool,
             name);
    return 0;
}

static int
object_map_on(rados_ioctx_t io, rbd_image_t cl, const char *pool, const char *name,
              uint64_t features, struct agent_err *err)
{
    rbd_image_t snap_img = NULL;
    int r;

    if (!features)
        return 0;
    r = rbd_update_features(cl, features, 1);
    if (r < 0)
        return ceph_fail(err, r, "enable the object map of '%s/%s'", pool, name);
    r = rbd_rebuild_object_map(cl, progress_relay, NULL);
    if (r < 0)
        return ceph_fail(err, r, "rebuild the object map of '%s/%s'", pool, name);
    r = rbd_open(io, name, &snap_img, CLONE_SNAP);
    if (r == -ENOENT)
        return 0;
    if (r < 0)
        return ceph_fail(err, r, "open '%s/%s@%s'", pool, name, CLONE_SNAP);
    r = rbd_rebuild_object_map(snap_img, progress_relay, NULL);
    rbd_close(snap_img);
    if (r < 0)
        return ceph_fail(err, r, "rebuild the object map of '%s/%s@%s'", pool, name, CLONE_SNAP);
    return 0;
}

static int
cephrbd_flatten(void *hv, const struct snap_job *job, const struct direct_target *t,
                void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
                struct agent_err *err)
{
    struct rbd_handle *h = hv;
    struct progress_relay pr = {progress, ctx};
    rados_ioctx_t sio = NULL, dio = NULL;
    rbd_image_t cl = NULL;
    char disk[NAME_MAX_LEN + 8];
    int64_t t0 = now_ms();
    int r;

    r = job_check(job, disk, sizeof(disk), err);
    if (r < 0)
        return r;
    r = target_check(t, err);
    if (r < 0)
        return r;
    r = ioctx_open(h, h->pool, &sio, err);
    if (r < 0)
        goto cleanup;
    r = rados_ioctx_create(h->cluster, t->pool, &dio);
    if (r < 0 && r != -ENOENT) {
        ceph_fail(err, r, "open pool '%s'", t->pool);
        goto cleanup;
    }
    if (r == 0) {
        break_dead_locks(dio, t->pool, t->image_id, job->dead_sessions);
        r = rbd_open(dio, t->image_id, &cl, NULL);
    }
    if (r == -ENOENT) {
        /* The image (or its pool) was deleted meanwhile: only the parent snapshot is left. */
        log_debug(LOG_RBD, "job %s: clone %s/%s is gone, nothing to flatten", job->job_id,
                  t->pool, t->image_id);
        r = 0;
    } else if (r < 0) {
        target_fail(err, r, t, "open clone");
        goto cleanup;
    } else {
        uint64_t off = 0;
        if (t->resumed)
            r = object_map_off(cl, t->pool, t->image_id, &off, err);
        if (r >= 0)
            r = clone_flatten(dio, cl, t->pool, t->image_id, &pr, err);
        /* Back on even after a failed flatten (the next attempt turns it off again). */
        struct agent_err merr = {0};
        if (object_map_on(dio, cl, t->pool, t->image_id, off, &merr) < 0) {
            log_warning(LOG_RBD, "%s", merr.msg);
            if (r >= 0)
                r = agent_err_set(err, merr.code, "%s", merr.msg);
        }
        rbd_close(cl);
        cl = NULL;
        if (r < 0)
            goto cleanup;
    }
    r = image_snap_remove_gone(sio, h->pool, disk, job->job_id, err);
    if (r == -EBUSY)
        err_append(err, "another clone of it still exists");
    log_debug(LOG_RBD, "job %s: flatten of %s/%s done in %" PRId64 " ms%s", job->job_id, t->pool,
              t->image_id, now_ms() - t0, r < 0 ? ", parent snapshot not removed" : "");
 cleanup:
    if (cl)
        rbd_close(cl);
    if (dio)
        rados_ioctx_destroy(dio);
    if (sio)
        rados_ioctx_destroy(sio);
    return r;
}

const struct disk_backend_ops rbd_backend_ops = {
    .name = "rbd",
    .open = cephrbd_open,
    .close = cephrbd_close,
    .owns = cephrbd_owns,
    .open_view = cephrbd_open_view,
    .close_view = cephrbd_close_view,
    .free_view = cephrbd_free_view,
    .cleanup_job = cephrbd_cleanup_job,
    .session_id = cephrbd_session_id,
    .direct_snapshot = cephrbd_direct_snapshot,
    .direct_undo = cephrbd_direct_undo,
    .flatten = cephrbd_flatten,
};

size_t
cephrbd_library_versions(char *buf, size_t size)
{
    int ra, rb, rc, ba, bb, bc;
    int n;

    rados_version(&ra, &rb, &rc);
    rbd_version(&ba, &bb, &bc);
    n = snprintf(buf, size, "librados %d.%d.%d\nlibrbd %d.%d.%d\n", ra, rb, rc, ba, bb, bc);
    return n < 0 ? 0 : (size_t)n;
}
