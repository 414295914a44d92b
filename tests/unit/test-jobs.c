/* Unit tests for worker/jobs.c: the concurrency limit is never exceeded, queued jobs start in
 * submission order, unlimited runs everything at once, and shutdown waits for running jobs and
 * hands the never-started ones back. */

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "cleanup.h"
#include "jobs.h"
#include "test.h"

struct ctx {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int running, peak, order[64], n_order;
    int hold_ms;
    int gate; /* a job holds until this many run at once (or 5 s pass): proves the concurrency */
    atomic_int dropped;
};

static void
sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void
job(void *c_, void *arg)
{
    struct ctx *c = c_;
    int id = (int)(long)arg;

    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 5;
    pthread_mutex_lock(&c->lock);
    c->order[c->n_order++] = id;
    if (++c->running > c->peak)
        c->peak = c->running;
    pthread_cond_broadcast(&c->cond);
    while (c->running < c->gate && c->peak < c->gate &&
           pthread_cond_timedwait(&c->cond, &c->lock, &until) == 0)
        ;
    pthread_mutex_unlock(&c->lock);
    sleep_ms(c->hold_ms);
    pthread_mutex_lock(&c->lock);
    c->running--;
    pthread_mutex_unlock(&c->lock);
}

static void
drop(void *c_, void *arg)
{
    struct ctx *c = c_;
    (void)arg;
    atomic_fetch_add(&c->dropped, 1);
}

int
main(void)
{
    static const struct {
        const char *name;
        long max;
        int jobs, hold_ms, expect_peak;
    } cases[] = {
        {"limit 1 serializes", 1, 6, 20, 1},
        {"limit 2", 2, 10, 20, 2},
        {"limit above jobs", 8, 4, 20, 4},
        {"unlimited", 0, 12, 50, 12},
    };
    for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
        struct ctx c = {.hold_ms = cases[i].hold_ms, .gate = cases[i].expect_peak};
        struct job_pool *p = NULL;
        struct job_pool_stats st;
        pthread_mutex_init(&c.lock, NULL);
        pthread_cond_init(&c.cond, NULL);
        test_begin(cases[i].name);
        CHECK(job_pool_new(cases[i].max, job, &c, &p) == 0, "new");
        for (int k = 0; k < cases[i].jobs; k++)
            CHECK(job_pool_submit(p, (void *)(long)(k + 1)) == 0, "submit %d", k);
        /* Wait until all ran. */
        for (int w = 0; w < 1500; w++) {
            job_pool_stats(p, &st);
            if (st.finished == (size_t)cases[i].jobs)
                break;
            sleep_ms(10);
        }
        job_pool_stats(p, &st);
        CHECK(st.finished == (size_t)cases[i].jobs, "finished %zu", st.finished);
        CHECK(c.peak == cases[i].expect_peak, "peak %d, expected %d", c.peak, cases[i].expect_peak);
        CHECK((int)st.peak_running <= (cases[i].max ? cases[i].max : 1000), "pool peak %zu",
              st.peak_running);
        if (cases[i].max == 1)
            for (int k = 0; k < c.n_order; k++)
                CHECK(c.order[k] == k + 1, "job %d ran at position %d", c.order[k], k);
        job_pool_free(p, drop);
        CHECK(atomic_load(&c.dropped) == 0, "dropped %d", atomic_load(&c.dropped));
        test_end();
    }

    test_begin("shutdown waits for running jobs and hands back the queued ones");
    {
        struct ctx c = {.hold_ms = 100, .gate = 1};
        struct job_pool *p = NULL;
        pthread_mutex_init(&c.lock, NULL);
        pthread_cond_init(&c.cond, NULL);
        CHECK(job_pool_new(1, job, &c, &p) == 0, "new");
        for (int k = 0; k < 4; k++)
            job_pool_submit(p, (void *)(long)(k + 1));
        sleep_ms(20);
        job_pool_free(p, drop);
        CHECK(c.running == 0, "a job still runs after free");
        CHECK(c.n_order + atomic_load(&c.dropped) == 4, "ran %d + dropped %d != 4", c.n_order,
              atomic_load(&c.dropped));
        CHECK(atomic_load(&c.dropped) >= 1, "nothing handed back");
    }
    test_end();
    return test_done();
}
