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

/* Does the agent serve req->method at req->version? 0 yes; -ENOSYS no such method
 * (oslo's NoSuchMethod); -EPROTONOSUPPORT method known but version not served
 * (UnsupportedVersion). err says which. Served: snapshot_instance 5.x and 6.x. */
int rpc_check_target(const struct rpc_request *req, struct agent_err *err);

/* Encoding side: the reply an oslo RPC caller waits for when its call failed, as oslo's
 * _send_reply + serialize_remote_exception write it: a 2.0 envelope around {"result": null,
 * "failure": "<JSON of class, module, message, tb, args, kwargs>", "ending": true, "_msg_id",
 * "_unique_id"}. code selects the class: -ENOSYS NoSuchMethod, -EPROTONOSUPPORT
 * UnsupportedVersion (both module oslo_messaging.rpc.dispatcher), anything else a RemoteError-style
 * failure of class AgentError. Returns 0 and *ret_body (caller frees), or -ENOMEM/-EINVAL. */
int rpc_build_failure_reply(const struct rpc_request *req, int code, const char *message,
                            char **ret_body, size_t *ret_len);
