/* The hot loops of Zucchini's ELF apply in C: dmuserd.snapshot._zucchini_native.
 *
 * Each function is the twin of the py_* function of the same name in
 * snapshot/_zucchini_kernel.py (which documents the arrays and is the
 * reference the tests compare against). Arrays arrive as buffers of uint32
 * (offsets, RVAs, targets), int32 (reference deltas) or int64 (runs);
 * results leave as bytes of packed uint32 that the caller turns into arrays.
 * Every index and offset taken from an argument is checked before use:
 * ValueError says what was out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INVALID 0xFFFFFFFEu
#define BOUND 0x7FFFFFFFu

enum { RELOC32, RELOC64, ABS32_4, ABS32_8, REL32_X86, ARM_KIND = 5, A64_KIND = 10, KIND_END = 13 };
enum { A24, T8, T11, T20, T24 };
enum { IMMD14, IMMD19, IMMD26 };
enum { MODE_A32, MODE_T32, MODE_A64 };

/* ---- growable uint32 output ---------------------------------------------- */

typedef struct {
    uint32_t *v;
    size_t n, cap;
} vec_t;

static int vec_push(vec_t *a, uint32_t x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 256;
        uint32_t *v = realloc(a->v, cap * sizeof(uint32_t));
        if (!v) {
            PyErr_NoMemory();
            return -1;
        }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static PyObject *vec_bytes(vec_t *a) {
    PyObject *out = PyBytes_FromStringAndSize((const char *)a->v, (Py_ssize_t)(a->n * sizeof(uint32_t)));
    free(a->v);
    a->v = NULL;
    return out;
}

/* ---- buffers ---------------------------------------------------------------- */

static int get_array(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes are not whole %zd-byte items", what, view->len, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline uint32_t le16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void put32(uint8_t *p, uint32_t v) { put16(p, v); put16(p + 2, v >> 16); }

/* ---- address translation ---------------------------------------------------- */

typedef struct {
    uint32_t off, offsize, rva, rvasize;
} unit_t;

typedef struct {
    unit_t *by_rva, *by_off;
    size_t n;
    uint32_t fake;
} units_t;

static int cmp_off(const void *a, const void *b) {
    uint32_t x = ((const unit_t *)a)->off, y = ((const unit_t *)b)->off;
    return x < y ? -1 : x > y;
}

static int units_init(units_t *u, PyObject *flat, unsigned long long fake) {
    Py_buffer view;
    memset(u, 0, sizeof(*u));
    if (get_array(flat, &view, 16, "units") < 0)
        return -1;
    u->n = (size_t)view.len / 16;
    u->fake = (uint32_t)fake;
    u->by_rva = malloc(u->n * sizeof(unit_t) + 1);
    u->by_off = malloc(u->n * sizeof(unit_t) + 1);
    if (!u->by_rva || !u->by_off) {
        PyBuffer_Release(&view);
        free(u->by_rva);
        free(u->by_off);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(u->by_rva, view.buf, u->n * sizeof(unit_t));
    memcpy(u->by_off, view.buf, u->n * sizeof(unit_t));
    PyBuffer_Release(&view);
    qsort(u->by_off, u->n, sizeof(unit_t), cmp_off);
    return 0;
}

static void units_free(units_t *u) {
    free(u->by_rva);
    free(u->by_off);
}

static const unit_t *rva_unit(const units_t *u, uint32_t rva) {
    size_t lo = 0, hi = u->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (rva < u->by_rva[mid].rva)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (!lo)
        return NULL;
    const unit_t *x = &u->by_rva[lo - 1];
    return rva - x->rva < x->rvasize ? x : NULL;
}

static uint32_t o2r(const units_t *u, uint32_t off) {
    if (off >= u->fake) {
        uint32_t rva = off - u->fake;
        const unit_t *x = rva_unit(u, rva);
        return (x && x->rvasize > x->offsize && rva - x->rva >= x->offsize) ? rva : INVALID;
    }
    size_t lo = 0, hi = u->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (off < u->by_off[mid].off)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (!lo)
        return INVALID;
    const unit_t *x = &u->by_off[lo - 1];
    return off - x->off < x->offsize ? off - x->off + x->rva : INVALID;
}

static uint32_t r2o(const units_t *u, uint32_t rva) {
    const unit_t *x = rva_unit(u, rva);
    if (!x)
        return INVALID;
    uint32_t d = rva - x->rva;
    return d < x->offsize ? d + x->off : u->fake + rva;
}

static int rva_valid(const units_t *u, uint32_t rva) { return rva != INVALID && rva_unit(u, rva) != NULL; }

/* ---- ARM and AArch64 branch immediates ------------------------------------------ */

static int64_t sext(uint32_t v, int bit) {
    uint64_t m = 1ull << bit, mask = (m << 1) - 1;
    uint64_t x = v & mask;
    return (int64_t)(x ^ m) - (int64_t)m;
}

static int64_t wrap32(int64_t v) { return (int64_t)(int32_t)(uint32_t)(uint64_t)v; }

static uint32_t bits(int64_t v, int lo, int hi) { return (uint32_t)(((uint64_t)v >> lo) & ((1ull << (hi - lo + 1)) - 1)); }

static int fits(int64_t v, int digits) { return v >= -(1ll << (digits - 1)) && v < (1ll << (digits - 1)); }

/* decode: 1 and *disp, *align if the instruction is of the type */
static int arm_decode(int kind, uint32_t c, int64_t *disp, uint32_t *align) {
    switch (kind) {
    case ARM_KIND + A24: {
        uint32_t b = (c >> 24) & 0xF;
        if (b != 0xA && b != 0xB)
            return 0;
        *disp = sext(c, 23) * 4;
        if (c >> 28 == 0xF) {
            *disp |= (int64_t)(((c >> 24) & 1) << 1);
            *align = 2;
        } else {
            *align = 4;
        }
        return 1;
    }
    case ARM_KIND + T8:
        if ((c & 0xF000) != 0xD000 || (c & 0x0F00) == 0x0F00)
            return 0;
        *disp = sext(c, 7) * 2;
        *align = 2;
        return 1;
    case ARM_KIND + T11:
        if ((c & 0xF800) != 0xE000)
            return 0;
        *disp = sext(c, 10) * 2;
        *align = 2;
        return 1;
    case ARM_KIND + T20: {
        if ((c & 0xF800D000) != 0xF0008000 || (c & 0x03C00000) == 0x03C00000)
            return 0;
        uint32_t t = (bits(c, 16, 21) << 12) | (bits(c, 0, 10) << 1);
        t |= (bits(c, 26, 26) << 20) | (bits(c, 11, 11) << 19) | (bits(c, 13, 13) << 18);
        *disp = sext(t, 20);
        *align = 2;
        return 1;
    }
    case ARM_KIND + T24: {
        uint32_t k = c & 0xF800D000;
        if (k != 0xF0009000 && k != 0xF000D000 && k != 0xF000C000)
            return 0;
        uint32_t s = bits(c, 26, 26);
        uint32_t t = (bits(c, 16, 25) << 12) | (bits(c, 0, 10) << 1);
        t |= (s << 24) | ((bits(c, 13, 13) ^ s ^ 1) << 23) | ((bits(c, 11, 11) ^ s ^ 1) << 22);
        *align = 2;
        if (k == 0xF000C000) {
            if (c & 1)
                return 0;
            *align = 4;
        }
        *disp = sext(t, 24);
        return 1;
    }
    case A64_KIND + IMMD14: {
        uint32_t b = c & 0x7F000000;
        if (b != 0x36000000 && b != 0x37000000)
            return 0;
        *disp = sext(c >> 5, 13) * 4;
        *align = 4;
        return 1;
    }
    case A64_KIND + IMMD19: {
        uint32_t b = c & 0x7F000000;
        if ((c & 0xFF000010) != 0x54000000 && b != 0x34000000 && b != 0x35000000)
            return 0;
        *disp = sext(c >> 5, 18) * 4;
        *align = 4;
        return 1;
    }
    case A64_KIND + IMMD26: {
        uint32_t b = c & 0xFC000000;
        if (b != 0x14000000 && b != 0x94000000)
            return 0;
        *disp = sext(c, 25) * 4;
        *align = 4;
        return 1;
    }
    }
    return 0;
}

/* encode: 1 and *c re-encoded with disp if it fits */
static int arm_encode(int kind, int64_t d, uint32_t *c) {
    uint32_t t = *c;
    switch (kind) {
    case ARM_KIND + A24: {
        uint32_t b = (t >> 24) & 0xF;
        if ((b != 0xA && b != 0xB) || !fits(d, 26))
            return 0;
        if (t >> 28 == 0xF) {
            if (d & 1)
                return 0;
            t = (t & 0xFEFFFFFF) | (bits(d, 1, 1) << 24);
        } else if (d & 3) {
            return 0;
        }
        *c = (t & 0xFF000000) | bits(d, 2, 25);
        return 1;
    }
    case ARM_KIND + T8:
        if ((t & 0xF000) != 0xD000 || (t & 0x0F00) == 0x0F00 || (d & 1) || !fits(d, 9))
            return 0;
        *c = (t & 0xFF00) | bits(d, 1, 8);
        return 1;
    case ARM_KIND + T11:
        if ((t & 0xF800) != 0xE000 || (d & 1) || !fits(d, 12))
            return 0;
        *c = (t & 0xF800) | bits(d, 1, 11);
        return 1;
    case ARM_KIND + T20:
        if ((t & 0xF800D000) != 0xF0008000 || (t & 0x03C00000) == 0x03C00000 || (d & 1) || !fits(d, 21))
            return 0;
        t &= 0xFBC0D000;
        t |= (bits(d, 20, 20) << 26) | (bits(d, 12, 17) << 16) | (bits(d, 18, 18) << 13);
        t |= (bits(d, 19, 19) << 11) | bits(d, 1, 11);
        *c = t;
        return 1;
    case ARM_KIND + T24: {
        uint32_t k = t & 0xF800D000;
        if ((k != 0xF0009000 && k != 0xF000D000 && k != 0xF000C000) || (d & 1))
            return 0;
        if (k == 0xF000C000 && bits(d, 1, 1))
            return 0;
        if (!fits(d, 25))
            return 0;
        uint32_t s = bits(d, 24, 24);
        t &= 0xF800D000;
        t |= (s << 26) | (bits(d, 12, 21) << 16) | ((bits(d, 23, 23) ^ s ^ 1) << 13);
        t |= ((bits(d, 22, 22) ^ s ^ 1) << 11) | bits(d, 1, 11);
        *c = t;
        return 1;
    }
    case A64_KIND + IMMD14: {
        uint32_t b = t & 0x7F000000;
        if ((b != 0x36000000 && b != 0x37000000) || (d & 3) || !fits(d, 16))
            return 0;
        *c = (t & 0xFFF8001F) | (bits(d, 2, 15) << 5);
        return 1;
    }
    case A64_KIND + IMMD19: {
        uint32_t b = t & 0x7F000000;
        if (((t & 0xFF000010) != 0x54000000 && b != 0x34000000 && b != 0x35000000) || (d & 3) || !fits(d, 21))
            return 0;
        *c = (t & 0xFF00001F) | (bits(d, 2, 20) << 5);
        return 1;
    }
    case A64_KIND + IMMD26: {
        uint32_t b = t & 0xFC000000;
        if ((b != 0x14000000 && b != 0x94000000) || (d & 3) || !fits(d, 28))
            return 0;
        *c = (t & 0xFC000000) | bits(d, 2, 27);
        return 1;
    }
    }
    return 0;
}

static int is_a64(int kind) { return kind >= A64_KIND; }
static uint32_t instr_align(int kind) { return (kind == ARM_KIND + A24 || is_a64(kind)) ? 4 : 2; }
static uint32_t pc_bias(int kind) { return is_a64(kind) ? 0 : (kind == ARM_KIND + A24 ? 8 : 4); }
static int code_width(int kind) { return (kind == ARM_KIND + T8 || kind == ARM_KIND + T11) ? 2 : 4; }
static int halves(int kind) { return kind == ARM_KIND + T20 || kind == ARM_KIND + T24; }

static uint32_t fetch(const uint8_t *p, int kind) {
    if (code_width(kind) == 2)
        return le16(p);
    return halves(kind) ? (le16(p) << 16 | le16(p + 2)) : le32(p);
}

static void store(uint8_t *p, int kind, uint32_t c) {
    if (code_width(kind) == 2)
        put16(p, c);
    else if (halves(kind)) {
        put16(p, c >> 16);
        put16(p + 2, c & 0xFFFF);
    } else
        put32(p, c);
}

static int arm_read(int kind, uint32_t instr_rva, uint32_t code, uint32_t *target) {
    int64_t disp;
    uint32_t align;
    if (instr_rva % instr_align(kind) || !arm_decode(kind, code, &disp, &align))
        return 0;
    uint32_t ret = instr_rva + pc_bias(kind) + (uint32_t)disp;
    if (!is_a64(kind))
        ret -= ret & (align - 1);
    *target = ret;
    return 1;
}

static int arm_write(int kind, uint32_t instr_rva, uint32_t target_rva, uint32_t *code) {
    int64_t dummy, disp;
    uint32_t align;
    if (instr_rva % instr_align(kind))
        return 0;
    if (kind == ARM_KIND + A24 || kind == ARM_KIND + T24) {
        if (!arm_decode(kind, *code, &dummy, &align))
            return 0;
    } else {
        align = is_a64(kind) ? 4 : 2;
    }
    if (target_rva % align)
        return 0;
    if (is_a64(kind)) {
        disp = wrap32((int64_t)(uint32_t)(target_rva - instr_rva));
    } else {
        disp = wrap32(wrap32(target_rva) - wrap32((uint32_t)(instr_rva + pc_bias(kind))));
        disp += (-disp) & (int64_t)(align - 1);
    }
    return arm_encode(kind, disp, code);
}

/* ---- scans ------------------------------------------------------------------------ */

static PyObject *scan_intel(PyObject *self, PyObject *args) {
    Py_buffer data, gv;
    int x64;
    PyObject *flat;
    unsigned long long fake, start_rva, end_rva;
    if (!PyArg_ParseTuple(args, "y*y*pOKKK", &data, &gv, &x64, &flat, &fake, &start_rva, &end_rva))
        return NULL;
    PyObject *out = NULL;
    units_t u;
    vec_t found = {0};
    if (gv.len % 8) {
        PyErr_SetString(PyExc_ValueError, "gaps are uint32 pairs");
        goto done;
    }
    if (units_init(&u, flat, fake) < 0)
        goto done;
    const uint8_t *d = data.buf;
    const uint32_t *g = gv.buf;
    size_t ngaps = (size_t)gv.len / 8;
    for (size_t i = 0; i < ngaps; i++) {
        uint64_t lo = g[2 * i], hi = g[2 * i + 1];
        if (lo > hi || hi > (uint64_t)data.len) {
            PyErr_Format(PyExc_ValueError, "gap %llu..%llu is outside the %zd-byte image",
                         (unsigned long long)lo, (unsigned long long)hi, data.len);
            goto fail;
        }
        for (uint64_t cur = lo; cur < hi; cur++) {
            uint8_t b0 = d[cur];
            int op, outside = 0;
            if (b0 == 0xE8 || b0 == 0xE9) {
                if (cur + 5 > hi)
                    continue;
                op = 1;
            } else {
                if (cur + 6 > hi)
                    continue;
                uint8_t b1 = d[cur + 1];
                if (b0 == 0x0F && (b1 & 0xF0) == 0x80) {
                    op = 2;
                } else if (x64 && ((b0 == 0xFF && (b1 == 0x15 || b1 == 0x25)) ||
                                   ((b0 == 0x89 || b0 == 0x8B || b0 == 0x8D) && (b1 & 0xC7) == 0x05))) {
                    op = 2;
                    outside = 1;
                } else {
                    continue;
                }
            }
            uint32_t loc = (uint32_t)(cur + op);
            uint32_t target = o2r(&u, loc) + 4 + le32(d + loc);
            if (rva_valid(&u, target) && (outside || (start_rva <= target && target < end_rva))) {
                if (vec_push(&found, loc) < 0)
                    goto fail;
                cur = (uint64_t)loc + 3; /* the loop's ++ lands past the operand */
            }
        }
    }
    out = vec_bytes(&found);
fail:
    free(found.v);
    units_free(&u);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&gv);
    return out;
}

static int in_exec(const uint32_t *ranges, size_t n, uint32_t target) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (target < ranges[2 * mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo && target - ranges[2 * lo - 2] < ranges[2 * lo - 1];
}

static PyObject *scan_arm(PyObject *self, PyObject *args) {
    Py_buffer data, gaps, ranges;
    int mode;
    PyObject *flat;
    unsigned long long fake;
    if (!PyArg_ParseTuple(args, "y*y*iOKy*", &data, &gaps, &mode, &flat, &fake, &ranges))
        return NULL;
    PyObject *out = NULL;
    units_t u;
    vec_t found = {0};
    if (gaps.len % 8 || ranges.len % 8) {
        PyErr_SetString(PyExc_ValueError, "gaps and executable ranges are uint32 pairs");
        goto done;
    }
    if (units_init(&u, flat, fake) < 0)
        goto done;
    const uint8_t *d = data.buf;
    const uint32_t *g = gaps.buf, *r = ranges.buf;
    size_t ngaps = (size_t)gaps.len / 8, nranges = (size_t)ranges.len / 8;
    for (size_t i = 0; i < ngaps; i++) {
        int64_t lo = g[2 * i], hi = g[2 * i + 1];
        if (lo > hi || hi > data.len) {
            PyErr_SetString(PyExc_ValueError, "a gap is outside the image");
            goto fail;
        }
        if (mode == MODE_T32) {
            if (hi - lo < 2)
                continue;
            int64_t pos = lo + (lo & 1);
            while (hi - pos >= 2) {
                uint32_t c16 = le16(d + pos);
                int size = ((c16 & 0xF000) == 0xF000 || (c16 & 0xF800) == 0xE800) ? 4 : 2;
                uint32_t target_rva, rva = o2r(&u, (uint32_t)pos);
                int type = -1;
                if (size == 2) {
                    if (arm_read(ARM_KIND + T8, rva, c16, &target_rva))
                        type = T8;
                    else if (arm_read(ARM_KIND + T11, rva, c16, &target_rva))
                        type = T11;
                } else if (hi - pos >= 4) {
                    uint32_t c32 = c16 << 16 | le16(d + pos + 2);
                    if (arm_read(ARM_KIND + T20, rva, c32, &target_rva))
                        type = T20;
                    else if (arm_read(ARM_KIND + T24, rva, c32, &target_rva))
                        type = T24;
                }
                if (type >= 0) {
                    uint32_t target = r2o(&u, target_rva);
                    if (target != INVALID && in_exec(r, nranges, target))
                        if (vec_push(&found, (uint32_t)type) < 0 || vec_push(&found, (uint32_t)pos) < 0)
                            goto fail;
                }
                pos += size;
            }
            continue;
        }
        if (hi - lo < 4)
            continue;
        for (int64_t pos = lo + ((-lo) & 3); hi - pos >= 4; pos += 4) {
            uint32_t c = le32(d + pos), target_rva, rva = o2r(&u, (uint32_t)pos);
            int type = -1;
            if (mode == MODE_A32) {
                if (arm_read(ARM_KIND + A24, rva, c, &target_rva))
                    type = A24;
            } else {
                for (int t = IMMD14; t <= IMMD26 && type < 0; t++)
                    if (arm_read(A64_KIND + t, rva, c, &target_rva))
                        type = t;
            }
            if (type >= 0) {
                uint32_t target = r2o(&u, target_rva);
                if (target != INVALID && in_exec(r, nranges, target))
                    if (vec_push(&found, (uint32_t)type) < 0 || vec_push(&found, (uint32_t)pos) < 0)
                        goto fail;
            }
        }
    }
    out = vec_bytes(&found);
fail:
    free(found.v);
    units_free(&u);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&gaps);
    PyBuffer_Release(&ranges);
    return out;
}

/* ---- reading references ------------------------------------------------------------- */

static PyObject *read_refs(PyObject *self, PyObject *args) {
    int kind;
    Py_buffer data, locs;
    PyObject *flat;
    unsigned long long fake;
    if (!PyArg_ParseTuple(args, "iy*y*OK", &kind, &data, &locs, &flat, &fake))
        return NULL;
    PyObject *out = NULL;
    units_t u;
    vec_t ol = {0}, ot = {0};
    if (locs.len % 4 || kind < ABS32_4 || kind >= KIND_END) {
        PyErr_SetString(PyExc_ValueError, "bad reference kind or locations");
        goto done;
    }
    if (units_init(&u, flat, fake) < 0)
        goto done;
    const uint8_t *d = data.buf;
    const uint32_t *l = locs.buf;
    uint64_t size = (uint64_t)data.len;
    size_t n = (size_t)locs.len / 4;
    for (size_t i = 0; i < n; i++) {
        uint64_t loc = l[i];
        uint32_t target;
        if (kind == ABS32_4 || kind == ABS32_8) {
            uint64_t width = kind == ABS32_4 ? 4 : 8;
            if (!(loc < size && size - loc >= width))
                continue;
            uint64_t value = le32(d + loc);
            if (width == 8)
                value |= (uint64_t)le32(d + loc + 4) << 32;
            if (value >= BOUND)
                continue;
            target = r2o(&u, (uint32_t)value);
            if (target == INVALID)
                continue;
        } else if (kind == REL32_X86) {
            if (loc + 4 > size) {
                PyErr_Format(PyExc_ValueError, "a rel32 reference at old offset %llu runs past the image",
                             (unsigned long long)loc);
                goto fail;
            }
            target = r2o(&u, o2r(&u, (uint32_t)loc) + 4 + le32(d + loc));
        } else {
            uint32_t target_rva;
            if (loc + (uint64_t)code_width(kind) > size) {
                PyErr_Format(PyExc_ValueError, "a branch at old offset %llu runs past the %llu-byte ELF image",
                             (unsigned long long)loc, (unsigned long long)size);
                goto fail;
            }
            if (!arm_read(kind, o2r(&u, (uint32_t)loc), fetch(d + loc, kind), &target_rva))
                continue;
            target = r2o(&u, target_rva);
            if (target == INVALID)
                continue;
        }
        if (vec_push(&ol, (uint32_t)loc) < 0 || vec_push(&ot, target) < 0)
            goto fail;
    }
    {
        PyObject *a = vec_bytes(&ol), *b = vec_bytes(&ot);
        if (a && b)
            out = PyTuple_Pack(2, a, b);
        Py_XDECREF(a);
        Py_XDECREF(b);
    }
fail:
    free(ol.v);
    free(ot.v);
    units_free(&u);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&locs);
    return out;
}

static PyObject *project_all(PyObject *self, PyObject *args) {
    Py_buffer offs, src, dst, end;
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &offs, &src, &dst, &end))
        return NULL;
    PyObject *out = NULL;
    vec_t res = {0};
    if (offs.len % 4 || src.len % 4 || src.len != dst.len || src.len != end.len) {
        PyErr_SetString(PyExc_ValueError, "offsets and equivalence arrays must be uint32, the latter of one length");
        goto done;
    }
    const uint32_t *o = offs.buf, *s = src.buf, *t = dst.buf, *e = end.buf;
    size_t n = (size_t)offs.len / 4, m = (size_t)src.len / 4, i = 0;
    for (size_t k = 0; k < n; k++) {
        while (i < m && e[i] <= o[k])
            i++;
        if (i < m && s[i] <= o[k])
            if (vec_push(&res, o[k] - s[i] + t[i]) < 0)
                goto done;
    }
    out = vec_bytes(&res);
