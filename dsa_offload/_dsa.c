/* dmuserd.dsa_offload._dsa: DSA work submission and completion for Python.
 *
 * Types:
 *   Queue     an open work queue: a real /dev/dsa/wqD.Q (MOVDIR64B, ENQCMD,
 *             or write() where mapping the portal is refused) or an
 *             Emulator's portal. submit() builds the descriptor, holds the
 *             Python buffers it names, and writes it to the portal; a poller
 *             thread watches the completion records and signals an eventfd
 *             that trio waits on; reap() hands back what completed.
 *   Op        one submitted descriptor (or batch) and its completion record.
 *   Emulator  the software device (dsa_emu.c).
 *   Inline    the mover's small CPU copies and fills in one C call, with
 *             their counters and checkpoint credit; returns DONE (a Done),
 *             an already-finished awaitable.
 *
 * Why a poller thread: user-space DSA has no interrupt, so something must
 * watch the status bytes; doing it on the trio thread would either stall
 * the loop or add a timer's latency. The poller spins a few microseconds,
 * then UMWAITs (or sleeps with a growing back-off), and blocks on a
 * condition variable when nothing is in flight, so an idle queue costs no
 * CPU. It never touches Python objects: the queue holds a reference to
 * every in-flight Op, whose buffers stay exported (Py_buffer held) until
 * reap() sees the completion, even if the submitting task was cancelled.
 *
 * After fork() the child's first use of a Queue reopens it: new fd, new
 * portal, new eventfd and poller. It never touches the parent's portal;
 * the parent's in-flight operations are abandoned in the child.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <x86intrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#define __rdtsc() 0ull
#endif

#include "dsa_hw.h"

PyObject *dsa_discover(PyObject *self, PyObject *args, PyObject *kw);

#define PORTAL_SIZE 4096
#define RETRIES 64 /* ENQCMD attempts before calling the queue full (write(): the kernel retries) */

enum { KIND_MOVDIR64B, KIND_ENQCMD, KIND_WRITE, KIND_EMULATED };
static const char *kind_names[] = {"movdir64b", "enqcmd", "write", "emulated"};
/* OP_STRANDED: still in flight when its queue was closed or given up on;
 * its buffers stay exported and its record allocated for good (the device
 * may still write them). */
enum { OP_NEW, OP_INFLIGHT, OP_COMPLETE, OP_REAPED, OP_ABANDONED, OP_STRANDED };

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* ---- Emulator --------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    struct dsa_emu *e;
    int opened; /* a dedicated queue admits one opener */
} EmulatorObject;

/* An opcode bitmap from a Python int (None: `dflt`). */
static int bitmap_arg(PyObject *v, uint8_t out[32], const uint8_t *dflt)
{
    if (v == Py_None) {
        memcpy(out, dflt, 32);
        return 0;
    }
    PyObject *b = PyObject_CallMethod(v, "to_bytes", "is", 32, "little");
    if (!b)
        return -1;
    memcpy(out, PyBytes_AS_STRING(b), 32);
    Py_DECREF(b);
    return 0;
}

static int Emulator_init(EmulatorObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mode", "size", "max_transfer", "max_batch", "block_on_fault", "op_cap", "delay_us",
                             "gen_cap", "op_config", "user_submission_safe", "enqcmds_retries", "refuse_delay_us", NULL};
    const char *mode = "dedicated";
    unsigned size = 16, max_batch = 32, delay = 0, retries = 32, refuse_delay = 0;
    unsigned long long max_transfer = 2u << 20;
    unsigned long long gen_cap = DSA_GENCAP_BLOCK_ON_FAULT | DSA_GENCAP_OVERLAP_COPY | DSA_GENCAP_CACHE_CONTROL_MEM |
                                 DSA_GENCAP_CACHE_CONTROL_CACHE;
    int bof = 0, safe = 1;
    PyObject *op_cap = Py_None, *op_config = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|sIKIpOIKOpII:Emulator", kwlist, &mode, &size, &max_transfer,
                                     &max_batch, &bof, &op_cap, &delay, &gen_cap, &op_config, &safe, &retries,
                                     &refuse_delay))
        return -1;
    if (strcmp(mode, "dedicated") && strcmp(mode, "shared")) {
        PyErr_SetString(PyExc_ValueError, "mode must be 'dedicated' or 'shared'");
        return -1;
    }
    if (size == 0 || max_transfer == 0 || max_transfer > 0xffffffffull) {
        PyErr_SetString(PyExc_ValueError, "size and max_transfer must be positive (max_transfer < 4 GiB)");
        return -1;
    }
    struct dsa_emu_config cfg = {.size = size, .shared = mode[0] == 's', .block_on_fault = bof,
                                 .max_transfer = (uint32_t)max_transfer, .max_batch = max_batch, .gen_cap = gen_cap,
                                 .user_submission_safe = safe, .enqcmds_retries = retries,
                                 .refuse_delay_us = refuse_delay};
    uint8_t every_op[32] = {0}, all[32];
    unsigned ops[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x10, 0x11, 0x20};
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++)
        every_op[ops[i] / 8] |= 1u << (ops[i] % 8);
    memset(all, 0xff, sizeof all);
    if (bitmap_arg(op_cap, cfg.op_cap, every_op) < 0 || bitmap_arg(op_config, cfg.op_config, all) < 0)
        return -1;
    if (self->e)
        dsa_emu_destroy(self->e);
    self->e = dsa_emu_create(&cfg);
    if (!self->e) {
        PyErr_SetString(PyExc_OSError, "cannot start the emulated device");
        return -1;
    }
    dsa_emu_set_delay(self->e, delay);
    return 0;
}

static void Emulator_dealloc(EmulatorObject *self)
{
    Py_BEGIN_ALLOW_THREADS /* joins the device thread */
    dsa_emu_destroy(self->e);
    Py_END_ALLOW_THREADS
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Emulator_set_fault(EmulatorObject *self, PyObject *args, PyObject *kw)
{
    dsa_emu_after_fork(self->e); /* a forked child gets its own device (and lock) */
    static char *kwlist[] = {"addr", "length", "sticky", NULL};
    unsigned long long addr, len;
    int sticky = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KK|p:set_fault", kwlist, &addr, &len, &sticky))
        return NULL;
    dsa_emu_set_fault(self->e, addr, len, sticky);
    Py_RETURN_NONE;
}

static PyObject *Emulator_clear_faults(EmulatorObject *self, PyObject *unused)
{
    dsa_emu_after_fork(self->e); /* a forked child gets its own device (and lock) */
    dsa_emu_clear_faults(self->e);
    Py_RETURN_NONE;
}

static PyObject *Emulator_touch(EmulatorObject *self, PyObject *arg)
{
    dsa_emu_after_fork(self->e); /* a forked child gets its own device (and lock) */
    unsigned long long addr = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    dsa_emu_touch(self->e, addr);
    Py_RETURN_NONE;
}

static PyObject *Emulator_fault_next_records(EmulatorObject *self, PyObject *arg)
{
    dsa_emu_after_fork(self->e); /* a forked child gets its own device (and lock) */
    long n = PyLong_AsLong(arg);
    if (n < 0 && PyErr_Occurred())
        return NULL;
    dsa_emu_fault_next_records(self->e, (unsigned)n);
    Py_RETURN_NONE;
}

static PyObject *Emulator_fault_batch_list(EmulatorObject *self, PyObject *arg)
{
    dsa_emu_after_fork(self->e);
    long n = PyLong_AsLong(arg);
    if (n < 0 && PyErr_Occurred())
        return NULL;
    dsa_emu_fault_batch_list(self->e, (unsigned)n);
    Py_RETURN_NONE;
}

static PyObject *Emulator_hang_next(EmulatorObject *self, PyObject *arg)
{
    dsa_emu_after_fork(self->e);
    long n = PyLong_AsLong(arg);
    if (n < 0 && PyErr_Occurred())
        return NULL;
    dsa_emu_hang_next(self->e, (unsigned)n);
    Py_RETURN_NONE;
}

static PyObject *Emulator_release_hung(EmulatorObject *self, PyObject *unused)
{
    dsa_emu_after_fork(self->e);
    unsigned n;
    Py_BEGIN_ALLOW_THREADS
    n = dsa_emu_release_hung(self->e);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(n);
}

static PyObject *Emulator_raise_swerr(EmulatorObject *self, PyObject *unused)
{
    dsa_emu_after_fork(self->e);
    dsa_emu_set_swerr(self->e, 1);
    Py_RETURN_NONE;
}

static PyObject *Emulator_execute(EmulatorObject *self, PyObject *arg)
{
    dsa_emu_after_fork(self->e); /* a forked child gets its own device (and lock) */
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (b.len != 64) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "a descriptor is 64 bytes");
        return NULL;
    }
    struct dsa_desc d;
    memcpy(&d, b.buf, 64);
    PyBuffer_Release(&b);
    /* Test hook: runs in the caller's thread on whatever the descriptor
     * names; the caller keeps those buffers alive. */
    Py_BEGIN_ALLOW_THREADS
    dsa_emu_execute(self->e, &d);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Emulator_stats(EmulatorObject *self, PyObject *unused)
{
    dsa_emu_after_fork(self->e); /* a forked child gets its own device (and lock) */
    struct dsa_emu_stats s;
    dsa_emu_stats(self->e, &s);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsKsI}", "descriptors", s.descriptors, "batches", s.batches,
                         "members", s.members, "overflows", s.overflows, "retries", s.retries, "faults", s.faults,
                         "cr_faults", s.cr_faults, "blocked", s.blocked, "max_occupancy", s.max_occupancy, "writes",
                         s.writes, "write_errors", s.write_errors, "hung", s.hung, "bytes", s.bytes, "occupancy",
                         s.occupancy);
}

