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
 *     pwritev_runs_sync(fd, runs, notify_fd) -> float
 *
 * pwritev_runs, then one byte written to notify_fd (a pipe: the writes are
 * done, a reader may look), then fdatasync(fd); returns the seconds the
 * fdatasync took. The merge's commit thread goes from its writes straight
 * into the sync: in Python, the wake-up it sent the event loop took the
 * GIL, which the thread needed back before it could sync (~40 ms of a
 * 1 GiB merge's 163 steps, waiting between the write and the sync).
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

/* What a writing call does after its runs: nothing, or notify and sync (pwritev_runs_sync). */
enum { PLAIN, NOTIFY_SYNC };

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *runs_io(PyObject *args, int writing, int then)
{
    int fd, notify_fd = -1;
    PyObject *runs;
    int parsed = then == NOTIFY_SYNC
                     ? PyArg_ParseTuple(args, "iO!i:pwritev_runs_sync", &fd, &PyList_Type, &runs, &notify_fd)
                     : PyArg_ParseTuple(args, writing ? "iO!:pwritev_runs" : "iO!:preadv_runs", &fd, &PyList_Type,
                                        &runs);
    if (!parsed)
        return NULL;
    Py_ssize_t n_runs = PyList_GET_SIZE(runs), n_bufs = 0;
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        PyObject *run = PyList_GET_ITEM(runs, i);
        if (!PyTuple_Check(run) || PyTuple_GET_SIZE(run) != 2 || !PyList_Check(PyTuple_GET_ITEM(run, 1))) {
            PyErr_SetString(PyExc_TypeError, "a run is an (offset, [buffer, ...]) tuple");
            return NULL;
        }
        n_bufs += PyList_GET_SIZE(PyTuple_GET_ITEM(run, 1));
    }
    Py_buffer *views = PyMem_Calloc((size_t)(n_bufs ? n_bufs : 1), sizeof(Py_buffer));
    struct iovec *iov = PyMem_Calloc((size_t)(n_bufs ? n_bufs : 1), sizeof(struct iovec));
    run_t *plan = PyMem_Calloc((size_t)(n_runs ? n_runs : 1), sizeof(run_t));
    Py_ssize_t taken = 0;
    PyObject *result = NULL;
    if (views == NULL || iov == NULL || plan == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        PyObject *run = PyList_GET_ITEM(runs, i);
        PyObject *bufs = PyTuple_GET_ITEM(run, 1);
        long long offset = PyLong_AsLongLong(PyTuple_GET_ITEM(run, 0));
        if (offset == -1 && PyErr_Occurred())
            goto done;
        if (offset < 0) {
            PyErr_SetString(PyExc_ValueError, "a run's offset is negative");
            goto done;
        }
        plan[i].offset = (off_t)offset;
        plan[i].first = taken;
        plan[i].count = PyList_GET_SIZE(bufs);
        for (Py_ssize_t j = 0; j < plan[i].count; j++) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(bufs, j), &views[taken],
                                   writing ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0)
                goto done;
            iov[taken].iov_base = views[taken].buf;
            iov[taken].iov_len = (size_t)views[taken].len;
            taken++;
        }
    }
    int err = 0;
    Py_ssize_t at = 0;
    double synced = 0.0;
    Py_BEGIN_ALLOW_THREADS
    for (; at < n_runs; at++) {
        err = transfer(fd, iov + plan[at].first, plan[at].count, plan[at].offset, writing);
        if (err)
            break;
    }
    if (!err && then == NOTIFY_SYNC) {
        const char byte = 0;
        ssize_t n;
        while ((n = write(notify_fd, &byte, 1)) < 0 && errno == EINTR)
            ;
        if (n < 0) {
            err = errno;
        } else {
            double started = now();
            while (fdatasync(fd) < 0) {
                if (errno != EINTR) {
                    err = errno;
                    break;
                }
            }
            synced = now() - started;
        }
    }
    Py_END_ALLOW_THREADS
    if (err > 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (then == NOTIFY_SYNC) {
        result = PyFloat_FromDouble(synced);
    } else if (writing) {
        result = Py_NewRef(Py_None);
    } else {
        result = PyLong_FromSsize_t(err < 0 ? at : -1);
    }
done:
    for (Py_ssize_t k = 0; k < taken; k++)
        PyBuffer_Release(&views[k]);
    PyMem_Free(views);
    PyMem_Free(iov);
    PyMem_Free(plan);
    return result;
}

static PyObject *pwritev_runs(PyObject *self, PyObject *args)
{
    (void)self;
    return runs_io(args, 1, PLAIN);
}

static PyObject *pwritev_runs_sync(PyObject *self, PyObject *args)
{
    (void)self;
    return runs_io(args, 1, NOTIFY_SYNC);
}

static PyObject *preadv_runs(PyObject *self, PyObject *args)
{
    (void)self;
    return runs_io(args, 0, PLAIN);
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
    {"pwritev_runs_sync", pwritev_runs_sync, METH_VARARGS,
     "pwritev_runs_sync(fd, runs, notify_fd) -> seconds: write every run, one byte to notify_fd, fdatasync(fd)"},
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
