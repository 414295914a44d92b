/* nova.conf reader. One table lists every option the agent understands with its section, nova
 * name, type, default and help; libinih feeds each "name = value" line through it. Values are
 * validated as they are read so an error names the file and line; after the last file, $name
 * references to [DEFAULT] options are resolved (as oslo.config does for $state_path) and the
 * typed struct agent_config is built. Options the agent does not know are ignored: operators pass
 * their whole nova.conf. */

#include "config.h"

#include <errno.h>
#include <ini.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "cleanup.h"
#include "err.h"
#include "log.h"
#include "transport_url.h"
#include "util.h"

enum opt_type {
    OPT_STR,
    OPT_HOST,
    OPT_BOOL,
    OPT_INT,
    OPT_CHOICE,
    OPT_LIST,
    OPT_MULTI, /* a list that may repeat within a file, each line adding to it (oslo MultiStrOpt) */
    OPT_URL,
    OPT_DEBUG,
    OPT_TYPE_MAX,
};

static const char *const opt_type_names[OPT_TYPE_MAX] = {
    [OPT_STR] = "string",   [OPT_HOST] = "hostname", [OPT_BOOL] = "boolean",
    [OPT_INT] = "integer",  [OPT_CHOICE] = "choice", [OPT_LIST] = "list",
    [OPT_MULTI] = "multi",  [OPT_URL] = "url",       [OPT_DEBUG] = "debug",
};

struct choice {
    const char *name;
    int value;
};

struct option {
    struct config_option_info info;
    enum opt_type type;
    size_t offset;
    long min, max;               /* OPT_INT */
    const struct choice *choices; /* OPT_CHOICE, terminated by a NULL name */
    bool allow_empty;            /* OPT_URL: "" accepted (means "same as transport_url") */
};

static const struct choice images_type_choices[] = {
    {"qcow2", IMAGES_TYPE_QCOW2},
    {"default", IMAGES_TYPE_QCOW2}, /* nova's "default": qcow2 when use_cow_images, the default */
    {"rbd", IMAGES_TYPE_RBD},
    {NULL, 0},
};

static const struct choice snapshot_format_choices[] = {
    {"", SNAPSHOT_FORMAT_SOURCE},
    {"raw", SNAPSHOT_FORMAT_RAW},
    {"qcow2", SNAPSHOT_FORMAT_QCOW2},
    {NULL, 0},
};

static const struct choice flatten_choices[] = {
    {"sync", FLATTEN_SYNC},
    {"background", FLATTEN_BACKGROUND},
    {"never", FLATTEN_NEVER},
    {NULL, 0},
};

static const struct choice notification_format_choices[] = {
    {"unversioned", NOTIFICATION_FORMAT_UNVERSIONED},
    {"versioned", NOTIFICATION_FORMAT_VERSIONED},
    {"both", NOTIFICATION_FORMAT_BOTH},
    {NULL, 0},
};

static const struct choice notify_on_state_change_choices[] = {
    {"", NOTIFY_ON_STATE_CHANGE_NONE},
    {"None", NOTIFY_ON_STATE_CHANGE_NONE},
    {"vm_state", NOTIFY_ON_STATE_CHANGE_VM_STATE},
    {"vm_and_task_state", NOTIFY_ON_STATE_CHANGE_VM_AND_TASK_STATE},
    {NULL, 0},
};

#define OFF(field) offsetof(struct agent_config, field)
#define O(sec, nm, ty, field, def_, help_) \
    {.info = {sec, nm, NULL, def_, help_, false}, .type = ty, .offset = OFF(field)}

/* The one table. Defaults are written as they would be in a config file and parsed by the same
 * code as file values, so a default can never be invalid (the unit tests load an empty file). */