static PyObject *Emulator_get_delay(EmulatorObject *self, void *c) { return PyLong_FromUnsignedLong(dsa_emu_delay(self->e)); }
static int Emulator_set_delay(EmulatorObject *self, PyObject *v, void *c)
{
    unsigned long d = v ? PyLong_AsUnsignedLong(v) : 0;
    if (PyErr_Occurred())
        return -1;
    dsa_emu_set_delay(self->e, (unsigned)d);
    return 0;
}
static PyObject *Emulator_get_mode(EmulatorObject *self, void *c)
{
    return PyUnicode_FromString(dsa_emu_config(self->e)->shared ? "shared" : "dedicated");
}
static PyObject *Emulator_get_size(EmulatorObject *self, void *c) { return PyLong_FromUnsignedLong(dsa_emu_config(self->e)->size); }
static PyObject *Emulator_get_max_transfer(EmulatorObject *self, void *c)
{
    return PyLong_FromUnsignedLong(dsa_emu_config(self->e)->max_transfer);
}
static PyObject *Emulator_get_max_batch(EmulatorObject *self, void *c)
{
    return PyLong_FromUnsignedLong(dsa_emu_config(self->e)->max_batch);
}
static PyObject *Emulator_get_bof(EmulatorObject *self, void *c) { return PyBool_FromLong(dsa_emu_config(self->e)->block_on_fault); }
static PyObject *Emulator_get_gen_cap(EmulatorObject *self, void *c)
{
    return PyLong_FromUnsignedLongLong(dsa_emu_config(self->e)->gen_cap);
}
static PyObject *bitmap_int(const uint8_t map[32])
{
    return _PyLong_FromByteArray(map, 32, 1 /* little endian */, 0);
}
/* op_cap as sysfs shows it: the kernel hides BATCH where user submission is not safe. */
static PyObject *Emulator_get_op_cap(EmulatorObject *self, void *c)
{
    const struct dsa_emu_config *cfg = dsa_emu_config(self->e);
    uint8_t map[32];
    memcpy(map, cfg->op_cap, 32);
    if (!cfg->user_submission_safe)
        map[DSA_OP_BATCH / 8] &= ~(1u << (DSA_OP_BATCH % 8));
    return bitmap_int(map);
}
static PyObject *Emulator_get_op_config(EmulatorObject *self, void *c) { return bitmap_int(dsa_emu_config(self->e)->op_config); }
static PyObject *Emulator_get_safe(EmulatorObject *self, void *c)
{
    return PyBool_FromLong(dsa_emu_config(self->e)->user_submission_safe);
}

static PyMethodDef Emulator_methods[] = {
    {"set_fault", (PyCFunction)(void (*)(void))Emulator_set_fault, METH_VARARGS | METH_KEYWORDS,
     "set_fault(addr, length, sticky=False): declare the pages of a range non-present (sticky: never resolvable)"},
    {"clear_faults", (PyCFunction)Emulator_clear_faults, METH_NOARGS, "make every page present again"},
    {"touch", (PyCFunction)Emulator_touch, METH_O, "touch(addr): the OS brings that page in"},
    {"fault_next_records", (PyCFunction)Emulator_fault_next_records, METH_O,
     "fault_next_records(n): the next n completion records land on a non-present page"},
    {"fault_batch_list", (PyCFunction)Emulator_fault_batch_list, METH_O,
     "fault_batch_list(k): the next batch finds the page of its member k (and the rest of its list) not present"},
    {"hang_next", (PyCFunction)Emulator_hang_next, METH_O,
     "hang_next(n): the next n descriptors are accepted and never complete (until release_hung)"},
    {"release_hung", (PyCFunction)Emulator_release_hung, METH_NOARGS,
     "execute the hung descriptors now (a late completion); returns how many"},
    {"raise_swerr", (PyCFunction)Emulator_raise_swerr, METH_NOARGS,
     "the device logs a software error: poll() on the queue reports it from now on"},
    {"execute", (PyCFunction)Emulator_execute, METH_O,
     "execute(desc): run one 64-byte descriptor now, in this thread (test hook)"},
    {"stats", (PyCFunction)Emulator_stats, METH_NOARGS, "counters: descriptors, overflows, retries, faults..."},
    {NULL}};

static PyGetSetDef Emulator_getset[] = {
    {"delay_us", (getter)Emulator_get_delay, (setter)Emulator_set_delay, "per-descriptor delay (slow device)", NULL},
    {"mode", (getter)Emulator_get_mode, NULL, NULL, NULL},
    {"size", (getter)Emulator_get_size, NULL, NULL, NULL},
    {"max_transfer", (getter)Emulator_get_max_transfer, NULL, NULL, NULL},
    {"max_batch", (getter)Emulator_get_max_batch, NULL, NULL, NULL},
    {"block_on_fault", (getter)Emulator_get_bof, NULL, "the queue is configured with block-on-fault enabled", NULL},
    {"gen_cap", (getter)Emulator_get_gen_cap, NULL, "GENCAP, as sysfs dsaN/gen_cap shows it", NULL},
    {"op_cap", (getter)Emulator_get_op_cap, NULL, "supported opcodes as sysfs dsaN/op_cap shows them", NULL},
    {"op_config", (getter)Emulator_get_op_config, NULL, "opcodes the queue accepts (sysfs wqN.M/op_config)", NULL},
    {"user_submission_safe", (getter)Emulator_get_safe, NULL, "False: write() refuses BATCH (INTEL-SA-01084)", NULL},
    {NULL}};

static PyTypeObject EmulatorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmuserd.dsa_offload._dsa.Emulator",
    .tp_basicsize = sizeof(EmulatorObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Emulator(mode='dedicated', size=16, max_transfer=2 MiB, max_batch=32, block_on_fault=False, "
              "op_cap=None, delay_us=0, gen_cap=BOF|overlap|cache control, op_config=None, "
              "user_submission_safe=True, enqcmds_retries=32, refuse_delay_us=0): a software DSA work queue",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Emulator_init,
    .tp_dealloc = (destructor)Emulator_dealloc,
    .tp_methods = Emulator_methods,
    .tp_getset = Emulator_getset,
};

/* ---- Op --------------------------------------------------------------- */

typedef struct OpObject {
    PyObject_HEAD
    struct OpObject *next;     /* in the queue's in-flight or done list */
    struct dsa_rec *rec;       /* 32-byte aligned, owned */
    struct dsa_desc *members;  /* batch: 64-byte aligned member list */
    struct dsa_rec *member_recs;
    unsigned nmembers;
    Py_buffer *views;          /* held until the completion is reaped */
    unsigned nviews, cap_views;
    int state;
    int orphan;                /* nobody waits for it: the poller releases its buffers on completion */
    unsigned opcode;
    uint64_t submitted_ns, completed_ns;
} OpObject;

static void op_release(OpObject *op)
{
    for (unsigned i = 0; i < op->nviews; i++)
        PyBuffer_Release(&op->views[i]);
    op->nviews = 0;
}

static void Op_dealloc(OpObject *op)
{
    op_release(op);
    PyMem_Free(op->views);
    free(op->rec);
    free(op->members);
    free(op->member_recs);
    Py_TYPE(op)->tp_free((PyObject *)op);
}

static PyObject *rec_tuple(const struct dsa_rec *r)
{
    return Py_BuildValue("{sBsBsBsIsKsI}", "status", r->status, "result", r->result, "fault_info", r->fault_info,
                         "bytes_completed", r->bytes_completed, "fault_addr", (unsigned long long)r->fault_addr,
                         "op_specific", r->op_specific);
}

#define REC_GETTER(name, expr)                                                                 \
    static PyObject *Op_get_##name(OpObject *op, void *c)                                      \
    {                                                                                          \
        const struct dsa_rec *r = op->rec;                                                     \
        return expr;                                                                           \
    }
REC_GETTER(status, PyLong_FromLong(__atomic_load_n(&r->status, __ATOMIC_ACQUIRE)))
REC_GETTER(result, PyLong_FromLong(r->result))
REC_GETTER(fault_info, PyLong_FromLong(r->fault_info))
REC_GETTER(bytes_completed, PyLong_FromUnsignedLong(r->bytes_completed))
REC_GETTER(fault_addr, PyLong_FromUnsignedLongLong(r->fault_addr))
REC_GETTER(op_specific, PyLong_FromUnsignedLong(r->op_specific))
REC_GETTER(record, PyBytes_FromStringAndSize((const char *)r, sizeof *r))
REC_GETTER(record_address, PyLong_FromUnsignedLongLong((uintptr_t)r))

static PyObject *Op_get_done(OpObject *op, void *c) { return PyBool_FromLong(op->state >= OP_REAPED); }
static PyObject *Op_get_abandoned(OpObject *op, void *c) { return PyBool_FromLong(op->state == OP_ABANDONED); }
static PyObject *Op_get_stranded(OpObject *op, void *c) { return PyBool_FromLong(op->state == OP_STRANDED); }
static PyObject *Op_get_holds_buffers(OpObject *op, void *c) { return PyBool_FromLong(op->nviews > 0); }
static PyObject *Op_get_opcode(OpObject *op, void *c) { return PyLong_FromUnsignedLong(op->opcode); }
static PyObject *Op_get_latency_ns(OpObject *op, void *c)
{
    return PyLong_FromUnsignedLongLong(op->completed_ns ? op->completed_ns - op->submitted_ns : 0);
}
static PyObject *Op_get_members(OpObject *op, void *c)
{
    PyObject *l = PyList_New(op->nmembers);
    for (unsigned i = 0; l && i < op->nmembers; i++) {
        PyObject *t = rec_tuple(&op->member_recs[i]);
        if (!t) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, i, t);
    }
    return l;
}

