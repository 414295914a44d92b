/* Line-oriented logging. Each line is formatted into a stack buffer and written with a single
 * write(2) so lines from different threads never interleave. Under systemd (JOURNAL_STREAM set)
 * lines carry no timestamp, as journald adds its own; elsewhere they start with UTC time. */

#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"

static const char *const level_names[LOG_LEVEL_MAX] = {
    [LOG_LEVEL_DEBUG] = "DEBUG",
    [LOG_LEVEL_INFO] = "INFO",
    [LOG_LEVEL_WARNING] = "WARNING",
    [LOG_LEVEL_ERROR] = "ERROR",
};

static const char *const module_names[LOG_MODULE_MAX] = {
    [LOG_MAIN] = "main",
    [LOG_CONFIG] = "config",
    [LOG_RPC] = "rpc",
    [LOG_WORKER] = "worker",
    [LOG_QCOW2] = "qcow2",
    [LOG_RBD] = "rbd",
    [LOG_GLANCE] = "glance",
    [LOG_JOURNAL] = "journal",
};

static atomic_uint debug_mask;
static atomic_int log_fd = 2;

const char *
log_level_to_string(enum log_level l)
{
    return (unsigned)l < LOG_LEVEL_MAX ? level_names[l] : "?";
}

const char *
log_module_to_string(enum log_module m)
{
    return (unsigned)m < LOG_MODULE_MAX ? module_names[m] : "?";
}

int
log_module_from_string(const char *s)
{
    for (int i = 0; i < LOG_MODULE_MAX; i++)
        if (strcmp(s, module_names[i]) == 0)
            return i;
    return -EINVAL;
}

void
log_set_debug_mask(unsigned mask)
{
    atomic_store(&debug_mask, mask);
}

bool
log_debug_enabled(enum log_module m)
{
    return (atomic_load(&debug_mask) >> m) & 1u;
}

int
log_open_file(const char *path)
{
    int old;

    if (!path) {
        old = atomic_exchange(&log_fd, 2);
    } else {
        int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
        if (fd < 0)
            return -errno;
        old = atomic_exchange(&log_fd, fd);
    }
    if (old != 2)
        close(old);
    return 0;
}

void
log_write(enum log_level l, enum log_module m, const char *fmt, ...)
{
    char line[4096];
    size_t n = 0;
    va_list ap;

    if (!getenv("JOURNAL_STREAM")) {
        struct timeval tv;
        struct tm tm;
        gettimeofday(&tv, NULL);
        gmtime_r(&tv.tv_sec, &tm);
        n = strftime(line, sizeof(line), "%Y-%m-%d %H:%M:%S", &tm);
        n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03ld ", (long)(tv.tv_usec / 1000));
    }
    n += (size_t)snprintf(line + n, sizeof(line) - n, "%s %s: ", log_level_to_string(l),
                          log_module_to_string(m));
    va_start(ap, fmt);
    int w = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
    va_end(ap);
    if (w < 0)
        w = 0;
    n += (size_t)w;
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2; /* truncated: keep the newline */
    /* One line is one line: a message with an embedded newline (from a library's error text)
     * must not forge a second log entry. */
    for (size_t i = 0; i < n; i++)
        if (line[i] == '\n' || line[i] == '\r')
            line[i] = ' ';
    line[n++] = '\n';
    ssize_t r = write(atomic_load(&log_fd), line, n);
    (void)r; /* nowhere left to report a failing log write */
}
