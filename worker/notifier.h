#pragma once
/* The worker's side of notifications: the builders' options from the configuration, and the
 * publication of what they built through the rpc thread with broker confirms. */

struct agent_config;
struct agent_err;
struct rpc_notification;
struct rpc_notify_options;
struct rpc_service;

/* Fill *ret from cfg: control_exchange, host, drivers, topics, format, notify_on_state_change,
 * the image API base ([glance] api_servers' first entry) and instance_name_template. The strings
 * are borrowed from cfg. */
void notifier_options(const struct agent_config *cfg, struct rpc_notify_options *ret);

/* Publish v (NULL-terminated, as the builders return it) through svc and wait until the broker
 * confirmed every message or timeout_ms passed. An empty v succeeds at once. Returns 0 or the
 * error of rpc_service_publish(), with err filled. */
int notifier_publish(struct rpc_service *svc, struct rpc_notification *const *v, int timeout_ms,
                     struct agent_err *err);
