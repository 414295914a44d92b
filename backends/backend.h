#pragma once
/* The disk-backend interface, and what the rest of the agent needs from backends/ before any
 * snapshot runs (process-wide library initialisation, linked library versions).
 *
 * A backend turns "the root disk of instance X" into a point-in-time, readable view of that disk,
 * described as extents so holes and zeros are never read or sent, and cleans up after itself on
 * every path. The worker streams the view through the image encoder into Glance. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "imgenc.h"

struct agent_err;

/* How to quiesce the guest around the point in time, nova's rules from the image properties. */
enum quiesce_mode {
    QUIESCE_NONE,     /* no guest agent announced: crash-consistent */
    QUIESCE_TRY,      /* hw_qemu_guest_agent=yes: freeze if the agent answers, else carry on */
    QUIESCE_REQUIRED, /* os_require_quiesce=yes: a failed freeze fails the snapshot */
    QUIESCE_MODE_MAX,
};
const char *quiesce_mode_to_string(enum quiesce_mode m);

/* Which way the view was made, reported on the image and in the log. */
enum view_path {
    VIEW_PATH_BACKUP_PULL, /* live: libvirt backup API, pull mode, NBD over a unix socket */
    VIEW_PATH_BLOCKCOPY,   /* live fallback: nova's shallow block copy to a delta, then read */
    VIEW_PATH_COLD,        /* guest shut off: its disk chain read directly (qemu-nbd -r) */
    VIEW_PATH_MANAGEDSAVE, /* disable_libvirt_livesnapshot: managed save, read, restore */
    VIEW_PATH_RBD_SNAP,    /* rbd fallback: an rbd snapshot of the disk, read extent by extent */
    VIEW_PATH_DIRECT,      /* rbd direct: snapshot + clone into Glance's pool, nothing streamed */
    VIEW_PATH_MAX,
};
const char *view_path_to_string(enum view_path p);

struct snap_job;

/* Guest quiesce for a backend that does not own the hypervisor (rbd): the worker hands it the
 * qcow2 backend's libvirt freeze/thaw. freeze returns 0 and *ret_frozen (filesystems frozen), or
 * -errno; thaw is idempotent and bounded by the job's agent timeout. */
struct quiesce_ops {
    int (*freeze)(void *ctx, const struct snap_job *job, int *ret_frozen, struct agent_err *err);
    int (*thaw)(void *ctx, const struct snap_job *job, struct agent_err *err);
    void *ctx;
};

/* One snapshot as a backend sees it. Borrowed strings, valid for the whole job. */
struct snap_job {
    const char *job_id;           /* unique, [a-z0-9-]: names sockets and scratch files */
    const char *instance_uuid;    /* the libvirt domain UUID */
    const char *root_device_name; /* "/dev/vda" or NULL: the first disk, as nova */
    enum quiesce_mode quiesce;
    bool live_snapshot_disabled;  /* [workarounds] disable_libvirt_livesnapshot */
    const char *scratch_dir;      /* [libvirt] snapshots_directory */
    int agent_timeout_s;          /* bound on every guest-agent command (freeze, thaw) */
    const struct quiesce_ops *quiesce_ops; /* rbd: how to freeze the guest; NULL: no freeze */
    /* Optional: the journal. Called at each step a crash could interrupt: before a resource
     * that may outlive the agent is made (state "intent") and once it exists ("done") or is gone
     * ("removed", "thawed"). It returns once the step is durable; test builds may stop the
     * agent there. */
    void (*step)(void *ctx, const char *resource, const char *state);
    void *step_ctx;
    /* cleanup_job: storage-client ids of earlier, dead runs of the agent (session_id), NULL-
     * terminated, or NULL. Locks they still hold on the job's disks may be broken. */
    char *const *dead_sessions;
};

static inline void
snap_job_step(const struct snap_job *job, const char *resource, const char *state)
{
    if (job && job->step)
        job->step(job->step_ctx, resource, state);
}


