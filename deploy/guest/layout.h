/*
 * On-disk layout of the test guest's virtio disk, shared by the in-guest writer
 * (deploy/guest/writer.c) and the host-side checker (tests/tools/imgcheck.c).
 *
 * The disk is split into fixed regions (byte offsets, all multiples of 1 MiB):
 *
 *   [ 0 MiB, 16 MiB)  base region: a deterministic pattern written into the *base* qcow2 at
 *                     build time and never touched afterwards. An image that holds it proves
 *                     the backing chain was read, not just the overlay.
 *   [16 MiB, 48 MiB)  ring region: 8192 slots of 4 KiB. The writer writes sequence numbers
 *                     1, 2, 3, ... in order, one block per write, each write completed
 *                     (O_DIRECT + fdatasync) before the next starts. Sequence s goes to slot
 *                     layout_ring_slot(s): a fixed permutation of (s - 1) mod 8192, so each lap
 *                     scatters its writes over the whole ring and the latest write for a slot
 *                     below any sequence number is computable in O(1).
 *   [64 MiB, 96 MiB)  data filesystem: a 32 MiB ext2 made at build time, mounted in the guest
 *                     through a loop device at this offset; it is what fsfreeze freezes.
 *   [96 MiB, end)     unused (zeros). The disk's virtual size is a build variable >= 96 MiB.
 *
 * Ring block format (host byte order; the guest and host are both x86-64):
 *
 *   off    0  u64  magic    LAYOUT_RING_MAGIC
 *   off    8  u64  seq      sequence number, >= 1
 *   off   16  u32  slot     slot index the block was written to
 *   off   20  u32  nslots   LAYOUT_RING_SLOTS
 *   off   24  u64  mono_ns  writer's CLOCK_MONOTONIC when it built the block
 *   off   32  u64  run_id   random per writer start (tells boots apart)
 *   off   40  ...  payload  u64 words derived from seq only (layout_payload_word)
 *   off 4088  u64  csum     FNV-1a 64 over bytes [0, 4088)
 *
 * A never-written slot is all zeros. Everything here is libc-only and header-only so the writer
 * (static, in the initramfs) and the checker (tests/tools) share one definition.
 */
#pragma once

#include <stdint.h>
#include <string.h>

#define LAYOUT_BLOCK_SIZE       4096u
#define LAYOUT_MIB              (1024ull * 1024ull)

#define LAYOUT_BASE_OFFSET      (0ull)
#define LAYOUT_BASE_LEN         (16ull * LAYOUT_MIB)
#define LAYOUT_BASE_BLOCKS      ((uint32_t)(LAYOUT_BASE_LEN / LAYOUT_BLOCK_SIZE))

#define LAYOUT_RING_OFFSET      (16ull * LAYOUT_MIB)
#define LAYOUT_RING_SLOTS       8192u           /* must be a power of two */
#define LAYOUT_RING_LEN         ((uint64_t)LAYOUT_RING_SLOTS * LAYOUT_BLOCK_SIZE)

#define LAYOUT_FS_OFFSET        (64ull * LAYOUT_MIB)
#define LAYOUT_FS_LEN           (32ull * LAYOUT_MIB)

/* Smallest disk the layout fits on. */
#define LAYOUT_MIN_DISK         (LAYOUT_FS_OFFSET + LAYOUT_FS_LEN)

#define LAYOUT_RING_MAGIC       0x3130545257474143ull  /* "CAGWRT01" read little-endian */
#define LAYOUT_PATTERN_SEED     0x6f1d7a4c2b1e4c55ull

#define LAYOUT_OFF_MAGIC        0u
#define LAYOUT_OFF_SEQ          8u
#define LAYOUT_OFF_SLOT         16u
#define LAYOUT_OFF_NSLOTS       20u
#define LAYOUT_OFF_MONO_NS      24u
#define LAYOUT_OFF_RUN_ID       32u
#define LAYOUT_OFF_PAYLOAD      40u
#define LAYOUT_OFF_CSUM         (LAYOUT_BLOCK_SIZE - 8u)