static PyGetSetDef Op_getset[] = {
    {"status", (getter)Op_get_status, NULL, "completion status byte (0 while pending)", NULL},
    {"result", (getter)Op_get_result, NULL, NULL, NULL},
    {"fault_info", (getter)Op_get_fault_info, NULL, NULL, NULL},
    {"bytes_completed", (getter)Op_get_bytes_completed, NULL, "bytes done (descriptors for a batch)", NULL},
    {"fault_addr", (getter)Op_get_fault_addr, NULL, NULL, NULL},
    {"op_specific", (getter)Op_get_op_specific, NULL, "CRC value, delta record size or invalid flags", NULL},
    {"record", (getter)Op_get_record, NULL, "the raw 32-byte completion record", NULL},
    {"record_address", (getter)Op_get_record_address, NULL, NULL, NULL},
    {"done", (getter)Op_get_done, NULL, "completion seen and reaped; buffers released", NULL},
    {"abandoned", (getter)Op_get_abandoned, NULL, "inherited across fork; never completes here", NULL},
    {"stranded", (getter)Op_get_stranded, NULL, "in flight when the queue was closed: buffers stay pinned", NULL},
    {"holds_buffers", (getter)Op_get_holds_buffers, NULL, "the Python buffers are still exported", NULL},
    {"opcode", (getter)Op_get_opcode, NULL, NULL, NULL},
    {"latency_ns", (getter)Op_get_latency_ns, NULL, "submission to completion seen by the poller", NULL},
    {"members", (getter)Op_get_members, NULL, "a batch's member records, as dicts", NULL},
    {NULL}};

static PyTypeObject OpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmuserd.dsa_offload._dsa.Op",
    .tp_basicsize = sizeof(OpObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "one submitted descriptor and its completion record",
    .tp_dealloc = (destructor)Op_dealloc,
    .tp_getset = Op_getset,
};

static OpObject *op_new(unsigned opcode, unsigned nmembers)
{
    OpObject *op = PyObject_New(OpObject, &OpType);
    if (!op)
        return NULL;
    op->next = NULL;
    op->rec = aligned_alloc(32, sizeof(struct dsa_rec));
    op->members = nmembers ? aligned_alloc(64, nmembers * sizeof(struct dsa_desc)) : NULL;
    op->member_recs = nmembers ? aligned_alloc(32, nmembers * sizeof(struct dsa_rec)) : NULL;
    op->nmembers = nmembers;
    op->views = NULL;
    op->nviews = op->cap_views = 0;
    op->state = OP_NEW;
    op->orphan = 0;
    op->opcode = opcode;
    op->submitted_ns = op->completed_ns = 0;
    if (!op->rec || (nmembers && (!op->members || !op->member_recs))) {
        Py_DECREF(op);
        PyErr_NoMemory();
        return NULL;
    }
    memset(op->rec, 0, sizeof *op->rec);
    if (nmembers)
        memset(op->member_recs, 0, nmembers * sizeof *op->member_recs);
    return op;
}

/* Export `obj`'s buffer for the device and keep it until reaped. */
static int op_hold(OpObject *op, PyObject *obj, int writable, Py_ssize_t need, const char *what, uint64_t *addr)
{
    if (op->nviews == op->cap_views) {
        unsigned cap = op->cap_views ? op->cap_views * 2 : 4;
        Py_buffer *v = PyMem_Realloc(op->views, cap * sizeof *v);
        if (!v) {
            PyErr_NoMemory();
            return -1;
        }
        op->views = v;
        op->cap_views = cap;
    }
    Py_buffer *b = &op->views[op->nviews];
    if (PyObject_GetBuffer(obj, b, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    op->nviews++;
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s buffer has %zd bytes; the operation needs %zd", what, b->len, need);
        return -1;
    }
    *addr = (uintptr_t)b->buf;
    return 0;
}

/* Parse one operation's keywords into descriptor fields, holding the
 * buffers it names; sizes are checked against the buffers so the device
 * can never be pointed outside them. */
static int parse_op(OpObject *op, unsigned opcode, PyObject *kw, struct dsa_fields *f)
{
    static char *kwlist[] = {"flags", "src", "src2", "dst", "dst2", "size", "pattern", "expected_res",
                             "crc_seed", "seed", "delta", "max_delta", "delta_size", NULL};
    PyObject *empty = PyTuple_New(0);
    PyObject *src = NULL, *src2 = NULL, *dst = NULL, *dst2 = NULL, *seed = NULL, *delta = NULL;
    unsigned int flags = 0, crc_seed = 0, max_delta = 0, delta_size = 0;
    unsigned long long pattern = 0;
    Py_ssize_t size = 0;
    unsigned char expected = 0;
    int ok = empty && PyArg_ParseTupleAndKeywords(empty, kw, "|IOOOOnKbIOOII:submit", kwlist, &flags, &src, &src2,
                                                  &dst, &dst2, &size, &pattern, &expected, &crc_seed, &seed, &delta,
                                                  &max_delta, &delta_size);
    Py_XDECREF(empty);
    if (!ok)
        return -1;
    if (size < 0 || size > 0xffffffffll) {
        PyErr_SetString(PyExc_ValueError, "size out of range");
        return -1;
    }
    memset(f, 0, sizeof *f);
    f->opcode = opcode;
    f->flags = flags;
    f->size = (uint32_t)size;
    f->pattern = pattern;
    f->expected_res = expected;
    f->crc_seed = crc_seed;
    f->max_delta = max_delta;
    f->delta_size = delta_size;
    int apply = opcode == DSA_OP_APPLY_DELTA;
    if (src && src != Py_None && op_hold(op, src, 0, size, "src", &f->src) < 0)
        return -1;
    if (src2 && src2 != Py_None && op_hold(op, src2, 0, size, "src2", &f->src2) < 0)
        return -1;
    if (dst && dst != Py_None && op_hold(op, dst, 1, size, "dst", &f->dst) < 0)
        return -1;
    if (dst2 && dst2 != Py_None && op_hold(op, dst2, 1, size, "dst2", &f->dst2) < 0)
        return -1;
    if (seed && seed != Py_None) {
        if (op_hold(op, seed, 0, 4, "seed", &f->seed_addr) < 0)
            return -1;
        f->flags |= DSA_FLAG_CRC_SEED_ADDR;
    }
    if (delta && delta != Py_None &&
        op_hold(op, delta, !apply, apply ? delta_size : max_delta, "delta", &f->delta_addr) < 0)
        return -1;
    /* Every buffer the opcode reads or writes must have been given. */
    int need_src = opcode == DSA_OP_MEMMOVE || opcode == DSA_OP_COMPARE || opcode == DSA_OP_COMPARE_PATTERN ||
                   opcode == DSA_OP_CREATE_DELTA || opcode == DSA_OP_DUALCAST || opcode == DSA_OP_CRCGEN ||
                   opcode == DSA_OP_COPY_CRC;
    int need_dst = opcode == DSA_OP_MEMMOVE || opcode == DSA_OP_MEMFILL || opcode == DSA_OP_APPLY_DELTA ||
                   opcode == DSA_OP_DUALCAST || opcode == DSA_OP_COPY_CRC || opcode == DSA_OP_CACHE_FLUSH;
    int need_src2 = opcode == DSA_OP_COMPARE || opcode == DSA_OP_CREATE_DELTA;
    if ((need_src && !f->src) || (need_dst && !f->dst) || (need_src2 && !f->src2) ||
        (opcode == DSA_OP_DUALCAST && !f->dst2) ||
        ((opcode == DSA_OP_CREATE_DELTA || apply) && !f->delta_addr)) {
        PyErr_Format(PyExc_ValueError, "opcode %#x is missing a buffer it needs", opcode);
        return -1;
    }
    /* Queue submissions always ask for a record: it is how we see completion. */
    f->flags |= DSA_FLAG_CRAV | DSA_FLAG_RCR;
    return 0;
}

/* ---- Queue ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;            /* poller: work arrived / stop */
    OpObject *inflight, *done;    /* singly linked, newest first */
    unsigned in_flight, size;
    int efd;
    pthread_t poller;
    int poller_running, stop, closed;
    int kind, shared, fd;
    uint8_t *portal;
    unsigned slot;
    char *path;
    EmulatorObject *emu;
    pid_t pid;
    unsigned long generation;
    unsigned long long submitted, retries, full;
    uint32_t max_transfer, max_batch;
    int waitpkg;
    int swerr;                    /* the device reported a software error (poller or check_device_error) */
    int abandon;                  /* close: stop watching what is still in flight */
    unsigned long stranded;       /* operations left in flight at close, pinned for good */
    unsigned long long refused;   /* submissions the device did not take */
    int soft_watch;               /* test knob: watch records by reading them (as UMWAIT does) without WAITPKG */
    int reopen_errno;             /* a forked child's reopen failed with this */
    OpObject *orphans;            /* completed ops nobody waits for: the poller releases their buffers */
    char portal_note[160];
} QueueObject;