static const struct option options[] = {
    O("DEFAULT", "host", OPT_HOST, host, "",
      "Name of this compute host, as nova-compute's; its RPC queue is compute.<host>. "
      "Empty: the machine's hostname"),
    {.info = {"DEFAULT", "transport_url", NULL, "rabbit://guest:guest@localhost:5672/",
              "RabbitMQ URL, rabbit://user:pass@host:port[,user:pass@host2:port]/vhost; hosts "
              "are tried in turn",
              true},
     .type = OPT_URL,
     .offset = OFF(transport_url)},
    O("DEFAULT", "control_exchange", OPT_STR, control_exchange, "nova",
      "Topic exchange RPC casts arrive on and notifications go to"),
    O("DEFAULT", "state_path", OPT_STR, state_path, "/var/lib/nova",
      "Top-level directory for the agent's state (journal, locks)"),
    O("DEFAULT", "instances_path", OPT_STR, instances_path, "$state_path/instances",
      "Where instance disks live"),
    {.info = {"DEFAULT", "max_concurrent_snapshots", NULL, "5",
              "Snapshots run at once; excess requests wait in order. 0 = unlimited", false},
     .type = OPT_INT,
     .offset = OFF(max_concurrent_snapshots),
     .min = 0,
     .max = 1000},
    {.info = {"DEFAULT", "graceful_shutdown_timeout", NULL, "60",
              "Seconds running snapshots get to finish after SIGTERM; what is still running "
              "then is left to the journal and resumed or cleaned up by the next start", false},
     .type = OPT_INT,
     .offset = OFF(graceful_shutdown_timeout),
     .min = 0,
     .max = 86400},
    O("DEFAULT", "instance_name_template", OPT_STR, instance_name_template, "instance-%08x",
      "Template for libvirt domain names, from the instance id"),
    O("DEFAULT", "debug", OPT_DEBUG, debug_mask, "False",
      "True for debug logging in every module, or a comma-separated list of modules "
      "(main,config,rpc,worker,qcow2,rbd,glance,journal)"),
    O("DEFAULT", "log_file", OPT_STR, log_file, "", "Append log lines to this file (empty: stderr)"),

    O("libvirt", "connection_uri", OPT_STR, connection_uri, "qemu:///system",
      "libvirt connection URI"),
    {.info = {"libvirt", "images_type", NULL, "default",
              "Instance disk type: qcow2 (or default) or rbd", false},
     .type = OPT_CHOICE,
     .offset = OFF(images_type),
     .choices = images_type_choices},
    O("libvirt", "images_rbd_pool", OPT_STR, images_rbd_pool, "rbd",
      "Ceph pool holding instance disks when images_type = rbd"),
    O("libvirt", "images_rbd_ceph_conf", OPT_STR, images_rbd_ceph_conf, "",
      "ceph.conf path (empty: librados default)"),
    O("libvirt", "rbd_user", OPT_STR, rbd_user, "", "Ceph (cephx) user for RBD access"),
    O("libvirt", "rbd_secret_uuid", OPT_STR, rbd_secret_uuid, "",
      "libvirt secret holding rbd_user's key"),
    {.info = {"libvirt", "snapshot_image_format", NULL, "",
              "Format of snapshot images: raw or qcow2 (empty: the disk's own)", false},
     .type = OPT_CHOICE,
     .offset = OFF(snapshot_image_format),
     .choices = snapshot_format_choices},
    O("libvirt", "snapshot_compression", OPT_BOOL, snapshot_compression, "False",
      "Compress qcow2 snapshot images"),
    O("libvirt", "snapshots_directory", OPT_STR, snapshots_directory,
      "$instances_path/snapshots", "Scratch space for live snapshots"),

    O("libvirt", "images_rbd_glance_pool", OPT_STR, images_rbd_glance_pool, "",
      "Glance's rbd pool in this Ceph cluster, for direct snapshots when the base image has no "
      "rbd location to take it from (empty: only from the base image, as nova)"),
    {.info = {"libvirt", "images_rbd_flatten", NULL, "background",
              "Direct rbd snapshots: flatten the clone before the image goes active (sync, "
              "nova's way), after it (background), or never",
              false},
     .type = OPT_CHOICE,
     .offset = OFF(images_rbd_flatten),
     .choices = flatten_choices},

    O("workarounds", "disable_libvirt_livesnapshot", OPT_BOOL, disable_libvirt_livesnapshot,
      "False", "Snapshot running guests cold (managed save, read, restore)"),

    O("glance", "api_servers", OPT_LIST, glance_api_servers, "",
      "Glance endpoints, http://host:port, comma-separated, tried in turn"),
    {.info = {"glance", "num_retries", NULL, "3",
              "Retries of a Glance request that failed before any byte was sent", false},
     .type = OPT_INT,
     .offset = OFF(glance_num_retries),
     .min = 0,
     .max = 100},

    O("oslo_messaging_rabbit", "amqp_durable_queues", OPT_BOOL, amqp_durable_queues, "False",
      "Declare queues and exchanges durable (must match the deployment)"),
    O("oslo_messaging_rabbit", "amqp_auto_delete", OPT_BOOL, amqp_auto_delete, "False",
      "Declare queues and exchanges auto-delete (must match the deployment)"),
    O("oslo_messaging_rabbit", "rabbit_quorum_queue", OPT_BOOL, rabbit_quorum_queue, "False",
      "Use quorum queues (must match the deployment)"),
    {.info = {"oslo_messaging_rabbit", "heartbeat_timeout_threshold", NULL, "60",
              "Seconds without a broker heartbeat before the connection is dead; 0 disables",
              false},
     .type = OPT_INT,
     .offset = OFF(heartbeat_timeout_threshold),
     .min = 0,
     .max = 3600},
    {.info = {"oslo_messaging_rabbit", "heartbeat_rate", NULL, "2",
              "Heartbeats sent per heartbeat_timeout_threshold", false},
     .type = OPT_INT,
     .offset = OFF(heartbeat_rate),
     .min = 1,
     .max = 100},
    {.info = {"oslo_messaging_rabbit", "rabbit_qos_prefetch_count", NULL, "0",
              "Unacknowledged deliveries the broker may send ahead; 0 = no limit", false},
     .type = OPT_INT,
     .offset = OFF(rabbit_qos_prefetch_count),
     .min = 0,
     .max = 65535},
    {.info = {"oslo_messaging_rabbit", "rabbit_retry_interval", NULL, "1",
              "Seconds before the first reconnection attempt", false},
     .type = OPT_INT,
     .offset = OFF(rabbit_retry_interval),
     .min = 1,
     .max = 3600},
    {.info = {"oslo_messaging_rabbit", "rabbit_retry_backoff", NULL, "2",
              "Seconds added to the delay after each failed reconnection round", false},
     .type = OPT_INT,
     .offset = OFF(rabbit_retry_backoff),
     .min = 0,
     .max = 3600},
    {.info = {"oslo_messaging_rabbit", "rabbit_interval_max", NULL, "30",
              "Longest delay between reconnection attempts, seconds", false},
     .type = OPT_INT,
     .offset = OFF(rabbit_interval_max),
     .min = 1,
     .max = 3600},

    O("oslo_messaging_rabbit", "rabbit_ha_queues", OPT_BOOL, rabbit_ha_queues, "False",
      "Declare queues with x-ha-policy all (classic mirrored queues)"),
    {.info = {"oslo_messaging_rabbit", "rabbit_transient_queues_ttl", NULL, "1800",
              "Seconds an unused fanout queue lives (x-expires); 0 = forever", false},
     .type = OPT_INT,
     .offset = OFF(rabbit_transient_queues_ttl),
     .min = 0,
     .max = 2147483},
    {.info = {"oslo_messaging_rabbit", "rabbit_quorum_delivery_limit", NULL, "0",
              "Quorum queues: x-delivery-limit (0 = unset)", false},
     .type = OPT_INT,
     .offset = OFF(rabbit_quorum_delivery_limit),
     .min = 0,
     .max = 2147483647},
    {.info = {"oslo_messaging_rabbit", "rabbit_quorum_max_memory_length", NULL, "0",
              "Quorum queues: x-max-in-memory-length (0 = unset)", false},
     .type = OPT_INT,
     .offset = OFF(rabbit_quorum_max_memory_length),
     .min = 0,
     .max = 2147483647},
    {.info = {"oslo_messaging_rabbit", "rabbit_quorum_max_memory_bytes", NULL, "0",
              "Quorum queues: x-max-in-memory-bytes (0 = unset)", false},
     .type = OPT_INT,
     .offset = OFF(rabbit_quorum_max_memory_bytes),
     .min = 0,
     .max = 2147483647},
    O("oslo_messaging_rabbit", "direct_mandatory_flag", OPT_BOOL, direct_mandatory_flag, "True",
      "Publish RPC replies with the mandatory flag (an unroutable reply is reported)"),
    O("oslo_messaging_rabbit", "enable_cancel_on_failover", OPT_BOOL, enable_cancel_on_failover,
      "False", "Consume with x-cancel-on-ha-failover"),

    O("oslo_messaging_notifications", "driver", OPT_MULTI, notification_drivers, "",
      "Notification drivers: messagingv2, messaging, log, noop (empty: none, as oslo)"),
    O("oslo_messaging_notifications", "topics", OPT_LIST, notification_topics, "notifications",
      "Topics for legacy notifications (routing key <topic>.<priority>)"),
    {.info = {"oslo_messaging_notifications", "transport_url", NULL, "",
              "Broker for notifications (empty: [DEFAULT] transport_url)", true},
     .type = OPT_URL,
     .offset = OFF(notification_transport_url),
     .allow_empty = true},

    {.info = {"notifications", "notification_format", NULL, "unversioned",
              "unversioned, versioned or both", false},
     .type = OPT_CHOICE,
     .offset = OFF(notification_format),
     .choices = notification_format_choices},
    O("notifications", "versioned_notifications_topics", OPT_LIST,
      versioned_notifications_topics, "versioned_notifications",
      "Topics for versioned notifications"),
    {.info = {"notifications", "notify_on_state_change", NULL, "",
              "Send instance.update on state changes: empty, vm_state or vm_and_task_state",
              false},
     .type = OPT_CHOICE,
     .offset = OFF(notify_on_state_change),
     .choices = notify_on_state_change_choices},
};

