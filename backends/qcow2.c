/* The qcow2 backend: instance disks that are qcow2 (or raw) files or block devices of
 * libvirt/QEMU guests. This file is the only user of libvirt and libnbd in the agent.
 *
 * A view is a point-in-time NBD export of the guest's root disk, read through libnbd:
 *   - live (running or paused guest): libvirt's backup API in pull mode. QEMU exports the disk as
 *     it was at virDomainBackupBegin over a unix socket, copying blocks the guest overwrites
 *     meanwhile into a scratch qcow2 (copy-before-write), which the agent makes before the
 *     freeze (libvirt only opens it). The guest filesystems are frozen only around BackupBegin.
 *     The job's cleanup removes the scratch once the backup job has ended.
 *   - live fallback, when libvirt or QEMU cannot do backups: nova's way. A shallow block copy of
 *     the disk's top layer into a new qcow2 delta over the same backing file, wait for READY,
 *     abort (QEMU then leaves the delta a consistent copy of the moment of the abort; freeze
 *     around the abort), read delta + backing with a read-only qemu-nbd.
 *   - cold (guest shut off): the disk chain read with a read-only qemu-nbd, which also holds
 *     the image lock, so the guest cannot start and write under the reader.
 *   - [workarounds] disable_libvirt_livesnapshot: managed save, cold read, and close_view
 *     restores the guest from its save image (paused if it was paused).
 * The extent map comes from NBD block status ("base:allocation"), so holes and zeros are never
 * read.
 *
 * What may outlive a crash of the agent, and how cleanup_job() finds it again from the job alone
 * (uuid, job_id, scratch_dir), all named after the job in scratch_dir:
 *   <job>.sock, <job>.scratch.qcow2  backup job: found by its XML naming this socket; aborted
 *   <job>.delta.qcow2                block copy: found by the disk's <mirror> naming it; aborted
 *   <job>.frozen                     marker written before a freeze, removed once a thaw is
 *                                    confirmed: while it exists, cleanup thaws the guest
 *   <job>.managedsave                marker ("running"/"paused") written and synced before the
 *                                    managed save: while it exists, cleanup restores the guest
 * A qemu-nbd started by libnbd (socket activation) exits by itself when its client goes away.
 *
 * Every libvirt call is bounded: the connection sends keepalives (an event-loop thread runs
 * libvirt's default event loop for them and for block-job events) and guest-agent commands use
 * virDomainAgentSetResponseTimeout. libnbd has no timeouts of its own: every NBD command is
 * issued asynchronously and polled against a deadline. */

#define _GNU_SOURCE /* asprintf, pipe2 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libnbd.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "cleanup.h"
#include "err.h"
#include "imgenc.h"
#include "log.h"
#include "util.h"

extern char **environ;

/* libvirt keepalive: a ping after 5 s of silence, the connection is dead after 3 unanswered. */
#define KEEPALIVE_INTERVAL_S 5
#define KEEPALIVE_COUNT 3u
/* Guest-agent bound when the job does not give one. */
#define AGENT_TIMEOUT_DEFAULT_S 10
/* How long a thaw is retried after a freeze that timed out: the agent may run the freeze late
 * (libvirt gave up waiting, the command is still queued in the guest), so the thaw must follow
 * it in. At least this long, and at least three agent timeouts. */
#define THAW_GRACE_MIN_MS 15000
#define THAW_RETRY_PAUSE_MS 500
/* NBD: connection set-up (qemu-nbd start + handshake), then any single command. */
#define NBD_CONNECT_TIMEOUT_MS 30000
#define NBD_IO_TIMEOUT_MS 120000
/* Free space snapshots_directory must have before a view is made. */
#define SCRATCH_MIN_FREE (4u * 1024 * 1024)
/* Write size for the scratch image made ahead (its metadata: a few clusters). */
#define SCRATCH_CHUNK (64u * 1024)
/* Reads are split into requests of this size, several in flight (QEMU serves them in
 * parallel); block status asks for this much at a time (the server may answer less). */
#define NBD_READ_CHUNK (1u * 1024 * 1024)
#define NBD_READ_INFLIGHT 8
#define NBD_STATUS_CHUNK (2ull * 1024 * 1024 * 1024)
/* qemu-img create of a delta. */
#define QEMU_IMG_TIMEOUT_MS 60000
/* Block copy of the disk's top layer to READY. */
#define BLOCKCOPY_READY_TIMEOUT_MS (3600 * 1000)
#define BLOCKCOPY_POLL_MS 250

/* ---- small helpers ------------------------------------------------------------------------ */

static int64_t
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void
sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static bool
file_exists(const char *path)
{
    return path && access(path, F_OK) == 0;
}

/* unlink() that treats "already gone" as done. Returns 0 or -errno. */
static int
unlink_gone(const char *path)
{
    if (!path || unlink(path) == 0 || errno == ENOENT)
        return 0;
    return -errno;
}

/* Both set and equal. */
static bool
streq_both(const char *a, const char *b)
{
    return a && b && strcmp(a, b) == 0;
}

static char *
path_for_job(const char *dir, const char *job_id, const char *suffix)
{
    char *s = NULL;
    if (asprintf(&s, "%s/%s%s", dir, job_id, suffix) < 0)
        return NULL;
    return s;
}

/* Append s to f with the five XML special characters escaped. */
static void
xml_put_escaped(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '\'': fputs("&apos;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f); break;
        }
    }
}

/* ---- libvirt errors ----------------------------------------------------------------------- */

/* The last libvirt error of this thread as -errno. Read it right after the failing call: most
 * libvirt entry points (virDomainFree too) reset it. */
static int
libvirt_errno(void)
{
    virErrorPtr e = virGetLastError();

    if (!e)
        return -EIO;
    switch (e->code) {
    case VIR_ERR_NO_DOMAIN:
    case VIR_ERR_NO_DOMAIN_BACKUP:
        return -ENOENT;
    case VIR_ERR_NO_SUPPORT:
    case VIR_ERR_OPERATION_UNSUPPORTED:
    case VIR_ERR_ARGUMENT_UNSUPPORTED:
    case VIR_ERR_CONFIG_UNSUPPORTED:
        return -EOPNOTSUPP;
    case VIR_ERR_OPERATION_TIMEOUT:
    case VIR_ERR_AGENT_UNRESPONSIVE:
        return -ETIMEDOUT;
    case VIR_ERR_OPERATION_INVALID:
        return -EBUSY;
    case VIR_ERR_SYSTEM_ERROR:
    case VIR_ERR_RPC:
        return -ECONNRESET;
    default:
        return -EIO;
    }
}

static int
libvirt_error_code(void)
{
    virErrorPtr e = virGetLastError();
    return e ? e->code : VIR_ERR_OK;
}

/* Fill err with "<what>: <libvirt's message>" and return the matching -errno. Timeouts, a
 * lost connection and a busy domain are retryable. */
