/* A software DSA work queue: descriptors in through a portal, results out
 * through completion records, executed on real memory by a device thread.
 *
 * The emulator exists so that the very submission and completion code that
 * drives real hardware runs on machines without it. It models what that
 * code must cope with: the queue's size (a dedicated queue overflowing is
 * counted so tests can fail on it; a shared queue answers "retry"), GENCAP
 * and the queue's operation set (flags and opcodes they do not allow are
 * refused), every opcode's result and bytes_completed semantics, batches
 * (member failures, a false predicate included; fences abandoning the rest;
 * the result byte; a list read member by member), the CRC flags, page
 * faults on address ranges declared non-present (partial completion, or
 * waiting with BLOCK_ON_FAULT), the error statuses, descriptors that never
 * complete and a logged software error (SWERR), the kernel's write() checks
 * (dsa_emu_cdev_write), and a per-descriptor delay. tests/dsa/spec_model.py
 * is an independent model of the same, checked against this one.
 *
 * Deviations, on purpose: it executes in order on one engine (so DRAIN is
 * trivially satisfied, and FENCE only matters after a failure); a
 * misaligned completion record is still written (hardware reports that
 * through SWERR, which user space cannot read); apply-delta validates the
 * whole record before writing.
 *
 * To confirm on hardware: a fault on the completion-record page does not
 * stop the operation here, and its record arrives with status 0x1a and the
 * fields of what was done (bytes_completed all of it when it finished); how
 * DSA 2.0's event log and the kernel deliver that record is not in the
 * tables we have. The granularity of bytes_completed after a page fault
 * (here: exactly up to the first non-present byte). The CRC value in a
 * partial completion's record, used as the next seed (here: the CRC of the
 * bytes done). Compare-pattern's bytes_completed (here: the differing byte;
 * DML's software kernel gives its 8-byte granule, which the mover accepts).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dsa_hw.h"

#define PAGE 4096ull

struct range {
    uint64_t start, end;
    int sticky;
};

struct dsa_emu {
    struct dsa_emu_config cfg;
    pthread_mutex_t mu; /* ring, occupancy, stats, faults */
    pthread_cond_t cv;
    pthread_t thread;
    int thread_started, stop;
    struct dsa_desc *ring;
    unsigned ring_cap, head, count, occupancy;
    struct range *faults;
    size_t nfaults, faults_cap;
    unsigned fault_next_records;
    unsigned fault_batch_member;     /* 1 + the member whose list page the next batch finds missing; 0: none */
    unsigned hang_next;              /* the next this many descriptors never complete */
    struct dsa_desc *hung;           /* ... kept here until release_hung */
    unsigned nhung, hung_cap;
    int swerr;                       /* a logged software error: poll() reports it */
    unsigned delay_us;
    struct dsa_emu_stats st;
    pid_t pid;
};

/* ---- non-present pages ---------------------------------------------- */

static void add_range(struct dsa_emu *e, uint64_t start, uint64_t end, int sticky)
{
    if (e->nfaults == e->faults_cap) {
        size_t cap = e->faults_cap ? e->faults_cap * 2 : 8;
        struct range *r = realloc(e->faults, cap * sizeof *r);
        if (!r)
            return;
        e->faults = r;
        e->faults_cap = cap;
    }
    e->faults[e->nfaults++] = (struct range){start, end, sticky};
}

void dsa_emu_set_fault(struct dsa_emu *e, uint64_t addr, uint64_t len, int sticky)
{
    pthread_mutex_lock(&e->mu);
    add_range(e, addr & ~(PAGE - 1), (addr + len + PAGE - 1) & ~(PAGE - 1), sticky);
    pthread_mutex_unlock(&e->mu);
}

void dsa_emu_clear_faults(struct dsa_emu *e)
{
    pthread_mutex_lock(&e->mu);
    e->nfaults = 0;
    e->fault_next_records = 0;
    pthread_mutex_unlock(&e->mu);
}

/* The OS bringing one page in: drop it from every non-sticky range. */
static void touch_locked(struct dsa_emu *e, uint64_t addr)
{
    uint64_t p = addr & ~(PAGE - 1), q = p + PAGE;
    for (size_t i = 0; i < e->nfaults; i++) {
        struct range *r = &e->faults[i];
        if (r->sticky || q <= r->start || p >= r->end)
            continue;
        uint64_t end = r->end;
        if (p <= r->start && q >= end) { /* whole range goes */
            e->faults[i--] = e->faults[--e->nfaults];
            continue;
        }
        if (p <= r->start)
            r->start = q;
        else if (q >= end)
            r->end = p;
        else { /* split */
            r->end = p;
            add_range(e, q, end, 0);
        }
    }
}

void dsa_emu_touch(struct dsa_emu *e, uint64_t addr)
{
    pthread_mutex_lock(&e->mu);
    touch_locked(e, addr);
    pthread_mutex_unlock(&e->mu);
}

void dsa_emu_fault_batch_list(struct dsa_emu *e, unsigned member)
{
    pthread_mutex_lock(&e->mu);
    e->fault_batch_member = member + 1;
    pthread_mutex_unlock(&e->mu);
}

