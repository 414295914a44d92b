/* AMQP connection handling on librabbitmq-c 0.11. Opening walks the transport URL's brokers in
 * order (oslo's failover), with a connect timeout, a handshake timeout and an RPC timeout so a
 * broker that accepts TCP but never answers cannot block the rpc thread. Pumping reads frames with
 * amqp_simple_wait_frame_noblock(), which also sends our heartbeats and reports a silent broker. */

#include "connection.h"

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "err.h"
#include "transport_url.h"
#include "util.h"

#define AGENT_PRODUCT "compute-agent"
#ifndef AGENT_VERSION
#define AGENT_VERSION "0.0.0"
#endif

struct rpc_conn {
    amqp_connection_state_t state;
    char peer[300];
};

static struct timeval
ms_to_tv(int ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    return tv;
}

/* Describe a failed synchronous AMQP call into err. Returns a negative errno. */
static int
reply_to_err(amqp_rpc_reply_t rep, const char *what, const char *peer, struct agent_err *err)
{
    switch (rep.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return 0;
    case AMQP_RESPONSE_NONE:
        return agent_err_set_retryable(err, -EPROTO, "amqp %s on %s: no reply", what, peer);
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s on %s: %s", what, peer,
                                       amqp_error_string2(rep.library_error));
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (rep.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            const amqp_connection_close_t *m = rep.reply.decoded;
            /* 403 ACCESS_REFUSED, 530 NOT_ALLOWED (vhost): retrying the same URL won't help. */
            bool retry = m->reply_code != 403 && m->reply_code != 530;
            int code = m->reply_code == 403 ? -EACCES : -ECONNREFUSED;
            if (retry)
                return agent_err_set_retryable(err, code, "amqp %s on %s: broker closed the "
                                               "connection: %d %.*s", what, peer, m->reply_code,
                                               (int)m->reply_text.len,
                                               (const char *)m->reply_text.bytes);
            return agent_err_set(err, code, "amqp %s on %s: broker refused: %d %.*s", what, peer,
                                 m->reply_code, (int)m->reply_text.len,
                                 (const char *)m->reply_text.bytes);
        }
        if (rep.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            const amqp_channel_close_t *m = rep.reply.decoded;
            return agent_err_set(err, m->reply_code == 406 ? -EINVAL : -EPROTO,
                                 "amqp %s on %s: broker closed the channel: %d %.*s", what, peer,
                                 m->reply_code, (int)m->reply_text.len,
                                 (const char *)m->reply_text.bytes);
        }
        return agent_err_set(err, -EPROTO, "amqp %s on %s: unexpected method 0x%08x", what, peer,
                             rep.reply.id);
    }
    return agent_err_set(err, -EPROTO, "amqp %s on %s: bad reply type", what, peer);
}

static int
open_one(const struct rpc_conn_opts *opts, const struct rpc_broker *b, struct rpc_conn **ret_conn,
         struct agent_err *err)
{
    struct rpc_conn *c = calloc(1, sizeof(*c));
    amqp_socket_t *sock;
    struct timeval tv = ms_to_tv(opts->timeout_ms);
    amqp_table_entry_t props[4];
    amqp_table_t ptable = {.num_entries = 0, .entries = props};
    int r;

    if (!c)
        return -ENOMEM;
    rpc_broker_describe(b, c->peer, sizeof(c->peer));
    c->state = amqp_new_connection();
    if (!c->state) {
        free(c);
        return -ENOMEM;
    }
    sock = amqp_tcp_socket_new(c->state);
    if (!sock) {
        r = -ENOMEM;
        goto fail;
    }
    amqp_set_handshake_timeout(c->state, &tv);
    amqp_set_rpc_timeout(c->state, &tv);

    r = amqp_socket_open_noblock(sock, b->host, b->port, &tv);
    if (r != AMQP_STATUS_OK) {
        r = agent_err_set_retryable(err, -ECONNREFUSED, "amqp connect to %s: %s", c->peer,
                                    amqp_error_string2(r));
        goto fail;
    }

