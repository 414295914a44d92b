/* The snapshot job. It follows nova-compute's ComputeManager.snapshot_instance and the libvirt
 * driver's snapshot(), with the agent's own pipeline in the middle:
 *
 *   image_snapshot_pending → image_snapshot        (expected: pending; snapshot.start sent)
 *     backend open_view: the point in time (freeze, if the image asks, only around it)
 *   image_snapshot → image_pending_upload          (the view exists)
 *     Glance: the image nova-api created must be there; PATCH nova's properties and ours
 *   image_pending_upload → image_uploading         (bytes start to flow)
 *     view extents → image encoder (qcow2/raw, holes and zeros never read or sent) → chunked
 *     PUT /file, hashed on the way and checked against what Glance stored
 *   image_uploading → None                         (image active; snapshot.end sent)
 *
 * Every state change is reported as nova's conductor would (instance.update notifications, per
 * notify_on_state_change). Failures follow nova's decorators: the image is deleted
 * (delete_image_on_error), task_state goes back to None (reverts_task_state, except for an
 * unexpected task state), and the legacy "snapshot_instance" error plus versioned
 * compute.exception go out (wrap_exception). Two failures are quiet as in nova: the instance
 * disappearing (its image is deleted unless active, no end notification) and the image being
 * deleted meanwhile (task_state None, a warning). The view is always closed. */

#include "snapshot.h"

#include <errno.h>
#include <signal.h>
#include <unistd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "cleanup.h"
#include "config.h"
#include "envelope.h"
#include "err.h"
#include "glance.h"
#include "imgenc.h"
#include "journal.h"
#include "log.h"
#include "notifier.h"
#include "notify.h"
#include "request.h"
#include "task.h"
#include "util.h"

#define NOTIFY_TIMEOUT_MS 30000

struct job {
    struct snapshot_env *env;
    struct rpc_service *rpc;
    struct backend_conn *bconn; /* NULL until job_connect */
    void *backend_h;            /* bconn->h */
    struct quiesce_ops qops;
    const struct quiesce_ops *quiesce_ops; /* NULL or &qops */
    char path_note[160]; /* why the direct path did not run, for the image */
    struct snap_job sj;  /* the job as the backends see it, filled once quiesce_ops is known */
    struct rpc_request *req;
    struct rpc_notify_options nopts;
    enum task_state task;
    struct rpc_instance_state st; /* what notifications say the instance is now */
    char updated_at[32];
    char job_id[48];
    struct timespec t0;
    /* A job recovered from the journal and run again: transitions up to floor were reported
     * before the crash and are not reported twice. */
    enum task_state floor;
    bool start_sent; /* snapshot.start went out (before a crash, for a recovered job) */
    bool error_sent; /* the error notifications went out (before a crash) */
    bool cleanup_pending; /* a cleanup gave up: the job stays unfinished for the next start */
    int flatten_decile;   /* progress last logged, -1 before the first */
    bool flatten_halfway;
};

/* Test-only (absent from release builds): CA_TEST_CRASH_AT=resource:state kills the agent with
 * SIGKILL right after that step of a job is journaled, as kill -9 would. */
static void
test_crash_point(const char *job_id, const char *resource, const char *state)
{
#ifndef NDEBUG
    const char *at = getenv("CA_TEST_CRASH_AT");
    size_t n = strlen(resource);

    if (at && strncmp(at, resource, n) == 0 && at[n] == ':' && strcmp(at + n + 1, state) == 0) {
        log_warning(LOG_WORKER, "test: job %s killed at %s:%s (CA_TEST_CRASH_AT)", job_id,
                    resource, state);
        kill(getpid(), SIGKILL);
        pause();
    }
#else
    (void)job_id;
    (void)resource;
    (void)state;
#endif
}

/* A step of the job: journaled before the job goes on (struct snap_job's step hook too). */
static void
job_step(void *ctx, const char *resource, const char *state)
{
    struct job *j = ctx;
    struct agent_err err = {0};

    if (j->env->journal && journal_step(j->env->journal, j->job_id, resource, state, &err) < 0)
        log_error(LOG_JOURNAL, "job %s: step %s:%s not journaled: %s", j->job_id, resource,
                  state, err.msg);
    log_debug(LOG_JOURNAL, "job %s: %s:%s", j->job_id, resource, state);
    test_crash_point(j->job_id, resource, state);
}

static int64_t
ms_since(const struct timespec *t0)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)(now.tv_sec - t0->tv_sec) * 1000 + (now.tv_nsec - t0->tv_nsec) / 1000000;
}

static void
stamp_updated_at(struct job *j)
{
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(j->updated_at, sizeof(j->updated_at), "%Y-%m-%dT%H:%M:%SZ", &tm);
    j->st.updated_at = j->updated_at;
}

/* Publish a built batch; a notification that cannot be delivered is logged and the job goes on
 * (nova's notifier does not fail the operation either). */
static void
publish(struct job *j, struct rpc_notification **v, const char *what)
{
    struct agent_err err = {0};
    if (notifier_publish(j->rpc, v, NOTIFY_TIMEOUT_MS, &err) < 0) {
        if (err.code == -ETIMEDOUT)
            log_warning(LOG_WORKER, "instance %s: %s notifications still unconfirmed after %d s "
                        "(broker away?): they stay queued and go out once it is back",
                        j->req->instance->uuid, what, NOTIFY_TIMEOUT_MS / 1000);
        else
            log_warning(LOG_WORKER, "instance %s: %s notifications not confirmed: %s, ignoring",
                        j->req->instance->uuid, what, err.msg);
    }
}

static void
notify_snapshot(struct job *j, enum rpc_notify_phase phase)
{
    _cleanup_(rpc_notification_freevp) struct rpc_notification **v = NULL;
    struct agent_err err = {0};

    if (rpc_notify_snapshot(&j->nopts, j->req, &j->st, phase, &v, &err) < 0) {
        log_warning(LOG_WORKER, "instance %s: cannot build snapshot.%s: %s, ignoring",
                    j->req->instance->uuid, rpc_notify_phase_to_string(phase), err.msg);
        return;
    }
    publish(j, v, phase == RPC_NOTIFY_PHASE_START ? "snapshot.start" : "snapshot.end");
    job_step(j, "notify", phase == RPC_NOTIFY_PHASE_START ? "snapshot.start" : "snapshot.end");
}

/* Move the task state by event e, check it is legal from where we are (nova's
 * expected_task_state), and report the change. */
static int
transition(struct job *j, enum task_event e, struct agent_err *err)
{
    enum task_state next;
    struct rpc_instance_state old = j->st;
    _cleanup_(rpc_notification_freevp) struct rpc_notification **v = NULL;
    struct agent_err nerr = {0};

    if (task_next(j->task, e, &next) < 0)
        return agent_err_set(err, -EINVAL, "Unexpected task state: expecting a state that allows "
                             "%s but the actual state is %s", task_event_to_string(e),
                             task_state_to_string(j->task) ?: "None");
    if (j->floor != TASK_NONE && next != TASK_NONE && next <= j->floor) {
        /* Reported before the crash already. */
        j->task = next;
        j->st.task_state = task_state_to_string(next);
        return 0;
    }
    j->task = next;
    j->st.task_state = task_state_to_string(next);
    stamp_updated_at(j);
    log_info(LOG_WORKER, "instance %s: task_state %s -> %s", j->req->instance->uuid,
             old.task_state ?: "None", j->st.task_state ?: "None");
    if (rpc_notify_instance_update(&j->nopts, j->req, &old, &j->st, &v, &nerr) < 0)
        log_warning(LOG_WORKER, "instance %s: cannot build instance.update: %s, ignoring",
                    j->req->instance->uuid, nerr.msg);
    else
        publish(j, v, "instance.update");
    job_step(j, "task", j->st.task_state ?: "None");
    return 0;
}

