#pragma once
/* A parsed RPC request: what the rpc thread hands to the worker after a delivery has been
 * decoded from oslo.messaging's wire format. Plain C fields for what the agent decides on; the
 * decoded document itself stays inside rpc/ (notifications echo the context and the instance). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct agent_err;

/* The request context (_context_* keys) the caller sent. */
struct rpc_context {
    char *request_id;        /* "req-…", may be NULL */
    char *global_request_id; /* may be NULL */
    char *user_id;
    char *project_id;
    char *user_name;
    char *project_name;
    char **roles;            /* NULL-terminated, never NULL */
    bool is_admin;
    char *timestamp;         /* "YYYY-MM-DDTHH:MM:SS.ffffff" as sent */
    char *auth_token;        /* secret: only for Glance requests on the user's behalf; never log */
};

/* A system_metadata or metadata entry. */
struct rpc_kv {
    char *key;
    char *value;
};

/* The Instance versioned object (nova_object.version 2.x), reduced to what the agent needs. */
struct instance {
    char *uuid;
    int64_t id;
    char *object_version; /* "2.7" */
    char *host;
    char *node;
    char *display_name;
    char *hostname;
    char *vm_state;       /* "active", "stopped", "paused", … */
    char *task_state;     /* NULL when None */
    int power_state;      /* nova's power_state: 1 running, 3 paused, 4 shutdown, … */
    char *image_ref;
    char *user_id;
    char *project_id;
    char *root_device_name; /* "/dev/vda", may be NULL */
    char *os_type;          /* may be NULL */
    char *architecture;     /* may be NULL */
    char *availability_zone;
    int64_t memory_mb, vcpus, root_gb, ephemeral_gb;
    char *flavor_name;      /* from the Flavor object, may be NULL */
    char *flavor_flavorid;
    struct rpc_kv *system_metadata; /* image_* keys among them */
    size_t n_system_metadata;
};

enum rpc_kind {
    RPC_KIND_CAST,
    RPC_KIND_CALL, /* has _msg_id and _reply_q: the caller waits for a reply */
    RPC_KIND_MAX,
};

struct rpc_doc; /* the decoded message, private to rpc/ */

struct rpc_request {
    enum rpc_kind kind;
    char *envelope_version; /* "2.0", or "1.0" for a bare message */
    char *method;
    char *version;          /* "6.0" as sent */
    int version_major, version_minor;
    char *namespace_;       /* target namespace, NULL for the default */
    char *unique_id;        /* _unique_id: duplicates are dropped */
    char *msg_id;           /* calls only */
    char *reply_q;          /* calls only */
    struct rpc_context ctx;
    /* snapshot_instance (and backup_instance later): */
    struct instance *instance; /* NULL for methods without one */
    char *image_id;
    struct rpc_doc *doc;
    /* The delivery exactly as received (body and content type), so the journal can keep it and
     * a job recovered after a restart is parsed again from the same bytes. Holds the token. */
    void *raw;
    size_t raw_len;
    char *content_type;
};

/* Look up a system_metadata value by key; NULL if absent. Borrowed, valid while inst lives. */
const char *instance_system_metadata(const struct instance *inst, const char *key);

/* NULL-safe destructors. */
void instance_free(struct instance *inst);
void rpc_request_free(struct rpc_request *req);
static inline void
instance_freep(struct instance **i)
{
    instance_free(*i);
}
static inline void
rpc_request_freep(struct rpc_request **r)
{
    rpc_request_free(*r);
}
