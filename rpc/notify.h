#pragma once
/* Notification builders: pure functions that turn a parsed snapshot request (struct rpc_request)
 * and a few facts the worker knows (current instance state, the failure) into the exact AMQP
 * bodies nova-compute 26 (Zed) with oslo.messaging 14 publishes for the same events, so that a
 * consumer (ceilometer, searchlight, an audit tap) cannot tell the agent from nova-compute:
 *
 *   rpc_notify_snapshot()        compute.instance.snapshot.start/.end (legacy) and
 *                                instance.snapshot.start/.end (versioned)
 *   rpc_notify_instance_update() compute.instance.update (legacy) and instance.update (versioned)
 *   rpc_notify_error()           snapshot_instance (legacy, ERROR) and compute.exception
 *                                (versioned, ERROR), as nova's @wrap_exception sends them
 *
 * No I/O besides the clock and the random source (both injectable), no logging, no AMQP: the rpc
 * thread publishes the result. Each notification goes to options.control_exchange with routing
 * key "<topic>.<priority in lower case>", once per configured topic, with these AMQP basic
 * properties (what kombu/py-amqp set for oslo.messaging, see tests/fixtures/nova/wire-rabbitmq):
 *
 *   content_type     "application/json"  (oslo consumers drop a message without it)
 *   content_encoding "utf-8"
 *   delivery_mode    2 (persistent)
 *   priority         0
 *   headers          an empty field table (flag set, no entries)
 *   nothing else: no message_id, correlation_id, reply_to, expiration, timestamp, type, app_id.
 *
 * Bodies are byte-identical to Python's json.dumps output (", " and ": " separators,
 * ensure_ascii, key order as nova builds its dicts, floats as Python's repr), the oslo 2.0
 * envelope {"oslo.version": "2.0", "oslo.message": "<inner JSON as a string>"} for the
 * messagingv2 driver, the bare inner message for the (1.0) messaging driver. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct agent_err;
struct rpc_kv;
struct rpc_request;

#define RPC_NOTIFY_CONTENT_TYPE "application/json"
#define RPC_NOTIFY_CONTENT_ENCODING "utf-8"
#define RPC_NOTIFY_DELIVERY_MODE 2
#define RPC_NOTIFY_PRIORITY 0

/* One message to publish. All strings are owned; body is NUL-terminated for convenience
 * (body_len does not count the NUL; bodies are pure ASCII). */
struct rpc_notification {
    char *exchange;    /* options.control_exchange, "nova" */
    char *routing_key; /* "notifications.info", "versioned_notifications.error", … */
    char *body;
    size_t body_len;
    char *event_type;  /* "compute.instance.snapshot.start", "instance.update", … */
    char *priority;    /* "INFO" or "ERROR" */
};

/* Free one notification; NULL-safe. */
void rpc_notification_free(struct rpc_notification *n);

/* Free a NULL-terminated array of notifications as the builders return it; NULL-safe. */
void rpc_notification_freev(struct rpc_notification **v);

/* For _cleanup_(rpc_notification_freevp) struct rpc_notification **v = NULL. */
static inline void
rpc_notification_freevp(struct rpc_notification ***v)
{
    rpc_notification_freev(*v);
}

/* Number of entries in a NULL-terminated notification array (NULL counts as empty). */
size_t rpc_notification_count(struct rpc_notification *const *v);

/* [notifications]notification_format. */
enum rpc_notify_format {
    RPC_NOTIFY_FORMAT_UNVERSIONED, /* nova's default: legacy only */
    RPC_NOTIFY_FORMAT_VERSIONED,
    RPC_NOTIFY_FORMAT_BOTH,
    RPC_NOTIFY_FORMAT_MAX,
};

/* "unversioned", "versioned", "both"; NULL for an out-of-range value. */
const char *rpc_notify_format_to_string(enum rpc_notify_format f);

/* Parse an option value (exact, as oslo.config choices). 0 and *ret_f, or -EINVAL. */
int rpc_notify_format_from_string(const char *s, enum rpc_notify_format *ret_f);

/* [notifications]notify_on_state_change. */
enum rpc_notify_state_change {
    RPC_NOTIFY_STATE_CHANGE_NONE, /* unset (nova's default): no instance.update at all */
    RPC_NOTIFY_STATE_CHANGE_VM_STATE,
    RPC_NOTIFY_STATE_CHANGE_VM_AND_TASK_STATE,
    RPC_NOTIFY_STATE_CHANGE_MAX,
};