/* Odd multiplier: k -> k * A mod 2^n is a bijection on [0, 2^n). */
#define LAYOUT_SLOT_MULT        0x9e3779b1u
#define LAYOUT_SLOT_ADD         0x2545u

enum layout_block_state {
    LAYOUT_BLOCK_EMPTY,         /* all zeros: never written */
    LAYOUT_BLOCK_VALID,
    LAYOUT_BLOCK_BAD_MAGIC,     /* non-zero but not a ring block (torn or foreign data) */
    LAYOUT_BLOCK_BAD_CSUM,
    LAYOUT_BLOCK_BAD_SLOT,      /* header names another slot, or seq does not map here */
    LAYOUT_BLOCK_BAD_PAYLOAD,
    LAYOUT_BLOCK_STATE_MAX
};

static inline const char *
layout_block_state_to_string(enum layout_block_state s)
{
    static const char *const names[LAYOUT_BLOCK_STATE_MAX] = {
        [LAYOUT_BLOCK_EMPTY] = "empty",
        [LAYOUT_BLOCK_VALID] = "valid",
        [LAYOUT_BLOCK_BAD_MAGIC] = "bad magic",
        [LAYOUT_BLOCK_BAD_CSUM] = "bad checksum",
        [LAYOUT_BLOCK_BAD_SLOT] = "wrong slot",
        [LAYOUT_BLOCK_BAD_PAYLOAD] = "bad payload",
    };

    if ((unsigned)s >= LAYOUT_BLOCK_STATE_MAX)
        return "unknown";
    return names[s];
}

/* splitmix64 finalizer: a cheap, well-mixed bijection on 64-bit words. */
static inline uint64_t
layout_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* The base region's content: word w (byte offset 8 * w from the start of the disk). */
static inline uint64_t
layout_pattern_word(uint64_t word_index)
{
    return layout_mix64(word_index ^ LAYOUT_PATTERN_SEED);
}

/* Fill one block-sized buffer of the base region; block_index counts from the disk start. */
static inline void
layout_pattern_fill(void *buf, uint64_t block_index)
{
    uint64_t w0 = block_index * (LAYOUT_BLOCK_SIZE / 8u);
    unsigned char *p = buf;

    for (unsigned i = 0; i < LAYOUT_BLOCK_SIZE / 8u; i++) {
        uint64_t v = layout_pattern_word(w0 + i);
        memcpy(p + 8u * i, &v, 8);
    }
}

/* Ring payload word i of the block holding sequence seq. */
static inline uint64_t
layout_payload_word(uint64_t seq, unsigned i)
{
    return layout_mix64(seq * 0x100000001b3ull + i + 1u);
}

