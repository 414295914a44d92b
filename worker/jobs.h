#pragma once
/* The job pool: runs submitted jobs on their own threads, at most max_concurrent at a time
 * ([DEFAULT] max_concurrent_snapshots, 0 = unlimited); the rest wait in submission order. */

#include <stddef.h>

struct job_pool;

typedef void (*job_fn)(void *ctx, void *arg);

/* Create a pool whose jobs run fn(ctx, arg). Returns 0 and *ret_pool, or -errno. */
int job_pool_new(long max_concurrent, job_fn fn, void *ctx, struct job_pool **ret_pool);

/* Queue arg (not NULL; owned by the job from now on). Never blocks. Returns 0, -EINVAL for a
 * NULL arg, -ESHUTDOWN once
 * job_pool_free() began (arg is then still the caller's), or -errno if no thread could start and
 * nothing runs that would pick it up later. */
int job_pool_submit(struct job_pool *p, void *arg);

/* Counters, for logs and tests. */
struct job_pool_stats {
    size_t running, queued, peak_running, started, finished;
};
void job_pool_stats(struct job_pool *p, struct job_pool_stats *ret);

/* Stop accepting and starting jobs, and wait up to timeout_ms for the running ones to finish.
 * Returns how many still run (queued ones stay queued for job_pool_free's drop). */
size_t job_pool_drain(struct job_pool *p, long timeout_ms);

/* Stop accepting, wait for running jobs to finish, then hand every job that never started to
 * drop(ctx, arg) (which owns it) and free the pool. NULL-safe. */
void job_pool_free(struct job_pool *p, void (*drop)(void *ctx, void *arg));
