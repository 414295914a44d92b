/* The rpc thread's main loop. It alternates between two waits, both on poll(2) with the stop
 * eventfd beside the socket: while connected, a wait for broker data bounded by the heartbeat
 * interval; while disconnected, the backoff delay before the next round of brokers. Nothing
 * spins, and a stop request ends either wait at once. */

#include "service.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <jansson.h>

#include "connection.h"
#include "err.h"

struct rpc_service {
    struct rpc_service_opts opts;
    char conn_name[300];
    int stop_fd;
    pthread_t thread;
};

const char *
rpc_link_state_to_string(enum rpc_link_state s)
{
    static const char *const names[RPC_LINK_STATE_MAX] = {
        [RPC_LINK_CONNECTED] = "connected",
        [RPC_LINK_LOST] = "lost",
        [RPC_LINK_UNREACHABLE] = "unreachable",
    };
    return (unsigned)s < RPC_LINK_STATE_MAX ? names[s] : "?";
}

int
rpc_retry_delay_s(int interval_s, int backoff_s, int max_s, unsigned round)
{
    long d = (long)interval_s + (long)backoff_s * (long)round;
    return d > max_s ? max_s : (int)d;
}

/* Wait up to timeout_ms (-1: forever) for fd (may be -1) or the stop request.
 * Returns 1 if stop was requested, 0 otherwise. */
static int
wait_fd_or_stop(struct rpc_service *svc, int fd, int timeout_ms)
{
    struct pollfd p[2] = {
        {.fd = svc->stop_fd, .events = POLLIN},
        {.fd = fd, .events = POLLIN},
    };
    int r;

    do
        r = poll(p, fd >= 0 ? 2 : 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    return (p[0].revents & POLLIN) ? 1 : 0;
}

static void
notify(struct rpc_service *svc, enum rpc_link_state st, const char *peer,
       const struct agent_err *err, int retry_in_s)
{
    if (svc->opts.on_link)
        svc->opts.on_link(svc->opts.user, st, peer, err, retry_in_s);
}

static void *
service_main(void *arg)
{
    struct rpc_service *svc = arg;
    const struct rpc_service_opts *o = &svc->opts;
    unsigned round = 0, index = 0;
    /* Wake often enough to send our heartbeats at least twice per negotiated interval. */
    int pump_ms = o->heartbeat_s > 0 ? o->heartbeat_s * 1000 / 4 : -1;
    struct rpc_conn_opts copts = {
        .url = o->url,
        .heartbeat_s = o->heartbeat_s,
        .timeout_ms = 10000,
        .connection_name = svc->conn_name,
    };

    if (pump_ms == 0)
        pump_ms = 250;
    for (;;) {
        struct rpc_conn *c = NULL;
        struct agent_err err = {0};
        int r = rpc_conn_open(&copts, &index, &c, &err);

        if (r < 0) {
            int delay = rpc_retry_delay_s(o->retry_interval_s, o->retry_backoff_s,
                                          o->interval_max_s, round++);
            notify(svc, RPC_LINK_UNREACHABLE, NULL, &err, delay);
            if (wait_fd_or_stop(svc, -1, delay * 1000))
                break;
            continue;
        }
        round = 0;
        notify(svc, RPC_LINK_CONNECTED, rpc_conn_peer(c), NULL, 0);

        bool stop = false;
        for (;;) {
            if (!rpc_conn_has_buffered(c) && wait_fd_or_stop(svc, rpc_conn_fd(c), pump_ms)) {
                stop = true;
                break;
            }
            agent_err_clear(&err);
            r = rpc_conn_pump(c, 0, &err);
            if (r < 0)
                break;
        }
        if (stop) {
            rpc_conn_close(c);
            break;
        }
        int delay = rpc_retry_delay_s(o->retry_interval_s, o->retry_backoff_s, o->interval_max_s, 0);
        notify(svc, RPC_LINK_LOST, rpc_conn_peer(c), &err, delay);
        rpc_conn_close(c);
        /* Start the next round after the broker that failed: oslo rotates through the list. */
        index++;
        round = 1;
        if (wait_fd_or_stop(svc, -1, delay * 1000))
            break;
    }
    return NULL;
}

int
rpc_service_start(const struct rpc_service_opts *opts, struct rpc_service **ret_svc)
{
    struct rpc_service *svc = calloc(1, sizeof(*svc));
    int r;

    if (!svc)
        return -ENOMEM;
    svc->opts = *opts;
    snprintf(svc->conn_name, sizeof(svc->conn_name), "compute-agent:%s", opts->host);
    svc->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (svc->stop_fd < 0) {
        r = -errno;
        free(svc);
        return r;
    }
    r = pthread_create(&svc->thread, NULL, service_main, svc);
    if (r != 0) {
        close(svc->stop_fd);
        free(svc);
        return -r;
    }
    *ret_svc = svc;
    return 0;
}

void
rpc_service_stop(struct rpc_service *svc)
{
    uint64_t one = 1;

    if (!svc)
        return;
    if (write(svc->stop_fd, &one, sizeof(one)) < 0) {
        /* An eventfd write fails only on counter overflow, impossible with one write. */
    }
    pthread_join(svc->thread, NULL);
    close(svc->stop_fd);
    free(svc);
}

size_t
rpc_library_versions(char *buf, size_t size)
{
    int n = snprintf(buf, size, "librabbitmq %s\njansson %s\n", rpc_amqp_library_version(),
                     jansson_version_str());
    return n < 0 ? 0 : (size_t)n;
}
