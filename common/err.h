#pragma once
/* struct agent_err: the one error report that travels from where a failure is understood to where
 * it is decided on (worker/) and to whoever must hear of it (log line, RPC failure reply,
 * notification). Set once, where the detail is known. */

#include <stdbool.h>
#include <stddef.h>

#define AGENT_ERR_MSG_MAX 512

struct agent_err {
    int code;       /* negative errno, 0 when unset */
    bool retryable; /* true if the same call may succeed later (network, broker, busy) */
    char msg[AGENT_ERR_MSG_MAX];
};

/* Fill err (if not NULL and not already set) with code and a printf-style message; the message
 * is truncated to fit. Returns code so callers can write `return agent_err_set(err, -EINVAL, …)`. */
int agent_err_set(struct agent_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Like agent_err_set, and marks the error retryable. */
int agent_err_set_retryable(struct agent_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Reset err to "no error". */
void agent_err_clear(struct agent_err *err);