/* What a backend reports about the view it made (all filled by open_view). */
struct view_info {
    enum view_path path;
    const char *path_reason;   /* why a fallback ran, static string, or NULL */
    bool frozen;               /* filesystems were frozen for the point in time */
    int frozen_count;          /* how many the guest agent froze */
    int64_t freeze_window_ms;  /* freeze → thaw, -1 if not frozen */
    int64_t downtime_ms;       /* guest not running because of us (managed save), else 0 */
    char disk_target[32];      /* "vda" */
    char disk_format[16];      /* source disk format, "qcow2" or "raw" */
    char quiesce_error[256];   /* QUIESCE_TRY: why the freeze was skipped, "" otherwise */
    int64_t setup_ms;          /* freeze + backup begin / block copy to ready + abort / managed
                                * save: the step that fixes the point in time */
    int64_t map_ms;            /* NBD connect + extent map (block status) */
};

/* When the clone of a direct (storage-native) snapshot is made independent of the instance disk:
 * [libvirt] images_rbd_flatten. */
enum flatten_policy {
    FLATTEN_SYNC,       /* before the image goes active (nova): time grows with the disk */
    FLATTEN_BACKGROUND, /* after: the image is active in O(1), flattened later */
    FLATTEN_NEVER,      /* the image stays a clone of the instance disk's snapshot */
    FLATTEN_POLICY_MAX,
};
const char *flatten_policy_to_string(enum flatten_policy p);

/* Where a direct snapshot goes: Glance's own pool in the same cluster. */
struct direct_target {
    const char *image_id; /* the Glance image id: the clone's name */
    const char *pool;     /* Glance's rbd pool */
    const char *fsid;     /* Glance's cluster (from an rbd:// location); NULL: assume ours */
    enum flatten_policy flatten;
    bool resumed; /* flatten(): an earlier flatten of this clone may have been cut off */
};

struct direct_result {
    char location[512];     /* rbd://<fsid>/<pool>/<image_id>/snap for Glance */
    char fsid[64];
    uint64_t size;          /* bytes, for Glance's size */
    char parent_snap[128];  /* the temporary snapshot on the instance disk */
    bool flatten_pending;   /* FLATTEN_BACKGROUND: the worker still has to call flatten() */
    struct view_info info;  /* freeze facts, timings (path: VIEW_PATH_DIRECT) */
};

/* A point-in-time view of one disk. The extents cover [0, virtual_size) in order; DATA extents
 * are read with pread, ZERO ones never are. Owned by the backend until close_view. */
struct disk_view {
    uint64_t virtual_size;
    struct imgenc_extent *extents;
    size_t n_extents;
    uint64_t allocated_bytes; /* sum of DATA extents */
    imgenc_pread_fn pread;    /* thread-compatible: one reader at a time */
    void *opaque;             /* for pread */
    struct view_info info;
    void *priv;               /* the backend's */
};

/* The configuration a backend needs (a subset of the agent's, so backends need no worker/
 * header). Borrowed strings. */
struct disk_backend_config {
    const char *connection_uri;  /* libvirt */
    const char *ceph_conf;       /* rbd */
    const char *rbd_user;
    const char *rbd_pool;
};