void dsa_emu_fault_next_records(struct dsa_emu *e, unsigned n)
{
    pthread_mutex_lock(&e->mu);
    e->fault_next_records = n;
    pthread_mutex_unlock(&e->mu);
}

/* Lowest offset in [addr, addr+len) that is non-present, or len. */
static uint64_t first_fault(struct dsa_emu *e, uint64_t addr, uint64_t len, int *sticky)
{
    uint64_t best = len;
    for (size_t i = 0; i < e->nfaults; i++) {
        struct range *r = &e->faults[i];
        if (r->end <= addr || r->start >= addr + len)
            continue;
        uint64_t off = r->start > addr ? r->start - addr : 0;
        if (off < best) {
            best = off;
            *sticky = r->sticky;
        }
    }
    return best;
}

/* Highest non-present offset in [addr, addr+len), or -1. */
static int64_t last_fault(struct dsa_emu *e, uint64_t addr, uint64_t len, int *sticky)
{
    int64_t best = -1;
    for (size_t i = 0; i < e->nfaults; i++) {
        struct range *r = &e->faults[i];
        if (r->end <= addr || r->start >= addr + len)
            continue;
        int64_t off = (int64_t)((r->end < addr + len ? r->end : addr + len) - addr) - 1;
        if (off > best) {
            best = off;
            *sticky = r->sticky;
        }
    }
    return best;
}

static int present(struct dsa_emu *e, uint64_t addr, uint64_t len)
{
    int sticky;
    pthread_mutex_lock(&e->mu);
    int ok = first_fault(e, addr, len, &sticky) == len;
    pthread_mutex_unlock(&e->mu);
    return ok;
}

/* ---- execution -------------------------------------------------------- */

struct stream {
    uint64_t addr;
    int write;
};

/* Where a fault stops a forward pass over `n` bytes of every stream. */
struct stop {
    uint64_t at;       /* bytes that can be done */
    uint64_t addr;     /* the faulting address, when at < n */
    int write, rejected;
};

static void blocked_wait(struct dsa_emu *e)
{
    e->st.blocked++;
    pthread_mutex_unlock(&e->mu);
    /* The page request goes to the OS; the engine waits for the answer. */
    struct timespec ts = {0, 20000};
    nanosleep(&ts, NULL);
    pthread_mutex_lock(&e->mu);
}

/* A scan found a fault at st->addr. Without block-on-fault the operation
 * stops there; with it, wait until the page is made present and return 1
 * so the caller scans again; a page that never becomes present (sticky)
 * is a rejected page request. */
static int wait_out_fault(struct dsa_emu *e, struct stop *st, int bof, int sticky)
{
    if (!bof)
        return 0;
    if (sticky) {
        st->rejected = 1;
        return 0;
    }
    blocked_wait(e);
    touch_locked(e, st->addr);
    return 1;
}

static struct stop forward_stop(struct dsa_emu *e, const struct stream *s, int ns, uint64_t n, int bof)
{
    struct stop st = {n, 0, 0, 0};
    pthread_mutex_lock(&e->mu);
    for (;;) {
        st.at = n;
        int sticky = 0, found = -1;
        for (int i = 0; i < ns; i++) { /* reads are listed first: they win ties */
            int sk = 0;
            uint64_t off = first_fault(e, s[i].addr, n, &sk);
            if (off < st.at) {
                st.at = off;
                found = i;
                sticky = sk;
            }
        }
        if (found < 0)
            break;
        st.addr = s[found].addr + st.at;
        st.write = s[found].write;
        if (!wait_out_fault(e, &st, bof, sticky))
            break;
    }
    pthread_mutex_unlock(&e->mu);
    return st;
}

/* Backward pass (overlapping memmove): returns the lowest offset from
 * which the top can be done; st.at is then n minus bytes done. */
static struct stop backward_stop(struct dsa_emu *e, const struct stream *s, int ns, uint64_t n, int bof)
{
    struct stop st = {0, 0, 0, 0};
    pthread_mutex_lock(&e->mu);
    for (;;) {
        int64_t hi = -1;
        int sticky = 0, found = -1;
        for (int i = 0; i < ns; i++) {
            int sk = 0;
            int64_t off = last_fault(e, s[i].addr, n, &sk);
            if (off > hi) {
                hi = off;
                found = i;
                sticky = sk;
            }
        }
        st.at = (uint64_t)(hi + 1);
        if (found < 0)
            break;
        st.addr = s[found].addr + (uint64_t)hi;
        st.write = s[found].write;
        if (!wait_out_fault(e, &st, bof, sticky))
            break;
    }
    pthread_mutex_unlock(&e->mu);
    return st;
}

static void report_fault(struct dsa_emu *e, struct dsa_rec *r, const struct stop *st, uint64_t done)
{
    r->status = st->rejected ? DSA_ST_PAGE_REQ_REJECTED : (DSA_ST_PAGE_FAULT | (st->write ? DSA_ST_WRITE_FAULT : 0));
    r->fault_info = st->write ? 1 : 0;
    r->bytes_completed = (uint32_t)done;
    r->fault_addr = st->addr;
    pthread_mutex_lock(&e->mu);
    e->st.faults++;
    pthread_mutex_unlock(&e->mu);
}

