/* Decoding oslo.messaging RPC messages. A delivery body is either the 2.0 envelope, whose
 * "oslo.message" member is the real message serialised a second time as a JSON string, or (1.0)
 * the message itself. The message carries method, args, version, _unique_id, the caller's
 * context flattened into _context_* keys, and for calls _msg_id/_reply_q. Methods that act on an
 * instance carry the Instance versioned-object primitive in args.instance. Everything a caller
 * can get wrong is a runtime error with a reason naming the offending field; nothing here logs,
 * and no reason ever quotes a value from the context (the auth token lives there). */

#include "envelope.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cleanup.h"
#include "doc.h"
#include "err.h"
#include "request.h"
#include "util.h"

static const char *
json_kind(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
        return "integer";
    case JSON_REAL:
        return "number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "boolean";
    case JSON_NULL:
        return "null";
    }
    return "?";
}

/* Read obj[key] as a string into *ret (a copy). Absent or null: *ret = NULL, an error only if
 * required. Wrong type: -EINVAL naming path.key. */
static int
get_str(const json_t *obj, const char *key, bool required, char **ret, const char *path,
        struct agent_err *err)
{
    json_t *v = json_object_get(obj, key);

    if (!v || json_is_null(v)) {
        if (required)
            return agent_err_set(err, -EINVAL, "invalid message: %s%s is missing", path, key);
        *ret = NULL;
        return 0;
    }
    if (!json_is_string(v))
        return agent_err_set(err, -EINVAL, "invalid message: %s%s: expected string, got %s", path,
                             key, json_kind(v));
    *ret = util_strndup(json_string_value(v), json_string_length(v));
    return *ret ? 0 : -ENOMEM;
}

/* Read obj[key] as an integer; absent or null leaves *ret untouched (default). */
static int
get_int(const json_t *obj, const char *key, int64_t *ret, const char *path, struct agent_err *err)
{
    json_t *v = json_object_get(obj, key);

    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return agent_err_set(err, -EINVAL, "invalid message: %s%s: expected integer, got %s",
                             path, key, json_kind(v));
    *ret = json_integer_value(v);
    return 0;
}

static int
get_bool(const json_t *obj, const char *key, bool *ret, const char *path, struct agent_err *err)
{
    json_t *v = json_object_get(obj, key);

    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return agent_err_set(err, -EINVAL, "invalid message: %s%s: expected boolean, got %s",
                             path, key, json_kind(v));
    *ret = json_is_true(v);
    return 0;
}

/* 8-4-4-4-12 hex digits, as oslo's uuidutils.is_uuid_like accepts after normalisation. */
static bool
is_uuid(const char *s)
{
    static const int groups[] = {8, 4, 4, 4, 12};
    for (size_t g = 0; g < ELEMENTSOF(groups); g++) {
        for (int i = 0; i < groups[g]; i++, s++)
            if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f') || (*s >= 'A' && *s <= 'F')))
                return false;
        if (g < ELEMENTSOF(groups) - 1 && *s++ != '-')
            return false;
    }
    return *s == '\0';
}

static int
parse_version(const char *v, int *ret_major, int *ret_minor)
{
    char *end;
    long ma, mi = 0;

    if (!v || !*v || *v < '0' || *v > '9')
        return -EINVAL;
    ma = strtol(v, &end, 10);
    if (*end == '.') {
        const char *m = end + 1;
        if (*m < '0' || *m > '9')
            return -EINVAL;
        mi = strtol(m, &end, 10);
    }
    if (*end || ma > 1000 || mi > 1000)
        return -EINVAL;
    *ret_major = (int)ma;
    *ret_minor = (int)mi;
    return 0;
}

const char *
instance_system_metadata(const struct instance *inst, const char *key)
{
    for (size_t i = 0; inst && i < inst->n_system_metadata; i++)
        if (strcmp(inst->system_metadata[i].key, key) == 0)
            return inst->system_metadata[i].value;
    return NULL;
}

void
instance_free(struct instance *inst)
{
    if (!inst)
        return;
    free(inst->uuid);
    free(inst->object_version);
    free(inst->host);
    free(inst->node);
    free(inst->display_name);
    free(inst->hostname);
    free(inst->vm_state);
    free(inst->task_state);
    free(inst->image_ref);
    free(inst->user_id);
    free(inst->project_id);
    free(inst->root_device_name);
    free(inst->os_type);
    free(inst->architecture);
    free(inst->availability_zone);
    free(inst->flavor_name);
    free(inst->flavor_flavorid);
    for (size_t i = 0; i < inst->n_system_metadata; i++) {
        free(inst->system_metadata[i].key);
        free(inst->system_metadata[i].value);
    }
    free(inst->system_metadata);
    free(inst);
}

