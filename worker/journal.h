#pragma once
/* The job journal: what the agent promised to do and how far it got, durable across crashes.
 *
 * One SQLite database under [DEFAULT] state_path (compute-agent-journal.sqlite, WAL, fsync on
 * every commit), guarded by an exclusive lock file (compute-agent.lock) so that only one agent
 * runs per state_path. A delivery is acked only after its job is recorded here; every step a
 * crash could interrupt (a task-state change, a resource about to be made or just made) is
 * recorded before the job goes on, so the next start knows what to finish or undo.
 *
 * The request is kept as it arrived (the oslo envelope), auth token included: the database is
 * created 0600 and never logged. Finished jobs are kept JOURNAL_KEEP_DAYS for deduplication and
 * then pruned. Thread-safe (one serialized connection). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct agent_err;
struct journal;

#define JOURNAL_KEEP_DAYS 7

enum journal_job_state {
    JOURNAL_QUEUED,  /* acked, not started */
    JOURNAL_RUNNING, /* started: the steps say how far */
    JOURNAL_DONE,    /* finished, image active */
    JOURNAL_FAILED,  /* finished, failed and cleaned up */
    JOURNAL_JOB_STATE_MAX,
};
const char *journal_job_state_to_string(enum journal_job_state s);

/* One unfinished job as journaled. Strings owned by the struct (journal_job_free). */
struct journal_job {
    char *job_id;
    char *instance_uuid;
    char *image_id;
    char *unique_id;    /* may be NULL */
    void *body;         /* the delivery as it arrived */
    size_t body_len;
    char *content_type;
    enum journal_job_state state;
    char *task_state;   /* the last task_state reported, NULL for None */
    int attempts;       /* starts so far (a recovery counts) */
    char *flatten_pool; /* a direct snapshot whose background flatten is due, else NULL */
    char *flatten_fsid;
};
void journal_job_free(struct journal_job *jj);

/* Open (create) the journal under state_path, taking its lock. -EBUSY with err naming the lock
 * file when another agent holds it. Prunes finished jobs past JOURNAL_KEEP_DAYS. */
int journal_open(const char *state_path, struct journal **ret, struct agent_err *err);
void journal_close(struct journal *j);
/* The database file's path (for logs and tests). */
const char *journal_path(const struct journal *j);

/* Record a newly received job (state QUEUED). Returns 1 when recorded, 0 when a job with the
 * same job_id (instance + image) or unique_id is already journaled (a duplicate: nothing is
 * written), -errno on failure. */
int journal_job_add(struct journal *j, const char *job_id, const char *instance_uuid,
                    const char *image_id, const char *unique_id, const void *body, size_t len,
                    const char *content_type, struct agent_err *err);

/* A step of the job: resource ("freeze", "backup-job", "rbd-clone", "task", …) reaching state
 * ("intent", "done", "removed", a task state, …). Appended to the job's history; a "task" step
 * also sets the job's task_state ("None" clears it) and the first step marks it RUNNING. */
int journal_step(struct journal *j, const char *job_id, const char *resource, const char *state,
                 struct agent_err *err);

/* Has the job reached resource/state (any time)? 1 yes, 0 no, -errno. */
int journal_has_step(struct journal *j, const char *job_id, const char *resource,
                     const char *state);

/* A background flatten is due (pool and fsid of the clone) or, with pool NULL, no longer. */
int journal_set_flatten(struct journal *j, const char *job_id, const char *pool, const char *fsid,
                        struct agent_err *err);

/* A new start of the job (at receipt, and each recovery). */
int journal_job_started(struct journal *j, const char *job_id, struct agent_err *err);

/* The job is over: DONE or FAILED, with the reason for a failure. */
int journal_job_finish(struct journal *j, const char *job_id, enum journal_job_state st,
                       const char *reason, struct agent_err *err);

/* Every unfinished job (QUEUED or RUNNING, or finished with a flatten still due), oldest first.
 * Returns the count and *ret (free each with journal_job_free, then free the array), or -errno. */
int journal_unfinished(struct journal *j, struct journal_job ***ret, struct agent_err *err);

/* Storage-client sessions of agent runs (struct disk_backend_ops.session_id), newest last; the
 * journal keeps the last 16. journal_sessions returns those recorded for backend, newest first,
 * as a NULL-terminated array (free each and the array), or -errno. */
int journal_session_add(struct journal *j, const char *backend, const char *id,
                        struct agent_err *err);
int journal_sessions(struct journal *j, const char *backend, char ***ret, struct agent_err *err);
