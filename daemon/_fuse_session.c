/*
 * dmuserd.daemon._fuse_session: a libfuse low-level session that hands each
 * FUSE request to Python as one small event tuple (daemon/fuse.py serves it).
 *
 * Why: pyfuse3 costs ~125k instructions per request (a trio wait, a lock and
 * a coroutine per request, its Cython wrappers) where the work of a 4 KiB
 * read is a small part of that. Here the trio side reads requests while they
 * come (the /dev/fuse fd is non-blocking; it waits for readability only when
 * none is left), libfuse decodes them, and one tuple per request reaches
 * Python. Requests a block file never needs Python for (RELEASE, FLUSH,
 * FORGET...) are answered here.
 *
 * Session(mountpoint, options) mounts (libfuse: mount(2) as root, fusermount3
 * otherwise). next() returns the next request as (op, request, args...), None
 * when none is waiting, and raises EOFError once the file system is gone.
 * A Request is answered once, by one of its methods; one dropped unanswered
 * (a bug, a cancelled task) answers EIO, so no caller ever hangs. close()
 * answers EIO to every request still outstanding, then unmounts: libfuse's
 * request memory belongs to the session and must not outlive it.
 *
 * Everything runs in the trio thread with the GIL held: no locks.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>

#include <fuse_lowlevel.h>

enum {
    OP_LOOKUP = 1,
    OP_GETATTR,
    OP_SETATTR,
    OP_OPEN,
    OP_READ,
    OP_WRITE,
    OP_FSYNC,
    OP_OPENDIR,
    OP_READDIR,
    OP_STATFS,
    OP_FALLOCATE,
};

#define MAX_IOV 64

typedef struct SessionObject SessionObject;

typedef struct RequestObject {
    PyObject_HEAD
    fuse_req_t req;                 /* NULL once answered (or the session closed) */
    SessionObject *session;         /* borrowed: close() detaches every outstanding request */
    struct RequestObject *prev, *next;
    struct fuse_file_info fi;       /* OPEN/OPENDIR: what fuse_reply_open sends back */
} RequestObject;

struct SessionObject {
    PyObject_HEAD
    struct fuse_session *se;
    struct fuse_buf buf;
    int fd;
    PyObject *pending;              /* the event the request being processed produced */
    RequestObject *outstanding;     /* doubly linked */
};

static PyTypeObject RequestType;

/* -- requests ------------------------------------------------------------- */

static void unlink_request(RequestObject *r)
{
    SessionObject *s = r->session;
    if (s == NULL)
        return;
    if (r->prev)
        r->prev->next = r->next;
    else
        s->outstanding = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;
    r->session = NULL;
}

/* The request to answer now, or NULL (answered already, or its session closed). */
static fuse_req_t take(RequestObject *r)
{
    fuse_req_t req = r->req;
    r->req = NULL;
    unlink_request(r);
    return req;
}

static RequestObject *new_request(SessionObject *s, fuse_req_t req)
{
    RequestObject *r = PyObject_New(RequestObject, &RequestType);
    if (r == NULL)
        return NULL;
    r->req = req;
    r->session = s;
    r->prev = NULL;
    r->next = s->outstanding;
    if (s->outstanding)
        s->outstanding->prev = r;
    s->outstanding = r;
    memset(&r->fi, 0, sizeof r->fi);
    return r;
}

static void Request_dealloc(RequestObject *r)
{
    fuse_req_t req = take(r);
    if (req)
        fuse_reply_err(req, EIO);   /* dropped unanswered: the caller must not hang */
    PyObject_Free(r);
}

static PyObject *sent(int res)
{
    return PyBool_FromLong(res == 0);
}

static PyObject *Request_error(RequestObject *r, PyObject *arg)
{
    int err = (int)PyLong_AsLong(arg);
    if (err == -1 && PyErr_Occurred())
        return NULL;
    if (err < 0 || err > 4095)
        err = EIO;     /* 0: success, an answer without data */
    fuse_req_t req = take(r);
    if (!req)
        Py_RETURN_FALSE;
    return sent(fuse_reply_err(req, err));
}

