/* Bridges the notification builders (rpc/notify.c) and the rpc thread (rpc/service.c) for the
 * worker: maps the nova.conf options onto the builders' options and publishes a built batch,
 * declaring each topic's default queue as oslo's notifier does, and returns only once the broker
 * confirmed the batch. */

#include "notifier.h"

#include <errno.h>
#include <stdlib.h>

#include "cleanup.h"
#include "config.h"
#include "err.h"
#include "notify.h"
#include "service.h"

void
notifier_options(const struct agent_config *cfg, struct rpc_notify_options *ret)
{
    static const enum rpc_notify_format formats[NOTIFICATION_FORMAT_MAX] = {
        [NOTIFICATION_FORMAT_UNVERSIONED] = RPC_NOTIFY_FORMAT_UNVERSIONED,
        [NOTIFICATION_FORMAT_VERSIONED] = RPC_NOTIFY_FORMAT_VERSIONED,
        [NOTIFICATION_FORMAT_BOTH] = RPC_NOTIFY_FORMAT_BOTH,
    };
    static const enum rpc_notify_state_change changes[NOTIFY_ON_STATE_CHANGE_MAX] = {
        [NOTIFY_ON_STATE_CHANGE_NONE] = RPC_NOTIFY_STATE_CHANGE_NONE,
        [NOTIFY_ON_STATE_CHANGE_VM_STATE] = RPC_NOTIFY_STATE_CHANGE_VM_STATE,
        [NOTIFY_ON_STATE_CHANGE_VM_AND_TASK_STATE] = RPC_NOTIFY_STATE_CHANGE_VM_AND_TASK_STATE,
    };

    *ret = (struct rpc_notify_options){
        .control_exchange = cfg->control_exchange,
        .host = cfg->host,
        .drivers = cfg->notification_drivers,
        .topics = cfg->notification_topics,
        .versioned_topics = cfg->versioned_notifications_topics,
        .format = formats[cfg->notification_format],
        .notify_on_state_change = changes[cfg->notify_on_state_change],
        .image_api_base = cfg->glance_api_servers ? cfg->glance_api_servers[0] : NULL,
        .instance_name_template = cfg->instance_name_template,
    };
}

int
notifier_publish(struct rpc_service *svc, struct rpc_notification *const *v, int timeout_ms,
                 struct agent_err *err)
{
    size_t n = rpc_notification_count(v);
    _cleanup_free_ struct rpc_outgoing *out = NULL;

    if (n == 0)
        return 0;
    out = calloc(n, sizeof(*out));
    if (!out)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        out[i] = (struct rpc_outgoing){
            .exchange = v[i]->exchange,
            .routing_key = v[i]->routing_key,
            .body = v[i]->body,
            .len = v[i]->body_len,
            .declare_queue = true,
        };
    return rpc_service_publish(svc, out, n, timeout_ms, err);
}
