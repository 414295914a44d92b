#pragma once
/* One snapshot job, start to finish: nova-compute's snapshot_instance for one cast. */

struct agent_config;
struct disk_backend_ops;
struct rpc_request;
struct rpc_service;

#include <pthread.h>

/* What every job shares. cfg, rpc and backend are fixed while jobs run; the backend handle is
 * opened by the first job that needs it (libvirtd may start after the agent) under lock. */
struct snapshot_env {
    const struct agent_config *cfg;
    struct rpc_service *rpc;                /* notifications go through it */
    const struct disk_backend_ops *backend; /* NULL: images_type not supported */
    pthread_mutex_t lock;
    void *backend_h;
    /* images_type = rbd: the libvirt side (qcow2 backend) only for guest freeze/thaw. */
    const struct disk_backend_ops *quiesce_backend;
    void *quiesce_h;
};

/* Close the backend handle if a job opened it. */
void snapshot_env_release(struct snapshot_env *env);

/* Run the snapshot req asks for (takes ownership of req and frees it). Never fails as a call:
 * whatever happens is reported the way nova-compute reports it — task-state changes, snapshot
 * start/end notifications, and on failure the image deleted, task_state back to None and the
 * error notifications — and logged once. */
void snapshot_run(struct snapshot_env *env, struct rpc_request *req);

/* Give up a job that never started (the agent is stopping): logged, and req freed. */
void snapshot_abandon(struct snapshot_env *env, struct rpc_request *req);