/* Whether the device reports a software error now. The kernel's poll() on
 * the WQ character device answers POLLIN once the device has logged one
 * (SWERR; drivers/dma/idxd/cdev.c, idxd_cdev_poll); the emulator keeps the
 * same flag (Emulator.raise_swerr). Descriptors in flight may then never
 * complete. */
static int device_error_now(QueueObject *q)
{
    if (q->emu)
        return dsa_emu_swerr(q->emu->e);
    if (q->fd < 0)
        return 0;
    struct pollfd p = {.fd = q->fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
}

static void backoff(QueueObject *q, volatile uint8_t *watch, uint64_t idle_since, unsigned *sleeps)
{
    uint64_t idle = now_ns() - idle_since;
    if (idle < 5000) { /* a few microseconds of spinning catch short ops */
        for (int i = 0; i < 32; i++)
            cpu_relax();
        return;
    }
    if (q->waitpkg) { /* UMWAIT wakes on the record's cache line */
        dsa_umwait_until(watch, __rdtsc() + 100000);
        return;
    }
    if (q->soft_watch) { /* what UMONITOR/UMWAIT do, by reading: ~100 us watching the record */
        for (int i = 0; i < 10 && !*watch; i++) {
            struct timespec ts = {0, 10000};
            nanosleep(&ts, NULL);
        }
        return;
    }
    unsigned us = 2u << (*sleeps < 6 ? *sleeps : 6); /* 2, 4, ... 128 µs */
    (*sleeps)++;
    struct timespec ts = {0, (long)us * 1000};
    nanosleep(&ts, NULL);
}

/* Release the buffers of completed ops whose waiters gave up (poller
 * thread, GIL taken). Not during interpreter shutdown: the process is going. */
static void release_orphans(OpObject *ops)
{
#if PY_VERSION_HEX >= 0x030D0000
    if (Py_IsFinalizing())
#else
    if (_Py_IsFinalizing())
#endif
        return;
    PyGILState_STATE g = PyGILState_Ensure();
    for (OpObject *op = ops; op; op = op->next)
        op_release(op);
    PyGILState_Release(g);
}

static void *poller_main(void *arg)
{
    QueueObject *q = arg;
    prctl(PR_SET_TIMERSLACK, 1000UL); /* back-off sleeps are microseconds */
    uint64_t idle_since = now_ns(), checked = 0;
    unsigned sleeps = 0;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        while (!q->stop && !q->inflight) {
            pthread_cond_wait(&q->cv, &q->mu);
            idle_since = now_ns();
            sleeps = 0;
        }
        if (!q->inflight || q->abandon)
            break; /* stop, and nothing left to watch (or told to leave it) */
        int moved = 0;
        uint64_t t = now_ns();
        OpObject *orphans = NULL;
        for (OpObject **pp = &q->inflight; *pp;) {
            OpObject *op = *pp;
            if (__atomic_load_n(&op->rec->status, __ATOMIC_ACQUIRE)) {
                *pp = op->next;
                op->state = OP_COMPLETE;
                op->completed_ns = t;
                if (op->orphan) { /* its waiter was cancelled: release its buffers now, not at some later reap */
                    op->next = orphans;
                    orphans = op;
                } else {
                    op->next = q->done;
                    q->done = op;
                }
                q->in_flight--;
                moved++;
            } else {
                pp = &op->next;
            }
        }
        if (orphans) {
            /* Only this thread holds these ops now (off every list), so they
             * stay alive while it takes the GIL to release their buffers;
             * then they join the done list for reap to drop. */
            pthread_mutex_unlock(&q->mu);
            release_orphans(orphans);
            pthread_mutex_lock(&q->mu);
            while (orphans) {
                OpObject *next = orphans->next;
                orphans->next = q->done;
                q->done = orphans;
                orphans = next;
            }
        }
        /* While work is in flight, look for a device error once a millisecond. */
        int error = 0;
        if (!moved && !__atomic_load_n(&q->swerr, __ATOMIC_RELAXED) && t - checked > 1000000) {
            checked = t;
            if (device_error_now(q)) {
                __atomic_store_n(&q->swerr, 1, __ATOMIC_RELEASE);
                error = 1;
            }
        }
        if (moved || error) {
            uint64_t one = 1;
            ssize_t w = write(q->efd, &one, sizeof one); /* wakes trio */
            (void)w;
            idle_since = now_ns();
            sleeps = 0;
            continue;
        }
        volatile uint8_t *watch = q->inflight ? &q->inflight->rec->status : NULL;
        pthread_mutex_unlock(&q->mu);
        /* Safe without the lock: only this thread unlinks in-flight ops,
         * and an op is freed only after it is reaped. */
        if (watch)
            backoff(q, watch, idle_since, &sleeps);
        pthread_mutex_lock(&q->mu);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

static int open_portal(QueueObject *q, int force_write)
{
    const struct dsa_cpu *cpu = dsa_cpu_features();
    if (q->emu) { /* write(): through the emulator's model of the kernel's cdev */
        if (!dsa_emu_config(q->emu->e)->shared && q->emu->opened) {
            errno = EBUSY; /* a dedicated queue admits one opener (a forked child: its parent holds it) */
            return -1;
        }
        q->emu->opened++;
        q->kind = force_write ? KIND_WRITE : KIND_EMULATED;
        if (force_write)
            snprintf(q->portal_note, sizeof q->portal_note, "emulated write() (the kernel's cdev checks modelled)");
        return 0;
    }
    q->fd = open(q->path, O_RDWR | O_CLOEXEC);
    if (q->fd < 0)
        return -1;
    q->portal = NULL;
    int have_insn = q->shared ? cpu->enqcmd : cpu->movdir64b;
    if (!force_write && have_insn) {
        void *p = mmap(NULL, PORTAL_SIZE, PROT_WRITE, MAP_SHARED | MAP_POPULATE, q->fd, 0);
        if (p != MAP_FAILED)
            q->portal = p;
        else
            snprintf(q->portal_note, sizeof q->portal_note, "mmap of the portal refused (%s); using write()",
                     strerror(errno));
    } else if (!have_insn) {
        snprintf(q->portal_note, sizeof q->portal_note, "CPU lacks %s; using write()",
                 q->shared ? "ENQCMD" : "MOVDIR64B");
    }
    q->kind = q->portal ? (q->shared ? KIND_ENQCMD : KIND_MOVDIR64B) : KIND_WRITE;
    return 0;
}

static int start_poller(QueueObject *q)
{
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0)
        return -1;
    q->stop = 0;
    int rc = pthread_create(&q->poller, NULL, poller_main, q);
    if (rc) {
        errno = rc;
        return -1;
    }
    q->poller_running = 1;
    return 0;
}

static void abandon_list(OpObject *op)
{
    while (op) {
        OpObject *next = op->next;
        op->next = NULL;
        op->state = OP_ABANDONED;
        op_release(op);
        Py_DECREF(op);
        op = next;
    }
}

/* In a forked child: forget the parent's threads, portal and operations,
 * and open the queue afresh. */
static int ensure_process(QueueObject *q)
{
    if (q->pid == getpid())
        return 0;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    abandon_list(q->inflight);
    abandon_list(q->done);
    q->inflight = q->done = NULL;
    q->in_flight = 0;
    q->poller_running = 0;
    if (q->efd >= 0)
        close(q->efd);
    q->efd = -1;
    if (q->fd >= 0)
        close(q->fd); /* the child may not use the parent's fd (EPERM) */
    q->fd = -1;
    q->portal = NULL; /* not inherited (VM_DONTCOPY); never unmap: the range may be reused */
    q->pid = getpid();
    q->generation++;
    if (q->emu)
        dsa_emu_after_fork(q->emu->e);
    if (open_portal(q, q->kind == KIND_WRITE) < 0 || start_poller(q) < 0) {
        q->closed = 1;
        q->reopen_errno = errno ? errno : EIO;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, q->path ? q->path : "emulated queue");
        return -1;
    }
    return 0;
}