/* data(buffer) or data([buffers...]): the READ's bytes, gathered by writev. */
static PyObject *Request_data(RequestObject *r, PyObject *arg)
{
    Py_buffer views[MAX_IOV];
    struct iovec iov[MAX_IOV];
    Py_ssize_t n = 0;
    PyObject *result = NULL;

    if (!r->req)
        Py_RETURN_FALSE;
    if (PyList_CheckExact(arg) || PyTuple_CheckExact(arg)) {
        Py_ssize_t count = PySequence_Fast_GET_SIZE(arg);
        if (count > MAX_IOV) {
            PyErr_Format(PyExc_ValueError, "data(): %zd buffers, at most %d", count, MAX_IOV);
            return NULL;
        }
        PyObject **items = PySequence_Fast_ITEMS(arg);
        for (; n < count; n++) {
            if (PyObject_GetBuffer(items[n], &views[n], PyBUF_SIMPLE) < 0)
                goto done;
            iov[n].iov_base = views[n].buf;
            iov[n].iov_len = (size_t)views[n].len;
        }
    } else {
        if (PyObject_GetBuffer(arg, &views[0], PyBUF_SIMPLE) < 0)
            return NULL;
        iov[0].iov_base = views[0].buf;
        iov[0].iov_len = (size_t)views[0].len;
        n = 1;
    }
    fuse_req_t req = take(r);
    int res = n == 1 ? fuse_reply_buf(req, iov[0].iov_base, iov[0].iov_len) : fuse_reply_iov(req, iov, (int)n);
    result = sent(res);
done:
    while (n > 0)
        PyBuffer_Release(&views[--n]);
    return result;
}

static PyObject *Request_written(RequestObject *r, PyObject *arg)
{
    size_t count = PyLong_AsSize_t(arg);
    if (count == (size_t)-1 && PyErr_Occurred())
        return NULL;
    fuse_req_t req = take(r);
    if (!req)
        Py_RETURN_FALSE;
    return sent(fuse_reply_write(req, count));
}

/* attr: (ino, mode, nlink, size, uid, gid, blksize, blocks, time_ns) */
static int fill_stat(PyObject *attr, struct stat *st)
{
    unsigned long long ino, size, blocks, time_ns;
    unsigned int mode, nlink, uid, gid, blksize;
    if (!PyArg_ParseTuple(attr, "KIIKIIIKK;attr: (ino, mode, nlink, size, uid, gid, blksize, blocks, time_ns)",
                          &ino, &mode, &nlink, &size, &uid, &gid, &blksize, &blocks, &time_ns))
        return -1;
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_mode = mode;
    st->st_nlink = nlink;
    st->st_size = (off_t)size;
    st->st_uid = uid;
    st->st_gid = gid;
    st->st_blksize = blksize;
    st->st_blocks = (blkcnt_t)blocks;
    st->st_atim.tv_sec = st->st_mtim.tv_sec = st->st_ctim.tv_sec = (time_t)(time_ns / 1000000000ULL);
    st->st_atim.tv_nsec = st->st_mtim.tv_nsec = st->st_ctim.tv_nsec = (long)(time_ns % 1000000000ULL);
    return 0;
}

static PyObject *Request_attr(RequestObject *r, PyObject *args)
{
    PyObject *attr;
    double timeout;
    struct stat st;
    if (!PyArg_ParseTuple(args, "O!d", &PyTuple_Type, &attr, &timeout) || fill_stat(attr, &st) < 0)
        return NULL;
    fuse_req_t req = take(r);
    if (!req)
        Py_RETURN_FALSE;
    return sent(fuse_reply_attr(req, &st, timeout));
}

static PyObject *Request_entry(RequestObject *r, PyObject *args)
{
    PyObject *attr;
    double timeout;
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    if (!PyArg_ParseTuple(args, "O!d", &PyTuple_Type, &attr, &timeout) || fill_stat(attr, &e.attr) < 0)
        return NULL;
    e.ino = e.attr.st_ino;
    e.attr_timeout = e.entry_timeout = timeout;
    fuse_req_t req = take(r);
    if (!req)
        Py_RETURN_FALSE;
    return sent(fuse_reply_entry(req, &e));
}

/* open(fh, direct_io): the file handle later requests carry; direct_io: no page cache in FUSE. */
static PyObject *Request_open(RequestObject *r, PyObject *args)
{
    unsigned long long fh;
    int direct_io;
    if (!PyArg_ParseTuple(args, "Kp", &fh, &direct_io))
        return NULL;
    r->fi.fh = fh;
    r->fi.direct_io = direct_io ? 1 : 0;
    r->fi.keep_cache = 0;
    fuse_req_t req = take(r);
    if (!req)
        Py_RETURN_FALSE;
    return sent(fuse_reply_open(req, &r->fi));
}