/* Bytes a data operation got through (the stats' "bytes"): lets tests see
 * that resumed work is not done twice. */
static void account(struct dsa_emu *e, uint64_t n)
{
    pthread_mutex_lock(&e->mu);
    e->st.bytes += n;
    pthread_mutex_unlock(&e->mu);
}

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

static uint64_t first_diff(const uint8_t *a, const uint8_t *b, uint64_t n)
{
    uint64_t i = 0;
    while (i < n) {
        uint64_t chunk = n - i < 4096 ? n - i : 4096;
        if (memcmp(a + i, b + i, chunk) != 0)
            break;
        i += chunk;
    }
    for (; i < n; i++)
        if (a[i] != b[i])
            return i;
    return n;
}

static uint64_t pattern_diff(const uint8_t *a, uint64_t pattern, uint64_t n)
{
    uint8_t pat[4096];
    for (size_t i = 0; i < sizeof pat; i += 8)
        memcpy(pat + i, &pattern, 8);
    for (uint64_t i = 0; i < n; i += sizeof pat) {
        uint64_t chunk = n - i < sizeof pat ? n - i : sizeof pat;
        uint64_t k = first_diff(a + i, pat, chunk);
        if (k < chunk)
            return i + k;
    }
    return n;
}

static void fill(uint8_t *d, uint64_t pattern, uint64_t n)
{
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8)
        memcpy(d + i, &pattern, 8);
    if (i < n)
        memcpy(d + i, &pattern, n - i);
}

static uint32_t reverse32(uint32_t v)
{
    v = (v & 0x55555555u) << 1 | (v >> 1 & 0x55555555u);
    v = (v & 0x33333333u) << 2 | (v >> 2 & 0x33333333u);
    v = (v & 0x0f0f0f0fu) << 4 | (v >> 4 & 0x0f0f0f0fu);
    v = (v & 0x00ff00ffu) << 8 | (v >> 8 & 0x00ff00ffu);
    return v << 16 | v >> 16;
}

/* CRC-32C as the device defines it (DML's software kernels spell it out):
 * a register shifted most significant bit first through the polynomial
 * 0x1EDC6F41. By default the seed is inverted and bit-reversed into the
 * register, each data byte is bit-reversed (data reflection), and the
 * result is bit-reversed and inverted: the common reflected CRC-32C, the
 * crc32c package's convention. "Bypass CRC inversion and reflection" takes
 * the seed as the register and returns the register as it is; "bypass data
 * reflection" feeds the bytes as they are. */
static uint32_t crc_for(const struct dsa_desc *d, uint32_t seed, const void *p, uint64_t n)
{
    uint32_t flags = dsa_desc_flags(d);
    int raw = (flags & DSA_FLAG_CRC_BYPASS_INV) != 0, bytes_as_is = (flags & DSA_FLAG_CRC_BYPASS_DATA_REFLECT) != 0;
    uint32_t reg = raw ? seed : reverse32(~seed);
    if (bytes_as_is)
        reg = dsa_crc32c_msb_first(reg, p, n);
    else /* reversed bytes, MSB first == bytes LSB first through the reflected register */
        reg = reverse32(~dsa_crc32c(~reverse32(reg), p, n));
    return raw ? reg : ~reverse32(reg);
}

static int size_ok(struct dsa_emu *e, uint32_t size) { return size > 0 && size <= e->cfg.max_transfer; }

static void check_result(const struct dsa_desc *d, struct dsa_rec *r)
{
    uint8_t expected = *((const uint8_t *)d + 40);
    if ((dsa_desc_flags(d) & DSA_FLAG_CHECK_RESULT) && r->status == DSA_ST_SUCCESS && r->result != expected)
        r->status = DSA_ST_SUCCESS_PRED;
}

