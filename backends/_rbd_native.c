/* The rbd backend's requests: librbd's asynchronous calls in one C call each.
 *
 * backends/rbd.py submits every request from the event loop and collects the
 * finished ones when librbd signals the image's eventfd. Through ctypes that
 * was five foreign calls per 4 KiB read (create a completion, submit, and per
 * finished request get its argument, its return value, release it), each
 * converting its arguments by their argtypes: about a third of the
 * backend's Python CPU per request. Here a submit is one call that makes the
 * completion and submits it, and one call collects every finished request.
 *
 *     q = Queue(image, eventfd)   # image: the rbd_image_t as an int
 *     q.read(key, offset, buffer) -> 0 | -errno     (buffer: writable, its length is read)
 *     q.write(key, offset, buffer) -> 0 | -errno
 *     q.flush(key) / q.discard(key, offset, length) / q.write_zeroes(key, offset, length)
 *     q.reap() -> [(key, return value), ...]        (resets the eventfd; [] when it was not set)
 *
 * key is a positive int the caller chooses per request (the completion's
 * argument). A submit that fails returns librbd's -errno and leaves nothing
 * behind. The caller keeps a buffer alive, and does not resize it, until its
 * key comes back from reap(): librbd reads or fills it until then. The GIL
 * stays held: librbd dispatches a request in the calling thread
 * (rbd_non_blocking_aio=false) without waiting on the cluster, and no Python
 * runs on librbd's threads. librbd.so.1 is opened with dlopen when the first
 * Queue is made, so the extension builds without Ceph's headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

typedef void *rbd_image_t;
typedef void *rbd_completion_t;

/* librbd.h's prototypes of the calls made here (librbd1, Ceph 16). */
static struct {
    int (*create_completion)(void *arg, void *callback, rbd_completion_t *c);
    void (*release)(rbd_completion_t c);
    void *(*get_arg)(rbd_completion_t c);
    ssize_t (*get_return_value)(rbd_completion_t c);
    int (*poll_io_events)(rbd_image_t image, rbd_completion_t *comps, int numcomp);
    int (*aio_read)(rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c);
    int (*aio_write)(rbd_image_t image, uint64_t off, size_t len, const char *buf, rbd_completion_t c);
    int (*aio_flush)(rbd_image_t image, rbd_completion_t c);
    int (*aio_discard)(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c);
    int (*aio_write_zeroes)(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c, int zero_flags,
                            int op_flags);
} rbd;
static int rbd_loaded;

static int load_librbd(void)
{
    if (rbd_loaded)
        return 0;
    void *lib = dlopen("librbd.so.1", RTLD_NOW);
    if (lib == NULL) {
        PyErr_Format(PyExc_OSError, "librbd.so.1 does not load (%s); install librbd1", dlerror());
        return -1;
    }
    static const char *names[] = {"rbd_aio_create_completion", "rbd_aio_release", "rbd_aio_get_arg",
                                  "rbd_aio_get_return_value", "rbd_poll_io_events", "rbd_aio_read",
                                  "rbd_aio_write", "rbd_aio_flush", "rbd_aio_discard", "rbd_aio_write_zeroes"};
    void **slots[] = {(void **)&rbd.create_completion, (void **)&rbd.release, (void **)&rbd.get_arg,
                      (void **)&rbd.get_return_value, (void **)&rbd.poll_io_events, (void **)&rbd.aio_read,
                      (void **)&rbd.aio_write, (void **)&rbd.aio_flush, (void **)&rbd.aio_discard,
                      (void **)&rbd.aio_write_zeroes};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *slots[i] = dlsym(lib, names[i]);
        if (*slots[i] == NULL) {
            PyErr_Format(PyExc_OSError, "librbd.so.1 lacks %s", names[i]);
            return -1;
        }
    }
    rbd_loaded = 1;
    return 0;
}

#define BATCH 64 /* completions taken per rbd_poll_io_events call */

typedef struct {
    PyObject_HEAD
    rbd_image_t image;
    int eventfd;
} Queue;

