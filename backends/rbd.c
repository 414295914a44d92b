/* The rbd backend: instance disks in Ceph. This file is the only user of librados and librbd in
 * the agent. For now it reports the linked library versions; the snapshot and clone paths come
 * with the RBD work. */

#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stdio.h>

#include "backend.h"

size_t
cephrbd_library_versions(char *buf, size_t size)
{
    int ra, rb, rc, ba, bb, bc;
    int n;

    rados_version(&ra, &rb, &rc);
    rbd_version(&ba, &bb, &bc);
    n = snprintf(buf, size, "librados %d.%d.%d\nlibrbd %d.%d.%d\n", ra, rb, rc, ba, bb, bc);
    return n < 0 ? 0 : (size_t)n;
}