static enum quiesce_mode
quiesce_mode_for(const struct instance *inst)
{
    bool b = false;
    const char *req = instance_system_metadata(inst, "image_os_require_quiesce");
    const char *ga = instance_system_metadata(inst, "image_hw_qemu_guest_agent");

    if (req && util_parse_bool(req, &b) == 0 && b)
        return QUIESCE_REQUIRED;
    if (ga && util_parse_bool(ga, &b) == 0 && b)
        return QUIESCE_TRY;
    return QUIESCE_NONE;
}

struct upload_src {
    struct imgenc *enc;
    struct job *j;
    bool streaming;
};

/* Source for the Glance upload: pulls encoded bytes. */
static int
encoder_read(void *opaque, void *buf, size_t len, size_t *ret_n, struct agent_err *err)
{
    struct upload_src *us = opaque;
    int r = imgenc_read(us->enc, buf, len, ret_n, err);

    if (r >= 0 && !us->streaming && imgenc_bytes_out(us->enc) > 0) {
        us->streaming = true;
        job_step(us->j, "glance-upload", "streaming");
    }
#ifndef NDEBUG
    /* Test-only (absent from release builds): hold the upload once, after its first bytes, so
     * integration tests can delete the image or stop Glance mid-upload. */
    static const char *pause_ms;
    static bool paused;
    if (!paused && r >= 0 && imgenc_bytes_out(us->enc) > 0 &&
        (pause_ms = getenv("CA_TEST_UPLOAD_PAUSE_MS"))) {
        long ms = 0;
        paused = util_parse_long(pause_ms, 0, 600000, &ms) == 0;
        struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
        log_info(LOG_WORKER, "test: upload paused for %ld ms", ms);
        nanosleep(&ts, NULL);
    }
#endif
    return r;
}

/* What went wrong, as nova's exception classes name it, for the error notifications. */
static void
fault_for(int code, const char *msg, struct rpc_notify_fault *f)
{
    *f = (struct rpc_notify_fault){
        .exception = "SnapshotFailed",
        .exception_module = "compute_agent",
        .message = msg,
        .code = 500,
        .module_name = "nova.compute.manager",
        .function_name = "snapshot_instance",
    };
    if (code == -EINVAL && strstr(msg, "Unexpected task state")) {
        f->exception = "UnexpectedTaskStateError";
        f->exception_module = "nova.exception";
    } else if (code == -EIO && strstr(msg, "quiesce")) {
        f->exception = "InstanceQuiesceFailed";
        f->exception_module = "nova.exception";
        f->code = 409;
    }
}

static void
notify_error(struct job *j, int code, const char *msg)
{
    _cleanup_(rpc_notification_freevp) struct rpc_notification **v = NULL;
    struct rpc_notify_fault f;
    struct agent_err err = {0};

    if (j->error_sent)
        return;
    fault_for(code, msg, &f);
    if (rpc_notify_error(&j->nopts, j->req, &j->st, &f, &v, &err) < 0) {
        log_warning(LOG_WORKER, "instance %s: cannot build the error notifications: %s, ignoring",
                    j->req->instance->uuid, err.msg);
        return;
    }
    publish(j, v, "error");
    j->error_sent = true;
    job_step(j, "notify", "error");
}

static const char *
consistency_of(const struct view_info *vi)
{
    return vi->frozen ? "filesystem" : "crash";
}

/* How long a failed cleanup (image deletion, rbd rollback, view leftovers) is retried while the
 * job runs: long enough for a restarted Glance or OSD to come back. After that the job stays
 * unfinished in the journal and the next start retries. */
#define CLEANUP_RETRY_S 300
#define CLEANUP_PAUSE_MS 5000

typedef int (*cleanup_fn)(struct job *j, void *arg, struct agent_err *err);

static bool job_backend_renew(struct job *j, const struct agent_err *e);

static bool
retry_cleanup(struct job *j, const char *what, cleanup_fn fn, void *arg)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int attempt = 1;; attempt++) {
        struct agent_err err = {0};
        if (fn(j, arg, &err) >= 0) {
            if (attempt > 1)
                log_info(LOG_WORKER, "instance %s: %s done (attempt %d)",
                         j->req->instance->uuid, what, attempt);
            return true;
        }
        if (ms_since(&t0) >= CLEANUP_RETRY_S * 1000LL) {
            log_error(LOG_WORKER, "instance %s: %s: %s; gave up after %d s, the job stays in the "
                      "journal and the next start retries", j->req->instance->uuid, what,
                      err.msg, CLEANUP_RETRY_S);
            j->cleanup_pending = true;
            job_step(j, "cleanup", "pending");
            return false;
        }
        if (attempt == 1)
            log_warning(LOG_WORKER, "instance %s: %s: %s; retrying every %d s for up to %d s",
                        j->req->instance->uuid, what, err.msg, CLEANUP_PAUSE_MS / 1000,
                        CLEANUP_RETRY_S);
        job_backend_renew(j, &err); /* the next attempt then runs on a new connection */
        struct timespec ts = {.tv_sec = CLEANUP_PAUSE_MS / 1000};
        nanosleep(&ts, NULL);
    }
}

static int
cleanup_job_fn(struct job *j, void *arg, struct agent_err *err)
{
    const struct snap_job *sj = arg;
    return j->env->backend->cleanup_job(j->backend_h, sj, err);
}

/* After a failed open_view or close_view: let the backend finish the job's leftovers (a thaw it
 * could not confirm, a job it could not end). */
static void
cleanup_leftovers(struct job *j, const struct snap_job *sj)
{
    if (j->env->backend->cleanup_job)
        retry_cleanup(j, "cleaning up the snapshot's leftovers", cleanup_job_fn, (void *)sj);
}

/* Remove a direct snapshot's clone and temporary snapshot (idempotent), then forget the target. */
static int
direct_undo_fn(struct job *j, void *arg, struct agent_err *err)
{
    const struct direct_target *t = arg;
    int r = j->env->backend->direct_undo(j->backend_h, &j->sj, t, err);

    if (r >= 0 && j->env->journal)
        journal_set_flatten(j->env->journal, j->job_id, NULL, NULL, NULL);
    return r;
}