static void exec_delta_create(struct dsa_emu *e, const struct dsa_desc *d, struct dsa_rec *r, int bof)
{
    uint64_t a = d->src, b = d->dst, rec = dsa_desc_u64(d, 40);
    uint32_t n = d->size, cap = dsa_desc_u32(d, 48);
    if (n == 0 || n % DSA_DELTA_GRANULE || n > DSA_DELTA_MAX_XFER || n > e->cfg.max_transfer) {
        r->status = DSA_ST_XFER_ERANGE;
        return;
    }
    if (cap == 0 || cap % DSA_DELTA_ENTRY) {
        r->status = DSA_ST_DR_ERANGE;
        return;
    }
    if (overlaps(rec, cap, a, n) || overlaps(rec, cap, b, n)) {
        r->status = DSA_ST_OVERLAP;
        return;
    }
    /* Streams of different lengths: any fault means nothing was done, and
     * software redoes the whole descriptor. */
    struct stream s[] = {{a, 0}, {b, 0}};
    struct stop st = forward_stop(e, s, 2, n, bof);
    int faulted = st.at < n || st.rejected;
    if (!faulted) { /* then the record it writes */
        struct stream w = {rec, 1};
        st = forward_stop(e, &w, 1, cap, bof);
        faulted = st.at < cap || st.rejected;
    }
    if (faulted) {
        report_fault(e, r, &st, 0);
        return;
    }
    const uint8_t *pa = (const uint8_t *)a, *pb = (const uint8_t *)b;
    uint8_t *out = (uint8_t *)rec;
    uint32_t used = 0;
    r->status = DSA_ST_SUCCESS;
    for (uint32_t off = 0; off < n; off += DSA_DELTA_GRANULE) {
        if (memcmp(pa + off, pb + off, DSA_DELTA_GRANULE) == 0)
            continue;
        if (used + DSA_DELTA_ENTRY > cap) { /* record full: stop here */
            r->result = 2;
            r->bytes_completed = off;
            r->op_specific = used;
            return;
        }
        uint16_t g = off / DSA_DELTA_GRANULE;
        memcpy(out + used, &g, 2);
        memcpy(out + used + 2, pb + off, DSA_DELTA_GRANULE);
        used += DSA_DELTA_ENTRY;
    }
    r->result = used ? 1 : 0;
    r->bytes_completed = n;
    r->op_specific = used;
}

static void exec_delta_apply(struct dsa_emu *e, const struct dsa_desc *d, struct dsa_rec *r, int bof)
{
    uint64_t rec = d->src, dst = d->dst;
    uint32_t n = d->size, rsize = dsa_desc_u32(d, 40);
    if (n == 0 || n % DSA_DELTA_GRANULE || n > DSA_DELTA_MAX_XFER || n > e->cfg.max_transfer) {
        r->status = DSA_ST_XFER_ERANGE;
        return;
    }
    if (rsize == 0 || rsize % DSA_DELTA_ENTRY || rsize > (n / DSA_DELTA_GRANULE) * DSA_DELTA_ENTRY) {
        r->status = DSA_ST_DR_ERANGE;
        return;
    }
    if (overlaps(rec, rsize, dst, n)) {
        r->status = DSA_ST_OVERLAP;
        return;
    }
    struct stream s[] = {{rec, 0}};
    struct stop st = forward_stop(e, s, 1, rsize, bof);
    int faulted = st.at < rsize || st.rejected;
    if (!faulted) { /* then the destination it writes */
        struct stream w = {dst, 1};
        st = forward_stop(e, &w, 1, n, bof);
        faulted = st.at < n || st.rejected;
    }
    if (faulted) {
        report_fault(e, r, &st, 0);
        return;
    }
    const uint8_t *in = (const uint8_t *)rec;
    int prev = -1;
    for (uint32_t i = 0; i < rsize; i += DSA_DELTA_ENTRY) {
        uint16_t g;
        memcpy(&g, in + i, 2);
        if ((int)g <= prev) {
            r->status = DSA_ST_DR_OFFSET_NOINC;
            r->bytes_completed = i;
            return;
        }
        if ((uint64_t)g * DSA_DELTA_GRANULE + DSA_DELTA_GRANULE > n) {
            r->status = DSA_ST_DR_OFFSET_ERANGE;
            r->bytes_completed = i;
            return;
        }
        prev = g;
    }
    for (uint32_t i = 0; i < rsize; i += DSA_DELTA_ENTRY) {
        uint16_t g;
        memcpy(&g, in + i, 2);
        memcpy((uint8_t *)dst + (uint64_t)g * DSA_DELTA_GRANULE, in + i + 2, DSA_DELTA_GRANULE);
    }
    r->status = DSA_ST_SUCCESS;
    r->bytes_completed = n;
}

static void exec_one(struct dsa_emu *e, const struct dsa_desc *d, struct dsa_rec *r, int in_batch);