static int Queue_init(QueueObject *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", "emulator", "mode", "size", "max_transfer", "max_batch", "portal", "soft_watch",
                             NULL};
    const char *path = NULL, *mode = "dedicated", *portal = "auto";
    PyObject *emu = Py_None;
    unsigned size = 0, max_batch = 32;
    unsigned long long max_transfer = 2u << 20;
    int soft_watch = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|zOsIKIsp:Queue", kwlist, &path, &emu, &mode, &size, &max_transfer,
                                     &max_batch, &portal, &soft_watch))
        return -1;
    q->efd = q->fd = -1;
    q->pid = getpid();
    q->waitpkg = dsa_cpu_features()->waitpkg;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    if (emu != Py_None) {
        if (!PyObject_TypeCheck(emu, &EmulatorType)) {
            PyErr_SetString(PyExc_TypeError, "emulator must be an Emulator");
            return -1;
        }
        EmulatorObject *e = (EmulatorObject *)emu;
        const struct dsa_emu_config *cfg = dsa_emu_config(e->e);
        q->emu = (EmulatorObject *)Py_NewRef(emu); /* open_portal refuses a second opener of a dedicated queue */
        q->shared = cfg->shared;
        /* size= may claim more than the emulator has: how tests prove the
         * emulator catches a dedicated queue being overrun. */
        q->size = size ? size : cfg->size;
        q->max_transfer = cfg->max_transfer;
        q->max_batch = cfg->max_batch;
    } else {
        if (!path || size == 0) {
            PyErr_SetString(PyExc_ValueError, "a hardware queue needs path= and size=");
            return -1;
        }
        q->path = strdup(path);
        q->shared = strcmp(mode, "shared") == 0;
        q->size = size;
        q->max_transfer = (uint32_t)max_transfer;
        q->max_batch = max_batch;
    }
    q->soft_watch = soft_watch;
    if (open_portal(q, strcmp(portal, "write") == 0) < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path ? path : "emulated dedicated queue");
        Py_CLEAR(q->emu); /* not opened: close() must not count it out */
        return -1;
    }
    if (start_poller(q) < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path ? path : "emulated queue");
        return -1;
    }
    return 0;
}

/* Hand an Op to the device: reserve a slot (never more than `size` in
 * flight), write the portal, and only once the device took it publish it to
 * the poller. Publishing after acceptance matters: the poller watches (with
 * UMWAIT, reads) the record of an op on its list without the lock, so an op
 * that was refused and freed must never have been on it. The portal write
 * of write() and ENQCMD runs without the GIL: write() is a system call in
 * which the kernel itself retries a full shared queue (enqcmds_retries), so
 * it is tried once here; ENQCMD is retried RETRIES times. Returns 1 when the queue is full, -1 on
 * error with an exception set. */
static int queue_submit(QueueObject *q, OpObject *op, const struct dsa_desc *d)
{
    pthread_mutex_lock(&q->mu);
    if (q->in_flight >= q->size) {
        q->full++;
        pthread_mutex_unlock(&q->mu);
        return 1;
    }
    q->in_flight++;
    pthread_mutex_unlock(&q->mu);
    op->submitted_ns = now_ns();

    int rc = 1, err = 0;
    unsigned long long retries = 0;
    int attempts = q->kind == KIND_WRITE ? 1 : RETRIES;
    /* write() and ENQCMD retries can take a while: not with the GIL held.
     * MOVDIR64B and the emulator's portal are a store and a lock. */
    PyThreadState *released = q->kind == KIND_WRITE || q->kind == KIND_ENQCMD ? PyEval_SaveThread() : NULL;
    for (int tries = 0; tries < attempts; tries++) {
        uint8_t *slot = q->portal ? q->portal + (q->slot++ % (PORTAL_SIZE / 64)) * 64 : NULL;
        switch (q->kind) {
        case KIND_EMULATED:
            rc = dsa_emu_portal_write(q->emu->e, d);
            break;
        case KIND_MOVDIR64B:
            dsa_movdir64b(slot, d); /* posted: the in-flight count is the only guard */
            rc = 0;
            break;
        case KIND_ENQCMD:
            rc = dsa_enqcmd(slot, d);
            break;
        case KIND_WRITE: {
            if (q->emu)
                err = dsa_emu_cdev_write(q->emu->e, d);
            else
                err = write(q->fd, d, sizeof *d) == (ssize_t)sizeof *d ? 0 : errno;
            rc = err == 0 ? 0 : (err == EAGAIN || err == EBUSY || err == ENOSPC) ? 1 : -1;
            break;
        }
        }
        if (rc != 1)
            break;
        retries++;
        cpu_relax();
    }
    if (released)
        PyEval_RestoreThread(released);
    q->retries += retries;
    pthread_mutex_lock(&q->mu);
    if (rc == 0) { /* accepted: the queue's reference keeps the buffers until reaped */
        Py_INCREF(op);
        op->state = OP_INFLIGHT;
        op->next = q->inflight;
        q->inflight = op;
        pthread_cond_signal(&q->cv);
        q->submitted++;
    } else { /* not accepted: give the slot back (the device never saw it) */
        q->in_flight--;
        q->full += rc == 1;
        q->refused++;
    }
    pthread_mutex_unlock(&q->mu);
    if (rc < 0) {
        errno = err;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, q->path ? q->path : "emulated queue (write)");
    }
    return rc;
}

static int queue_usable(QueueObject *q)
{
    if (q->closed && q->reopen_errno) { /* this child could not reopen it: say why, again */
        errno = q->reopen_errno;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, q->path ? q->path : "emulated queue");
        return -1;
    }
    if (q->closed) {
        PyErr_SetString(PyExc_ValueError, "queue is closed");
        return -1;
    }
    return ensure_process(q);
}

static PyObject *finish_submit(QueueObject *q, OpObject *op, const struct dsa_desc *d)
{
    int rc = queue_submit(q, op, d);
    if (rc != 0) {
        op_release(op);
        Py_DECREF(op);
        if (rc < 0)
            return NULL;
        Py_RETURN_NONE; /* full: the caller decides (CPU fallback) */
    }
    return (PyObject *)op;
}

static PyObject *Queue_submit(QueueObject *q, PyObject *args, PyObject *kw)
{
    unsigned opcode;
    if (!PyArg_ParseTuple(args, "I:submit", &opcode) || queue_usable(q) < 0)
        return NULL;
    OpObject *op = op_new(opcode, 0);
    if (!op)
        return NULL;
    struct dsa_fields f;
    if (parse_op(op, opcode, kw, &f) < 0) {
        Py_DECREF(op);
        return NULL;
    }
    f.completion = (uintptr_t)op->rec;
    struct dsa_desc d;
    dsa_desc_build(&d, &f);
    return finish_submit(q, op, &d);
}

static PyObject *Queue_submit_batch(QueueObject *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"members", "flags", NULL};
    PyObject *members;
    unsigned flags = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|I:submit_batch", kwlist, &members, &flags) || queue_usable(q) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(members, "members must be a sequence of (opcode, kwargs)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 0xffff) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "a batch needs members");
        return NULL;
    }
    OpObject *op = op_new(DSA_OP_BATCH, (unsigned)n);
    if (!op) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned opcode;
        PyObject *mkw;
        struct dsa_fields f;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "IO!:batch member", &opcode, &PyDict_Type, &mkw) ||
            parse_op(op, opcode, mkw, &f) < 0) {
            Py_DECREF(seq);
            Py_DECREF(op);
            return NULL;
        }
        f.completion = (uintptr_t)&op->member_recs[i];
        dsa_desc_build(&op->members[i], &f);
    }
    Py_DECREF(seq);
    struct dsa_fields bf = {.opcode = DSA_OP_BATCH, .flags = flags | DSA_FLAG_CRAV | DSA_FLAG_RCR,
                            .completion = (uintptr_t)op->rec, .desc_list = (uintptr_t)op->members,
                            .count = (uint32_t)n};
    struct dsa_desc d;
    dsa_desc_build(&d, &bf);
    return finish_submit(q, op, &d);
}

static PyObject *Queue_reap(QueueObject *q, PyObject *unused)
{
    if (q->closed)
        return PyList_New(0);
    if (ensure_process(q) < 0)
        return NULL; /* a forked child whose reopen failed: that OSError, not an empty list with it set */
    uint64_t v;
    ssize_t r = read(q->efd, &v, sizeof v); /* drain the wakeup */
    (void)r;
    pthread_mutex_lock(&q->mu);
    OpObject *done = q->done;
    q->done = NULL;
    pthread_mutex_unlock(&q->mu);
    PyObject *out = PyList_New(0);
    while (done) {
        OpObject *next = done->next;
        done->next = NULL;
        done->state = OP_REAPED;
        op_release(done); /* the device is finished with them */
        if (out && PyList_Append(out, (PyObject *)done) < 0)
            Py_CLEAR(out);
        Py_DECREF(done);
        done = next;
    }
    return out;
}

static PyObject *Queue_touch(QueueObject *q, PyObject *args)
{
    unsigned long long addr;
    int write_fault = 0;
    if (!PyArg_ParseTuple(args, "K|p:touch", &addr, &write_fault))
        return NULL;
    /* Read (or rewrite) one byte so the OS maps the page; the caller
     * guarantees addr lies inside a buffer it owns. */
    volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
    if (write_fault)
        __atomic_fetch_add(p, 0, __ATOMIC_RELAXED);
    else
        (void)*p;
    if (q->emu)
        dsa_emu_touch(q->emu->e, addr);
    Py_RETURN_NONE;
}