/* Steps 2–4: view, metadata, stream. On success the image is active and verified. */
static int
take_and_upload(struct job *j, struct glance_client *gc, bool *ret_instance_gone,
                bool *ret_image_gone, struct agent_err *err)
{
    const struct snapshot_env *env = j->env;
    const struct agent_config *cfg = env->cfg;
    void *bh = j->backend_h;
    const struct instance *inst = j->req->instance;
    struct disk_view *view = NULL;
    struct glance_image img = {0};
    _cleanup_(imgenc_freep) struct imgenc *enc = NULL;
    struct glance_upload_result res = {0};
    struct agent_err cerr = {0};
    char freeze_ms[32], alloc[32];
    int r;

    const struct snap_job *sjp = &j->sj;

    /* The image nova-api created must exist before we take anything. */
    r = glance_image_get(gc, j->req->image_id, &img, err);
    if (r == -ENOENT) {
        *ret_image_gone = true;
        return r;
    }
    if (r < 0)
        return r;
    glance_image_release(&img);

    struct timespec tv;
    clock_gettime(CLOCK_MONOTONIC, &tv);
    job_step(j, "view", "intent");
    r = env->backend->open_view(bh, sjp, &view, err);
    if (r < 0) {
        *ret_instance_gone = r == -ENOENT;
        /* open_view leaves nothing behind, except a thaw it could not confirm: finish it. */
        cleanup_leftovers(j, sjp);
        return r;
    }
    log_info(LOG_WORKER, "instance %s: point in time taken via %s in %lld ms (%s%s%s, freeze "
             "window %lld ms, %llu of %llu bytes allocated)", inst->uuid,
             view_path_to_string(view->info.path), (long long)ms_since(&tv),
             quiesce_mode_to_string(sjp->quiesce), view->info.path_reason ? ", " : "",
             view->info.path_reason ?: "", (long long)view->info.freeze_window_ms,
             (unsigned long long)view->allocated_bytes, (unsigned long long)view->virtual_size);
    job_step(j, "view", "done");
    if (view->info.quiesce_error[0])
        log_warning(LOG_WORKER, "instance %s: filesystems not frozen: %s; the snapshot is "
                    "crash-consistent", inst->uuid, view->info.quiesce_error);

    r = transition(j, TASK_EV_VIEW_READY, err);
    if (r < 0)
        goto out;

    /* The image format: snapshot_image_format, else the disk's own (nova's rule). */
    enum imgenc_format fmt = IMGENC_FORMAT_QCOW2;
    if (cfg->snapshot_image_format == SNAPSHOT_FORMAT_RAW ||
        (cfg->snapshot_image_format == SNAPSHOT_FORMAT_SOURCE &&
         strcmp(view->info.disk_format, "raw") == 0))
        fmt = IMGENC_FORMAT_RAW;
    struct imgenc_options eo = {
        .virtual_size = view->virtual_size,
        .extents = view->extents,
        .n_extents = view->n_extents,
        .format = fmt,
        .compress = fmt == IMGENC_FORMAT_QCOW2 && cfg->snapshot_compression,
        .pread = view->pread,
        .opaque = view->opaque,
    };
    r = imgenc_new(&eo, &enc, err);
    if (r < 0)
        goto out;

    snprintf(freeze_ms, sizeof(freeze_ms), "%lld", (long long)view->info.freeze_window_ms);
    snprintf(alloc, sizeof(alloc), "%llu", (unsigned long long)view->allocated_bytes);
    /* nova's metadata for a snapshot image (the PATCH in its request flow), then what the agent
     * records about how the point in time was taken. */
    const struct glance_prop props[] = {
        {"image_location", "snapshot"},
        {"image_state", "available"},
        {"owner_id", inst->project_id ? inst->project_id : j->req->ctx.project_id},
        {"disk_format", imgenc_format_to_string(fmt)},
        {"container_format", "bare"},
        {"compute_agent_snapshot_path", view_path_to_string(view->info.path)},
        {"compute_agent_consistency", consistency_of(&view->info)},
        {"compute_agent_freeze_window_ms", freeze_ms},
        {"compute_agent_allocated_bytes", alloc},
        /* Why a storage-native (direct) snapshot did not run, when one was considered. */
        {"compute_agent_snapshot_path_reason", j->path_note[0] ? j->path_note : NULL},
    };
    r = glance_image_update(gc, j->req->image_id, props, ELEMENTSOF(props), err);
    if (r >= 0)
        job_step(j, "glance-metadata", "done");
    if (r == -ENOENT)
        *ret_image_gone = true;
    if (r < 0)
        goto out;

    r = transition(j, TASK_EV_UPLOAD_BEGIN, err);
    if (r < 0)
        goto out;
    r = imgenc_prepare(enc, err);
    if (r < 0)
        goto out;
    struct upload_src us = {.enc = enc, .j = j};
    struct glance_upload_source src = {
        .read = encoder_read,
        .opaque = &us,
        .size = -1, /* chunked, as nova sends it */
    };
    clock_gettime(CLOCK_MONOTONIC, &tv);
    job_step(j, "glance-upload", "intent");
    r = glance_image_upload(gc, j->req->image_id, &src, &res, err);
    if (r >= 0)
        job_step(j, "glance-upload", "done");
    if (r == -ENOENT)
        *ret_image_gone = true;
    if (r < 0)
        goto out;
    struct imgenc_stats es;
    imgenc_get_stats(enc, &es);
    log_info(LOG_WORKER, "instance %s: image %s uploaded: %s, %llu bytes sent (%llu read of %llu "
             "virtual) in %lld ms, %s %.16s…, verified by Glance", inst->uuid, j->req->image_id,
             imgenc_format_to_string(fmt), (unsigned long long)res.bytes,
             (unsigned long long)es.data_bytes_read, (unsigned long long)view->virtual_size,
             (long long)ms_since(&tv), res.os_hash_algo, res.os_hash_value);

out:
    if (env->backend->close_view(bh, view, &cerr) < 0) {
        log_error(LOG_WORKER, "instance %s: cleaning up the snapshot view: %s; retrying from "
                  "the job", inst->uuid, cerr.msg);
        cleanup_leftovers(j, sjp);
    } else {
        job_step(j, "view", "removed");
    }
    if (view->info.downtime_ms > 0) {
        log_info(LOG_WORKER, "instance %s: guest downtime %lld ms (%s)", inst->uuid,
                 (long long)view->info.downtime_ms, view_path_to_string(view->info.path));
    }
    env->backend->free_view(bh, view);
    return r;
}

/* rbd://<fsid>/<pool>/<image>/<snap> → fsid and pool; false for anything else. */
static bool
parse_rbd_url(const char *url, char *fsid, size_t fsz, char *pool, size_t psz)
{
    const char *p, *slash;

    if (!url || strncmp(url, "rbd://", 6) != 0)
        return false;
    p = url + 6;
    slash = strchr(p, '/');
    if (!slash || slash == p || (size_t)(slash - p) >= fsz)
        return false;
    snprintf(fsid, fsz, "%.*s", (int)(slash - p), p);
    p = slash + 1;
    slash = strchr(p, '/');
    if (!slash || slash == p || (size_t)(slash - p) >= psz || !strchr(slash + 1, '/'))
        return false;
    snprintf(pool, psz, "%.*s", (int)(slash - p), p);
    return true;
}

