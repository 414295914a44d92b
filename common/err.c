/* Error reports: a negative errno plus a human-readable message formed where the failure is
 * understood. The first report wins: an outer layer that adds its own agent_err_set() after an
 * inner one already described the failure keeps the inner, more precise text. */

#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int err_vset(struct agent_err *err, bool retryable, int code, const char *fmt, va_list ap)
    __attribute__((format(printf, 4, 0)));

static int
err_vset(struct agent_err *err, bool retryable, int code, const char *fmt, va_list ap)
{
    if (!err || err->code != 0)
        return code;
    err->code = code;
    err->retryable = retryable;
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    return code;
}

int
agent_err_set(struct agent_err *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    err_vset(err, false, code, fmt, ap);
    va_end(ap);
    return code;
}

int
agent_err_set_retryable(struct agent_err *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    err_vset(err, true, code, fmt, ap);
    va_end(ap);
    return code;
}

void
agent_err_clear(struct agent_err *err)
{
    if (!err)
        return;
    err->code = 0;
    err->retryable = false;
    err->msg[0] = '\0';
}