static void
context_clear(struct rpc_context *c)
{
    free(c->request_id);
    free(c->global_request_id);
    free(c->user_id);
    free(c->project_id);
    free(c->user_name);
    free(c->project_name);
    util_strv_free(c->roles);
    free(c->timestamp);
    if (c->auth_token) {
        explicit_bzero(c->auth_token, strlen(c->auth_token));
        free(c->auth_token);
    }
}

void
rpc_request_free(struct rpc_request *req)
{
    if (!req)
        return;
    free(req->envelope_version);
    free(req->method);
    free(req->version);
    free(req->namespace_);
    free(req->unique_id);
    free(req->msg_id);
    free(req->reply_q);
    context_clear(&req->ctx);
    instance_free(req->instance);
    free(req->image_id);
    free(req->raw);
    free(req->content_type);
    if (req->doc) {
        json_decref(req->doc->msg);
        free(req->doc);
    }
    free(req);
}

json_t *
rpc_doc_instance(const struct rpc_doc *d)
{
    return d ? json_object_get(json_object_get(d->msg, "args"), "instance") : NULL;
}

/* Check that j is a nova versioned-object primitive of the given name and major version and
 * return its nova_object.data. */
static int
versioned_object(const json_t *j, const char *name, int major, const char *path, json_t **ret_data,
                 char **ret_version, struct agent_err *err)
{
    const char *on, *ons, *ov;
    int ma, mi;
    json_t *data;

    if (!json_is_object(j))
        return agent_err_set(err, -EINVAL, "invalid message: %s: expected a %s object, got %s",
                             path, name, json_kind(j));
    on = json_string_value(json_object_get(j, "nova_object.name"));
    ons = json_string_value(json_object_get(j, "nova_object.namespace"));
    ov = json_string_value(json_object_get(j, "nova_object.version"));
    data = json_object_get(j, "nova_object.data");
    if (!on || strcmp(on, name) != 0)
        return agent_err_set(err, -EINVAL, "invalid message: %s: nova_object.name is not '%s'",
                             path, name);
    if (!ons || strcmp(ons, "nova") != 0)
        return agent_err_set(err, -EINVAL, "invalid message: %s: nova_object.namespace is not "
                             "'nova'", path);
    if (!ov || parse_version(ov, &ma, &mi) < 0)
        return agent_err_set(err, -EINVAL, "invalid message: %s: bad nova_object.version", path);
    if (ma != major)
        return agent_err_set(err, -EINVAL, "invalid message: %s: %s object version %s is not "
                             "supported (need %d.x)", path, name, ov, major);
    if (!json_is_object(data))
        return agent_err_set(err, -EINVAL, "invalid message: %s: nova_object.data is not an "
                             "object", path);
    if (ret_version) {
        *ret_version = strdup(ov);
        if (!*ret_version)
            return -ENOMEM;
    }
    *ret_data = data;
    return 0;
}

