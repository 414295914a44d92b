/* compute-agent's entry point. main() reads the configuration, initialises every library while
 * the process still has one thread, starts the rpc thread, then waits for signals: SIGTERM and
 * SIGINT stop the agent cleanly, SIGHUP re-reads the configuration files and applies the log
 * level (the only setting that can change without a restart). Signals are blocked in every thread
 * and taken synchronously here, so no handler runs in async-signal context. */

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "cleanup.h"
#include "config.h"
#include "err.h"
#include "log.h"
#include "jobs.h"
#include "journal.h"
#include "request.h"
#include "snapshot.h"
#include "service.h"
#include "util.h"

#ifndef AGENT_VERSION
#define AGENT_VERSION "0.0.0"
#endif

#define DEFAULT_CONFIG_FILE "/etc/nova/nova.conf"

static void
usage(FILE *f)
{
    fprintf(f,
            "Usage: compute-agent [--config-file PATH]... [--print-config]\n"
            "\n"
            "Snapshot agent for OpenStack compute hosts: consumes nova's snapshot_instance RPC\n"
            "casts from RabbitMQ and uploads instance snapshots to Glance.\n"
            "\n"
            "  --config-file PATH  nova.conf-style file; repeatable, later files win\n"
            "                      (default: " DEFAULT_CONFIG_FILE " if it exists)\n"
            "  --print-config      print the effective configuration (secrets masked), exit\n"
            "  --help              this text\n"
            "  --version           version of the agent and of the libraries it runs on\n");
}

static void
print_version(void)
{
    char buf[1024];

    printf("compute-agent %s\n", AGENT_VERSION);
    rpc_library_versions(buf, sizeof(buf));
    fputs(buf, stdout);
    backend_library_versions(buf, sizeof(buf));
    fputs(buf, stdout);
    printf("sqlite %s\n", sqlite3_libversion());
}

struct agent {
    atomic_bool was_connected;
    struct job_pool *pool;
    struct snapshot_env env;
};

/* Called on the rpc thread at each change of the broker link: the one place these are logged. */
static void
on_link(void *user, enum rpc_link_state st, const char *peer, const struct agent_err *err,
        int retry_in_s)

{
    struct agent *ll = user;

    switch (st) {
    case RPC_LINK_CONNECTED:
        if (!atomic_exchange(&ll->was_connected, true))
            log_info(LOG_MAIN, "ready: connected to RabbitMQ at %s", peer);
        else
            log_info(LOG_MAIN, "reconnected to RabbitMQ at %s", peer);
        break;
    case RPC_LINK_LOST:
        log_warning(LOG_MAIN, "lost RabbitMQ connection to %s: %s; reconnecting in %d s", peer,
                    err && err->msg[0] ? err->msg : "unknown error", retry_in_s);
        break;
    case RPC_LINK_UNREACHABLE:
        log_error(LOG_MAIN, "no RabbitMQ broker reachable (last: %s); retrying in %d s",
                  err && err->msg[0] ? err->msg : "unknown error", retry_in_s);
        break;
    case RPC_LINK_STATE_MAX:
        break;
    }
}

/* Called on the rpc thread with each request the agent serves; owns req once queued. */
static int
on_request(void *user, struct rpc_request *req)
{
    struct agent *a = user;
    const struct instance *in = req->instance;
    int r;

    log_info(LOG_WORKER, "received %s (rpc %s, envelope %s) for instance %s image %s vm_state %s "
             "task_state %s host %s request %s", req->method, req->version, req->envelope_version,
             in ? in->uuid : "-", req->image_id ? req->image_id : "-",
             in && in->vm_state ? in->vm_state : "None",
             in && in->task_state ? in->task_state : "None", in && in->host ? in->host : "None",
             req->ctx.request_id ? req->ctx.request_id : "-");
    struct snapshot_task *t = NULL;
    /* Journaled before it is acked: from here a crash loses nothing. */
    r = snapshot_accept(&a->env, req, &t);
    if (r <= 0)
        return r; /* 0: a duplicate, dropped (and acked); <0: requeued */
    r = job_pool_submit(a->pool, t);
    if (r < 0) {
        log_warning(LOG_WORKER, "instance %s: cannot queue the snapshot: %s", in ? in->uuid : "-",
                    strerror(-r));
        free(t); /* req goes back to the caller, the job stays journaled for the next start */
    }
    return r;
}

