/* dmuserd.snapshot._puffin_native: the bit loops of PUFFDIFF (snapshot/_puffin.py) in C.
 *
 *   puff_deflate(data, start_bit, end_bit, limit) -> bytes
 *       the puffed form of the deflate blocks in bits [start_bit, end_bit) of
 *       data, at most limit bytes; blocks are read while 8 bits are left.
 *   locate(data, start_bit) -> ([(offset, length), ...], end_bit)
 *       the compressed blocks of the raw deflate stream at start_bit, up to
 *       its final block (stored blocks left out), and the bit after it.
 *   huff_deflate(puff, out, start_bit, bit_length) -> None
 *       re-encodes one puff, ORing its bits into the bytearray out from
 *       start_bit; never past start_bit + bit_length.
 *
 * Malformed input raises ValueError with what and where; _puffin.py names
 * the deflate. The semantics, including puffin's rule near the end of an
 * extent, are those of the pure-Python engine in _puffin.py, which is the
 * reference: see its docstrings. The loops run without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RUN ((1 << 16) + 127) /* longest literal run one puff header can say */
#define MAX_METADATA (1 + 3 + 286 + 30 + 19)
#define EOB 256

static const uint8_t PERM[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
static const uint16_t LEN_BASE[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                      31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t LEN_EXTRA[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                      2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint16_t DIST_BASE[30] = {1,    2,    3,    4,    5,    7,    9,    13,    17,    25,
                                       33,   49,   65,   97,   129,  193,  257,  385,   513,   769,
                                       1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const uint8_t DIST_EXTRA[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6,
                                       6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

/* length 3..258 -> symbol - 257 (258 is 285, as puffin encodes it); distance 1..32768 -> symbol */
static uint8_t len_sym[259];
static uint8_t dist_sym[32769];

typedef struct {
    char msg[256];
} err_t;

#define FAIL(e, ...) (snprintf((e)->msg, sizeof((e)->msg), __VA_ARGS__), -1)

/* ------------------------------------------------------------------ Huffman codes */

/* Bit-reversed canonical codes of lens[0..n); -1 if over-subscribed (incomplete is fine). */
static int canonical(const uint8_t *lens, int n, uint16_t *codes, int *max_bits) {
    int count[16] = {0}, next[16] = {0};
    for (int i = 0; i < n; i++) count[lens[i]]++;
    int left = 1;
    for (int b = 1; b < 16; b++) {
        left = (left << 1) - count[b];
        if (left < 0) return -1;
    }
    count[0] = 0;
    int code = 0, top = 0;
    for (int b = 1; b < 16; b++) {
        code = (code + count[b - 1]) << 1;
        next[b] = code;
        if (count[b]) top = b;
    }
    for (int i = 0; i < n; i++) {
        int l = lens[i];
        if (!l) {
            codes[i] = 0;
            continue;
        }
        unsigned c = next[l]++, r = 0;
        for (int k = 0; k < l; k++, c >>= 1) r = (r << 1) | (c & 1);
        codes[i] = (uint16_t)r;
    }
    *max_bits = top;
    return 0;
}

/* A decode table: entry = length << 9 | symbol, 0 = no code. */
typedef struct {
    uint16_t *table;
    int bits;
    const uint8_t *lens;
    int n;
} decoder_t;

static int build_decoder(decoder_t *d, const uint8_t *lens, int n) {
    uint16_t codes[288];
    if (canonical(lens, n, codes, &d->bits) < 0) return -1;
    size_t size = (size_t)1 << d->bits;
    memset(d->table, 0, size * sizeof(uint16_t));
    for (int s = 0; s < n; s++) {
        int l = lens[s];
        if (!l) continue;
        uint16_t entry = (uint16_t)(l << 9 | s);
        for (size_t i = codes[s]; i < size; i += (size_t)1 << l) d->table[i] = entry;
    }
    d->lens = lens;
    d->n = n;
    return 0;
}

typedef struct {
    uint16_t codes[288];
    uint8_t lens[288];
    int n;
} encoder_t;

static int build_encoder(encoder_t *e, const uint8_t *lens, int n) {
    int bits;
    memcpy(e->lens, lens, n);
    e->n = n;
    return canonical(lens, n, e->codes, &bits);
}

static uint8_t fixed_lit_lens[288], fixed_dist_lens[30];
static uint16_t fixed_lit_table[1 << 9], fixed_dist_table[1 << 5];
static decoder_t fixed_lit, fixed_dist;
static encoder_t fixed_lit_enc, fixed_dist_enc;

static void init_tables(void) {
    for (int i = 0; i < 288; i++) fixed_lit_lens[i] = i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8;
    for (int i = 0; i < 30; i++) fixed_dist_lens[i] = 5;
    fixed_lit.table = fixed_lit_table;
    fixed_dist.table = fixed_dist_table;
    build_decoder(&fixed_lit, fixed_lit_lens, 288);
    build_decoder(&fixed_dist, fixed_dist_lens, 30);
    build_encoder(&fixed_lit_enc, fixed_lit_lens, 288);
    build_encoder(&fixed_dist_enc, fixed_dist_lens, 30);
    for (int k = 0; k < 29; k++)
        for (int l = LEN_BASE[k]; l < (k < 28 ? LEN_BASE[k + 1] : 259); l++) len_sym[l] = (uint8_t)k;
    len_sym[258] = 28;
    for (int k = 0; k < 30; k++)
        for (int d = DIST_BASE[k]; d < (k < 29 ? DIST_BASE[k + 1] : 32769); d++) dist_sym[d] = (uint8_t)k;
}

/* ------------------------------------------------------------------ bit reader */

typedef struct {
    const uint8_t *p;
    size_t n, in; /* bytes, bytes loaded */
    uint64_t buf;
    unsigned cnt;
    uint64_t base; /* absolute bit of p's bit 0, for messages */
} reader_t;

static inline void refill(reader_t *r) {
    if (r->in + 8 <= r->n) {
        uint64_t w;
        memcpy(&w, r->p + r->in, 8);
        r->buf |= w << r->cnt;
        r->in += (63 - r->cnt) >> 3;
        r->cnt |= 56;
    } else {
        while (r->cnt <= 56 && r->in < r->n) {
            r->buf |= (uint64_t)r->p[r->in++] << r->cnt;
            r->cnt += 8;
        }
    }
}

static inline uint64_t left_bits(const reader_t *r) { return (uint64_t)(r->n - r->in) * 8 + r->cnt; }
static inline uint64_t at_bit(const reader_t *r) { return r->base + (uint64_t)r->in * 8 - r->cnt; }
static inline uint32_t peek(const reader_t *r, unsigned n) { return (uint32_t)(r->buf & ((1ull << n) - 1)); }
static inline void drop(reader_t *r, unsigned n) {
    r->buf >>= n;
    r->cnt -= n;
}

/* n <= 32 bits; -1 when the extent ends first */
static inline int take(reader_t *r, unsigned n, uint32_t *v, err_t *e, const char *what) {
    refill(r);
    if (r->cnt < n) return FAIL(e, "deflate ends inside the %s at bit %llu", what, (unsigned long long)at_bit(r));
    *v = peek(r, n);
    drop(r, n);
    return 0;
}

/* decode with a lookup of n bits (zeros past the end), as puffin does */
static inline int symbol(reader_t *r, const decoder_t *d, unsigned n, err_t *e, const char *what) {
    uint16_t entry = d->table[peek(r, n)];
    if (!entry) return FAIL(e, "invalid %s code at bit %llu", what, (unsigned long long)at_bit(r));
    unsigned l = entry >> 9;
    if (l > r->cnt)
        return FAIL(e, "deflate ends inside a %s code at bit %llu", what, (unsigned long long)at_bit(r));
    drop(r, l);
    return entry & 511;
}

/* ------------------------------------------------------------------ puff writer */

typedef struct {
    uint8_t *b;
    size_t len, cap, limit;
    size_t run_at, run_len; /* run_len 0: no literal run open */
} pw_t;

static int room(pw_t *w, size_t k, err_t *e) {
    if (w->len + k > w->limit) return FAIL(e, "puffs to more than the %zu bytes expected", w->limit);
    if (w->len + k > w->cap) {
        size_t cap = w->cap ? w->cap : 4096;
        while (cap < w->len + k) cap *= 2;
        if (cap > w->limit) cap = w->limit;
        uint8_t *b = realloc(w->b, cap);
        if (!b) return FAIL(e, "out of memory");
        w->b = b;
        w->cap = cap;
    }
    return 0;
}

static void flush_run(pw_t *w) {
    size_t n = w->run_len;
    if (!n) return;
    if (n <= 127) {
        w->b[w->run_at] = (uint8_t)(n - 1);
    } else {
        w->b[w->run_at] = 127;
        w->b[w->run_at + 1] = (uint8_t)((n - 128) >> 8);
        w->b[w->run_at + 2] = (uint8_t)(n - 128);
    }
    w->run_len = 0;
}

static inline int put_literal(pw_t *w, uint8_t byte, err_t *e) {
    if (w->run_len == 0) {
        if (room(w, 2, e)) return -1;
        w->run_at = w->len++;
    } else if (w->run_len == 127) { /* the header grows to 3 bytes */
        if (room(w, 3, e)) return -1;
        memmove(w->b + w->run_at + 3, w->b + w->run_at + 1, 127);
        w->len += 2;
    } else if (w->len >= w->cap || w->len >= w->limit) {
        if (room(w, 1, e)) return -1;
    }
    w->b[w->len++] = byte;
    if (++w->run_len == MAX_RUN) flush_run(w);
    return 0;
}

static int put_bytes_run(pw_t *w, const uint8_t *p, size_t n, err_t *e) {
    if (!n) return 0;
    if (room(w, (n <= 127 ? 1 : 3) + n, e)) return -1;
    w->run_at = w->len;
    w->len += n <= 127 ? 1 : 3;
    memcpy(w->b + w->len, p, n);
    w->len += n;
    w->run_len = n;
    flush_run(w);
    return 0;
}

static inline int put_lendist(pw_t *w, unsigned len, unsigned dist, err_t *e) {
    flush_run(w);
    if (room(w, len < 130 ? 3 : 4, e)) return -1;
    if (len < 130) {
        w->b[w->len++] = (uint8_t)(0x80 | (len - 3));
    } else {
        w->b[w->len++] = 0xFF;
        w->b[w->len++] = (uint8_t)(len - 130);
    }
    w->b[w->len++] = (uint8_t)((dist - 1) >> 8);
    w->b[w->len++] = (uint8_t)(dist - 1);
    return 0;
}

static int put_metadata(pw_t *w, const uint8_t *md, size_t n, err_t *e) {
    flush_run(w);
    if (room(w, 2 + n, e)) return -1;
    w->b[w->len++] = (uint8_t)((n - 1) >> 8);
    w->b[w->len++] = (uint8_t)(n - 1);
    memcpy(w->b + w->len, md, n);
    w->len += n;
    return 0;
}

static int put_eob(pw_t *w, err_t *e) {
    flush_run(w);
    if (room(w, 2, e)) return -1;
    w->b[w->len++] = 0xFF;
    w->b[w->len++] = 0x81;
    return 0;
}

/* ------------------------------------------------------------------ puff (inflate to puff form) */

typedef struct {
    uint16_t lit_table[1 << 15], dist_table[1 << 15], code_table[1 << 7];
    uint8_t lens[286 + 30 + 138], code_lens[19];
} dyn_t;

typedef struct {
    uint64_t (*v)[2];
    size_t n, cap;
} blocks_t;

static int dynamic_header(reader_t *r, dyn_t *t, uint8_t *md, size_t *mdlen, decoder_t *lit, decoder_t *dist,
                          err_t *e) {
    uint32_t hlit, hdist, hclen, v;
    refill(r);
    if (left_bits(r) < 14)
        return FAIL(e, "deflate ends inside a dynamic block header at bit %llu", (unsigned long long)at_bit(r));
    hlit = peek(r, 5);
    hdist = (uint32_t)(r->buf >> 5) & 31;
    hclen = (uint32_t)(r->buf >> 10) & 15;
    drop(r, 14);
    unsigned nlit = hlit + 257, ndist = hdist + 1, ncode = hclen + 4;
    if (nlit > 286 || ndist > 30)
        return FAIL(e, "dynamic block at bit %llu declares %u literal/length and %u distance codes (at most 286 and 30)",
                    (unsigned long long)(at_bit(r) - 14), nlit, ndist);
    size_t m = *mdlen;
    md[m++] = (uint8_t)hlit;
    md[m++] = (uint8_t)hdist;
    md[m++] = (uint8_t)hclen;
    memset(t->code_lens, 0, sizeof(t->code_lens));
    for (unsigned i = 0; i < ncode; i++) {
        if (take(r, 3, &v, e, "code-length code lengths")) return -1;
        t->code_lens[PERM[i]] = (uint8_t)v;
        if (i & 1)
            md[m - 1] |= (uint8_t)v;
        else
            md[m++] = (uint8_t)(v << 4);
    }
    decoder_t code = {.table = t->code_table};
    if (build_decoder(&code, t->code_lens, 19))
        return FAIL(e, "code-length Huffman code lengths are over-subscribed");
    unsigned total = nlit + ndist, have = 0;
    while (have < total) {
        refill(r);
        if (r->cnt < (unsigned)code.bits)
            return FAIL(e, "deflate ends inside the code lengths at bit %llu", (unsigned long long)at_bit(r));
        int sym = symbol(r, &code, code.bits, e, "code-length");
        if (sym < 0) return -1;
        if (sym < 16) {
            md[m++] = (uint8_t)sym;
            t->lens[have++] = (uint8_t)sym;
            continue;
        }
        unsigned rep, val = 0;
        if (sym == 16) {
            if (!have)
                return FAIL(e, "code length repeat with no previous length at bit %llu", (unsigned long long)at_bit(r));
            if (take(r, 2, &v, e, "repeat count")) return -1;
            md[m++] = (uint8_t)(16 + v);
            rep = 3 + v;
            val = t->lens[have - 1];
        } else if (sym == 17) {
            if (take(r, 3, &v, e, "repeat count")) return -1;
            md[m++] = (uint8_t)(20 + v);
            rep = 3 + v;
        } else {
            if (take(r, 7, &v, e, "repeat count")) return -1;
            md[m++] = (uint8_t)(28 + v);
            rep = 11 + v;
        }
        if (have + rep > total)
            return FAIL(e, "code length repeat runs past the %u lengths at bit %llu", total,
                        (unsigned long long)at_bit(r));
        memset(t->lens + have, val, rep);
        have += rep;
    }
    *mdlen = m;
    lit->table = t->lit_table;
    dist->table = t->dist_table;
    if (build_decoder(lit, t->lens, nlit)) return FAIL(e, "literal/length Huffman code lengths are over-subscribed");
    if (build_decoder(dist, t->lens + nlit, ndist)) return FAIL(e, "distance Huffman code lengths are over-subscribed");
    return 0;
}

/* With blocks (locating): stop after the final block, record compressed blocks. Else puff into w. */
static int inflate(reader_t *r, dyn_t *t, pw_t *w, blocks_t *blocks, err_t *e) {
    uint8_t md[MAX_METADATA];
    for (;;) {
        refill(r);
        if (left_bits(r) < 8) break;
        uint64_t block_start = at_bit(r);
        uint32_t final = peek(r, 1), btype = (uint32_t)(r->buf >> 1) & 3;
        drop(r, 3);
        uint8_t header = (uint8_t)(final << 7 | btype << 5);
        const decoder_t *lit, *dist;
        decoder_t dlit, ddist;
        if (btype == 0) {
            unsigned pad = r->cnt & 7; /* the reader holds whole bytes: this is the way to a boundary */
            header |= (uint8_t)peek(r, pad);
            drop(r, pad);
            uint32_t len, nlen;
            if (take(r, 16, &len, e, "stored block length") || take(r, 16, &nlen, e, "stored block length"))
                return -1;
            if ((len ^ nlen) != 0xFFFF)
                return FAIL(e, "stored block at bit %llu: LEN %#x and NLEN %#x disagree",
                            (unsigned long long)block_start, len, nlen);
            if ((uint64_t)len * 8 > left_bits(r))
                return FAIL(e, "stored block at bit %llu of %u bytes runs past the deflate",
                            (unsigned long long)block_start, len);
            /* give back the whole bytes the reader holds, copy, go on after them */
            size_t at = r->in - r->cnt / 8;
            if (w) {
                if (put_metadata(w, &header, 1, e) || put_bytes_run(w, r->p + at, len, e) || put_eob(w, e)) return -1;
            }
            r->in = at + len;
            r->buf = 0;
            r->cnt = 0;
            if (blocks && final) return 0;
            continue;
        }
        if (btype == 1) {
            lit = &fixed_lit;
            dist = &fixed_dist;
            if (w && put_metadata(w, &header, 1, e)) return -1;
        } else if (btype == 2) {
            size_t mdlen = 1;
            md[0] = header;
            if (dynamic_header(r, t, md, &mdlen, &dlit, &ddist, e)) return -1;
            lit = &dlit;
            dist = &ddist;
            if (w && put_metadata(w, md, mdlen, e)) return -1;
        } else {
            return FAIL(e, "block at bit %llu has the reserved type 3", (unsigned long long)block_start);
        }
        const unsigned lit_bits = lit->bits, dist_bits = dist->bits;
        const unsigned eob_bits = lit->n > EOB ? lit->lens[EOB] : 0;
        const uint16_t *lt = lit->table;
        for (;;) {
            refill(r);
            unsigned n;
            uint16_t entry;
            if (r->cnt >= lit_bits) { /* the common case: a full lookup */
                entry = lt[peek(r, lit_bits)];
                if (!entry)
                    return FAIL(e, "invalid literal/length code at bit %llu", (unsigned long long)at_bit(r));
                drop(r, entry >> 9);
            } else { /* near the end of the extent: puffin looks for an end-of-block code only */
                n = eob_bits;
                if (n > r->cnt)
                    return FAIL(e, "deflate ends inside a block at bit %llu", (unsigned long long)at_bit(r));
                int s = symbol(r, lit, n, e, "literal/length");
                if (s < 0) return -1;
                entry = (uint16_t)s;
            }
            unsigned sym = entry & 511;
            if (sym < 256) {
                if (w && put_literal(w, (uint8_t)sym, e)) return -1;
                continue;
            }
            if (sym == EOB) {
                if (w && put_eob(w, e)) return -1;
                if (blocks) {
                    if (blocks->n == blocks->cap) {
                        size_t cap = blocks->cap ? blocks->cap * 2 : 64;
                        void *p = realloc(blocks->v, cap * sizeof(*blocks->v));
                        if (!p) return FAIL(e, "out of memory");
                        blocks->v = p;
                        blocks->cap = cap;
                    }
                    blocks->v[blocks->n][0] = block_start;
                    blocks->v[blocks->n][1] = at_bit(r) - block_start;
                    blocks->n++;
                }
                break;
            }
            if (sym > 285)
                return FAIL(e, "literal/length symbol %u at bit %llu does not exist", sym, (unsigned long long)at_bit(r));
            unsigned k = sym - 257, length = LEN_BASE[k];
            if (LEN_EXTRA[k]) {
                if (r->cnt < LEN_EXTRA[k]) {
                    refill(r);
                    if (r->cnt < LEN_EXTRA[k])
                        return FAIL(e, "deflate ends inside the length extra bits at bit %llu",
                                    (unsigned long long)at_bit(r));
                }
                length += peek(r, LEN_EXTRA[k]);
                drop(r, LEN_EXTRA[k]);
            }
            refill(r);
            n = r->cnt < dist_bits ? r->cnt : dist_bits;
            int ds = symbol(r, dist, n, e, "distance");
            if (ds < 0) return -1;
            unsigned distance = DIST_BASE[ds];
            if (DIST_EXTRA[ds]) {
                if (r->cnt < DIST_EXTRA[ds]) {
                    refill(r);
                    if (r->cnt < DIST_EXTRA[ds])
                        return FAIL(e, "deflate ends inside the distance extra bits at bit %llu",
                                    (unsigned long long)at_bit(r));
                }
                distance += peek(r, DIST_EXTRA[ds]);
                drop(r, DIST_EXTRA[ds]);
            }
            if (w && put_lendist(w, length, distance, e)) return -1;
        }
        if (blocks && final) return 0;
    }
    if (w) flush_run(w);
    return 0;
}

static int get_reader(reader_t *r, Py_buffer *data, unsigned long long start, unsigned long long end) {
    unsigned long long size_bits = (unsigned long long)data->len * 8;
    if (start > end || end > size_bits) {
        PyErr_Format(PyExc_ValueError, "deflate bits [%llu, %llu) are outside the data's %llu bits", start, end,
                     size_bits);
        return -1;
    }
    size_t b0 = (size_t)(start >> 3), b1 = (size_t)((end + 7) >> 3);
    *r = (reader_t){.p = (const uint8_t *)data->buf + b0, .n = b1 - b0, .base = (uint64_t)b0 * 8};
    refill(r);
    drop(r, (unsigned)(start & 7));
    return 0;
}

static PyObject *py_puff_deflate(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned long long start, end, limit;
    if (!PyArg_ParseTuple(args, "y*KKK:puff_deflate", &data, &start, &end, &limit)) return NULL;
    reader_t r;
    PyObject *result = NULL;
    if (get_reader(&r, &data, start, end)) goto done;
    dyn_t *t = malloc(sizeof(dyn_t));
    if (!t) {
        PyErr_NoMemory();
        goto done;
    }
    /* a puff never needs 2 bytes per deflate bit: never reserve more than that */
    pw_t w = {.limit = limit > SIZE_MAX / 2 ? SIZE_MAX / 2 : (size_t)limit};
    err_t e = {{0}};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    size_t guess = (size_t)((end - start) / 2) + 64;
    if (room(&w, guess < w.limit ? guess : w.limit, &e) == 0) rc = inflate(&r, t, &w, NULL, &e);
    else rc = -1;
    Py_END_ALLOW_THREADS
    free(t);
    if (rc)
        PyErr_SetString(PyExc_ValueError, e.msg);
    else
        result = PyBytes_FromStringAndSize((const char *)w.b, (Py_ssize_t)w.len);
    free(w.b);
done:
    PyBuffer_Release(&data);
    return result;
}

static PyObject *py_locate(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned long long start;
    if (!PyArg_ParseTuple(args, "y*K:locate", &data, &start)) return NULL;
    reader_t r;
    PyObject *result = NULL;
    if (get_reader(&r, &data, start, (unsigned long long)data.len * 8)) goto done;
    dyn_t *t = malloc(sizeof(dyn_t));
    if (!t) {
        PyErr_NoMemory();
        goto done;
    }
    blocks_t blocks = {0};
    err_t e = {{0}};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = inflate(&r, t, NULL, &blocks, &e);
    Py_END_ALLOW_THREADS
    free(t);
    if (rc) {
        PyErr_SetString(PyExc_ValueError, e.msg);
    } else {
        PyObject *list = PyList_New((Py_ssize_t)blocks.n);
        for (size_t i = 0; list && i < blocks.n; i++) {
            PyObject *item = Py_BuildValue("(KK)", (unsigned long long)blocks.v[i][0],
                                           (unsigned long long)blocks.v[i][1]);
            if (!item) Py_CLEAR(list);
            else PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        }
        if (list) result = Py_BuildValue("(NK)", list, (unsigned long long)at_bit(&r));
    }
    free(blocks.v);
done:
    PyBuffer_Release(&data);
    return result;
}

/* ------------------------------------------------------------------ huff (puff form to deflate) */

typedef struct {
    uint8_t *out;
    size_t byte;   /* where acc's bit 0 goes */
    uint64_t acc;
    unsigned nacc;
    uint64_t end;  /* absolute bit the deflate may not pass */
} writer_t;

static inline uint64_t w_pos(const writer_t *w) { return (uint64_t)w->byte * 8 + w->nacc; }

/* value has no bits above n; n <= 16 */
static inline int put(writer_t *w, unsigned n, uint32_t value, err_t *e) {
    if (w_pos(w) + n > w->end) return FAIL(e, "huffs to more than the bits of its extent");
    w->acc |= (uint64_t)value << w->nacc;
    w->nacc += n;
    if (w->nacc >= 32) {
        uint8_t *o = w->out + w->byte;
        o[0] |= (uint8_t)w->acc;
        o[1] |= (uint8_t)(w->acc >> 8);
        o[2] |= (uint8_t)(w->acc >> 16);
        o[3] |= (uint8_t)(w->acc >> 24);
        w->acc >>= 32;
        w->nacc -= 32;
        w->byte += 4;
    }
    return 0;
}

static void flush_bits(writer_t *w) {
    while (w->nacc > 0) {
        w->out[w->byte++] |= (uint8_t)w->acc;
        w->acc >>= 8;
        w->nacc = w->nacc > 8 ? w->nacc - 8 : 0;
    }
    w->acc = 0;
}

enum { ITEM_LITERALS, ITEM_MATCH, ITEM_EOB };

typedef struct {
    const uint8_t *p;
    size_t n, i;
} puff_t;

/* the next literals run (a = offset, b = count), match (a = length, b = distance) or end of block */
static int next_item(puff_t *q, size_t *a, size_t *b, err_t *e) {
    const uint8_t *p = q->p;
    size_t i = q->i, n = q->n;
    if (i >= n) return FAIL(e, "puff ends inside a block at byte %zu", i);
    uint8_t c = p[i];
    if (c & 0x80) {
        size_t length;
        if ((c & 0x7F) < 127) {
            length = (c & 0x7F) + 3;
            i += 1;
        } else {
            if (i + 1 >= n) return FAIL(e, "puff ends inside a length at byte %zu", i);
            length = (size_t)p[i + 1] + 130;
            if (length > 259) return FAIL(e, "puff length %zu at byte %zu is more than 258", length, i);
            i += 2;
        }
        if (length == 259) {
            q->i = i;
            return ITEM_EOB;
        }
        if (i + 2 > n) return FAIL(e, "puff ends inside a distance at byte %zu", i);
        size_t d = (size_t)p[i] << 8 | p[i + 1];
        if (d >= 1 << 15) return FAIL(e, "puff distance %zu at byte %zu is more than 32768", d + 1, i);
        q->i = i + 2;
        *a = length;
        *b = d + 1;
        return ITEM_MATCH;
    }
    size_t count;
    if (c < 127) {
        count = (size_t)c + 1;
        i += 1;
    } else {
        if (i + 3 > n) return FAIL(e, "puff ends inside a literals header at byte %zu", i);
        count = ((size_t)p[i + 1] << 8 | p[i + 2]) + 128;
        i += 3;
    }
    if (count > n - i) return FAIL(e, "puff literals at byte %zu run past its %zu bytes", i, n);
    *a = i;
    *b = count;
    q->i = i + count;
    return ITEM_LITERALS;
}

static int dynamic_encode(const uint8_t *md, size_t mlen, size_t at, writer_t *w, encoder_t *lit, encoder_t *dist,
                          err_t *e) {
    if (mlen < 4) return FAIL(e, "puff dynamic block metadata at byte %zu is shorter than its header", at);
    unsigned nlit = md[1] + 257u, ndist = md[2] + 1u, ncode = md[3] + 4u;
    if (nlit > 286 || ndist > 30 || ncode > 19)
        return FAIL(e, "puff dynamic block at byte %zu declares %u/%u/%u codes (at most 286/30/19)", at, nlit, ndist,
                    ncode);
    if (put(w, 5, md[1], e) || put(w, 5, md[2], e) || put(w, 4, md[3], e)) return -1;
    size_t j = 4;
    if (mlen - j < (ncode + 1) / 2)
        return FAIL(e, "puff dynamic block metadata at byte %zu ends inside the code-length code", at);
    uint8_t code_lens[19] = {0};
    for (unsigned k = 0; k < ncode; k++) {
        uint8_t v = k & 1 ? md[j + k / 2] & 0x0F : md[j + k / 2] >> 4;
        if (v > 7)
            return FAIL(e, "puff dynamic block at byte %zu: code-length code length %u is more than 7", at, v);
        code_lens[PERM[k]] = v;
        if (put(w, 3, v, e)) return -1;
    }
    j += (ncode + 1) / 2;
    encoder_t code;
    if (build_encoder(&code, code_lens, 19)) return FAIL(e, "code-length Huffman code lengths are over-subscribed");
    uint8_t lens[286 + 30 + 138];
    unsigned total = nlit + ndist, have = 0;
    while (have < total) {
        if (j >= mlen) return FAIL(e, "puff dynamic block metadata at byte %zu ends inside the code lengths", at);
        unsigned pc = md[j++];
        if (pc > 155) return FAIL(e, "puff dynamic block at byte %zu: code length entry %u is more than 155", at, pc);
        unsigned sym = pc < 16 ? pc : pc < 20 ? 16 : pc < 28 ? 17 : 18;
        if (!code.lens[sym]) return FAIL(e, "puff dynamic block at byte %zu: code-length symbol %u has no code", at, sym);
        if (put(w, code.lens[sym], code.codes[sym], e)) return -1;
        unsigned rep, val = 0;
        if (sym < 16) {
            lens[have++] = (uint8_t)sym;
            continue;
        } else if (sym == 16) {
            if (!have) return FAIL(e, "puff dynamic block at byte %zu: repeat with no previous length", at);
            if (put(w, 2, pc - 16, e)) return -1;
            rep = 3 + pc - 16;
            val = lens[have - 1];
        } else if (sym == 17) {
            if (put(w, 3, pc - 20, e)) return -1;
            rep = 3 + pc - 20;
        } else {
            if (put(w, 7, pc - 28, e)) return -1;
            rep = 11 + pc - 28;
        }
        if (have + rep > total) break;
        memset(lens + have, val, rep);
        have += rep;
    }
    if (have != total || j != mlen)
        return FAIL(e, "puff dynamic block metadata at byte %zu does not hold exactly %u code lengths", at, total);
    if (build_encoder(lit, lens, nlit)) return FAIL(e, "literal/length Huffman code lengths are over-subscribed");
    if (build_encoder(dist, lens + nlit, ndist)) return FAIL(e, "distance Huffman code lengths are over-subscribed");
    return 0;
}

static inline int put_symbol(writer_t *w, const encoder_t *c, unsigned sym, const char *what, size_t at, err_t *e) {
    if (sym >= (unsigned)c->n || !c->lens[sym])
        return FAIL(e, "puff %s symbol %u before byte %zu has no code in its block", what, sym, at);
    return put(w, c->lens[sym], c->codes[sym], e);
}

static int huff_blocks(puff_t *q, writer_t *w, encoder_t *dyn, err_t *e) {
    size_t a, b;
    while (q->i != q->n) {
        size_t i = q->i;
        if (i + 2 >= q->n)
            return FAIL(e, "puff ends inside block metadata at byte %zu", i);
        size_t mlen = ((size_t)q->p[i] << 8 | q->p[i + 1]) + 1;
        if (mlen > q->n - i - 2 || mlen > MAX_METADATA)
            return FAIL(e, "puff block metadata of %zu bytes at byte %zu does not fit", mlen, i);
        const uint8_t *md = q->p + i + 2;
        q->i = i + 2 + mlen;
        unsigned btype = (md[0] >> 5) & 3;
        if (put(w, 1, md[0] >> 7, e) || put(w, 2, btype, e)) return -1;
        const encoder_t *lit, *dist;
        if (btype == 0) {
            unsigned pad = (8 - (unsigned)(w_pos(w) & 7)) & 7;
            if (put(w, pad, (md[0] & 0x1F) & ((1u << pad) - 1), e)) return -1;
            int kind = next_item(q, &a, &b, e);
            if (kind < 0) return -1;
            if (kind == ITEM_LITERALS) {
                if (b > 0xFFFF)
                    return FAIL(e, "puff stored block of %zu bytes at byte %zu is more than 65535", b, a);
                if (put(w, 16, (uint32_t)b, e) || put(w, 16, (uint32_t)b ^ 0xFFFF, e)) return -1;
                if (w_pos(w) + 8 * (uint64_t)b > w->end)
                    return FAIL(e, "huffs to more than the bits of its extent");
                flush_bits(w);
                memcpy(w->out + w->byte, q->p + a, b);
                w->byte += b;
                kind = next_item(q, &a, &b, e);
                if (kind < 0) return -1;
            } else if (kind == ITEM_EOB) { /* an empty stored block */
                if (put(w, 16, 0, e) || put(w, 16, 0xFFFF, e)) return -1;
            }
            if (kind != ITEM_EOB)
                return FAIL(e, "puff stored block ends without its end of block at byte %zu", q->i);
            continue;
        }
        if (btype == 1) {
            lit = &fixed_lit_enc;
            dist = &fixed_dist_enc;
        } else if (btype == 2) {
            if (dynamic_encode(md, mlen, i, w, &dyn[0], &dyn[1], e)) return -1;
            lit = &dyn[0];
            dist = &dyn[1];
        } else {
            return FAIL(e, "puff block at byte %zu has the reserved type 3", i);
        }
        for (;;) {
            int kind = next_item(q, &a, &b, e);
            if (kind < 0) return -1;
            if (kind == ITEM_LITERALS) {
                const uint8_t *p = q->p + a;
                for (size_t k = 0; k < b; k++)
                    if (put_symbol(w, lit, p[k], "literal", q->i, e)) return -1;
            } else if (kind == ITEM_MATCH) {
                unsigned k = len_sym[a], d = dist_sym[b];
                if (put_symbol(w, lit, 257 + k, "length", q->i, e) ||
                    put(w, LEN_EXTRA[k], (uint32_t)(a - LEN_BASE[k]), e) ||
                    put_symbol(w, dist, d, "distance", q->i, e) ||
                    put(w, DIST_EXTRA[d], (uint32_t)(b - DIST_BASE[d]), e))
                    return -1;
            } else {
                if (put_symbol(w, lit, EOB, "end-of-block", q->i, e)) return -1;
                break;
            }
        }
    }
    return 0;
}

static int huff(puff_t *q, writer_t *w, err_t *e) {
    encoder_t *dyn = malloc(2 * sizeof(encoder_t));
    if (!dyn) return FAIL(e, "out of memory");
    int rc = huff_blocks(q, w, dyn, e);
    free(dyn);
    return rc;
}

static PyObject *py_huff_deflate(PyObject *self, PyObject *args) {
    Py_buffer puff, out;
    unsigned long long start, length;
    if (!PyArg_ParseTuple(args, "y*w*KK:huff_deflate", &puff, &out, &start, &length)) return NULL;
    PyObject *result = NULL;
    unsigned long long end = start + length, out_bits = (unsigned long long)out.len * 8;
    if (end < start || end > out_bits) {
        PyErr_Format(PyExc_ValueError, "deflate bits [%llu, %llu) are outside the output's %llu bits", start, end,
                     out_bits);
        goto done;
    }
    puff_t q = {.p = puff.buf, .n = (size_t)puff.len};
    writer_t w = {.out = out.buf, .byte = (size_t)(start >> 3), .nacc = (unsigned)(start & 7), .end = end};
    err_t e = {{0}};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = huff(&q, &w, &e);
    if (rc == 0) {
        uint64_t written = w_pos(&w);
        flush_bits(&w);
        /* as puffin: the last byte must be the extent's (it pads the rest with zeros) */
        if ((written + 7) / 8 != (end + 7) / 8)
            rc = FAIL(&e, "huffs to %llu bits, its extent has %llu", (unsigned long long)(written - start),
                      (unsigned long long)length);
    }
    Py_END_ALLOW_THREADS
    if (rc)
        PyErr_SetString(PyExc_ValueError, e.msg);
    else
        result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&puff);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"puff_deflate", py_puff_deflate, METH_VARARGS,
     "puff_deflate(data, start_bit, end_bit, limit) -> bytes: the puffed form of the deflate bits"},
    {"locate", py_locate, METH_VARARGS,
     "locate(data, start_bit) -> ([(offset, length)], end_bit): the compressed blocks of the deflate stream there"},
    {"huff_deflate", py_huff_deflate, METH_VARARGS,
     "huff_deflate(puff, out, start_bit, bit_length): OR the re-encoded deflate into the bytearray out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_puffin_native",
    .m_doc = "PUFFDIFF's puff and huff bit loops (see snapshot/_puffin.py)",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__puffin_native(void) {
    init_tables();
    return PyModule_Create(&module);
}