done:
    free(res.v);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&end);
    return out;
}

/* ---- correcting references ----------------------------------------------------------- */

static size_t upper(const uint32_t *a, size_t n, uint32_t v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (v < a[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static size_t lower(const uint32_t *a, size_t n, uint32_t v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (a[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* 0, or -1 with ValueError set */
static int write_ref(int kind, uint8_t *buf, uint64_t length, uint64_t loc, uint32_t target, const units_t *u) {
    if (kind == REL32_X86) {
        if (loc + 4 > length)
            goto past;
        put32(buf + loc, o2r(u, target) - (o2r(u, (uint32_t)loc) + 4));
    } else if (kind == ABS32_4 || kind == ABS32_8) {
        uint64_t width = kind == ABS32_4 ? 4 : 8;
        uint32_t rva = o2r(u, target);
        if (rva != INVALID && loc < length && length - loc >= width) {
            put32(buf + loc, rva);
            if (width == 8)
                put32(buf + loc + 4, 0);
        }
    } else if (kind == RELOC32 || kind == RELOC64) {
        if (loc + (kind == RELOC32 ? 8 : 16) > length)
            goto past;
        put32(buf + loc, o2r(u, target));
        if (kind == RELOC64)
            put32(buf + loc + 4, 0);
    } else {
        if (loc + (uint64_t)code_width(kind) > length)
            goto past;
        uint32_t code = fetch(buf + loc, kind);
        if (arm_write(kind, o2r(u, (uint32_t)loc), o2r(u, target), &code))
            store(buf + loc, kind, code);
    }
    return 0;
past:
    PyErr_Format(PyExc_ValueError, "a %s reference at new offset %llu runs past the %llu-byte element",
                 kind == REL32_X86 ? "rel32" : (kind <= RELOC64 ? "reloc" : "branch"), (unsigned long long)loc,
                 (unsigned long long)length);
    return -1;
}

static PyObject *correct_group(PyObject *self, PyObject *args) {
    int kind;
    Py_buffer buf, locs, targets, runs, msrc, mdst, mend, pool, deltas;
    unsigned long long base, length, old_size, new_size, fake;
    Py_ssize_t delta_pos;
    PyObject *flat;
    if (!PyArg_ParseTuple(args, "iw*KKy*y*y*y*y*y*KKy*y*nOK", &kind, &buf, &base, &length, &locs, &targets, &runs,
                          &msrc, &mdst, &mend, &old_size, &new_size, &pool, &deltas, &delta_pos, &flat, &fake))
        return NULL;
    PyObject *out = NULL;
    units_t u;
    int have_units = 0;
    if (kind < 0 || kind >= KIND_END || locs.len % 4 || locs.len != targets.len || runs.len % 24 ||
        msrc.len % 4 || msrc.len != mdst.len || msrc.len != mend.len || pool.len % 4 || deltas.len % 4 ||
        base > (unsigned long long)buf.len || length > (unsigned long long)buf.len - base || new_size == 0 ||
        delta_pos < 0) {
        PyErr_SetString(PyExc_ValueError, "correct_group: inconsistent arguments");
        goto done;
    }
    if (units_init(&u, flat, fake) < 0)
        goto done;
    have_units = 1;
    uint8_t *b = (uint8_t *)buf.buf + base;
    const uint32_t *l = locs.buf, *t = targets.buf, *s = msrc.buf, *dd = mdst.buf, *e = mend.buf, *p = pool.buf;
    const int64_t *r = runs.buf;
    const int32_t *dl = deltas.buf;
    size_t nrefs = (size_t)locs.len / 4, nmap = (size_t)msrc.len / 4, count = (size_t)pool.len / 4;
    size_t ndeltas = (size_t)deltas.len / 4, nruns = (size_t)runs.len / 24, dp = (size_t)delta_pos;
    for (size_t ri = 0; ri < nruns; ri++) {
        int64_t begin = r[3 * ri], end = r[3 * ri + 1], shift = r[3 * ri + 2];
        if (begin < 0 || begin > end || (uint64_t)end > nrefs) {
            PyErr_SetString(PyExc_ValueError, "correct_group: a run is outside the references");
            goto done;
        }
        for (int64_t k = begin; k < end; k++) {
            if (dp >= ndeltas) {
                PyErr_Format(PyExc_ValueError,
                             "the reference delta stream ends after %zu references, the old element has more",
                             ndeltas);
                goto done;
            }
            uint64_t offset = t[k], projected;
            if (offset < old_size) {
                if (!nmap) {
                    PyErr_SetString(PyExc_ValueError, "correct_group: no equivalences to project through");
                    goto done;
                }
                size_t q = upper(s, nmap, (uint32_t)offset);
                if (q && (q == nmap || offset < e[q - 1] || offset - e[q - 1] < s[q] - offset))
                    q--;
                int64_t v = (int64_t)offset - s[q] + dd[q];
                if (v < 0)
                    v = 0;
                projected = (uint64_t)v < new_size - 1 ? (uint64_t)v : new_size - 1;
            } else {
                uint64_t delta = offset - old_size;
                projected = (int64_t)delta < (int64_t)BOUND - (int64_t)new_size ? new_size + delta : BOUND - 1;
            }
            uint32_t pr = (uint32_t)projected;
            size_t key = lower(p, count, pr);
            if (key && (key == count || p[key] - pr >= pr - p[key - 1]))
                key--;
            int64_t chosen = (int64_t)key + dl[dp];
            if (chosen < 0 || (uint64_t)chosen >= count) {
                PyErr_Format(PyExc_ValueError, "reference delta %zu (%d) points outside the pool's %zu targets", dp,
                             (int)dl[dp], count);
                goto done;
            }
            dp++;
            int64_t loc = (int64_t)l[k] + shift;
            if (loc < 0) {
                PyErr_Format(PyExc_ValueError, "a reference moves to new offset %lld", (long long)loc);
                goto done;
            }
            if (write_ref(kind, b, length, (uint64_t)loc, p[chosen], &u) < 0)
                goto done;
        }
    }
    out = PyLong_FromSize_t(dp);
done:
    if (have_units)
        units_free(&u);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&locs);
    PyBuffer_Release(&targets);
    PyBuffer_Release(&runs);
    PyBuffer_Release(&msrc);
    PyBuffer_Release(&mdst);
    PyBuffer_Release(&mend);
    PyBuffer_Release(&pool);
    PyBuffer_Release(&deltas);
    return out;
}

/* ---- patch streams ---------------------------------------------------------------------- */

/* A whole stream of zucchini varints (u32, at most 5 bytes, bits past 32
 * dropped; signed ones zigzag) -> (packed uint32 values, offset of the first
 * bad varint or -1). */
static PyObject *decode_varints(PyObject *self, PyObject *args) {
    Py_buffer data;
    int is_signed;
    if (!PyArg_ParseTuple(args, "y*p", &data, &is_signed))
        return NULL;
    PyObject *out = NULL;
    vec_t vals = {0};
    const uint8_t *d = data.buf;
    Py_ssize_t pos = 0, bad = -1;
    while (pos < data.len) {
        uint32_t value = 0;
        int shift = 0, done = 0;
        Py_ssize_t at = pos;
        while (pos < data.len) {
            uint8_t byte = d[pos++];
            value |= (uint32_t)(byte & 0x7F) << shift;
            if (byte < 0x80) {
                done = 1;
                break;
            }
            shift += 7;
            if (shift >= 32)
                break;
        }
        if (!done) {
            bad = at;
            break;
        }
        if (is_signed)
            value = (value & 1) ? ~(value >> 1) : value >> 1;
        if (vec_push(&vals, value) < 0)
            goto done;
    }
    {
        PyObject *raw = vec_bytes(&vals);
        if (raw)
            out = Py_BuildValue("Nn", raw, bad);
    }
done:
    free(vals.v);
    PyBuffer_Release(&data);
    return out;
}

/* Raw delta: add diffs[i] to the byte at copy offset offsets[i] of the
 * concatenated copied blocks (eq_dst, eq_len in patch order) of the element
 * at base. Returns -1, or the index of the first delta past the copied bytes. */
static PyObject *apply_raw_delta(PyObject *self, PyObject *args) {
    Py_buffer buf, dst, len, offs, diffs;
    unsigned long long base, length;
    if (!PyArg_ParseTuple(args, "w*KKy*y*y*y*", &buf, &base, &length, &dst, &len, &offs, &diffs))
        return NULL;
    PyObject *out = NULL;
    if (dst.len % 4 || dst.len != len.len || offs.len % 4 || offs.len / 4 != diffs.len ||
        base > (unsigned long long)buf.len || length > (unsigned long long)buf.len - base) {
        PyErr_SetString(PyExc_ValueError, "apply_raw_delta: inconsistent arguments");
        goto done;
    }
    uint8_t *b = (uint8_t *)buf.buf + base;
    const uint32_t *ed = dst.buf, *el = len.buf, *o = offs.buf;
    const uint8_t *df = diffs.buf;
    size_t neq = (size_t)dst.len / 4, n = (size_t)diffs.len, i = 0;
    uint64_t covered = 0;
    Py_ssize_t bad = -1;
    for (size_t k = 0; k < n; k++) {
        while (i < neq && covered + el[i] <= o[k])
            covered += el[i++];
        if (i == neq) {
            bad = (Py_ssize_t)k;
            break;
        }
        uint64_t pos = (uint64_t)ed[i] + o[k] - covered;
        if (pos >= length) {
            PyErr_SetString(PyExc_ValueError, "apply_raw_delta: an equivalence is outside the element");
            goto done;
        }
        b[pos] = (uint8_t)(b[pos] + df[k]);
    }
    out = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&len);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&diffs);
    return out;
}

/* Per equivalence (old start, old end, shift): the slice of the sorted
 * locations in [start, end), as int64 (begin, end, shift) triples. */
static PyObject *block_runs(PyObject *self, PyObject *args) {
    Py_buffer locs, src, end, dst;
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &locs, &src, &end, &dst))
        return NULL;
    PyObject *out = NULL;
    if (locs.len % 4 || src.len % 4 || src.len != end.len || src.len != dst.len) {
        PyErr_SetString(PyExc_ValueError, "block_runs: arrays must be uint32, the equivalences of one length");
        goto done;
    }
    size_t n = (size_t)locs.len / 4, m = (size_t)src.len / 4;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(m * 24));
    if (!out)
        goto done;
    int64_t *r = (int64_t *)PyBytes_AS_STRING(out);
    const uint32_t *l = locs.buf, *s = src.buf, *e = end.buf, *d = dst.buf;
    for (size_t i = 0; i < m; i++) {
        r[3 * i] = (int64_t)lower(l, n, s[i]);
        r[3 * i + 1] = (int64_t)lower(l, n, e[i]);
        r[3 * i + 2] = (int64_t)d[i] - (int64_t)s[i];
    }
done:
    PyBuffer_Release(&locs);
    PyBuffer_Release(&src);
    PyBuffer_Release(&end);
    PyBuffer_Release(&dst);
    return out;
}

static PyMethodDef methods[] = {
    {"block_runs", block_runs, METH_VARARGS, "Slices of sorted locations per equivalence old block."},
    {"apply_raw_delta", apply_raw_delta, METH_VARARGS, "Add the raw delta to the copied bytes of an element."},
    {"decode_varints", decode_varints, METH_VARARGS, "A stream of zucchini varints as packed uint32 values."},
    {"scan_intel", scan_intel, METH_VARARGS, "x86/x86-64 rel32 locations in the gaps (see _zucchini_kernel)."},
    {"scan_arm", scan_arm, METH_VARARGS, "ARM/THUMB2/AArch64 (type, location) pairs in the gaps."},
    {"read_refs", read_refs, METH_VARARGS, "(locations, targets) of the references of a kind."},
    {"project_all", project_all, METH_VARARGS, "Old offsets moved through the pruned equivalences."},
    {"correct_group", correct_group, METH_VARARGS, "Correct one reference type; returns the next delta index."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_zucchini_native",
                                    "Zucchini apply's hot loops in C (see snapshot/_zucchini_kernel.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__zucchini_native(void) { return PyModule_Create(&module); }
