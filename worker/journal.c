/* The job journal (see journal.h). Two tables:
 *
 *   jobs(job_id PK, instance_uuid, image_id, unique_id UNIQUE, body, content_type, state,
 *        task_state, attempts, flatten_pool, flatten_fsid, error, created, updated)
 *   steps(seq PK, job_id, resource, state, at)     the job's history, in order
 *
 * Every write is its own transaction; with journal_mode=WAL and synchronous=FULL a commit is on
 * disk when the call returns, so whatever the caller does next (ack the delivery, create the
 * resource) happens after the record survives a crash. The lock is flock(2) on a separate file:
 * released by the kernel when the process dies, however it dies. */

#define _GNU_SOURCE
#include "journal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "err.h"
#include "log.h"
#include "util.h"

#define DB_NAME "compute-agent-journal.sqlite"
#define LOCK_NAME "compute-agent.lock"
#define BUSY_TIMEOUT_MS 10000

struct journal {
    sqlite3 *db;
    int lock_fd;
    char path[PATH_MAX];
    pthread_mutex_t lock; /* one statement sequence at a time (sqlite is serialized anyway) */
};

static const char *const state_names[JOURNAL_JOB_STATE_MAX] = {
    [JOURNAL_QUEUED] = "queued",
    [JOURNAL_RUNNING] = "running",
    [JOURNAL_DONE] = "done",
    [JOURNAL_FAILED] = "failed",
};

const char *
journal_job_state_to_string(enum journal_job_state s)
{
    return (unsigned)s < JOURNAL_JOB_STATE_MAX ? state_names[s] : NULL;
}

static int
state_from_string(const char *s)
{
    for (int i = 0; s && i < JOURNAL_JOB_STATE_MAX; i++)
        if (strcmp(s, state_names[i]) == 0)
            return i;
    return -EINVAL;
}

static const char SCHEMA[] =
    "CREATE TABLE IF NOT EXISTS jobs ("
    " job_id TEXT PRIMARY KEY,"
    " instance_uuid TEXT NOT NULL,"
    " image_id TEXT NOT NULL,"
    " unique_id TEXT UNIQUE,"
    " body BLOB NOT NULL,"
    " content_type TEXT,"
    " state TEXT NOT NULL,"
    " task_state TEXT,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " flatten_pool TEXT,"
    " flatten_fsid TEXT,"
    " error TEXT,"
    " created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),"
    " updated TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')));"
    "CREATE TABLE IF NOT EXISTS steps ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " job_id TEXT NOT NULL,"
    " resource TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')));"
    "CREATE TABLE IF NOT EXISTS sessions ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " backend TEXT NOT NULL,"
    " id TEXT NOT NULL,"
    " at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')));"
    "CREATE INDEX IF NOT EXISTS steps_job ON steps(job_id, resource, state);"
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);";

static int
db_fail(struct journal *j, struct agent_err *err, int rc, const char *what)
{
    int code = rc == SQLITE_FULL ? -ENOSPC : rc == SQLITE_BUSY || rc == SQLITE_LOCKED ? -EBUSY
             : rc == SQLITE_NOMEM ? -ENOMEM : -EIO;
    return agent_err_set(err, code, "journal %s: %s: %s", j->path, what,
                         j->db ? sqlite3_errmsg(j->db) : sqlite3_errstr(rc));
}