static void exec_batch(struct dsa_emu *e, const struct dsa_desc *d, struct dsa_rec *r, int bof)
{
    uint64_t list = d->src;
    uint32_t count = d->size;
    if (list & 63) {
        r->status = DSA_ST_DESCLIST_ALIGN;
        return;
    }
    if (count < 2 || count > e->cfg.max_batch) {
        r->status = DSA_ST_DESC_CNT_ERANGE;
        return;
    }
    pthread_mutex_lock(&e->mu);
    e->st.batches++;
    if (e->fault_batch_member) { /* test hook: the page of member k (and what follows) is not present */
        uint64_t at = list + (uint64_t)(e->fault_batch_member - 1) * 64, end = list + (uint64_t)count * 64;
        if (at < end)
            add_range(e, at & ~(PAGE - 1), (end + PAGE - 1) & ~(PAGE - 1), 0);
        e->fault_batch_member = 0;
    }
    pthread_mutex_unlock(&e->mu);
    /* The list is read as it is worked through: the members before a
     * non-present part of it run; the batch then completes with status 6
     * and "descriptors completed" = how many ran (software resubmits the
     * rest from there, as accel-config's dsa_reprep_batch does).
     *
     * A member "fails" when its status is anything but Success, a false
     * predicate (status 2, CHECK_RESULT) included: that is what makes
     * compare-then-fence-then-copy conditional. A member with FENCE after a
     * failed one is abandoned with everything after it (not run, no
     * record); the batch then reports status 5 and the fenced member's
     * index as descriptors completed. The record's result byte is 1 when a
     * member failed, else 0. */
    int failed = 0;
    const struct dsa_desc *m = (const struct dsa_desc *)list;
    for (uint32_t i = 0; i < count; i++) {
        struct stream s = {list + (uint64_t)i * 64, 0};
        struct stop st = forward_stop(e, &s, 1, 64, bof);
        if (st.at < 64 || st.rejected) {
            r->status = DSA_ST_BATCH_PAGE_FAULT;
            r->fault_addr = st.addr;
            r->bytes_completed = i;
            r->result = failed ? 1 : 0;
            return;
        }
        if ((dsa_desc_flags(&m[i]) & DSA_FLAG_FENCE) && failed) {
            r->status = DSA_ST_BATCH_FAIL;
            r->result = 1;
            r->bytes_completed = i;
            return;
        }
        struct dsa_rec mr;
        exec_one(e, &m[i], &mr, 1);
        pthread_mutex_lock(&e->mu);
        e->st.members++;
        pthread_mutex_unlock(&e->mu);
        if (mr.status != DSA_ST_SUCCESS)
            failed++;
    }
    r->status = failed ? DSA_ST_BATCH_FAIL : DSA_ST_SUCCESS;
    r->result = failed ? 1 : 0;
    r->bytes_completed = count;
}

