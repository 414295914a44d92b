/* The rpc thread's main loop. While disconnected it waits out oslo's backoff; while connected it
 * sleeps in poll(2) on the socket, the stop eventfd and the wake eventfd (publish requests),
 * bounded by the heartbeat interval. Nothing spins, and a stop request ends either wait at once.
 *
 * Deliveries are decoded here (envelope.c) and settled here: a message that cannot be decoded is
 * rejected without requeue (a poison message must not loop), a duplicate _unique_id is acked and
 * dropped, a method or version the agent does not serve is acked and, for a call, answered with
 * oslo's failure reply, and a served request is handed to the worker and acked once it took it.
 *
 * Publishing runs on channel 2 in confirm mode. Messages wait in an out-queue until published and
 * in an in-flight list until the broker confirms them; on a reconnect the in-flight ones go back
 * to the front of the out-queue (at-least-once). A publisher blocks on its batch's condition
 * variable until every message of the batch is confirmed or its timeout passes. */

#include "service.h"

#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "connection.h"
#include "envelope.h"
#include "err.h"
#include "log.h"
#include "request.h"
#include "util.h"

#define DEDUP_SLOTS 4096
#define MAX_DECLARED 32

struct pub_batch {
    int pending;
    int nacked;
    bool cancelled;
    pthread_cond_t cond;
};

struct out_msg {
    struct out_msg *next;
    char *exchange;
    char *routing_key;
    char *body;
    size_t len;
    bool mandatory;
    bool declare_queue;
    struct pub_batch *batch; /* NULL: nobody waits (RPC replies) */
    uint64_t seq;            /* confirm tag once published */
};

struct msg_list {
    struct out_msg *head, *tail;
};

struct rpc_service {
    struct rpc_service_opts opts;
    char conn_name[300];
    char fanout_queue[128];
    char server_queue[300];
    char fanout_exchange[128];
    int stop_fd;
    int wake_fd;
    pthread_t thread;

    atomic_bool consume_stopped; /* rpc_service_stop_consuming() was called */
    pthread_mutex_t lock; /* guards outq, inflight, stopped */
    struct msg_list outq;
    struct msg_list inflight;
    bool stopped;