static void
flatten_progress(void *ctx, uint64_t done, uint64_t total)
{
    struct job *j = ctx;
    int decile = total ? (int)(done * 10 / total) : 10;

    if (decile != j->flatten_decile) {
        j->flatten_decile = decile;
        log_info(LOG_WORKER, "instance %s: flattening image %s: %d%%", j->req->instance->uuid,
                 j->req->image_id, decile * 10);
        /* A point in the middle of the copy, for the journal's history and crash tests. */
        if (decile >= 5 && !j->flatten_halfway) {
            j->flatten_halfway = true;
            job_step(j, "flatten", "halfway");
        }
    }
}

/* The direct path (rbd): snapshot + clone into Glance's pool and register the clone as the
 * image's location; nothing is streamed. Sets *ret_tried false when it cannot apply here (Glance
 * elsewhere, no permission, no target pool known): the caller streams instead. On success,
 * *ret_flatten says a background flatten is still due. */
static int
try_direct(struct job *j, struct glance_client *gc, bool *ret_tried, bool *ret_instance_gone,
           bool *ret_image_gone, struct direct_target *t, struct snap_job *sj, bool *ret_flatten,
           struct agent_err *err)
{
    const struct snapshot_env *env = j->env;
    const struct agent_config *cfg = env->cfg;
    const struct instance *inst = j->req->instance;
    static __thread char fsid[64], pool[128];
    struct glance_image base = {0}, img = {0};
    struct direct_result res = {0};
    struct agent_err gerr = {0};
    const char *base_id = instance_system_metadata(inst, "image_base_image_ref");
    int r;

    *ret_tried = false;
    if (!base_id || !*base_id)
        base_id = inst->image_ref;
    fsid[0] = pool[0] = '\0';
    /* Glance's pool, as nova finds it: from the base image's rbd location. */
    if (base_id && *base_id && glance_image_get(gc, base_id, &base, &gerr) == 0) {
        for (size_t i = 0; i < glance_image_location_count(&base) && !pool[0]; i++)
            if (!parse_rbd_url(glance_image_location_url(&base, i), fsid, sizeof(fsid), pool,
                               sizeof(pool)))
                fsid[0] = pool[0] = '\0';
        glance_image_release(&base);
    }
    if (!pool[0] && !util_isempty(cfg->images_rbd_glance_pool))
        snprintf(pool, sizeof(pool), "%s", cfg->images_rbd_glance_pool);
    if (!pool[0]) {
        snprintf(j->path_note, sizeof(j->path_note), "no rbd location on base image %s and "
                 "images_rbd_glance_pool unset", base_id ? base_id : "(none)");
        return 0;
    }
    *t = (struct direct_target){
        .image_id = j->req->image_id,
        .pool = pool,
        .fsid = fsid[0] ? fsid : NULL,
        .flatten = (enum flatten_policy)cfg->images_rbd_flatten,
    };

    r = glance_image_get(gc, j->req->image_id, &img, err);
    glance_image_release(&img);
    if (r < 0) {
        *ret_tried = true;
        *ret_image_gone = r == -ENOENT;
        return r;
    }

    struct timespec tv;
    struct agent_err jerr = {0};
    /* Where the clone will be, before it exists: a restart can then undo or finish it. */
    if (env->journal && journal_set_flatten(env->journal, j->job_id, pool, fsid[0] ? fsid : NULL,
                                            &jerr) < 0)
        log_error(LOG_JOURNAL, "job %s: direct target not journaled: %s", j->job_id, jerr.msg);
    clock_gettime(CLOCK_MONOTONIC, &tv);
    r = env->backend->direct_snapshot(j->backend_h, sj, t, &res, err);
    if (r == -EXDEV || r == -EOPNOTSUPP || r == -EACCES || r == -EPERM) {
        snprintf(j->path_note, sizeof(j->path_note), "%s", err->msg);
        agent_err_clear(err);
        if (env->journal)
            journal_set_flatten(env->journal, j->job_id, NULL, NULL, NULL);
        return 0;
    }
    if (r < 0) {
        /* The backend rolled back; make sure (a dead OSD may have stopped its rollback). */
        struct agent_err uerr = {0};
        if (direct_undo_fn(j, t, &uerr) < 0)
            retry_cleanup(j, "removing what the failed direct snapshot made", direct_undo_fn, t);
    }
    *ret_tried = true;
    if (r < 0) {
        *ret_instance_gone = r == -ENOENT;
        return r;
    }
    log_info(LOG_WORKER, "instance %s: point in time taken via %s in %lld ms (clone %s/%s, "
             "flatten %s, freeze window %lld ms)", inst->uuid, view_path_to_string(res.info.path),
             (long long)ms_since(&tv), pool, j->req->image_id, flatten_policy_to_string(t->flatten),
             (long long)res.info.freeze_window_ms);
    if (res.info.quiesce_error[0])
        log_warning(LOG_WORKER, "instance %s: filesystems not frozen: %s; the snapshot is "
                    "crash-consistent", inst->uuid, res.info.quiesce_error);

    r = transition(j, TASK_EV_VIEW_READY, err);
    if (r >= 0)
        r = transition(j, TASK_EV_UPLOAD_BEGIN, err);
    char freeze_ms[32];
    snprintf(freeze_ms, sizeof(freeze_ms), "%lld", (long long)res.info.freeze_window_ms);
    const struct glance_prop props[] = {
        {"image_location", "snapshot"},
        {"image_state", "available"},
        {"owner_id", inst->project_id ? inst->project_id : j->req->ctx.project_id},
        {"disk_format", "raw"},
        {"container_format", "bare"},
        {"compute_agent_snapshot_path", view_path_to_string(res.info.path)},
        {"compute_agent_consistency", consistency_of(&res.info)},
        {"compute_agent_freeze_window_ms", freeze_ms},
        {"compute_agent_rbd_flatten", flatten_policy_to_string(t->flatten)},
    };
    if (r >= 0)
        r = glance_image_update(gc, j->req->image_id, props, ELEMENTSOF(props), err);
    /* Glance reads the size from RBD and the image goes active with its location. */
    if (r >= 0) {
        job_step(j, "glance-location", "intent");
        r = glance_image_add_location(gc, j->req->image_id, res.location, "{}", err);
    }
    if (r >= 0)
        job_step(j, "glance-location", "done");
    if (r >= 0) {
        r = glance_image_get(gc, j->req->image_id, &img, err);
        if (r >= 0 && img.status != GLANCE_IMAGE_ACTIVE)
            r = agent_err_set(err, -EIO, "glance: image %s is %s after adding its location",
                              j->req->image_id, img.status_text ? img.status_text : "?");
        glance_image_release(&img);
    }
    if (r < 0) {
        *ret_image_gone = r == -ENOENT;
        retry_cleanup(j, "removing the clone of the image", direct_undo_fn, t);
        return r;
    }
    log_info(LOG_WORKER, "instance %s: image %s registered at %s (%llu bytes, nothing streamed)",
             inst->uuid, j->req->image_id, res.location, (unsigned long long)res.size);
    *ret_flatten = res.flatten_pending;
    if (!res.flatten_pending && env->journal) /* sync or never: nothing left to do */
        journal_set_flatten(env->journal, j->job_id, NULL, NULL, NULL);
    return 0;
}

