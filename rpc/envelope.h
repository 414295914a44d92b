#pragma once
/* oslo.messaging's wire format, decoding side: an AMQP delivery body (the 2.0 envelope
 * {"oslo.version": "2.0", "oslo.message": "<JSON string>"} or a bare 1.0 message) into a
 * struct rpc_request. Pure: no I/O, no logging; every rejection comes with a one-line reason. */

#include <stddef.h>

struct agent_err;
struct rpc_request;

/* Bodies larger than this are refused before parsing (a nova cast is ~7 KiB; an instance with
 * 64 KiB of user_data and a large network_info stays far below). */
#define RPC_MAX_BODY_BYTES (4u << 20)

/* Decode one delivery. content_type is the AMQP property (NULL if absent): oslo consumers accept
 * only application/json. On success returns 0 and *ret_req (caller frees with
 * rpc_request_free()). Errors, with err filled (never quoting the auth token):
 *   -EMSGSIZE        body larger than RPC_MAX_BODY_BYTES
 *   -EPROTOTYPE      content type is not application/json
 *   -EBADMSG         not JSON, not an object, invalid UTF-8, or an embedded NUL
 *   -EPROTONOSUPPORT envelope version other than 2.0
 *   -EINVAL          a required field missing or of the wrong type (method, args, instance…)
 *   -ENOMEM */
int rpc_parse_delivery(const void *body, size_t len, const char *content_type,
                       struct rpc_request **ret_req, struct agent_err *err);

/* What a served request is. */
enum rpc_target {
    RPC_TARGET_SNAPSHOT, /* snapshot_instance: the worker's */
    RPC_TARGET_PING,     /* baseapi ping: answered by the rpc thread itself */
    RPC_TARGET_MAX,
};

/* Route req the way oslo's dispatcher would for nova-compute 26's endpoints: ComputeManager
 * (default namespace, 6.1), its 5.13 proxy, and BaseRPCAPI (namespace "baseapi", 1.1). A target
 * is compatible when the major versions match and the requested minor is not newer. Returns 0
 * and *ret_target; -ENOSYS when a compatible endpoint lacks the method (NoSuchMethod);
 * -EPROTONOSUPPORT when no endpoint is compatible (UnsupportedVersion). err carries oslo's
 * message text. */
int rpc_check_target(const struct rpc_request *req, enum rpc_target *ret_target,
                     struct agent_err *err);

/* Encoding side: the reply an oslo RPC caller waits for, as oslo's _send_reply writes it: a 2.0
 * envelope around {"result": R, "failure": F, "ending": true, "_msg_id", "_unique_id"}.
 * code 0: success, R is the answer to a ping ({"service": "compute", "arg": <args.arg>}) and F
 * null. Otherwise R is null and F the JSON *string* serialize_remote_exception makes: class
 * NoSuchMethod (-ENOSYS) or UnsupportedVersion (-EPROTONOSUPPORT) of module
 * oslo_messaging.rpc.dispatcher, or for any other code class AgentError of module
 * compute_agent; message, tb, args [message], kwargs {}. Returns 0 and *ret_body (caller frees),
 * or -ENOMEM, -EINVAL (not a call). */
int rpc_build_reply(const struct rpc_request *req, int code, const char *message, char **ret_body,
                    size_t *ret_len);