static int
parse_instance(const json_t *prim, struct instance **ret_inst, struct agent_err *err)
{
    static const char path[] = "args.instance.";
    _cleanup_(instance_freep) struct instance *inst = calloc(1, sizeof(*inst));
    json_t *d, *v;
    int64_t ps = 0;
    int r;

    if (!inst)
        return -ENOMEM;
    r = versioned_object(prim, "Instance", 2, "args.instance", &d, &inst->object_version, err);
    if (r < 0)
        return r;

    struct {
        const char *key;
        char **dst;
        bool required;
    } strs[] = {
        {"uuid", &inst->uuid, true},
        {"host", &inst->host, false},
        {"node", &inst->node, false},
        {"display_name", &inst->display_name, false},
        {"hostname", &inst->hostname, false},
        {"vm_state", &inst->vm_state, false},
        {"task_state", &inst->task_state, false},
        {"image_ref", &inst->image_ref, false},
        {"user_id", &inst->user_id, false},
        {"project_id", &inst->project_id, false},
        {"root_device_name", &inst->root_device_name, false},
        {"os_type", &inst->os_type, false},
        {"architecture", &inst->architecture, false},
        {"availability_zone", &inst->availability_zone, false},
    };
    for (size_t i = 0; i < ELEMENTSOF(strs); i++) {
        r = get_str(d, strs[i].key, strs[i].required, strs[i].dst, path, err);
        if (r < 0)
            return r;
    }
    if (!is_uuid(inst->uuid))
        return agent_err_set(err, -EINVAL, "invalid message: args.instance.uuid is not a UUID");

    struct {
        const char *key;
        int64_t *dst;
    } ints[] = {
        {"id", &inst->id},           {"power_state", &ps},  {"memory_mb", &inst->memory_mb},
        {"vcpus", &inst->vcpus},     {"root_gb", &inst->root_gb},
        {"ephemeral_gb", &inst->ephemeral_gb},
    };
    for (size_t i = 0; i < ELEMENTSOF(ints); i++) {
        r = get_int(d, ints[i].key, ints[i].dst, path, err);
        if (r < 0)
            return r;
    }
    if (ps < 0 || ps > 255)
        return agent_err_set(err, -EINVAL, "invalid message: args.instance.power_state %lld is "
                             "out of range", (long long)ps);
    inst->power_state = (int)ps;

    v = json_object_get(d, "flavor");
    if (v && !json_is_null(v)) {
        json_t *fd;
        r = versioned_object(v, "Flavor", 1, "args.instance.flavor", &fd, NULL, err);
        if (r >= 0)
            r = get_str(fd, "name", false, &inst->flavor_name, "args.instance.flavor.", err);
        if (r >= 0)
            r = get_str(fd, "flavorid", false, &inst->flavor_flavorid, "args.instance.flavor.",
                        err);
        if (r < 0)
            return r;
    }

    v = json_object_get(d, "system_metadata");
    if (v && !json_is_null(v)) {
        const char *k;
        json_t *val;
        if (!json_is_object(v))
            return agent_err_set(err, -EINVAL, "invalid message: args.instance.system_metadata: "
                                 "expected object, got %s", json_kind(v));
        inst->system_metadata = calloc(json_object_size(v) + 1, sizeof(*inst->system_metadata));
        if (!inst->system_metadata)
            return -ENOMEM;
        json_object_foreach(v, k, val) {
            struct rpc_kv *kv = &inst->system_metadata[inst->n_system_metadata];
            if (json_is_null(val))
                continue;
            if (!json_is_string(val))
                return agent_err_set(err, -EINVAL, "invalid message: args.instance."
                                     "system_metadata.%s: expected string, got %s", k,
                                     json_kind(val));
            kv->key = strdup(k);
            kv->value = strdup(json_string_value(val));
            inst->n_system_metadata++;
            if (!kv->key || !kv->value)
                return -ENOMEM;
        }
    }
    *ret_inst = TAKE_PTR(inst);
    return 0;
}

static int
parse_context(const json_t *msg, struct rpc_context *c, struct agent_err *err)
{
    static const char path[] = "";
    json_t *roles;
    int r;

    struct {
        const char *key;
        char **dst;
    } strs[] = {
        {"_context_request_id", &c->request_id},
        {"_context_global_request_id", &c->global_request_id},
        {"_context_user_id", &c->user_id},
        {"_context_project_id", &c->project_id},
        {"_context_user_name", &c->user_name},
        {"_context_project_name", &c->project_name},
        {"_context_timestamp", &c->timestamp},
        {"_context_auth_token", &c->auth_token},
    };
    for (size_t i = 0; i < ELEMENTSOF(strs); i++) {
        r = get_str(msg, strs[i].key, false, strs[i].dst, path, err);
        if (r < 0)
            return r;
    }
    /* Older callers send only _context_user / _context_tenant. */
    if (!c->user_id && (r = get_str(msg, "_context_user", false, &c->user_id, path, err)) < 0)
        return r;
    if (!c->project_id && (r = get_str(msg, "_context_tenant", false, &c->project_id, path, err)) < 0)
        return r;
    r = get_bool(msg, "_context_is_admin", &c->is_admin, path, err);
    if (r < 0)
        return r;

    roles = json_object_get(msg, "_context_roles");
    size_t n = json_is_array(roles) ? json_array_size(roles) : 0;
    if (roles && !json_is_null(roles) && !json_is_array(roles))
        return agent_err_set(err, -EINVAL, "invalid message: _context_roles: expected array, got "
                             "%s", json_kind(roles));
    c->roles = calloc(n + 1, sizeof(char *));
    if (!c->roles)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(roles, i);
        if (!json_is_string(e))
            return agent_err_set(err, -EINVAL, "invalid message: _context_roles[%zu]: expected "
                                 "string, got %s", i, json_kind(e));
        c->roles[i] = strdup(json_string_value(e));
        if (!c->roles[i])
            return -ENOMEM;
    }
    return 0;
}

