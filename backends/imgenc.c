/* The streaming image encoder (see imgenc.h for the layout and the compressed two-pass scheme).
 * It is a generator: imgenc_read() asks produce() for the next piece of the image, which is
 * either a run of zeros (never materialised in a buffer) or a buffer: one metadata cluster built
 * on the spot, a batch of data clusters read from the source, or one deflated cluster. Every
 * metadata cluster is computed from the extent map by cursors that only move forward (struct
 * touch_it over guest units touched by extents, struct pack_it over the placement of the stored
 * clusters in the data area), so the cost of a phase is proportional to what it emits, not to the
 * virtual size. zlib is used here and nowhere else in the agent. */

#include "imgenc.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <zlib.h>

#include "cleanup.h"
#include "err.h"

#define QCOW2_MAGIC 0x514649fbu
#define QCOW2_VERSION 3
#define QCOW2_HEADER_LENGTH 104     /* v3 header without the optional compression_type field */
#define QCOW2_REFCOUNT_ORDER 4      /* 16-bit refcounts */
#define QCOW2_MAX_L1_BYTES (32u << 20) /* QEMU refuses larger L1 tables */
#define QCOW2_DEFAULT_CLUSTER_BITS 16
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 16   /* size codes below fit a byte up to 128 sectors */
#define SECTOR_SIZE 512u

#define L1E_COPIED (UINT64_C(1) << 63)     /* refcount is exactly 1 */
#define L2E_COPIED (UINT64_C(1) << 63)
#define L2E_COMPRESSED (UINT64_C(1) << 62)
#define L2E_ZERO UINT64_C(1)               /* v3: the cluster reads as zeros */

/* Clusters read from the source per batch: 64 x 64 KiB = IMGENC_READ_MAX. */
#define BATCH_MAX 64

/* Compressed mode keeps one size code per stored-candidate (DATA) cluster: */
#define CODE_ZERO 0    /* all zeros: not stored, L2 zero flag */
#define CODE_FULL 255  /* stored uncompressed, cluster-aligned */
/* 1..127: stored deflated in that many 512-byte sectors */

/* zlib raw deflate with a 4 KiB window, as QEMU's qcow2 compressed clusters. */
#define DEFLATE_WINDOW_BITS (-12)
#define DEFLATE_MEM_LEVEL 9

enum phase {
    PH_HEADER,
    PH_L1,
    PH_REFTABLE,
    PH_REFBLOCK,
    PH_L2,
    PH_DATA,
    PH_RAW,
    PH_DONE,
};

/* Units of 2^shift bytes touched by at least one extent (only DATA extents if data_only), in
 * increasing order. For each unit, data tells whether a DATA extent touches it. */
struct touch_it {
    const struct imgenc_extent *x;
    size_t n;
    unsigned shift;
    bool data_only;
    size_t xi;     /* first extent that may still touch unit `next` or later */
    uint64_t next; /* lowest unit not yet returned */
    bool valid;    /* idx/data describe the current unit */
    uint64_t idx;
    bool data;
};

/* Placement of the DATA clusters, in guest order, in the data area (offsets relative to its
 * start). Without codes every cluster is stored whole, back to back. */
struct pack_it {
    const uint8_t *codes;
    uint64_t n;    /* DATA clusters */
    uint64_t k;    /* ordinal of the next one */
    uint64_t pos;  /* end of what is placed so far */
    uint64_t csize;
    bool valid;    /* code/off/len describe the current cluster */
    uint8_t code;
    uint64_t off;
    uint64_t len;  /* 0 for CODE_ZERO */
};

struct imgenc {
    struct imgenc_extent *x;
    size_t n;
    uint64_t vsize;
    enum imgenc_format format;
    bool compress;
    imgenc_pread_fn pread;
    void *opaque;

    /* qcow2 geometry */
    unsigned cbits;
    uint64_t csize;      /* cluster size */
    uint64_t l2_entries; /* per L2 table (and per L1/reftable cluster) */
    uint64_t rc_entries; /* 16-bit refcounts per refcount block */
    uint64_t n_gc;       /* guest clusters */
    uint64_t l1_size, l1_clusters, n_l2, n_data;
    uint64_t rt_clusters, rb_count;
    uint64_t l1_off, rt_off, rb_off, l2_off, data_off;
    uint64_t data_bytes;  /* length of the data area */
    uint64_t total;       /* image size */
    bool sized;           /* total and the layout are final */
    uint8_t *codes;       /* compressed: one size code per DATA cluster */
    uint64_t n_stored, n_compressed;

    /* buffers */
    uint8_t *in;          /* source batch */
    size_t in_cap;
    uint8_t *meta;        /* one metadata cluster */
    uint8_t *zbuf;        /* one deflated cluster */
    z_stream z;
    bool z_ready;
    uint64_t mem;

