/* A merge step's scattered writes (or reads) of one file in one GIL release.
 *
 * The merge engine (snapshot/_merge_engine.py) writes a step's data to the
 * base as one pwritev per run of consecutive new blocks: a window of
 * scattered Copy ops is hundreds of small calls. Made from Python, each
 * call gives the GIL back and takes it again, and while the next step is
 * prepared in another thread (the commit overlaps it) every retake waits
 * for that thread: the chain of writes and syncs, which the merge's speed
 * is, then runs slower than the same calls alone. Here the whole list is
 * one call: the buffers are taken while the GIL is held, the system calls
 * are made without it.
 *
 *     pwritev_runs(fd, runs) -> None
 *     preadv_runs(fd, runs) -> int
 *
 * runs: a list of (offset, [buffer, ...]) pairs; each run's buffers are
 * written (read) back to back from its offset, short transfers continued.
 * pwritev_runs raises OSError on an error. preadv_runs fills writable
 * buffers and returns -1, or, when the file ends before a run is filled,
 * the index of that run (the caller names the shortfall); OSError on an
 * error. Transfers stop at the first failing run.
 *
 *     run_program(ops) -> (differs, syncs, sync_seconds)
 *
 * A merge step's I/O in one GIL release, op by op:
 *     (0, fd, runs)              write the runs, as pwritev_runs
 *     (1, fd)                    fdatasync(fd)
 *     (2, fd)                    write one byte (1) to fd: a pipe telling
 *                                a reader that what came before is done
 *     (3, fd, runs, data, back)  read the runs (views of back) and
 *                                compare back with data: where they
 *                                differ (or the file ends first) stops
 *                                the program
 *     (4, fd)                    read one byte from fd (blocking): non-zero
 *                                goes on, zero (or the pipe's end) stops
 * differs is -1 when the program ran to its end, -2 when a read byte
 * stopped it, else the offset in data of the first byte that read back
 * differently (which stops it too); syncs and sync_seconds
 * count the fdatasync calls made and the seconds they took. OSError on an
 * error, naming nothing more than errno (the ops before it were made).
 * The merge's commit thread runs a step's program: in Python, each system
 * call gave the GIL back and the thread waited to retake it after each
 * (the loop it had just woken, the thread preparing the next step), about
 * ten times a step on the chain of writes and syncs. A second thread runs
 * each step's read-back (wait for the write, verify, notify) beside it.
 *
 *     xor_into(span, delta) -> None
 *
 * span ^= delta (equal lengths; span writable), 8 bytes at a time without
 * the GIL: a window's Xor ops applied in Python held the GIL ~12 us an op,
 * which the commit thread waited for between its system calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

typedef struct {
    off_t offset;
    Py_ssize_t first; /* index of its first iovec */
    Py_ssize_t count;
} run_t;

/* Transfer one run; 0, an errno, or -1 when a read hit the end of the file. */
static int transfer(int fd, struct iovec *iov, Py_ssize_t count, off_t offset, int writing)
{
    while (count > 0) {
        int n_iov = count > IOV_MAX ? IOV_MAX : (int)count;
        ssize_t n = writing ? pwritev(fd, iov, n_iov, offset) : preadv(fd, iov, n_iov, offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0) {
            if (!writing)
                return -1;
            return EIO; /* a write that makes no progress: never spin on it */
        }
        offset += n;
        while (count > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* A list of runs, its buffers taken: what a transfer needs without the GIL. */
typedef struct {
    Py_ssize_t n_runs, taken;
    Py_buffer *views;
    struct iovec *iov;
    run_t *plan;
} runs_t;

static void runs_release(runs_t *r)
{
    for (Py_ssize_t k = 0; k < r->taken; k++)
        PyBuffer_Release(&r->views[k]);
    PyMem_Free(r->views);
    PyMem_Free(r->iov);
    PyMem_Free(r->plan);
    memset(r, 0, sizeof(*r));
}

/* Take the buffers of runs ((offset, [buffer, ...]), ...); 0, or -1 with an exception set (nothing held). */
static int runs_take(PyObject *runs, int writing, runs_t *r)
{
    memset(r, 0, sizeof(*r));
    if (!PyList_Check(runs)) {
        PyErr_SetString(PyExc_TypeError, "runs is a list of (offset, [buffer, ...]) tuples");
        return -1;
    }
    Py_ssize_t n_runs = PyList_GET_SIZE(runs), n_bufs = 0;
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        PyObject *run = PyList_GET_ITEM(runs, i);
        if (!PyTuple_Check(run) || PyTuple_GET_SIZE(run) != 2 || !PyList_Check(PyTuple_GET_ITEM(run, 1))) {
            PyErr_SetString(PyExc_TypeError, "a run is an (offset, [buffer, ...]) tuple");
            return -1;
        }
        n_bufs += PyList_GET_SIZE(PyTuple_GET_ITEM(run, 1));
    }
    r->n_runs = n_runs;
    r->views = PyMem_Calloc((size_t)(n_bufs ? n_bufs : 1), sizeof(Py_buffer));
    r->iov = PyMem_Calloc((size_t)(n_bufs ? n_bufs : 1), sizeof(struct iovec));
    r->plan = PyMem_Calloc((size_t)(n_runs ? n_runs : 1), sizeof(run_t));
    if (r->views == NULL || r->iov == NULL || r->plan == NULL) {
        PyErr_NoMemory();
        runs_release(r);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        PyObject *run = PyList_GET_ITEM(runs, i);
        PyObject *bufs = PyTuple_GET_ITEM(run, 1);
        long long offset = PyLong_AsLongLong(PyTuple_GET_ITEM(run, 0));
        if (offset == -1 && PyErr_Occurred())
            goto fail;
        if (offset < 0) {
            PyErr_SetString(PyExc_ValueError, "a run's offset is negative");
            goto fail;
        }
        r->plan[i].offset = (off_t)offset;
        r->plan[i].first = r->taken;
        r->plan[i].count = PyList_GET_SIZE(bufs);
        for (Py_ssize_t j = 0; j < r->plan[i].count; j++) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(bufs, j), &r->views[r->taken],
                                   writing ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0)
                goto fail;
            r->iov[r->taken].iov_base = r->views[r->taken].buf;
            r->iov[r->taken].iov_len = (size_t)r->views[r->taken].len;
            r->taken++;
        }
    }
    return 0;
fail:
    runs_release(r);
    return -1;
}

