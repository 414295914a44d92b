#pragma once
/* Logging: one line per event, "LEVEL module: text", to stderr or [DEFAULT] log_file. Debug is
 * enabled per module; a disabled debug call does not evaluate its arguments. Thread-safe: each
 * line is written with one write(2). Never pass secrets (passwords, keys, tokens) to these. */

#include <stdbool.h>

enum log_level {
    LOG_LEVEL_DEBUG,
    LOG_LEVEL_INFO,
    LOG_LEVEL_WARNING,
    LOG_LEVEL_ERROR,
    LOG_LEVEL_MAX,
};

enum log_module {
    LOG_MAIN,
    LOG_CONFIG,
    LOG_RPC,
    LOG_WORKER,
    LOG_QCOW2,
    LOG_RBD,
    LOG_GLANCE,
    LOG_JOURNAL,
    LOG_MODULE_MAX,
};

const char *log_level_to_string(enum log_level l);
const char *log_module_to_string(enum log_module m);

/* Parse a module name ("rpc"); returns the module or -EINVAL. */
int log_module_from_string(const char *s);

/* Enable debug for the modules whose bits are set in mask (bit i = module i); 0 disables all. */
void log_set_debug_mask(unsigned mask);

/* Send log lines to the file at path (appended, created 0640), or back to stderr when NULL.
 * Returns 0 or -errno; on failure logging stays where it was. */
int log_open_file(const char *path);

bool log_debug_enabled(enum log_module m);

void log_write(enum log_level l, enum log_module m, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_debug(m, ...)                                \
    do {                                                 \
        if (log_debug_enabled(m))                        \
            log_write(LOG_LEVEL_DEBUG, (m), __VA_ARGS__); \
    } while (0)
#define log_info(m, ...) log_write(LOG_LEVEL_INFO, (m), __VA_ARGS__)
#define log_warning(m, ...) log_write(LOG_LEVEL_WARNING, (m), __VA_ARGS__)
#define log_error(m, ...) log_write(LOG_LEVEL_ERROR, (m), __VA_ARGS__)
