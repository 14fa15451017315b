/*
 * dmuserd.daemon.ublk._uring: the little of io_uring the ublk export needs.
 *
 * Why C: ublk is driven by IORING_OP_URING_CMD submissions (control
 * commands on /dev/ublk-control, FETCH/COMMIT commands on /dev/ublkcN) and
 * Python has no io_uring. This wraps liburing and exposes exactly:
 *
 *   Ring(entries, setup_flags)      an io_uring (setup_flags: SETUP_SQE128,
 *                                   SETUP_CQE32) with an eventfd registered for
 *                                   its completions (Ring.eventfd: non-blocking,
 *                                   close-on-exec), so that trio waits on it with
 *                                   trio.lowlevel.wait_readable: no polling, no
 *                                   thread.
 *   Ring.uring_cmd(fd, cmd_op, cmd, user_data, sqe_flags=0)
 *                                   queue one URING_CMD; `cmd` (bytes-like, at
 *                                   most 16 bytes, 80 with SQE128) is copied into
 *                                   the SQE. When the SQ is full the queued ones
 *                                   are submitted first.
 *   Ring.submit() -> int            io_uring_enter: hand the queued SQEs over.
 *   Ring.completions() -> [(user_data, res), ...]
 *                                   reset the eventfd, then take every CQE there
 *                                   is (in that order, so a CQE posted meanwhile
 *                                   sets the eventfd again: no lost wake-up).
 *   Ring.close()                    unregister, close the ring and the eventfd.
 *   address(buffer) -> int          where a writable buffer (an mmap) lives: the
 *                                   I/O buffer address given to the kernel.
 *
 * Which task issues a command matters to ublk (a queue's commands must all
 * come from the task that fetched on it): everything here runs in the
 * calling thread, nothing is deferred.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <liburing.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    struct io_uring ring;
    int eventfd;
    int open;
    unsigned setup_flags;
} RingObject;

static PyObject *closed_error(void)
{
    PyErr_SetString(PyExc_ValueError, "the io_uring is closed");
    return NULL;
}

static int Ring_init(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"entries", "setup_flags", NULL};
    unsigned entries, flags = 0;
    struct io_uring_params params;
    int ret;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "I|I", kwlist, &entries, &flags))
        return -1;
    if (self->open) {
        PyErr_SetString(PyExc_ValueError, "Ring is initialised already");
        return -1;
    }
    memset(&params, 0, sizeof(params));
    params.flags = flags;
    ret = io_uring_queue_init_params(entries, &self->ring, &params);
    if (ret < 0) {
        errno = -ret;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->eventfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        io_uring_queue_exit(&self->ring);
        return -1;
    }
    ret = io_uring_register_eventfd(&self->ring, self->eventfd);
    if (ret < 0) {
        close(self->eventfd);
        io_uring_queue_exit(&self->ring);
        errno = -ret;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->setup_flags = flags;
    self->open = 1;
    return 0;
}

static void ring_close(RingObject *self)
{
    if (!self->open)
        return;
    self->open = 0;
    io_uring_unregister_eventfd(&self->ring);
    io_uring_queue_exit(&self->ring);
    close(self->eventfd);
    self->eventfd = -1;
}

static void Ring_dealloc(RingObject *self)
{
    ring_close(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    ring_close(self);
    Py_RETURN_NONE;
}

static PyObject *Ring_uring_cmd(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "cmd_op", "cmd", "user_data", "sqe_flags", NULL};
    int fd;
    unsigned cmd_op, sqe_flags = 0;
    unsigned long long user_data;
    Py_buffer cmd;
    struct io_uring_sqe *sqe;
    size_t room;

    if (!self->open)
        return closed_error();
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iIy*K|I", kwlist, &fd, &cmd_op, &cmd, &user_data, &sqe_flags))
        return NULL;
    room = (self->setup_flags & IORING_SETUP_SQE128) ? 80 : 16;
    if ((size_t)cmd.len > room) {
        PyErr_Format(PyExc_ValueError, "a command of %zd bytes does not fit in the SQE (%zu bytes)", cmd.len, room);
        PyBuffer_Release(&cmd);
        return NULL;
    }
    sqe = io_uring_get_sqe(&self->ring);
    if (sqe == NULL) {
        int ret = io_uring_submit(&self->ring);
        if (ret < 0) {
            PyBuffer_Release(&cmd);
            errno = -ret;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        sqe = io_uring_get_sqe(&self->ring);
        if (sqe == NULL) {
            PyBuffer_Release(&cmd);
            PyErr_SetString(PyExc_BlockingIOError, "the submission queue is full");
            return NULL;
        }
    }
    memset(sqe, 0, (self->setup_flags & IORING_SETUP_SQE128) ? 128 : sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->flags = (__u8)sqe_flags;
    sqe->cmd_op = cmd_op;
    sqe->user_data = user_data;
    memcpy(sqe->cmd, cmd.buf, (size_t)cmd.len);
    PyBuffer_Release(&cmd);
    Py_RETURN_NONE;
}

static PyObject *Ring_submit(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    int ret;

    if (!self->open)
        return closed_error();
    do {
        ret = io_uring_submit(&self->ring);
    } while (ret == -EINTR);
    if (ret < 0) {
        errno = -ret;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(ret);
}

static PyObject *Ring_completions(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    eventfd_t count;
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    PyObject *out;

    if (!self->open)
        return closed_error();
    (void)eventfd_read(self->eventfd, &count); /* EAGAIN when nothing was signalled: fine */
    out = PyList_New(0);
    if (out == NULL)
        return NULL;
    io_uring_for_each_cqe(&self->ring, head, cqe) {
        PyObject *item = Py_BuildValue("(Ki)", (unsigned long long)cqe->user_data, cqe->res);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            io_uring_cq_advance(&self->ring, seen);
            return NULL;
        }
        Py_DECREF(item);
        seen++;
    }
    io_uring_cq_advance(&self->ring, seen);
    return out;
}