/* Close the queue. Waits up to `timeout_ns` (negative: for ever) for what
 * is in flight; whatever is still in flight then is stranded: its Op keeps
 * its buffers exported and its record allocated for good (the reference
 * the queue held is never dropped), because the device may still write
 * them. Returns how many were stranded. */
static unsigned long queue_close(QueueObject *q, int64_t timeout_ns)
{
    if (q->closed)
        return 0;
    q->closed = 1;
    if (q->pid != getpid()) { /* a forked child that never reopened */
        q->inflight = q->done = NULL;
        return 0;
    }
    unsigned long stranded = 0;
    if (q->poller_running) {
        uint64_t start = now_ns();
        Py_BEGIN_ALLOW_THREADS
        for (;;) { /* records may still be written by the device: wait them out */
            pthread_mutex_lock(&q->mu);
            unsigned n = q->in_flight;
            pthread_mutex_unlock(&q->mu);
            if (!n || (timeout_ns >= 0 && (int64_t)(now_ns() - start) >= timeout_ns))
                break;
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
        pthread_mutex_lock(&q->mu);
        q->stop = q->abandon = 1;
        pthread_cond_signal(&q->cv);
        pthread_mutex_unlock(&q->mu);
        pthread_join(q->poller, NULL);
        Py_END_ALLOW_THREADS
        q->poller_running = 0;
        for (OpObject *op = q->inflight; op; op = op->next) {
            op->state = OP_STRANDED; /* the queue's reference is kept: never freed */
            stranded++;
        }
        q->inflight = NULL;
        q->in_flight = 0;
        q->stranded += stranded;
    }
    OpObject *done = q->done;
    q->done = NULL;
    while (done) {
        OpObject *next = done->next;
        done->next = NULL;
        done->state = OP_REAPED;
        op_release(done);
        Py_DECREF(done);
        done = next;
    }
    if (q->portal)
        munmap(q->portal, PORTAL_SIZE);
    q->portal = NULL;
    if (q->fd >= 0)
        close(q->fd);
    if (q->efd >= 0)
        close(q->efd);
    q->fd = q->efd = -1;
    if (q->emu)
        q->emu->opened--;
    return stranded;
}

static PyObject *Queue_close(QueueObject *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:close", kwlist, &timeout))
        return NULL;
    int64_t ns = -1;
    if (timeout != Py_None) {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        ns = t <= 0 ? 0 : (int64_t)(t * 1e9);
    }
    return PyLong_FromUnsignedLong(queue_close(q, ns));
}

/* The waiter of `op` stops waiting (cancelled): release its buffers as soon
 * as the device is done with them, instead of at the next reap (which may
 * never come). Already complete: now; still in flight: by the poller. */
static PyObject *Queue_orphan(QueueObject *q, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &OpType)) {
        PyErr_SetString(PyExc_TypeError, "orphan() takes an Op");
        return NULL;
    }
    OpObject *op = (OpObject *)arg;
    if (q->pid != getpid())
        Py_RETURN_NONE;
    pthread_mutex_lock(&q->mu);
    int complete = op->state == OP_COMPLETE;
    if (op->state == OP_INFLIGHT)
        op->orphan = 1;
    pthread_mutex_unlock(&q->mu);
    if (complete) /* on the done list: the device is finished with it */
        op_release(op);
    Py_RETURN_NONE;
}

/* Look for a device error now (a poll() on the WQ fd), and remember it. */
static PyObject *Queue_check_device_error(QueueObject *q, PyObject *unused)
{
    if (!q->closed && q->pid == getpid() && !__atomic_load_n(&q->swerr, __ATOMIC_ACQUIRE) && device_error_now(q))
        __atomic_store_n(&q->swerr, 1, __ATOMIC_RELEASE);
    return PyBool_FromLong(__atomic_load_n(&q->swerr, __ATOMIC_ACQUIRE));
}

/* Wake whoever waits on the eventfd (a waiter must look at the queue's state again). */
static PyObject *Queue_wake(QueueObject *q, PyObject *unused)
{
    if (q->efd >= 0 && q->pid == getpid()) {
        uint64_t one = 1;
        ssize_t w = write(q->efd, &one, sizeof one);
        (void)w;
    }
    Py_RETURN_NONE;
}