static int Queue_init(Queue *self, PyObject *args, PyObject *kwds)
{
    unsigned long long image;
    int eventfd;
    static char *kwlist[] = {"image", "eventfd", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ki", kwlist, &image, &eventfd))
        return -1;
    if (load_librbd() < 0)
        return -1;
    self->image = (rbd_image_t)(uintptr_t)image;
    self->eventfd = eventfd;
    return 0;
}

enum op { OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES };

/* Make a completion whose argument is key and submit op with it: 0, or librbd's -errno (nothing left behind). */
static PyObject *submit(Queue *self, enum op op, unsigned long long key, uint64_t offset, char *data, uint64_t length)
{
    rbd_completion_t c = NULL;
    int ret = rbd.create_completion((void *)(uintptr_t)key, NULL, &c);
    if (ret < 0)
        return PyLong_FromLong(ret);
    switch (op) {
    case OP_READ:
        ret = rbd.aio_read(self->image, offset, (size_t)length, data, c);
        break;
    case OP_WRITE:
        ret = rbd.aio_write(self->image, offset, (size_t)length, data, c);
        break;
    case OP_FLUSH:
        ret = rbd.aio_flush(self->image, c);
        break;
    case OP_DISCARD:
        ret = rbd.aio_discard(self->image, offset, length, c);
        break;
    case OP_WRITE_ZEROES:
        ret = rbd.aio_write_zeroes(self->image, offset, (size_t)length, c, 0, 0);
        break;
    }
    if (ret < 0) {
        rbd.release(c);
        return PyLong_FromLong(ret);
    }
    return PyLong_FromLong(0);
}

/* read and write: (key, offset, buffer); the caller keeps the buffer's object alive until reap() returns key. */
static PyObject *buffer_op(Queue *self, PyObject *args, enum op op)
{
    unsigned long long key, offset;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, op == OP_READ ? "KKw*" : "KKy*", &key, &offset, &buf))
        return NULL;
    char *data = buf.buf;
    uint64_t length = (uint64_t)buf.len;
    PyBuffer_Release(&buf);
    return submit(self, op, key, offset, data, length);
}

/* discard and write_zeroes: (key, offset, length). */
static PyObject *range_op(Queue *self, PyObject *args, enum op op)
{
    unsigned long long key, offset, length;
    if (!PyArg_ParseTuple(args, "KKK", &key, &offset, &length))
        return NULL;
    return submit(self, op, key, offset, NULL, length);
}

static PyObject *Queue_read(Queue *self, PyObject *args) { return buffer_op(self, args, OP_READ); }
static PyObject *Queue_write(Queue *self, PyObject *args) { return buffer_op(self, args, OP_WRITE); }
static PyObject *Queue_discard(Queue *self, PyObject *args) { return range_op(self, args, OP_DISCARD); }
static PyObject *Queue_write_zeroes(Queue *self, PyObject *args) { return range_op(self, args, OP_WRITE_ZEROES); }

static PyObject *Queue_flush(Queue *self, PyObject *arg)
{
    unsigned long long key = PyLong_AsUnsignedLongLong(arg);
    if (key == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return submit(self, OP_FLUSH, key, 0, NULL, 0);
}

static PyObject *Queue_reap(Queue *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t count;
    if (read(self->eventfd, &count, sizeof(count)) < 0) { /* reset first: a completion after the poll signals again */
        if (errno == EAGAIN)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *done = PyList_New(0);
    if (done == NULL)
        return NULL;
    rbd_completion_t comps[BATCH];
    int n;
    do {
        n = rbd.poll_io_events(self->image, comps, BATCH);
        for (int i = 0; i < n; i++) {
            PyObject *item = NULL;
            if (done != NULL) {
                item = Py_BuildValue("(Kn)", (unsigned long long)(uintptr_t)rbd.get_arg(comps[i]),
                                     (Py_ssize_t)rbd.get_return_value(comps[i]));
                if (item == NULL || PyList_Append(done, item) < 0)
                    Py_CLEAR(done); /* still release every completion taken */
                Py_XDECREF(item);
            }
            rbd.release(comps[i]);
        }
    } while (n == BATCH);
    if (n < 0 && done != NULL) {
        Py_DECREF(done);
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return done;
}

static PyMethodDef Queue_methods[] = {
    {"read", (PyCFunction)Queue_read, METH_VARARGS, "read(key, offset, buffer) -> 0 or -errno: fill buffer"},
    {"write", (PyCFunction)Queue_write, METH_VARARGS, "write(key, offset, buffer) -> 0 or -errno"},
    {"flush", (PyCFunction)Queue_flush, METH_O, "flush(key) -> 0 or -errno"},
    {"discard", (PyCFunction)Queue_discard, METH_VARARGS, "discard(key, offset, length) -> 0 or -errno"},
    {"write_zeroes", (PyCFunction)Queue_write_zeroes, METH_VARARGS, "write_zeroes(key, offset, length) -> 0 or -errno"},
    {"reap", (PyCFunction)Queue_reap, METH_NOARGS, "reap() -> [(key, return value)]: the finished requests"},
    {NULL},
};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmuserd.backends._rbd_native.Queue",
    .tp_doc = "An open image's asynchronous requests (see the module doc).",
    .tp_basicsize = sizeof(Queue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Queue_init,
    .tp_methods = Queue_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rbd_native",
    "librbd's asynchronous calls for backends/rbd.py, one C call per submit and per batch of completions.", -1, NULL,
};

PyMODINIT_FUNC PyInit__rbd_native(void)
{
    if (PyType_Ready(&QueueType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&QueueType);
    if (PyModule_AddObject(m, "Queue", (PyObject *)&QueueType) < 0) {
        Py_DECREF(&QueueType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
