/* Start-up glue for the backends: one call initialises every library they own, one reports what
 * was linked, and the table of disk backends by name. Each library is touched only by the file
 * that owns it (qcow2.c, rbd.c, glance.c). */

#include "backend.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>

#include "cleanup.h"
#include "err.h"

static const char *const quiesce_mode_table[QUIESCE_MODE_MAX] = {
    [QUIESCE_NONE] = "none",
    [QUIESCE_TRY] = "try",
    [QUIESCE_REQUIRED] = "required",
};

const char *
quiesce_mode_to_string(enum quiesce_mode m)
{
    if ((unsigned)m >= QUIESCE_MODE_MAX)
        return NULL;
    return quiesce_mode_table[m];
}

static const char *const view_path_table[VIEW_PATH_MAX] = {
    [VIEW_PATH_BACKUP_PULL] = "backup-pull",
    [VIEW_PATH_BLOCKCOPY] = "blockcopy",
    [VIEW_PATH_COLD] = "cold",
    [VIEW_PATH_MANAGEDSAVE] = "managedsave",
    [VIEW_PATH_RBD_SNAP] = "rbd-snapshot",
    [VIEW_PATH_DIRECT] = "rbd-direct",
};

static const char *const flatten_policy_table[FLATTEN_POLICY_MAX] = {
    [FLATTEN_SYNC] = "sync",
    [FLATTEN_BACKGROUND] = "background",
    [FLATTEN_NEVER] = "never",
};

const char *
flatten_policy_to_string(enum flatten_policy p)
{
    if ((unsigned)p >= FLATTEN_POLICY_MAX)
        return NULL;
    return flatten_policy_table[p];
}

const char *
view_path_to_string(enum view_path p)
{
    if ((unsigned)p >= VIEW_PATH_MAX)
        return NULL;
    return view_path_table[p];
}

/* Every disk backend linked into the agent. */
static const struct disk_backend_ops *const backend_table[] = {
    &qcow2_backend_ops,
    &rbd_backend_ops,
};

/* A table the worker can drive: every required member present (cleanup_job is optional). */
static bool
backend_complete(const struct disk_backend_ops *ops)
{
    return ops->name && ops->open && ops->close && ops->owns && ops->open_view &&
           ops->close_view && ops->free_view;
}

const struct disk_backend_ops *
backend_lookup(const char *name)
{
    if (!name)
        return NULL;
    for (size_t i = 0; i < ELEMENTSOF(backend_table); i++) {
        const struct disk_backend_ops *ops = backend_table[i];
        if (ops->name && strcmp(ops->name, name) == 0)
            return backend_complete(ops) ? ops : NULL;
    }
    return NULL;
}

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
    qcow2_global_cleanup();
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
