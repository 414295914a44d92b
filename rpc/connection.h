#pragma once
/* One AMQP 0-9-1 connection to the first reachable broker of a transport URL (librabbitmq-c),
 * with heartbeats and bounded timeouts on every synchronous step. Owned and used by one thread. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct agent_err;
struct rpc_transport_url;
struct rpc_conn;

struct rpc_conn_opts {
    const struct rpc_transport_url *url; /* borrowed for the duration of rpc_conn_open() */
    int heartbeat_s;                     /* negotiated heartbeat; 0 disables */
    int timeout_ms;                      /* TCP connect, handshake and each RPC (login, …) */
    const char *connection_name;         /* shown in the broker's management ("compute-agent:host") */
};

/* Try the brokers of opts->url in order, starting at *index (wrapping), until one accepts the
 * login and a channel (1) opens. On success returns 0, *ret_conn (caller frees with
 * rpc_conn_close()) and *index = the broker used. When all fail, returns the last error with err
 * filled (retryable for network failures, not for ACCESS_REFUSED). */
int rpc_conn_open(const struct rpc_conn_opts *opts, unsigned *index, struct rpc_conn **ret_conn,
                  struct agent_err *err);

/* Close politely (connection.close with a bounded wait) and free; NULL-safe. */
void rpc_conn_close(struct rpc_conn *c);

/* The socket, for poll(2). */
int rpc_conn_fd(const struct rpc_conn *c);

/* Log-safe "user@host:port" of the broker this connection talks to. */
const char *rpc_conn_peer(const struct rpc_conn *c);

/* True if librabbitmq holds unread data, so poll(2) on the fd would not wake for it. */
bool rpc_conn_has_buffered(const struct rpc_conn *c);

/* Queue arguments as oslo computes them (_get_queue_arguments); zero/false members are omitted. */
struct rpc_queue_args {
    bool ha;               /* x-ha-policy: all */
    bool quorum;           /* x-queue-type: quorum */
    long delivery_limit;   /* x-delivery-limit (quorum) */
    long max_memory_length; /* x-max-in-memory-length (quorum) */
    long max_memory_bytes; /* x-max-in-memory-bytes (quorum) */
    long expires_ms;       /* x-expires */
};

/* Channel 1 carries declarations and consumers; channel 2 publishes in confirm mode. Every
 * function below returns 0 or a negative errno with err filled; a channel-level refusal from the
 * broker (406 PRECONDITION_FAILED for inequivalent arguments, 403, 404) leaves the connection
 * unusable and the caller reconnects. */
int rpc_conn_declare_exchange(struct rpc_conn *c, const char *name, const char *type, bool durable,
                              bool auto_delete, struct agent_err *err);
int rpc_conn_declare_queue(struct rpc_conn *c, const char *name, bool durable, bool auto_delete,
                           const struct rpc_queue_args *args, struct agent_err *err);
int rpc_conn_bind(struct rpc_conn *c, const char *queue, const char *exchange, const char *key,
                  struct agent_err *err);
/* basic.qos prefetch_count on channel 1 (0: none, as oslo skips it). */
int rpc_conn_qos(struct rpc_conn *c, int prefetch, struct agent_err *err);
int rpc_conn_consume(struct rpc_conn *c, const char *queue, bool cancel_on_failover,
                     struct agent_err *err);
/* Cancel every consumer rpc_conn_consume() started on c (deliveries already received stay
 * ours to ack or reject). Returns 0 or the first error. */
int rpc_conn_cancel_consumers(struct rpc_conn *c, struct agent_err *err);

/* One received message, valid until rpc_conn_release(). */
struct rpc_delivery {
    const void *body;
    size_t len;
    const char *content_type; /* NULL if the property is absent */
    const char *routing_key;
    const char *exchange;
    uint64_t tag;
    bool redelivered;
    void *priv_;
};
void rpc_conn_release(struct rpc_delivery *d);

enum rpc_event_kind {
    RPC_EVENT_NONE,      /* nothing (yet) within the timeout */
    RPC_EVENT_DELIVERY,  /* a message: rpc_conn_release() it */
    RPC_EVENT_CONFIRM,   /* broker confirmed publishes up to tag (multiple) or tag; ack or nack */
    RPC_EVENT_RETURNED,  /* a mandatory publish was unroutable (routing_key says where) */
    RPC_EVENT_OTHER,     /* a frame of no interest was consumed */
};

struct rpc_event {
    enum rpc_event_kind kind;
    struct rpc_delivery delivery; /* RPC_EVENT_DELIVERY */
    uint64_t tag;                 /* RPC_EVENT_CONFIRM */
    bool multiple, ack;           /* RPC_EVENT_CONFIRM */
    char returned_key[256];       /* RPC_EVENT_RETURNED */
};

/* Wait up to timeout_ms for the next event, servicing heartbeats. Returns 0 with *ev filled
 * (possibly RPC_EVENT_NONE), or a negative errno when the connection failed. */
int rpc_conn_next(struct rpc_conn *c, int timeout_ms, struct rpc_event *ev, struct agent_err *err);

int rpc_conn_ack(struct rpc_conn *c, uint64_t tag, struct agent_err *err);
/* basic.reject; requeue false drops it (or dead-letters it where the operator set that up). */
int rpc_conn_reject(struct rpc_conn *c, uint64_t tag, bool requeue, struct agent_err *err);

/* Publish on channel 2 with oslo's properties (application/json, utf-8, empty headers,
 * delivery_mode 2, priority 0). *ret_seq is the publisher-confirm tag to wait for. */
int rpc_conn_publish(struct rpc_conn *c, const char *exchange, const char *routing_key,
                     bool mandatory, const void *body, size_t len, uint64_t *ret_seq,
                     struct agent_err *err);

/* librabbitmq-c's version string. */
const char *rpc_amqp_library_version(void);
