#pragma once
/* The rpc thread: owns the AMQP connection for the agent's lifetime. It connects with failover
 * across the transport URL's brokers, declares and consumes what nova-compute does for its host
 * (topic queues <topic> and <topic>.<server> on the control exchange, a <topic>_fanout exchange
 * with a private queue), decodes each delivery, drops duplicates, answers calls it cannot serve,
 * hands requests to the worker and acks them once handed over. Workers publish through it
 * (notifications) and are told a message was sent only once the broker confirmed it. It
 * reconnects with oslo's backoff after any failure, re-declaring and re-consuming, and never
 * blocks longer than one bounded wait. */

#include <stdbool.h>
#include <stddef.h>

#include "transport_url.h"

struct agent_err;
struct rpc_request;
struct rpc_service;

enum rpc_link_state {
    RPC_LINK_CONNECTED,   /* desc: "user@host:port, consuming q1, q2, q3"; first or reconnect */
    RPC_LINK_LOST,        /* err says why; retry_in_s until the next round */
    RPC_LINK_UNREACHABLE, /* a whole round of brokers failed; err is the last one */
    RPC_LINK_STATE_MAX,
};

const char *rpc_link_state_to_string(enum rpc_link_state s);

/* What to declare, as oslo's rabbit driver does for an RPC server (topic, server). */
struct rpc_topology {
    const char *exchange; /* [DEFAULT] control_exchange */
    const char *topic;    /* "compute" */
    const char *server;   /* [DEFAULT] host */
    bool durable;         /* amqp_durable_queues || rabbit_quorum_queue */
    bool auto_delete;     /* amqp_auto_delete */
    bool ha, quorum;
    long quorum_delivery_limit, quorum_max_memory_length, quorum_max_memory_bytes;
    long transient_queues_ttl_s; /* the fanout queue's x-expires */
    int prefetch;                /* rabbit_qos_prefetch_count */
    bool direct_mandatory;       /* replies with mandatory */
    bool cancel_on_failover;
};

struct rpc_service_opts {
    const struct rpc_transport_url *url; /* borrowed: must outlive the service */
    /* Publish only: declare and consume nothing (a separate notification transport_url, tools). */
    bool publish_only;
    struct rpc_topology topo;            /* strings borrowed likewise */
    int heartbeat_s;
    int retry_interval_s, retry_backoff_s, interval_max_s; /* oslo's reconnection schedule */
    /* Called on the rpc thread at each link change, so the worker can log and decide. */
    void (*on_link)(void *user, enum rpc_link_state st, const char *desc,
                    const struct agent_err *err, int retry_in_s);
    /* Called on the rpc thread with each request the agent serves (rpc_check_target passed,
     * not a duplicate). Returns 0 having taken ownership of req (the delivery is then acked), or
     * a negative errno leaving req to the caller (the delivery is requeued for another agent or
     * a later start). Must not block. */
    int (*on_request)(void *user, struct rpc_request *req);
    void *user;
};

/* Start the rpc thread. Returns 0 and *ret_svc (stop and free with rpc_service_stop()), or
 * -errno. opts is copied; what it points to is borrowed. */
int rpc_service_start(const struct rpc_service_opts *opts, struct rpc_service **ret_svc);

/* Stop taking requests: consumers are cancelled (now and after any reconnection) and deliveries
 * still buffered are requeued, while publishing (notifications of running jobs) goes on.
 * Idempotent, NULL-safe, returns at once. */
void rpc_service_stop_consuming(struct rpc_service *svc);

/* Ask the thread to close its connection and exit, wait for it, free. Publishers still waiting
 * are woken with -ECANCELED. NULL-safe. */
void rpc_service_stop(struct rpc_service *svc);

/* One message to publish. */
struct rpc_outgoing {
    const char *exchange;
    const char *routing_key;
    const void *body;
    size_t len;
    /* Notifications: declare (once per connection) the exchange as a topic exchange and a queue
     * named routing_key bound to it, as oslo's notifier does, so nothing is lost before a
     * consumer exists. */
    bool declare_queue;
};

/* Publish n messages (copied) through the rpc thread and wait until the broker confirmed every
 * one, across reconnections, or timeout_ms passes. Thread-safe; call from any thread but the rpc
 * thread. Returns 0 when all were confirmed; -ETIMEDOUT (the caller stops waiting; the unconfirmed
 * ones are still sent, after a reconnection if need be), -EIO if the broker nacked one, -ECANCELED when the service stops, -ENOMEM. */
int rpc_service_publish(struct rpc_service *svc, const struct rpc_outgoing *msgs, size_t n,
                        int timeout_ms, struct agent_err *err);

/* Seconds to wait before reconnection round n (0-based), per oslo's rabbit_retry_interval,
 * rabbit_retry_backoff and rabbit_interval_max. Pure. */
int rpc_retry_delay_s(int interval_s, int backoff_s, int max_s, unsigned round);

/* Write "library version" lines for what rpc/ links (librabbitmq-c, jansson) into buf. */
size_t rpc_library_versions(char *buf, size_t size);