static void
run_job(void *ctx, void *arg)
{
    snapshot_run(ctx, arg);
}

static void
drop_job(void *ctx, void *arg)
{
    snapshot_abandon(ctx, arg);
}

static int
load_config(char **files, size_t n_files, struct agent_config **ret_cfg)
{
    struct agent_err err = {0};
    int r = config_load(files, n_files, ret_cfg, &err);

    if (r < 0)
        log_error(LOG_CONFIG, "%s", err.msg[0] ? err.msg : strerror(-r));
    return r;
}

int
main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config-file", required_argument, NULL, 'c'},
        {"print-config", no_argument, NULL, 'p'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    _cleanup_free_ char **files = NULL;
    size_t n_files = 0;
    bool print_config = false;
    struct agent_config *cfg = NULL;
    struct rpc_service *rpc = NULL;
    struct journal *journal = NULL;
    struct agent ll = {0};
    struct agent_err err = {0};
    sigset_t sigs;
    int opt, r, ret = EXIT_FAILURE;

    files = calloc((size_t)argc + 1, sizeof(*files));
    if (!files)
        return EXIT_FAILURE;
    while ((opt = getopt_long(argc, argv, "c:phV", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            files[n_files++] = optarg;
            break;
        case 'p':
            print_config = true;
            break;
        case 'h':
            usage(stdout);
            return EXIT_SUCCESS;
        case 'V':
            print_version();
            return EXIT_SUCCESS;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "compute-agent: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (n_files == 0 && access(DEFAULT_CONFIG_FILE, R_OK) == 0)
        files[n_files++] = (char *)DEFAULT_CONFIG_FILE;

    if (load_config(files, n_files, &cfg) < 0)
        return EXIT_FAILURE;
    if (print_config) {
        r = config_dump(cfg, STDOUT_FILENO);
        config_free(cfg);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
    }

    log_set_debug_mask(cfg->debug_mask);
    if (cfg->log_file && *cfg->log_file) {
        r = log_open_file(cfg->log_file);
        if (r < 0) {
            log_error(LOG_MAIN, "cannot open log_file %s: %s", cfg->log_file, strerror(-r));
            goto out;
        }
    }

    /* Before any thread exists: every thread inherits this mask, so only sigwaitinfo() below
     * ever sees these signals. A closed broker socket must give EPIPE, not kill the agent. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    r = backend_global_init(&err);
    if (r < 0) {
        log_error(LOG_MAIN, "%s", err.msg);
        goto out;
    }

    log_info(LOG_MAIN, "compute-agent %s starting: host %s, images_type %s, control_exchange %s, "
             "%zu config file(s)", AGENT_VERSION, cfg->host, images_type_to_string(cfg->images_type),
             cfg->control_exchange, n_files);
    for (size_t i = 0; i < n_files; i++)
        log_info(LOG_CONFIG, "loaded %s", files[i]);

    struct rpc_service_opts ro = {
        .url = cfg->transport,
        .topo =
            {
                .exchange = cfg->control_exchange,
                .topic = "compute",
                .server = cfg->host,
                .durable = cfg->amqp_durable_queues || cfg->rabbit_quorum_queue,
                .auto_delete = cfg->amqp_auto_delete,
                .ha = cfg->rabbit_ha_queues,
                .quorum = cfg->rabbit_quorum_queue,
                .quorum_delivery_limit = cfg->rabbit_quorum_delivery_limit,
                .quorum_max_memory_length = cfg->rabbit_quorum_max_memory_length,
                .quorum_max_memory_bytes = cfg->rabbit_quorum_max_memory_bytes,
                .transient_queues_ttl_s = cfg->rabbit_transient_queues_ttl,
                .prefetch = (int)cfg->rabbit_qos_prefetch_count,
                .direct_mandatory = cfg->direct_mandatory_flag,
                .cancel_on_failover = cfg->enable_cancel_on_failover,
            },
        .heartbeat_s = (int)cfg->heartbeat_timeout_threshold,
        .retry_interval_s = (int)cfg->rabbit_retry_interval,
        .retry_backoff_s = (int)cfg->rabbit_retry_backoff,
        .interval_max_s = (int)cfg->rabbit_interval_max,
        .on_link = on_link,
        .on_request = on_request,
        .user = &ll,
    };
    r = journal_open(cfg->state_path, &journal, &err);
    if (r < 0) {
        log_error(LOG_MAIN, "%s", err.msg);
        goto out_backend;
    }
    log_info(LOG_JOURNAL, "journal %s", journal_path(journal));
    ll.env.journal = journal;
    ll.env.cfg = cfg;
    ll.env.backend = backend_lookup(images_type_to_string(cfg->images_type));
    if (cfg->images_type == IMAGES_TYPE_RBD)
        ll.env.quiesce_backend = backend_lookup("qcow2"); /* libvirt, for freeze/thaw */
    pthread_mutex_init(&ll.env.lock, NULL);
    if (!ll.env.backend)
        log_error(LOG_MAIN, "[libvirt] images_type = %s is not supported yet: snapshots will "
                  "fail", images_type_to_string(cfg->images_type));
    r = job_pool_new(cfg->max_concurrent_snapshots, run_job, &ll.env, &ll.pool);
    if (r < 0) {
        log_error(LOG_MAIN, "cannot create the job pool: %s", strerror(-r));
        goto out_backend;
    }
    /* Before consuming: whatever an earlier run left half done is cleaned up now (thaw, abort,
     * remove, undo); finishing those jobs goes to the pool ahead of new requests. */
    struct snapshot_task **recovered = NULL;
    int n_rec = ll.env.backend ? snapshot_reconcile(&ll.env, &recovered) : 0;
    pthread_mutex_lock(&ll.env.lock);
    for (int i = 0; i < n_rec; i++)
        if (job_pool_submit(ll.pool, recovered[i]) < 0)
            snapshot_abandon(&ll.env, recovered[i]);
    free(recovered);
    r = rpc_service_start(&ro, &rpc);
    ll.env.rpc = rpc;
    pthread_mutex_unlock(&ll.env.lock);
    if (r < 0) {
        log_error(LOG_MAIN, "cannot start the rpc thread: %s", strerror(-r));
        job_pool_free(ll.pool, drop_job);
        goto out_backend;
    }

    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&sigs, &si);
        if (sig < 0) {
            if (errno == EINTR)
                continue;
            log_error(LOG_MAIN, "sigwaitinfo: %s", strerror(errno));
            break;
        }
        if (sig == SIGHUP) {
            struct agent_config *nc = NULL;
            if (load_config(files, n_files, &nc) < 0) {
                log_warning(LOG_MAIN, "SIGHUP: configuration not reloaded, keeping the old one");
                continue;
            }
            log_set_debug_mask(nc->debug_mask);
            log_info(LOG_MAIN, "SIGHUP: log level reloaded (other changes need a restart)");
            config_free(nc);
            continue;
        }
        log_info(LOG_MAIN, "%s received, stopping", strsignal(sig));
        break;
    }
    /* Stop taking requests; running jobs get graceful_shutdown_timeout to finish (they still
     * publish through the rpc thread). Queued ones and whatever still runs then stay in the
     * journal: the next start resumes or cleans them up. */
    rpc_service_stop_consuming(rpc);
    size_t left = job_pool_drain(ll.pool, cfg->graceful_shutdown_timeout * 1000);
    if (left > 0) {
        log_warning(LOG_MAIN, "%zu snapshot(s) still running after graceful_shutdown_timeout "
                    "(%ld s): left to the journal %s, the next start recovers them; exiting",
                    left, cfg->graceful_shutdown_timeout, journal_path(journal));
        _exit(EXIT_SUCCESS);
    }
    job_pool_free(ll.pool, drop_job);
    rpc_service_stop(rpc);
    snapshot_env_release(&ll.env);
    log_info(LOG_MAIN, "stopped");
    ret = EXIT_SUCCESS;

out_backend:
    journal_close(journal);
    backend_global_cleanup();
out:
    config_free(cfg);
    return ret;
}