    /* rpc thread only */
    char seen[DEDUP_SLOTS][33];
    unsigned seen_next;
    char *declared[MAX_DECLARED]; /* notification queues declared on this connection */
    size_t n_declared;
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

static void
out_msg_free(struct out_msg *m)
{
    if (!m)
        return;
    free(m->exchange);
    free(m->routing_key);
    free(m->body);
    free(m);
}

static void
list_append(struct msg_list *l, struct out_msg *m)
{
    m->next = NULL;
    if (l->tail)
        l->tail->next = m;
    else
        l->head = m;
    l->tail = m;
}

/* Settle message m of its batch (locked): the waiter wakes when the last one settles. */
static void
settle(struct out_msg *m, bool ok)
{
    if (m->batch) {
        if (!ok)
            m->batch->nacked++;
        if (--m->batch->pending == 0)
            pthread_cond_broadcast(&m->batch->cond);
    }
    out_msg_free(m);
}

static void
wake(int fd)
{
    uint64_t one = 1;
    /* Fails only if the counter would overflow, i.e. a wake is already pending. */
    if (write(fd, &one, sizeof(one)) < 0) {
    }
}

static void
notify(struct rpc_service *svc, enum rpc_link_state st, const char *desc,
       const struct agent_err *err, int retry_in_s)
{
    if (svc->opts.on_link)
        svc->opts.on_link(svc->opts.user, st, desc, err, retry_in_s);
}

/* Wait up to timeout_ms (-1: forever) for fd (may be -1), a publish request, or the stop
 * request. Returns 1 if stop was requested, 0 otherwise. */
static int
wait_events(struct rpc_service *svc, int fd, int timeout_ms)
{
    struct pollfd p[3] = {
        {.fd = svc->stop_fd, .events = POLLIN},
        {.fd = svc->wake_fd, .events = POLLIN},
        {.fd = fd, .events = POLLIN},
    };
    int r;

    do
        r = poll(p, fd >= 0 ? 3 : 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    if (p[1].revents & POLLIN) {
        uint64_t v;
        if (read(svc->wake_fd, &v, sizeof(v)) < 0) {
            /* EAGAIN: another read took it; nothing to do. */
        }
    }
    return (p[0].revents & POLLIN) ? 1 : 0;
}

/* Declare and consume what an oslo RPC server for (topic, server) declares. */
static int
setup_consumers(struct rpc_service *svc, struct rpc_conn *c, struct agent_err *err)
{
    const struct rpc_topology *t = &svc->opts.topo;
    struct rpc_queue_args qa = {
        .ha = t->ha,
        .quorum = t->quorum,
        .delivery_limit = t->quorum_delivery_limit,
        .max_memory_length = t->quorum_max_memory_length,
        .max_memory_bytes = t->quorum_max_memory_bytes,
    };
    /* The fanout queue is never a quorum queue and expires when unused (oslo's transient TTL). */
    struct rpc_queue_args fa = {.ha = t->ha, .expires_ms = t->transient_queues_ttl_s * 1000};
    const char *topic_queues[2] = {t->topic, svc->server_queue};
    int r;

    r = rpc_conn_qos(c, t->prefetch, err);
    if (r < 0)
        return r;
    r = rpc_conn_declare_exchange(c, t->exchange, "topic", t->durable, t->auto_delete, err);
    for (size_t i = 0; r >= 0 && i < 2; i++) {
        r = rpc_conn_declare_queue(c, topic_queues[i], t->durable, t->auto_delete, &qa, err);
        if (r >= 0)
            r = rpc_conn_bind(c, topic_queues[i], t->exchange, topic_queues[i], err);
    }
    if (r >= 0)
        r = rpc_conn_declare_exchange(c, svc->fanout_exchange, "fanout", false, true, err);
    if (r >= 0)
        r = rpc_conn_declare_queue(c, svc->fanout_queue, false, false, &fa, err);
    if (r >= 0)
        r = rpc_conn_bind(c, svc->fanout_queue, svc->fanout_exchange, t->topic, err);
    for (size_t i = 0; r >= 0 && i < 2; i++)
        r = rpc_conn_consume(c, topic_queues[i], t->cancel_on_failover, err);
    if (r >= 0)
        r = rpc_conn_consume(c, svc->fanout_queue, t->cancel_on_failover, err);
    return r;
}

static void
forget_declared(struct rpc_service *svc)
{
    for (size_t i = 0; i < svc->n_declared; i++)
        free(svc->declared[i]);
    svc->n_declared = 0;
}

/* A notification's exchange and default queue, declared once per connection. */
static int
declare_for_publish(struct rpc_service *svc, struct rpc_conn *c, const struct out_msg *m,
                    struct agent_err *err)
{
    const struct rpc_topology *t = &svc->opts.topo;
    struct rpc_queue_args qa = {
        .ha = t->ha,
        .quorum = t->quorum,
        .delivery_limit = t->quorum_delivery_limit,
        .max_memory_length = t->quorum_max_memory_length,
        .max_memory_bytes = t->quorum_max_memory_bytes,
    };
    char key[600];
    int r;

    snprintf(key, sizeof(key), "%s\n%s", m->exchange, m->routing_key);
    for (size_t i = 0; i < svc->n_declared; i++)
        if (strcmp(svc->declared[i], key) == 0)
            return 0;
    r = rpc_conn_declare_exchange(c, m->exchange, "topic", t->durable, t->auto_delete, err);
    if (r >= 0)
        r = rpc_conn_declare_queue(c, m->routing_key, t->durable, t->auto_delete, &qa, err);
    if (r >= 0)
        r = rpc_conn_bind(c, m->routing_key, m->exchange, m->routing_key, err);
    if (r < 0)
        return r;
    if (svc->n_declared < MAX_DECLARED) {
        char *k = strdup(key);
        if (k)
            svc->declared[svc->n_declared++] = k;
    }
    return 0;
}

/* Publish everything waiting in the out-queue. On failure, what was not published goes back to
 * the front of the queue for the next connection. */
static int
flush_outq(struct rpc_service *svc, struct rpc_conn *c, struct agent_err *err)
{
    struct out_msg *list, *m;
    int r = 0;

    pthread_mutex_lock(&svc->lock);
    list = svc->outq.head;
    svc->outq.head = svc->outq.tail = NULL;
    pthread_mutex_unlock(&svc->lock);

    while ((m = list)) {
        if (m->declare_queue) {
            r = declare_for_publish(svc, c, m, err);
            if (r < 0)
                break;
        }
        r = rpc_conn_publish(c, m->exchange, m->routing_key, m->mandatory, m->body, m->len,
                             &m->seq, err);
        if (r < 0)
            break;
        list = m->next;
        pthread_mutex_lock(&svc->lock);
        list_append(&svc->inflight, m);
        pthread_mutex_unlock(&svc->lock);
    }
    if (list) {
        /* Put the unpublished rest back in front of whatever arrived meanwhile. */
        pthread_mutex_lock(&svc->lock);
        struct out_msg *last = list;
        while (last->next)
            last = last->next;
        last->next = svc->outq.head;
        if (!svc->outq.head)
            svc->outq.tail = last;
        svc->outq.head = list;
        pthread_mutex_unlock(&svc->lock);
    }
    return r;
}

static void
on_confirm(struct rpc_service *svc, uint64_t tag, bool multiple, bool ack)
{
    struct out_msg **pp, *m;

    pthread_mutex_lock(&svc->lock);
    for (pp = &svc->inflight.head; (m = *pp);) {
        if (m->seq == tag || (multiple && m->seq < tag)) {
            *pp = m->next;
            settle(m, ack);
        } else {
            pp = &m->next;
        }
    }
    svc->inflight.tail = NULL;
    for (m = svc->inflight.head; m; m = m->next)
        svc->inflight.tail = m;
    pthread_mutex_unlock(&svc->lock);
}

/* After a lost connection: unconfirmed messages are sent again, first. */
static void
requeue_inflight(struct rpc_service *svc)
{
    pthread_mutex_lock(&svc->lock);
    if (svc->inflight.head) {
        svc->inflight.tail->next = svc->outq.head;
        if (!svc->outq.head)
            svc->outq.tail = svc->inflight.tail;
        svc->outq.head = svc->inflight.head;
        svc->inflight.head = svc->inflight.tail = NULL;
    }
    pthread_mutex_unlock(&svc->lock);
}

/* True if unique_id was seen recently; remembers it otherwise. */
static bool
seen_before(struct rpc_service *svc, const char *unique_id)
{
    /* oslo's ids are 32 hex digits; anything else is not remembered (and never matches). */
    if (!unique_id || !*unique_id || strlen(unique_id) >= sizeof(svc->seen[0]))
        return false;
    for (unsigned i = 0; i < DEDUP_SLOTS; i++)
        if (strcmp(svc->seen[i], unique_id) == 0)
            return true;
    util_strlcpy(svc->seen[svc->seen_next], unique_id, sizeof(svc->seen[0]));
    svc->seen_next = (svc->seen_next + 1) % DEDUP_SLOTS;
    return false;
}

static void
queue_reply(struct rpc_service *svc, const struct rpc_request *req, int code, const char *why)
{
    struct out_msg *m = calloc(1, sizeof(*m));
    size_t len;
    char *body = NULL;

    if (!m || rpc_build_reply(req, code, why, &body, &len) < 0) {
        free(m);
        log_error(LOG_RPC, "cannot build the reply for %s: out of memory", req->method);
        return;
    }
    m->exchange = strdup("");
    m->routing_key = strdup(req->reply_q);
    m->body = body;
    m->len = len;
    m->mandatory = svc->opts.topo.direct_mandatory;
    if (!m->exchange || !m->routing_key) {
        out_msg_free(m);
        return;
    }
    pthread_mutex_lock(&svc->lock);
    list_append(&svc->outq, m);
    pthread_mutex_unlock(&svc->lock);
}

/* Decide the fate of one delivery; returns <0 only when the connection failed. */
static int
handle_delivery(struct rpc_service *svc, struct rpc_conn *c, struct rpc_delivery *d,
                struct agent_err *cerr)
{
    struct rpc_request *req = NULL;
    struct agent_err err = {0};
    int r;

    /* Stopping: what was already delivered goes back to the queue for the next start or
     * another agent. */
    if (atomic_load(&svc->consume_stopped))
        return rpc_conn_reject(c, d->tag, true, cerr);
    r = rpc_parse_delivery(d->body, d->len, d->content_type, &req, &err);

    if (r < 0) {
        log_warning(LOG_RPC, "rejected message from queue %s (%zu bytes): %s", d->routing_key,
                    d->len, err.msg[0] ? err.msg : strerror(-r));
        return rpc_conn_reject(c, d->tag, false, cerr);
    }
    if (seen_before(svc, req->unique_id)) {
        log_info(LOG_RPC, "dropped duplicate message %s (%s, request %s)", req->unique_id,
                 req->method, req->ctx.request_id ? req->ctx.request_id : "-");
        rpc_request_free(req);
        return rpc_conn_ack(c, d->tag, cerr);
    }
    enum rpc_target target;
    r = rpc_check_target(req, &target, &err);
    if (r == 0 && target == RPC_TARGET_PING) {
        if (req->kind == RPC_KIND_CALL)
            queue_reply(svc, req, 0, NULL);
        log_debug(LOG_RPC, "answered ping (request %s)",
                  req->ctx.request_id ? req->ctx.request_id : "-");
        rpc_request_free(req);
        return rpc_conn_ack(c, d->tag, cerr);
    }
    if (r < 0) {
        if (req->kind == RPC_KIND_CALL) {
            log_warning(LOG_RPC, "%s (rpc %s) not served: %s; failure replied to %s", req->method,
                        req->version, err.msg, req->reply_q);
            queue_reply(svc, req, r, err.msg);
        } else {
            log_warning(LOG_RPC, "%s (rpc %s) not served: %s; cast dropped", req->method,
                        req->version, err.msg);
        }
        rpc_request_free(req);
        return rpc_conn_ack(c, d->tag, cerr);
    }
    r = svc->opts.on_request ? svc->opts.on_request(svc->opts.user, req) : -ENOSYS;
    if (r < 0) {
        log_warning(LOG_RPC, "worker refused %s for instance %s: %s; requeued", req->method,
                    req->instance ? req->instance->uuid : "-", strerror(-r));
        rpc_request_free(req);
        return rpc_conn_reject(c, d->tag, true, cerr);
    }
    return rpc_conn_ack(c, d->tag, cerr);
}

/* Serve one connection until it fails (returns 0) or stop is requested (returns 1). */
static int
serve(struct rpc_service *svc, struct rpc_conn *c, struct agent_err *err)
{
    /* Wake often enough to send our heartbeats at least twice per negotiated interval. */
    int pump_ms = svc->opts.heartbeat_s > 0 ? svc->opts.heartbeat_s * 1000 / 4 : -1;

    bool cancelled = false;

    if (pump_ms == 0)
        pump_ms = 250;
    for (;;) {
        if (!cancelled && atomic_load(&svc->consume_stopped) && !svc->opts.publish_only) {
            if (rpc_conn_cancel_consumers(c, err) < 0)
                return 0;
            cancelled = true;
            log_info(LOG_RPC, "stopped consuming (publishing goes on)");
        }
        if (flush_outq(svc, c, err) < 0)
            return 0;
        if (!rpc_conn_has_buffered(c) && wait_events(svc, rpc_conn_fd(c), pump_ms))
            return 1;
        /* Drain what arrived, a bounded number at a time so publishing is not starved. */
        for (int i = 0; i < 64; i++) {
            struct rpc_event ev;
            if (rpc_conn_next(c, 0, &ev, err) < 0)
                return 0;
            if (ev.kind == RPC_EVENT_NONE)
                break;
            if (ev.kind == RPC_EVENT_DELIVERY) {
                int r = handle_delivery(svc, c, &ev.delivery, err);
                rpc_conn_release(&ev.delivery);
                if (r < 0)
                    return 0;
            } else if (ev.kind == RPC_EVENT_CONFIRM) {
                on_confirm(svc, ev.tag, ev.multiple, ev.ack);
            } else if (ev.kind == RPC_EVENT_RETURNED) {
                log_warning(LOG_RPC, "reply to %s was unroutable (the caller's reply queue is "
                            "gone), dropped", ev.returned_key);
            }
        }
    }
}

static void *
service_main(void *arg)
{
    struct rpc_service *svc = arg;
    const struct rpc_service_opts *o = &svc->opts;
    unsigned round = 0, index = 0;
    struct rpc_conn_opts copts = {
        .url = o->url,
        .heartbeat_s = o->heartbeat_s,
        .timeout_ms = 10000,
        .connection_name = svc->conn_name,
    };

    for (;;) {
        struct rpc_conn *c = NULL;
        struct agent_err err = {0};
        int r = rpc_conn_open(&copts, &index, &c, &err);

        if (r >= 0 && !o->publish_only) {
            r = setup_consumers(svc, c, &err);
            if (r < 0) {
                rpc_conn_close(c);
                c = NULL;
            }
        }
        if (r < 0) {
            int delay = rpc_retry_delay_s(o->retry_interval_s, o->retry_backoff_s,
                                          o->interval_max_s, round++);
            notify(svc, RPC_LINK_UNREACHABLE, NULL, &err, delay);
            if (wait_events(svc, -1, delay * 1000))
                break;
            continue;
        }
        round = 0;
        char desc[1024];
        if (o->publish_only)
            snprintf(desc, sizeof(desc), "%s, publishing only", rpc_conn_peer(c));
        else
            snprintf(desc, sizeof(desc), "%s, consuming %s, %s, %s", rpc_conn_peer(c),
                     o->topo.topic, svc->server_queue, svc->fanout_queue);
        notify(svc, RPC_LINK_CONNECTED, desc, NULL, 0);

        bool stop = serve(svc, c, &err) == 1;
        forget_declared(svc);
        requeue_inflight(svc);
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
        if (wait_events(svc, -1, delay * 1000))
            break;
    }

    /* Whoever still waits for a confirm will not get one. */
    pthread_mutex_lock(&svc->lock);
    svc->stopped = true;
    struct out_msg *m;
    while ((m = svc->outq.head)) {
        svc->outq.head = m->next;
        if (m->batch)
            m->batch->cancelled = true;
        settle(m, false);
    }
    while ((m = svc->inflight.head)) {
        svc->inflight.head = m->next;
        if (m->batch)
            m->batch->cancelled = true;
        settle(m, false);
    }
    svc->outq.tail = svc->inflight.tail = NULL;
    pthread_mutex_unlock(&svc->lock);
    return NULL;
}

/* Let every message of batch b in list l (locked) go on without b: published and confirmed
 * like a reply, nobody waiting for it. */
static void
detach_batch(struct msg_list *l, struct pub_batch *b)
{
    for (struct out_msg *m = l->head; m; m = m->next)
        if (m->batch == b)
            m->batch = NULL;
}

int
rpc_service_publish(struct rpc_service *svc, const struct rpc_outgoing *msgs, size_t n,
                    int timeout_ms, struct agent_err *err)
{
    struct pub_batch b = {.pending = (int)n};
    struct msg_list mine = {0};
    pthread_condattr_t ca;
    struct timespec deadline;
    int r = 0;

    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        struct out_msg *m = calloc(1, sizeof(*m));
        if (m) {
            m->exchange = strdup(msgs[i].exchange);
            m->routing_key = strdup(msgs[i].routing_key);
            m->body = util_strndup(msgs[i].body, msgs[i].len);
            m->len = msgs[i].len;
            m->declare_queue = msgs[i].declare_queue;
            m->batch = &b;
        }
        if (!m || !m->exchange || !m->routing_key || !m->body) {
            out_msg_free(m);
            while ((m = mine.head)) {
                mine.head = m->next;
                out_msg_free(m);
            }
            return -ENOMEM;
        }
        list_append(&mine, m);
    }

    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b.cond, &ca);
    pthread_condattr_destroy(&ca);
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }

    pthread_mutex_lock(&svc->lock);
    if (svc->stopped) {
        b.cancelled = true;
        b.pending = 0;
        struct out_msg *m;
        while ((m = mine.head)) {
            mine.head = m->next;
            out_msg_free(m);
        }
    } else {
        if (svc->outq.tail)
            svc->outq.tail->next = mine.head;
        else
            svc->outq.head = mine.head;
        svc->outq.tail = mine.tail;
        wake(svc->wake_fd);
    }
    while (b.pending > 0 && r == 0)
        r = pthread_cond_timedwait(&b.cond, &svc->lock, &deadline);
    if (b.pending > 0) {
        /* Timed out: the caller stops waiting, but what is left is still sent (after a
         * reconnection if need be), detached from b so the rpc thread never touches it again. */
        detach_batch(&svc->outq, &b);
        detach_batch(&svc->inflight, &b);
    }
    pthread_mutex_unlock(&svc->lock);
    pthread_cond_destroy(&b.cond);

    if (b.cancelled)
        return agent_err_set(err, -ECANCELED, "publish: the rpc service is stopping");
    if (b.pending > 0)
        return agent_err_set_retryable(err, -ETIMEDOUT, "publish: %d of %zu message(s) not "
                                       "confirmed by the broker within %d ms", b.pending, n,
                                       timeout_ms);
    if (b.nacked > 0)
        return agent_err_set_retryable(err, -EIO, "publish: the broker refused %d of %zu "
                                       "message(s)", b.nacked, n);
    return 0;
}