static int
delete_image_fn(struct job *j, void *arg, struct agent_err *err)
{
    int r = glance_image_delete(arg, j->req->image_id, err);
    return r == -ENOENT ? 0 : r;
}

/* nova's delete_image_on_error: the half-made image must not stay behind (retried while Glance
 * is away). */
static void
delete_image(struct job *j, struct glance_client *gc)
{
    if (retry_cleanup(j, "deleting the failed snapshot's image", delete_image_fn, gc))
        job_step(j, "glance-image", "deleted");
}

/* A backend handle and the jobs holding it. Ceph can shut a client's connection for good (the
 * cluster blocklisted it: every call then fails with ESHUTDOWN), so a handle whose calls say so
 * is retired: jobs from then on get a fresh one, and the old one is closed by its last user. */
struct backend_conn {
    void *h;
    unsigned users;
    bool retired;
};

/* The current backend handle, opened on first use, held until backend_put(). */
static int
backend_get(struct snapshot_env *env, struct backend_conn **ret, struct agent_err *err)
{
    int r = 0;

    *ret = NULL;
    if (!env->backend)
        return agent_err_set(err, -EOPNOTSUPP, "[libvirt] images_type = %s is not supported by "
                             "this agent yet", images_type_to_string(env->cfg->images_type));
    pthread_mutex_lock(&env->lock);
    if (!env->backend_cur) {
        struct disk_backend_config bc = {
            .connection_uri = env->cfg->connection_uri,
            .ceph_conf = env->cfg->images_rbd_ceph_conf,
            .rbd_user = env->cfg->rbd_user,
            .rbd_pool = env->cfg->images_rbd_pool,
        };
        struct backend_conn *c = calloc(1, sizeof(*c));
        r = c ? env->backend->open(&bc, &c->h, err) : agent_err_set(err, -ENOMEM, "out of memory");
        if (r >= 0)
            env->backend_cur = c;
        else
            free(c);
        char sid[128];
        struct agent_err jerr = {0};
        if (r >= 0 && env->journal && env->backend->session_id &&
            env->backend->session_id(c->h, sid, sizeof(sid)) == 0) {
            if (journal_session_add(env->journal, env->backend->name, sid, &jerr) < 0)
                log_error(LOG_JOURNAL, "backend session %s not journaled: %s", sid, jerr.msg);
            else
                log_debug(LOG_JOURNAL, "%s session %s", env->backend->name, sid);
        }
    }
    if (r >= 0 && env->quiesce_backend && !env->quiesce_h) {
        struct disk_backend_config lc = {.connection_uri = env->cfg->connection_uri};
        struct agent_err lerr = {0};
        /* Without libvirt the snapshot can still be taken, only not quiesced. */
        if (env->quiesce_backend->open(&lc, &env->quiesce_h, &lerr) < 0)
            log_warning(LOG_WORKER, "libvirt for guest quiesce: %s, ignoring", lerr.msg);
    }
    if (r >= 0) {
        env->backend_cur->users++;
        *ret = env->backend_cur;
    }
    pthread_mutex_unlock(&env->lock);
    return r;
}

static void
backend_put(struct snapshot_env *env, struct backend_conn *c)
{
    bool close_it;

    if (!c)
        return;
    pthread_mutex_lock(&env->lock);
    close_it = --c->users == 0 && c->retired;
    pthread_mutex_unlock(&env->lock);
    if (close_it) {
        env->backend->close(c->h);
        free(c);
    }
}

/* After a failed backend call: if it said the connection is shut down, retire the job's handle
 * and give the job a fresh one (for its cleanup). Returns true if the handle was replaced. */
static bool
job_backend_renew(struct job *j, const struct agent_err *e)
{
    struct snapshot_env *env = j->env;
    struct backend_conn *c = j->bconn, *fresh = NULL;
    struct agent_err err = {0};

    if (!c || e->code != -ESHUTDOWN)
        return false;
    pthread_mutex_lock(&env->lock);
    if (!c->retired) {
        c->retired = true;
        if (env->backend_cur == c)
            env->backend_cur = NULL;
        log_warning(LOG_WORKER, "%s backend: the connection was shut down (%s): later calls use "
                    "a new one", env->backend->name, e->msg);
    }
    pthread_mutex_unlock(&env->lock);
    if (backend_get(env, &fresh, &err) < 0) {
        log_error(LOG_WORKER, "instance %s: reconnecting the %s backend: %s",
                  j->req->instance->uuid, env->backend->name, err.msg);
        return false; /* the job keeps the old handle; its calls keep failing and say why */
    }
    backend_put(env, c);
    j->bconn = fresh;
    j->backend_h = fresh->h;
    return true;
}

void
snapshot_env_release(struct snapshot_env *env)
{
    /* Jobs are over: no handle has users left. */
    if (env->backend && env->backend_cur) {
        env->backend->close(env->backend_cur->h);
        free(env->backend_cur);
    }
    if (env->quiesce_backend && env->quiesce_h)
        env->quiesce_backend->close(env->quiesce_h);
    env->backend_cur = NULL;
    env->quiesce_h = NULL;
    for (size_t i = 0; env->dead_sessions && env->dead_sessions[i]; i++)
        free(env->dead_sessions[i]);
    free(env->dead_sessions);
    env->dead_sessions = NULL;
}

/* A job's id, from its image: names its journal row, scratch files, sockets and rbd snapshot, so
 * every place that needs it must build it here. */
static void
job_id_for(const struct rpc_request *req, char *buf, size_t size)
{
    snprintf(buf, size, "snap-%.36s", req->image_id);
}

/* The job's fixed parts, from its request. */
static void
job_init(struct job *j, struct snapshot_env *env, struct rpc_request *req)
{
    const struct instance *inst = req->instance;
    int ts;

    *j = (struct job){.env = env, .req = req};
    clock_gettime(CLOCK_MONOTONIC, &j->t0);
    /* main() sets env->rpc under the lock right after starting the rpc thread, which may hand
     * us a request before that assignment is visible. */
    pthread_mutex_lock(&env->lock);
    j->rpc = env->rpc;
    pthread_mutex_unlock(&env->lock);
    notifier_options(env->cfg, &j->nopts);
    rpc_instance_state_from_request(req, &j->st, NULL);
    ts = task_state_from_string(inst->task_state);
    j->task = ts < 0 ? TASK_STATE_MAX : (enum task_state)ts;
    job_id_for(req, j->job_id, sizeof(j->job_id));
    j->sj = (struct snap_job){
        .job_id = j->job_id,
        .instance_uuid = inst->uuid,
        .root_device_name = inst->root_device_name,
        .quiesce = quiesce_mode_for(inst),
        .live_snapshot_disabled = env->cfg->disable_libvirt_livesnapshot,
        .scratch_dir = env->cfg->snapshots_directory,
        .agent_timeout_s = 10,
        .step = job_step,
        .step_ctx = j,
        .dead_sessions = env->dead_sessions,
    };
}

