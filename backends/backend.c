/* Start-up glue for the backends: one call initialises every library they own, one reports what
 * was linked. Each library is touched only by the file that owns it (qcow2.c, rbd.c, glance.c). */

#include "backend.h"

#include <errno.h>

#include "err.h"

int
backend_global_init(struct agent_err *err)
{
    int r = qcow2_global_init(err);
    if (r < 0)
        return r;
    return http_global_init(err);
}

void
backend_global_cleanup(void)
{
    http_global_cleanup();
}

void
backend_library_versions(char *buf, size_t size)
{
    size_t n = 0;

    if (size == 0)
        return;
    buf[0] = '\0';
    n += qcow2_library_versions(buf + n, size - n);
    if (n < size)
        n += cephrbd_library_versions(buf + n, size - n);
    if (n < size)
        http_library_versions(buf + n, size - n);
}
