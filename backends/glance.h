#pragma once
/* The Glance v2 image-service client: what nova-compute's snapshot does with Glance (read the
 * image nova-api created, set the snapshot's properties and formats, stream the bytes into
 * PUT /v2/images/{id}/file, check what Glance stored, delete on failure), plus the two pieces
 * the rbd direct-snapshot path needs (add a location) and the tests need (create).
 *
 * A client holds one HTTP connection (kept alive between requests) and is used by one thread at
 * a time; threads that talk to Glance concurrently each make their own. libcurl must have been
 * initialised with http_global_init() (backend_global_init() does it) before the first client.
 *
 * Errors: every function returns 0 or a negative errno and fills err once, with the method, the
 * server and URL path, the HTTP status and Glance's own error text (one line), never the auth
 * token. HTTP statuses map to: 404/410 -ENOENT (image deleted or never existed), 409 -EBUSY,
 * 413 -EFBIG (store full or over quota), 401/403 -EACCES, other 4xx -EINVAL, 5xx -EIO
 * (retryable). Transport failures: -ECONNREFUSED, -ETIMEDOUT, -EHOSTUNREACH, -ECONNRESET (all
 * retryable). Bad arguments (an id that is not a plain token, a header value with a line
 * break, an unknown hash algorithm) are -EINVAL before anything is sent.
 *
 * Failover: api_servers are tried in turn, starting with the one that last answered. A request
 * that fails to reach a server before any byte of an image stream was pulled from its source
 * (connection refused, timeout, reset, no answer) or is answered 502/503/504 goes to the next
 * server; once every server failed, the whole list is tried again after a short pause, up to
 * num_retries more times. Nothing is retried once the upload source was read: it cannot
 * rewind. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct agent_err;
struct glance_client;

/* Room for an image id (Glance uses UUIDs, 36 characters) and its terminating NUL. */
#define GLANCE_ID_MAX 64
/* Room for a hex digest of up to 64 bytes (sha512) and its NUL. */
#define GLANCE_HEX_MAX 129
/* Room for a hash algorithm name as Glance reports it ("sha512", "sha3_256"). */
#define GLANCE_ALGO_MAX 32

/* Defaults of struct glance_options. */
#define GLANCE_CONNECT_TIMEOUT_MS 10000L  /* TCP (and TLS) connect to one api server */
#define GLANCE_LOW_SPEED_LIMIT    1024L   /* abort a transfer slower than this many bytes/s ... */
#define GLANCE_LOW_SPEED_TIME     60L     /* ... for this many seconds (uploads included) */
#define GLANCE_REQUEST_TIMEOUT_MS 120000L /* whole metadata request; uploads have none */
#define GLANCE_RETRY_BACKOFF_MS   500L    /* pause before the 2nd round; doubles, up to 8x */

/* Timeouts and pacing; every field must be >= 0 (0 disables that limit, except connect where 0
 * means libcurl's 300 s). */
struct glance_options {
    long connect_timeout_ms;
    long low_speed_limit; /* bytes per second */
    long low_speed_time;  /* seconds */
    long request_timeout_ms;
    long retry_backoff_ms;
};

/* Image statuses Glance v2 reports; GLANCE_IMAGE_STATUS_UNKNOWN stands for any other string. */
enum glance_image_status {
    GLANCE_IMAGE_QUEUED,
    GLANCE_IMAGE_SAVING,
    GLANCE_IMAGE_ACTIVE,
    GLANCE_IMAGE_KILLED,
    GLANCE_IMAGE_DELETED,
    GLANCE_IMAGE_PENDING_DELETE,
    GLANCE_IMAGE_DEACTIVATED,
    GLANCE_IMAGE_UPLOADING,
    GLANCE_IMAGE_IMPORTING,
    GLANCE_IMAGE_STATUS_UNKNOWN,
    GLANCE_IMAGE_STATUS_MAX,
};

