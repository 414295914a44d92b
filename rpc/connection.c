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
#include <stdint.h>
#include <sys/time.h>

#include "cleanup.h"
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
    uint64_t pub_seq; /* publisher-confirm tag of the last publish on channel 2 */
    char *consumer_tags[4]; /* the broker's tags of our consumers, for basic.cancel */
    size_t n_consumers;
};

#define CH_CONSUME 1
#define CH_PUBLISH 2

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
    amqp_channel_open(c->state, 2);
    r = reply_to_err(amqp_get_rpc_reply(c->state), "channel.open", c->peer, err);
    if (r < 0)
        goto fail;
    amqp_confirm_select(c->state, 2);
    r = reply_to_err(amqp_get_rpc_reply(c->state), "confirm.select", c->peer, err);
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
    amqp_channel_close(c->state, CH_PUBLISH, AMQP_REPLY_SUCCESS);
    amqp_channel_close(c->state, CH_CONSUME, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c->state, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c->state);
    for (size_t i = 0; i < c->n_consumers; i++)
        free(c->consumer_tags[i]);
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

static void
table_add_str(amqp_table_t *t, const char *key, const char *val)
{
    amqp_table_entry_t *e = &t->entries[t->num_entries++];
    e->key = amqp_cstring_bytes(key);
    e->value.kind = AMQP_FIELD_KIND_UTF8;
    e->value.value.bytes = amqp_cstring_bytes(val);
}

/* py-amqp sends an int that fits 32 bits as a signed int and anything larger as a long; RabbitMQ
 * compares arguments by type class, so either is equivalent, but match it anyway. */
static void
table_add_int(amqp_table_t *t, const char *key, long val)
{
    amqp_table_entry_t *e = &t->entries[t->num_entries++];
    e->key = amqp_cstring_bytes(key);
    if (val >= INT32_MIN && val <= INT32_MAX) {
        e->value.kind = AMQP_FIELD_KIND_I32;
        e->value.value.i32 = (int32_t)val;
    } else {
        e->value.kind = AMQP_FIELD_KIND_I64;
        e->value.value.i64 = val;
    }
}

/* Explain a 406 the way an operator can act on it. */
static int
declare_err(struct rpc_conn *c, const char *what, const char *name, struct agent_err *err)
{
    amqp_rpc_reply_t rep = amqp_get_rpc_reply(c->state);
    struct agent_err e = {0};
    char what2[300];
    int r;

    snprintf(what2, sizeof(what2), "%s '%s'", what, name);
    r = reply_to_err(rep, what2, c->peer, &e);
    if (r == -EINVAL && strstr(e.msg, "406"))
        return agent_err_set(err, r, "%s (the declaration differs from the existing one: "
                             "[oslo_messaging_rabbit] amqp_durable_queues, amqp_auto_delete, "
                             "rabbit_quorum_queue and rabbit_ha_queues must match the deployment)",
                             e.msg);
    if (r < 0 && err)
        *err = e;
    return r;
}

int
rpc_conn_declare_exchange(struct rpc_conn *c, const char *name, const char *type, bool durable,
                          bool auto_delete, struct agent_err *err)
{
    amqp_exchange_declare(c->state, CH_CONSUME, amqp_cstring_bytes(name), amqp_cstring_bytes(type),
                          0, durable, auto_delete, 0, amqp_empty_table);
    return declare_err(c, "exchange.declare", name, err);
}

int
rpc_conn_declare_queue(struct rpc_conn *c, const char *name, bool durable, bool auto_delete,
                       const struct rpc_queue_args *a, struct agent_err *err)
{
    amqp_table_entry_t entries[6];
    amqp_table_t t = {.num_entries = 0, .entries = entries};

    if (a && a->ha)
        table_add_str(&t, "x-ha-policy", "all");
    if (a && a->quorum) {
        table_add_str(&t, "x-queue-type", "quorum");
        if (a->delivery_limit)
            table_add_int(&t, "x-delivery-limit", a->delivery_limit);
        if (a->max_memory_length)
            table_add_int(&t, "x-max-in-memory-length", a->max_memory_length);
        if (a->max_memory_bytes)
            table_add_int(&t, "x-max-in-memory-bytes", a->max_memory_bytes);
    }
    if (a && a->expires_ms > 0)
        table_add_int(&t, "x-expires", a->expires_ms);
    amqp_queue_declare(c->state, CH_CONSUME, amqp_cstring_bytes(name), 0, durable, 0, auto_delete,
                       t);
    return declare_err(c, "queue.declare", name, err);
}

int
rpc_conn_bind(struct rpc_conn *c, const char *queue, const char *exchange, const char *key,
              struct agent_err *err)
{
    amqp_queue_bind(c->state, CH_CONSUME, amqp_cstring_bytes(queue), amqp_cstring_bytes(exchange),
                    amqp_cstring_bytes(key), amqp_empty_table);
    return declare_err(c, "queue.bind", queue, err);
}

