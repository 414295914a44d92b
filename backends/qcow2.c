/* The qcow2 backend: instance disks that are qcow2 files of libvirt/QEMU guests. This file is
 * the only user of libvirt and libnbd in the agent. For now it holds the process-wide libvirt set
 * up; the live and cold snapshot paths come with the snapshot work. */

#include <errno.h>
#include <libnbd.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <stdio.h>

#include "backend.h"
#include "err.h"

/* libvirt prints every error to stderr by default; the agent reads them from the failing call
 * (virGetLastErrorMessage) and reports them once, so the default printer is switched off. */
static void
quiet_libvirt_errors(void *user, virErrorPtr e)
{
    (void)user;
    (void)e;
}

int
qcow2_global_init(struct agent_err *err)
{
    if (virInitialize() < 0)
        return agent_err_set(err, -EIO, "libvirt: virInitialize failed: %s",
                             virGetLastErrorMessage());
    virSetErrorFunc(NULL, quiet_libvirt_errors);
    return 0;
}

size_t
qcow2_library_versions(char *buf, size_t size)
{
    unsigned long v = 0;
    struct nbd_handle *nbd;
    const char *nbdv = "?";
    int n;

    virGetVersion(&v, NULL, NULL);
    nbd = nbd_create();
    if (nbd)
        nbdv = nbd_get_version(nbd);
    n = snprintf(buf, size, "libvirt %lu.%lu.%lu\nlibnbd %s\n", v / 1000000, v / 1000 % 1000,
                 v % 1000, nbdv ? nbdv : "?");
    nbd_close(nbd);
    return n < 0 ? 0 : (size_t)n;
}