/* Glance client and backend handle (and the guest quiesce for rbd). */
static int
job_connect(struct job *j, struct glance_client **gc, struct agent_err *err)
{
    struct snapshot_env *env = j->env;
    int r;

    r = glance_client_new(env->cfg->glance_api_servers, env->cfg->glance_num_retries,
                          j->req->ctx.auth_token,
                          j->req->ctx.global_request_id ?: j->req->ctx.request_id, gc, err);
    if (r >= 0)
        r = backend_get(env, &j->bconn, err);
    if (r >= 0)
        j->backend_h = j->bconn->h;
    if (r >= 0 && env->quiesce_h) {
        j->qops = (struct quiesce_ops){qcow2_guest_freeze, qcow2_guest_thaw, env->quiesce_h};
        j->quiesce_ops = &j->qops;
        j->sj.quiesce_ops = j->quiesce_ops;
    }
    return r;
}

static void
job_finish(struct job *j, enum journal_job_state st, const char *reason)
{
    struct agent_err err = {0};

    if (st == JOURNAL_FAILED && j->cleanup_pending) {
        log_warning(LOG_WORKER, "instance %s: job %s failed with cleanup left to do: it stays "
                    "in the journal for the next start", j->req->instance->uuid, j->job_id);
        return;
    }
    if (j->env->journal && journal_job_finish(j->env->journal, j->job_id, st, reason, &err) < 0)
        log_error(LOG_JOURNAL, "job %s: end not journaled: %s", j->job_id, err.msg);
}

/* The direct target journaled for the job, or false if none. */
static bool
journaled_target(const struct journal_job *jj, struct job *j, struct direct_target *t)
{
    if (!jj || !jj->flatten_pool)
        return false;
    *t = (struct direct_target){
        .image_id = j->req->image_id,
        .pool = jj->flatten_pool,
        .fsid = jj->flatten_fsid,
        .flatten = (enum flatten_policy)j->env->cfg->images_rbd_flatten,
        /* A flatten started before the crash may have been cut off midway. */
        .resumed = journal_has_step(j->env->journal, j->job_id, "flatten", "intent") == 1,
    };
    return true;
}

static void
run_flatten(struct job *j, struct direct_target *dt)
{
    struct snapshot_env *env = j->env;
    struct timespec tf;
    struct agent_err ferr = {0};

    /* The image is active already; make the clone independent of the instance disk and drop
     * the temporary snapshot. A failure leaves a working image (still a clone): logged, and
     * retried by the next start (the journal keeps it due). */
    clock_gettime(CLOCK_MONOTONIC, &tf);
    j->flatten_decile = -1;
    job_step(j, "flatten", "intent");
    if (env->backend->flatten(j->backend_h, &j->sj, dt, flatten_progress, j, &ferr) < 0) {
        log_error(LOG_WORKER, "instance %s: background flatten of image %s: %s; the next start "
                  "retries it", j->req->instance->uuid, j->req->image_id, ferr.msg);
        job_backend_renew(j, &ferr);
        return;
    }
    job_step(j, "flatten", "done");
    if (env->journal)
        journal_set_flatten(env->journal, j->job_id, NULL, NULL, NULL);
    log_info(LOG_WORKER, "instance %s: image %s flattened in %lld ms, temporary snapshot removed",
             j->req->instance->uuid, j->req->image_id, (long long)ms_since(&tf));
}

/* From the first transition to the end; the job is journaled as finished either way. */
static void
pipeline(struct job *j, struct glance_client *gc)
{
    struct snapshot_env *env = j->env;
    struct rpc_request *req = j->req;
    const struct instance *inst = req->instance;
    struct agent_err err = {0};
    bool instance_gone = false, image_gone = false;
    int r;

    r = transition(j, TASK_EV_BEGIN, &err);
    if (r < 0) {
        /* Unexpected task state: nova's instance.save(expected_task_state=...) raised; the
         * image is deleted and the error notifications go out, task_state is left alone. */
        log_error(LOG_WORKER, "instance %s: snapshot to image %s refused: %s", inst->uuid,
                  req->image_id, err.msg);
        delete_image(j, gc);
        notify_error(j, r, err.msg);
        job_finish(j, JOURNAL_FAILED, err.msg);
        return;
    }
    if (inst->power_state != 1)
        log_warning(LOG_WORKER, "instance %s: trying to snapshot a non-running instance "
                    "(power_state %d)", inst->uuid, inst->power_state);
    if (!j->start_sent)
        notify_snapshot(j, RPC_NOTIFY_PHASE_START);

    bool tried_direct = false, flatten_due = false;
    struct direct_target dt = {0};
    if (env->backend->direct_snapshot) {
        struct backend_conn *before = j->bconn;
        r = try_direct(j, gc, &tried_direct, &instance_gone, &image_gone, &dt, &j->sj,
                       &flatten_due, &err);
        if (r < 0 && err.code == -ESHUTDOWN && j->bconn != before && !j->cleanup_pending &&
            !instance_gone && !image_gone) {
            /* Ceph shut the connection (the rollback then ran on a new one): nothing of the
             * attempt is left and no task state moved past image_snapshot, so try once more. */
            log_warning(LOG_WORKER, "instance %s: direct snapshot failed (%s); trying again on "
                        "the new connection", inst->uuid, err.msg);
            agent_err_clear(&err);
            r = try_direct(j, gc, &tried_direct, &instance_gone, &image_gone, &dt, &j->sj,
                           &flatten_due, &err);
        }
        if (!tried_direct)
            log_info(LOG_WORKER, "instance %s: direct snapshot not possible (%s): streaming the "
                     "image instead", inst->uuid, j->path_note);
    }
    if (!tried_direct)
        r = take_and_upload(j, gc, &instance_gone, &image_gone, &err);
    if (r < 0)
        job_backend_renew(j, &err);
    if (r < 0 && !instance_gone && !image_gone) {
        /* A read failing mid-stream may mean the domain went away under us. */
        int o = env->backend->owns(j->backend_h, &j->sj, NULL);
        instance_gone = o == 0 || o == -ENOENT;
    }
    if (r >= 0) {
        r = transition(j, TASK_EV_DONE, &err);
        notify_snapshot(j, RPC_NOTIFY_PHASE_END);
        log_info(LOG_WORKER, "instance %s: snapshot to image %s done in %lld ms", inst->uuid,
                 req->image_id, (long long)ms_since(&j->t0));
        job_finish(j, JOURNAL_DONE, NULL);
        if (flatten_due)
            run_flatten(j, &dt);
        return;
    }

    if (instance_gone) {
        /* nova: "Instance disappeared during snapshot": delete the image unless it is active. */
        struct glance_image img = {0};
        struct agent_err gerr = {0};
        log_info(LOG_WORKER, "instance %s: disappeared during snapshot (%s)", inst->uuid, err.msg);
        if (glance_image_get(gc, req->image_id, &img, &gerr) == 0 &&
            img.status != GLANCE_IMAGE_ACTIVE)
            glance_image_delete(gc, req->image_id, &gerr);
        glance_image_release(&img);
        job_finish(j, JOURNAL_FAILED, "instance disappeared");
        return;
    }
    if (image_gone) {
        /* nova: ImageNotFound → task_state None, a warning, no error notification. */
        log_warning(LOG_WORKER, "instance %s: image %s not found during snapshot: %s",
                    inst->uuid, req->image_id, err.msg);
        transition(j, TASK_EV_FAIL, NULL);
        job_finish(j, JOURNAL_FAILED, "image deleted");
        return;
    }

    log_error(LOG_WORKER, "instance %s: snapshot to image %s failed: %s", inst->uuid,
              req->image_id, err.msg[0] ? err.msg : strerror(-r));
    delete_image(j, gc);
    transition(j, TASK_EV_FAIL, NULL);
    notify_error(j, r, err.msg[0] ? err.msg : strerror(-r));
    job_finish(j, JOURNAL_FAILED, err.msg[0] ? err.msg : strerror(-r));
}