    /* output state */
    enum phase ph;
    uint64_t ph_i;
    struct touch_it l1_it, l2_l1_it, l2_it, d_it;
    struct pack_it rb_pk, l2_pk, d_pk;
    uint64_t l2_ord;        /* L1 phase: L2 tables referenced so far */
    size_t rd_xi;           /* read cursor over the extents */
    uint64_t raw_pos;
    uint64_t batch[BATCH_MAX];
    unsigned batch_max, batch_n, batch_i;
    uint64_t data_pos;      /* compressed: data-area bytes produced so far */
    uint64_t zero_len;      /* pending zeros, sent before cur */
    const uint8_t *cur;
    size_t cur_len;

    uint64_t bytes_out;
    uint64_t data_read;
    int failed;
};

static const char *const format_names[IMGENC_FORMAT_MAX] = {
    [IMGENC_FORMAT_RAW] = "raw",
    [IMGENC_FORMAT_QCOW2] = "qcow2",
};

static const char *const extent_type_names[IMGENC_EXTENT_TYPE_MAX] = {
    [IMGENC_EXTENT_DATA] = "data",
    [IMGENC_EXTENT_ZERO] = "zero",
};

const char *
imgenc_format_to_string(enum imgenc_format f)
{
    return (unsigned)f < IMGENC_FORMAT_MAX ? format_names[f] : NULL;
}