static PyObject *Ring_get_eventfd(RingObject *self, void *Py_UNUSED(closure))
{
    if (!self->open)
        return closed_error();
    return PyLong_FromLong(self->eventfd);
}

static PyObject *Ring_get_fd(RingObject *self, void *Py_UNUSED(closure))
{
    if (!self->open)
        return closed_error();
    return PyLong_FromLong(self->ring.ring_fd);
}

static PyMethodDef Ring_methods[] = {
    {"uring_cmd", (PyCFunction)(void (*)(void))Ring_uring_cmd, METH_VARARGS | METH_KEYWORDS,
     "uring_cmd(fd, cmd_op, cmd, user_data, sqe_flags=0): queue one IORING_OP_URING_CMD"},
    {"submit", (PyCFunction)Ring_submit, METH_NOARGS, "submit() -> int: hand the queued SQEs to the kernel"},
    {"completions", (PyCFunction)Ring_completions, METH_NOARGS,
     "completions() -> [(user_data, res)]: reset the eventfd, take every CQE"},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "close(): release the ring and its eventfd"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"eventfd", (getter)Ring_get_eventfd, NULL, "the eventfd signalled on completions", NULL},
    {"fd", (getter)Ring_get_fd, NULL, "the io_uring file descriptor", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dmuserd.daemon.ublk._uring.Ring",
    .tp_doc = "An io_uring for URING_CMD submissions, its completions signalled on an eventfd.",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

static PyObject *address(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    PyObject *out;

    if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    out = PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)view.buf);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"address", address, METH_O, "address(buffer) -> int: where a writable buffer lives in memory"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dmuserd.daemon.ublk._uring",
    .m_doc = "The io_uring URING_CMD submissions and eventfd completions the ublk export needs.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__uring(void)
{
    PyObject *m;

    if (PyType_Ready(&RingType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0
        || PyModule_AddIntConstant(m, "SETUP_SQE128", IORING_SETUP_SQE128) < 0
        || PyModule_AddIntConstant(m, "SETUP_CQE32", IORING_SETUP_CQE32) < 0
        || PyModule_AddIntConstant(m, "SQE_ASYNC", IOSQE_ASYNC) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
