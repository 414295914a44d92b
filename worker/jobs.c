/* A small FIFO job pool. Threads are started on demand, one per running job; a thread that
 * finishes its job takes the next queued one before exiting, so the number of running jobs never
 * exceeds the limit and queued jobs start in order. There is no idle thread and no polling: a
 * job waits only for a running one to finish. */

#include "jobs.h"

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <time.h>

struct job_node {
    struct job_node *next;
    void *arg;
};

struct job_pool {
    pthread_mutex_t lock;
    pthread_cond_t idle; /* signalled when running drops to 0 */
    long max;
    job_fn fn;
    void *ctx;
    struct job_node *head, *tail;
    bool stopping;
    struct job_pool_stats st;
};

/* Take the next queued job, locked. NULL if none. */
static void *
dequeue(struct job_pool *p)
{
    struct job_node *n = p->head;
    void *arg;

    if (!n)
        return NULL;
    p->head = n->next;
    if (!p->head)
        p->tail = NULL;
    arg = n->arg;
    free(n);
    p->st.queued--;
    return arg;
}

static void *
runner(void *data)
{
    struct job_pool *p = data;
    void *arg;

    pthread_mutex_lock(&p->lock);
    for (;;) {
        arg = p->stopping ? NULL : dequeue(p);
        if (!arg)
            break;
        p->st.started++;
        pthread_mutex_unlock(&p->lock);
        p->fn(p->ctx, arg);
        pthread_mutex_lock(&p->lock);
        p->st.finished++;
    }
    bool idle = --p->st.running == 0;
    if (idle)
        pthread_cond_broadcast(&p->idle);
    pthread_mutex_unlock(&p->lock);
    /* Nothing runs: hand back what the jobs freed. glibc keeps freed memory in each thread's
     * arena, so one rbd flatten (librbd's copy buffers) left the agent at 5x its idle RSS. */
    if (idle)
        malloc_trim(0);
    return NULL;
}

int
job_pool_new(long max_concurrent, job_fn fn, void *ctx, struct job_pool **ret_pool)
{
    struct job_pool *p = calloc(1, sizeof(*p));

    if (!p)
        return -ENOMEM;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->idle, NULL);
    p->max = max_concurrent;
    p->fn = fn;
    p->ctx = ctx;
    *ret_pool = p;
    return 0;
}

int
job_pool_submit(struct job_pool *p, void *arg)
{
    struct job_node *n;
    int r = 0;

    if (!arg)
        return -EINVAL; /* NULL is how dequeue() says "nothing queued" */
    n = calloc(1, sizeof(*n));
    if (!n)
        return -ENOMEM;
    n->arg = arg;
    pthread_mutex_lock(&p->lock);
    if (p->stopping) {
        pthread_mutex_unlock(&p->lock);
        free(n);
        return -ESHUTDOWN;
    }
    if (p->tail)
        p->tail->next = n;
    else
        p->head = n;
    p->tail = n;
    p->st.queued++;
    if (p->max == 0 || (long)p->st.running < p->max) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        r = -pthread_create(&t, &a, runner, p);
        pthread_attr_destroy(&a);
        if (r == 0) {
            p->st.running++;
            if (p->st.running > p->st.peak_running)
                p->st.peak_running = p->st.running;
        } else if (p->st.running > 0) {
            r = 0; /* a running job's thread will pick it up when it finishes */
        } else {
            /* Nothing would ever run it: take it back. */
            struct job_node **pp = &p->head;
            while (*pp != n)
                pp = &(*pp)->next;
            *pp = NULL;
            p->tail = NULL;
            for (struct job_node *k = p->head; k; k = k->next)
                p->tail = k;
            p->st.queued--;
            free(n);
        }
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

void
job_pool_stats(struct job_pool *p, struct job_pool_stats *ret)
{
    pthread_mutex_lock(&p->lock);
    *ret = p->st;
    pthread_mutex_unlock(&p->lock);
}

size_t
job_pool_drain(struct job_pool *p, long timeout_ms)
{
    struct timespec dl;
    size_t left;

    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    while (p->st.running > 0)
        if (pthread_cond_timedwait(&p->idle, &p->lock, &dl) == ETIMEDOUT)
            break;
    left = p->st.running;
    pthread_mutex_unlock(&p->lock);
    return left;
}

void
job_pool_free(struct job_pool *p, void (*drop)(void *ctx, void *arg))
{
    void *arg;

    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    while (p->st.running > 0)
        pthread_cond_wait(&p->idle, &p->lock);
    while ((arg = dequeue(p))) {
        pthread_mutex_unlock(&p->lock);
        if (drop)
            drop(p->ctx, arg);
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    pthread_cond_destroy(&p->idle);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