static const char *const notification_driver_names[] = {"messagingv2", "messaging", "log", "noop",
                                                        "test"};

size_t
config_option_count(void)
{
    return ELEMENTSOF(options);
}

const struct config_option_info *
config_option_get(size_t i)
{
    static struct config_option_info infos[ELEMENTSOF(options)];
    static bool filled;

    if (i >= ELEMENTSOF(options))
        return NULL;
    /* The info rows are static and the type name is derived; filling them twice writes the same
     * values, so concurrent first calls are harmless. */
    if (!filled) {
        for (size_t k = 0; k < ELEMENTSOF(options); k++) {
            infos[k] = options[k].info;
            infos[k].type = opt_type_names[options[k].type];
        }
        filled = true;
    }
    return &infos[i];
}

static const struct option *
find_option(const char *section, const char *name)
{
    for (size_t i = 0; i < ELEMENTSOF(options); i++)
        if (strcmp(options[i].info.section, section) == 0 && strcmp(options[i].info.name, name) == 0)
            return &options[i];
    return NULL;
}

const struct config_option_info *
config_option_find(const char *section, const char *name)
{
    const struct option *o = find_option(section, name);
    return o ? config_option_get((size_t)(o - options)) : NULL;
}

#define FIELD(cfg, o, type) ((type *)((char *)(cfg) + (o)->offset))

