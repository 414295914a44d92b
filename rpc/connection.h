#pragma once
/* One AMQP 0-9-1 connection to the first reachable broker of a transport URL (librabbitmq-c),
 * with heartbeats and bounded timeouts on every synchronous step. Owned and used by one thread. */

#include <stdbool.h>

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

/* Service the connection for up to timeout_ms: read what the broker sent, answer and send
 * heartbeats. Returns 0 if the connection is healthy, or a negative errno with err filled when
 * the broker closed it, heartbeats stopped, or the socket failed (the caller reconnects). */
int rpc_conn_pump(struct rpc_conn *c, int timeout_ms, struct agent_err *err);

/* True if librabbitmq holds unread data, so poll(2) on the fd would not wake for it. */
bool rpc_conn_has_buffered(const struct rpc_conn *c);

/* librabbitmq-c's version string. */
const char *rpc_amqp_library_version(void);