static int libvirt_fail(struct agent_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int
libvirt_fail(struct agent_err *err, const char *fmt, ...)
{
    char what[256];
    va_list ap;
    int r = libvirt_errno();

    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    if (r == -ETIMEDOUT || r == -ECONNRESET || r == -EBUSY)
        return agent_err_set_retryable(err, r, "libvirt: %s: %s", what, virGetLastErrorMessage());
    return agent_err_set(err, r, "libvirt: %s: %s", what, virGetLastErrorMessage());
}

static void
conn_unrefp(virConnectPtr *c)
{
    if (*c)
        virConnectClose(*c);
}

static void
dom_freep(virDomainPtr *d)
{
    if (*d)
        virDomainFree(*d);
}

/* ---- process-wide set-up: error printer off, event loop ----------------------------------- */

/* libvirt prints every error to stderr by default; the agent reads them from the failing call
 * (virGetLastErrorMessage) and reports them once, so the default printer is switched off. */
static void
quiet_libvirt_errors(void *user, virErrorPtr e)
{
    (void)user;
    (void)e;
}

/* Keepalives and domain events need libvirt's event loop to run: one thread runs it for the
 * whole process, started by the first open() and stopped by qcow2_global_cleanup(). */
static pthread_mutex_t event_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t event_thread;
static bool event_registered;
static bool event_running;
static atomic_bool event_stop;

static void *
event_loop(void *arg)
{
    (void)arg;
    while (!atomic_load(&event_stop)) {
        if (virEventRunDefaultImpl() < 0)
            sleep_ms(100); /* nothing useful to do with the error: keep the loop alive */
    }
    return NULL;
}

static int
event_loop_start(struct agent_err *err)
{
    int r = 0;

    pthread_mutex_lock(&event_lock);
    if (!event_registered)
        r = agent_err_set(err, -EINVAL, "libvirt: backend_global_init() was not called");
    else if (!event_running) {
        atomic_store(&event_stop, false);
        r = -pthread_create(&event_thread, NULL, event_loop, NULL);
        if (r < 0)
            agent_err_set(err, r, "libvirt: cannot start the event-loop thread: %s", strerror(-r));
        else
            event_running = true;
    }
    pthread_mutex_unlock(&event_lock);
    return r;
}

static void
event_wake(int timer, void *opaque)
{
    (void)opaque;
    virEventRemoveTimeout(timer);
}

int
qcow2_global_init(struct agent_err *err)
{
    if (virInitialize() < 0)
        return agent_err_set(err, -EIO, "libvirt: virInitialize failed: %s",
                             virGetLastErrorMessage());
    virSetErrorFunc(NULL, quiet_libvirt_errors);
    /* Before any connection exists: a connection made without an event implementation cannot
     * use keepalive. */
    pthread_mutex_lock(&event_lock);
    if (!event_registered && virEventRegisterDefaultImpl() == 0)
        event_registered = true;
    pthread_mutex_unlock(&event_lock);
    if (!event_registered)
        return agent_err_set(err, -EIO, "libvirt: virEventRegisterDefaultImpl failed: %s",
                             virGetLastErrorMessage());
    return 0;
}

void
qcow2_global_cleanup(void)
{
    pthread_mutex_lock(&event_lock);
    if (event_running) {
        atomic_store(&event_stop, true);
        /* virEventRunDefaultImpl sleeps in poll(): a zero timer makes it return. */
        virEventAddTimeout(0, event_wake, NULL, NULL);
        pthread_join(event_thread, NULL);
        event_running = false;
    }
    pthread_mutex_unlock(&event_lock);
}

size_t
qcow2_library_versions(char *buf, size_t size)
{
    unsigned long v = 0;
    struct nbd_handle *nbd = NULL;
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

/* ---- domain XML: the few attributes we need, parsed by hand ------------------------------- */

/* libvirt's own XML output is regular: elements are "<name attr='value' ...>", values quoted
 * with ' or ", the five entities escaped, no comments or CDATA inside <devices>. The scanner
 * relies on that and on the order libvirt writes a disk's children (driver, source,
 * backingStore, mirror, target), and refuses what it cannot read rather than guess. */

/* The next start tag "<name" (followed by space, '/' or '>') in [p, end), or NULL. */
static const char *
xml_find_tag(const char *p, const char *end, const char *name)
{
    size_t n = strlen(name);

    while (p && p < end) {
        p = memchr(p, '<', (size_t)(end - p));
        if (!p)
            return NULL;
        if ((size_t)(end - p) > n + 1 && memcmp(p + 1, name, n) == 0 &&
            (p[n + 1] == ' ' || p[n + 1] == '\t' || p[n + 1] == '\n' || p[n + 1] == '/' ||
             p[n + 1] == '>'))
            return p;
        p++;
    }
    return NULL;
}

/* The '>' closing the start tag at tag (quotes respected), or NULL. */
static const char *
xml_tag_end(const char *tag, const char *end)
{
    char q = 0;

    for (const char *p = tag; p < end; p++) {
        if (q) {
            if (*p == q)
                q = 0;
        } else if (*p == '\'' || *p == '"') {
            q = *p;
        } else if (*p == '>') {
            return p;
        }
    }
    return NULL;
}

static bool
xml_tag_self_closing(const char *tag_end)
{
    return tag_end[-1] == '/';
}

/* Decode [s, s+n) (entities &amp; &lt; &gt; &apos; &quot; &#N; &#xN;) into a new string. */
static int
xml_decode(const char *s, size_t n, char **ret)
{
    _cleanup_free_ char *out = malloc(n + 1);
    size_t o = 0;

    if (!out)
        return -ENOMEM;
    for (size_t i = 0; i < n;) {
        if (s[i] != '&') {
            out[o++] = s[i++];
            continue;
        }
        const char *semi = memchr(s + i, ';', n - i);
        if (!semi)
            return -EINVAL;
        size_t len = (size_t)(semi - (s + i)) + 1;
        static const struct {
            const char *ent;
            char c;
        } ents[] = {
            {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&apos;", '\''}, {"&quot;", '"'},
        };
        bool done = false;
        for (size_t k = 0; k < ELEMENTSOF(ents) && !done; k++) {
            if (len == strlen(ents[k].ent) && memcmp(s + i, ents[k].ent, len) == 0) {
                out[o++] = ents[k].c;
                done = true;
            }
        }
        if (!done) {
            /* A numeric reference; only ASCII is expected in paths and names. */
            unsigned long c = 0;
            char num[16];
            char *e;
            if (len < 4 || len > sizeof(num) || s[i + 1] != '#')
                return -EINVAL;
            memcpy(num, s + i + 2, len - 3);
            num[len - 3] = '\0';
            errno = 0;
            if (num[0] == 'x')
                c = strtoul(num + 1, &e, 16);
            else
                c = strtoul(num, &e, 10);
            if (errno || *e || c == 0 || c > 127)
                return -EINVAL;
            out[o++] = (char)c;
        }
        i += len;
    }
    out[o] = '\0';
    *ret = TAKE_PTR(out);
    return 0;
}

/* The decoded value of attribute name in the start tag [tag, tag_end). Returns 1 and *ret (the
 * caller frees it), 0 if the attribute is absent, or -errno. */
static int
xml_attr(const char *tag, const char *tag_end, const char *name, char **ret)
{
    size_t n = strlen(name);
    const char *p = tag;

    /* Skip the element name. */
    while (p < tag_end && *p != ' ' && *p != '\t' && *p != '\n')
        p++;
    while (p < tag_end) {
        while (p < tag_end && (*p == ' ' || *p == '\t' || *p == '\n'))
            p++;
        const char *an = p;
        while (p < tag_end && *p != '=' && *p != ' ' && *p != '>' && *p != '/')
            p++;
        if (p >= tag_end || *p != '=')
            return 0;
        size_t alen = (size_t)(p - an);
        p++;
        if (p >= tag_end || (*p != '\'' && *p != '"'))
            return -EINVAL;
        char q = *p++;
        const char *v = p;
        while (p < tag_end && *p != q)
            p++;
        if (p >= tag_end)
            return -EINVAL;
        if (alen == n && memcmp(an, name, n) == 0) {
            int r = xml_decode(v, (size_t)(p - v), ret);
            return r < 0 ? r : 1;
        }
        p++;
    }
    return 0;
}

/* Attribute of the first <tag> in [p, end) (NULL *ret if the tag or attribute is absent). */
static int
xml_first_attr(const char *p, const char *end, const char *tag, const char *attr, char **ret)
{
    const char *t = xml_find_tag(p, end, tag);
    const char *te;

    *ret = NULL;
    if (!t)
        return 0;
    te = xml_tag_end(t, end);
    if (!te)
        return -EINVAL;
    return xml_attr(t, te, attr, ret);
}

/* One <disk> of a domain, as far as snapshots care. */
struct disk_info {
    char *target;         /* "vda" */
    char *device;         /* "disk", "cdrom", ... */
    char *type;           /* "file", "block", "network", "volume" */
    char *format;         /* <driver type>: "qcow2", "raw" */
    char *source;         /* file or dev path; NULL for other types */
    char *backing;        /* the first backing store's path, NULL if none or not reported */
    char *backing_format;
    char *mirror_file;    /* an active block copy's destination */
    bool mirror_ready;
};

struct disk_list {
    struct disk_info *v;
    size_t n;
};

static void
disk_list_free(struct disk_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        struct disk_info *d = &l->v[i];
        free(d->target);
        free(d->device);
        free(d->type);
        free(d->format);
        free(d->source);
        free(d->backing);
        free(d->backing_format);
        free(d->mirror_file);
    }
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* Parse one <disk> element [ds, de). */
static int
parse_disk(const char *ds, const char *de, struct disk_info *d)
{
    const char *te = xml_tag_end(ds, de);
    const char *bs, *mi, *mi_end = NULL, *src, *limit;
    char *ready = NULL;
    int r = 0;

    if (!te)
        return -EINVAL;
    if ((r = xml_attr(ds, te, "type", &d->type)) < 0 ||
        (r = xml_attr(ds, te, "device", &d->device)) < 0)
        return r;
    if ((r = xml_first_attr(te, de, "driver", "type", &d->format)) < 0 ||
        (r = xml_first_attr(te, de, "target", "dev", &d->target)) < 0)
        return r;

    /* The active block copy, if any: <mirror file='...' ready='yes'> (file= is kept for
     * compatibility; newer output also has a <source> child). */
    mi = xml_find_tag(te, de, "mirror");
    if (mi) {
        const char *mte = xml_tag_end(mi, de);
        if (!mte)
            return -EINVAL;
        mi_end = xml_tag_self_closing(mte) ? mte + 1 : strstr(mte, "</mirror>");
        if (!mi_end || mi_end > de)
            return -EINVAL;
        if ((r = xml_attr(mi, mte, "file", &d->mirror_file)) < 0 ||
            (r = xml_attr(mi, mte, "ready", &ready)) < 0)
            return r;
        if (!d->mirror_file && (r = xml_first_attr(mte, mi_end, "source", "file",
                                                   &d->mirror_file)) < 0)
            return r;
        d->mirror_ready = ready && strcmp(ready, "yes") == 0;
        free(ready);
    }

    /* The disk's own backing store: the first <backingStore> outside the mirror. */
    bs = xml_find_tag(te, de, "backingStore");
    if (bs && mi && bs > mi && bs < mi_end)
        bs = xml_find_tag(mi_end, de, "backingStore");

    /* The disk's own source comes before its backing store and its mirror. */
    limit = de;
    if (bs && bs < limit)
        limit = bs;
    if (mi && mi < limit)
        limit = mi;
    src = xml_find_tag(te, limit, "source");
    if (src) {
        const char *ste = xml_tag_end(src, limit);
        if (!ste)
            return -EINVAL;
        if (d->type && strcmp(d->type, "block") == 0)
            r = xml_attr(src, ste, "dev", &d->source);
        else if (d->type && strcmp(d->type, "file") == 0)
            r = xml_attr(src, ste, "file", &d->source);
        if (r < 0)
            return r;
    }

    if (bs) {
        const char *bte = xml_tag_end(bs, de);
        if (!bte)
            return -EINVAL;
        if (!xml_tag_self_closing(bte)) {
            /* Its own <format> and <source> come before any nested <backingStore>. */
            const char *nested = xml_find_tag(bte + 1, de, "backingStore");
            const char *bend = nested ? nested : de;
            _cleanup_free_ char *btype = NULL;
            if ((r = xml_attr(bs, bte, "type", &btype)) < 0 ||
                (r = xml_first_attr(bte, bend, "format", "type", &d->backing_format)) < 0)
                return r;
            if (btype && strcmp(btype, "file") == 0)
                r = xml_first_attr(bte, bend, "source", "file", &d->backing);
            else if (btype && strcmp(btype, "block") == 0)
                r = xml_first_attr(bte, bend, "source", "dev", &d->backing);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

/* Every <disk> of a domain's XML. */
static int
parse_disks(const char *xml, struct disk_list *ret)
{
    const char *end = xml + strlen(xml);
    const char *p = xml;
    struct disk_list l = {0};
    int r = 0;

    while ((p = xml_find_tag(p, end, "disk"))) {
        const char *te = xml_tag_end(p, end);
        const char *de;
        struct disk_info *nv;

        if (!te) {
            r = -EINVAL;
            break;
        }
        de = xml_tag_self_closing(te) ? te + 1 : strstr(te, "</disk>");
        if (!de) {
            r = -EINVAL;
            break;
        }
        nv = realloc(l.v, (l.n + 1) * sizeof(*l.v));
        if (!nv) {
            r = -ENOMEM;
            break;
        }
        l.v = nv;
        memset(&l.v[l.n], 0, sizeof(l.v[l.n]));
        l.n++;
        r = parse_disk(p, de, &l.v[l.n - 1]);
        if (r < 0)
            break;
        p = de;
    }
    if (r < 0) {
        disk_list_free(&l);
        return r;
    }
    *ret = l;
    return 0;
}

/* The instance's root disk: the disk whose target is root_device_name ("/dev/vda" or "vda"),
 * else the first disk with device='disk' (nova's find_disk). NULL if none. */
static const struct disk_info *
root_disk(const struct disk_list *l, const char *root_device_name)
{
    if (!util_isempty(root_device_name)) {
        const char *name = root_device_name;
        if (strncmp(name, "/dev/", 5) == 0)
            name += 5;
        for (size_t i = 0; i < l->n; i++)
            if (l->v[i].target && strcmp(l->v[i].target, name) == 0)
                return &l->v[i];
        return NULL;
    }
    for (size_t i = 0; i < l->n; i++)
        if (l->v[i].target && (!l->v[i].device || strcmp(l->v[i].device, "disk") == 0))
            return &l->v[i];
    return NULL;
}

/* A disk this backend can read: a local file or block device, qcow2 or raw, absolute path
 * (qemu-nbd would read "json:..." or "-x" otherwise). */
static bool
disk_supported(const struct disk_info *d)
{
    return d->type && (strcmp(d->type, "file") == 0 || strcmp(d->type, "block") == 0) &&
           d->format && (strcmp(d->format, "qcow2") == 0 || strcmp(d->format, "raw") == 0) &&
           d->source && d->source[0] == '/';
}

/* ---- the connection ----------------------------------------------------------------------- */

struct qcow2_handle {
    pthread_mutex_t lock;
    char *uri;          /* NULL: libvirt's default */
    virConnectPtr conn; /* reopened when found dead (libvirtd restarted, keepalive expired) */
};

static int
conn_open(const char *uri, virConnectPtr *ret, struct agent_err *err)
{
    virConnectPtr c = virConnectOpen(uri);
    int r;

    if (!c)
        return libvirt_fail(err, "connect to '%s'", uri ? uri : "(default)");
    r = virConnectSetKeepAlive(c, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT);
    if (r < 0 && libvirt_error_code() != VIR_ERR_NO_SUPPORT) {
        r = libvirt_fail(err, "keepalive on '%s'", uri ? uri : "(default)");
        virConnectClose(c);
        return r;
    }
    /* 1 (the daemon has no keepalive) and NO_SUPPORT (a driver without a daemon, e.g.
     * test:///default) leave nothing to time out. */
    log_debug(LOG_QCOW2, "connected to %s (keepalive %s)", uri ? uri : "(default)",
              r == 0 ? "on" : "not supported");
    *ret = c;
    return 0;
}

/* A reference to a live connection; the caller drops it with virConnectClose. */
static int
handle_conn(struct qcow2_handle *h, virConnectPtr *ret, struct agent_err *err)
{
    int r = 0;

    pthread_mutex_lock(&h->lock);
    if (h->conn && virConnectIsAlive(h->conn) != 1) {
        log_debug(LOG_QCOW2, "libvirt connection lost, reconnecting");
        virConnectClose(h->conn);
        h->conn = NULL;
    }
    if (!h->conn)
        r = conn_open(h->uri, &h->conn, err);
    if (r == 0) {
        virConnectRef(h->conn);
        *ret = h->conn;
    }
    pthread_mutex_unlock(&h->lock);
    return r;
}

static int
qcow2_open(const struct disk_backend_config *cfg, void **ret_h, struct agent_err *err)
{
    struct qcow2_handle *h;
    int r;

    r = event_loop_start(err);
    if (r < 0)
        return r;
    h = calloc(1, sizeof(*h));
    if (!h)
        return agent_err_set(err, -ENOMEM, "qcow2: out of memory");
    pthread_mutex_init(&h->lock, NULL);
    if (!util_isempty(cfg->connection_uri) && !(h->uri = strdup(cfg->connection_uri))) {
        r = agent_err_set(err, -ENOMEM, "qcow2: out of memory");
        goto fail;
    }
    r = conn_open(h->uri, &h->conn, err);
    if (r < 0)
        goto fail;
    *ret_h = h;
    return 0;
 fail:
    pthread_mutex_destroy(&h->lock);
    free(h->uri);
    free(h);
    return r;
}

static void
qcow2_close(void *hv)
{
    struct qcow2_handle *h = hv;

    if (!h)
        return;
    if (h->conn)
        virConnectClose(h->conn);
    pthread_mutex_destroy(&h->lock);
    free(h->uri);
    free(h);
}

/* The domain with the job's UUID: 0, -ENOENT if there is none, or -errno. */
static int
domain_lookup(virConnectPtr conn, const char *uuid, virDomainPtr *ret, struct agent_err *err)
{
    virDomainPtr d = virDomainLookupByUUIDString(conn, uuid);

    if (!d) {
        if (libvirt_error_code() == VIR_ERR_NO_DOMAIN)
            return agent_err_set(err, -ENOENT, "qcow2: no domain with UUID %s", uuid);
        return libvirt_fail(err, "look up domain %s", uuid);
    }
    *ret = d;
    return 0;
}

static int
domain_disks(virDomainPtr dom, const char *uuid, struct disk_list *ret, struct agent_err *err)
{
    _cleanup_free_ char *xml = virDomainGetXMLDesc(dom, 0);
    int r;

    if (!xml)
        return libvirt_fail(err, "XML of domain %s", uuid);
    r = parse_disks(xml, ret);
    if (r < 0)
        return agent_err_set(err, r, "qcow2: cannot parse the disks of domain %s", uuid);
    return 0;
}

static int
qcow2_owns(void *hv, const struct snap_job *job, struct agent_err *err)
{
    struct qcow2_handle *h = hv;
    _cleanup_(conn_unrefp) virConnectPtr conn = NULL;
    _cleanup_(dom_freep) virDomainPtr dom = NULL;
    struct disk_list disks = {0};
    const struct disk_info *d;
    int r;

    r = handle_conn(h, &conn, err);
    if (r < 0)
        return r;
    r = domain_lookup(conn, job->instance_uuid, &dom, NULL);
    if (r == -ENOENT)
        return 0;
    if (r < 0)
        return libvirt_fail(err, "look up domain %s", job->instance_uuid);
    r = domain_disks(dom, job->instance_uuid, &disks, err);
    if (r < 0)
        return r;
    d = root_disk(&disks, job->root_device_name);
    r = d && disk_supported(d) ? 1 : 0;
    log_debug(LOG_QCOW2, "domain %s root disk %s (%s %s): %s", job->instance_uuid,
              d && d->target ? d->target : "-", d && d->type ? d->type : "-",
              d && d->format ? d->format : "-", r ? "ours" : "not ours");
    disk_list_free(&disks);
    return r;
}

/* ---- external commands -------------------------------------------------------------------- */

/* Run argv (PATH searched) with stdin and stdout on /dev/null; its stderr (first errsize-1
 * bytes) goes to errbuf. Killed after timeout_ms. Returns 0 if it exited 0, else -EIO
 * (-ETIMEDOUT if killed, -errno if it could not start). */
static int
run_command(char *const argv[], int64_t timeout_ms, char *errbuf, size_t errsize)
{
    posix_spawn_file_actions_t fa;
    int pfd[2];
    pid_t pid = -1;
    size_t got = 0;
    int64_t deadline = now_ms() + timeout_ms;
    int status = 0, r;
    bool timed_out = false;

    errbuf[0] = '\0';
    if (pipe2(pfd, O_CLOEXEC) < 0)
        return -errno;
    r = -posix_spawn_file_actions_init(&fa);
    if (r == 0) {
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, pfd[1], 2);
        r = -posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
        posix_spawn_file_actions_destroy(&fa);
    }
    close(pfd[1]);
    if (r < 0) {
        close(pfd[0]);
        snprintf(errbuf, errsize, "cannot run %s: %s", argv[0], strerror(-r));
        return r;
    }
    for (;;) {
        struct pollfd p = {.fd = pfd[0], .events = POLLIN};
        int64_t left = deadline - now_ms();
        char tmp[512];
        ssize_t n;

        if (left <= 0) {
            timed_out = true;
            break;
        }
        r = poll(&p, 1, (int)(left > INT_MAX ? INT_MAX : left));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            continue;
        n = read(pfd[0], tmp, sizeof(tmp));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* EOF: the child closed stderr, it is exiting */
        if (errsize > 1 && got < errsize - 1) {
            size_t c = (size_t)n < errsize - 1 - got ? (size_t)n : errsize - 1 - got;
            memcpy(errbuf + got, tmp, c);
            got += c;
            errbuf[got] = '\0';
        }
    }
    close(pfd[0]);
    if (timed_out)
        kill(pid, SIGKILL);
    for (;;) {
        pid_t w = waitpid(pid, &status, timed_out ? 0 : WNOHANG);
        if (w == pid)
            break;
        if (w < 0 && errno != EINTR)
            return -errno;
        if (w == 0 && now_ms() >= deadline) {
            kill(pid, SIGKILL);
            timed_out = true;
        } else if (w == 0) {
            sleep_ms(10);
        }
    }
    /* Trim the trailing newline of the child's message. */
    while (got > 0 && (errbuf[got - 1] == '\n' || errbuf[got - 1] == '\r'))
        errbuf[--got] = '\0';
    if (timed_out)
        return -ETIMEDOUT;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EIO;
}

/* ---- NBD ---------------------------------------------------------------------------------- */

static int
export_fail(struct agent_err *err, const char *what)
{
    int e = nbd_get_errno();
    int r = e > 0 ? -e : -EIO;
    const char *msg = nbd_get_error();
    return agent_err_set(err, r, "libnbd: %s: %s", what, msg ? msg : "unknown error");
}

/* Wait until the connection set up by an nbd_aio_connect_* call is ready. */
static int
export_wait_ready(struct nbd_handle *nbd, const char *what, struct agent_err *err)
{
    int64_t deadline = now_ms() + NBD_CONNECT_TIMEOUT_MS;

    for (;;) {
        if (nbd_aio_is_ready(nbd) == 1)
            return 0;
        if (nbd_aio_is_dead(nbd) == 1 || nbd_aio_is_closed(nbd) == 1)
            return agent_err_set(err, -ECONNRESET, "libnbd: %s: connection closed", what);
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return agent_err_set(err, -ETIMEDOUT, "libnbd: %s: no answer in %d ms", what,
                                 NBD_CONNECT_TIMEOUT_MS);
        if (nbd_poll(nbd, (int)left) < 0)
            return export_fail(err, what);
    }
}

/* Wait for command cookie to complete and retire it. -ETIMEDOUT leaves it in flight (the
 * handle is then unusable: the caller marks it broken). */
static int
export_wait_cookie(struct nbd_handle *nbd, int64_t cookie, const char *what, struct agent_err *err)
{
    int64_t deadline = now_ms() + NBD_IO_TIMEOUT_MS;

    for (;;) {
        int r = nbd_aio_command_completed(nbd, (uint64_t)cookie);
        if (r == 1)
            return 0;
        if (r < 0)
            return export_fail(err, what);
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return agent_err_set(err, -ETIMEDOUT, "libnbd: %s: no reply in %d ms", what,
                                 NBD_IO_TIMEOUT_MS);
        if (nbd_poll(nbd, (int)left) < 0)
            return export_fail(err, what);
    }
}

static int
export_new(const char *export_name, struct nbd_handle **ret, struct agent_err *err)
{
    struct nbd_handle *nbd = nbd_create();

    if (!nbd)
        return export_fail(err, "create handle");
    if (nbd_add_meta_context(nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
        nbd_set_export_name(nbd, export_name) < 0) {
        int r = export_fail(err, "set up handle");
        nbd_close(nbd);
        return r;
    }
    *ret = nbd;
    return 0;
}

/* Connect to the export of a backup job. */
static int
export_connect_socket(const char *sock, const char *export_name, struct nbd_handle **ret,
                   struct agent_err *err)
{
    struct nbd_handle *nbd = NULL;
    int r;

    r = export_new(export_name, &nbd, err);
    if (r < 0)
        return r;
    if (nbd_aio_connect_unix(nbd, sock) < 0)
        r = export_fail(err, sock);
    else
        r = export_wait_ready(nbd, sock, err);
    if (r < 0) {
        nbd_close(nbd);
        return r;
    }
    *ret = nbd;
    return 0;
}

/* Start a read-only qemu-nbd on an image (its backing chain included) and connect to it. The
 * server lives as long as the handle: nbd_close() ends it, and it exits by itself when the
 * agent dies (the client socket closes). O_DIRECT first (--cache=none, like nova's qemu-img
 * convert -t none: a snapshot should not push the host's page cache out), the page cache if
 * the file system refuses O_DIRECT (tmpfs). qemu-nbd's own messages go to our stderr. */
static int
export_connect_image(const char *path, const char *format, struct nbd_handle **ret,
                  struct agent_err *err)
{
    _cleanup_free_ char *fmt = NULL;
    char a0[] = "qemu-nbd", a1[] = "--read-only", a2[] = "--shared=1", a3[] = "--cache=none",
         a4[] = "--aio=native", a5[] = "--";
    struct agent_err terr = {0};
    int r = 0;

    if (asprintf(&fmt, "--format=%s", format) < 0)
        return agent_err_set(err, -ENOMEM, "qcow2: out of memory");
    char *direct[] = {a0, a1, fmt, a2, a3, a4, a5, (char *)path, NULL};
    char *cached[] = {a0, a1, fmt, a2, a5, (char *)path, NULL};
    char **argvs[] = {direct, cached};
    for (size_t i = 0; i < ELEMENTSOF(argvs); i++) {
        struct nbd_handle *nbd = NULL;
        agent_err_clear(&terr);
        r = export_new("", &nbd, err);
        if (r < 0)
            return r;
        if (nbd_aio_connect_systemd_socket_activation(nbd, argvs[i]) < 0)
            r = export_fail(&terr, "start qemu-nbd");
        else
            r = export_wait_ready(nbd, "qemu-nbd", &terr);
        if (r == 0) {
            *ret = nbd;
            return 0;
        }
        nbd_close(nbd);
    }
    return agent_err_set(err, r, "qcow2: qemu-nbd cannot serve %s (%s): %s", path, format,
                         terr.msg);
}

/* ---- the extent map ----------------------------------------------------------------------- */

struct extent_vec {
    struct imgenc_extent *v;
    size_t n, cap;
    uint64_t data_bytes;
};

static int
extent_add(struct extent_vec *ev, uint64_t off, uint64_t len, enum imgenc_extent_type type)
{
    if (len == 0)
        return 0;
    if (type == IMGENC_EXTENT_DATA)
        ev->data_bytes += len;
    if (ev->n > 0) {
        struct imgenc_extent *last = &ev->v[ev->n - 1];
        if (last->type == type && last->offset + last->length == off) {
            last->length += len;
            return 0;
        }
    }
    if (ev->n == ev->cap) {
        size_t nc = ev->cap ? ev->cap * 2 : 64;
        struct imgenc_extent *nv = realloc(ev->v, nc * sizeof(*nv));
        if (!nv)
            return -ENOMEM;
        ev->v = nv;
        ev->cap = nc;
    }
    ev->v[ev->n++] = (struct imgenc_extent){.offset = off, .length = len, .type = type};
    return 0;
}

struct status_ctx {
    struct extent_vec *ev;
    uint64_t next; /* the offset the next extent must start at */
    uint64_t end;  /* export size */
    int error;
};

static int
status_extent(void *opaque, const char *metacontext, uint64_t offset, uint32_t *entries,
              size_t nr_entries, int *error)
{
    struct status_ctx *c = opaque;

    (void)error;
    if (strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
        return 0;
    if (offset != c->next) {
        c->error = -EPROTO;
        return 0;
    }
    for (size_t i = 0; i + 1 < nr_entries && c->next < c->end; i += 2) {
        uint64_t len = entries[i];
        uint32_t flags = entries[i + 1];
        if (len > c->end - c->next)
            len = c->end - c->next;
        /* Only ranges the server promises read as zeros are skipped. A hole without the zero
         * flag may read as anything (NBD spec), so it is read like data. */
        int r = extent_add(c->ev, c->next, len,
                           flags & LIBNBD_STATE_ZERO ? IMGENC_EXTENT_ZERO : IMGENC_EXTENT_DATA);
        if (r < 0) {
            c->error = r;
            return 0;
        }
        c->next += len;
    }
    return 0;
}

/* The whole export as extents: zero-flagged ranges ZERO, the rest DATA, adjacent ranges of one
 * type merged. Without base:allocation the whole disk is one DATA extent. */
static int
map_extents(struct nbd_handle *nbd, uint64_t size, struct extent_vec *ev, struct agent_err *err)
{
    struct status_ctx c = {.ev = ev, .next = 0, .end = size};
    int r;

    if (nbd_can_meta_context(nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) != 1)
        return extent_add(ev, 0, size, IMGENC_EXTENT_DATA);
    while (c.next < size) {
        uint64_t start = c.next;
        uint64_t count = size - start < NBD_STATUS_CHUNK ? size - start : NBD_STATUS_CHUNK;
        int64_t cookie = nbd_aio_block_status(
            nbd, count, start, (nbd_extent_callback){.callback = status_extent, .user_data = &c},
            NBD_NULL_COMPLETION, 0);
        if (cookie < 0)
            return export_fail(err, "block status");
        r = export_wait_cookie(nbd, cookie, "block status", err);
        if (r < 0)
            return r;
        if (c.error < 0)
            return agent_err_set(err, c.error, "libnbd: block status at %" PRIu64 ": %s", start,
                                 c.error == -EPROTO ? "reply does not start where asked"
                                                    : "out of memory");
        if (c.next == start)
            return agent_err_set(err, -EPROTO, "libnbd: block status at %" PRIu64
                                 ": empty reply", start);
    }
    return 0;
}

/* ---- views -------------------------------------------------------------------------------- */

struct view_priv {
    /* The job, copied: close_view and the cleanup need it. */
    char *job_id;
    char *uuid;
    char *scratch_dir;
    int agent_timeout_s;
    /* <scratch_dir>/<job_id>.*: see the file comment. */
    char *sock_path;
    char *scratch_path;
    char *delta_path;
    char *frozen_marker;
    char *save_marker;

    struct nbd_handle *nbd;
    bool nbd_broken;       /* a command timed out: the handle is not used again */
    uint64_t size;

    int64_t save_t0;       /* managed save started (monotonic ms) */
    bool closed;           /* close_view completed */
};

static void
view_priv_free(struct view_priv *p)
{
    if (!p)
        return;
    if (p->nbd)
        nbd_close(p->nbd);
    free(p->job_id);
    free(p->uuid);
    free(p->scratch_dir);
    free(p->sock_path);
    free(p->scratch_path);
    free(p->delta_path);
    free(p->frozen_marker);
    free(p->save_marker);
    free(p);
}

static void
view_free(struct disk_view *v)
{
    if (!v)
        return;
    view_priv_free(v->priv);
    free(v->extents);
    free(v);
}

static void
view_freep(struct disk_view **v)
{
    view_free(*v);
}

/* The paths of a job's leftovers. */
struct job_paths {
    char *sock, *scratch, *delta, *frozen, *saved;
};

static void
job_paths_free(struct job_paths *jp)
{
    free(jp->sock);
    free(jp->scratch);
    free(jp->delta);
    free(jp->frozen);
    free(jp->saved);
    *jp = (struct job_paths){0};
}

static bool
job_id_valid(const char *id)
{
    size_t n = id ? strlen(id) : 0;

    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((id[i] >= 'a' && id[i] <= 'z') || (id[i] >= '0' && id[i] <= '9') || id[i] == '-'))
            return false;
    return true;
}

static int
job_paths_make(const struct snap_job *job, struct job_paths *jp, struct agent_err *err)
{
    struct sockaddr_un sa;

    *jp = (struct job_paths){0};
    if (!job_id_valid(job->job_id))
        return agent_err_set(err, -EINVAL, "qcow2: job id '%s' is not [a-z0-9-]{1,64}",
                             job->job_id ? job->job_id : "");
    if (util_isempty(job->scratch_dir) || job->scratch_dir[0] != '/')
        return agent_err_set(err, -EINVAL, "qcow2: scratch directory '%s' is not absolute",
                             job->scratch_dir ? job->scratch_dir : "");
    if (util_isempty(job->instance_uuid))
        return agent_err_set(err, -EINVAL, "qcow2: job %s has no instance UUID", job->job_id);
    *jp = (struct job_paths){
        .sock = path_for_job(job->scratch_dir, job->job_id, ".sock"),
        .scratch = path_for_job(job->scratch_dir, job->job_id, ".scratch.qcow2"),
        .delta = path_for_job(job->scratch_dir, job->job_id, ".delta.qcow2"),
        .frozen = path_for_job(job->scratch_dir, job->job_id, ".frozen"),
        .saved = path_for_job(job->scratch_dir, job->job_id, ".managedsave"),
    };
    if (!jp->sock || !jp->scratch || !jp->delta || !jp->frozen || !jp->saved) {
        job_paths_free(jp);
        agent_err_set(err, -ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    if (strlen(jp->sock) >= sizeof(sa.sun_path)) {
        agent_err_set(err, -ENAMETOOLONG, "qcow2: socket path %s is longer than %zu", jp->sock,
                      sizeof(sa.sun_path) - 1);
        job_paths_free(jp);
        return -ENAMETOOLONG;
    }
    return 0;
}

/* Create an empty marker file; synced when it must survive a host crash. */
static int
marker_write(const char *path, const char *content, bool sync, struct agent_err *err)
{
    _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    size_t n = strlen(content);

    if (fd < 0)
        return agent_err_set(err, -errno, "qcow2: create %s: %s", path, strerror(errno));
    if (write(fd, content, n) != (ssize_t)n || (sync && fsync(fd) < 0))
        return agent_err_set(err, -EIO, "qcow2: write %s: %s", path, strerror(errno));
    return 0;
}

/* ---- quiesce ------------------------------------------------------------------------------ */

static int
agent_timeout(int job_timeout_s)
{
    return job_timeout_s > 0 ? job_timeout_s : AGENT_TIMEOUT_DEFAULT_S;
}

/* Thaw the guest's filesystems. may_be_pending: a freeze timed out and may still run inside the
 * guest, so an unanswered thaw is retried until the grace period ends. Returns 0 once a thaw
 * succeeded (the frozen marker is then removed), or -errno with err filled. */
static int
quiesce_thaw(virDomainPtr dom, const char *marker, int timeout_s, bool may_be_pending,
             struct agent_err *err)
{
    int64_t grace = (int64_t)timeout_s * 3000;
    int64_t deadline = now_ms() + (may_be_pending ? (grace > THAW_GRACE_MIN_MS ? grace
                                                                              : THAW_GRACE_MIN_MS)
                                                  : 0);
    int attempts = 0;

    for (;;) {
        int n = virDomainFSThaw(dom, NULL, 0, 0);
        attempts++;
        if (n >= 0) {
            log_debug(LOG_QCOW2, "thawed %d filesystem(s) after %d attempt(s)", n,
                      attempts);
            unlink_gone(marker);
            return 0;
        }
        if (libvirt_error_code() != VIR_ERR_AGENT_UNRESPONSIVE || now_ms() >= deadline)
            return libvirt_fail(err, "thaw filesystems (%d attempt(s)); they may stay frozen: "
                                "cleanup_job retries", attempts);
        sleep_ms(THAW_RETRY_PAUSE_MS);
    }
}

struct freeze_state {
    bool frozen;
    int64_t t0;
};

/* Freeze the guest's filesystems for job->quiesce. Returns 0 (frozen or, for QUIESCE_TRY,
 * skipped with info->quiesce_error set) or -errno (QUIESCE_REQUIRED, or a thaw after a failed
 * freeze that could not be confirmed). Nothing is frozen after an error. */
static int
quiesce_freeze(virDomainPtr dom, const struct snap_job *job, const char *marker,
               struct view_info *info, struct freeze_state *fs, struct agent_err *err)
{
    int timeout_s = agent_timeout(job->agent_timeout_s);
    char msg[256];
    int64_t t0, elapsed;
    int n, r;

    fs->frozen = false;
    if (job->quiesce == QUIESCE_NONE)
        return 0;
    /* Per domain in libvirtd and kept there: nova's own agent calls get this bound too. */
    if (virDomainAgentSetResponseTimeout(dom, timeout_s, 0) < 0) {
        snprintf(msg, sizeof(msg), "set guest agent timeout: %s", virGetLastErrorMessage());
        goto failed_fast;
    }
    r = marker_write(marker, "", false, err);
    if (r < 0)
        return r;
    snap_job_step(job, "freeze", "intent");
    t0 = now_ms();
    n = virDomainFSFreeze(dom, NULL, 0, 0);
    elapsed = now_ms() - t0;
    if (n >= 0) {
        fs->frozen = true;
        snap_job_step(job, "freeze", "done");
        fs->t0 = t0;
        info->frozen = n > 0;
        info->frozen_count = n;
        log_debug(LOG_QCOW2, "froze %d filesystem(s) in %" PRId64 " ms", n, elapsed);
        return 0;
    }
    snprintf(msg, sizeof(msg), "%s", virGetLastErrorMessage());
    /* A freeze that ran into the agent timeout may still be queued in the guest and run later:
     * the thaw must follow it. One that failed at once (agent not connected, domain paused) was
     * never delivered, one thaw attempt is enough. */
    {
        bool pending = elapsed >= (int64_t)timeout_s * 750;
        struct agent_err terr = {0};
        r = quiesce_thaw(dom, marker, timeout_s, pending, &terr);
        if (r < 0 && pending)
            return agent_err_set(err, r, "qcow2: freeze failed (%s) and %s", msg, terr.msg);
        unlink_gone(marker);
    }
 failed_fast:
    if (job->quiesce == QUIESCE_REQUIRED)
        return agent_err_set(err, -EIO, "qcow2: quiesce required but the guest agent could not "
                             "freeze filesystems: %s", msg);
    snprintf(info->quiesce_error, sizeof(info->quiesce_error), "%s", msg);
    log_debug(LOG_QCOW2, "freeze skipped: %s", msg);
    return 0;
}

/* End a freeze started by quiesce_freeze() and record its window. */
static int
quiesce_end(virDomainPtr dom, const struct snap_job *job, const char *marker,
            struct view_info *info, struct freeze_state *fs, struct agent_err *err)
{
    int r;

    if (!fs->frozen)
        return 0;
    /* The freeze was answered, so the agent works: a thaw that times out is retried. */
    r = quiesce_thaw(dom, marker, agent_timeout(job->agent_timeout_s), true, err);
    info->freeze_window_ms = now_ms() - fs->t0;
    if (r == 0) {
        fs->frozen = false;
        snap_job_step(job, "freeze", "thawed");
    }
    return r;
}

/* The guest quiesce above, lent to a backend that does not own the hypervisor (rbd: struct
 * quiesce_ops, ctx = this backend's handle). The caller decides what a failed freeze means, so
 * the freeze is always attempted (as QUIESCE_TRY) and a skipped one is an error carrying the
 * reason. The <job>.frozen marker in the job's scratch_dir is kept exactly as for a view: this
 * backend's cleanup_job thaws a guest a crash left frozen. */
int
qcow2_guest_freeze(void *ctx, const struct snap_job *job, int *ret_frozen,
                   struct agent_err *err)
{
    struct qcow2_handle *h = ctx;
    _cleanup_(conn_unrefp) virConnectPtr conn = NULL;
    _cleanup_(dom_freep) virDomainPtr dom = NULL;
    struct snap_job try_job = *job;
    struct view_info info = {0};
    struct freeze_state fs = {0};
    struct job_paths jp;
    int r;

    r = job_paths_make(job, &jp, err);
    if (r < 0)
        return r;
    if (mkdir(job->scratch_dir, 0755) < 0 && errno != EEXIST) {
        r = agent_err_set(err, -errno, "qcow2: create %s: %s", job->scratch_dir,
                          strerror(errno));
        goto out;
    }
    r = handle_conn(h, &conn, err);
    if (r < 0)
        goto out;
    r = domain_lookup(conn, job->instance_uuid, &dom, err);
    if (r < 0)
        goto out;
    try_job.quiesce = QUIESCE_TRY;
    r = quiesce_freeze(dom, &try_job, jp.frozen, &info, &fs, err);
    if (r < 0)
        goto out;
    if (!fs.frozen) {
        r = agent_err_set(err, -EIO, "qcow2: freeze filesystems of domain %s: %s",
                          job->instance_uuid, info.quiesce_error);
        goto out;
    }
    *ret_frozen = info.frozen_count;
 out:
    job_paths_free(&jp);
    return r;
}

/* Thaw what qcow2_guest_freeze() froze. Idempotent: without the job's frozen marker nothing of
 * ours is frozen; a domain that is gone has nothing to thaw. */
int
qcow2_guest_thaw(void *ctx, const struct snap_job *job, struct agent_err *err)
{
    struct qcow2_handle *h = ctx;
    _cleanup_(conn_unrefp) virConnectPtr conn = NULL;
    _cleanup_(dom_freep) virDomainPtr dom = NULL;
    struct job_paths jp;
    int r;

    r = job_paths_make(job, &jp, err);
    if (r < 0)
        return r;
    if (!file_exists(jp.frozen))
        goto out;
    r = handle_conn(h, &conn, err);
    if (r < 0)
        goto out;
    r = domain_lookup(conn, job->instance_uuid, &dom, NULL);
    if (r == -ENOENT) {
        r = unlink_gone(jp.frozen);
        goto out;
    }
    if (r < 0) {
        r = libvirt_fail(err, "look up domain %s", job->instance_uuid);
        goto out;
    }
    /* Like quiesce_end(): the freeze was answered, a thaw that times out is retried. */
    r = quiesce_thaw(dom, jp.frozen, agent_timeout(job->agent_timeout_s), true, err);
 out:
    job_paths_free(&jp);
    return r;
}

/* ---- cleanup: what a job may have left, found from the job alone -------------------------- */

enum {
    STEP_THAW = 1 << 0,     /* frozen marker → thaw */
    STEP_BACKUP = 1 << 1,   /* backup job exporting our socket → abort */
    STEP_BLOCKJOB = 1 << 2, /* block copy into our delta → abort */
    STEP_RESTORE = 1 << 3,  /* managed-save marker → start the guest from its save image */
    STEP_ALL = STEP_THAW | STEP_BACKUP | STEP_BLOCKJOB | STEP_RESTORE,
};

/* Abort the domain's backup job if it is this job's (it exports our socket). */
static int
cleanup_backup(virDomainPtr dom, const struct job_paths *jp, struct agent_err *err)
{
    _cleanup_free_ char *xml = virDomainBackupGetXMLDesc(dom, 0);
    _cleanup_free_ char *sock = NULL, *scratch = NULL;
    const char *end;

    if (!xml) {
        int code = libvirt_error_code();
        if (code == VIR_ERR_NO_DOMAIN_BACKUP || code == VIR_ERR_OPERATION_INVALID)
            return 0; /* no backup job, or the domain is not running */
        return libvirt_fail(err, "backup job of %s", jp->sock);
    }
    end = xml + strlen(xml);
    if (xml_first_attr(xml, end, "server", "socket", &sock) < 0 ||
        xml_first_attr(xml, end, "scratch", "file", &scratch) < 0)
        return agent_err_set(err, -EINVAL, "qcow2: cannot parse the domain's backup XML");
    if (!streq_both(sock, jp->sock) && !streq_both(scratch, jp->scratch))
        return 0; /* someone else's backup job */
    if (virDomainAbortJob(dom) < 0) {
        /* It may have ended between the two calls. */
        _cleanup_free_ char *again = NULL;
        struct agent_err tmp = {0};
        int r = libvirt_fail(&tmp, "abort backup job exporting %s", jp->sock);
        again = virDomainBackupGetXMLDesc(dom, 0);
        if (!again && libvirt_error_code() == VIR_ERR_NO_DOMAIN_BACKUP)
            return 0;
        return agent_err_set(err, r, "%s", tmp.msg);
    }
    log_debug(LOG_QCOW2, "backup job exporting %s aborted", jp->sock);
    return 0;
}

/* Abort block copies into our delta. */
static int
cleanup_blockjob(virDomainPtr dom, const char *uuid, const struct job_paths *jp,
                 struct agent_err *err)
{
    struct disk_list disks = {0};
    int r, ret = 0;

    r = domain_disks(dom, uuid, &disks, err);
    if (r < 0)
        return r;
    for (size_t i = 0; i < disks.n; i++) {
        const struct disk_info *d = &disks.v[i];
        if (!d->target || !streq_both(d->mirror_file, jp->delta))
            continue;
        /* Synchronous: returns once the job is gone. */
        if (virDomainBlockJobAbort(dom, d->target, 0) < 0 &&
            libvirt_error_code() != VIR_ERR_OPERATION_INVALID) /* "no job": ended meanwhile */
            ret = ret < 0 ? ret : libvirt_fail(err, "abort block copy of %s into %s",
                                               d->target, jp->delta);
        else
            log_debug(LOG_QCOW2, "block copy of %s into %s aborted", d->target,
                      jp->delta);
    }
    disk_list_free(&disks);
    return ret;
}

/* Start a managed-saved guest again (paused if the marker says so). Sets *ret_restored when it
 * started it. */
static int
cleanup_restore(virDomainPtr dom, const char *uuid, const struct job_paths *jp,
                bool *ret_restored, struct agent_err *err)
{
    char state_buf[16] = "";
    bool paused;
    int active, has_image, r;

    {
        _cleanup_close_ int fd = open(jp->saved, O_RDONLY | O_CLOEXEC);
        ssize_t n;
        if (fd < 0)
            return errno == ENOENT ? 0 : agent_err_set(err, -errno, "qcow2: open %s: %s",
                                                       jp->saved, strerror(errno));
        n = read(fd, state_buf, sizeof(state_buf) - 1);
        state_buf[n > 0 ? n : 0] = '\0';
    }
    paused = strncmp(state_buf, "paused", 6) == 0;
    active = virDomainIsActive(dom);
    if (active < 0)
        return libvirt_fail(err, "state of domain %s", uuid);
    if (active == 1) {
        /* Never saved (the crash came first), or already started again. */
        unlink_gone(jp->saved);
        return 0;
    }
    has_image = virDomainHasManagedSaveImage(dom, 0);
    if (has_image < 0)
        return libvirt_fail(err, "managed save image of domain %s", uuid);
    if (has_image == 0) {
        unlink_gone(jp->saved);
        return agent_err_set(err, -ESTALE, "qcow2: domain %s was managed-saved for a snapshot "
                             "but its save image is gone: left shut off", uuid);
    }
    r = virDomainCreateWithFlags(dom, paused ? VIR_DOMAIN_START_PAUSED : 0);
    if (r < 0)
        return libvirt_fail(err, "restore domain %s from its managed save image", uuid);
    *ret_restored = true;
    unlink_gone(jp->saved);
    log_debug(LOG_QCOW2, "domain %s restored from its managed save image (%s)", uuid,
              paused ? "paused" : "running");
    return 0;
}

/* Undo what a job left, step by step (every step attempted). Files are removed only once the
 * libvirt side that may use them is settled. */
static int
job_cleanup(struct qcow2_handle *h, const char *uuid, const struct job_paths *jp, unsigned steps,
            int timeout_s, bool *ret_restored, struct agent_err *err)
{
    _cleanup_(conn_unrefp) virConnectPtr conn = NULL;
    _cleanup_(dom_freep) virDomainPtr dom = NULL;
    bool need_thaw = (steps & STEP_THAW) && file_exists(jp->frozen);
    bool need_restore = (steps & STEP_RESTORE) && file_exists(jp->saved);
    bool settled = true, gone = false;
    int ret = 0, r;

    if (need_thaw || need_restore || (steps & (STEP_BACKUP | STEP_BLOCKJOB))) {
        r = handle_conn(h, &conn, err);
        if (r == 0) {
            r = domain_lookup(conn, uuid, &dom, NULL);
            if (r == -ENOENT)
                gone = true; /* nothing of the domain left to undo */
            else if (r < 0)
                r = libvirt_fail(err, "look up domain %s", uuid);
        }
        if (r < 0 && !gone) {
            ret = r;
            settled = false;
        }
    }
    if (dom) {
        int active = virDomainIsActive(dom);
        if (active < 0) {
            r = libvirt_fail(err, "state of domain %s", uuid);
            return ret < 0 ? ret : r; /* nothing is known: keep every file for the next try */
        }
        if (need_thaw) {
            if (active == 1) {
                struct agent_err terr = {0};
                if (virDomainAgentSetResponseTimeout(dom, timeout_s, 0) < 0 ||
                    quiesce_thaw(dom, jp->frozen, timeout_s, false, &terr) < 0)
                    ret = ret < 0 ? ret : agent_err_set(err, -EIO, "qcow2: thaw after job: %s",
                                                        terr.msg[0] ? terr.msg
                                                                    : virGetLastErrorMessage());
            } else {
                unlink_gone(jp->frozen); /* a stopped guest is not frozen */
            }
        }
        if ((steps & STEP_BACKUP) && active == 1) {
            r = cleanup_backup(dom, jp, err);
            if (r < 0) {
                ret = ret < 0 ? ret : r;
                settled = false;
            }
        }
        if ((steps & STEP_BLOCKJOB) && active == 1) {
            r = cleanup_blockjob(dom, uuid, jp, err);
            if (r < 0) {
                ret = ret < 0 ? ret : r;
                settled = false;
            }
        }
        if (need_restore) {
            r = cleanup_restore(dom, uuid, jp, ret_restored, err);
            if (r < 0)
                ret = ret < 0 ? ret : r;
        }
    }
    if (gone) {
        unlink_gone(jp->frozen);
        unlink_gone(jp->saved);
    }
    if (settled) {
        const char *files[] = {jp->sock, jp->scratch, jp->delta};
        for (size_t i = 0; i < ELEMENTSOF(files); i++) {
            r = unlink_gone(files[i]);
            if (r < 0 && ret == 0)
                ret = agent_err_set(err, r, "qcow2: remove %s: %s", files[i], strerror(-r));
        }
    }
    return ret;
}

static int
qcow2_cleanup_job(void *hv, const struct snap_job *job, struct agent_err *err)
{
    struct qcow2_handle *h = hv;
    struct job_paths jp = {0};
    bool restored = false;
    int r;

    r = job_paths_make(job, &jp, err);
    if (r < 0)
        return r;
    r = job_cleanup(h, job->instance_uuid, &jp, STEP_ALL, agent_timeout(job->agent_timeout_s),
                    &restored, err);
    job_paths_free(&jp);
    return r;
}

/* ---- the live paths ----------------------------------------------------------------------- */

/* CA_TEST_FORCE_BLOCKCOPY=1 sends live views down the block-copy fallback, so tests can reach
 * it with a libvirt that has the backup API. Debug builds only. */
static bool
test_force_blockcopy(void)
{
#ifndef NDEBUG
    const char *s = getenv("CA_TEST_FORCE_BLOCKCOPY");
    return s && strcmp(s, "1") == 0;
#else
    return false;
#endif
}

/* The pull-mode backup XML: our disk exported over our socket, every other disk left out. */
static int
backup_xml(const struct disk_list *disks, const struct disk_info *d, const struct job_paths *jp,
           bool reuse_scratch, char **ret)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    if (!f)
        return -ENOMEM;
    fputs("<domainbackup mode='pull'>\n  <server transport='unix' socket='", f);
    xml_put_escaped(f, jp->sock);
    fputs("'/>\n  <disks>\n", f);
    for (size_t i = 0; i < disks->n; i++) {
        const struct disk_info *o = &disks->v[i];
        if (!o->target)
            continue;
        fputs("    <disk name='", f);
        xml_put_escaped(f, o->target);
        if (o != d) {
            fputs("' backup='no'/>\n", f);
            continue;
        }
        fputs("' backup='yes' type='file' exportname='", f);
        xml_put_escaped(f, o->target);
        fputs("'>\n      <scratch file='", f);
        xml_put_escaped(f, jp->scratch);
        fputs(reuse_scratch ? "'/>\n      <driver type='qcow2'/>\n    </disk>\n" : "'/>\n    </disk>\n", f);
    }
    fputs("  </disks>\n</domainbackup>\n", f);
    if (fclose(f) != 0) {
        free(buf);
        return -ENOMEM;
    }
    *ret = buf;
    return 0;
}

static int
scratch_no_read(void *opaque, void *buf, size_t len, uint64_t offset, struct agent_err *err)
{
    (void)opaque, (void)buf, (void)len, (void)offset;
    return agent_err_set(err, -EIO, "qcow2: empty scratch image read");
}

/* The backup's scratch file made before the freeze: an empty qcow2 of the disk's virtual size
 * (the image encoder with no extents: header, L1 and refcount tables). libvirt then only opens it
 * (VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL) where it would otherwise have QEMU create and format
 * it inside the freeze window: BackupBegin took 160-490 ms that way here, 60-140 ms with the file
 * ready. */
static int
scratch_create(virDomainPtr dom, const struct disk_info *d, const char *path,
               struct agent_err *err)
{
    _cleanup_(imgenc_freep) struct imgenc *e = NULL;
    _cleanup_free_ char *buf = NULL;
    virDomainBlockInfo bi;
    int fd, r;

    if (virDomainGetBlockInfo(dom, d->target, &bi, 0) < 0)
        return libvirt_fail(err, "size of %s", d->target);
    struct imgenc_options o = {
        .virtual_size = bi.capacity,
        .format = IMGENC_FORMAT_QCOW2,
        .pread = scratch_no_read,
    };
    r = imgenc_new(&o, &e, err);
    if (r < 0)
        return r;
    buf = malloc(SCRATCH_CHUNK);
    if (!buf)
        return agent_err_set(err, -ENOMEM, "qcow2: out of memory");
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return agent_err_set(err, -errno, "qcow2: create %s: %s", path, strerror(errno));
    for (;;) {
        size_t n = 0;
        r = imgenc_read(e, buf, SCRATCH_CHUNK, &n, err);
        if (r < 0 || n == 0)
            break;
        for (size_t off = 0; off < n;) {
            ssize_t w = write(fd, buf + off, n - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0) {
                r = agent_err_set(err, -errno, "qcow2: write %s: %s", path, strerror(errno));
                break;
            }
            off += (size_t)w;
        }
        if (r < 0)
            break;
    }
    if (close(fd) < 0 && r >= 0)
        r = agent_err_set(err, -errno, "qcow2: write %s: %s", path, strerror(errno));
    if (r < 0)
        unlink_gone(path);
    return r;
}

static int
backup_begin(virDomainPtr dom, const char *xml, bool reuse_scratch, const char *target,
             struct agent_err *err)
{
    unsigned flags = reuse_scratch ? VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL : 0;

    if (virDomainBackupBegin(dom, xml, NULL, flags) < 0)
        return libvirt_fail(err, "begin pull-mode backup of %s", target);
    return 0;
}

/* Freeze, begin the pull-mode backup, thaw. -EOPNOTSUPP (err untouched, reason in *why): the
 * backup API is not available here and nothing was started. */
static int
view_backup(virDomainPtr dom, const struct snap_job *job, const struct disk_list *disks,
            const struct disk_info *d, const struct job_paths *jp, struct disk_view *v,
            char *why, size_t why_size, struct agent_err *err)
{
    _cleanup_free_ char *xml = NULL;
    struct freeze_state fs = {0};
    struct agent_err berr = {0};
    int r, rb;

    /* Without the file ready, libvirt makes it (inside the freeze window). */
    bool reuse = scratch_create(dom, d, jp->scratch, &berr) == 0;
    if (!reuse) {
        log_debug(LOG_QCOW2, "scratch not made ahead (%s): libvirt makes it", berr.msg);
        agent_err_clear(&berr);
    }
    r = backup_xml(disks, d, jp, reuse, &xml);
    if (r < 0)
        return agent_err_set(err, r, "qcow2: out of memory");
    r = quiesce_freeze(dom, job, jp->frozen, &v->info, &fs, err);
    if (r < 0)
        return r;
    snap_job_step(job, "backup-job", "intent");
    rb = backup_begin(dom, xml, reuse, d->target, &berr);
    if (rb < 0 && rb != -EOPNOTSUPP && reuse) {
        /* libvirt or QEMU would not take the file made ahead: let libvirt make its own. */
        log_warning(LOG_QCOW2, "%s; trying again with a scratch file libvirt makes", berr.msg);
        agent_err_clear(&berr);
        unlink_gone(jp->scratch);
        free(xml);
        xml = NULL;
        r = backup_xml(disks, d, jp, false, &xml);
        rb = r < 0 ? agent_err_set(&berr, r, "qcow2: out of memory")
                   : backup_begin(dom, xml, false, d->target, &berr);
    }
    if (rb >= 0)
        snap_job_step(job, "backup-job", "done");
    r = quiesce_end(dom, job, jp->frozen, &v->info, &fs, err);
    if (rb == -EOPNOTSUPP) {
        unlink_gone(jp->scratch);
        snprintf(why, why_size, "%s", berr.msg);
        return r < 0 ? r : -EOPNOTSUPP;
    }
    if (rb < 0)
        return agent_err_set(err, rb, "%s", berr.msg);
    return r; /* a failed thaw fails the view; the job is aborted by the caller's cleanup */
}

/* Block-job events for one disk, shared between libvirt's event thread and the waiter. Freed
 * by libvirt (through its free callback) once the callback is deregistered. */
struct copy_wait {
    atomic_int refs; /* the waiter's and libvirt's */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    char target[32];
    int status; /* -1 until an event for our copy job arrives */
};

static void
copy_wait_unref(void *opaque)
{
    struct copy_wait *w = opaque;
    if (atomic_fetch_sub(&w->refs, 1) != 1)
        return;
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->lock);
    free(w);
}

static void
copy_event(virConnectPtr conn, virDomainPtr dom, const char *disk, int type, int status,
           void *opaque)
{
    struct copy_wait *w = opaque;

    (void)conn;
    (void)dom;
    if (type != VIR_DOMAIN_BLOCK_JOB_TYPE_COPY || !disk || strcmp(disk, w->target) != 0)
        return;
    pthread_mutex_lock(&w->lock);
    w->status = status;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

/* Is the copy of target ready (mirroring)? 1 yes, 0 not yet, <0 the job is gone or failed. The
 * event says so at once; polling (nova's check: cur == end, then <mirror ready='yes'>) covers a
 * missed event. */
static int
copy_ready(virDomainPtr dom, const char *uuid, const char *target, const char *delta,
           struct copy_wait *w, struct agent_err *err)
{
    virDomainBlockJobInfo info;
    int status, r;

    if (w) {
        pthread_mutex_lock(&w->lock);
        status = w->status;
        pthread_mutex_unlock(&w->lock);
        if (status == VIR_DOMAIN_BLOCK_JOB_READY)
            return 1;
        if (status == VIR_DOMAIN_BLOCK_JOB_FAILED || status == VIR_DOMAIN_BLOCK_JOB_CANCELED ||
            status == VIR_DOMAIN_BLOCK_JOB_COMPLETED)
            return agent_err_set(err, -EIO, "libvirt: block copy of %s into %s ended (%s) "
                                 "before it was ready", target, delta,
                                 status == VIR_DOMAIN_BLOCK_JOB_FAILED ? "failed"
                                 : status == VIR_DOMAIN_BLOCK_JOB_CANCELED ? "cancelled"
                                                                           : "completed");
    }
    r = virDomainGetBlockJobInfo(dom, target, &info, 0);
    if (r < 0)
        return libvirt_fail(err, "block job of %s", target);
    if (r == 0)
        return agent_err_set(err, -EIO, "libvirt: block copy of %s into %s vanished before it "
                             "was ready", target, delta);
    if (info.end == 0 || info.cur != info.end)
        return 0;
    {
        struct disk_list disks = {0};
        r = domain_disks(dom, uuid, &disks, err);
        if (r < 0)
            return r;
        r = 0;
        for (size_t i = 0; i < disks.n; i++)
            if (disks.v[i].target && strcmp(disks.v[i].target, target) == 0 &&
                disks.v[i].mirror_ready)
                r = 1;
        disk_list_free(&disks);
    }
    return r;
}

/* Create the delta the copy goes into: a qcow2 over the disk's backing file (shallow copy) or
 * standalone (the disk has no backing file: full copy). */
static int
delta_create(virDomainPtr dom, const struct disk_info *d, const char *delta,
             struct agent_err *err)
{
    virDomainBlockInfo bi;
    char size[32], errbuf[512];
    char a0[] = "qemu-img", a1[] = "create", a2[] = "-q", a3[] = "-f", a4[] = "qcow2",
         a5[] = "-b", a6[] = "-F";
    int r;

    if (virDomainGetBlockInfo(dom, d->target, &bi, 0) < 0)
        return libvirt_fail(err, "size of %s", d->target);
    snprintf(size, sizeof(size), "%llu", (unsigned long long)bi.capacity);
    /* -u: the backing file is in use by the guest; its size is not needed (given). */
    char a7[] = "-u";
    char *with_backing[] = {a0, a1, a2, a3, a4, a7, a5, d->backing, a6,
                            d->backing_format ? d->backing_format : a4, (char *)delta, size, NULL};
    char *standalone[] = {a0, a1, a2, a3, a4, (char *)delta, size, NULL};
    unlink_gone(delta);
    r = run_command(d->backing ? with_backing : standalone, QEMU_IMG_TIMEOUT_MS, errbuf,
                    sizeof(errbuf));
    if (r < 0)
        return agent_err_set(err, r, "qcow2: qemu-img create %s failed: %s", delta,
                             errbuf[0] ? errbuf : strerror(-r));
    return 0;
}

/* nova's live snapshot: mirror the top layer into a delta, wait for READY, freeze, abort (the
 * delta is then the disk at the abort), thaw; the delta chain is read by the caller. */
static int
view_blockcopy(virConnectPtr conn, virDomainPtr dom, const struct snap_job *job,
               const struct disk_info *d, const struct job_paths *jp, struct disk_view *v,
               struct agent_err *err)
{
    _cleanup_free_ char *destxml = NULL;
    struct copy_wait *w;
    struct freeze_state fs = {0};
    unsigned flags = VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
    int cb = -1, r, ra;
    int64_t deadline;

    r = delta_create(dom, d, jp->delta, err);
    if (r < 0)
        return r;
    if (d->backing)
        flags |= VIR_DOMAIN_BLOCK_COPY_SHALLOW;
    {
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        if (!f)
            return agent_err_set(err, -ENOMEM, "qcow2: out of memory");
        fputs("<disk type='file'><source file='", f);
        xml_put_escaped(f, jp->delta);
        fputs("'/><driver type='qcow2'/></disk>", f);
        if (fclose(f) != 0) {
            free(buf);
            return agent_err_set(err, -ENOMEM, "qcow2: out of memory");
        }
        destxml = buf;
    }

    w = calloc(1, sizeof(*w));
    if (!w)
        return agent_err_set(err, -ENOMEM, "qcow2: out of memory");
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    atomic_init(&w->refs, 2);
    w->status = -1;
    snprintf(w->target, sizeof(w->target), "%s", d->target);
    cb = virConnectDomainEventRegisterAny(conn, dom, VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                                          VIR_DOMAIN_EVENT_CALLBACK(copy_event), w,
                                          copy_wait_unref);
    if (cb < 0) {
        /* Polling alone still works. */
        log_debug(LOG_QCOW2, "no block job events (%s), polling",
                  virGetLastErrorMessage());
        /* A failed registration leaves opaque with the caller (libvirt never calls freecb). */
        atomic_store(&w->refs, 1);
        copy_wait_unref(w);
        w = NULL;
    }

    snap_job_step(job, "block-job", "intent");
    if (virDomainBlockCopy(dom, d->target, destxml, NULL, 0, flags) < 0) {
        r = libvirt_fail(err, "block copy of %s into %s", d->target, jp->delta);
        goto out;
    }
    snap_job_step(job, "block-job", "done");
    deadline = now_ms() + BLOCKCOPY_READY_TIMEOUT_MS;
    for (;;) {
        r = copy_ready(dom, job->instance_uuid, d->target, jp->delta, w, err);
        if (r != 0)
            break;
        if (now_ms() >= deadline) {
            r = agent_err_set(err, -ETIMEDOUT, "libvirt: block copy of %s not ready after %d s",
                              d->target, BLOCKCOPY_READY_TIMEOUT_MS / 1000);
            break;
        }
        if (w) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += BLOCKCOPY_POLL_MS * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_mutex_lock(&w->lock);
            if (w->status == -1)
                pthread_cond_timedwait(&w->cond, &w->lock, &ts);
            pthread_mutex_unlock(&w->lock);
        } else {
            sleep_ms(BLOCKCOPY_POLL_MS);
        }
    }
    if (r < 0)
        goto out; /* the caller's cleanup aborts the job */

    r = quiesce_freeze(dom, job, jp->frozen, &v->info, &fs, err);
    if (r < 0)
        goto out;
    /* Without the pivot flag this cancels the READY mirror: QEMU completes it so the delta
     * holds the disk as of now, and the guest stays on its disk. Synchronous. */
    ra = virDomainBlockJobAbort(dom, d->target, 0);
    if (ra < 0)
        ra = libvirt_fail(err, "end block copy of %s", d->target);
    r = quiesce_end(dom, job, jp->frozen, &v->info, &fs, err);
    if (ra < 0)
        r = ra;
 out:
    if (cb >= 0) {
        virConnectDomainEventDeregisterAny(conn, cb);
        copy_wait_unref(w);
    }
    return r;
}

/* ---- open_view / close_view --------------------------------------------------------------- */

static int
view_pread(void *opaque, void *buf, size_t len, uint64_t offset, struct agent_err *err)
{
    struct view_priv *p = opaque;
    int64_t cookies[NBD_READ_INFLIGHT];
    size_t head = 0, tail = 0; /* cookies[tail..head) in flight, ring indices mod INFLIGHT */
    size_t sent = 0;
    int ret = 0;

    if (!p->nbd || p->nbd_broken)
        return agent_err_set(err, -EIO, "qcow2: view of job %s is closed", p->job_id);
    if (offset > p->size || len > p->size - offset)
        return agent_err_set(err, -EINVAL, "qcow2: read of %zu at %" PRIu64 " beyond the disk "
                             "(%" PRIu64 ")", len, offset, p->size);
    /* libnbd reads are all or nothing (a short reply is an error), so no partial-read loop:
     * split into requests, keep several in flight, wait for all of them before returning (the
     * buffer is the caller's). */
    while (sent < len || tail != head) {
        while (ret == 0 && sent < len && head - tail < NBD_READ_INFLIGHT) {
            size_t n = len - sent < NBD_READ_CHUNK ? len - sent : NBD_READ_CHUNK;
            int64_t c = nbd_aio_pread(p->nbd, (char *)buf + sent, n, offset + sent,
                                      NBD_NULL_COMPLETION, 0);
            if (c < 0) {
                ret = export_fail(err, "read");
                break;
            }
            cookies[head++ % NBD_READ_INFLIGHT] = c;
            sent += n;
        }
        if (tail == head)
            break;
        int r = export_wait_cookie(p->nbd, cookies[tail % NBD_READ_INFLIGHT], "read",
                                ret < 0 ? NULL : err);
        if (r == -ETIMEDOUT) {
            /* Still in flight into the caller's buffer: never touch this handle again. */
            p->nbd_broken = true;
            return ret < 0 ? ret : r;
        }
        if (r < 0 && ret == 0)
            ret = r;
        tail++;
        if (ret < 0)
            sent = len; /* stop sending, drain what is in flight */
    }
    if (ret < 0)
        agent_err_set(err, ret, "qcow2: read of %zu at %" PRIu64 " failed", len, offset);
    return ret;
}

/* Connect, map, and fill the view's extents and size. */
static int
view_map(struct view_priv *p, struct disk_view *v, const char *sock, const char *export_name,
         const char *image, const char *format, struct agent_err *err)
{
    struct extent_vec ev = {0};
    int64_t size;
    int r;

    if (sock)
        r = export_connect_socket(sock, export_name, &p->nbd, err);
    else
        r = export_connect_image(image, format, &p->nbd, err);
    if (r < 0)
        return r;
    size = nbd_get_size(p->nbd);
    if (size < 0)
        return export_fail(err, "export size");
    p->size = (uint64_t)size;
    r = map_extents(p->nbd, p->size, &ev, err);
    if (r < 0) {
        free(ev.v);
        return r;
    }
    v->virtual_size = p->size;
    v->extents = ev.v;
    v->n_extents = ev.n;
    v->allocated_bytes = ev.data_bytes;
    return 0;
}

static int
view_priv_new(const struct snap_job *job, struct job_paths *jp, struct view_priv **ret)
{
    struct view_priv *p = calloc(1, sizeof(*p));

    if (!p)
        return -ENOMEM;
    p->job_id = strdup(job->job_id);
    p->uuid = strdup(job->instance_uuid);
    p->scratch_dir = strdup(job->scratch_dir);
    p->agent_timeout_s = job->agent_timeout_s;
    p->sock_path = TAKE_PTR(jp->sock);
    p->scratch_path = TAKE_PTR(jp->scratch);
    p->delta_path = TAKE_PTR(jp->delta);
    p->frozen_marker = TAKE_PTR(jp->frozen);
    p->save_marker = TAKE_PTR(jp->saved);
    if (!p->job_id || !p->uuid || !p->scratch_dir) {
        view_priv_free(p);
        return -ENOMEM;
    }
    *ret = p;
    return 0;
}

/* Borrowed view of a priv's paths as a job_paths (no ownership). */
static struct job_paths
view_paths(const struct view_priv *p)
{
    return (struct job_paths){.sock = p->sock_path, .scratch = p->scratch_path,
                              .delta = p->delta_path, .frozen = p->frozen_marker,
                              .saved = p->save_marker};
}

static int
qcow2_close_view(void *hv, struct disk_view *v, struct agent_err *err)
{
    struct qcow2_handle *h = hv;
    struct view_priv *p;
    struct job_paths jp;
    unsigned steps = STEP_THAW;
    bool restored = false;
    int r;

    if (!v || !(p = v->priv) || p->closed)
        return 0;
    /* First the reader: qemu-nbd holds the image lock a restored guest needs, and the backup
     * export should have no client when it goes. */
    if (p->nbd) {
        nbd_close(p->nbd);
        p->nbd = NULL;
    }
    switch (v->info.path) {
    case VIEW_PATH_BACKUP_PULL: steps |= STEP_BACKUP; break;
    case VIEW_PATH_BLOCKCOPY: steps |= STEP_BLOCKJOB; break;
    case VIEW_PATH_MANAGEDSAVE: steps |= STEP_RESTORE; break;
    default: break;
    }
    jp = view_paths(p);
    r = job_cleanup(h, p->uuid, &jp, steps, agent_timeout(p->agent_timeout_s), &restored, err);
    if (restored)
        v->info.downtime_ms = now_ms() - p->save_t0;
    if (r == 0)
        p->closed = true;
    log_debug(LOG_QCOW2, "job %s: view closed (%s)%s", p->job_id,
              view_path_to_string(v->info.path), r < 0 ? ", with errors" : "");
    return r;
}

static void
qcow2_free_view(void *hv, struct disk_view *v)
{
    (void)hv;
    view_free(v);
}

static int
qcow2_open_view(void *hv, const struct snap_job *job, struct disk_view **ret_v,
                struct agent_err *err)
{
    struct qcow2_handle *h = hv;
    _cleanup_(conn_unrefp) virConnectPtr conn = NULL;
    _cleanup_(dom_freep) virDomainPtr dom = NULL;
    _cleanup_(view_freep) struct disk_view *v = NULL;
    struct disk_list disks = {0};
    struct job_paths jp = {0};
    bool jp_owned = false;
    const struct disk_info *d;
    struct view_priv *p;
    int state = VIR_DOMAIN_NOSTATE, reason = 0, active = -1, r;
    int64_t t1 = now_ms();
    char why[AGENT_ERR_MSG_MAX] = "";

    r = job_paths_make(job, &jp, err);
    if (r < 0)
        return r;
    jp_owned = true;
    if (file_exists(jp.sock) || file_exists(jp.scratch) || file_exists(jp.delta) ||
        file_exists(jp.frozen) || file_exists(jp.saved)) {
        /* A retried job: finish what its earlier attempt left first. */
        log_debug(LOG_QCOW2, "job %s: leftovers of an earlier attempt, cleaning up",
                  job->job_id);
        bool restored = false;
        r = job_cleanup(h, job->instance_uuid, &jp, STEP_ALL,
                        agent_timeout(job->agent_timeout_s), &restored, err);
        if (r < 0)
            goto out;
    }
    if (mkdir(job->scratch_dir, 0755) < 0 && errno != EEXIST) {
        r = agent_err_set(err, -errno, "qcow2: create %s: %s", job->scratch_dir,
                          strerror(errno));
        goto out;
    }
    /* The scratch file takes the blocks the guest overwrites during the snapshot; with no room
     * QEMU's error would only name a file it could not create. */
    struct statvfs sv;
    if (statvfs(job->scratch_dir, &sv) == 0 &&
        (uint64_t)sv.f_bavail * sv.f_frsize < SCRATCH_MIN_FREE) {
        r = agent_err_set(err, -ENOSPC, "qcow2: [libvirt] snapshots_directory %s is full (%llu "
                          "bytes free, at least %u needed)", job->scratch_dir,
                          (unsigned long long)sv.f_bavail * sv.f_frsize, SCRATCH_MIN_FREE);
        goto out;
    }

    r = handle_conn(h, &conn, err);
    if (r < 0)
        goto out;
    r = domain_lookup(conn, job->instance_uuid, &dom, err);
    if (r < 0)
        goto out;
    r = domain_disks(dom, job->instance_uuid, &disks, err);
    if (r < 0)
        goto out;
    d = root_disk(&disks, job->root_device_name);
    if (!d || !disk_supported(d)) {
        r = agent_err_set(err, -EOPNOTSUPP, "qcow2: root disk %s of domain %s is %s",
                          d && d->target ? d->target : "(none)", job->instance_uuid,
                          d ? "not a local qcow2 or raw file or block device" : "not found");
        goto out;
    }
    if (virDomainGetState(dom, &state, &reason, 0) < 0 || (active = virDomainIsActive(dom)) < 0) {
        r = libvirt_fail(err, "state of domain %s", job->instance_uuid);
        goto out;
    }

    v = calloc(1, sizeof(*v));
    if (!v || view_priv_new(job, &jp, &p) < 0) {
        r = agent_err_set(err, -ENOMEM, "qcow2: out of memory");
        goto out;
    }
    v->priv = p;
    v->opaque = p;
    v->pread = view_pread;
    v->info.freeze_window_ms = -1;
    snprintf(v->info.disk_target, sizeof(v->info.disk_target), "%s", d->target);
    snprintf(v->info.disk_format, sizeof(v->info.disk_format), "%s", d->format);
    jp_owned = false;
    jp = view_paths(p); /* borrowed from here on */

    if (active == 0) {
        v->info.path = VIEW_PATH_COLD;
        t1 = now_ms();
        r = view_map(p, v, NULL, NULL, d->source, d->format, err);
    } else if (job->live_snapshot_disabled) {
        bool paused = state == VIR_DOMAIN_PAUSED;
        if (state != VIR_DOMAIN_RUNNING && state != VIR_DOMAIN_PAUSED &&
            state != VIR_DOMAIN_BLOCKED) {
            r = agent_err_set_retryable(err, -EBUSY, "qcow2: domain %s is neither running nor "
                                        "paused (state %d) and live snapshots are disabled",
                                        job->instance_uuid, state);
            goto out;
        }
        v->info.path = VIEW_PATH_MANAGEDSAVE;
        r = marker_write(p->save_marker, paused ? "paused\n" : "running\n", true, err);
        if (r < 0)
            goto out;
        p->save_t0 = now_ms();
        snap_job_step(job, "managed-save", "intent");
        if (virDomainManagedSave(dom, 0) < 0) {
            r = libvirt_fail(err, "managed save of domain %s", job->instance_uuid);
            unlink_gone(p->save_marker);
            goto out;
        }
        snap_job_step(job, "managed-save", "done");
        t1 = now_ms();
        v->info.setup_ms = t1 - p->save_t0;
        r = view_map(p, v, NULL, NULL, d->source, d->format, err);
        v->info.downtime_ms = now_ms() - p->save_t0; /* so far: close_view adds the restore */
    } else {
        bool force = test_force_blockcopy();
        r = -EOPNOTSUPP;
        if (force) {
            v->info.path_reason = "forced by CA_TEST_FORCE_BLOCKCOPY=1";
        } else {
            int64_t tb = now_ms();
            v->info.path = VIEW_PATH_BACKUP_PULL;
            r = view_backup(dom, job, &disks, d, &jp, v, why, sizeof(why), err);
            t1 = now_ms();
            v->info.setup_ms = t1 - tb;
            if (r == 0)
                r = view_map(p, v, p->sock_path, d->target, NULL, NULL, err);
            else if (r == -EOPNOTSUPP)
                v->info.path_reason = "libvirt backup API not supported for this domain";
        }
        if (r == -EOPNOTSUPP) {
            log_debug(LOG_QCOW2, "job %s: block-copy fallback: %s", job->job_id,
                      why[0] ? why : v->info.path_reason);
            v->info.path = VIEW_PATH_BLOCKCOPY;
            v->info.frozen = false;
            v->info.frozen_count = 0;
            v->info.freeze_window_ms = -1;
            v->info.quiesce_error[0] = '\0';
            int64_t tc = now_ms();
            r = view_blockcopy(conn, dom, job, d, &jp, v, err);
            t1 = now_ms();
            v->info.setup_ms = t1 - tc;
            if (r == 0)
                r = view_map(p, v, NULL, NULL, p->delta_path, "qcow2", err);
        }
    }
    if (r < 0)
        goto out;
    snap_job_step(job, "nbd-export", "done");
    v->info.map_ms = now_ms() - t1;
    log_debug(LOG_QCOW2, "job %s: %s view of %s (%s): setup %" PRId64 " ms, map %"
              PRId64 " ms, %zu extents, %" PRIu64 " of %" PRIu64 " bytes allocated, frozen %d "
              "(%" PRId64 " ms)", job->job_id, view_path_to_string(v->info.path),
              d->target, d->format, v->info.setup_ms, v->info.map_ms, v->n_extents,
              v->allocated_bytes, v->virtual_size, v->info.frozen_count,
              v->info.freeze_window_ms);
    *ret_v = TAKE_PTR(v);
 out:
    if (r < 0 && v && v->priv) {
        /* Nothing may be left behind: undo whatever this attempt started. */
        struct agent_err cerr = {0};
        if (qcow2_close_view(h, v, &cerr) < 0)
            agent_err_set(err, cerr.code, "%s", cerr.msg);
    }
    if (jp_owned)
        job_paths_free(&jp);
    disk_list_free(&disks);
    return r;
}

const struct disk_backend_ops qcow2_backend_ops = {
    .name = "qcow2",
    .open = qcow2_open,
    .close = qcow2_close,
    .owns = qcow2_owns,
    .open_view = qcow2_open_view,
    .close_view = qcow2_close_view,
    .free_view = qcow2_free_view,
    .cleanup_job = qcow2_cleanup_job,
};