static int
choice_parse(const struct option *o, const char *v, int *ret)
{
    for (const struct choice *c = o->choices; c->name; c++)
        if (strcmp(c->name, v) == 0) {
            *ret = c->value;
            return 0;
        }
    return -EINVAL;
}

static void
choice_list(const struct option *o, char *buf, size_t size)
{
    size_t n = 0;
    buf[0] = '\0';
    for (const struct choice *c = o->choices; c->name && n < size; c++)
        n += (size_t)snprintf(buf + n, size - n, "%s'%s'", n ? ", " : "", c->name);
}

/* Parse value for option o and store it in cfg (replacing what was there). On a bad value returns
 * -EINVAL and writes the reason to why. */
static int
opt_set(const struct option *o, struct agent_config *cfg, const char *v, char *why, size_t whylen)
{
    int r;

    switch (o->type) {
    case OPT_STR:
    case OPT_HOST:
    case OPT_URL: {
        if (o->type == OPT_HOST) {
            for (const char *p = v; *p; p++)
                if (*p == ' ' || *p == '\t' || *p == '/' || *p == '#') {
                    snprintf(why, whylen, "'%s' is not a valid host name", v);
                    return -EINVAL;
                }
        }
        if (o->type == OPT_URL && !(o->allow_empty && !*v)) {
            struct agent_err e = {0};
            struct rpc_transport_url *u = NULL;
            r = rpc_transport_url_parse(v, &u, &e);
            rpc_transport_url_free(u);
            if (r < 0) {
                /* The reason never quotes the URL: it may hold a password. */
                snprintf(why, whylen, "%s", e.msg[0] ? e.msg : strerror(-r));
                return r == -ENOMEM ? r : -EINVAL;
            }
        }
        char *d = strdup(v);
        if (!d)
            return -ENOMEM;
        free(*FIELD(cfg, o, char *));
        *FIELD(cfg, o, char *) = d;
        return 0;
    }
    case OPT_BOOL:
        if (util_parse_bool(v, FIELD(cfg, o, bool)) < 0) {
            snprintf(why, whylen, "'%s' is not a boolean (true/false)", v);
            return -EINVAL;
        }
        return 0;
    case OPT_INT: {
        long n;
        r = util_parse_long(v, o->min, o->max, &n);
        if (r < 0) {
            if (r == -ERANGE)
                snprintf(why, whylen, "%s is out of range [%ld, %ld]", v, o->min, o->max);
            else
                snprintf(why, whylen, "'%s' is not an integer", v);
            return -EINVAL;
        }
        *FIELD(cfg, o, long) = n;
        return 0;
    }
    case OPT_CHOICE: {
        int c;
        if (choice_parse(o, v, &c) < 0) {
            char list[256];
            choice_list(o, list, sizeof(list));
            snprintf(why, whylen, "'%s' is not one of %s", v, list);
            return -EINVAL;
        }
        *FIELD(cfg, o, int) = c;
        return 0;
    }
    case OPT_LIST:
    case OPT_MULTI: {
        char **l = NULL;
        r = util_split(v, ',', &l);
        if (r < 0)
            return r;
        if (o->offset == OFF(notification_drivers)) {
            for (size_t i = 0; l[i]; i++) {
                bool ok = false;
                for (size_t k = 0; k < ELEMENTSOF(notification_driver_names); k++)
                    ok = ok || strcmp(l[i], notification_driver_names[k]) == 0;
                if (!ok) {
                    snprintf(why, whylen, "unsupported notification driver '%s'", l[i]);
                    util_strv_free(l);
                    return -EINVAL;
                }
            }
        }
        util_strv_free(*FIELD(cfg, o, char **));
        *FIELD(cfg, o, char **) = l;
        return 0;
    }
    case OPT_DEBUG: {
        bool b;
        unsigned mask = 0;
        if (util_parse_bool(v, &b) == 0) {
            *FIELD(cfg, o, unsigned) = b ? (1u << LOG_MODULE_MAX) - 1 : 0;
            return 0;
        }
        _cleanup_(util_strv_freep) char **l = NULL;
        r = util_split(v, ',', &l);
        if (r < 0)
            return r;
        for (size_t i = 0; l[i]; i++) {
            int m = log_module_from_string(l[i]);
            if (m < 0) {
                snprintf(why, whylen, "'%s' is neither a boolean nor a module name", l[i]);
                return -EINVAL;
            }
            mask |= 1u << m;
        }
        *FIELD(cfg, o, unsigned) = mask;
        return 0;
    }
    case OPT_TYPE_MAX:
        break;
    }
    return -EINVAL;
}