int
rpc_conn_qos(struct rpc_conn *c, int prefetch, struct agent_err *err)
{
    if (prefetch <= 0)
        return 0;
    amqp_basic_qos(c->state, CH_CONSUME, 0, (uint16_t)(prefetch > 65535 ? 65535 : prefetch), 0);
    return reply_to_err(amqp_get_rpc_reply(c->state), "basic.qos", c->peer, err);
}

int
rpc_conn_consume(struct rpc_conn *c, const char *queue, bool cancel_on_failover,
                 struct agent_err *err)
{
    amqp_table_entry_t entries[1];
    amqp_table_t t = {.num_entries = 0, .entries = entries};

    if (cancel_on_failover) {
        entries[0].key = amqp_cstring_bytes("x-cancel-on-ha-failover");
        entries[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
        entries[0].value.value.boolean = 1;
        t.num_entries = 1;
    }
    amqp_basic_consume_ok_t *ok = amqp_basic_consume(c->state, CH_CONSUME,
                                                     amqp_cstring_bytes(queue), amqp_empty_bytes,
                                                     0, 0, 0, t);
    int r = declare_err(c, "basic.consume", queue, err);
    if (r >= 0 && ok && c->n_consumers < ELEMENTSOF(c->consumer_tags)) {
        char *tag = strndup(ok->consumer_tag.bytes, ok->consumer_tag.len);
        if (tag)
            c->consumer_tags[c->n_consumers++] = tag;
    }
    return r;
}

int
rpc_conn_cancel_consumers(struct rpc_conn *c, struct agent_err *err)
{
    int r = 0;

    for (size_t i = 0; i < c->n_consumers; i++) {
        amqp_basic_cancel(c->state, CH_CONSUME, amqp_cstring_bytes(c->consumer_tags[i]));
        int q = declare_err(c, "basic.cancel", c->consumer_tags[i], err);
        if (q < 0 && r == 0)
            r = q;
        free(c->consumer_tags[i]);
    }
    c->n_consumers = 0;
    return r;
}

struct delivery_priv {
    amqp_envelope_t env;
    char *content_type, *routing_key, *exchange;
};

void
rpc_conn_release(struct rpc_delivery *d)
{
    struct delivery_priv *p = d ? d->priv_ : NULL;
    if (!p)
        return;
    amqp_destroy_envelope(&p->env);
    free(p->content_type);
    free(p->routing_key);
    free(p->exchange);
    free(p);
    d->priv_ = NULL;
}

static char *
bytes_dup(amqp_bytes_t b)
{
    char *s = malloc(b.len + 1);
    if (s) {
        if (b.len)
            memcpy(s, b.bytes, b.len);
        s[b.len] = '\0';
    }
    return s;
}

/* A frame that is not a delivery arrived: read it and say what it was. */
static int
next_frame(struct rpc_conn *c, struct rpc_event *ev, struct agent_err *err)
{
    amqp_frame_t frame;
    struct timeval tv = ms_to_tv(0);
    int st = amqp_simple_wait_frame_noblock(c->state, &frame, &tv);

    if (st == AMQP_STATUS_TIMEOUT)
        return 0;
    if (st != AMQP_STATUS_OK)
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: %s", c->peer,
                                       amqp_error_string2(st));
    if (frame.frame_type != AMQP_FRAME_METHOD) {
        ev->kind = RPC_EVENT_OTHER;
        return 0;
    }
    amqp_method_t *m = &frame.payload.method;
    switch (m->id) {
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *a = m->decoded;
        ev->kind = RPC_EVENT_CONFIRM;
        ev->tag = a->delivery_tag;
        ev->multiple = a->multiple;
        ev->ack = true;
        return 0;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *a = m->decoded;
        ev->kind = RPC_EVENT_CONFIRM;
        ev->tag = a->delivery_tag;
        ev->multiple = a->multiple;
        ev->ack = false;
        return 0;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        amqp_basic_return_t *rt = m->decoded;
        amqp_message_t msg;
        snprintf(ev->returned_key, sizeof(ev->returned_key), "%.*s", (int)rt->routing_key.len,
                 (const char *)rt->routing_key.bytes);
        ev->kind = RPC_EVENT_RETURNED;
        /* The returned message's header and body follow; read them off the wire. */
        amqp_rpc_reply_t rep = amqp_read_message(c->state, frame.channel, &msg, 0);
        if (rep.reply_type != AMQP_RESPONSE_NORMAL)
            return reply_to_err(rep, "basic.return", c->peer, err);
        amqp_destroy_message(&msg);
        return 0;
    }
    case AMQP_BASIC_CANCEL_METHOD:
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: the broker cancelled our "
                                       "consumer (queue deleted?)", c->peer);
    case AMQP_CHANNEL_CLOSE_METHOD: {
        amqp_channel_close_t *cl = m->decoded;
        amqp_channel_close_ok_t ok = {0};
        amqp_send_method(c->state, frame.channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: broker closed channel %u: %d "
                                       "%.*s", c->peer, frame.channel, cl->reply_code,
                                       (int)cl->reply_text.len, (const char *)cl->reply_text.bytes);
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        amqp_connection_close_t *cl = m->decoded;
        amqp_connection_close_ok_t ok = {0};
        amqp_send_method(c->state, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: broker closed the connection: "
                                       "%d %.*s", c->peer, cl->reply_code, (int)cl->reply_text.len,
                                       (const char *)cl->reply_text.bytes);
    }
    default:
        ev->kind = RPC_EVENT_OTHER;
        return 0;
    }
}