/* "" (none), "vm_state", "vm_and_task_state"; NULL for an out-of-range value. */
const char *rpc_notify_state_change_to_string(enum rpc_notify_state_change s);

/* Parse an option value: NULL or "" is NONE. 0 and *ret_s, or -EINVAL. */
int rpc_notify_state_change_from_string(const char *s, enum rpc_notify_state_change *ret_s);

enum rpc_notify_phase {
    RPC_NOTIFY_PHASE_START,
    RPC_NOTIFY_PHASE_END,
    RPC_NOTIFY_PHASE_MAX,
};

/* "start", "end"; NULL for an out-of-range value. */
const char *rpc_notify_phase_to_string(enum rpc_notify_phase p);

/* Everything the builders need from the configuration (all borrowed for the duration of a call;
 * a zeroed struct plus control_exchange and host is nova's default configuration with no
 * notification driver, which sends nothing). */
struct rpc_notify_options {
    const char *control_exchange; /* [DEFAULT]control_exchange, nova's default "nova" */
    const char *host;             /* [DEFAULT]host: publisher "compute.<host>" (legacy) and
                                   * "nova-compute:<host>" (versioned) */
    /* [oslo_messaging_notifications]driver (NULL-terminated, NULL = empty). "messagingv2" sends
     * the 2.0 envelope, "messaging" the bare 1.0 message (before messagingv2 if both are set, in
     * oslo's entry-point order); every other driver (noop, log, routing, test) puts nothing on
     * the bus. Empty or only noop: nothing is sent. */
    char *const *drivers;
    char *const *topics;           /* [oslo_messaging_notifications]topics,
                                    * nova's default {"notifications"} */
    char *const *versioned_topics; /* [notifications]versioned_notifications_topics,
                                    * nova's default {"versioned_notifications"} */
    enum rpc_notify_format format;
    enum rpc_notify_state_change notify_on_state_change;
    /* The image service endpoint nova's glance.API().generate_image_url() starts from: an entry
     * of [glance]api_servers as configured, or the catalog endpoint with a trailing /vN removed.
     * Legacy payloads carry "<image_api_base>/images/<image_ref>". NULL: the bare image_ref,
     * nova's own fallback when it cannot find an endpoint. */
    const char *image_api_base;
    const char *audit_period;           /* [DEFAULT]instance_usage_audit_period, NULL: "month" */
    const char *instance_name_template; /* [DEFAULT]instance_name_template,
                                         * NULL: "instance-%08x" */
    /* The clock: microseconds since the Unix epoch, UTC. NULL: CLOCK_REALTIME. Each builder reads
     * it in the order nova calls utcnow() (see the builders), so tests can pin every value. */
    int64_t (*clock_us)(void *userdata);
    /* 16 random bytes for a version-4 UUID (the builder sets the version and variant bits, as
     * Python's uuid4() does); returns 0 or a negative errno. NULL: getrandom(2). Called for each
     * message_id, then for each published copy's _unique_id. */
    int (*random_uuid)(void *userdata, uint8_t ret_bytes[16]);
    void *userdata; /* passed to clock_us and random_uuid */
};

/* The instance's state at the moment a notification is sent: in nova the Instance object has been
 * saved and changed since the cast was made (task_state moves image_snapshot_pending →
 * image_snapshot → image_pending_upload → image_uploading → None, power_state is refreshed from the
 * hypervisor, every save moves updated_at). Every member is used as given. */
struct rpc_instance_state {
    const char *vm_state;   /* "active", …; NULL is None */
    const char *task_state; /* "image_snapshot", …; NULL is None */
    int power_state;        /* nova power_state code: 0 pending, 1 running, 3 paused, 4 shutdown,
                             * 6 crashed, 7 suspended */
    const char *updated_at; /* ISO 8601 as in an object primitive ("2024-05-06T09:10:11Z", e.g.
                             * from the conductor's reply to Instance.save()); NULL is None */
};

/* Fill *ret_st with the state the request carries (args.instance of the cast), for the worker to
 * adjust. The strings are borrowed from req, valid until rpc_request_free(req). Returns 0, or
 * -EINVAL (err filled) if req has no Instance primitive. */
int rpc_instance_state_from_request(const struct rpc_request *req,
                                    struct rpc_instance_state *ret_st, struct agent_err *err);

/* The failure behind an error notification: what nova's @wrap_exception reads off the Python
 * exception. All borrowed. */
