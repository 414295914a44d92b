/* libFuzzer target: an AMQP delivery body through the oslo envelope and request decoder, then
 * whatever the rpc thread does next with a decoded request (target check, failure reply). */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "envelope.h"
#include "err.h"
#include "request.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct rpc_request *req = NULL;
    struct agent_err err = {0};

    if (rpc_parse_delivery(data, size, "application/json", &req, &err) == 0) {
        enum rpc_target t;
        int r = rpc_check_target(req, &t, &err);
        if (req->kind == RPC_KIND_CALL) {
            char *body = NULL;
            size_t len;
            if (rpc_build_reply(req, r, err.msg[0] ? err.msg : "x", &body, &len) == 0)
                free(body);
        }
        if (req->instance)
            (void)instance_system_metadata(req->instance, "image_disk_format");
        rpc_request_free(req);
    }
    return 0;
}