int
imgenc_format_from_string(const char *s, enum imgenc_format *ret_f)
{
    for (unsigned i = 0; s && i < IMGENC_FORMAT_MAX; i++) {
        if (strcasecmp(s, format_names[i]) == 0) {
            *ret_f = (enum imgenc_format)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *
imgenc_extent_type_to_string(enum imgenc_extent_type t)
{
    return (unsigned)t < IMGENC_EXTENT_TYPE_MAX ? extent_type_names[t] : NULL;
}

static inline uint64_t
div_round_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

static inline uint64_t
min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* log2 of the guest bytes one L2 table maps: cluster_size / 8 entries of one cluster each. */
static inline unsigned
l2_shift(unsigned cbits)
{
    return cbits + cbits - 3;
}

static inline uint64_t
ext_end(const struct imgenc_extent *x)
{
    return x->offset + x->length;
}

static inline void
put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void
put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static inline void
put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static bool
is_zero(const uint8_t *p, size_t len)
{
    return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

/* How many distinct units of 2^shift bytes the extents touch, in O(extents). */
static uint64_t
count_units(const struct imgenc_extent *x, size_t n, unsigned shift, bool data_only)
{
    uint64_t count = 0, last = 0;
    bool have = false;

    for (size_t i = 0; i < n; i++) {
        if (data_only && x[i].type != IMGENC_EXTENT_DATA)
            continue;
        uint64_t f = x[i].offset >> shift, l = (ext_end(&x[i]) - 1) >> shift;
        if (have && f <= last)
            f = last + 1;
        if (f <= l)
            count += l - f + 1;
        if (!have || l > last)
            last = l;
        have = true;
    }
    return count;
}

static void
touch_next(struct touch_it *it)
{
    while (it->xi < it->n) {
        const struct imgenc_extent *x = &it->x[it->xi];
        if ((it->data_only && x->type != IMGENC_EXTENT_DATA) ||
            ((ext_end(x) - 1) >> it->shift) < it->next)
            it->xi++;
        else
            break;
    }
    if (it->xi == it->n) {
        it->valid = false;
        return;
    }
    uint64_t first = it->x[it->xi].offset >> it->shift;
    it->idx = first > it->next ? first : it->next;
    it->next = it->idx + 1;
    it->valid = true;
    /* The extents are sorted and disjoint, so every later extent that starts in unit idx or
     * before touches it: x[xi] ends in unit idx or later, and they begin after x[xi] ends. */
    it->data = false;
    for (size_t j = it->xi; j < it->n && (it->x[j].offset >> it->shift) <= it->idx; j++) {
        if (it->x[j].type == IMGENC_EXTENT_DATA) {
            it->data = true;
            break;
        }
    }
}

static void
touch_init(struct touch_it *it, const struct imgenc *e, unsigned shift, bool data_only)
{
    *it = (struct touch_it){.x = e->x, .n = e->n, .shift = shift, .data_only = data_only};
    touch_next(it);
}

static void
pack_next(struct pack_it *pk)
{
    if (pk->k == pk->n) {
        pk->valid = false;
        return;
    }
    pk->code = pk->codes ? pk->codes[pk->k] : CODE_FULL;
    pk->k++;
    pk->valid = true;
    if (pk->code == CODE_ZERO) {
        pk->off = pk->len = 0;
        return;
    }
    if (pk->code == CODE_FULL) {
        pk->pos = div_round_up(pk->pos, pk->csize) * pk->csize;
        pk->len = pk->csize;
    } else {
        pk->len = (uint64_t)pk->code * SECTOR_SIZE;
    }
    pk->off = pk->pos;
    pk->pos += pk->len;
}

static void
pack_init(struct pack_it *pk, const struct imgenc *e)
{
    *pk = (struct pack_it){.codes = e->codes, .n = e->n_data, .csize = e->csize};
    pack_next(pk);
}

/* Place the metadata once the length of the data area is known. The refcount blocks must cover
 * every cluster of the file, themselves and the refcount table included: iterate to the (least)
 * fixed point, which the counts reach from below in a few rounds. */
static void
layout(struct imgenc *e)
{
    uint64_t fixed = 1 + e->l1_clusters + e->n_l2 + div_round_up(e->data_bytes, e->csize);
    uint64_t rt = 1, rb = 0;

    for (;;) {
        uint64_t nrb = div_round_up(fixed + rt + rb, e->rc_entries);
        uint64_t nrt = div_round_up(nrb * 8, e->csize);
        if (nrt == 0)
            nrt = 1;
        if (nrb == rb && nrt == rt)
            break;
        rb = nrb;
        rt = nrt;
    }
    e->rt_clusters = rt;
    e->rb_count = rb;
    e->l1_off = e->csize;
    e->rt_off = e->l1_off + e->l1_clusters * e->csize;
    e->rb_off = e->rt_off + rt * e->csize;
    e->l2_off = e->rb_off + rb * e->csize;
    e->data_off = e->l2_off + e->n_l2 * e->csize;
    e->total = e->data_off + e->data_bytes;
    e->sized = true;
}

static void
enter_phase(struct imgenc *e, enum phase ph)
{
    e->ph = ph;
    e->ph_i = 0;
    switch (ph) {
    case PH_L1:
        touch_init(&e->l1_it, e, l2_shift(e->cbits), false);
        e->l2_ord = 0;
        break;
    case PH_REFBLOCK:
        pack_init(&e->rb_pk, e);
        break;
    case PH_L2:
        touch_init(&e->l2_l1_it, e, l2_shift(e->cbits), false);
        touch_init(&e->l2_it, e, e->cbits, false);
        pack_init(&e->l2_pk, e);
        break;
    case PH_DATA:
        touch_init(&e->d_it, e, e->cbits, true);
        pack_init(&e->d_pk, e);
        e->rd_xi = 0;
        e->batch_n = e->batch_i = 0;
        e->data_pos = 0;
        break;
    case PH_RAW:
        e->rd_xi = 0;
        e->raw_pos = 0;
        break;
    default:
        break;
    }
}

static void
next_phase(struct imgenc *e)
{
    static const enum phase order[] = {
        [PH_HEADER] = PH_L1,     [PH_L1] = PH_REFTABLE, [PH_REFTABLE] = PH_REFBLOCK,
        [PH_REFBLOCK] = PH_L2,   [PH_L2] = PH_DATA,     [PH_DATA] = PH_DONE,
        [PH_RAW] = PH_DONE,
    };
    enter_phase(e, order[e->ph]);
}

static int
source_read(struct imgenc *e, void *buf, size_t len, uint64_t offset, struct agent_err *err)
{
    int r = e->pread(e->opaque, buf, len, offset, err);
    if (r < 0)
        /* No-op when the source already described the failure, as it should. */
        return agent_err_set(err, r, "imgenc: source read of %zu bytes at offset %" PRIu64
                             " failed", len, offset);
    e->data_read += len;
    return 0;
}

/* Read the DATA parts of the virtual range [a, b) into dest (dest[0] is offset a); the rest of
 * dest is left as it is (zeros). Ranges must come in increasing order within a pass. */
static int
read_range(struct imgenc *e, uint8_t *dest, uint64_t a, uint64_t b, struct agent_err *err)
{
    while (e->rd_xi < e->n && ext_end(&e->x[e->rd_xi]) <= a)
        e->rd_xi++;
    for (size_t j = e->rd_xi; j < e->n && e->x[j].offset < b; j++) {
        const struct imgenc_extent *x = &e->x[j];
        if (x->type != IMGENC_EXTENT_DATA || ext_end(x) <= a)
            continue;
        uint64_t s = x->offset > a ? x->offset : a, t = min_u64(ext_end(x), b);
        int r = source_read(e, dest + (s - a), (size_t)(t - s), s, err);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Fill e->in with the next batch of DATA clusters of it (e->batch lists their guest indices).
 * e->batch_n is 0 when the iterator is exhausted. Consecutive clusters are read together. */
static int
read_batch(struct imgenc *e, struct touch_it *it, struct agent_err *err)
{
    e->batch_n = 0;
    e->batch_i = 0;
    while (e->batch_n < e->batch_max && it->valid) {
        e->batch[e->batch_n++] = it->idx;
        touch_next(it);
    }
    if (e->batch_n == 0)
        return 0;
    memset(e->in, 0, e->batch_n * e->csize);
    for (unsigned i = 0; i < e->batch_n;) {
        unsigned j = i;
        while (j + 1 < e->batch_n && e->batch[j + 1] == e->batch[j] + 1)
            j++;
        uint64_t a = e->batch[i] << e->cbits;
        uint64_t b = min_u64((e->batch[j] + 1) << e->cbits, e->vsize);
        int r = read_range(e, e->in + (size_t)i * e->csize, a, b, err);
        if (r < 0)
            return r;
        i = j + 1;
    }
    return 0;
}

/* Deflate one cluster into e->zbuf. *ret_sectors: the sectors it takes, zero-padded in zbuf, or
 * 0 if it does not fit in cluster_size - 512 bytes (no gain: store it uncompressed). */
static int
deflate_cluster(struct imgenc *e, const uint8_t *src, unsigned *ret_sectors,
                struct agent_err *err)
{
    size_t room = e->csize - SECTOR_SIZE;
    int r = deflateReset(&e->z);
    if (r != Z_OK)
        return agent_err_set(err, -EIO, "imgenc: deflateReset: %d", r);
    e->z.next_in = (Bytef *)(uintptr_t)src; /* zlib's next_in is not const without ZLIB_CONST */
    e->z.avail_in = (uInt)e->csize;
    e->z.next_out = e->zbuf;
    e->z.avail_out = (uInt)room;
    r = deflate(&e->z, Z_FINISH);
    if (r == Z_OK || r == Z_BUF_ERROR) {
        /* Out of room before the end of the stream: incompressible. */
        *ret_sectors = 0;
        return 0;
    }
    if (r != Z_STREAM_END)
        return agent_err_set(err, -EIO, "imgenc: deflate: %d %s", r,
                             e->z.msg ? e->z.msg : "");
    size_t used = room - e->z.avail_out;
    unsigned sectors = (unsigned)div_round_up(used, SECTOR_SIZE);
    memset(e->zbuf + used, 0, sectors * SECTOR_SIZE - used);
    *ret_sectors = sectors;
    return 0;
}

static int
size_code(struct imgenc *e, const uint8_t *src, uint8_t *ret_code, struct agent_err *err)
{
    unsigned sectors = 0; /* set by deflate_cluster() on success; gcc -O2 cannot tell */

    if (is_zero(src, e->csize)) {
        *ret_code = CODE_ZERO;
        return 0;
    }
    int r = deflate_cluster(e, src, &sectors, err);
    if (r < 0)
        return r;
    *ret_code = sectors == 0 ? CODE_FULL : (uint8_t)sectors;
    return 0;
}

static int
fail(struct imgenc *e, int r)
{
    e->failed = r;
    return r;
}

int
imgenc_prepare(struct imgenc *e, struct agent_err *err)
{
    struct touch_it it;
    uint64_t k = 0;

    if (!e)
        return agent_err_set(err, -EINVAL, "imgenc: no encoder");
    if (e->failed)
        return agent_err_set(err, e->failed, "imgenc: the encoder failed earlier");
    if (e->sized)
        return 0;
    assert(e->compress);

    e->rd_xi = 0;
    touch_init(&it, e, e->cbits, true);
    for (;;) {
        int r = read_batch(e, &it, err);
        if (r < 0)
            return fail(e, r);
        if (e->batch_n == 0)
            break;
        for (unsigned i = 0; i < e->batch_n; i++, k++) {
            r = size_code(e, e->in + (size_t)i * e->csize, &e->codes[k], err);
            if (r < 0)
                return fail(e, r);
        }
    }
    assert(k == e->n_data);

    struct pack_it pk;
    pack_init(&pk, e);
    for (; pk.valid; pack_next(&pk)) {
        if (pk.code == CODE_ZERO)
            continue;
        e->n_stored++;
        if (pk.code != CODE_FULL)
            e->n_compressed++;
    }
    e->data_bytes = pk.pos;
    layout(e);
    enter_phase(e, PH_HEADER);
    return 0;
}

static void
build_header(struct imgenc *e)
{
    uint8_t *h = e->meta;

    memset(h, 0, e->csize);
    put_be32(h + 0, QCOW2_MAGIC);
    put_be32(h + 4, QCOW2_VERSION);
    /* 8: backing_file_offset, 16: backing_file_size: none */
    put_be32(h + 20, e->cbits);
    put_be64(h + 24, e->vsize);
    /* 32: crypt_method: none */
    put_be32(h + 36, (uint32_t)e->l1_size);
    put_be64(h + 40, e->l1_off);
    put_be64(h + 48, e->rt_off);
    put_be32(h + 56, (uint32_t)e->rt_clusters);
    /* 60: nb_snapshots, 64: snapshots_offset, 72/80/88: incompatible, compatible and autoclear
     * features: all zero (in particular not dirty, so QEMU opens it read-only without repair). */
    put_be32(h + 96, QCOW2_REFCOUNT_ORDER);
    put_be32(h + 100, QCOW2_HEADER_LENGTH);
    /* The zeros after the header read as the end-of-extensions marker. */
}

static void
build_l1(struct imgenc *e)
{
    uint64_t first = e->ph_i * e->l2_entries, end = first + e->l2_entries;

    memset(e->meta, 0, e->csize);
    /* The L2 tables are laid out in the order of their L1 index. */
    for (struct touch_it *it = &e->l1_it; it->valid && it->idx < end; touch_next(it)) {
        put_be64(e->meta + (it->idx - first) * 8,
                 (e->l2_off + e->l2_ord * e->csize) | L1E_COPIED);
        e->l2_ord++;
    }
}

static void
build_reftable(struct imgenc *e)
{
    uint64_t first = e->ph_i * e->l2_entries;
    uint64_t end = min_u64(first + e->l2_entries, e->rb_count);

    memset(e->meta, 0, e->csize);
    for (uint64_t b = first; b < end; b++)
        put_be64(e->meta + (b - first) * 8, e->rb_off + b * e->csize);
}

static void
build_refblock(struct imgenc *e)
{
    uint64_t h0 = e->ph_i * e->rc_entries, h1 = h0 + e->rc_entries;
    uint64_t n_host = div_round_up(e->total, e->csize);
    uint16_t *rc = (uint16_t *)(void *)e->meta; /* host order while counting */

    memset(e->meta, 0, e->csize);
    if (!e->compress) {
        /* Every cluster of the file is used exactly once. */
        for (uint64_t h = h0; h < min_u64(h1, n_host); h++)
            rc[h - h0] = 1;
    } else {
        uint64_t meta_end = e->data_off / e->csize;
        for (uint64_t h = h0; h < min_u64(h1, meta_end); h++)
            rc[h - h0] = 1;
        /* A host cluster holds a reference for each stored cluster that overlaps it: compressed
         * clusters share host clusters and may straddle two. One that runs into the next block
         * stays current so that block counts it too. */
        struct pack_it *pk = &e->rb_pk;
        for (; pk->valid; pack_next(pk)) {
            if (pk->code == CODE_ZERO)
                continue;
            uint64_t s = (e->data_off + pk->off) / e->csize;
            uint64_t t = (e->data_off + pk->off + pk->len - 1) / e->csize;
            if (s >= h1)
                break;
            for (uint64_t h = s > h0 ? s : h0; h <= min_u64(t, h1 - 1); h++)
                rc[h - h0]++;
            if (t >= h1)
                break;
        }
    }
    for (uint64_t i = 0; i < e->rc_entries; i++)
        put_be16(e->meta + i * 2, rc[i]);
}

static uint64_t
l2_entry(const struct imgenc *e, const struct pack_it *pk)
{
    uint64_t host = e->data_off + pk->off;

    if (pk->code == CODE_ZERO)
        return L2E_ZERO;
    if (pk->code == CODE_FULL)
        return host | L2E_COPIED;
    /* Compressed descriptor: host byte offset in the low 62 - (cluster_bits - 8) bits, above it
     * the number of 512-byte sectors after the first. Never COPIED. */
    return L2E_COMPRESSED | ((uint64_t)(pk->code - 1) << (62 - (e->cbits - 8))) | host;
}

static void
build_l2(struct imgenc *e)
{
    uint64_t l1_idx = e->l2_l1_it.idx;
    uint64_t first = l1_idx * e->l2_entries, end = first + e->l2_entries;

    assert(e->l2_l1_it.valid);
    memset(e->meta, 0, e->csize);
    for (struct touch_it *it = &e->l2_it; it->valid && it->idx < end; touch_next(it)) {
        uint64_t entry = L2E_ZERO;
        if (it->data) {
            assert(e->l2_pk.valid);
            entry = l2_entry(e, &e->l2_pk);
            pack_next(&e->l2_pk);
        }
        put_be64(e->meta + (it->idx - first) * 8, entry);
    }
    touch_next(&e->l2_l1_it);
}

/* Compressed data phase: the next stored cluster of the current batch, with the zeros that
 * align an uncompressed one to its cluster boundary. */
static int
produce_compressed(struct imgenc *e, struct agent_err *err)
{
    for (;;) {
        if (e->batch_i == e->batch_n) {
            int r = read_batch(e, &e->d_it, err);
            if (r < 0)
                return r;
            if (e->batch_n == 0) {
                assert(e->data_pos == e->data_bytes);
                next_phase(e);
                return 0;
            }
        }
        const uint8_t *src = e->in + (size_t)e->batch_i * e->csize;
        uint64_t guest = e->batch[e->batch_i] << e->cbits;
        struct pack_it *pk = &e->d_pk;
        unsigned sectors = 0;
        uint8_t code = pk->code;
        int r = 0;

        assert(pk->valid);
        e->batch_i++;
        if (code == CODE_ZERO) {
            if (!is_zero(src, e->csize))
                r = -EIO;
        } else if (code != CODE_FULL) {
            r = deflate_cluster(e, src, &sectors, err);
            if (r == 0 && sectors != code)
                r = -EIO;
        }
        if (r == -EIO)
            return agent_err_set(err, r, "imgenc: the cluster at guest offset %" PRIu64
                                 " changed between the sizing and the sending pass (source "
                                 "not stable)", guest);
        if (r < 0)
            return r;
        if (code == CODE_ZERO) {
            pack_next(pk);
            continue;
        }
        e->zero_len = pk->off - e->data_pos;
        e->cur = code == CODE_FULL ? src : e->zbuf;
        e->cur_len = (size_t)pk->len;
        e->data_pos = pk->off + pk->len;
        pack_next(pk);
        return 0;
    }
}

static int
produce_raw(struct imgenc *e, struct agent_err *err)
{
    while (e->rd_xi < e->n && (e->x[e->rd_xi].type != IMGENC_EXTENT_DATA ||
                               ext_end(&e->x[e->rd_xi]) <= e->raw_pos))
        e->rd_xi++;
    if (e->raw_pos == e->vsize) {
        next_phase(e);
        return 0;
    }
    if (e->rd_xi == e->n || e->x[e->rd_xi].offset > e->raw_pos) {
        uint64_t to = e->rd_xi == e->n ? e->vsize : e->x[e->rd_xi].offset;
        e->zero_len = to - e->raw_pos;
        e->raw_pos = to;
        return 0;
    }
    size_t len = (size_t)min_u64(ext_end(&e->x[e->rd_xi]) - e->raw_pos, e->in_cap);
    int r = source_read(e, e->in, len, e->raw_pos, err);
    if (r < 0)
        return r;
    e->cur = e->in;
    e->cur_len = len;
    e->raw_pos += len;
    return 0;
}

/* Set up the next piece of output in zero_len/cur, or move to PH_DONE. */
static int
produce(struct imgenc *e, struct agent_err *err)
{
    uint64_t count = 0;
    int r;

    switch (e->ph) {
    case PH_HEADER:
        count = 1;
        break;
    case PH_L1:
        count = e->l1_clusters;
        break;
    case PH_REFTABLE:
        count = e->rt_clusters;
        break;
    case PH_REFBLOCK:
        count = e->rb_count;
        break;
    case PH_L2:
        count = e->n_l2;
        break;
    case PH_DATA:
        if (e->compress)
            return produce_compressed(e, err);
        r = read_batch(e, &e->d_it, err);
        if (r < 0)
            return r;
        if (e->batch_n == 0) {
            next_phase(e);
            return 0;
        }
        /* Uncompressed data clusters are back to back on the host side. */
        e->cur = e->in;
        e->cur_len = e->batch_n * e->csize;
        return 0;
    case PH_RAW:
        return produce_raw(e, err);
    case PH_DONE:
        return 0;
    }
    if (e->ph_i == count) {
        next_phase(e);
        return 0;
    }
    switch (e->ph) {
    case PH_HEADER:
        build_header(e);
        break;
    case PH_L1:
        build_l1(e);
        break;
    case PH_REFTABLE:
        build_reftable(e);
        break;
    case PH_REFBLOCK:
        build_refblock(e);
        break;
    case PH_L2:
        build_l2(e);
        break;
    default:
        assert(false);
    }
    e->ph_i++;
    e->cur = e->meta;
    e->cur_len = e->csize;
    return 0;
}

int
imgenc_read(struct imgenc *e, void *buf, size_t len, size_t *ret_n, struct agent_err *err)
{
    uint8_t *out = buf;
    size_t done = 0;
    int r;

    if (!e || (!buf && len > 0) || !ret_n)
        return agent_err_set(err, -EINVAL, "imgenc: read: invalid arguments");
    if (e->failed)
        return agent_err_set(err, e->failed, "imgenc: the encoder failed earlier");
    if (!e->sized) {
        r = imgenc_prepare(e, err);
        if (r < 0)
            return r;
    }
    while (done < len) {
        if (e->zero_len > 0) {
            size_t n = (size_t)min_u64(e->zero_len, len - done);
            memset(out + done, 0, n);
            done += n;
            e->zero_len -= n;
        } else if (e->cur_len > 0) {
            size_t n = e->cur_len < len - done ? e->cur_len : len - done;
            memcpy(out + done, e->cur, n);
            done += n;
            e->cur += n;
            e->cur_len -= n;
        } else if (e->ph == PH_DONE) {
            break;
        } else {
            r = produce(e, err);
            if (r < 0)
                return fail(e, r);
        }
    }
    e->bytes_out += done;
    assert(e->ph != PH_DONE || e->zero_len > 0 || e->cur_len > 0 || e->bytes_out == e->total);
    *ret_n = done;
    return 0;
}

static voidpf
zalloc_counted(voidpf opaque, uInt items, uInt size)
{
    struct imgenc *e = opaque;
    e->mem += (uint64_t)items * size;
    return calloc(items, size);
}

static void
zfree_counted(voidpf opaque, voidpf p)
{
    (void)opaque;
    free(p);
}

static int
check_extents(const struct imgenc_options *o, struct agent_err *err)
{
    for (size_t i = 0; i < o->n_extents; i++) {
        const struct imgenc_extent *x = &o->extents[i];
        if ((unsigned)x->type >= IMGENC_EXTENT_TYPE_MAX)
            return agent_err_set(err, -EINVAL, "imgenc: extent %zu: unknown type %d", i,
                                 (int)x->type);
        if (x->length == 0)
            return agent_err_set(err, -EINVAL, "imgenc: extent %zu at %" PRIu64
                                 " has zero length", i, x->offset);
        if (x->offset > o->virtual_size || x->length > o->virtual_size - x->offset)
            return agent_err_set(err, -EINVAL, "imgenc: extent %zu [%" PRIu64 ", +%" PRIu64
                                 ") goes beyond the virtual size %" PRIu64, i, x->offset,
                                 x->length, o->virtual_size);
        if (i > 0 && x->offset < ext_end(&o->extents[i - 1]))
            return agent_err_set(err, -EINVAL, "imgenc: extent %zu at %" PRIu64
                                 " is unsorted or overlaps extent %zu [%" PRIu64 ", +%" PRIu64
                                 ")", i, x->offset, i - 1, o->extents[i - 1].offset,
                                 o->extents[i - 1].length);
    }
    return 0;
}

static int
new_qcow2(struct imgenc *e, unsigned cbits, struct agent_err *err)
{
    e->cbits = cbits;
    e->csize = UINT64_C(1) << cbits;
    e->l2_entries = e->csize / 8;
    e->rc_entries = e->csize * 8 / (1u << QCOW2_REFCOUNT_ORDER);
    e->n_gc = div_round_up(e->vsize, e->csize);
    e->l1_size = div_round_up(e->n_gc, e->l2_entries);
    if (e->l1_size > QCOW2_MAX_L1_BYTES / 8)
        return agent_err_set(err, -EFBIG, "imgenc: virtual size %" PRIu64 " is too large for "
                             "qcow2 with %" PRIu64 "-byte clusters", e->vsize, e->csize);
    e->l1_clusters = div_round_up(e->l1_size * 8, e->csize);
    e->n_l2 = count_units(e->x, e->n, l2_shift(cbits), false);
    e->n_data = count_units(e->x, e->n, cbits, true);
    e->batch_max = (unsigned)min_u64(BATCH_MAX, IMGENC_READ_MAX / e->csize);
    e->in_cap = (size_t)(e->batch_max * e->csize);
    e->meta = malloc(e->csize);
    if (!e->meta)
        return agent_err_set(err, -ENOMEM, "imgenc: out of memory");
    e->mem += e->csize;

    if (!e->compress) {
        e->n_stored = e->n_data;
        e->data_bytes = e->n_data * e->csize;
        layout(e);
        return 0;
    }
    e->zbuf = malloc(e->csize);
    e->codes = malloc(e->n_data > 0 ? e->n_data : 1);
    if (!e->zbuf || !e->codes)
        return agent_err_set(err, -ENOMEM, "imgenc: out of memory for %" PRIu64
                             " cluster sizes", e->n_data);
    e->mem += e->csize + e->n_data;
    e->z.zalloc = zalloc_counted;
    e->z.zfree = zfree_counted;
    e->z.opaque = e;
    int r = deflateInit2(&e->z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, DEFLATE_WINDOW_BITS,
                         DEFLATE_MEM_LEVEL, Z_DEFAULT_STRATEGY);
    if (r != Z_OK)
        return agent_err_set(err, r == Z_MEM_ERROR ? -ENOMEM : -EIO,
                             "imgenc: deflateInit2: %d", r);
    e->z_ready = true;
    return 0;
}

int
imgenc_new(const struct imgenc_options *o, struct imgenc **ret_e, struct agent_err *err)
{
    _cleanup_(imgenc_freep) struct imgenc *e = NULL;
    unsigned cbits;
    int r;

    if (!o || !ret_e || (!o->extents && o->n_extents > 0))
        return agent_err_set(err, -EINVAL, "imgenc: invalid arguments");
    if ((unsigned)o->format >= IMGENC_FORMAT_MAX)
        return agent_err_set(err, -EINVAL, "imgenc: unknown output format %d", (int)o->format);
    if (!o->pread)
        return agent_err_set(err, -EINVAL, "imgenc: no source read function");
    if (o->compress && o->format != IMGENC_FORMAT_QCOW2)
        return agent_err_set(err, -EINVAL, "imgenc: compression needs qcow2, not %s",
                             imgenc_format_to_string(o->format));
    cbits = o->cluster_bits ? o->cluster_bits : QCOW2_DEFAULT_CLUSTER_BITS;
    if (cbits < QCOW2_MIN_CLUSTER_BITS || cbits > QCOW2_MAX_CLUSTER_BITS)
        return agent_err_set(err, -EINVAL, "imgenc: cluster_bits %u not in [%d, %d]",
                             o->cluster_bits, QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
    if (o->format == IMGENC_FORMAT_QCOW2 && o->virtual_size % SECTOR_SIZE != 0)
        /* QEMU reads the qcow2 size in whole sectors and would drop the tail. */
        return agent_err_set(err, -EINVAL, "imgenc: qcow2 virtual size %" PRIu64
                             " is not a multiple of %u", o->virtual_size, SECTOR_SIZE);
    if (o->virtual_size > INT64_MAX)
        return agent_err_set(err, -EFBIG, "imgenc: virtual size %" PRIu64 " too large",
                             o->virtual_size);
    r = check_extents(o, err);
    if (r < 0)
        return r;

    e = calloc(1, sizeof(*e));
    if (!e)
        return agent_err_set(err, -ENOMEM, "imgenc: out of memory");
    e->mem = sizeof(*e);
    if (o->n_extents > 0) {
        e->x = calloc(o->n_extents, sizeof(*e->x));
        if (!e->x)
            return agent_err_set(err, -ENOMEM, "imgenc: out of memory for %zu extents",
                                 o->n_extents);
        memcpy(e->x, o->extents, o->n_extents * sizeof(*e->x));
        e->mem += o->n_extents * sizeof(*e->x);
    }
    e->n = o->n_extents;
    e->vsize = o->virtual_size;
    e->format = o->format;
    e->compress = o->compress;
    e->pread = o->pread;
    e->opaque = o->opaque;

    if (o->format == IMGENC_FORMAT_RAW) {
        e->in_cap = IMGENC_READ_MAX;
        e->total = e->vsize;
        e->sized = true;
    } else {
        r = new_qcow2(e, cbits, err);
        if (r < 0)
            return r;
    }
    e->in = malloc(e->in_cap);
    if (!e->in)
        return agent_err_set(err, -ENOMEM, "imgenc: out of memory");
    e->mem += e->in_cap;
    if (e->sized)
        enter_phase(e, e->format == IMGENC_FORMAT_RAW ? PH_RAW : PH_HEADER);
    *ret_e = TAKE_PTR(e);
    return 0;
}

void
imgenc_free(struct imgenc *e)
{
    if (!e)
        return;
    if (e->z_ready)
        deflateEnd(&e->z);
    free(e->codes);
    free(e->zbuf);
    free(e->meta);
    free(e->in);
    free(e->x);
    free(e);
}

uint64_t
imgenc_size(const struct imgenc *e)
{
    return e && e->sized ? e->total : 0;
}

uint64_t
imgenc_bytes_out(const struct imgenc *e)
{
    return e ? e->bytes_out : 0;
}

void
imgenc_get_stats(const struct imgenc *e, struct imgenc_stats *ret_s)
{
    *ret_s = (struct imgenc_stats){0};
    if (!e)
        return;
    ret_s->bytes_out = e->bytes_out;
    ret_s->data_bytes_read = e->data_read;
    ret_s->mem_bytes = e->mem;
    if (e->format == IMGENC_FORMAT_QCOW2 && e->sized) {
        ret_s->clusters_stored = e->n_stored;
        ret_s->clusters_compressed = e->n_compressed;
        ret_s->zero_clusters = e->n_gc - e->n_stored;
    }
}