struct raw_value {
    char *value;      /* as written (before $-interpolation); NULL = default */
    const char *file; /* borrowed: where the value came from, for messages */
};

struct load_ctx {
    struct raw_value raw[ELEMENTSOF(options)];
    struct agent_config *scratch; /* values are parsed into it once just to validate them */
    const char *file;
    char why[AGENT_ERR_MSG_MAX];
    int error; /* first error in this file: -errno */
};

/* libinih callback: returns 0 (an error at this line) for a bad value of a known option. */
static int
config_ini_line(void *user, const char *section, const char *name, const char *value)
{
    struct load_ctx *ctx = user;
    const struct option *o = find_option(section, name);
    char why[AGENT_ERR_MSG_MAX - 128];
    size_t idx;
    int r;

    if (!o) {
        log_debug(LOG_CONFIG, "%s: ignoring unknown option [%s] %s", ctx->file, section, name);
        return 1;
    }
    idx = (size_t)(o - options);

    /* $references are resolved after all files; validate the literal value now, unless it has
     * one, so the error points at this line. */
    if (!strchr(value, '$')) {
        r = opt_set(o, ctx->scratch, value, why, sizeof(why));
        if (r < 0) {
            if (ctx->error == 0) {
                ctx->error = r;
                snprintf(ctx->why, sizeof(ctx->why), "[%s] %s: %s", section, name,
                         r == -ENOMEM ? "out of memory" : why);
            }
            return 0;
        }
    }

    char *nv;
    struct raw_value *rv = &ctx->raw[idx];
    if (o->type == OPT_MULTI && rv->value && rv->file == ctx->file) {
        size_t a = strlen(rv->value), b = strlen(value);
        nv = malloc(a + b + 2);
        if (nv) {
            memcpy(nv, rv->value, a);
            nv[a] = ',';
            memcpy(nv + a + 1, value, b + 1);
        }
    } else {
        nv = strdup(value);
    }
    if (!nv) {
        ctx->error = ctx->error ? ctx->error : -ENOMEM;
        return 0;
    }
    free(rv->value);
    rv->value = nv;
    rv->file = ctx->file;
    return 1;
}

static const char *
raw_or_default(const struct load_ctx *ctx, size_t i)
{
    return ctx->raw[i].value ? ctx->raw[i].value : options[i].info.def;
}