int
rpc_service_start(const struct rpc_service_opts *opts, struct rpc_service **ret_svc)
{
    struct rpc_service *svc = calloc(1, sizeof(*svc));
    char hex[33];
    int r;

    if (!svc)
        return -ENOMEM;
    svc->opts = *opts;
    svc->stop_fd = svc->wake_fd = -1;
    r = util_random_hex(hex, 16);
    if (r < 0)
        goto fail;
    snprintf(svc->conn_name, sizeof(svc->conn_name), "compute-agent:%s", opts->topo.server);
    snprintf(svc->server_queue, sizeof(svc->server_queue), "%s.%s", opts->topo.topic,
             opts->topo.server);
    snprintf(svc->fanout_exchange, sizeof(svc->fanout_exchange), "%s_fanout", opts->topo.topic);
    snprintf(svc->fanout_queue, sizeof(svc->fanout_queue), "%s_fanout_%s", opts->topo.topic, hex);
    pthread_mutex_init(&svc->lock, NULL);
    svc->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    svc->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (svc->stop_fd < 0 || svc->wake_fd < 0) {
        r = -errno;
        goto fail;
    }
    r = -pthread_create(&svc->thread, NULL, service_main, svc);
    if (r < 0)
        goto fail;
    *ret_svc = svc;
    return 0;

fail:
    if (svc->stop_fd >= 0)
        close(svc->stop_fd);
    if (svc->wake_fd >= 0)
        close(svc->wake_fd);
    free(svc);
    return r;
}

void
rpc_service_stop_consuming(struct rpc_service *svc)
{
    if (!svc || atomic_exchange(&svc->consume_stopped, true))
        return;
    wake(svc->wake_fd);
}

void
rpc_service_stop(struct rpc_service *svc)
{
    if (!svc)
        return;
    wake(svc->stop_fd);
    pthread_join(svc->thread, NULL);
    close(svc->stop_fd);
    close(svc->wake_fd);
    pthread_mutex_destroy(&svc->lock);
    free(svc);
}

size_t
rpc_library_versions(char *buf, size_t size)
{
    int n = snprintf(buf, size, "librabbitmq %s\njansson %s\n", rpc_amqp_library_version(),
                     jansson_version_str());
    return n < 0 ? 0 : (size_t)n;
}
