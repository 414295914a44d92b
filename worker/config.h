#pragma once
/* The agent's configuration: nova.conf syntax and nova's option names, read from one or more
 * --config-file paths (later files win, as oslo.config) through one option table. The result is
 * immutable after config_load() and shared read-only by every thread. */

#include <stdbool.h>
#include <stddef.h>

struct agent_err;
struct rpc_transport_url;

enum images_type {
    IMAGES_TYPE_QCOW2,
    IMAGES_TYPE_RBD,
    IMAGES_TYPE_MAX,
};

enum snapshot_format {
    SNAPSHOT_FORMAT_SOURCE, /* unset: same format as the instance disk (qcow2 → qcow2, rbd → raw) */
    SNAPSHOT_FORMAT_RAW,
    SNAPSHOT_FORMAT_QCOW2,
    SNAPSHOT_FORMAT_MAX,
};

enum notification_format {
    NOTIFICATION_FORMAT_UNVERSIONED,
    NOTIFICATION_FORMAT_VERSIONED,
    NOTIFICATION_FORMAT_BOTH,
    NOTIFICATION_FORMAT_MAX,
};

enum notify_on_state_change {
    NOTIFY_ON_STATE_CHANGE_NONE,
    NOTIFY_ON_STATE_CHANGE_VM_STATE,
    NOTIFY_ON_STATE_CHANGE_VM_AND_TASK_STATE,
    NOTIFY_ON_STATE_CHANGE_MAX,
};

struct agent_config {
    /* [DEFAULT] */
    char *host;
    char *transport_url; /* secret (holds the broker password): never log it, use `transport` */
    char *control_exchange;
    char *state_path;
    char *instances_path;
    long max_concurrent_snapshots; /* 0 = unlimited */
    long graceful_shutdown_timeout; /* s, after SIGTERM */
    char *instance_name_template;
    unsigned debug_mask; /* bit per log module: `debug = True` or `debug = rpc,rbd` */
    char *log_file;      /* NULL: stderr */

    /* [libvirt] */
    char *connection_uri;
    enum images_type images_type;
    char *images_rbd_pool;
    char *images_rbd_ceph_conf; /* "" = librados default */
    char *rbd_user;
    char *rbd_secret_uuid;
    enum snapshot_format snapshot_image_format;
    bool snapshot_compression;
    char *snapshots_directory;
    char *images_rbd_glance_pool; /* Glance's rbd pool when no base image location names it */
    int images_rbd_flatten;       /* enum flatten_policy (backends/backend.h) */

    /* [workarounds] */
    bool disable_libvirt_livesnapshot;

    /* [glance] */
    char **glance_api_servers; /* NULL-terminated; may be empty */
    long glance_num_retries;

    /* [oslo_messaging_rabbit] */
    bool amqp_durable_queues;
    bool amqp_auto_delete;
    bool rabbit_quorum_queue;
    long heartbeat_timeout_threshold; /* seconds, 0 disables heartbeats */
    long heartbeat_rate;
    long rabbit_qos_prefetch_count;
    long rabbit_retry_interval;
    long rabbit_retry_backoff;
    long rabbit_interval_max;
    bool rabbit_ha_queues;
    long rabbit_transient_queues_ttl;
    long rabbit_quorum_delivery_limit;
    long rabbit_quorum_max_memory_length;
    long rabbit_quorum_max_memory_bytes;
    bool direct_mandatory_flag;
    bool enable_cancel_on_failover;

    /* [oslo_messaging_notifications] */
    char **notification_drivers; /* NULL-terminated; empty = notifications off, as oslo */
    char **notification_topics;
    char *notification_transport_url; /* secret; "" = use transport_url */

    /* [notifications] */
    enum notification_format notification_format;
    char **versioned_notifications_topics;
    enum notify_on_state_change notify_on_state_change;

    /* Derived, not options. */
    struct rpc_transport_url *transport;              /* parsed transport_url */
    struct rpc_transport_url *notification_transport; /* parsed, or NULL = same as transport */
};

/* One row of the option table (exposed for --help-config, the example-config test and fuzzing). */
struct config_option_info {
    const char *section;
    const char *name;
    const char *type;     /* "string", "boolean", "integer", "choice", "list", "url", "debug" */
    const char *def;      /* default as written in a config file ("" = empty / unset) */
    const char *help;
    bool secret;
};

/* Number of options in the table, and row i (i < config_option_count()). */
size_t config_option_count(void);
const struct config_option_info *config_option_get(size_t i);

/* Find an option row by section and name; NULL if the agent does not know it. */
const struct config_option_info *config_option_find(const char *section, const char *name);

/* Read the files in order (later values win), apply defaults, resolve $name references to
 * [DEFAULT] options, validate. Unknown sections and options are ignored. On success returns 0
 * and *ret_cfg (caller frees with config_free()). On failure returns -errno and err says
 * "FILE:LINE: [section] option: reason" (or "FILE: reason" when the file cannot be read). */
int config_load(char *const *paths, size_t n_paths, struct agent_config **ret_cfg,
                struct agent_err *err);

/* Same, from in-memory ini text (for tests and the fuzzer); name is used in error messages. */
int config_load_string(const char *name, const char *text, struct agent_config **ret_cfg,
                       struct agent_err *err);

/* NULL-safe. */
void config_free(struct agent_config *cfg);

/* Write the effective configuration, one "[section] name = value" per option, secrets masked,
 * to fd. Returns 0 or -errno. */
int config_dump(const struct agent_config *cfg, int fd);

const char *images_type_to_string(enum images_type t);
const char *snapshot_format_to_string(enum snapshot_format f);
const char *notification_format_to_string(enum notification_format f);
const char *notify_on_state_change_to_string(enum notify_on_state_change n);