struct rpc_notify_fault {
    const char *exception;        /* class name: "ImageNotFound" */
    const char *exception_module; /* "nova.exception"; NULL or "builtins" for a Python built-in */
    const char *message;          /* str(exception): "Image … could not be found." */
    /* For nova exceptions (exception_module starting with "nova."): the constructor keyword
     * arguments in order, without "code" (the legacy payload repeats them), and the code
     * (NovaException.code: 500 by default, 404 for the NotFound family, 400 for Invalid). */
    const struct rpc_kv *kwargs;
    size_t n_kwargs;
    int code;
    /* Where it was raised, for the versioned ExceptionPayload: "nova.compute.manager",
     * "snapshot_instance". */
    const char *module_name;
    const char *function_name;
    /* The traceback text as Python's ','.join(traceback.format_exception(…)); NULL: a minimal one
     * is written, naming module_name/function_name and the exception line. */
    const char *traceback;
};

/* compute.instance.snapshot.<phase> (legacy: nova.compute.utils.notify_about_instance_usage)
 * then instance.snapshot.<phase> (versioned: notify_about_instance_snapshot, payload
 * InstanceActionSnapshotPayload 1.9 with snapshot_image_id = req->image_id), as
 * ComputeManager._snapshot_instance sends them: with the request context elevated (is_admin,
 * role "admin" added), published by "compute.<host>" / "nova-compute:<host>".
 * Clock reads: legacy context, legacy timestamp, then the same two for the versioned message.
 *
 * On success returns 0 and *ret_v, a NULL-terminated array (possibly empty) the caller frees with
 * rpc_notification_freev(), in publishing order. Errors, err filled: -EINVAL (req has no Instance
 * primitive, or it holds a value nova itself could not serialize), -ENOMEM, or the random
 * source's error. */
int rpc_notify_snapshot(const struct rpc_notify_options *o, const struct rpc_request *req,
                        const struct rpc_instance_state *st, enum rpc_notify_phase phase,
                        struct rpc_notification ***ret_v, struct agent_err *err);

/* compute.instance.update then instance.update for an instance going from old_st to new_st, as
 * nova.notifications.base.send_update() (Instance.save()) decides and builds them:
 *   - notify_on_state_change NONE: nothing;
 *   - vm_state changed, or task_state changed with VM_AND_TASK_STATE: a state-change update
 *     (old_state/state/old_task_state/new_task_state; a None among them is replaced by the new
 *     state's value, nova's _compute_states_payload quirk);
 *   - otherwise (e.g. a task_state change with VM_STATE): nova still sends a plain update whose
 *     four state fields are all the new state.
 * The payload describes the instance in new_st; audit_period is the current
 * instance_usage_audit_period ([beginning of the period, now]). tags are the primitive's, [] when
 * absent (nova's conductor would read them from its database).
 * In nova these come from nova-conductor (Instance.save() runs there), published by
 * "compute.<conductor host>" and "nova-compute:<conductor host>" with the caller's (not elevated)
 * context. The agent sends them itself, as "compute.<host>" / "nova-compute:<host>": only use this
 * for state changes that do not go through the conductor's Instance.save(), which would notify on
 * its own.
 * Clock reads: audit "now" (period start), audit end, legacy context, legacy timestamp, versioned
 * context, versioned timestamp. Returns as rpc_notify_snapshot(). */
int rpc_notify_instance_update(const struct rpc_notify_options *o, const struct rpc_request *req,
                               const struct rpc_instance_state *old_st,
                               const struct rpc_instance_state *new_st,
                               struct rpc_notification ***ret_v, struct agent_err *err);

/* What nova's @wrap_exception(service='compute', binary='nova-compute') on snapshot_instance
 * sends when the method raises: the legacy event "snapshot_instance" at ERROR with payload
 * {"exception": repr(exception), "args": {<the cast's args; the Instance as
 * jsonutils.to_primitive renders the object>}}, then the versioned compute.exception
 * (ExceptionPayload 1.1) at ERROR, both with the caller's (not elevated) context. st is the
 * instance at that point (reverts_task_state has already set task_state to None). One deliberate
 * difference: nova's rendering of the Instance copies its sub-objects' RequestContext, auth token
 * and service catalog included, into args.instance.info_cache._context (and each security
 * group's); the agent writes null there, as nova does for an object without a context.
 * Clock reads: legacy context, legacy timestamp, versioned context, versioned timestamp. Returns as
 * rpc_notify_snapshot(). */
int rpc_notify_error(const struct rpc_notify_options *o, const struct rpc_request *req,
                     const struct rpc_instance_state *st, const struct rpc_notify_fault *fault,
                     struct rpc_notification ***ret_v, struct agent_err *err);