/* Expand $name and ${name} (a [DEFAULT] option) and $$ in s into *ret. */
static int
interpolate(const struct load_ctx *ctx, const char *s, int depth, char **ret, char *why,
            size_t whylen)
{
    size_t cap = strlen(s) + 1, n = 0;
    _cleanup_free_ char *out = malloc(cap);

    if (!out)
        return -ENOMEM;
    if (depth > 8) {
        snprintf(why, whylen, "$-references nested too deeply (a cycle?)");
        return -ELOOP;
    }
    for (const char *p = s; *p;) {
        const char *add = p;
        size_t addlen = 1;
        _cleanup_free_ char *sub = NULL;

        if (p[0] == '$' && p[1] == '$') {
            addlen = 1;
            p += 2;
        } else if (p[0] == '$') {
            const char *start = p + 1, *end;
            bool braced = *start == '{';
            if (braced)
                start++;
            end = start;
            while ((*end >= 'a' && *end <= 'z') || (*end >= 'A' && *end <= 'Z') ||
                   (*end >= '0' && *end <= '9') || *end == '_')
                end++;
            if (end == start || (braced && *end != '}')) {
                snprintf(why, whylen, "malformed $-reference in '%s'", s);
                return -EINVAL;
            }
            _cleanup_free_ char *ref = util_strndup(start, (size_t)(end - start));
            if (!ref)
                return -ENOMEM;
            const struct option *o = find_option("DEFAULT", ref);
            if (!o || (o->type != OPT_STR && o->type != OPT_HOST)) {
                snprintf(why, whylen, "$%s does not name a [DEFAULT] string option", ref);
                return -EINVAL;
            }
            int r = interpolate(ctx, raw_or_default(ctx, (size_t)(o - options)), depth + 1, &sub,
                                why, whylen);
            if (r < 0)
                return r;
            add = sub;
            addlen = strlen(sub);
            p = end + (braced ? 1 : 0);
        } else {
            p++;
        }
        if (n + addlen + 1 > cap) {
            cap = (n + addlen + 1) * 2;
            char *t = realloc(out, cap);
            if (!t)
                return -ENOMEM;
            out = t;
        }
        memcpy(out + n, add, addlen);
        n += addlen;
    }
    out[n] = '\0';
    *ret = TAKE_PTR(out);
    return 0;
}

void
config_free(struct agent_config *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < ELEMENTSOF(options); i++) {
        const struct option *o = &options[i];
        if (o->type == OPT_STR || o->type == OPT_HOST || o->type == OPT_URL) {
            char *s = *FIELD(cfg, o, char *);
            if (s && o->info.secret)
                explicit_bzero(s, strlen(s));
            free(s);
        } else if (o->type == OPT_LIST || o->type == OPT_MULTI) {
            util_strv_free(*FIELD(cfg, o, char **));
        }
    }
    rpc_transport_url_free(cfg->transport);
    rpc_transport_url_free(cfg->notification_transport);
    free(cfg);
}

static void
ctx_release(struct load_ctx *ctx)
{
    for (size_t i = 0; i < ELEMENTSOF(options); i++) {
        if (ctx->raw[i].value) {
            explicit_bzero(ctx->raw[i].value, strlen(ctx->raw[i].value));
            free(ctx->raw[i].value);
        }
    }
    config_free(ctx->scratch);
}

/* Build the typed config from the raw values of all files plus defaults. */
static int
config_build(struct load_ctx *ctx, struct agent_config **ret_cfg, struct agent_err *err)
{
    struct agent_config *cfg = calloc(1, sizeof(*cfg));
    char why[AGENT_ERR_MSG_MAX - 128];
    int r;

    if (!cfg)
        return -ENOMEM;
    for (size_t i = 0; i < ELEMENTSOF(options); i++) {
        const struct option *o = &options[i];
        _cleanup_free_ char *v = NULL;

        r = interpolate(ctx, raw_or_default(ctx, i), 0, &v, why, sizeof(why));
        if (r >= 0)
            r = opt_set(o, cfg, v, why, sizeof(why));
        if (r < 0) {
            agent_err_set(err, r, "%s: [%s] %s: %s", ctx->raw[i].file ? ctx->raw[i].file : "default",
                          o->info.section, o->info.name, r == -ENOMEM ? "out of memory" : why);
            config_free(cfg);
            return r;
        }
    }

    /* Derived values and the checks that involve more than one option. */
    if (util_isempty(cfg->host)) {
        char hn[256];
        if (gethostname(hn, sizeof(hn)) < 0 || !hn[0]) {
            config_free(cfg);
            return agent_err_set(err, -EINVAL, "[DEFAULT] host is empty and gethostname failed");
        }
        hn[sizeof(hn) - 1] = '\0';
        free(cfg->host);
        cfg->host = strdup(hn);
    }
    if (util_isempty(cfg->connection_uri)) {
        free(cfg->connection_uri);
        cfg->connection_uri = strdup("qemu:///system");
    }
    if (!cfg->host || !cfg->connection_uri) {
        config_free(cfg);
        return -ENOMEM;
    }
    r = rpc_transport_url_parse(cfg->transport_url, &cfg->transport, err);
    if (r >= 0 && !util_isempty(cfg->notification_transport_url))
        r = rpc_transport_url_parse(cfg->notification_transport_url, &cfg->notification_transport,
                                    err);
    if (r < 0) {
        config_free(cfg);
        return r;
    }
    *ret_cfg = cfg;
    return 0;
}