static int
parse_message(json_t *msg, struct rpc_request *req, struct agent_err *err)
{
    json_t *args;
    int r;

    r = get_str(msg, "method", true, &req->method, "", err);
    if (r < 0)
        return r;
    if (!*req->method)
        return agent_err_set(err, -EINVAL, "invalid message: method is empty");
    args = json_object_get(msg, "args");
    if (args && !json_is_null(args) && !json_is_object(args))
        return agent_err_set(err, -EINVAL, "invalid message: args: expected object, got %s",
                             json_kind(args));

    r = get_str(msg, "version", false, &req->version, "", err);
    if (r < 0)
        return r;
    if (!req->version && !(req->version = strdup("1.0")))
        return -ENOMEM;
    if (parse_version(req->version, &req->version_major, &req->version_minor) < 0)
        return agent_err_set(err, -EINVAL, "invalid message: version '%.20s' is not N.N",
                             req->version);

    if ((r = get_str(msg, "namespace", false, &req->namespace_, "", err)) < 0 ||
        (r = get_str(msg, "_unique_id", false, &req->unique_id, "", err)) < 0 ||
        (r = get_str(msg, "_msg_id", false, &req->msg_id, "", err)) < 0 ||
        (r = get_str(msg, "_reply_q", false, &req->reply_q, "", err)) < 0)
        return r;
    if ((req->msg_id != NULL) != (req->reply_q != NULL))
        return agent_err_set(err, -EINVAL, "invalid message: _msg_id and _reply_q must come "
                             "together");
    req->kind = req->msg_id ? RPC_KIND_CALL : RPC_KIND_CAST;

    r = parse_context(msg, &req->ctx, err);
    if (r < 0)
        return r;

    /* Only methods the agent serves have their arguments checked; for the others the dispatcher
     * answers NoSuchMethod whatever the arguments are. */
    if (strcmp(req->method, "snapshot_instance") == 0) {
        json_t *inst = json_object_get(args, "instance");
        if (!inst || json_is_null(inst))
            return agent_err_set(err, -EINVAL, "invalid message: args.instance is missing");
        r = parse_instance(inst, &req->instance, err);
        if (r < 0)
            return r;
        r = get_str(args, "image_id", true, &req->image_id, "args.", err);
        if (r < 0)
            return r;
        if (!is_uuid(req->image_id))
            return agent_err_set(err, -EINVAL, "invalid message: args.image_id is not a UUID");
    }
    return 0;
}

int
rpc_parse_delivery(const void *body, size_t len, const char *content_type,
                   struct rpc_request **ret_req, struct agent_err *err)
{
    _cleanup_(rpc_request_freep) struct rpc_request *req = NULL;
    json_auto_t *root = NULL;
    json_t *msg;
    json_error_t je;
    int r;

    if (len > RPC_MAX_BODY_BYTES)
        return agent_err_set(err, -EMSGSIZE, "message of %zu bytes exceeds the %u byte limit", len,
                             RPC_MAX_BODY_BYTES);
    if (!content_type || strcasecmp(content_type, "application/json") != 0)
        return agent_err_set(err, -EPROTOTYPE, "content type '%.64s' is not application/json",
                             content_type ? content_type : "(none)");
    if (len == 0 || !body)
        return agent_err_set(err, -EBADMSG, "empty message body");
    if (memchr(body, '\0', len))
        return agent_err_set(err, -EBADMSG, "message body contains a NUL byte");

    root = json_loadb(body, len, 0, &je);
    if (!root)
        return agent_err_set(err, -EBADMSG, "message is not valid JSON: %s (at byte %d)", je.text,
                             je.position);
    if (!json_is_object(root))
        return agent_err_set(err, -EBADMSG, "message is a JSON %s, not an object",
                             json_kind(root));

    req = calloc(1, sizeof(*req));
    if (!req)
        return -ENOMEM;
    req->doc = calloc(1, sizeof(*req->doc));
    if (!req->doc)
        return -ENOMEM;

    json_t *ver = json_object_get(root, "oslo.version");
    if (ver) {
        json_t *inner = json_object_get(root, "oslo.message");
        if (!json_is_string(ver) || strcmp(json_string_value(ver), "2.0") != 0)
            return agent_err_set(err, -EPROTONOSUPPORT, "unsupported oslo envelope version %s%.16s",
                                 json_is_string(ver) ? "" : "of type ",
                                 json_is_string(ver) ? json_string_value(ver) : json_kind(ver));
        if (!json_is_string(inner))
            return agent_err_set(err, -EBADMSG, "oslo.message is %s, not a JSON string",
                                 inner ? json_kind(inner) : "missing");
        msg = json_loadb(json_string_value(inner), json_string_length(inner), 0, &je);
        if (!msg)
            return agent_err_set(err, -EBADMSG, "oslo.message is not valid JSON: %s (at byte %d)",
                                 je.text, je.position);
        if (!json_is_object(msg)) {
            r = agent_err_set(err, -EBADMSG, "oslo.message is a JSON %s, not an object",
                              json_kind(msg));
            json_decref(msg);
            return r;
        }
        req->envelope_version = strdup("2.0");
    } else {
        msg = json_incref(root);
        req->envelope_version = strdup("1.0");
    }
    req->doc->msg = msg;
    if (!req->envelope_version)
        return -ENOMEM;

