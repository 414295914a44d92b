#pragma once
/* Small libc-only helpers: parsing of config-style scalars, string lists, bounded copies. */

#include <stdbool.h>
#include <stddef.h>

/* Parse an oslo.config boolean: true/false, yes/no, on/off, 1/0 (case-insensitive).
 * Returns 0 and writes *ret_b, or -EINVAL. */
int util_parse_bool(const char *s, bool *ret_b);

/* Parse a base-10 integer in [min, max] with nothing after it but spaces.
 * Returns 0 and writes *ret_v, -EINVAL if not a number, -ERANGE if out of range. */
int util_parse_long(const char *s, long min, long max, long *ret_v);

/* Copy at most size-1 bytes of src into dst and terminate it. Returns strlen(src) so callers
 * can detect truncation (result >= size). */
size_t util_strlcpy(char *dst, const char *src, size_t size);

/* Split s at sep into a NULL-terminated array of trimmed, non-empty strings.
 * Caller frees with util_strv_free(). Returns 0 or -ENOMEM. */
int util_split(const char *s, char sep, char ***ret_v);

/* Number of entries in a NULL-terminated string array (NULL counts as empty). */
size_t util_strv_length(char *const *v);

/* Free a NULL-terminated string array and its strings; NULL-safe. */
void util_strv_free(char **v);

/* Deep copy of a NULL-terminated string array (NULL gives NULL). Returns 0 or -ENOMEM. */
int util_strv_dup(char *const *v, char ***ret_v);

/* Duplicate the first n bytes of s as a string; NULL on allocation failure. */
char *util_strndup(const char *s, size_t n);

/* True if s is NULL or "". */
static inline bool
util_isempty(const char *s)
{
    return !s || !*s;
}

/* For _cleanup_(util_strv_freep) char **v. */
static inline void
util_strv_freep(char ***v)
{
    util_strv_free(*v);
}

/* Fill buf with 2*nbytes lowercase hex digits of kernel randomness plus a NUL (buf must hold
 * 2*nbytes+1). Returns 0 or -errno. */
int util_random_hex(char *buf, size_t nbytes);

/* A random (version 4) UUID in its 36-character text form; buf holds at least 37 bytes. */
int util_random_uuid(char *buf);