/* statfs(bsize, blocks, files, namemax): a full file system of fixed files. */
static PyObject *Request_statfs(RequestObject *r, PyObject *args)
{
    unsigned long bsize, namemax;
    unsigned long long blocks, files;
    struct statvfs sv;
    if (!PyArg_ParseTuple(args, "kKKk", &bsize, &blocks, &files, &namemax))
        return NULL;
    memset(&sv, 0, sizeof sv);
    sv.f_bsize = sv.f_frsize = bsize;
    sv.f_blocks = blocks;
    sv.f_files = files;
    sv.f_namemax = namemax;
    fuse_req_t req = take(r);
    if (!req)
        Py_RETURN_FALSE;
    return sent(fuse_reply_statfs(req, &sv));
}

/* dirents(size, [(name, ino, mode, next_offset), ...]): as many as fit in size bytes. */
static PyObject *Request_dirents(RequestObject *r, PyObject *args)
{
    Py_ssize_t size;
    PyObject *entries;
    if (!PyArg_ParseTuple(args, "nO!", &size, &PyList_Type, &entries))
        return NULL;
    if (!r->req)
        Py_RETURN_FALSE;
    if (size < 0 || size > (1 << 20))
        size = 1 << 20;
    char *buf = PyMem_Malloc(size ? (size_t)size : 1);
    if (!buf)
        return PyErr_NoMemory();
    size_t used = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(entries); i++) {
        const char *name;
        unsigned long long ino, next;
        unsigned int mode;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(entries, i), "yKIK;dirent: (name, ino, mode, next_offset)",
                              &name, &ino, &mode, &next)) {
            PyMem_Free(buf);
            return NULL;
        }
        struct stat st;
        memset(&st, 0, sizeof st);
        st.st_ino = ino;
        st.st_mode = mode;
        size_t need = fuse_add_direntry(r->req, buf + used, (size_t)size - used, name, &st, (off_t)next);
        if (need > (size_t)size - used)
            break;
        used += need;
    }
    fuse_req_t req = take(r);
    PyObject *result = sent(fuse_reply_buf(req, buf, used));
    PyMem_Free(buf);
    return result;
}

static PyObject *Request_get_answered(RequestObject *r, void *closure)
{
    return PyBool_FromLong(r->req == NULL);
}

static PyMethodDef Request_methods[] = {
    {"error", (PyCFunction)Request_error, METH_O, "error(errno): answer with an error; error(0): success without data."},
    {"data", (PyCFunction)Request_data, METH_O, "data(buffer | [buffers]): answer a READ with these bytes."},
    {"written", (PyCFunction)Request_written, METH_O, "written(count): answer a WRITE."},
    {"attr", (PyCFunction)Request_attr, METH_VARARGS, "attr(attr, timeout): answer GETATTR/SETATTR."},
    {"entry", (PyCFunction)Request_entry, METH_VARARGS, "entry(attr, timeout): answer LOOKUP."},
    {"open", (PyCFunction)Request_open, METH_VARARGS, "open(fh, direct_io): answer OPEN/OPENDIR."},
    {"statfs", (PyCFunction)Request_statfs, METH_VARARGS, "statfs(bsize, blocks, files, namemax)."},
    {"dirents", (PyCFunction)Request_dirents, METH_VARARGS, "dirents(size, [(name, ino, mode, next_offset)])."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Request_getset[] = {
    {"answered", (getter)Request_get_answered, NULL, "True once answered (or its session closed).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dmuserd.daemon._fuse_session.Request",
    .tp_basicsize = sizeof(RequestObject),
    .tp_dealloc = (destructor)Request_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One FUSE request, answered once by one of its methods (EIO if dropped unanswered).",
    .tp_methods = Request_methods,
    .tp_getset = Request_getset,
};

/* -- libfuse callbacks: each makes the event next() returns ---------------- */

/* Build (op, request, args...) from a Py_BuildValue format for the args. On
 * failure the request is answered EIO (by its dealloc) and the error cleared:
 * one request fails, the session goes on. */
static void emit(fuse_req_t req, int op, const char *fmt, ...)
{
    SessionObject *s = fuse_req_userdata(req);
    RequestObject *r = new_request(s, req);
    if (r == NULL) {
        PyErr_Clear();
        fuse_reply_err(req, ENOMEM);
        return;
    }
    va_list va;
    va_start(va, fmt);
    PyObject *args = Py_VaBuildValue(fmt, va);
    va_end(va);
    PyObject *event = NULL;
    if (args != NULL) {
        Py_ssize_t n = PyTuple_GET_SIZE(args);
        event = PyTuple_New(n + 2);
        if (event != NULL) {
            PyTuple_SET_ITEM(event, 0, PyLong_FromLong(op));
            PyTuple_SET_ITEM(event, 1, (PyObject *)r);
            r = NULL;
            for (Py_ssize_t i = 0; i < n; i++) {
                PyObject *item = PyTuple_GET_ITEM(args, i);
                Py_INCREF(item);
                PyTuple_SET_ITEM(event, i + 2, item);
            }
        }
        Py_DECREF(args);
    }
    Py_XDECREF(r);
    if (event == NULL) {
        PyErr_Clear();
        return;
    }
    Py_XSETREF(s->pending, event);
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    emit(req, OP_LOOKUP, "(Ky)", (unsigned long long)parent, name);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    emit(req, OP_GETATTR, "(K)", (unsigned long long)ino);
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
    emit(req, OP_SETATTR, "(KiL)", (unsigned long long)ino, to_set, (long long)attr->st_size);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    emit(req, OP_OPEN, "(Ki)", (unsigned long long)ino, fi->flags);
    SessionObject *s = fuse_req_userdata(req);
    if (s->pending)
        ((RequestObject *)PyTuple_GET_ITEM(s->pending, 1))->fi = *fi;
}

static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    emit(req, OP_OPENDIR, "(K)", (unsigned long long)ino);
    SessionObject *s = fuse_req_userdata(req);
    if (s->pending)
        ((RequestObject *)PyTuple_GET_ITEM(s->pending, 1))->fi = *fi;
}

static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    emit(req, OP_READDIR, "(KnL)", (unsigned long long)ino, (Py_ssize_t)size, (long long)off);
}

/* The hot path: built by hand, no format string. */
static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    SessionObject *s = fuse_req_userdata(req);
    RequestObject *r = new_request(s, req);
    PyObject *event = r ? PyTuple_New(5) : NULL;
    PyObject *op = PyLong_FromLong(OP_READ), *fh = PyLong_FromUnsignedLongLong(fi->fh);
    PyObject *o = PyLong_FromLongLong((long long)off), *n = PyLong_FromSize_t(size);
    if (event == NULL || !op || !fh || !o || !n) {
        Py_XDECREF(op); Py_XDECREF(fh); Py_XDECREF(o); Py_XDECREF(n);
        Py_XDECREF(event);
        if (r)
            Py_DECREF(r);           /* answers EIO */
        else
            fuse_reply_err(req, ENOMEM);
        PyErr_Clear();
        return;
    }
    PyTuple_SET_ITEM(event, 0, op);
    PyTuple_SET_ITEM(event, 1, (PyObject *)r);
    PyTuple_SET_ITEM(event, 2, fh);
    PyTuple_SET_ITEM(event, 3, o);
    PyTuple_SET_ITEM(event, 4, n);
    Py_XSETREF(s->pending, event);
}