/* Execute one descriptor into *r (no record written yet). */
static void exec_body(struct dsa_emu *e, const struct dsa_desc *d, struct dsa_rec *r, int in_batch)
{
    unsigned op = dsa_desc_opcode(d);
    uint32_t flags = dsa_desc_flags(d);
    int known = op <= DSA_OP_DUALCAST || op == DSA_OP_CRCGEN || op == DSA_OP_COPY_CRC || op == DSA_OP_CACHE_FLUSH;
    int enabled = (e->cfg.op_cap[op / 8] & e->cfg.op_config[op / 8]) & (1u << (op % 8));
    if (!known || !enabled || (in_batch && op == DSA_OP_BATCH)) {
        r->status = DSA_ST_BAD_OPCODE;
        return;
    }
    int crc_op = op == DSA_OP_CRCGEN || op == DSA_OP_COPY_CRC;
    uint32_t allowed = DSA_FLAGS_GENERIC |
                       (crc_op ? DSA_FLAG_CRC_SEED_ADDR | DSA_FLAG_CRC_BYPASS_INV | DSA_FLAG_CRC_BYPASS_DATA_REFLECT : 0);
    uint32_t bad = flags & ~allowed;
    uint64_t gen = e->cfg.gen_cap;
    /* Block on fault needs the capability and the queue's configuration. */
    if ((flags & DSA_FLAG_BOF) && !((gen & DSA_GENCAP_BLOCK_ON_FAULT) && e->cfg.block_on_fault))
        bad |= DSA_FLAG_BOF;
    /* Cache control needs GENCAP's cache-control support (for cache flush: its own bit). */
    if ((flags & DSA_FLAG_CACHE_CONTROL) &&
        !(gen & (op == DSA_OP_CACHE_FLUSH ? DSA_GENCAP_CACHE_CONTROL_CACHE : DSA_GENCAP_CACHE_CONTROL_MEM)))
        bad |= DSA_FLAG_CACHE_CONTROL;
    if ((flags & DSA_FLAG_RCR) && !(flags & DSA_FLAG_CRAV))
        bad |= DSA_FLAG_RCR;
    if (bad) {
        r->status = DSA_ST_INVALID_FLAGS;
        r->op_specific = bad;
        return;
    }
    if (d->reserved) {
        r->status = DSA_ST_NONZERO_RESERVED;
        return;
    }
    int bof = (flags & DSA_FLAG_BOF) != 0;
    uint32_t n = d->size;
    r->status = DSA_ST_SUCCESS;
    switch (op) {
    case DSA_OP_NOOP:
    case DSA_OP_DRAIN: /* one in-order engine: everything before is done */
        return;
    case DSA_OP_BATCH:
        exec_batch(e, d, r, bof);
        return;
    case DSA_OP_CREATE_DELTA:
        exec_delta_create(e, d, r, bof);
        return;
    case DSA_OP_APPLY_DELTA:
        exec_delta_apply(e, d, r, bof);
        return;
    default:
        break;
    }
    if (!size_ok(e, n)) {
        r->status = DSA_ST_XFER_ERANGE;
        return;
    }
    struct stream s[3];
    int ns = 0;
    struct stop st;
    switch (op) {
    case DSA_OP_MEMMOVE: {
        uint64_t src = d->src, dst = d->dst;
        s[ns++] = (struct stream){src, 0};
        s[ns++] = (struct stream){dst, 1};
        if (overlaps(src, n, dst, n) && !(e->cfg.gen_cap & DSA_GENCAP_OVERLAP_COPY)) {
            r->status = DSA_ST_OVERLAP; /* a device without overlapping-copy support */
            return;
        }
        if (dst > src && dst < src + n) { /* overlap: copy runs backwards */
            r->result = 1;
            st = backward_stop(e, s, ns, n, bof);
            account(e, n - st.at);
            if (st.at < n)
                memmove((void *)(dst + st.at), (const void *)(src + st.at), n - st.at);
            if (st.at > 0 || st.rejected)
                report_fault(e, r, &st, n - st.at);
            return;
        }
        st = forward_stop(e, s, ns, n, bof);
        memmove((void *)dst, (const void *)src, st.at);
        break;
    }
    case DSA_OP_MEMFILL:
        s[ns++] = (struct stream){d->dst, 1};
        st = forward_stop(e, s, ns, n, bof);
        fill((uint8_t *)d->dst, d->src, st.at);
        break;
    case DSA_OP_COMPARE:
    case DSA_OP_COMPARE_PATTERN: {
        s[ns++] = (struct stream){d->src, 0};
        if (op == DSA_OP_COMPARE)
            s[ns++] = (struct stream){d->dst, 0};
        st = forward_stop(e, s, ns, n, bof);
        uint64_t k = op == DSA_OP_COMPARE ? first_diff((const uint8_t *)d->src, (const uint8_t *)d->dst, st.at)
                                          : pattern_diff((const uint8_t *)d->src, d->dst, st.at);
        if (k < st.at) { /* a difference before any fault: done */
            account(e, k);
            r->result = 1;
            r->bytes_completed = (uint32_t)k;
            check_result(d, r);
            return;
        }
        if (st.at == n)
            check_result(d, r);
        break;
    }
    case DSA_OP_CRCGEN:
    case DSA_OP_COPY_CRC: {
        uint32_t seed = dsa_desc_u32(d, 40);
        if (op == DSA_OP_COPY_CRC && overlaps(d->src, n, d->dst, n)) {
            r->status = DSA_ST_OVERLAP;
            return;
        }
        if (flags & DSA_FLAG_CRC_SEED_ADDR) {
            uint64_t sa = dsa_desc_u64(d, 48);
            struct stream ss = {sa, 0};
            st = forward_stop(e, &ss, 1, 4, bof);
            if (st.at < 4 || st.rejected) {
                report_fault(e, r, &st, 0);
                return;
            }
            memcpy(&seed, (const void *)sa, 4);
        }
        s[ns++] = (struct stream){d->src, 0};
        if (op == DSA_OP_COPY_CRC)
            s[ns++] = (struct stream){d->dst, 1};
        st = forward_stop(e, s, ns, n, bof);
        if (op == DSA_OP_COPY_CRC)
            memcpy((void *)d->dst, (const void *)d->src, st.at);
        r->op_specific = crc_for(d, seed, (const void *)d->src, st.at);
        break;
    }
    case DSA_OP_DUALCAST: {
        uint64_t dst2 = dsa_desc_u64(d, 40);
        if ((d->dst & 0xfff) != (dst2 & 0xfff)) {
            r->status = DSA_ST_DCAST_ERR;
            return;
        }
        if (overlaps(d->src, n, d->dst, n) || overlaps(d->src, n, dst2, n) || overlaps(d->dst, n, dst2, n)) {
            r->status = DSA_ST_OVERLAP;
            return;
        }
        s[ns++] = (struct stream){d->src, 0};
        s[ns++] = (struct stream){d->dst, 1};
        s[ns++] = (struct stream){dst2, 1};
        st = forward_stop(e, s, ns, n, bof);
        memcpy((void *)d->dst, (const void *)d->src, st.at);
        memcpy((void *)dst2, (const void *)d->src, st.at);
        break;
    }
    case DSA_OP_CACHE_FLUSH:
        s[ns++] = (struct stream){d->dst, 0};
        st = forward_stop(e, s, ns, n, bof);
#if defined(__x86_64__)
        for (uint64_t a = d->dst & ~63ull; a < d->dst + st.at; a += 64)
            __builtin_ia32_clflush((const void *)a);
#endif
        break;
    default:
        r->status = DSA_ST_BAD_OPCODE;
        return;
    }
    account(e, st.at);
    if (st.at < n || st.rejected)
        report_fault(e, r, &st, st.at);
}

/* Write the record: every field, then the status byte, released last. */
static void deliver(const struct dsa_desc *d, const struct dsa_rec *r)
{
    struct dsa_rec *out = (struct dsa_rec *)d->completion;
    memcpy((uint8_t *)out + 1, (const uint8_t *)r + 1, sizeof *r - 1);
    __atomic_store_n(&out->status, r->status, __ATOMIC_RELEASE);
}