    props[ptable.num_entries].key = amqp_cstring_bytes("product");
    props[ptable.num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
    props[ptable.num_entries++].value.value.bytes = amqp_cstring_bytes(AGENT_PRODUCT);
    props[ptable.num_entries].key = amqp_cstring_bytes("version");
    props[ptable.num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
    props[ptable.num_entries++].value.value.bytes = amqp_cstring_bytes(AGENT_VERSION);
    if (opts->connection_name) {
        props[ptable.num_entries].key = amqp_cstring_bytes("connection_name");
        props[ptable.num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
        props[ptable.num_entries++].value.value.bytes = amqp_cstring_bytes(opts->connection_name);
    }

    amqp_rpc_reply_t rep = amqp_login_with_properties(
        c->state, opts->url->vhost, 0, 131072, opts->heartbeat_s, &ptable,
        AMQP_SASL_METHOD_PLAIN, b->user, b->password);
    if (rep.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
        rep.library_error == AMQP_STATUS_CONNECTION_CLOSED) {
        /* RabbitMQ drops the TCP connection on a failed PLAIN login instead of sending close. */
        r = agent_err_set(err, -EACCES, "amqp login to %s (vhost '%s'): connection closed by "
                          "broker: wrong user, password or vhost?", c->peer, opts->url->vhost);
        goto fail;
    }
    r = reply_to_err(rep, "login", c->peer, err);
    if (r < 0)
        goto fail;

    amqp_channel_open(c->state, 1);
    r = reply_to_err(amqp_get_rpc_reply(c->state), "channel.open", c->peer, err);
    if (r < 0)
        goto fail;

    *ret_conn = c;
    return 0;

fail:
    amqp_destroy_connection(c->state);
    free(c);
    return r;
}

int
rpc_conn_open(const struct rpc_conn_opts *opts, unsigned *index, struct rpc_conn **ret_conn,
              struct agent_err *err)
{
    size_t n = opts->url->n_brokers;
    int r = -EINVAL;

    for (size_t k = 0; k < n; k++) {
        unsigned i = (unsigned)((*index + k) % n);
        struct agent_err e = {0};
        r = open_one(opts, &opts->url->brokers[i], ret_conn, &e);
        if (r >= 0) {
            *index = i;
            return 0;
        }
        /* Keep the last broker's error: with failover every broker failed, and the last one
         * tried is as good a witness as any. */
        if (err)
            *err = e;
    }
    return r;
}

void
rpc_conn_close(struct rpc_conn *c)
{
    if (!c)
        return;
    struct timeval tv = ms_to_tv(2000);
    amqp_set_rpc_timeout(c->state, &tv);
    amqp_channel_close(c->state, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c->state, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c->state);
    free(c);
}

int
rpc_conn_fd(const struct rpc_conn *c)
{
    return amqp_get_sockfd(c->state);
}

const char *
rpc_conn_peer(const struct rpc_conn *c)
{
    return c->peer;
}

bool
rpc_conn_has_buffered(const struct rpc_conn *c)
{
    return amqp_frames_enqueued(c->state) || amqp_data_in_buffer(c->state);
}

int
rpc_conn_pump(struct rpc_conn *c, int timeout_ms, struct agent_err *err)
{
    struct timeval tv = ms_to_tv(timeout_ms);

    for (;;) {
        amqp_frame_t frame;
        int st = amqp_simple_wait_frame_noblock(c->state, &frame, &tv);

        if (st == AMQP_STATUS_TIMEOUT)
            return 0;
        if (st == AMQP_STATUS_HEARTBEAT_TIMEOUT)
            return agent_err_set_retryable(err, -ETIMEDOUT, "amqp %s: no heartbeat from broker",
                                           c->peer);
        if (st != AMQP_STATUS_OK)
            return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: %s", c->peer,
                                           amqp_error_string2(st));
        if (frame.frame_type == AMQP_FRAME_METHOD) {
            amqp_method_t *m = &frame.payload.method;
            if (m->id == AMQP_CONNECTION_CLOSE_METHOD) {
                amqp_connection_close_t *cl = m->decoded;
                amqp_connection_close_ok_t ok = {0};
                amqp_send_method(c->state, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
                return agent_err_set_retryable(err, -ECONNRESET,
                                               "amqp %s: broker closed the connection: %d %.*s",
                                               c->peer, cl->reply_code, (int)cl->reply_text.len,
                                               (const char *)cl->reply_text.bytes);
            }
            if (m->id == AMQP_CHANNEL_CLOSE_METHOD) {
                amqp_channel_close_t *cl = m->decoded;
                amqp_channel_close_ok_t ok = {0};
                amqp_send_method(c->state, frame.channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
                return agent_err_set_retryable(err, -ECONNRESET,
                                               "amqp %s: broker closed channel %u: %d %.*s",
                                               c->peer, frame.channel, cl->reply_code,
                                               (int)cl->reply_text.len,
                                               (const char *)cl->reply_text.bytes);
            }
        }
        amqp_maybe_release_buffers(c->state);
        /* Drain whatever else is already here without waiting again. */
        tv = ms_to_tv(0);
    }
}

const char *
rpc_amqp_library_version(void)
{
    return amqp_version();
}
