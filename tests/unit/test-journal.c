/* Unit tests for worker/journal.c on a real SQLite file in a temporary state_path: the lock
 * refuses a second holder and is released on close, duplicates (same job or same _unique_id) are
 * refused without a write, steps move a job to running and record task_state, unfinished jobs
 * come back byte-exact and in order, finished ones do not (unless a flatten is due), a reopened
 * journal keeps everything, and the database is private to its owner. */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "journal.h"
#include "test.h"

static char dir[] = "/tmp/ca-test-journal.XXXXXX";

static void
free_jobs(struct journal_job **v, int n)
{
    for (int i = 0; i < n; i++)
        journal_job_free(v[i]);
    free(v);
}

static void
test_lock(void)
{
    struct journal *a = NULL, *b = NULL;
    struct agent_err err = {0};
    int r;

    test_begin("lock");
    r = journal_open(dir, &a, &err);
    CHECK(r == 0, "open: %d %s", r, err.msg);
    agent_err_clear(&err);
    r = journal_open(dir, &b, &err);
    CHECK(r == -EBUSY, "second open: %d", r);
    CHECK(strstr(err.msg, "another compute-agent is running") != NULL, "message: %s", err.msg);
    journal_close(a);
    agent_err_clear(&err);
    r = journal_open(dir, &b, &err);
    CHECK(r == 0, "open after close: %d %s", r, err.msg);
    journal_close(b);

    char db[512];
    struct stat sb;
    snprintf(db, sizeof(db), "%s/compute-agent-journal.sqlite", dir);
    CHECK(stat(db, &sb) == 0 && (sb.st_mode & 077) == 0, "database mode %o", sb.st_mode & 0777);
    test_end();
}

static void
test_jobs(void)
{
    struct journal *j = NULL;
    struct journal_job **v = NULL;
    struct agent_err err = {0};
    static const char body1[] = "{\"oslo.version\": \"2.0\", \"oslo.message\": \"{}\"}";
    static const char body2[] = "{\"b\": 2}";
    int r, n;

    test_begin("jobs");
    r = journal_open(dir, &j, &err);
    CHECK(r == 0, "open: %d %s", r, err.msg);
    if (r < 0)
        return;
    r = journal_job_add(j, "snap-a", "inst-1", "img-a", "u1", body1, sizeof(body1) - 1,
                        "application/json", &err);
    CHECK(r == 1, "add a: %d %s", r, err.msg);
    r = journal_job_add(j, "snap-a", "inst-1", "img-a", "u9", body1, sizeof(body1) - 1,
                        "application/json", &err);
    CHECK(r == 0, "same job again: %d", r);
    r = journal_job_add(j, "snap-x", "inst-1", "img-x", "u1", body1, sizeof(body1) - 1,
                        "application/json", &err);
    CHECK(r == 0, "same unique_id again: %d", r);
    r = journal_job_add(j, "snap-b", "inst-2", "img-b", NULL, body2, sizeof(body2) - 1,
                        "application/json", &err);
    CHECK(r == 1, "add b without unique_id: %d %s", r, err.msg);
    r = journal_job_add(j, "snap-c", "inst-3", "img-c", "", body2, sizeof(body2) - 1,
                        "application/json", &err);
    CHECK(r == 1, "add c with an empty unique_id: %d %s", r, err.msg);
    r = journal_job_add(j, "snap-d", "inst-3", "img-d", NULL, NULL, 0, NULL, &err);
    CHECK(r == -EINVAL, "no body: %d", r);

    CHECK(journal_step(j, "snap-a", "task", "image_snapshot", &err) == 0, "step: %s", err.msg);
    CHECK(journal_step(j, "snap-a", "freeze", "done", &err) == 0, "step: %s", err.msg);
    CHECK(journal_has_step(j, "snap-a", "freeze", "done") == 1, "has freeze:done");
    CHECK(journal_has_step(j, "snap-a", "freeze", "thawed") == 0, "no freeze:thawed");
    CHECK(journal_has_step(j, "snap-b", "freeze", "done") == 0, "other job");
    CHECK(journal_job_started(j, "snap-a", &err) == 0, "started");
    CHECK(journal_job_finish(j, "snap-c", JOURNAL_DONE, NULL, &err) == 0, "finish c");

    n = journal_unfinished(j, &v, &err);
    CHECK(n == 2, "unfinished: %d %s", n, err.msg);
    if (n == 2) {
        CHECK(strcmp(v[0]->job_id, "snap-a") == 0, "order: %s first", v[0]->job_id);
        CHECK(v[0]->state == JOURNAL_RUNNING, "a running: %d", v[0]->state);
        CHECK(v[0]->task_state && strcmp(v[0]->task_state, "image_snapshot") == 0, "task");
        CHECK(v[0]->attempts == 1, "attempts %d", v[0]->attempts);
        CHECK(v[0]->body_len == sizeof(body1) - 1 && memcmp(v[0]->body, body1, v[0]->body_len) == 0,
              "body byte-exact");
        CHECK(v[0]->unique_id && strcmp(v[0]->unique_id, "u1") == 0, "unique_id");
        CHECK(v[1]->state == JOURNAL_QUEUED && !v[1]->task_state && !v[1]->unique_id,
              "b queued, no task, no unique_id");
        CHECK(!v[0]->flatten_pool, "no flatten");
    }
    free_jobs(v, n);

    /* task None clears the task state; a finished job with a flatten due stays listed. */
    CHECK(journal_step(j, "snap-a", "task", "None", &err) == 0, "task None");
    CHECK(journal_set_flatten(j, "snap-a", "images", "fsid-1", &err) == 0, "set flatten");
    CHECK(journal_job_finish(j, "snap-a", JOURNAL_DONE, NULL, &err) == 0, "finish a");
    CHECK(journal_job_finish(j, "snap-b", JOURNAL_FAILED, "because", &err) == 0, "finish b");
    journal_close(j);

    /* Reopened: the same state (durable, and the lock was released). */
    j = NULL;
    r = journal_open(dir, &j, &err);
    CHECK(r == 0, "reopen: %d %s", r, err.msg);
    if (r < 0)
        return;
    n = journal_unfinished(j, &v, &err);
    CHECK(n == 1, "after reopen: %d", n);
    if (n == 1) {
        CHECK(v[0]->state == JOURNAL_DONE && !v[0]->task_state, "a done, task None");
        CHECK(v[0]->flatten_pool && strcmp(v[0]->flatten_pool, "images") == 0 &&
              v[0]->flatten_fsid && strcmp(v[0]->flatten_fsid, "fsid-1") == 0, "flatten due");
    }
    free_jobs(v, n);
    CHECK(journal_set_flatten(j, "snap-a", NULL, "ignored", &err) == 0, "flatten done");
    n = journal_unfinished(j, &v, &err);
    CHECK(n == 0, "nothing left: %d", n);
    free_jobs(v, n);
    /* A finished job still deduplicates. */
    r = journal_job_add(j, "snap-b", "inst-2", "img-b", NULL, body2, sizeof(body2) - 1,
                        "application/json", &err);
    CHECK(r == 0, "finished job still a duplicate: %d", r);
    journal_close(j);
    test_end();
}