static void exec_one(struct dsa_emu *e, const struct dsa_desc *d, struct dsa_rec *r, int in_batch)
{
    uint32_t flags = dsa_desc_flags(d);
    memset(r, 0, sizeof *r);
    if (flags & DSA_FLAG_CRAV) {
        if (d->completion & 31) {
            r->status = DSA_ST_CR_ALIGN;
            r->fault_addr = d->completion;
            deliver(d, r);
            return;
        }
        pthread_mutex_lock(&e->mu);
        if (e->fault_next_records) {
            e->fault_next_records--;
            add_range(e, d->completion & ~(PAGE - 1), (d->completion & ~(PAGE - 1)) + PAGE, 0);
        }
        pthread_mutex_unlock(&e->mu);
        if (!present(e, d->completion, sizeof *r) && (flags & DSA_FLAG_BOF) && (e->cfg.gen_cap & DSA_GENCAP_BLOCK_ON_FAULT) &&
            e->cfg.block_on_fault) {
            /* Block on fault: the record's page is requested like any other and the device waits. */
            struct stream w = {d->completion, 1};
            forward_stop(e, &w, 1, sizeof *r, 1);
        }
        if (!present(e, d->completion, sizeof *r)) {
            /* The record's page is not present. The operation still runs
             * (what it did stays done); its record reaches the faulted
             * address later (on DSA 2.0 the kernel copies it there from the
             * event log) with status 0x1a, fault_addr the record's address,
             * and the fields of what was done: bytes_completed (all of it
             * when the operation finished), result, op_specific. */
            exec_body(e, d, r, in_batch);
            unsigned op = dsa_desc_opcode(d);
            int ok = r->status == DSA_ST_SUCCESS || r->status == DSA_ST_SUCCESS_PRED;
            int partial = (r->status & 0x7f) == DSA_ST_PAGE_FAULT || r->status == DSA_ST_PAGE_REQ_REJECTED;
            int found = (op == DSA_OP_COMPARE || op == DSA_OP_COMPARE_PATTERN) && r->result == 1;
            if (ok && !found && op != DSA_OP_BATCH && op != DSA_OP_NOOP && op != DSA_OP_DRAIN &&
                op != DSA_OP_CREATE_DELTA)
                r->bytes_completed = d->size;
            if (ok || partial) {
                r->status = DSA_ST_CR_FAULT;
                r->fault_addr = d->completion;
                r->fault_info = 1;
            }
            pthread_mutex_lock(&e->mu);
            e->st.cr_faults++;
            pthread_mutex_unlock(&e->mu);
            deliver(d, r);
            return;
        }
    }
    exec_body(e, d, r, in_batch);
    if ((flags & DSA_FLAG_CRAV) && ((flags & DSA_FLAG_RCR) || r->status != DSA_ST_SUCCESS))
        deliver(d, r);
}

void dsa_emu_execute(struct dsa_emu *e, const struct dsa_desc *d)
{
    struct dsa_rec r;
    pthread_mutex_lock(&e->mu);
    e->st.descriptors++;
    pthread_mutex_unlock(&e->mu);
    exec_one(e, d, &r, 0);
}

/* ---- the device thread and the portal -------------------------------- */