static void Queue_dealloc(QueueObject *q)
{
    queue_close(q, -1);
    Py_CLEAR(q->emu);
    free(q->path);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static PyObject *Queue_fileno(QueueObject *q, PyObject *unused)
{
    if (queue_usable(q) < 0)
        return NULL;
    return PyLong_FromLong(q->efd);
}

#define Q_GETTER(name, expr)                                                                   \
    static PyObject *Queue_get_##name(QueueObject *q, void *c) { return expr; }
Q_GETTER(in_flight, PyLong_FromUnsignedLong(q->pid == getpid() ? q->in_flight : 0))
Q_GETTER(size, PyLong_FromUnsignedLong(q->size))
Q_GETTER(mode, PyUnicode_FromString(q->shared ? "shared" : "dedicated"))
Q_GETTER(kind, PyUnicode_FromString(kind_names[q->kind]))
Q_GETTER(max_transfer, PyLong_FromUnsignedLong(q->max_transfer))
Q_GETTER(max_batch, PyLong_FromUnsignedLong(q->max_batch))
Q_GETTER(pid, PyLong_FromLong(q->pid))
Q_GETTER(generation, PyLong_FromUnsignedLong(q->generation))
Q_GETTER(submitted, PyLong_FromUnsignedLongLong(q->submitted))
Q_GETTER(retries, PyLong_FromUnsignedLongLong(q->retries))
Q_GETTER(full, PyLong_FromUnsignedLongLong(q->full))
Q_GETTER(closed, PyBool_FromLong(q->closed))
Q_GETTER(path, q->path ? PyUnicode_FromString(q->path) : Py_NewRef(Py_None))
Q_GETTER(portal_note, PyUnicode_FromString(q->portal_note))
Q_GETTER(emulator, Py_NewRef(q->emu ? (PyObject *)q->emu : Py_None))
Q_GETTER(device_error, PyBool_FromLong(__atomic_load_n(&q->swerr, __ATOMIC_ACQUIRE)))
Q_GETTER(stranded, PyLong_FromUnsignedLong(q->stranded))
Q_GETTER(refused, PyLong_FromUnsignedLongLong(q->refused))

static PyGetSetDef Queue_getset[] = {
    {"in_flight", (getter)Queue_get_in_flight, NULL, "descriptors submitted and not yet seen complete", NULL},
    {"size", (getter)Queue_get_size, NULL, "the queue's size: the in-flight limit", NULL},
    {"mode", (getter)Queue_get_mode, NULL, NULL, NULL},
    {"kind", (getter)Queue_get_kind, NULL, "how descriptors reach the device", NULL},
    {"max_transfer", (getter)Queue_get_max_transfer, NULL, NULL, NULL},
    {"max_batch", (getter)Queue_get_max_batch, NULL, NULL, NULL},
    {"pid", (getter)Queue_get_pid, NULL, "the process that opened the portal in use", NULL},
    {"generation", (getter)Queue_get_generation, NULL, "times reopened (after fork)", NULL},
    {"submitted", (getter)Queue_get_submitted, NULL, NULL, NULL},
    {"retries", (getter)Queue_get_retries, NULL, "shared-queue retries (ENQCMD ZF=1)", NULL},
    {"full", (getter)Queue_get_full, NULL, "submissions refused as full", NULL},
    {"closed", (getter)Queue_get_closed, NULL, NULL, NULL},
    {"path", (getter)Queue_get_path, NULL, NULL, NULL},
    {"portal_note", (getter)Queue_get_portal_note, NULL, "why write() is used, if it is", NULL},
    {"emulator", (getter)Queue_get_emulator, NULL, NULL, NULL},
    {"device_error", (getter)Queue_get_device_error, NULL, "the device reported a software error (seen so far)", NULL},
    {"stranded", (getter)Queue_get_stranded, NULL, "operations left in flight at close: buffers pinned for good", NULL},
    {"refused", (getter)Queue_get_refused, NULL, "submissions the device did not take (full, or an error)", NULL},
    {NULL}};

static PyMethodDef Queue_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))Queue_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(opcode, *, flags, src, src2, dst, dst2, size, pattern, expected_res, crc_seed, seed, delta, "
     "max_delta, delta_size) -> Op, or None when the queue is full"},
    {"submit_batch", (PyCFunction)(void (*)(void))Queue_submit_batch, METH_VARARGS | METH_KEYWORDS,
     "submit_batch([(opcode, kwargs), ...], flags=0) -> Op, or None when full"},
    {"reap", (PyCFunction)Queue_reap, METH_NOARGS, "completed Ops since the last call; releases their buffers"},
    {"touch", (PyCFunction)Queue_touch, METH_VARARGS, "touch(addr, write=False): fault a page in"},
    {"fileno", (PyCFunction)Queue_fileno, METH_NOARGS, "the eventfd that becomes readable on completions"},
    {"close", (PyCFunction)(void (*)(void))Queue_close, METH_VARARGS | METH_KEYWORDS,
     "close(timeout=None): wait (up to timeout seconds) for in-flight work, then release everything; what is "
     "still in flight stays pinned for good. Returns how many operations were left so."},
    {"check_device_error", (PyCFunction)Queue_check_device_error, METH_NOARGS,
     "poll() the WQ fd for a device error (SWERR) now; True once one was seen"},
    {"wake", (PyCFunction)Queue_wake, METH_NOARGS, "make the completion fd readable (wakes a waiter)"},
    {"orphan", (PyCFunction)Queue_orphan, METH_O,
     "orphan(op): nobody waits for op any more; release its buffers once the device is done with it"},
    {NULL}};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmuserd.dsa_offload._dsa.Queue",
    .tp_basicsize = sizeof(QueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Queue(path=None, emulator=None, mode='dedicated', size=0, max_transfer=2 MiB, max_batch=32, "
              "portal='auto'|'write'): an open DSA work queue",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Queue_init,
    .tp_dealloc = (destructor)Queue_dealloc,
    .tp_methods = Queue_methods,
    .tp_getset = Queue_getset,
};

/* ---- Inline: the mover's small CPU copies and fills in one C call ------ */

/* In Python, Mover.copy of work small enough to run inline costs a
 * coroutine, the checkpoint-credit arithmetic and the memcpy: ~0.3 us on
 * top of the copy, a quarter of a cache-hot 64 KiB one (Mover.fill, which
 * builds an operation object, ~4 us). Inline.copy / Inline.fill do the same
 * work in one C call (~0.04 us on top) and return DONE, an already-finished
 * awaitable, so `await mover.copy(dst, src)` creates no coroutine.
 *
 * Inline is the Mover's base class when the extension is built, so
 * `mover.copy` is this C method through ordinary class lookup (the class is
 * chosen when _mover is imported; nothing is replaced at run time).
 * Whatever these methods do not handle themselves they hand, arguments
 * unchanged, to the subclass's Python method of the same role, `_copy_py` /
 * `_fill_py` (which checks and names the problem, takes the checkpoint, or
 * sends the work to a device or thread), and return its coroutine: any
 * argument that is not a contiguous buffer (writable for dst) of equal
 * lengths, work of `_below` bytes or more, a fill pattern other than a byte
 * value or 1/2/4/8 bytes, a closed mover, and the call whose charge would
 * exhaust the checkpoint credit (the Python path then draws it, checkpoints
 * and resets it: one rule, one counter). The counters, credit and limits
 * are members the Python side reads and writes (underscored: they are the
 * mover's internals, not its API). Buffers are held (exported) only for
 * the duration of the call; from `_nogil` bytes the memcpy runs without
 * the GIL. */

typedef struct {
    PyObject_HEAD
    Py_ssize_t credit; /* bytes of inline work left before a checkpoint */
    Py_ssize_t charge; /* drawn per call on top of its bytes */
    Py_ssize_t below;  /* inline only work smaller than this */
    Py_ssize_t nogil;  /* release the GIL from this size */
    Py_ssize_t ops, nbytes; /* inline calls done and their bytes (either path) */
    char closed;
} InlineObject;

/* The already-finished awaitable: __await__ returns itself, an iterator
 * that is exhausted at once (StopIteration, value None). send/throw/close
 * make it a collections.abc.Coroutine, so trio (start_soon,
 * from_thread.run) accepts it like a coroutine object. Stateless: one
 * shared instance. */
typedef struct {
    PyObject_HEAD
} DoneObject;

static PyObject *Done_self(PyObject *self) { return Py_NewRef(self); }
static PyObject *Done_next(PyObject *self) { return NULL; /* StopIteration(None), no exception object */ }
static PyObject *Done_send(PyObject *self, PyObject *value)
{
    PyErr_SetNone(PyExc_StopIteration);
    return NULL;
}
static PyObject *Done_throw(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    PyObject *typ = args[0], *val = nargs > 1 ? args[1] : Py_None;
    if (PyExceptionInstance_Check(typ))
        PyErr_SetObject(PyExceptionInstance_Class(typ), typ);
    else if (PyExceptionClass_Check(typ))
        PyErr_SetObject(typ, val == Py_None ? NULL : val);
    else
        PyErr_SetString(PyExc_TypeError, "exceptions must be classes or instances deriving from BaseException");
    return NULL;
}
static PyObject *Done_close(PyObject *self, PyObject *unused) { Py_RETURN_NONE; }
static PyObject *Done_repr(PyObject *self) { return PyUnicode_FromString("<dmuserd.dsa_offload._dsa.DONE>"); }

static PyAsyncMethods Done_async = {.am_await = Done_self};

static PyMethodDef Done_methods[] = {
    {"send", (PyCFunction)Done_send, METH_O, "raise StopIteration: the work is already done"},
    {"throw", (PyCFunction)(void (*)(void))Done_throw, METH_FASTCALL, "raise the given exception"},
    {"close", (PyCFunction)Done_close, METH_NOARGS, "nothing to close"},
    {NULL}};

static PyTypeObject DoneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmuserd.dsa_offload._dsa.Done",
    .tp_basicsize = sizeof(DoneObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An awaitable whose work is already finished (await gives None).",
    .tp_as_async = &Done_async,
    .tp_iter = Done_self,
    .tp_iternext = Done_next,
    .tp_methods = Done_methods,
    .tp_repr = Done_repr,
};

static DoneObject done_singleton = {PyObject_HEAD_INIT(&DoneType)};
#define DONE ((PyObject *)&done_singleton)

static int Inline_init(InlineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"credit", "charge", "nogil", "below", NULL};
    Py_ssize_t credit = 0, charge = 0, nogil = PY_SSIZE_T_MAX, below = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$nnnn:Inline", kwlist, &credit, &charge, &nogil, &below))
        return -1;
    self->credit = credit;
    self->charge = charge;
    self->nogil = nogil;
    self->below = below;
    return 0;
}

/* Draw the call's charge from the credit; 0 when it would run out (the
 * Python path then charges, checkpoints and resets). */
static inline int draw_credit(InlineObject *self, Py_ssize_t n)
{
    Py_ssize_t need = n + self->charge;
    if (self->credit < need)
        return 0;
    self->credit -= need;
    return 1;
}

/* The subclass's Python method `name`, called with the arguments unchanged. */
static PyObject *slow(InlineObject *self, PyObject *name, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *method = PyObject_GetAttr((PyObject *)self, name);
    if (!method)
        return NULL;
    PyObject *r = PyObject_Vectorcall(method, args, nargsf, kwnames);
    Py_DECREF(method);
    return r;
}

static PyObject *str_copy_py, *str_fill_py; /* "_copy_py", "_fill_py", interned at import */

