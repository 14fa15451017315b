/* The DSA descriptor and completion-record layout (shared/specs/dsa.md),
 * and the small C API shared by the extension's files.
 *
 * Everything here is plain C with no Python: the emulator and the portal
 * code are usable (and readable) without the CPython glue in _dsa.c.
 */
#ifndef DMUSERD_DSA_HW_H
#define DMUSERD_DSA_HW_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <sys/types.h>

/* Opcodes. */
#define DSA_OP_NOOP 0x00
#define DSA_OP_BATCH 0x01
#define DSA_OP_DRAIN 0x02
#define DSA_OP_MEMMOVE 0x03
#define DSA_OP_MEMFILL 0x04
#define DSA_OP_COMPARE 0x05
#define DSA_OP_COMPARE_PATTERN 0x06
#define DSA_OP_CREATE_DELTA 0x07
#define DSA_OP_APPLY_DELTA 0x08
#define DSA_OP_DUALCAST 0x09
#define DSA_OP_CRCGEN 0x10
#define DSA_OP_COPY_CRC 0x11
#define DSA_OP_CACHE_FLUSH 0x20

/* Descriptor flags (24 bits at bytes 4-6). */
#define DSA_FLAG_FENCE 0x1u
#define DSA_FLAG_BOF 0x2u
#define DSA_FLAG_CRAV 0x4u
#define DSA_FLAG_RCR 0x8u
#define DSA_FLAG_RCI 0x10u
#define DSA_FLAG_CHECK_RESULT 0x80u
#define DSA_FLAG_CACHE_CONTROL 0x100u
#define DSA_FLAG_STRICT_ORDERING 0x2000u
#define DSA_FLAG_DEST_READBACK 0x4000u
#define DSA_FLAG_CRC_SEED_ADDR 0x10000u
#define DSA_FLAG_CRC_BYPASS_INV 0x20000u
#define DSA_FLAG_CRC_BYPASS_DATA_REFLECT 0x40000u
#define DSA_FLAGS_GENERIC                                                                   \
    (DSA_FLAG_FENCE | DSA_FLAG_BOF | DSA_FLAG_CRAV | DSA_FLAG_RCR | DSA_FLAG_RCI |          \
     DSA_FLAG_CHECK_RESULT | DSA_FLAG_CACHE_CONTROL | DSA_FLAG_STRICT_ORDERING |            \
     DSA_FLAG_DEST_READBACK)

/* Completion status codes. */
#define DSA_ST_NONE 0x00
#define DSA_ST_SUCCESS 0x01
#define DSA_ST_SUCCESS_PRED 0x02
#define DSA_ST_PAGE_FAULT 0x03
#define DSA_ST_PAGE_REQ_REJECTED 0x04
#define DSA_ST_BATCH_FAIL 0x05
#define DSA_ST_BATCH_PAGE_FAULT 0x06
#define DSA_ST_DR_OFFSET_NOINC 0x07
#define DSA_ST_DR_OFFSET_ERANGE 0x08
#define DSA_ST_BAD_OPCODE 0x10
#define DSA_ST_INVALID_FLAGS 0x11
#define DSA_ST_NONZERO_RESERVED 0x12
#define DSA_ST_XFER_ERANGE 0x13
#define DSA_ST_DESC_CNT_ERANGE 0x14
#define DSA_ST_DR_ERANGE 0x15
#define DSA_ST_OVERLAP 0x16
#define DSA_ST_DCAST_ERR 0x17
#define DSA_ST_DESCLIST_ALIGN 0x18
#define DSA_ST_CR_FAULT 0x1a
#define DSA_ST_CR_ALIGN 0x1b
#define DSA_ST_ADDR_ALIGN 0x1c
#define DSA_ST_WRITE_FAULT 0x80 /* or-ed into status 3: the fault was on a write */