static int
exec(struct journal *j, const char *sql, struct agent_err *err)
{
    char *msg = NULL;
    int rc = sqlite3_exec(j->db, sql, NULL, NULL, &msg);

    if (rc != SQLITE_OK) {
        int r = agent_err_set(err, -EIO, "journal %s: %s", j->path, msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        return r;
    }
    return 0;
}

/* Bind text or NULL. */
static int
bind_text(sqlite3_stmt *st, int i, const char *s)
{
    return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

static void
stmt_finalizep(sqlite3_stmt **st)
{
    if (*st)
        sqlite3_finalize(*st);
}

/* Prepare sql and bind up to four text parameters (NULL binds SQL NULL). */
static int
prepare(struct journal *j, const char *sql, sqlite3_stmt **ret, struct agent_err *err,
        int n, const char *a, const char *b, const char *c, const char *d)
{
    const char *v[4] = {a, b, c, d};
    int rc = sqlite3_prepare_v2(j->db, sql, -1, ret, NULL);

    if (rc != SQLITE_OK)
        return db_fail(j, err, rc, "prepare");
    for (int i = 0; i < n && i < 4; i++)
        if ((rc = bind_text(*ret, i + 1, v[i])) != SQLITE_OK)
            return db_fail(j, err, rc, "bind");
    return 0;
}

/* Run a statement that returns no rows, j->lock held. Returns the rows changed or -errno. */
static int
run_locked(struct journal *j, const char *sql, struct agent_err *err, int n, const char *a,
           const char *b, const char *c, const char *d)
{
    _cleanup_(stmt_finalizep) sqlite3_stmt *st = NULL;
    int r, rc;

    r = prepare(j, sql, &st, err, n, a, b, c, d);
    if (r >= 0) {
        rc = sqlite3_step(st);
        if (rc != SQLITE_DONE)
            r = db_fail(j, err, rc, "write");
        else
            r = sqlite3_changes(j->db);
    }
    return r;
}

static int
run(struct journal *j, const char *sql, struct agent_err *err, int n, const char *a,
    const char *b, const char *c, const char *d)
{
    pthread_mutex_lock(&j->lock);
    int r = run_locked(j, sql, err, n, a, b, c, d);
    pthread_mutex_unlock(&j->lock);
    return r;
}

int
journal_open(const char *state_path, struct journal **ret, struct agent_err *err)
{
    _cleanup_free_ struct journal *j = NULL;
    char lock_path[PATH_MAX];
    int rc, r;

    if (util_isempty(state_path))
        return agent_err_set(err, -EINVAL, "journal: [DEFAULT] state_path is empty");
    if (mkdir(state_path, 0755) < 0 && errno != EEXIST)
        return agent_err_set(err, -errno, "journal: create state_path %s: %s", state_path,
                             strerror(errno));
    j = calloc(1, sizeof(*j));
    if (!j)
        return -ENOMEM;
    j->lock_fd = -1;
    snprintf(lock_path, sizeof(lock_path), "%s/%s", state_path, LOCK_NAME);
    snprintf(j->path, sizeof(j->path), "%s/%s", state_path, DB_NAME);

    j->lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (j->lock_fd < 0)
        return agent_err_set(err, -errno, "journal: open lock %s: %s", lock_path,
                             strerror(errno));
    if (flock(j->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        r = errno == EWOULDBLOCK ? -EBUSY : -errno;
        close(j->lock_fd);
        return agent_err_set(err, r, "another compute-agent is running on state_path %s (it "
                             "holds %s)", state_path, lock_path);
    }
    /* The database holds the callers' auth tokens: readable by the agent's user only. */
    int fd = open(j->path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0)
        close(fd);
    rc = sqlite3_open_v2(j->path, &j->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                         SQLITE_OPEN_FULLMUTEX, NULL);
    if (rc != SQLITE_OK) {
        r = db_fail(j, err, rc, "open");
        goto fail;
    }
    sqlite3_busy_timeout(j->db, BUSY_TIMEOUT_MS);
    pthread_mutex_init(&j->lock, NULL);
    r = exec(j, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;", err);
    if (r >= 0)
        r = exec(j, SCHEMA, err);
    if (r >= 0) {
        char sql[512];
        snprintf(sql, sizeof(sql),
                 "DELETE FROM steps WHERE job_id IN (SELECT job_id FROM jobs WHERE state IN "
                 "('done','failed') AND flatten_pool IS NULL AND updated < strftime("
                 "'%%Y-%%m-%%dT%%H:%%M:%%fZ','now','-%d days'));"
                 "DELETE FROM jobs WHERE state IN ('done','failed') AND flatten_pool IS NULL "
                 "AND updated < strftime('%%Y-%%m-%%dT%%H:%%M:%%fZ','now','-%d days');",
                 JOURNAL_KEEP_DAYS, JOURNAL_KEEP_DAYS);
        r = exec(j, sql, err);
    }
    if (r < 0) {
        pthread_mutex_destroy(&j->lock);
        goto fail;
    }
    *ret = TAKE_PTR(j);
    return 0;
fail:
    sqlite3_close(j->db);
    close(j->lock_fd);
    return r;
}

void
journal_close(struct journal *j)
{
    if (!j)
        return;
    sqlite3_close(j->db);
    pthread_mutex_destroy(&j->lock);
    close(j->lock_fd); /* releases the lock */
    free(j);
}

const char *
journal_path(const struct journal *j)
{
    return j ? j->path : "";
}

int
journal_job_add(struct journal *j, const char *job_id, const char *instance_uuid,
                const char *image_id, const char *unique_id, const void *body, size_t len,
                const char *content_type, struct agent_err *err)
{
    _cleanup_(stmt_finalizep) sqlite3_stmt *st = NULL;
    int r, rc;

    if (!job_id || !instance_uuid || !image_id || !body)
        return agent_err_set(err, -EINVAL, "journal: job without id, instance, image or body");
    pthread_mutex_lock(&j->lock);
    /* OR IGNORE: the primary key (the job: instance + image) or unique_id already there is a
     * duplicate delivery. */
    r = prepare(j, "INSERT OR IGNORE INTO jobs (job_id, instance_uuid, image_id, unique_id, "
                "body, content_type, state) VALUES (?, ?, ?, ?, ?, ?, 'queued')",
                &st, err, 4, job_id, instance_uuid, image_id,
                unique_id && *unique_id ? unique_id : NULL);
    if (r >= 0 && ((rc = sqlite3_bind_blob64(st, 5, body, len, SQLITE_TRANSIENT)) != SQLITE_OK ||
                   (rc = bind_text(st, 6, content_type)) != SQLITE_OK))
        r = db_fail(j, err, rc, "bind");
    if (r >= 0) {
        rc = sqlite3_step(st);
        r = rc == SQLITE_DONE ? sqlite3_changes(j->db) : db_fail(j, err, rc, "record job");
    }
    pthread_mutex_unlock(&j->lock);
    return r < 0 ? r : r > 0 ? 1 : 0;
}

int
journal_step(struct journal *j, const char *job_id, const char *resource, const char *state,
             struct agent_err *err)
{
    int r;

    /* One transaction: the history row and the job's summary change together. */
    pthread_mutex_lock(&j->lock);
    r = exec(j, "BEGIN IMMEDIATE", err);
    if (r < 0)
        goto out;
    r = run_locked(j, "INSERT INTO steps (job_id, resource, state) VALUES (?, ?, ?)", err, 3,
                   job_id, resource, state, NULL);
    if (r >= 0 && strcmp(resource, "task") == 0)
        r = run_locked(j, "UPDATE jobs SET task_state = NULLIF(?, 'None'), state = CASE WHEN "
                       "state = 'queued' THEN 'running' ELSE state END, updated = strftime("
                       "'%Y-%m-%dT%H:%M:%fZ','now') WHERE job_id = ?", err, 2, state, job_id,
                       NULL, NULL);
    else if (r >= 0)
        r = run_locked(j, "UPDATE jobs SET state = CASE WHEN state = 'queued' THEN 'running' "
                       "ELSE state END, updated = strftime('%Y-%m-%dT%H:%M:%fZ','now') WHERE "
                       "job_id = ?", err, 1, job_id, NULL, NULL, NULL);
    if (r >= 0)
        r = exec(j, "COMMIT", err);
    else
        exec(j, "ROLLBACK", NULL);
out:
    pthread_mutex_unlock(&j->lock);
    return r < 0 ? r : 0;
}

int
journal_has_step(struct journal *j, const char *job_id, const char *resource, const char *state)
{
    _cleanup_(stmt_finalizep) sqlite3_stmt *st = NULL;
    int r, rc;

    pthread_mutex_lock(&j->lock);
    r = prepare(j, "SELECT 1 FROM steps WHERE job_id = ? AND resource = ? AND state = ? LIMIT 1",
                &st, NULL, 3, job_id, resource, state, NULL);
    if (r >= 0) {
        rc = sqlite3_step(st);
        r = rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : -EIO;
    }
    pthread_mutex_unlock(&j->lock);
    return r;
}

int
journal_set_flatten(struct journal *j, const char *job_id, const char *pool, const char *fsid,
                    struct agent_err *err)
{
    int r = run(j, "UPDATE jobs SET flatten_pool = ?, flatten_fsid = ?, updated = strftime("
                "'%Y-%m-%dT%H:%M:%fZ','now') WHERE job_id = ?", err, 3, pool,
                pool ? fsid : NULL, job_id, NULL);
    return r < 0 ? r : 0;
}

int
journal_job_started(struct journal *j, const char *job_id, struct agent_err *err)
{
    int r = run(j, "UPDATE jobs SET attempts = attempts + 1, updated = strftime("
                "'%Y-%m-%dT%H:%M:%fZ','now') WHERE job_id = ?", err, 1, job_id, NULL, NULL,
                NULL);
    return r < 0 ? r : 0;
}

int
journal_job_finish(struct journal *j, const char *job_id, enum journal_job_state s,
                   const char *reason, struct agent_err *err)
{
    int r = run(j, "UPDATE jobs SET state = ?, error = ?, updated = strftime("
                "'%Y-%m-%dT%H:%M:%fZ','now') WHERE job_id = ?", err, 3,
                journal_job_state_to_string(s), reason, job_id, NULL);
    return r < 0 ? r : 0;
}

void
journal_job_free(struct journal_job *jj)
{
    if (!jj)
        return;
    free(jj->job_id);
    free(jj->instance_uuid);
    free(jj->image_id);
    free(jj->unique_id);
    free(jj->body);
    free(jj->content_type);
    free(jj->task_state);
    free(jj->flatten_pool);
    free(jj->flatten_fsid);
    free(jj);
}

static char *
col_dup(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? strdup((const char *)t) : NULL;
}

int
journal_unfinished(struct journal *j, struct journal_job ***ret, struct agent_err *err)
{
    _cleanup_(stmt_finalizep) sqlite3_stmt *st = NULL;
    struct journal_job **v = NULL;
    size_t n = 0;
    int r, rc = SQLITE_DONE;

    pthread_mutex_lock(&j->lock);
    r = prepare(j, "SELECT job_id, instance_uuid, image_id, unique_id, body, content_type, state,"
                " task_state, attempts, flatten_pool, flatten_fsid FROM jobs WHERE state IN "
                "('queued','running') OR flatten_pool IS NOT NULL ORDER BY created, rowid",
                &st, err, 0, NULL, NULL, NULL, NULL);
    while (r >= 0 && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct journal_job *jj = calloc(1, sizeof(*jj));
        struct journal_job **nv = realloc(v, (n + 2) * sizeof(*v));
        const void *blob = sqlite3_column_blob(st, 4);
        int blen = sqlite3_column_bytes(st, 4);
        if (nv)
            v = nv;
        if (!jj || !nv) {
            free(jj);
            r = -ENOMEM;
            break;
        }
        v[n++] = jj;
        v[n] = NULL;
        jj->job_id = col_dup(st, 0);
        jj->instance_uuid = col_dup(st, 1);
        jj->image_id = col_dup(st, 2);
        jj->unique_id = col_dup(st, 3);
        jj->body = malloc(blen > 0 ? (size_t)blen : 1);
        if (jj->body && blen > 0)
            memcpy(jj->body, blob, (size_t)blen);
        jj->body_len = blen > 0 ? (size_t)blen : 0;
        jj->content_type = col_dup(st, 5);
        jj->state = (enum journal_job_state)state_from_string(
            (const char *)sqlite3_column_text(st, 6));
        jj->task_state = col_dup(st, 7);
        jj->attempts = sqlite3_column_int(st, 8);
        jj->flatten_pool = col_dup(st, 9);
        jj->flatten_fsid = col_dup(st, 10);
        if (!jj->job_id || !jj->instance_uuid || !jj->image_id || !jj->body ||
            (int)jj->state < 0) {
            r = (int)jj->state < 0 ? -EIO : -ENOMEM;
            break;
        }
    }
    if (r >= 0 && rc != SQLITE_DONE)
        r = db_fail(j, err, rc, "read jobs");
    pthread_mutex_unlock(&j->lock);
    if (r < 0) {
        for (size_t i = 0; i < n; i++)
            journal_job_free(v[i]);
        free(v);
        return r == -ENOMEM ? agent_err_set(err, r, "journal: out of memory")
                            : agent_err_set(err, r, "journal %s: bad job row", j->path);
    }
    *ret = v;
    return (int)n;
}

#define SESSIONS_KEPT 16

int
journal_session_add(struct journal *j, const char *backend, const char *id,
                    struct agent_err *err)
{
    int r = run(j, "INSERT INTO sessions (backend, id) VALUES (?, ?)", err, 2, backend, id, NULL,
                NULL);
    if (r >= 0) {
        char sql[160];
        snprintf(sql, sizeof(sql), "DELETE FROM sessions WHERE seq <= (SELECT max(seq) FROM "
                 "sessions) - %d", SESSIONS_KEPT);
        r = run(j, sql, err, 0, NULL, NULL, NULL, NULL);
    }
    return r < 0 ? r : 0;
}

int
journal_sessions(struct journal *j, const char *backend, char ***ret, struct agent_err *err)
{
    _cleanup_(stmt_finalizep) sqlite3_stmt *st = NULL;
    char **v = calloc(SESSIONS_KEPT + 1, sizeof(*v));
    size_t n = 0;
    int r, rc = SQLITE_DONE;

    if (!v)
        return -ENOMEM;
    pthread_mutex_lock(&j->lock);
    r = prepare(j, "SELECT id FROM sessions WHERE backend = ? ORDER BY seq DESC", &st, err, 1,
                backend, NULL, NULL, NULL);
    while (r >= 0 && n < SESSIONS_KEPT && (rc = sqlite3_step(st)) == SQLITE_ROW)
        if (!(v[n++] = col_dup(st, 0)))
            r = -ENOMEM;
    if (r >= 0 && rc != SQLITE_ROW && rc != SQLITE_DONE)
        r = db_fail(j, err, rc, "read sessions");
    pthread_mutex_unlock(&j->lock);
    if (r < 0) {
        for (size_t i = 0; i < n; i++)
            free(v[i]);
        free(v);
        return r;
    }
    *ret = v;
    return (int)n;
}
