#pragma once
/* One snapshot job, start to finish: nova-compute's snapshot_instance for one cast. */

struct agent_config;
struct disk_backend_ops;
struct journal;
struct journal_job;
struct rpc_request;
struct rpc_service;

#include <pthread.h>

/* What every job shares. cfg, rpc and backend are fixed while jobs run; the backend handle is
 * opened by the first job that needs it (libvirtd may start after the agent) under lock. */
struct backend_conn;

struct snapshot_env {
    const struct agent_config *cfg;
    struct rpc_service *rpc;                /* notifications go through it */
    const struct disk_backend_ops *backend; /* NULL: images_type not supported */
    pthread_mutex_t lock;
    struct backend_conn *backend_cur; /* the backend handle new jobs get (snapshot.c) */
    /* images_type = rbd: the libvirt side (qcow2 backend) only for guest freeze/thaw. */
    const struct disk_backend_ops *quiesce_backend;
    void *quiesce_h;
    struct journal *journal; /* NULL: no crash protection (tools, tests) */
    char **dead_sessions;    /* the backend's sessions of earlier agent runs (journal) */
};

/* One unit of work for the job pool: a request just received, or a job the journal says an
 * earlier run of the agent did not finish. */
struct snapshot_task {
    struct rpc_request *req;
    struct journal_job *recovered; /* NULL for a new request */
};

/* A new request: journal it (the caller acks the delivery only after this). Returns 1 and *ret
 * (a task for snapshot_run), 0 for a duplicate of a journaled job (req is then freed), or -errno
 * if the journal cannot take it (req stays the caller's). With no journal, always 1. */
int snapshot_accept(struct snapshot_env *env, struct rpc_request *req,
                    struct snapshot_task **ret);

/* On start, before consuming: for every job the journal has unfinished, clean up at once what a
 * crash may have left (thaw the guest, abort backup and block jobs, remove scratch files and
 * sockets, restore a managed-saved guest, undo an unregistered rbd clone), then hand back the
 * tasks that finish them (resume, complete or fail properly) for the job pool. Returns the number
 * of tasks, with *ret a NULL-terminated array (free the array; tasks go to snapshot_run), or
 * -errno. Running it twice changes nothing the second time. */
int snapshot_reconcile(struct snapshot_env *env, struct snapshot_task ***ret);

/* Close the backend handle if a job opened it. */
void snapshot_env_release(struct snapshot_env *env);

/* Run the task (takes ownership and frees it): the snapshot its request asks for, or the rest of a
 * recovered job. Never fails as a call:
 * whatever happens is reported the way nova-compute reports it — task-state changes, snapshot
 * start/end notifications, and on failure the image deleted, task_state back to None and the
 * error notifications — and logged once. */
void snapshot_run(struct snapshot_env *env, struct snapshot_task *t);

/* A task that never started (the agent is stopping): logged (it stays in the journal for the
 * next start) and freed. */
void snapshot_abandon(struct snapshot_env *env, struct snapshot_task *t);
