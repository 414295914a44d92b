#pragma once
/* The streaming image encoder: turns a disk read as extents (struct imgenc_extent, known before
 * any data is read) into the bytes of a raw or qcow2 v3 image file, pulled in order by the
 * uploader (libcurl's read callback). One forward pass over the output: nothing is written to
 * disk, nothing is sought back, and memory stays bounded whatever the virtual size.
 *
 * Memory held by one encoder (imgenc_get_stats() reports it as mem_bytes):
 *   - a 4 MiB read buffer, one cluster-sized buffer (64 KiB) for metadata and, when
 *     compressing, a second one for the deflated cluster and a zlib deflate stream (~270 KiB);
 *   - a copy of the extent map (24 bytes per extent);
 *   - compressed qcow2 only: one byte per stored data cluster (16 KiB per GiB of DATA, 16 MiB
 *     per TiB of DATA) holding the sizes found by the sizing pass (see below).
 * Nothing is proportional to the virtual size: a 2 TiB disk with three extents costs the same as
 * a 1 GiB one.
 *
 * qcow2 layout (64 KiB clusters, refcount_order 4, no backing file, no feature bits), everything
 * computed from the extent map before the header is produced:
 *     header | L1 table | refcount table | refcount blocks | L2 tables | data clusters
 * The refcount blocks cover the whole final file. L2 tables exist only for the 512 MiB guest
 * regions that hold at least one DATA or ZERO cluster. Data clusters follow in guest-offset
 * order. A guest cluster touched by any DATA extent is stored whole (the parts outside DATA
 * extents zero-filled, without reading them); a cluster touched only by ZERO extents gets the L2
 * zero flag (reads as zeros even over a backing file); an untouched cluster keeps L2 entry 0
 * (unallocated). The exact output size is therefore known at imgenc_new().
 *
 * Compressed qcow2: L2 entries and refcounts depend on each cluster's deflate size, yet must be
 * sent before the data. The encoder runs a sizing pass first (imgenc_prepare()): it reads every
 * stored data cluster once, deflates it and keeps only the resulting size in 512-byte sectors
 * (one byte per cluster). The real pass then reads and deflates each cluster a second time and
 * sends it. So the source's pread is called TWICE for every DATA range, and the deflate work is
 * done twice; in exchange there is no temporary file and memory is bounded as stated above. The
 * sizing pass also finds data clusters that are entirely zero: those are not stored but get the
 * L2 zero flag. If the second read deflates to a different size than the first (the source
 * changed under the encoder), imgenc_read() fails with -EIO. Compressed clusters use raw deflate
 * (zlib windowBits -12, as QEMU's qcow2 does), start on a 512-byte boundary and occupy whole
 * sectors (the tail zero-padded); a cluster that does not shrink by at least one sector is
 * stored uncompressed on the next cluster boundary.
 *
 * raw: the virtual disk in order; ZERO and unallocated ranges are sent as zeros without reading
 * the source.
 *
 * Source reads: only inside DATA extents, in increasing offset order (within each pass), at most
 * IMGENC_READ_MAX bytes per call. An encoder is used by one thread at a time. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct agent_err;
struct imgenc;

/* Largest single read the encoder asks of its source. */
#define IMGENC_READ_MAX (4u * 1024 * 1024)

enum imgenc_format {
    IMGENC_FORMAT_RAW,
    IMGENC_FORMAT_QCOW2,
    IMGENC_FORMAT_MAX,
};

/* "raw", "qcow2"; NULL for a value out of range. */
const char *imgenc_format_to_string(enum imgenc_format f);

/* Parse "raw" or "qcow2" (Glance's disk_format names). Returns 0 and writes *ret_f, or -EINVAL. */
int imgenc_format_from_string(const char *s, enum imgenc_format *ret_f);

enum imgenc_extent_type {
    IMGENC_EXTENT_DATA, /* read from the source */
    IMGENC_EXTENT_ZERO, /* reads as zeros, never read; qcow2 marks it with the L2 zero flag */
    IMGENC_EXTENT_TYPE_MAX,
};

/* "data", "zero"; NULL for a value out of range. */
const char *imgenc_extent_type_to_string(enum imgenc_extent_type t);