/* Create-delta granule and record entry (u16 offset in granules, 8 data bytes). */
#define DSA_DELTA_GRANULE 8
#define DSA_DELTA_ENTRY 10
#define DSA_DELTA_MAX_XFER (0x10000u * DSA_DELTA_GRANULE)

/* The 64-byte descriptor; offsets are the spec's. */
struct dsa_desc {
    uint32_t pasid_priv;     /* 0: pasid bits 0-19, priv bit 31 */
    uint32_t flags_opcode;   /* 4: flags bits 0-23, opcode bits 24-31 (byte 7) */
    uint64_t completion;     /* 8 */
    uint64_t src;            /* 16: source / pattern / descriptor list */
    uint64_t dst;            /* 24: destination / second source / pattern */
    uint32_t size;           /* 32: transfer size or descriptor count */
    uint16_t int_handle;     /* 36 */
    uint16_t reserved;       /* 38 */
    uint8_t op_specific[24]; /* 40-63 */
} __attribute__((aligned(64)));

/* The 32-byte completion record; the device writes status last. */
struct dsa_rec {
    uint8_t status;           /* 0 */
    uint8_t result;           /* 1 */
    uint8_t fault_info;       /* 2: bit 0 set = write fault */
    uint8_t reserved;         /* 3 */
    uint32_t bytes_completed; /* 4 (descriptors completed for a batch) */
    uint64_t fault_addr;      /* 8 */
    uint32_t op_specific;     /* 16: CRC value, delta record size, invalid flags */
    uint8_t rest[12];
} __attribute__((aligned(32)));

_Static_assert(sizeof(struct dsa_desc) == 64, "descriptor is 64 bytes");
_Static_assert(sizeof(struct dsa_rec) == 32, "completion record is 32 bytes");

static inline uint8_t dsa_desc_opcode(const struct dsa_desc *d) { return d->flags_opcode >> 24; }
static inline uint32_t dsa_desc_flags(const struct dsa_desc *d) { return d->flags_opcode & 0xffffffu; }
static inline uint64_t dsa_desc_u64(const struct dsa_desc *d, unsigned off)
{
    uint64_t v;
    __builtin_memcpy(&v, (const uint8_t *)d + off, 8);
    return v;
}
static inline uint32_t dsa_desc_u32(const struct dsa_desc *d, unsigned off)
{
    uint32_t v;
    __builtin_memcpy(&v, (const uint8_t *)d + off, 4);
    return v;
}
static inline void dsa_desc_put(struct dsa_desc *d, unsigned off, const void *v, size_t n)
{
    __builtin_memcpy((uint8_t *)d + off, v, n);
}

/* Every field a descriptor can carry, by meaning; dsa_desc_build places them
 * at the offsets the opcode uses (the one place that knows the layout). */
struct dsa_fields {
    unsigned opcode;
    uint32_t flags;
    uint32_t pasid;
    int priv;
    uint64_t completion;
    uint64_t src, src2, dst, dst2;  /* buffers (src2 = compare's second source) */
    uint64_t pattern;               /* fill / compare-pattern value */
    uint32_t size;
    uint16_t int_handle;
    uint8_t expected_res;
    uint64_t delta_addr;            /* create: record out; apply: record in */
    uint32_t max_delta;             /* create: record capacity */
    uint32_t delta_size;            /* apply: record size */
    uint32_t crc_seed;
    uint64_t seed_addr;
    uint64_t desc_list;             /* batch */
    uint32_t count;                 /* batch */
};
void dsa_desc_build(struct dsa_desc *d, const struct dsa_fields *f);

/* CPU features (CPUID leaf 7 ECX bits 28/29/5, leaf 1 ECX bit 20). */
struct dsa_cpu {
    int movdir64b, enqcmd, waitpkg, sse42;
};
const struct dsa_cpu *dsa_cpu_features(void);
void dsa_movdir64b(void *portal, const void *desc);
int dsa_enqcmd(void *portal, const void *desc); /* 1 = retry (queue full) */
void dsa_umwait_until(volatile void *addr, uint64_t tsc_deadline);
uint32_t dsa_crc32c(uint32_t seed, const void *data, size_t n); /* crc32c package convention */
uint32_t dsa_crc32c_msb_first(uint32_t reg, const void *data, size_t n); /* raw register, MSB first */