/* Run one file (or string) through inih and turn its result into an agent_err. */
static int
parse_one(struct load_ctx *ctx, const char *name, const char *text, struct agent_err *err)
{
    int line;

    ctx->file = name;
    ctx->error = 0;
    ctx->why[0] = '\0';
    line = ini_parse_string(text, config_ini_line, ctx);
    if (line == -2 || ctx->error == -ENOMEM)
        return agent_err_set(err, -ENOMEM, "%s: out of memory", name);
    if (line > 0) {
        if (ctx->why[0])
            return agent_err_set(err, -EINVAL, "%s:%d: %s", name, line, ctx->why);
        return agent_err_set(err, -EINVAL, "%s:%d: syntax error (expected 'name = value', "
                                           "'[section]' or a comment)",
                             name, line);
    }
    return 0;
}

/* libinih reads lines into a fixed 200-byte buffer and would split a longer line into two
 * settings. Such lines (a transport_url with many brokers, an unrelated long nova option) are
 * handled here instead: "name = value" is fed to the handler directly and the line is blanked in
 * the copy given to libinih, which keeps every other line number intact. */
#define INI_LINE_LIMIT 198

static int
take_long_lines(struct load_ctx *ctx, const char *name, char *text, struct agent_err *err)
{
    char section[128] = "DEFAULT";
    int line = 1;

    ctx->file = name;
    for (char *p = text; *p; line++) {
        char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        char *a = p, *b = p + len;

        while (a < b && (*a == ' ' || *a == '\t'))
            a++;
        if (a < b && *a == '[') {
            char *rb = memchr(a, ']', (size_t)(b - a));
            size_t sl = rb ? (size_t)(rb - a - 1) : 0;
            if (rb && sl < sizeof(section)) {
                memcpy(section, a + 1, sl);
                section[sl] = '\0';
            }
        } else if (len > INI_LINE_LIMIT && a == p && *a != '#' && *a != ';') {
            char *eq = a + strcspn(a, "=:");
            if (eq < b) {
                _cleanup_free_ char *key = NULL, *val = NULL;
                char *ke = eq, *vs = eq + 1, *ve = b;
                while (ke > a && (ke[-1] == ' ' || ke[-1] == '\t'))
                    ke--;
                while (vs < ve && (*vs == ' ' || *vs == '\t'))
                    vs++;
                while (ve > vs && (ve[-1] == ' ' || ve[-1] == '\t' || ve[-1] == '\r'))
                    ve--;
                key = util_strndup(a, (size_t)(ke - a));
                val = util_strndup(vs, (size_t)(ve - vs));
                if (!key || !val)
                    return -ENOMEM;
                ctx->error = 0;
                if (!config_ini_line(ctx, section, key, val)) {
                    if (ctx->error == -ENOMEM)
                        return -ENOMEM;
                    return agent_err_set(err, -EINVAL, "%s:%d: %s", name, line, ctx->why);
                }
            }
        }
        if (len > INI_LINE_LIMIT)
            memset(p, ' ', len); /* libinih skips blank lines, whatever their length */
        p = eol ? eol + 1 : p + len;
    }
    return 0;
}

static int
read_file(const char *path, char **ret, struct agent_err *err)
{
    _cleanup_fclose_ FILE *f = fopen(path, "re");
    _cleanup_free_ char *buf = NULL;
    size_t n = 0, cap = 0;

    if (!f)
        return agent_err_set(err, -errno, "%s: cannot open config file: %s", path, strerror(errno));
    for (;;) {
        if (n + 4096 + 1 > cap) {
            if (cap > (16u << 20))
                return agent_err_set(err, -EFBIG, "%s: config file larger than 16 MiB", path);
            cap = cap ? cap * 2 : 8192;
            char *t = realloc(buf, cap);
            if (!t)
                return -ENOMEM;
            buf = t;
        }
        size_t k = fread(buf + n, 1, cap - n - 1, f);
        n += k;
        if (k == 0) {
            if (ferror(f))
                return agent_err_set(err, -EIO, "%s: read error", path);
            break;
        }
    }
    buf[n] = '\0';
    if (memchr(buf, '\0', n))
        return agent_err_set(err, -EINVAL, "%s: contains a NUL byte: not a config file", path);
    *ret = TAKE_PTR(buf);
    return 0;
}

static int
load_common(char *const *names, const char *const *texts, size_t n, struct agent_config **ret_cfg,
            struct agent_err *err)
{
    struct load_ctx ctx = {0};
    int r = 0;

    ctx.scratch = calloc(1, sizeof(*ctx.scratch));
    if (!ctx.scratch)
        return -ENOMEM;
    for (size_t i = 0; i < n && r >= 0; i++) {
        _cleanup_free_ char *buf = NULL;
        const char *text = texts ? texts[i] : NULL;
        if (!text)
            r = read_file(names[i], &buf, err);
        if (r >= 0 && !buf) {
            buf = strdup(text);
            r = buf ? 0 : -ENOMEM;
        }
        if (r >= 0)
            r = take_long_lines(&ctx, names[i], buf, err);
        if (r >= 0)
            r = parse_one(&ctx, names[i], buf, err);
    }
    if (r >= 0)
        r = config_build(&ctx, ret_cfg, err);
    ctx_release(&ctx);
    return r;
}

