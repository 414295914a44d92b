#pragma once
/* What the rest of the agent needs from backends/ before any snapshot runs: process-wide library
 * initialisation and the versions of the libraries linked, for --version and the start-up log.
 * The disk-backend interface (struct disk_backend_ops) joins this header with the first backend. */

#include <stddef.h>

struct agent_err;

/* Initialise libvirt (errors are read from the return path, never printed by libvirt) and
 * libcurl. Call once from main() before any thread starts. Returns 0 or -errno with err set. */
int backend_global_init(struct agent_err *err);

/* Release what backend_global_init() set up; call once after every thread has stopped. */
void backend_global_cleanup(void);

/* Write "library version" lines (libvirt, libnbd, librados, librbd, libcurl) into buf. */
void backend_library_versions(char *buf, size_t size);

/* Per-library pieces of the above, each in the file that owns the library. */
int qcow2_global_init(struct agent_err *err);
size_t qcow2_library_versions(char *buf, size_t size);
size_t cephrbd_library_versions(char *buf, size_t size);
int http_global_init(struct agent_err *err);
void http_global_cleanup(void);
size_t http_library_versions(char *buf, size_t size);