static void *device_main(void *arg)
{
    struct dsa_emu *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->stop && e->count == 0)
            pthread_cond_wait(&e->cv, &e->mu);
        if (e->stop)
            break;
        struct dsa_desc d = e->ring[e->head];
        e->head = (e->head + 1) % e->ring_cap;
        e->count--;
        unsigned delay = e->delay_us;
        if (e->hang_next) { /* accepted, never completed: its slot stays taken */
            e->hang_next--;
            e->st.hung++;
            if (e->nhung == e->hung_cap) {
                unsigned cap = e->hung_cap ? e->hung_cap * 2 : 8;
                struct dsa_desc *h = aligned_alloc(64, cap * sizeof *h);
                if (h) {
                    if (e->nhung)
                        memcpy(h, e->hung, e->nhung * sizeof *h);
                    free(e->hung);
                    e->hung = h;
                    e->hung_cap = cap;
                }
            }
            if (e->nhung < e->hung_cap)
                e->hung[e->nhung++] = d;
            continue;
        }
        pthread_mutex_unlock(&e->mu);
        if (delay) {
            struct timespec ts = {delay / 1000000, (long)(delay % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
        dsa_emu_execute(e, &d);
        pthread_mutex_lock(&e->mu);
        e->occupancy--;
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static int start(struct dsa_emu *e)
{
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->stop = 0;
    e->head = e->count = e->occupancy = 0;
    e->pid = getpid();
    e->thread_started = pthread_create(&e->thread, NULL, device_main, e) == 0;
    return e->thread_started ? 0 : -1;
}

struct dsa_emu *dsa_emu_create(const struct dsa_emu_config *cfg)
{
    struct dsa_emu *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->cfg = *cfg;
    e->ring_cap = cfg->size * 2 + 8;
    e->ring = aligned_alloc(64, e->ring_cap * sizeof *e->ring);
    if (!e->ring || start(e) < 0) {
        free(e->ring);
        free(e);
        return NULL;
    }
    return e;
}

void dsa_emu_destroy(struct dsa_emu *e)
{
    if (!e)
        return;
    if (e->thread_started && e->pid == getpid()) {
        pthread_mutex_lock(&e->mu);
        e->stop = 1;
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
    }
    free(e->ring);
    free(e->faults);
    free(e->hung);
    free(e);
}

/* The child of a fork gets a fresh device: the parent's thread and the
 * descriptors it had queued belong to the parent. */
void dsa_emu_after_fork(struct dsa_emu *e)
{
    if (e->pid != getpid())
        start(e);
}

int dsa_emu_portal_write(struct dsa_emu *e, const struct dsa_desc *d)
{
    dsa_emu_after_fork(e);
    pthread_mutex_lock(&e->mu);
    if (e->occupancy >= e->cfg.size) {
        if (e->cfg.shared) { /* ENQCMD's ZF=1 */
            e->st.retries++;
            pthread_mutex_unlock(&e->mu);
            if (e->cfg.refuse_delay_us) {
                struct timespec ts = {e->cfg.refuse_delay_us / 1000000, (long)(e->cfg.refuse_delay_us % 1000000) * 1000};
                nanosleep(&ts, NULL);
            }
            return 1;
        }
        /* Hardware would drop it silently; counting it lets tests fail. */
        e->st.overflows++;
    }
    if (e->count == e->ring_cap) { /* only after overflows: grow, never lose */
        unsigned cap = e->ring_cap * 2;
        struct dsa_desc *ring = aligned_alloc(64, cap * sizeof *ring);
        if (!ring) {
            pthread_mutex_unlock(&e->mu);
            return 1;
        }
        for (unsigned i = 0; i < e->count; i++)
            ring[i] = e->ring[(e->head + i) % e->ring_cap];
        free(e->ring);
        e->ring = ring;
        e->ring_cap = cap;
        e->head = 0;
    }
    e->ring[(e->head + e->count) % e->ring_cap] = *d;
    e->count++;
    e->occupancy++;
    if (e->occupancy > e->st.max_occupancy)
        e->st.max_occupancy = e->occupancy;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* What the kernel's write() on a WQ character device does with one
 * descriptor (idxd_submit_user_descriptor in drivers/dma/idxd/cdev.c,
 * kernel 6.10): refuse a BATCH when user submission is not safe on the part
 * (INTEL-SA-01084) and a completion record that is not 32-byte aligned
 * (EINVAL); on a dedicated queue MOVDIR64B it (posted: no feedback, so an
 * overflow is only counted); on a shared queue ENQCMDS it, retrying
 * enqcmds_retries times, then EAGAIN. Returns 0 or that errno. */
int dsa_emu_cdev_write(struct dsa_emu *e, const struct dsa_desc *d)
{
    dsa_emu_after_fork(e);
    int err = 0;
    if (dsa_desc_opcode(d) == DSA_OP_BATCH && !e->cfg.user_submission_safe)
        err = EINVAL;
    else if (d->completion & 31)
        err = EINVAL;
    else if (!e->cfg.shared)
        dsa_emu_portal_write(e, d);
    else {
        err = EAGAIN;
        for (unsigned tries = 0; tries <= e->cfg.enqcmds_retries; tries++)
            if (dsa_emu_portal_write(e, d) == 0) {
                err = 0;
                break;
            }
    }
    pthread_mutex_lock(&e->mu);
    e->st.writes++;
    e->st.write_errors += err != 0;
    pthread_mutex_unlock(&e->mu);
    return err;
}

void dsa_emu_hang_next(struct dsa_emu *e, unsigned n)
{
    pthread_mutex_lock(&e->mu);
    e->hang_next = n;
    pthread_mutex_unlock(&e->mu);
}

unsigned dsa_emu_release_hung(struct dsa_emu *e)
{
    pthread_mutex_lock(&e->mu);
    struct dsa_desc *hung = e->hung;
    unsigned n = e->nhung;
    e->hung = NULL;
    e->nhung = e->hung_cap = 0;
    pthread_mutex_unlock(&e->mu);
    for (unsigned i = 0; i < n; i++) {
        dsa_emu_execute(e, &hung[i]);
        pthread_mutex_lock(&e->mu);
        e->occupancy--;
        pthread_mutex_unlock(&e->mu);
    }
    free(hung);
    return n;
}

void dsa_emu_set_swerr(struct dsa_emu *e, int on)
{
    __atomic_store_n(&e->swerr, on, __ATOMIC_RELEASE);
}

int dsa_emu_swerr(struct dsa_emu *e) { return __atomic_load_n(&e->swerr, __ATOMIC_ACQUIRE); }

void dsa_emu_set_delay(struct dsa_emu *e, unsigned delay_us)
{
    pthread_mutex_lock(&e->mu);
    e->delay_us = delay_us;
    pthread_mutex_unlock(&e->mu);
}

unsigned dsa_emu_delay(struct dsa_emu *e) { return e->delay_us; }

void dsa_emu_stats(struct dsa_emu *e, struct dsa_emu_stats *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->st;
    out->occupancy = e->occupancy;
    pthread_mutex_unlock(&e->mu);
}

const struct dsa_emu_config *dsa_emu_config(struct dsa_emu *e) { return &e->cfg; }