int
config_load(char *const *paths, size_t n_paths, struct agent_config **ret_cfg,
            struct agent_err *err)
{
    return load_common(paths, NULL, n_paths, ret_cfg, err);
}

int
config_load_string(const char *name, const char *text, struct agent_config **ret_cfg,
                   struct agent_err *err)
{
    char *names[] = {(char *)name};
    const char *texts[] = {text};
    return load_common(names, texts, 1, ret_cfg, err);
}

static void
dump_url(FILE *f, const struct rpc_transport_url *u)
{
    fputs("rabbit://", f);
    for (size_t i = 0; i < u->n_brokers; i++) {
        char b[512];
        rpc_broker_describe(&u->brokers[i], b, sizeof(b));
        /* rpc_broker_describe gives user@host:port; show the password as *** */
        const char *at = strchr(b, '@');
        fprintf(f, "%s%.*s:***%s", i ? "," : "", (int)(at - b), b, at);
    }
    fprintf(f, "/%s", strcmp(u->vhost, "/") == 0 ? "" : u->vhost);
}

int
config_dump(const struct agent_config *cfg, int fd)
{
    _cleanup_fclose_ FILE *f = NULL;
    int dfd = dup(fd);

    if (dfd < 0)
        return -errno;
    f = fdopen(dfd, "w");
    if (!f) {
        close(dfd);
        return -errno;
    }
    for (size_t i = 0; i < ELEMENTSOF(options); i++) {
        const struct option *o = &options[i];
        fprintf(f, "[%s] %s = ", o->info.section, o->info.name);
        switch (o->type) {
        case OPT_STR:
        case OPT_HOST:
            fputs(*FIELD(cfg, o, char *), f);
            break;
        case OPT_URL:
            if (o->offset == OFF(transport_url))
                dump_url(f, cfg->transport);
            else if (cfg->notification_transport)
                dump_url(f, cfg->notification_transport);
            break;
        case OPT_BOOL:
            fputs(*FIELD(cfg, o, bool) ? "True" : "False", f);
            break;
        case OPT_INT:
            fprintf(f, "%ld", *FIELD(cfg, o, long));
            break;
        case OPT_CHOICE: {
            int v = *FIELD(cfg, o, int);
            for (const struct choice *c = o->choices; c->name; c++)
                if (c->value == v) {
                    fputs(c->name, f);
                    break;
                }
            break;
        }
        case OPT_LIST:
        case OPT_MULTI: {
            char **l = *FIELD(cfg, o, char **);
            for (size_t k = 0; l && l[k]; k++)
                fprintf(f, "%s%s", k ? "," : "", l[k]);
            break;
        }
        case OPT_DEBUG: {
            unsigned m = *FIELD(cfg, o, unsigned);
            bool first = true;
            for (int k = 0; k < LOG_MODULE_MAX; k++)
                if (m & (1u << k)) {
                    fprintf(f, "%s%s", first ? "" : ",", log_module_to_string(k));
                    first = false;
                }
            break;
        }
        case OPT_TYPE_MAX:
            break;
        }
        fputc('\n', f);
    }
    return fflush(f) == 0 ? 0 : -errno;
}

const char *
images_type_to_string(enum images_type t)
{
    static const char *const names[IMAGES_TYPE_MAX] = {"qcow2", "rbd"};
    return (unsigned)t < IMAGES_TYPE_MAX ? names[t] : "?";
}

const char *
snapshot_format_to_string(enum snapshot_format f)
{
    static const char *const names[SNAPSHOT_FORMAT_MAX] = {"source", "raw", "qcow2"};
    return (unsigned)f < SNAPSHOT_FORMAT_MAX ? names[f] : "?";
}

const char *
notification_format_to_string(enum notification_format f)
{
    static const char *const names[NOTIFICATION_FORMAT_MAX] = {"unversioned", "versioned", "both"};
    return (unsigned)f < NOTIFICATION_FORMAT_MAX ? names[f] : "?";
}

const char *
notify_on_state_change_to_string(enum notify_on_state_change n)
{
    static const char *const names[NOTIFY_ON_STATE_CHANGE_MAX] = {"None", "vm_state",
                                                                 "vm_and_task_state"};
    return (unsigned)n < NOTIFY_ON_STATE_CHANGE_MAX ? names[n] : "?";
}