int
rpc_conn_next(struct rpc_conn *c, int timeout_ms, struct rpc_event *ev, struct agent_err *err)
{
    struct timeval tv = ms_to_tv(timeout_ms);
    struct delivery_priv *p;
    amqp_rpc_reply_t rep;

    memset(ev, 0, sizeof(*ev));
    ev->kind = RPC_EVENT_NONE;
    amqp_maybe_release_buffers(c->state);
    p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    rep = amqp_consume_message(c->state, &p->env, &tv, 0);
    if (rep.reply_type == AMQP_RESPONSE_NORMAL) {
        amqp_basic_properties_t *pr = &p->env.message.properties;
        if (pr->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
            p->content_type = bytes_dup(pr->content_type);
        p->routing_key = bytes_dup(p->env.routing_key);
        p->exchange = bytes_dup(p->env.exchange);
        ev->kind = RPC_EVENT_DELIVERY;
        ev->delivery.body = p->env.message.body.bytes;
        ev->delivery.len = p->env.message.body.len;
        ev->delivery.content_type = p->content_type;
        ev->delivery.routing_key = p->routing_key ? p->routing_key : "";
        ev->delivery.exchange = p->exchange ? p->exchange : "";
        ev->delivery.tag = p->env.delivery_tag;
        ev->delivery.redelivered = p->env.redelivered;
        ev->delivery.priv_ = p;
        return 0;
    }
    free(p);
    if (rep.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
        if (rep.library_error == AMQP_STATUS_TIMEOUT)
            return 0;
        if (rep.library_error == AMQP_STATUS_UNEXPECTED_STATE)
            return next_frame(c, ev, err);
        if (rep.library_error == AMQP_STATUS_HEARTBEAT_TIMEOUT)
            return agent_err_set_retryable(err, -ETIMEDOUT, "amqp %s: no heartbeat from broker",
                                           c->peer);
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: %s", c->peer,
                                       amqp_error_string2(rep.library_error));
    }
    return reply_to_err(rep, "consume", c->peer, err);
}

int
rpc_conn_ack(struct rpc_conn *c, uint64_t tag, struct agent_err *err)
{
    int st = amqp_basic_ack(c->state, CH_CONSUME, tag, 0);
    if (st != AMQP_STATUS_OK)
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: basic.ack: %s", c->peer,
                                       amqp_error_string2(st));
    return 0;
}

int
rpc_conn_reject(struct rpc_conn *c, uint64_t tag, bool requeue, struct agent_err *err)
{
    int st = amqp_basic_reject(c->state, CH_CONSUME, tag, requeue);
    if (st != AMQP_STATUS_OK)
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: basic.reject: %s", c->peer,
                                       amqp_error_string2(st));
    return 0;
}

int
rpc_conn_publish(struct rpc_conn *c, const char *exchange, const char *routing_key,
                 bool mandatory, const void *body, size_t len, uint64_t *ret_seq,
                 struct agent_err *err)
{
    amqp_basic_properties_t props = {0};
    amqp_bytes_t b = {.len = len, .bytes = (void *)body};
    int st;

    /* What oslo/kombu put on every message (see the captures' .meta.json): flags 0xf800. */
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_CONTENT_ENCODING_FLAG |
                   AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
                   AMQP_BASIC_PRIORITY_FLAG;
    props.content_type = amqp_cstring_bytes("application/json");
    props.content_encoding = amqp_cstring_bytes("utf-8");
    props.headers = amqp_empty_table;
    props.delivery_mode = 2;
    props.priority = 0;
    st = amqp_basic_publish(c->state, CH_PUBLISH, amqp_cstring_bytes(exchange),
                            amqp_cstring_bytes(routing_key), mandatory, 0, &props, b);
    if (st != AMQP_STATUS_OK)
        return agent_err_set_retryable(err, -ECONNRESET, "amqp %s: publish to '%s' '%s': %s",
                                       c->peer, exchange, routing_key, amqp_error_string2(st));
    *ret_seq = ++c->pub_seq;
    return 0;
}

const char *
rpc_amqp_library_version(void)
{
    return amqp_version();
}
