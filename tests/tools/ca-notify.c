/* ca-notify: publishes the notifications the agent builds for a snapshot of the instance in a
 * captured cast, through the agent's own rpc thread and notifier (publisher confirms and all), so
 * integration tests can check them with real oslo listeners before the snapshot job exists to
 * send them. Test tool; not installed.
 *
 *   ca-notify --config-file F [--config-file F2] --cast BODY.json [--events start,update,end,error]
 *
 * Prints "published N notifications, confirmed in M ms" and exits 0, or 1 with the error. */

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cleanup.h"
#include "config.h"
#include "envelope.h"
#include "err.h"
#include "notifier.h"
#include "notify.h"
#include "request.h"
#include "service.h"
#include "util.h"

static char *
read_all(const char *path, size_t *ret_len)
{
    _cleanup_fclose_ FILE *f = fopen(path, "re");
    char *buf = NULL;
    size_t cap = 0, n = 0, k;

    if (!f)
        return NULL;
    do {
        if (n + 65536 > cap) {
            char *t = realloc(buf, cap = n + 65536 * 2);
            if (!t) {
                free(buf);
                return NULL;
            }
            buf = t;
        }
        k = fread(buf + n, 1, cap - n, f);
        n += k;
    } while (k > 0);
    *ret_len = n;
    return buf;
}

static long
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

int
main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config-file", required_argument, NULL, 'c'},
        {"cast", required_argument, NULL, 'k'},
        {"events", required_argument, NULL, 'e'},
        {NULL, 0, NULL, 0},
    };
    _cleanup_free_ char **files = calloc((size_t)argc + 1, sizeof(char *));
    const char *cast = NULL, *events = "start,update,end,error";
    size_t n_files = 0, len = 0;
    struct agent_config *cfg = NULL;
    struct rpc_service *svc = NULL;
    struct agent_err err = {0};
    int opt, r, total = 0;

    while ((opt = getopt_long(argc, argv, "c:k:e:", longopts, NULL)) != -1) {
        if (opt == 'c')
            files[n_files++] = optarg;
        else if (opt == 'k')
            cast = optarg;
        else if (opt == 'e')
            events = optarg;
        else
            return 2;
    }
    if (!cast) {
        fprintf(stderr, "usage: ca-notify --config-file F --cast BODY.json [--events LIST]\n");
        return 2;
    }
    if (config_load(files, n_files, &cfg, &err) < 0) {
        fprintf(stderr, "ca-notify: %s\n", err.msg);
        return 1;
    }
    _cleanup_free_ char *body = read_all(cast, &len);
    _cleanup_(rpc_request_freep) struct rpc_request *req = NULL;
    if (!body || rpc_parse_delivery(body, len, "application/json", &req, &err) < 0) {
        fprintf(stderr, "ca-notify: %s: %s\n", cast, body ? err.msg : "cannot read");
        config_free(cfg);
        return 1;
    }

    struct rpc_service_opts ro = {
        .url = cfg->notification_transport ? cfg->notification_transport : cfg->transport,
        .publish_only = true,
        .topo = {.exchange = cfg->control_exchange, .topic = "compute", .server = cfg->host},
        .heartbeat_s = (int)cfg->heartbeat_timeout_threshold,
        .retry_interval_s = 1,
        .retry_backoff_s = 1,
        .interval_max_s = 2,
    };
    r = rpc_service_start(&ro, &svc);
    if (r < 0) {
        fprintf(stderr, "ca-notify: rpc thread: %s\n", strerror(-r));
        config_free(cfg);
        return 1;
    }

    struct rpc_notify_options no;
    struct rpc_instance_state pending, snap, done;
    notifier_options(cfg, &no);
    rpc_instance_state_from_request(req, &pending, NULL);
    snap = pending;
    snap.task_state = "image_snapshot";
    done = pending;
    done.task_state = NULL;
    static const struct rpc_kv kw[] = {{(char *)"image_id", (char *)"0"}};
    struct rpc_notify_fault fault = {
        .exception = "ImageNotFound",
        .exception_module = "nova.exception",
        .message = "Image could not be found.",
        .kwargs = kw,
        .n_kwargs = 1,
        .code = 404,
        .module_name = "nova.compute.manager",
        .function_name = "snapshot_instance",
    };

    long t0 = now_ms();
    _cleanup_(util_strv_freep) char **ev = NULL;
    r = util_split(events, ',', &ev);
    for (size_t i = 0; r >= 0 && ev[i]; i++) {
        _cleanup_(rpc_notification_freevp) struct rpc_notification **v = NULL;
        if (strcmp(ev[i], "start") == 0)
            r = rpc_notify_snapshot(&no, req, &pending, RPC_NOTIFY_PHASE_START, &v, &err);
        else if (strcmp(ev[i], "update") == 0)
            r = rpc_notify_instance_update(&no, req, &pending, &snap, &v, &err);
        else if (strcmp(ev[i], "end") == 0)
            r = rpc_notify_snapshot(&no, req, &done, RPC_NOTIFY_PHASE_END, &v, &err);
        else if (strcmp(ev[i], "error") == 0)
            r = rpc_notify_error(&no, req, &done, &fault, &v, &err);
        else
            r = agent_err_set(&err, -EINVAL, "unknown event '%s'", ev[i]);
        if (r >= 0) {
            total += (int)rpc_notification_count(v);
            r = notifier_publish(svc, v, 30000, &err);
        }
    }
    long dt = now_ms() - t0;
    rpc_service_stop(svc);
    config_free(cfg);
    if (r < 0) {
        fprintf(stderr, "ca-notify: %s\n", err.msg[0] ? err.msg : strerror(-r));
        return 1;
    }
    printf("published %d notifications, confirmed in %ld ms\n", total, dt);
    return 0;
}