/* Fail a job nova's way (image deleted unless active, task_state None, error notifications). */
static void
fail_job(struct job *j, struct glance_client *gc, int code, const char *msg)
{
    log_error(LOG_WORKER, "instance %s: snapshot to image %s failed: %s",
              j->req->instance->uuid, j->req->image_id, msg);
    delete_image(j, gc);
    if (j->task != TASK_NONE)
        transition(j, TASK_EV_FAIL, NULL);
    notify_error(j, code, msg);
    job_finish(j, JOURNAL_FAILED, msg);
}

/* The Glance image's status, waiting out "saving": Glance puts an image whose upload broke off
 * back to queued once it notices the client is gone. */
static int
recovered_image_status(struct job *j, struct glance_client *gc, enum glance_image_status *ret,
                       struct agent_err *err)
{
    for (int i = 0;; i++) {
        struct glance_image img = {0};
        int r = glance_image_get(gc, j->req->image_id, &img, err);
        if (r < 0)
            return r;
        *ret = img.status;
        glance_image_release(&img);
        if (*ret != GLANCE_IMAGE_SAVING || i >= 40)
            return 0;
        struct timespec ts = {.tv_nsec = 500000000L};
        nanosleep(&ts, NULL);
    }
}

#define RECOVERY_MAX_ATTEMPTS 3

/* The rest of a job an earlier run of the agent did not finish (its leftovers were cleaned by
 * snapshot_reconcile already). */
static void
recover(struct job *j, struct glance_client *gc, const struct journal_job *jj)
{
    const struct instance *inst = j->req->instance;
    struct direct_target dt;
    enum glance_image_status status;
    struct agent_err err = {0};
    int r, ts;

    if (jj->state == JOURNAL_DONE) {
        /* Finished, only its background flatten is due. */
        if (journaled_target(jj, j, &dt))
            run_flatten(j, &dt);
        return;
    }
    if (jj->state == JOURNAL_QUEUED) {
        log_info(LOG_WORKER, "instance %s: job %s was queued when the agent stopped: starting it",
                 inst->uuid, j->job_id);
        pipeline(j, gc);
        return;
    }
    ts = task_state_from_string(jj->task_state);
    j->task = ts < 0 ? TASK_NONE : (enum task_state)ts;
    j->st.task_state = task_state_to_string(j->task);
    j->start_sent = journal_has_step(j->env->journal, j->job_id, "notify", "snapshot.start") == 1;
    j->error_sent = journal_has_step(j->env->journal, j->job_id, "notify", "error") == 1;
    if (journaled_target(jj, j, &dt) &&
        journal_has_step(j->env->journal, j->job_id, "glance-location", "done") != 1 &&
        !retry_cleanup(j, "removing the unregistered clone", direct_undo_fn, &dt))
        return; /* stays unfinished: the next start tries again */
    bool end_sent = journal_has_step(j->env->journal, j->job_id, "notify", "snapshot.end") == 1;

    r = recovered_image_status(j, gc, &status, &err);
    if (r == -ENOENT) {
        log_warning(LOG_WORKER, "instance %s: image %s was deleted while the agent was down",
                    inst->uuid, j->req->image_id);
        if (j->task != TASK_NONE)
            transition(j, TASK_EV_FAIL, NULL);
        job_finish(j, JOURNAL_FAILED, "image deleted");
        return;
    }
    if (r < 0) {
        fail_job(j, gc, r, err.msg);
        return;
    }
    if (status == GLANCE_IMAGE_ACTIVE) {
        /* Finished before the crash, not yet reported as such. */
        log_info(LOG_WORKER, "instance %s: image %s is active: completing job %s", inst->uuid,
                 j->req->image_id, j->job_id);
        if (j->task != TASK_NONE) {
            j->task = TASK_IMAGE_UPLOADING;
            transition(j, TASK_EV_DONE, NULL);
        }
        if (!end_sent)
            notify_snapshot(j, RPC_NOTIFY_PHASE_END);
        job_finish(j, JOURNAL_DONE, NULL);
        if (journaled_target(jj, j, &dt) &&
            journal_has_step(j->env->journal, j->job_id, "glance-location", "done") == 1)
            run_flatten(j, &dt);
        return;
    }
    if (status == GLANCE_IMAGE_QUEUED && j->task != TASK_NONE && j->task != TASK_STATE_MAX &&
        jj->attempts < RECOVERY_MAX_ATTEMPTS) {
        /* Nothing of it is in Glance: take the point in time again and go on from the task
         * state reported last. */
        log_info(LOG_WORKER, "instance %s: resuming job %s from task_state %s (attempt %d)",
                 inst->uuid, j->job_id, task_state_to_string(j->task), jj->attempts + 1);
        j->floor = j->task;
        j->task = TASK_IMAGE_SNAPSHOT_PENDING;
        pipeline(j, gc);
        return;
    }
    char msg[256];
    if (jj->attempts >= RECOVERY_MAX_ATTEMPTS)
        snprintf(msg, sizeof(msg), "the agent stopped during this snapshot %d times; giving up",
                 jj->attempts);
    else
        snprintf(msg, sizeof(msg), "the agent stopped during this snapshot (image %s, "
                 "task_state %s): it cannot be resumed", glance_image_status_to_string(status),
                 jj->task_state ? jj->task_state : "None");
    fail_job(j, gc, -EINTR, msg);
}

void
snapshot_run(struct snapshot_env *env, struct snapshot_task *t)
{
    struct job j;
    struct rpc_request *req = t->req;
    const struct instance *inst = req->instance;
    _cleanup_(glance_client_freep) struct glance_client *gc = NULL;
    struct agent_err err = {0};
    int r;

    job_init(&j, env, req);
    if (t->recovered)
        log_info(LOG_WORKER, "instance %s: recovering job %s (image %s, %s, task_state %s)",
                 inst->uuid, j.job_id, req->image_id,
                 journal_job_state_to_string(t->recovered->state),
                 t->recovered->task_state ? t->recovered->task_state : "None");
    else
        log_info(LOG_WORKER, "instance %s: snapshot to image %s starting (request %s)",
                 inst->uuid, req->image_id, req->ctx.request_id ?: "-");
    if (env->journal && journal_job_started(env->journal, j.job_id, &err) < 0) {
        log_error(LOG_JOURNAL, "job %s: start not journaled: %s", j.job_id, err.msg);
        agent_err_clear(&err);
    }

    r = job_connect(&j, &gc, &err);
    if (r < 0) {
        if (t->recovered) {
            /* Left unfinished in the journal: the next start tries again. */
            log_error(LOG_WORKER, "instance %s: recovering job %s: %s; left for the next start",
                      inst->uuid, j.job_id, err.msg);
            goto done;
        }
        log_error(LOG_WORKER, "instance %s: snapshot to image %s failed: %s", inst->uuid,
                  req->image_id, err.msg);
        if (gc)
            delete_image(&j, gc);
        transition(&j, TASK_EV_FAIL, NULL);
        notify_error(&j, r, err.msg);
        job_finish(&j, JOURNAL_FAILED, err.msg);
        goto done;
    }
    if (t->recovered)
        recover(&j, gc, t->recovered);
    else
        pipeline(&j, gc);
done:
    backend_put(env, j.bconn);
    rpc_request_free(req);
    journal_job_free(t->recovered);
    free(t);
}