static void
test_sessions(void)
{
    struct journal *j = NULL;
    struct agent_err err = {0};
    char **v = NULL, id[32];
    int n;

    test_begin("sessions");
    if (journal_open(dir, &j, &err) < 0) {
        CHECK(0, "open: %s", err.msg);
        return;
    }
    n = journal_sessions(j, "rbd", &v, &err);
    CHECK(n == 0 && v && !v[0], "none yet: %d", n);
    free(v);
    for (int i = 0; i < 20; i++) {
        snprintf(id, sizeof(id), "client.%d", 100 + i);
        CHECK(journal_session_add(j, "rbd", id, &err) == 0, "add %s: %s", id, err.msg);
    }
    CHECK(journal_session_add(j, "qcow2", "other", &err) == 0, "other backend");
    n = journal_sessions(j, "rbd", &v, &err);
    CHECK(n == 15, "the last 16 kept, one of them qcow2's: %d", n);
    if (n > 0) {
        CHECK(strcmp(v[0], "client.119") == 0, "newest first: %s", v[0]);
        CHECK(v[n] == NULL, "NULL-terminated");
    }
    for (int i = 0; i < n; i++)
        free(v[i]);
    free(v);
    journal_close(j);
    test_end();
}

static void
test_bad_state_path(void)
{
    struct journal *j = NULL;
    struct agent_err err = {0};

    test_begin("bad state_path");
    CHECK(journal_open("", &j, &err) == -EINVAL, "empty");
    agent_err_clear(&err);
    CHECK(journal_open("/proc/ca-no-such/dir", &j, &err) < 0 && err.msg[0], "uncreatable: %s",
          err.msg);
    test_end();
}

int
main(void)
{
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_lock();
    test_jobs();
    test_sessions();
    test_bad_state_path();
    static const char *const files[] = {"compute-agent-journal.sqlite",
                                        "compute-agent-journal.sqlite-wal",
                                        "compute-agent-journal.sqlite-shm", "compute-agent.lock"};
    char path[600];
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        unlink(path);
    }
    if (rmdir(dir) < 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return test_done();
}