/* buf lives in the session's receive buffer, reused for the next request: copied. */
static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    emit(req, OP_WRITE, "(KLy#)", (unsigned long long)fi->fh, (long long)off, buf, (Py_ssize_t)size);
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    emit(req, OP_FSYNC, "(Ki)", (unsigned long long)fi->fh, datasync);
}

static void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi)
{
    emit(req, OP_FALLOCATE, "(KiLL)", (unsigned long long)fi->fh, mode, (long long)offset, (long long)length);
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino)
{
    emit(req, OP_STATFS, "()");
}

/* A block file keeps no per-open state: these succeed here. */
static void ll_ok(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

static void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    fuse_reply_none(req);
}

static void ll_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    fuse_reply_none(req);
}

static const struct fuse_lowlevel_ops ll_ops = {
    .lookup = ll_lookup,
    .forget = ll_forget,
    .forget_multi = ll_forget_multi,
    .getattr = ll_getattr,
    .setattr = ll_setattr,
    .open = ll_open,
    .read = ll_read,
    .write = ll_write,
    .flush = ll_ok,
    .release = ll_ok,
    .fsync = ll_fsync,
    .opendir = ll_opendir,
    .readdir = ll_readdir,
    .releasedir = ll_ok,
    .statfs = ll_statfs,
    .fallocate = ll_fallocate,
};

/* -- the session ----------------------------------------------------------- */

static void close_session(SessionObject *s)
{
    if (s->se == NULL)
        return;
    while (s->outstanding) {
        RequestObject *r = s->outstanding;
        fuse_req_t req = take(r);
        if (req)
            fuse_reply_err(req, EIO);
    }
    Py_CLEAR(s->pending);
    fuse_session_unmount(s->se);
    fuse_session_destroy(s->se);    /* closes the fd */
    s->se = NULL;
    s->fd = -1;
    free(s->buf.mem);
    memset(&s->buf, 0, sizeof s->buf);
}