void
snapshot_abandon(struct snapshot_env *env, struct snapshot_task *t)
{
    log_warning(LOG_WORKER, "instance %s: snapshot to image %s not started before the agent "
                "stopped: %s", t->req->instance ? t->req->instance->uuid : "-",
                t->req->image_id ? t->req->image_id : "-",
                env->journal ? "left in the journal for the next start" : "dropped (no journal)");
    rpc_request_free(t->req);
    journal_job_free(t->recovered);
    free(t);
}

int
snapshot_accept(struct snapshot_env *env, struct rpc_request *req, struct snapshot_task **ret)
{
    struct snapshot_task *t;
    struct agent_err err = {0};
    char job_id[48];
    int r;

    if (!req->instance || !req->image_id || !req->instance->uuid)
        return -EINVAL;
    if (env->journal) {
        job_id_for(req, job_id, sizeof(job_id));
        r = journal_job_add(env->journal, job_id, req->instance->uuid, req->image_id,
                            req->unique_id, req->raw, req->raw_len, req->content_type, &err);
        if (r == 0) {
            log_info(LOG_WORKER, "instance %s: snapshot to image %s is journaled already "
                     "(message %s): duplicate dropped", req->instance->uuid, req->image_id,
                     req->unique_id ?: "-");
            rpc_request_free(req);
            return 0;
        }
        if (r < 0) {
            log_error(LOG_JOURNAL, "instance %s: cannot journal the snapshot to image %s: %s",
                      req->instance->uuid, req->image_id, err.msg);
            return r;
        }
    }
    t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->req = req;
    *ret = t;
    return 1;
}

/* Clean what the journaled job may have left, before anything else runs. */
static void
reconcile_cleanup(struct snapshot_env *env, struct rpc_request *req, const struct journal_job *jj)
{
    struct job j;
    struct agent_err err = {0};
    struct direct_target dt;
    struct backend_conn *c = NULL;
    void *bh;

    job_init(&j, env, req);
    if (backend_get(env, &c, &err) < 0) {
        log_error(LOG_WORKER, "job %s: cannot clean up now: %s; the job's recovery retries",
                  j.job_id, err.msg);
        return;
    }
    bh = j.backend_h = c->h;
    /* A guest frozen for an rbd snapshot is thawed by the libvirt side. */
    if (env->quiesce_backend && env->quiesce_h && env->quiesce_backend->cleanup_job &&
        env->quiesce_backend->cleanup_job(env->quiesce_h, &j.sj, &err) < 0) {
        log_error(LOG_WORKER, "job %s: guest cleanup: %s", j.job_id, err.msg);
        agent_err_clear(&err);
    }
    bool registered = journal_has_step(env->journal, j.job_id, "glance-location", "done") == 1;
    bool direct = journaled_target(jj, &j, &dt);
    /* First the view's leftovers (and the locks a dead run holds on the disk); the snapshot of
     * a direct job stays while its clone exists (EBUSY). */
    if (env->backend->cleanup_job && env->backend->cleanup_job(bh, &j.sj, &err) < 0 &&
        !(err.code == -EBUSY && direct))
        log_error(LOG_WORKER, "job %s: cleanup: %s", j.job_id, err.msg);
    agent_err_clear(&err);
    if (direct && !registered && env->backend->direct_undo) {
        /* A clone Glance never got: remove it (and the snapshot it hangs on). */
        if (env->backend->direct_undo(bh, &j.sj, &dt, &err) < 0) {
            log_error(LOG_WORKER, "job %s: removing the unregistered clone %s/%s: %s", j.job_id,
                      dt.pool, req->image_id, err.msg);
        } else {
            journal_set_flatten(env->journal, j.job_id, NULL, NULL, NULL);
            log_info(LOG_WORKER, "job %s: unregistered clone %s/%s removed", j.job_id, dt.pool,
                     req->image_id);
        }
    }
    backend_put(env, c);
}

int
snapshot_reconcile(struct snapshot_env *env, struct snapshot_task ***ret)
{
    struct journal_job **v = NULL;
    struct snapshot_task **tasks;
    struct agent_err err = {0};
    size_t nt = 0;
    int n;

    *ret = NULL;
    if (!env->journal)
        return 0;
    /* Before this run opens the backend (and records its own session). */
    if (env->backend && env->backend->session_id && !env->dead_sessions &&
        journal_sessions(env->journal, env->backend->name, &env->dead_sessions, &err) < 0) {
        log_error(LOG_JOURNAL, "%s", err.msg);
        agent_err_clear(&err);
    }
    n = journal_unfinished(env->journal, &v, &err);
    if (n < 0) {
        log_error(LOG_JOURNAL, "%s", err.msg);
        return n;
    }
    tasks = calloc((size_t)n + 1, sizeof(*tasks));
    if (!tasks) {
        for (int i = 0; i < n; i++)
            journal_job_free(v[i]);
        free(v);
        return -ENOMEM;
    }
    if (n > 0)
        log_info(LOG_WORKER, "journal: %d unfinished job(s) from an earlier run", n);
    for (int i = 0; i < n; i++) {
        struct journal_job *jj = v[i];
        struct rpc_request *req = NULL;
        struct snapshot_task *t;

        agent_err_clear(&err);
        if (rpc_parse_delivery(jj->body, jj->body_len, jj->content_type, &req, &err) < 0 ||
            !req->instance || !req->image_id) {
            log_error(LOG_JOURNAL, "job %s: journaled request unreadable (%s): marked failed",
                      jj->job_id, err.msg[0] ? err.msg : "no instance or image");
            journal_job_finish(env->journal, jj->job_id, JOURNAL_FAILED,
                               "journaled request unreadable", NULL);
            rpc_request_free(req);
            journal_job_free(jj);
            continue;
        }
        log_info(LOG_WORKER, "journal: job %s (instance %s, image %s) was %s at task_state %s, "
                 "%d start(s): cleaning up", jj->job_id, jj->instance_uuid, jj->image_id,
                 journal_job_state_to_string(jj->state), jj->task_state ?: "None",
                 jj->attempts);
        if (jj->state != JOURNAL_QUEUED)
            reconcile_cleanup(env, req, jj);
        t = calloc(1, sizeof(*t));
        if (!t) {
            rpc_request_free(req);
            journal_job_free(jj);
            continue;
        }
        t->req = req;
        t->recovered = jj;
        tasks[nt++] = t;
    }
    free(v);
    *ret = tasks;
    return (int)nt;
}
