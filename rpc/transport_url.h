#pragma once
/* oslo.messaging transport URLs: rabbit://[user:pass@]host[:port][,[user:pass@]host[:port]...]/[vhost]
 * Parsed into the list of brokers the AMQP connection tries in turn (failover). */

#include <stddef.h>

struct agent_err;

struct rpc_broker {
    char *host;     /* host name or IP address, without IPv6 brackets */
    int port;       /* 5672 when absent */
    char *user;     /* percent-decoded; "guest" when absent, as kombu */
    char *password; /* percent-decoded; secret: never log it */
};

struct rpc_transport_url {
    struct rpc_broker *brokers;
    size_t n_brokers;
    char *vhost; /* percent-decoded; "/" for an empty path, as oslo */
};

/* Parse url. On success returns 0 and *ret_url (caller frees with rpc_transport_url_free()).
 * -EINVAL with err filled for anything malformed (scheme, empty host, bad port, bad escape),
 * -EOPNOTSUPP for options this agent cannot honour (TLS), -ENOMEM. */
int rpc_transport_url_parse(const char *url, struct rpc_transport_url **ret_url,
                            struct agent_err *err);

void rpc_transport_url_free(struct rpc_transport_url *u);

/* Write a log-safe form of broker i ("user@host:port") into buf. Never includes the password. */
void rpc_broker_describe(const struct rpc_broker *b, char *buf, size_t size);