/* GENCAP register bits (the kernel's union gen_cap_reg; sysfs dsaN/gen_cap). */
#define DSA_GENCAP_BLOCK_ON_FAULT (1ull << 0)
#define DSA_GENCAP_OVERLAP_COPY (1ull << 1)
#define DSA_GENCAP_CACHE_CONTROL_MEM (1ull << 2)
#define DSA_GENCAP_CACHE_CONTROL_CACHE (1ull << 3)

/* The emulated device (dsa_emu.c). */
struct dsa_emu_config {
    unsigned size;           /* WQ size: descriptors accepted and not completed */
    int shared;              /* shared WQ: full answers retry; dedicated: overflow counted */
    int block_on_fault;      /* WQ configured with block-on-fault enabled */
    uint32_t max_transfer;
    uint32_t max_batch;
    uint64_t gen_cap;        /* GENCAP: block on fault, overlapping copy, cache control */
    uint8_t op_cap[32];      /* bitmap of opcodes the device supports */
    uint8_t op_config[32];   /* bitmap of opcodes this WQ accepts (WQCFG op config) */
    int user_submission_safe; /* the kernel's flag: without it write() refuses BATCH, sysfs hides it */
    unsigned enqcmds_retries; /* the kernel's ENQCMDS attempts for a write() to a shared WQ */
    unsigned refuse_delay_us; /* a refused portal write (shared queue full) takes this long (tests) */
};
struct dsa_emu_stats {
    uint64_t descriptors, batches, members, overflows, retries, faults, cr_faults, blocked, max_occupancy;
    uint64_t writes, write_errors; /* write() calls to the modelled cdev, and those refused */
    uint64_t hung;                 /* descriptors accepted that never completed (hang_next) */
    uint64_t bytes;                /* bytes data operations got through (done work, counted once per run) */
    unsigned occupancy;
};
struct dsa_emu;
struct dsa_emu *dsa_emu_create(const struct dsa_emu_config *cfg);
void dsa_emu_destroy(struct dsa_emu *e);
int dsa_emu_portal_write(struct dsa_emu *e, const struct dsa_desc *d); /* 1 = retry */
int dsa_emu_cdev_write(struct dsa_emu *e, const struct dsa_desc *d);   /* 0 or an errno, as cdev.c's write() */
void dsa_emu_execute(struct dsa_emu *e, const struct dsa_desc *d);     /* synchronous */
void dsa_emu_set_fault(struct dsa_emu *e, uint64_t addr, uint64_t len, int sticky);
void dsa_emu_clear_faults(struct dsa_emu *e);
void dsa_emu_touch(struct dsa_emu *e, uint64_t addr);
void dsa_emu_fault_next_records(struct dsa_emu *e, unsigned n);
void dsa_emu_fault_batch_list(struct dsa_emu *e, unsigned member); /* next batch: list page of `member` missing */
void dsa_emu_set_delay(struct dsa_emu *e, unsigned delay_us);
unsigned dsa_emu_delay(struct dsa_emu *e);
void dsa_emu_stats(struct dsa_emu *e, struct dsa_emu_stats *out);
const struct dsa_emu_config *dsa_emu_config(struct dsa_emu *e);
void dsa_emu_after_fork(struct dsa_emu *e);
void dsa_emu_hang_next(struct dsa_emu *e, unsigned n);   /* the next n descriptors never complete */
unsigned dsa_emu_release_hung(struct dsa_emu *e);        /* complete them now; returns how many */
void dsa_emu_set_swerr(struct dsa_emu *e, int on);       /* the device logged a software error */
int dsa_emu_swerr(struct dsa_emu *e);

#endif