/* Transfer every run; 0, an errno, or -1 when a read hit the end of the file (*at: the run it stopped in). */
static int runs_transfer(int fd, runs_t *r, int writing, Py_ssize_t *at)
{
    for (*at = 0; *at < r->n_runs; (*at)++) {
        int err = transfer(fd, r->iov + r->plan[*at].first, r->plan[*at].count, r->plan[*at].offset, writing);
        if (err)
            return err;
    }
    return 0;
}

static PyObject *runs_io(PyObject *args, int writing)
{
    int fd;
    PyObject *runs;
    if (!PyArg_ParseTuple(args, writing ? "iO!:pwritev_runs" : "iO!:preadv_runs", &fd, &PyList_Type, &runs))
        return NULL;
    runs_t r;
    if (runs_take(runs, writing, &r) < 0)
        return NULL;
    int err;
    Py_ssize_t at;
    Py_BEGIN_ALLOW_THREADS
    err = runs_transfer(fd, &r, writing, &at);
    Py_END_ALLOW_THREADS
    runs_release(&r);
    if (err > 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (writing)
        Py_RETURN_NONE;
    return PyLong_FromSsize_t(err < 0 ? at : -1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

enum { OP_WRITE, OP_SYNC, OP_NOTIFY, OP_VERIFY, OP_WAIT };

typedef struct {
    int code, fd;
    runs_t runs;           /* OP_WRITE, OP_VERIFY (reading) */
    Py_buffer data, back;  /* OP_VERIFY */
    int held;              /* data and back taken */
} op_t;

/* Offset of the first byte where a and b differ, or -1. */
static Py_ssize_t first_difference(const unsigned char *a, const unsigned char *b, Py_ssize_t n)
{
    const Py_ssize_t chunk = 64 * 1024;
    for (Py_ssize_t start = 0; start < n; start += chunk) {
        Py_ssize_t len = n - start < chunk ? n - start : chunk;
        if (memcmp(a + start, b + start, (size_t)len) == 0)
            continue;
        for (Py_ssize_t i = start;; i++)
            if (a[i] != b[i])
                return i;
    }
    return -1;
}

/* Read back a verify op's runs and compare: -1, the offset of the first difference, or -2 - errno. */
static Py_ssize_t verify(op_t *o)
{
    Py_ssize_t at;
    int err = runs_transfer(o->fd, &o->runs, 0, &at);
    if (err > 0)
        return -2 - err;
    if (err < 0) { /* the file ends inside run `at`: its first byte reads back as nothing */
        Py_ssize_t pos = 0;
        for (Py_ssize_t k = 0; k < o->runs.plan[at].first; k++)
            pos += (Py_ssize_t)o->runs.iov[k].iov_len;
        return pos;
    }
    return first_difference(o->data.buf, o->back.buf, o->data.len);
}

static PyObject *run_program(PyObject *self, PyObject *ops)
{
    (void)self;
    if (!PyList_Check(ops)) {
        PyErr_SetString(PyExc_TypeError, "run_program takes a list of ops");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(ops), ready = 0;
    op_t *prog = PyMem_Calloc((size_t)(n ? n : 1), sizeof(op_t));
    PyObject *result = NULL;
    if (prog == NULL)
        return PyErr_NoMemory();
    for (; ready < n; ready++) {
        PyObject *op = PyList_GET_ITEM(ops, ready);
        op_t *o = &prog[ready];
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) < 2) {
            PyErr_SetString(PyExc_TypeError, "an op is a (code, fd, ...) tuple");
            goto done;
        }
        o->code = (int)PyLong_AsLong(PyTuple_GET_ITEM(op, 0));
        o->fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(op, 1));
        if (PyErr_Occurred())
            goto done;
        Py_ssize_t want = o->code == OP_WRITE ? 3 : o->code == OP_VERIFY ? 5 : 2;
        if (o->code < OP_WRITE || o->code > OP_WAIT || PyTuple_GET_SIZE(op) != want) {
            PyErr_Format(PyExc_ValueError, "op %zd: code %d with %zd items", ready, o->code, PyTuple_GET_SIZE(op));
            goto done;
        }
        if ((o->code == OP_WRITE || o->code == OP_VERIFY) &&
            runs_take(PyTuple_GET_ITEM(op, 2), o->code == OP_WRITE, &o->runs) < 0)
            goto done;
        if (o->code == OP_VERIFY) { /* on a failure here, ready++ so that what the op holds is released */
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(op, 3), &o->data, PyBUF_SIMPLE) < 0) {
                ready++;
                goto done;
            }
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(op, 4), &o->back, PyBUF_SIMPLE) < 0) {
                PyBuffer_Release(&o->data);
                ready++;
                goto done;
            }
            o->held = 1;
            if (o->data.len != o->back.len) {
                PyErr_Format(PyExc_ValueError, "op %zd: data and back differ in length", ready);
                ready++;
                goto done;
            }
        }
    }
    int err = 0;
    Py_ssize_t differs = -1;
    long syncs = 0;
    double sync_seconds = 0.0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !err && differs == -1; i++) {
        op_t *o = &prog[i];
        unsigned char byte = 1;
        ssize_t got;
        double started;
        Py_ssize_t at;
        switch (o->code) {
        case OP_WRITE:
            err = runs_transfer(o->fd, &o->runs, 1, &at);
            break;
        case OP_SYNC:
            started = now();
            while (fdatasync(o->fd) < 0) {
                if (errno != EINTR) {
                    err = errno;
                    break;
                }
            }
            sync_seconds += now() - started;
            syncs++;
            break;
        case OP_NOTIFY:
            while ((got = write(o->fd, &byte, 1)) < 0 && errno == EINTR)
                ;
            if (got < 0)
                err = errno;
            break;
        case OP_VERIFY:
            differs = verify(o);
            if (differs < -1) {
                err = (int)(-2 - differs);
                differs = -1;
            }
            break;
        case OP_WAIT:
            while ((got = read(o->fd, &byte, 1)) < 0 && errno == EINTR)
                ;
            if (got < 0)
                err = errno;
            else if (got == 0 || byte == 0)
                differs = -2;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = Py_BuildValue("(nld)", differs, syncs, sync_seconds);
    }
done:
    for (Py_ssize_t k = 0; k < ready; k++) {
        runs_release(&prog[k].runs);
        if (prog[k].held) {
            PyBuffer_Release(&prog[k].data);
            PyBuffer_Release(&prog[k].back);
        }
    }
    PyMem_Free(prog);
    return result;
}

