/* The journal's cost on the RPC path: every served cast is committed (WAL, fsync) before its
 * delivery is acked, so the commit latency bounds how fast a backlog drains. Measures, in a
 * temporary state_path on the filesystem given (default /var/tmp, where state_path usually
 * lives), N journal_job_add calls with a cast-sized body (~6 KiB, like python3-nova's
 * snapshot_instance) and the 20 journal_step calls a snapshot job makes, and prints latency
 * p50/p99/max and rates.
 *
 *   build/release/bench-journal [N [DIR]]       (default 2000, /var/tmp) */

#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "journal.h"

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int
cmp64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static void
report(const char *what, int64_t *lat, int n, int64_t total_ns)
{
    qsort(lat, (size_t)n, sizeof(*lat), cmp64);
    printf("| %s | %d | %.2f | %.2f | %.2f | %.0f |\n", what, n, lat[n / 2] / 1e6,
           lat[(n * 99) / 100] / 1e6, lat[n - 1] / 1e6, n / (total_ns / 1e9));
}

int
main(int argc, char **argv)
{
    int n = argc > 1 ? (int)strtol(argv[1], NULL, 10) : 2000;
    const char *base = argc > 2 ? argv[2] : "/var/tmp";
    char dir[512], body[6144], id[64], uid[64], path[600];
    struct journal *j = NULL;
    struct agent_err err = {0};
    static const char *const steps[][2] = {
        {"task", "image_snapshot"}, {"notify", "snapshot.start"}, {"view", "intent"},
        {"freeze", "intent"}, {"freeze", "done"}, {"backup-job", "intent"},
        {"backup-job", "done"}, {"freeze", "thawed"}, {"nbd-export", "done"}, {"view", "done"},
        {"task", "image_pending_upload"}, {"glance-metadata", "done"},
        {"task", "image_uploading"}, {"glance-upload", "intent"},
        {"glance-upload", "streaming"}, {"glance-upload", "done"}, {"view", "removed"},
        {"task", "None"}, {"notify", "snapshot.end"}, {"done", "done"},
    };

    if (n < 10)
        n = 10;
    snprintf(dir, sizeof(dir), "%s/ca-bench-journal.XXXXXX", base);
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    if (journal_open(dir, &j, &err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    memset(body, 'x', sizeof(body));
    int64_t *lat = calloc((size_t)n * 20, sizeof(*lat));
    if (!lat)
        return 1;

    int64_t t0 = now_ns();
    for (int i = 0; i < n; i++) {
        snprintf(id, sizeof(id), "snap-%08d-0000-0000-0000-000000000000", i);
        snprintf(uid, sizeof(uid), "%032x", i);
        int64_t t = now_ns();
        if (journal_job_add(j, id, "6f1d7a4c-2b1e-4c55-9a6e-0c1f2d3e4a5b", id + 5, uid, body,
                            sizeof(body), "application/json", &err) != 1) {
            fprintf(stderr, "add: %s\n", err.msg);
            return 1;
        }
        lat[i] = now_ns() - t;
    }
    int64_t t_add = now_ns() - t0;
    printf("| operation | count | p50 ms | p99 ms | max ms | per s |\n|---|---:|---:|---:|---:|---:|\n");
    report("journal_job_add (cast journaled before its ack)", lat, n, t_add);

    int m = n / 10, k = 0;
    t0 = now_ns();
    for (int i = 0; i < m; i++) {
        snprintf(id, sizeof(id), "snap-%08d-0000-0000-0000-000000000000", i);
        for (size_t s = 0; s < sizeof(steps) / sizeof(steps[0]); s++) {
            int64_t t = now_ns();
            if (strcmp(steps[s][0], "done") == 0)
                journal_job_finish(j, id, JOURNAL_DONE, NULL, &err);
            else
                journal_step(j, id, steps[s][0], steps[s][1], &err);
            lat[k++] = now_ns() - t;
        }
    }
    int64_t t_steps = now_ns() - t0;
    report("journal_step / finish (20 per snapshot job)", lat, k, t_steps);
    printf("\n%d jobs' steps took %.1f ms each (a job's whole journaling cost)\n", m,
           t_steps / 1e6 / m);
    journal_close(j);
    static const char *const files[] = {"compute-agent-journal.sqlite",
                                        "compute-agent-journal.sqlite-wal",
                                        "compute-agent-journal.sqlite-shm", "compute-agent.lock"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
    free(lat);
    return 0;
}
