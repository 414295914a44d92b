#pragma once
/* The rpc thread: owns the AMQP connection for the agent's lifetime, connects with failover
 * across the transport URL's brokers, reconnects with oslo's backoff after any failure, and keeps
 * heartbeats flowing. It never blocks longer than one bounded wait and stops promptly on request. */

#include "transport_url.h"

struct agent_err;
struct rpc_service;

enum rpc_link_state {
    RPC_LINK_CONNECTED,    /* peer is the broker; a first connect or a reconnect */
    RPC_LINK_LOST,         /* err says why; retry_in_s until the next round */
    RPC_LINK_UNREACHABLE,  /* a whole round of brokers failed; err is the last one */
    RPC_LINK_STATE_MAX,
};

const char *rpc_link_state_to_string(enum rpc_link_state s);

struct rpc_service_opts {
    const struct rpc_transport_url *url; /* borrowed: must outlive the service */
    const char *host;                    /* [DEFAULT] host, for the connection name */
    int heartbeat_s;
    int retry_interval_s, retry_backoff_s, interval_max_s; /* oslo's reconnection schedule */
    /* Called on the rpc thread at each link change, so the worker can log and decide. */
    void (*on_link)(void *user, enum rpc_link_state st, const char *peer,
                    const struct agent_err *err, int retry_in_s);
    void *user;
};

/* Start the rpc thread. Returns 0 and *ret_svc (stop and free with rpc_service_stop()), or
 * -errno. opts is copied; what it points to is borrowed. */
int rpc_service_start(const struct rpc_service_opts *opts, struct rpc_service **ret_svc);

/* Ask the thread to close its connection and exit, wait for it, free. NULL-safe. */
void rpc_service_stop(struct rpc_service *svc);

/* Seconds to wait before reconnection round n (0-based), per oslo's rabbit_retry_interval,
 * rabbit_retry_backoff and rabbit_interval_max. Pure. */
int rpc_retry_delay_s(int interval_s, int backoff_s, int max_s, unsigned round);

/* Write "library version" lines for what rpc/ links (librabbitmq-c, jansson) into buf. */
size_t rpc_library_versions(char *buf, size_t size);
