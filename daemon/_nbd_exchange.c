/* One request of the NBD plugin on a slotted channel, without the GIL.
 *
 * daemon/nbdkit_plugin.py runs in nbdkit's embedded interpreter, one nbdkit
 * worker thread per request. Waiting for the daemon's answer must release
 * the GIL, and every time a thread takes it back while nbdkit's other
 * threads want it too costs futex calls and a context switch. This call
 * does the whole exchange in one release: copy a WRITE's data into its
 * shared slot, send the request frame (header and slot word), receive the
 * 40-byte answer header, and copy a successful READ's data from its slot
 * into nbdkit's buffer. The plugin loads
 * it by path (it does not import the dmuserd package: nbdkit's Python is
 * Debian's, not the daemon's virtualenv), and uses its Python code for the
 * same steps where this module was not built.
 *
 *     exchange(fd, frame, answer, src, dst, write=False) -> (seq, type)
 *
 * fd: the channel socket (blocking); frame: the bytes to send; answer: a
 * writable buffer of at least 40 bytes for the answer header; src, dst (of
 * the same length): for a READ, the slot and nbdkit's buffer, copied when
 * the answer is SUCCESS; with write true, nbdkit's buffer and the slot,
 * copied before the frame is sent; None and None for a request without
 * data in a slot. Raises OSError (ECONNRESET
 * when the daemon closed the channel): the plugin then re-sends the
 * request to the next daemon.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define HEADER_SIZE 40
#define SUCCESS 0

static int exchange_io(int fd, const char *frame, size_t frame_len, char *answer,
                       const char *src, char *dst, size_t len, int write)
{
    size_t done = 0;
    if (write)
        memcpy(dst, src, len);
    while (done < frame_len) {
        ssize_t n = send(fd, frame + done, frame_len - done, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        done += (size_t)n;
    }
    done = 0;
    while (done < HEADER_SIZE) {
        ssize_t n = recv(fd, answer + done, HEADER_SIZE - done, MSG_WAITALL);
        if (n == 0)
            return ECONNRESET;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        done += (size_t)n;
    }
    if (dst != NULL && !write) {
        uint64_t type;
        memcpy(&type, answer + 8, sizeof type);  /* little-endian, as the wire and this host */
        if (type == SUCCESS)
            memcpy(dst, src, len);
    }
    return 0;
}

static PyObject *exchange(PyObject *self, PyObject *args)
{
    int fd, write = 0;
    Py_buffer frame, answer, src = {0}, dst = {0};
    PyObject *src_obj, *dst_obj, *result = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "iy*w*OO|p", &fd, &frame, &answer, &src_obj, &dst_obj, &write))
        return NULL;
    if (answer.len < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "the answer buffer holds less than a header");
        goto out;
    }
    if (dst_obj != Py_None) {
        if (PyObject_GetBuffer(src_obj, &src, PyBUF_SIMPLE) < 0)
            goto out;
        if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
            goto out;
        if (src.len != dst.len) {
            PyErr_SetString(PyExc_ValueError, "the slot and the destination differ in length");
            goto out;
        }
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = exchange_io(fd, frame.buf, (size_t)frame.len, answer.buf, src.buf, dst.buf, (size_t)dst.len, write);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    uint64_t seq, type;
    memcpy(&seq, (char *)answer.buf, sizeof seq);
    memcpy(&type, (char *)answer.buf + 8, sizeof type);
    result = Py_BuildValue("(KK)", (unsigned long long)seq, (unsigned long long)type);
out:
    PyBuffer_Release(&frame);
    PyBuffer_Release(&answer);
    if (src.obj != NULL)
        PyBuffer_Release(&src);
    if (dst.obj != NULL)
        PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"exchange", exchange, METH_VARARGS,
     "exchange(fd, frame, answer, src, dst, write=False) -> (seq, type): one request and its answer without the GIL"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_nbd_exchange",
    "One NBD plugin request on a slotted channel without the GIL (see daemon/nbdkit_plugin.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__nbd_exchange(void)
{
    return PyModule_Create(&module);
}