static PyObject *Inline_copy(InlineObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_buffer d, s;
    if (nargs != 2 || kwnames || self->closed)
        goto slow;
    if (PyObject_GetBuffer(args[0], &d, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        goto slow;
    }
    if (d.len >= self->below) {
        PyBuffer_Release(&d);
        goto slow;
    }
    if (PyObject_GetBuffer(args[1], &s, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyBuffer_Release(&d);
        goto slow;
    }
    if (s.len != d.len || !draw_credit(self, d.len)) {
        PyBuffer_Release(&s);
        PyBuffer_Release(&d);
        goto slow;
    }
    if (d.len >= self->nogil) {
        Py_BEGIN_ALLOW_THREADS
        memmove(d.buf, s.buf, d.len);
        Py_END_ALLOW_THREADS
    } else {
        memmove(d.buf, s.buf, d.len);
    }
    self->ops++;
    self->nbytes += d.len;
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    return Py_NewRef(DONE);
slow:
    return slow(self, str_copy_py, args, nargs, kwnames);
}

/* byte i of dst = pattern[i % 8], by doubling copies from the start. */
static void fill_pattern(uint8_t *dst, Py_ssize_t n, const uint8_t pattern[8])
{
    uint64_t p;
    memcpy(&p, pattern, 8);
    if (p == 0x0101010101010101ull * pattern[0]) {
        memset(dst, pattern[0], n);
        return;
    }
    Py_ssize_t done = n < 256 ? n : 256;
    for (Py_ssize_t i = 0; i < done; i++)
        dst[i] = pattern[i & 7];
    while (done < n) { /* every copy is a multiple of 8 long, so the phase holds */
        Py_ssize_t step = done < n - done ? done : n - done;
        memcpy(dst + done, dst, step);
        done += step;
    }
}

static PyObject *Inline_fill(InlineObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    uint8_t pattern[8] = {0};
    Py_buffer d;
    if (nargs < 1 || nargs > 2 || kwnames || self->closed)
        goto slow;
    if (nargs == 2) {
        PyObject *p = args[1];
        if (PyBytes_CheckExact(p)) {
            Py_ssize_t k = PyBytes_GET_SIZE(p);
            if (k != 1 && k != 2 && k != 4 && k != 8)
                goto slow;
            for (int i = 0; i < 8; i++)
                pattern[i] = (uint8_t)PyBytes_AS_STRING(p)[i % k];
        } else if (PyLong_Check(p)) {
            long v = PyLong_AsLong(p);
            if (v < 0 || v > 255) {
                PyErr_Clear();
                goto slow;
            }
            memset(pattern, (int)v, 8);
        } else {
            goto slow;
        }
    }
    if (PyObject_GetBuffer(args[0], &d, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        goto slow;
    }
    if (d.len == 0 || d.len >= self->below || !draw_credit(self, d.len)) {
        PyBuffer_Release(&d);
        goto slow;
    }
    if (d.len >= self->nogil) {
        Py_BEGIN_ALLOW_THREADS
        fill_pattern(d.buf, d.len, pattern);
        Py_END_ALLOW_THREADS
    } else {
        fill_pattern(d.buf, d.len, pattern);
    }
    self->ops++;
    self->nbytes += d.len;
    PyBuffer_Release(&d);
    return Py_NewRef(DONE);
slow:
    return slow(self, str_fill_py, args, nargs, kwnames);
}

static PyMethodDef Inline_methods[] = {
    {"copy", (PyCFunction)(void (*)(void))Inline_copy, METH_FASTCALL | METH_KEYWORDS,
     "copy(dst, src) -> DONE after an inline memmove, else self._copy_py(dst, src)"},
    {"fill", (PyCFunction)(void (*)(void))Inline_fill, METH_FASTCALL | METH_KEYWORDS,
     "fill(dst, pattern=b'\\0') -> DONE after an inline fill, else self._fill_py(dst, pattern)"},
    {NULL}};

static PyMemberDef Inline_members[] = {
    {"_credit", T_PYSSIZET, offsetof(InlineObject, credit), 0, "bytes of inline work left before a checkpoint"},
    {"_call_charge", T_PYSSIZET, offsetof(InlineObject, charge), 0, "bytes drawn per call on top of its size"},
    {"_below", T_PYSSIZET, offsetof(InlineObject, below), 0, "inline only work smaller than this"},
    {"_nogil", T_PYSSIZET, offsetof(InlineObject, nogil), 0, "release the GIL from this size"},
    {"_inline_ops", T_PYSSIZET, offsetof(InlineObject, ops), 0, "inline operations done"},
    {"_inline_nbytes", T_PYSSIZET, offsetof(InlineObject, nbytes), 0, "bytes of inline operations done"},
    {"_closed", T_BOOL, offsetof(InlineObject, closed), 0, "hand every call to the Python path"},
    {NULL}};

static PyTypeObject InlineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmuserd.dsa_offload._dsa.Inline",
    .tp_basicsize = sizeof(InlineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Inline(*, credit=0, charge=0, nogil=max, below=max): the mover's base class, its inline copy and "
              "fill in C, with their counters and checkpoint credit; a subclass supplies _copy_py and _fill_py",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Inline_init,
    .tp_methods = Inline_methods,
    .tp_members = Inline_members,
};

/* ---- module functions ------------------------------------------------- */

static PyObject *build_descriptor(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"opcode", "flags", "pasid", "priv", "completion", "src", "src2", "dst", "dst2",
                             "pattern", "size", "int_handle", "expected_res", "delta_addr", "max_delta",
                             "delta_size", "crc_seed", "seed_addr", "desc_list", "count", NULL};
    struct dsa_fields f = {0};
    unsigned long long completion = 0, src = 0, src2 = 0, dst = 0, dst2 = 0, pattern = 0, delta = 0, seed_addr = 0,
                       list = 0;
    unsigned short handle = 0;
    unsigned char expected = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "I|IIpKKKKKKIHbKIIIKKI:build_descriptor", kwlist, &f.opcode,
                                     &f.flags, &f.pasid, &f.priv, &completion, &src, &src2, &dst, &dst2, &pattern,
                                     &f.size, &handle, &expected, &delta, &f.max_delta, &f.delta_size, &f.crc_seed,
                                     &seed_addr, &list, &f.count))
        return NULL;
    f.completion = completion, f.src = src, f.src2 = src2, f.dst = dst, f.dst2 = dst2, f.pattern = pattern;
    f.int_handle = handle, f.expected_res = expected, f.delta_addr = delta, f.seed_addr = seed_addr;
    f.desc_list = list;
    struct dsa_desc d;
    dsa_desc_build(&d, &f);
    return PyBytes_FromStringAndSize((const char *)&d, sizeof d);
}

static PyObject *cpu_features(PyObject *self, PyObject *unused)
{
    const struct dsa_cpu *c = dsa_cpu_features();
    return Py_BuildValue("{sOsOsOsO}", "movdir64b", c->movdir64b ? Py_True : Py_False, "enqcmd",
                         c->enqcmd ? Py_True : Py_False, "waitpkg", c->waitpkg ? Py_True : Py_False, "sse4_2",
                         c->sse42 ? Py_True : Py_False);
}

static PyObject *address_of(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *r = PyLong_FromUnsignedLongLong((uintptr_t)b.buf);
    PyBuffer_Release(&b);
    return r;
}

/* Parse two buffers of equal length (``format`` as PyArg_ParseTuple's, naming
 * the function); 0 when parsed, else -1 with an exception set and nothing held. */
static int two_equal_buffers(PyObject *args, const char *format, Py_buffer *x, Py_buffer *y)
{
    if (!PyArg_ParseTuple(args, format, x, y))
        return -1;
    if (x->len == y->len)
        return 0;
    PyBuffer_Release(x);
    PyBuffer_Release(y);
    PyErr_Format(PyExc_ValueError, "%s needs equal lengths", strchr(format, ':') + 1);
    return -1;
}

static PyObject *memmove_nogil(PyObject *self, PyObject *args)
{
    Py_buffer d, s;
    if (two_equal_buffers(args, "w*y*:memmove", &d, &s))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    memmove(d.buf, s.buf, d.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    Py_RETURN_NONE;
}

/* Offset of the first differing byte of two equal-length buffers, or -1:
 * memcmp chunk by chunk (a chunk stays in cache), then byte by byte inside
 * the chunk that differs. No copy, and no GIL from 64 KiB on. */
static PyObject *first_difference(PyObject *self, PyObject *args)
{
    Py_buffer a, b;
    if (two_equal_buffers(args, "y*y*:first_difference", &a, &b))
        return NULL;
    const unsigned char *pa = a.buf, *pb = b.buf;
    Py_ssize_t n = a.len, found = -1;
    const Py_ssize_t chunk = 64 * 1024;
    PyThreadState *released = n >= chunk ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t start = 0; start < n && found < 0; start += chunk) {
        Py_ssize_t len = n - start < chunk ? n - start : chunk;
        if (memcmp(pa + start, pb + start, (size_t)len) == 0)
            continue;
        for (Py_ssize_t i = start;; i++)
            if (pa[i] != pb[i]) {
                found = i;
                break;
            }
    }
    if (released)
        PyEval_RestoreThread(released);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(found);
}

static PyObject *crc32c_fn(PyObject *self, PyObject *args)
{
    Py_buffer b;
    unsigned int seed = 0;
    if (!PyArg_ParseTuple(args, "y*|I:crc32c", &b, &seed))
        return NULL;
    uint32_t c = dsa_crc32c(seed, b.buf, b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(c);
}

static PyMethodDef module_methods[] = {
    {"build_descriptor", (PyCFunction)(void (*)(void))build_descriptor, METH_VARARGS | METH_KEYWORDS,
     "build_descriptor(opcode, **fields) -> the 64 descriptor bytes submission uses"},
    {"discover", (PyCFunction)(void (*)(void))dsa_discover, METH_VARARGS | METH_KEYWORDS,
     "discover(sysfs='/sys/bus/dsa/devices', devdir='/dev/dsa') -> [work queue dicts]"},
    {"cpu_features", (PyCFunction)cpu_features, METH_NOARGS, "MOVDIR64B, ENQCMD, WAITPKG, SSE4.2 per CPUID"},
    {"address_of", (PyCFunction)address_of, METH_O, "the address of a buffer's first byte"},
    {"memmove", (PyCFunction)memmove_nogil, METH_VARARGS, "memmove(dst, src) without holding the GIL"},
    {"crc32c", (PyCFunction)crc32c_fn, METH_VARARGS, "the emulator's CRC-32C (crc32c package convention)"},
    {"first_difference", (PyCFunction)first_difference, METH_VARARGS,
     "first_difference(a, b) -> offset of the first differing byte, -1 when equal (no copy; no GIL from 64 KiB)"},
    {NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_dsa", "DSA work submission, completion and emulation.",
                                       -1, module_methods};

PyMODINIT_FUNC PyInit__dsa(void)
{
    if (PyType_Ready(&EmulatorType) < 0 || PyType_Ready(&OpType) < 0 || PyType_Ready(&QueueType) < 0 ||
        PyType_Ready(&DoneType) < 0 || PyType_Ready(&InlineType) < 0)
        return NULL;
    str_copy_py = PyUnicode_InternFromString("_copy_py");
    str_fill_py = PyUnicode_InternFromString("_fill_py");
    if (!str_copy_py || !str_fill_py)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Emulator", (PyObject *)&EmulatorType) < 0 ||
        PyModule_AddObjectRef(m, "Op", (PyObject *)&OpType) < 0 ||
        PyModule_AddObjectRef(m, "Queue", (PyObject *)&QueueType) < 0 ||
        PyModule_AddObjectRef(m, "Inline", (PyObject *)&InlineType) < 0 ||
        PyModule_AddObjectRef(m, "Done", (PyObject *)&DoneType) < 0 || PyModule_AddObjectRef(m, "DONE", DONE) < 0 ||
        PyModule_AddIntConstant(m, "PORTAL_SIZE", PORTAL_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