const char *glance_image_status_to_string(enum glance_image_status s);
/* The status for Glance's string; GLANCE_IMAGE_STATUS_UNKNOWN for NULL or anything else. */
enum glance_image_status glance_image_status_from_string(const char *s);

/* An image as Glance returned it. The strings are borrowed from the parsed document and valid
 * until glance_image_release(); NULL when Glance sent null or nothing. */
struct glance_image {
    const char *id;
    const char *name;
    enum glance_image_status status;
    const char *status_text; /* the status string itself */
    int64_t size;            /* bytes stored; -1 while Glance has no data (null) */
    const char *disk_format;
    const char *container_format;
    const char *checksum; /* md5 of the data, hex */
    const char *os_hash_algo;
    const char *os_hash_value;
    void *doc; /* private: the whole document, for glance_image_property() */
};

/* Free what glance_image_get()/glance_image_create() put into img and zero it. Safe on a zeroed
 * struct and twice; usable as _cleanup_(glance_image_release) struct glance_image img = {0}. */
void glance_image_release(struct glance_image *img);

/* Any top-level string attribute of the image, core or custom property ("image_type",
 * "instance_uuid", "owner_id"). Borrowed like the fields above; NULL when absent, null or not a
 * string. */
const char *glance_image_property(const struct glance_image *img, const char *name);

/* The image's locations (Glance shows them with show_multiple_locations): how many, and the URL
 * of location i ("rbd://fsid/pool/image/snap", "file:///…"); borrowed like the other fields,
 * NULL if i is out of range. */
size_t glance_image_location_count(const struct glance_image *img);
const char *glance_image_location_url(const struct glance_image *img, size_t i);

/* A name/value pair for create and update. Core attributes are sent with their schema types:
 * min_disk and min_ram as integers, protected and os_hidden as booleans, the rest as strings.
 * Read-only attributes (id, status, size, checksum, os_hash_*, locations, ...) are -EINVAL.
 * value NULL (update only) removes a custom property. */
struct glance_prop {
    const char *name;
    const char *value;
};

/* Pull callback of an image stream: write up to len bytes into buf and set *ret_n; *ret_n = 0
 * means the end. Return 0, or a negative errno with err filled: the upload then aborts and
 * returns this error. */
typedef int (*glance_read_fn)(void *opaque, void *buf, size_t len, size_t *ret_n,
                              struct agent_err *err);

struct glance_upload_source {
    glance_read_fn read;
    void *opaque;
    /* Exact byte count (sent as Content-Length; the source must end exactly there), or -1 for
     * an unknown length (Transfer-Encoding: chunked, as nova sends). */
    int64_t size;
    /* Algorithm Glance uses for os_hash_value ([DEFAULT] hashing_algorithm, a Python hashlib
     * name); NULL: the image's os_hash_algo when already set, else Glance's default "sha512". */
    const char *hash_algo;
};

/* What an upload sent. bytes and elapsed are filled even when the upload fails; the digests
 * once Glance accepted the bytes (also when the check after it fails), empty strings before. */
struct glance_upload_result {
    uint64_t bytes;  /* bytes pulled from the source and sent */
    double elapsed;  /* seconds from the start of the PUT to Glance's answer */
    char md5[GLANCE_HEX_MAX];
    char sha256[GLANCE_HEX_MAX];
    char os_hash_algo[GLANCE_ALGO_MAX];
    char os_hash_value[GLANCE_HEX_MAX];
};

/* Make a client. api_servers: a non-empty NULL-terminated list of endpoints as in nova's
 * [glance] api_servers ("http://host:9292", scheme defaults to http, a trailing "/" or version
 * suffix "/v2" is dropped), copied. num_retries: extra rounds over the list (>= 0), as nova's
 * [glance] num_retries. auth_token (X-Auth-Token) and request_id (X-OpenStack-Request-ID) may
 * be NULL; both are copied and the token is never logged or put into an error message.
 * On success *ret is the client; caller frees with glance_client_free(). Returns 0, -EINVAL
 * (empty list, bad URL scheme, line break in a header value) or -ENOMEM. */