/* One byte range of the virtual disk. Ranges not covered by any extent are unallocated and read
 * as zeros. */
struct imgenc_extent {
    uint64_t offset;
    uint64_t length;
    enum imgenc_extent_type type;
};

/* Read exactly len bytes at offset of the virtual disk into buf. Returns 0, or a negative errno
 * with err filled (a short read is an error). Called only for DATA ranges. */
typedef int (*imgenc_pread_fn)(void *opaque, void *buf, size_t len, uint64_t offset,
                               struct agent_err *err);

struct imgenc_options {
    uint64_t virtual_size;               /* qcow2: a multiple of 512 */
    const struct imgenc_extent *extents; /* sorted, non-overlapping, non-empty; copied */
    size_t n_extents;
    enum imgenc_format format;
    bool compress;                       /* qcow2 only */
    unsigned cluster_bits;               /* qcow2 cluster size: 0 for the default 16 (64 KiB);
                                          * 9..16 accepted so tests can reach multi-block layouts
                                          * with small files */
    imgenc_pread_fn pread;
    void *opaque;                        /* passed to pread; borrowed, must outlive the encoder */
};

/* Closing-report and progress counters. */
struct imgenc_stats {
    uint64_t bytes_out;           /* image bytes returned by imgenc_read() so far */
    uint64_t data_bytes_read;     /* bytes read from the source so far, all passes */
    uint64_t clusters_stored;     /* qcow2 data clusters in the image (compressed included) */
    uint64_t clusters_compressed; /* of those, stored compressed */
    uint64_t zero_clusters;       /* qcow2 guest clusters not stored (ZERO, unallocated, or
                                   * found all-zero by the sizing pass) */
    uint64_t mem_bytes;           /* heap held by the encoder */
};

/* Validate opts and compute the image layout. The extent map is copied; opts->opaque is
 * borrowed. On success *ret_e owns a new encoder: caller frees with imgenc_free().
 * Errors: -EINVAL for a bad format, compression with raw, a missing pread, an extent of zero
 * length, beyond virtual_size, unsorted or overlapping, an unknown extent type, a qcow2 size not
 * a multiple of 512, or cluster_bits out of range; -EFBIG if the virtual size needs a larger L1
 * table than QEMU accepts (32 MiB, i.e. above 2 PiB at 64 KiB clusters); -ENOMEM. err says which
 * extent or value was refused. */
int imgenc_new(const struct imgenc_options *opts, struct imgenc **ret_e, struct agent_err *err);

/* Free an encoder; NULL-safe. */
void imgenc_free(struct imgenc *e);

/* For _cleanup_(imgenc_freep). */
static inline void
imgenc_freep(struct imgenc **e)
{
    imgenc_free(*e);
}

/* Compressed qcow2: run the sizing pass (reads and deflates every stored data cluster once) so
 * that imgenc_size() is known before the upload starts. No-op for the other modes and when
 * already done; imgenc_read() runs it itself if it was not called. Returns 0, or the source's
 * negative errno (err filled by the source) or -ENOMEM; after a failure the encoder only returns
 * that error. */
int imgenc_prepare(struct imgenc *e, struct agent_err *err);

/* Copy the next at most len bytes of the image into buf and write their number to *ret_n; 0 with
 * len > 0 means the image is complete. Returns 0, or a negative errno: the source's (err filled
 * by the source), -EIO if the source changed between the two passes of compressed mode, -ENOMEM.
 * An encoder that failed keeps returning its first error. */
int imgenc_read(struct imgenc *e, void *buf, size_t len, size_t *ret_n, struct agent_err *err);

/* Exact size of the whole image in bytes: known from imgenc_new() for raw and uncompressed
 * qcow2; for compressed qcow2 after imgenc_prepare() succeeded, 0 before. */
uint64_t imgenc_size(const struct imgenc *e);

/* Image bytes returned by imgenc_read() so far (progress). */
uint64_t imgenc_bytes_out(const struct imgenc *e);

/* Fill *ret_s with the counters above. */
void imgenc_get_stats(const struct imgenc *e, struct imgenc_stats *ret_s);