static inline uint64_t
layout_fnv1a64(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    uint64_t h = 0xcbf29ce484222325ull;

    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* Slot that sequence number seq (>= 1) is written to. */
static inline uint32_t
layout_ring_slot(uint64_t seq)
{
    uint32_t k = (uint32_t)((seq - 1u) & (LAYOUT_RING_SLOTS - 1u));

    return (k * LAYOUT_SLOT_MULT + LAYOUT_SLOT_ADD) & (LAYOUT_RING_SLOTS - 1u);
}

/* Position within a lap, (seq - 1) mod LAYOUT_RING_SLOTS, of the writes that land on slot. */
static inline uint32_t
layout_ring_lap_pos(uint32_t slot)
{
    /* Inverse of an odd number mod 2^32 by Newton's iteration (each step doubles the bits). */
    uint32_t inv = LAYOUT_SLOT_MULT;

    for (int i = 0; i < 5; i++)
        inv *= 2u - LAYOUT_SLOT_MULT * inv;
    return ((slot - LAYOUT_SLOT_ADD) * inv) & (LAYOUT_RING_SLOTS - 1u);
}

/* The latest sequence number <= highest written to slot, or 0 if there is none. */
static inline uint64_t
layout_ring_expected(uint64_t highest, uint32_t slot)
{
    uint64_t k = layout_ring_lap_pos(slot);

    if (highest < k + 1u)
        return 0;
    return ((highest - 1u - k) / LAYOUT_RING_SLOTS) * LAYOUT_RING_SLOTS + k + 1u;
}

/* Byte offset of slot on the disk. */
static inline uint64_t
layout_ring_slot_offset(uint32_t slot)
{
    return LAYOUT_RING_OFFSET + (uint64_t)slot * LAYOUT_BLOCK_SIZE;
}

/* Build the ring block for seq in buf (LAYOUT_BLOCK_SIZE bytes). */
static inline void
layout_block_fill(void *buf, uint64_t seq, uint64_t mono_ns, uint64_t run_id)
{
    unsigned char *p = buf;
    uint64_t magic = LAYOUT_RING_MAGIC, csum;
    uint32_t slot = layout_ring_slot(seq), nslots = LAYOUT_RING_SLOTS;

    memcpy(p + LAYOUT_OFF_MAGIC, &magic, 8);
    memcpy(p + LAYOUT_OFF_SEQ, &seq, 8);
    memcpy(p + LAYOUT_OFF_SLOT, &slot, 4);
    memcpy(p + LAYOUT_OFF_NSLOTS, &nslots, 4);
    memcpy(p + LAYOUT_OFF_MONO_NS, &mono_ns, 8);
    memcpy(p + LAYOUT_OFF_RUN_ID, &run_id, 8);
    for (unsigned i = 0; LAYOUT_OFF_PAYLOAD + 8u * i < LAYOUT_OFF_CSUM; i++) {
        uint64_t v = layout_payload_word(seq, i);
        memcpy(p + LAYOUT_OFF_PAYLOAD + 8u * i, &v, 8);
    }
    csum = layout_fnv1a64(p, LAYOUT_OFF_CSUM);
    memcpy(p + LAYOUT_OFF_CSUM, &csum, 8);
}

/*
 * Classify the block read from slot. On LAYOUT_BLOCK_VALID stores its sequence number in
 * *ret_seq; on anything else leaves *ret_seq alone.
 */
static inline enum layout_block_state
layout_block_check(const void *buf, uint32_t slot, uint64_t *ret_seq)
{
    const unsigned char *p = buf;
    uint64_t magic, seq, csum;
    uint32_t hdr_slot, nslots;
    int zero = 1;

    for (unsigned i = 0; i < LAYOUT_BLOCK_SIZE; i++) {
        if (p[i] != 0) {
            zero = 0;
            break;
        }
    }
    if (zero)
        return LAYOUT_BLOCK_EMPTY;

    memcpy(&magic, p + LAYOUT_OFF_MAGIC, 8);
    if (magic != LAYOUT_RING_MAGIC)
        return LAYOUT_BLOCK_BAD_MAGIC;
    memcpy(&csum, p + LAYOUT_OFF_CSUM, 8);
    if (csum != layout_fnv1a64(p, LAYOUT_OFF_CSUM))
        return LAYOUT_BLOCK_BAD_CSUM;
    memcpy(&seq, p + LAYOUT_OFF_SEQ, 8);
    memcpy(&hdr_slot, p + LAYOUT_OFF_SLOT, 4);
    memcpy(&nslots, p + LAYOUT_OFF_NSLOTS, 4);
    if (seq == 0 || hdr_slot != slot || nslots != LAYOUT_RING_SLOTS ||
        layout_ring_slot(seq) != slot)
        return LAYOUT_BLOCK_BAD_SLOT;
    for (unsigned i = 0; LAYOUT_OFF_PAYLOAD + 8u * i < LAYOUT_OFF_CSUM; i++) {
        uint64_t v;

        memcpy(&v, p + LAYOUT_OFF_PAYLOAD + 8u * i, 8);
        if (v != layout_payload_word(seq, i))
            return LAYOUT_BLOCK_BAD_PAYLOAD;
    }
    *ret_seq = seq;
    return LAYOUT_BLOCK_VALID;
}