int glance_client_new(char *const *api_servers, long num_retries, const char *auth_token,
                      const char *request_id, struct glance_client **ret,
                      struct agent_err *err);

/* Free a client and close its connection; NULL-safe. */
void glance_client_free(struct glance_client *c);

static inline void
glance_client_freep(struct glance_client **c)
{
    glance_client_free(*c);
}

/* The defaults above, for callers that change one field. */
void glance_options_default(struct glance_options *ret);

/* Replace the client's timeouts (the defaults until called). -EINVAL if a field is negative. */
int glance_client_set_options(struct glance_client *c, const struct glance_options *opt,
                              struct agent_err *err);

/* GET /v2/images/{id} into *ret (written only on success; release it with
 * glance_image_release()). */
int glance_image_get(struct glance_client *c, const char *id, struct glance_image *ret,
                     struct agent_err *err);

/* POST /v2/images with the given attributes (name, disk_format, container_format, visibility,
 * custom properties ...), the way nova-api creates a snapshot's image. The new (queued) image is
 * written to *ret on success; release it with glance_image_release(). */
int glance_image_create(struct glance_client *c, const struct glance_prop *props, size_t n,
                        struct glance_image *ret, struct agent_err *err);

/* Set attributes and properties as nova's image update does: GET the image, then one PATCH
 * (application/openstack-images-v2.1-json-patch) with "replace" for attributes the image already
 * has (disk_format and container_format are always present, null until set), "add" for the
 * others, "remove" for value NULL on a present property; unchanged values are left out and an
 * empty patch is not sent. disk_format and container_format are set by passing them in props. */
int glance_image_update(struct glance_client *c, const char *id, const struct glance_prop *props,
                        size_t n, struct agent_err *err);

/* Stream src into PUT /v2/images/{id}/file (application/octet-stream; chunked unless src->size
 * is given), hashing md5, sha256 and the os_hash algorithm while the bytes go out, then GET the
 * image and verify it: status active, size == bytes sent, checksum == md5, os_hash_value == our
 * digest; any mismatch is -EIO naming the field. The image must be queued (Glance answers 409,
 * -EBUSY, otherwise). A failing read callback aborts the transfer and its error is returned as
 * it set it; Glance then puts the image back to queued. An image deleted while it was uploading
 * is -ENOENT ("image deleted"). res (required) is filled as its comment says. */
int glance_image_upload(struct glance_client *c, const char *id,
                        const struct glance_upload_source *src, struct glance_upload_result *res,
                        struct agent_err *err);

/* DELETE /v2/images/{id}. -ENOENT if it is already gone (callers cleaning up ignore that). */
int glance_image_delete(struct glance_client *c, const char *id, struct agent_err *err);

/* PATCH add /locations/- {"url": url, "metadata": metadata_json or {}}: nova's rbd direct
 * snapshot ("rbd://fsid/pool/image/snap"). Needs show_multiple_locations in Glance; Glance reads
 * the size from the store and makes the image active. metadata_json must be a JSON object
 * (-EINVAL otherwise). */
int glance_image_add_location(struct glance_client *c, const char *id, const char *url,
                              const char *metadata_json, struct agent_err *err);

/* Pure helpers, exported for the unit tests. */

/* The errno an HTTP status stands for (table above); 0 for 1xx-2xx, -EPROTO for 3xx. */
int glance_http_status_to_errno(long status);

/* Glance's error text from a response body, as one trimmed line: the "message" of a JSON error,
 * else the text of an HTML or plain body (markup and entities removed, whitespace runs folded).
 * Writes at most size bytes including the NUL into buf; returns the length written. */
size_t glance_error_text(const char *body, size_t len, char *buf, size_t size);

/* The JSON patch glance_image_update() sends for props against the image document image_json
 * (Glance's GET answer). *ret_patch is "[...]" (possibly "[]"); caller frees it with free(). */
int glance_patch_build(const char *image_json, const struct glance_prop *props, size_t n,
                       char **ret_patch, struct agent_err *err);
