#pragma once
/* Private to rpc/: the decoded message behind a struct rpc_request, for code that must echo
 * parts of it (notifications repeat the caller's context and build payloads from the Instance
 * primitive). Nothing outside rpc/ includes this. */

#include <jansson.h>

struct rpc_doc {
    json_t *msg; /* the inner message object (owned): method, args, version, _context_*, … */
};

/* args.instance of the message, the Instance primitive ({"nova_object.name": "Instance", …});
 * borrowed, NULL if absent. */
json_t *rpc_doc_instance(const struct rpc_doc *d);