static int Session_init(SessionObject *s, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"mountpoint", "options", NULL};
    const char *mountpoint, *options;
    if (s->se) {
        PyErr_SetString(PyExc_RuntimeError, "Session is initialised already");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ss:Session", kwlist, &mountpoint, &options))
        return -1;
    char *argv[] = {"dmuserd", "-o", (char *)options, NULL};
    struct fuse_args fargs = FUSE_ARGS_INIT(3, argv);
    s->se = fuse_session_new(&fargs, &ll_ops, sizeof ll_ops, s);
    fuse_opt_free_args(&fargs);
    if (s->se == NULL) {
        PyErr_Format(PyExc_OSError, "libfuse refused the session (options %s)", options);
        return -1;
    }
    if (fuse_session_mount(s->se, mountpoint) != 0) {
        fuse_session_destroy(s->se);
        s->se = NULL;
        PyErr_Format(PyExc_OSError, "mounting FUSE at %s failed (libfuse said why on stderr)", mountpoint);
        return -1;
    }
    s->fd = fuse_session_fd(s->se);
    int flags = fcntl(s->fd, F_GETFL);
    if (flags < 0 || fcntl(s->fd, F_SETFL, flags | O_NONBLOCK) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close_session(s);
        return -1;
    }
    return 0;
}

static PyObject *Session_next(SessionObject *s, PyObject *unused)
{
    if (s->se == NULL) {
        PyErr_SetString(PyExc_ValueError, "the FUSE session is closed");
        return NULL;
    }
    for (;;) {
        int res = fuse_session_receive_buf(s->se, &s->buf);
        if (res == -EAGAIN || res == -EINTR)
            Py_RETURN_NONE;
        if (res == 0 || fuse_session_exited(s->se)) {
            PyErr_SetString(PyExc_EOFError, "the FUSE file system was unmounted");
            return NULL;
        }
        if (res < 0) {
            errno = -res;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        fuse_session_process_buf(s->se, &s->buf);
        if (s->pending) {
            PyObject *event = s->pending;
            s->pending = NULL;
            return event;
        }
    }
}

static PyObject *Session_close(SessionObject *s, PyObject *unused)
{
    close_session(s);
    Py_RETURN_NONE;
}

static PyObject *Session_get_fd(SessionObject *s, void *closure)
{
    return PyLong_FromLong(s->se ? s->fd : -1);
}

static PyObject *Session_get_outstanding(SessionObject *s, void *closure)
{
    long n = 0;
    for (RequestObject *r = s->outstanding; r; r = r->next)
        n++;
    return PyLong_FromLong(n);
}

static void Session_dealloc(SessionObject *s)
{
    close_session(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef Session_methods[] = {
    {"next", (PyCFunction)Session_next, METH_NOARGS,
     "next() -> (op, request, args...) | None: the next request (None: none waiting; EOFError: unmounted)."},
    {"close", (PyCFunction)Session_close, METH_NOARGS,
     "close(): answer EIO to outstanding requests, unmount, free the session (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Session_getset[] = {
    {"fd", (getter)Session_get_fd, NULL, "The /dev/fuse descriptor (non-blocking; -1 once closed).", NULL},
    {"outstanding", (getter)Session_get_outstanding, NULL, "Requests not answered yet.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dmuserd.daemon._fuse_session.Session",
    .tp_basicsize = sizeof(SessionObject),
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Session(mountpoint, options): a mounted libfuse low-level session (see the module doc).",
    .tp_methods = Session_methods,
    .tp_getset = Session_getset,
    .tp_init = (initproc)Session_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dmuserd.daemon._fuse_session",
    .m_doc = "A libfuse low-level session handing each request to Python as one event (daemon/fuse.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fuse_session(void)
{
    if (PyType_Ready(&SessionType) < 0 || PyType_Ready(&RequestType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Session", (PyObject *)&SessionType) < 0 ||
        PyModule_AddObjectRef(m, "Request", (PyObject *)&RequestType) < 0)
        goto fail;
    static const struct { const char *name; int value; } ops[] = {
        {"LOOKUP", OP_LOOKUP}, {"GETATTR", OP_GETATTR}, {"SETATTR", OP_SETATTR}, {"OPEN", OP_OPEN},
        {"READ", OP_READ}, {"WRITE", OP_WRITE}, {"FSYNC", OP_FSYNC}, {"OPENDIR", OP_OPENDIR},
        {"READDIR", OP_READDIR}, {"STATFS", OP_STATFS}, {"FALLOCATE", OP_FALLOCATE},
        {"SET_ATTR_SIZE", FUSE_SET_ATTR_SIZE},
    };
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (PyModule_AddIntConstant(m, ops[i].name, ops[i].value) < 0)
            goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