/* A disk backend. Every cleanup member is safe to call twice and after a restart. */
struct disk_backend_ops {
    const char *name; /* "qcow2", "rbd" */
    /* Required. Connect to what the backend needs (libvirt, Ceph). Returns 0 and *ret_h, or
     * -errno with err filled. Sets every library timeout so no later call blocks forever. */
    int (*open)(const struct disk_backend_config *cfg, void **ret_h, struct agent_err *err);
    /* Required. NULL-safe; frees everything open() made. */
    void (*close)(void *h);
    /* Required. Does this backend hold the instance's root disk? 1 yes, 0 no (domain or disk
     * not found: -ENOENT is also fine), <0 error. */
    int (*owns)(void *h, const struct snap_job *job, struct agent_err *err);
    /* Required. Make the point-in-time view (freeze inside, thaw guaranteed before returning,
     * whatever happens). On failure nothing is left behind (no job, scratch, socket, frozen
     * filesystem, managed-saved guest that was running). -ENOENT: the domain is gone. */
    int (*open_view)(void *h, const struct snap_job *job, struct disk_view **ret_v,
                     struct agent_err *err);
    /* Required. End the view: abort/finish the backup or block job, remove scratch and socket,
     * restore a managed-saved guest. Idempotent; NULL-safe. Returns 0 or the first error (every
     * step is still attempted; calling it again retries only what failed). v stays valid, with
     * its final view_info (downtime_ms includes the restore), until free_view(). */
    int (*close_view)(void *h, struct disk_view *v, struct agent_err *err);
    /* Required. Free v and the memory the backend holds for it; NULL-safe. Touches neither the
     * hypervisor nor the storage (a local NBD client and the server process it started are
     * closed). A view freed without a successful close_view leaves its job for cleanup_job. */
    void (*free_view)(void *h, struct disk_view *v);
    /* Optional (NULL: nothing of a job can outlive the agent). Finish, from the job alone,
     * whatever a view of it may have left: the journal calls it after a restart for every job
     * that may have had a view open, the worker after a failed close_view or open_view. Needs
     * instance_uuid, job_id, scratch_dir and agent_timeout_s as open_view got them. Idempotent,
     * also while no view of the job exists; returns 0 or the first error (every step is still
     * attempted). Must not run while a view of the same job is open. */
    int (*cleanup_job)(void *h, const struct snap_job *job, struct agent_err *err);
    /* Optional. Storage-native snapshot straight into the image store (rbd: freeze → snap
     * create → thaw → protect → clone into t->pool as t->image_id → (flatten if SYNC) → snap
     * "snap" + protect). -EXDEV: t is another cluster; -EOPNOTSUPP or -EACCES: not possible
     * here (the worker streams instead). On failure nothing it created is left (rolled back in
     * the order the storage requires). */
    int (*direct_snapshot)(void *h, const struct snap_job *job, const struct direct_target *t,
                           struct direct_result *res, struct agent_err *err);
    /* Optional (with direct_snapshot). Remove what a successful direct_snapshot made (clone and
     * its snapshot, the temporary snapshot on the instance disk): the worker's rollback when
     * registering the image failed. Idempotent. */
    int (*direct_undo)(void *h, const struct snap_job *job, const struct direct_target *t,
                       struct agent_err *err);
    /* Optional (with direct_snapshot). Flatten the clone t->image_id and then remove the
     * temporary snapshot on the instance disk; progress(ctx, done, total) is called as it goes.
     * Idempotent and resumable: a flatten interrupted by a restart is finished by calling it
     * again. */
    int (*flatten)(void *h, const struct snap_job *job, const struct direct_target *t,
                   void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
                   struct agent_err *err);
    /* Optional. This process's storage-client id (rbd: "client.<gid>"), which locks it takes
     * carry: the journal keeps it so that, after a crash, the next start can break the locks the
     * dead process still holds (cleanup_job with snap_job.dead_sessions) instead of waiting for
     * them to time out while the guest's I/O waits too. */
    int (*session_id)(void *h, char *buf, size_t size);
};

extern const struct disk_backend_ops qcow2_backend_ops;
extern const struct disk_backend_ops rbd_backend_ops;

/* The qcow2 backend's libvirt guest quiesce, for other backends (struct quiesce_ops; ctx is the
 * qcow2 backend handle). */
int qcow2_guest_freeze(void *ctx, const struct snap_job *job, int *ret_frozen,
                       struct agent_err *err);
int qcow2_guest_thaw(void *ctx, const struct snap_job *job, struct agent_err *err);

/* The backend table for a name; NULL if unknown. Refuses (NULL) a table missing a required
 * member. */
const struct disk_backend_ops *backend_lookup(const char *name);

/* Initialise libvirt (errors are read from the return path, never printed by libvirt) and
 * libcurl. Call once from main() before any thread starts. Returns 0 or -errno with err set. */
int backend_global_init(struct agent_err *err);

/* Release what backend_global_init() set up; call once after every thread has stopped. */
void backend_global_cleanup(void);

/* Write "library version" lines (libvirt, libnbd, librados, librbd, libcurl) into buf. */
void backend_library_versions(char *buf, size_t size);

/* Per-library pieces of the above, each in the file that owns the library. */
int qcow2_global_init(struct agent_err *err);
void qcow2_global_cleanup(void);
size_t qcow2_library_versions(char *buf, size_t size);
size_t cephrbd_library_versions(char *buf, size_t size);
int http_global_init(struct agent_err *err);
void http_global_cleanup(void);
size_t http_library_versions(char *buf, size_t size);
