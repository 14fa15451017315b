/* CPU-side pieces: feature detection, the three DSA instructions, CRC-32C,
 * and the descriptor builder.
 *
 * The module is compiled for baseline x86-64 so it loads on any machine;
 * each instruction lives in its own function compiled with a per-function
 * target attribute and is only called after CPUID said it exists.
 */
#include <string.h>

#include "dsa_hw.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#include <x86intrin.h>
#define DSA_X86 1
#endif

static struct dsa_cpu cpu_features;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;

static void detect(void)
{
#ifdef DSA_X86
    unsigned a, b, c, d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        cpu_features.waitpkg = (c >> 5) & 1;
        cpu_features.movdir64b = (c >> 28) & 1;
        cpu_features.enqcmd = (c >> 29) & 1;
    }
    if (__get_cpuid(1, &a, &b, &c, &d))
        cpu_features.sse42 = (c >> 20) & 1;
#endif
}

const struct dsa_cpu *dsa_cpu_features(void)
{
    pthread_once(&cpu_once, detect);
    return &cpu_features;
}

#ifdef DSA_X86
__attribute__((target("movdir64b"))) void dsa_movdir64b(void *portal, const void *desc)
{
    /* MOVDIR64B is weakly ordered: make the zeroed completion record and
     * any batch list visible before the device can read the descriptor. */
    _mm_sfence();
    _movdir64b(portal, desc);
}

__attribute__((target("enqcmd"))) int dsa_enqcmd(void *portal, const void *desc)
{
    _mm_sfence();
    return _enqcmd(portal, desc); /* ZF: the shared queue was full */
}

__attribute__((target("waitpkg"))) void dsa_umwait_until(volatile void *addr, uint64_t tsc_deadline)
{
    /* C0.2 (ctrl 0): the lighter sleep, good for waits of microseconds. */
    _umonitor((void *)addr);
    if (*(volatile uint8_t *)addr == 0)
        _umwait(0, tsc_deadline);
}
#else
void dsa_movdir64b(void *portal, const void *desc) { (void)portal, (void)desc; }
int dsa_enqcmd(void *portal, const void *desc) { (void)portal, (void)desc; return 1; }
void dsa_umwait_until(volatile void *addr, uint64_t tsc) { (void)addr, (void)tsc; }
#endif

/* CRC-32C, reflected polynomial 0x82F63B78: a table for any CPU, the
 * SSE4.2 instruction where present. Seed and result are complemented, as
 * the crc32c package and DSA's CRCGEN do. */
static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & -(c & 1));
        crc_table[i] = c;
    }
}

static uint32_t crc_soft(uint32_t crc, const uint8_t *p, size_t n)
{
    pthread_once(&crc_once, crc_init);
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#ifdef DSA_X86
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
    }
    while (n--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

/* The CRC-32C register shifted most significant bit first (polynomial
 * 0x1EDC6F41, no reflection, no inversion): the device's CRC with both
 * bypass flags set. */
static uint32_t msb_table[256];
static pthread_once_t msb_once = PTHREAD_ONCE_INIT;

static void msb_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i << 24;
        for (int k = 0; k < 8; k++)
            c = c & 0x80000000u ? c << 1 ^ 0x1EDC6F41u : c << 1;
        msb_table[i] = c;
    }
}

uint32_t dsa_crc32c_msb_first(uint32_t reg, const void *data, size_t n)
{
    pthread_once(&msb_once, msb_init);
    const uint8_t *p = data;
    while (n--)
        reg = reg << 8 ^ msb_table[(reg >> 24 ^ *p++) & 0xff];
    return reg;
}

uint32_t dsa_crc32c(uint32_t seed, const void *data, size_t n)
{
    uint32_t crc = ~seed;
#ifdef DSA_X86
    if (dsa_cpu_features()->sse42)
        return ~crc_hw(crc, data, n);
#endif
    return ~crc_soft(crc, data, n);
}

void dsa_desc_build(struct dsa_desc *d, const struct dsa_fields *f)
{
    memset(d, 0, sizeof *d);
    d->pasid_priv = (f->pasid & 0xfffffu) | (f->priv ? 0x80000000u : 0);
    d->flags_opcode = (f->flags & 0xffffffu) | ((uint32_t)f->opcode << 24);
    d->completion = f->completion;
    d->size = f->size;
    d->int_handle = f->int_handle;
    switch (f->opcode) {
    case DSA_OP_BATCH:
        d->src = f->desc_list;
        d->size = f->count;
        break;
    case DSA_OP_MEMMOVE:
        d->src = f->src;
        d->dst = f->dst;
        break;
    case DSA_OP_MEMFILL:
        d->src = f->pattern;
        d->dst = f->dst;
        break;
    case DSA_OP_COMPARE:
        d->src = f->src;
        d->dst = f->src2;
        dsa_desc_put(d, 40, &f->expected_res, 1);
        break;
    case DSA_OP_COMPARE_PATTERN:
        d->src = f->src;
        d->dst = f->pattern;
        dsa_desc_put(d, 40, &f->expected_res, 1);
        break;
    case DSA_OP_CREATE_DELTA:
        d->src = f->src;
        d->dst = f->src2;
        dsa_desc_put(d, 40, &f->delta_addr, 8);
        dsa_desc_put(d, 48, &f->max_delta, 4);
        break;
    case DSA_OP_APPLY_DELTA:
        d->src = f->delta_addr;
        d->dst = f->dst;
        dsa_desc_put(d, 40, &f->delta_size, 4);
        break;
    case DSA_OP_DUALCAST:
        d->src = f->src;
        d->dst = f->dst;
        dsa_desc_put(d, 40, &f->dst2, 8);
        break;
    case DSA_OP_CRCGEN:
        d->src = f->src;
        dsa_desc_put(d, 40, &f->crc_seed, 4);
        dsa_desc_put(d, 48, &f->seed_addr, 8);
        break;
    case DSA_OP_COPY_CRC:
        d->src = f->src;
        d->dst = f->dst;
        dsa_desc_put(d, 40, &f->crc_seed, 4);
        dsa_desc_put(d, 48, &f->seed_addr, 8);
        break;
    case DSA_OP_CACHE_FLUSH:
        d->dst = f->dst;
        break;
    default: /* NOOP, DRAIN and unknown opcodes carry no addresses */
        break;
    }
}