static PyObject *pwritev_runs(PyObject *self, PyObject *args)
{
    (void)self;
    return runs_io(args, 1);
}

static PyObject *preadv_runs(PyObject *self, PyObject *args)
{
    (void)self;
    return runs_io(args, 0);
}

static PyObject *xor_into(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer span, delta;
    if (!PyArg_ParseTuple(args, "w*y*:xor_into", &span, &delta))
        return NULL;
    if (span.len != delta.len) {
        PyBuffer_Release(&span);
        PyBuffer_Release(&delta);
        PyErr_SetString(PyExc_ValueError, "xor_into: the span and the delta differ in length");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    unsigned char *a = span.buf;
    const unsigned char *b = delta.buf;
    Py_ssize_t n = span.len, i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        x ^= y;
        memcpy(a + i, &x, 8);
    }
    for (; i < n; i++)
        a[i] ^= b[i];
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&span);
    PyBuffer_Release(&delta);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pwritev_runs", pwritev_runs, METH_VARARGS, "pwritev_runs(fd, [(offset, [buffer, ...]), ...]): write every run"},
    {"run_program", run_program, METH_O,
     "run_program([(code, fd, ...), ...]) -> (differs, syncs, sync_seconds): a step's I/O in one GIL release"},
    {"preadv_runs", preadv_runs, METH_VARARGS,
     "preadv_runs(fd, [(offset, [buffer, ...]), ...]) -> -1, or the index of the run the file ends in"},
    {"xor_into", xor_into, METH_VARARGS, "xor_into(span, delta): span ^= delta (equal lengths)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_merge_io", NULL, -1, methods};

PyMODINIT_FUNC PyInit__merge_io(void)
{
    return PyModule_Create(&module);
}