    r = parse_message(msg, req, err);
    if (r < 0)
        return r;
    /* The delivery as it came, for the journal: a recovered job is parsed again from it. */
    req->raw = malloc(len);
    req->content_type = strdup(content_type);
    if (!req->raw || !req->content_type)
        return -ENOMEM;
    memcpy(req->raw, body, len);
    req->raw_len = len;
    *ret_req = TAKE_PTR(req);
    return 0;
}

/* Is an endpoint at version major.minor compatible with what the caller asked for? */
static bool
compatible(const struct rpc_request *req, int major, int minor)
{
    return req->version_major == major && req->version_minor <= minor;
}

int
rpc_check_target(const struct rpc_request *req, enum rpc_target *ret_target,
                 struct agent_err *err)
{
    bool found = false;

    if (!req->namespace_) {
        if (compatible(req, 6, 1) || compatible(req, 5, 13)) {
            if (strcmp(req->method, "snapshot_instance") == 0) {
                *ret_target = RPC_TARGET_SNAPSHOT;
                return 0;
            }
            found = true;
        }
    } else if (strcmp(req->namespace_, "baseapi") == 0 && compatible(req, 1, 1)) {
        if (strcmp(req->method, "ping") == 0) {
            *ret_target = RPC_TARGET_PING;
            return 0;
        }
        found = true;
    }
    if (found)
        return agent_err_set(err, -ENOSYS, "Endpoint does not support RPC method %.128s",
                             req->method);
    return agent_err_set(err, -EPROTONOSUPPORT, "Endpoint does not support RPC version %.16s. "
                         "Attempted method: %.128s", req->version, req->method);
}

int
rpc_build_reply(const struct rpc_request *req, int code, const char *message, char **ret_body,
                size_t *ret_len)
{
    json_auto_t *inner = NULL, *env = NULL;
    json_t *result = json_null(), *failure = json_null();
    char uid[33];
    char *is, *out;

    if (!req->msg_id)
        return -EINVAL;
    if (util_random_hex(uid, 16) < 0)
        return -ENOMEM;
    if (code == 0) {
        json_t *arg = json_object_get(json_object_get(req->doc->msg, "args"), "arg");
        result = json_pack("{s:s, s:O}", "service", "compute", "arg", arg ? arg : json_null());
    } else {
        const char *cls = code == -ENOSYS            ? "NoSuchMethod"
                          : code == -EPROTONOSUPPORT ? "UnsupportedVersion"
                                                     : "AgentError";
        const char *module = code == -ENOSYS || code == -EPROTONOSUPPORT
                                 ? "oslo_messaging.rpc.dispatcher"
                                 : "compute_agent";
        /* oslo's exceptions keep only the formatted message in args and have no kwargs. */
        json_auto_t *f = json_pack("{s:s, s:s, s:s, s:[s], s:[s], s:{}}", "class", cls, "module",
                                   module, "message", message, "tb", message, "args", message,
                                   "kwargs");
        char *fs = f ? json_dumps(f, JSON_PRESERVE_ORDER) : NULL;
        if (!fs)
            return -ENOMEM;
        failure = json_string(fs);
        free(fs);
    }
    if (!result || !failure) {
        json_decref(result);
        json_decref(failure);
        return -ENOMEM;
    }
    inner = json_pack("{s:o, s:o, s:b, s:s, s:s}", "result", result, "failure", failure, "ending",
                      1, "_msg_id", req->msg_id, "_unique_id", uid);
    if (!inner)
        return -ENOMEM;
    is = json_dumps(inner, JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII);
    if (!is)
        return -ENOMEM;
    env = json_pack("{s:s, s:s}", "oslo.version", "2.0", "oslo.message", is);
    free(is);
    out = env ? json_dumps(env, JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII) : NULL;
    if (!out)
        return -ENOMEM;
    *ret_len = strlen(out);
    *ret_body = out;
    return 0;
}
