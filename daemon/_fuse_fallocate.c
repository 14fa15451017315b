/*
 * dmuserd.daemon._fuse_fallocate: give pyfuse3 a FUSE fallocate handler.
 *
 * Why: pyfuse3 (3.5) fills in a struct fuse_lowlevel_ops without .fallocate,
 * so libfuse answers every FUSE_FALLOCATE with ENOSYS (and the kernel then
 * stops sending them for the whole mount). A loop device on a FUSE file turns
 * discard into fallocate(PUNCH_HOLE|KEEP_SIZE) and write-zeroes into
 * fallocate(ZERO_RANGE|KEEP_SIZE), so without a handler both fail.
 *
 * How: this shared object defines fuse_session_new() and
 * fuse_session_destroy() itself. dmuserd.daemon.fuse_fallocate.install()
 * loads it with RTLD_GLOBAL *before* pyfuse3 is imported; when pyfuse3's
 * extension is then dlopen()ed, glibc resolves its references in the global
 * scope first, so its fuse_session_new@FUSE_3.0 binds here. (Our definition is
 * unversioned; glibc accepts an unversioned definition for a versioned
 * reference, see check_match() in elf/dl-lookup.c.) Our fuse_session_new()
 * copies the caller's ops table, adds .fallocate = ll_fallocate when the
 * caller left it NULL, and calls libfuse's real function (dlvsym(RTLD_NEXT)).
 *
 * ll_fallocate() runs inside fuse_session_process_buf(), which pyfuse3 calls
 * from a trio task with the GIL held. It calls the Python handler registered
 * with set_handler() as fn(req, ino, mode, offset, length). The handler must
 * not block: it schedules the work and the answer goes out later through
 * reply(req, errno). The request stays valid until then.
 *
 * Outstanding requests are kept in a set (keyed by the fuse_req_t as an int),
 * so reply() can refuse unknown or already answered requests instead of
 * touching freed memory, and our fuse_session_destroy() can answer EIO to
 * whatever is still outstanding before libfuse frees the session.
 *
 * Everything that touches Python state holds the GIL (PyGILState_Ensure is
 * cheap when the calling thread already holds it, which is the normal case).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* RTLD_NEXT, dlvsym */
#endif
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 35
#endif
#include <fuse_lowlevel.h>

/* The symbol version pyfuse3 (and every libfuse3 user) references. */
#define FUSE_SYMVER "FUSE_3.0"

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
                                               void *);
typedef void (*session_destroy_fn)(struct fuse_session *);

static session_new_fn real_session_new;
static session_destroy_fn real_session_destroy;

static PyObject *handler; /* callable or NULL; protected by the GIL */
static PyObject *pending; /* set of int(fuse_req_t) not answered yet */
static Py_ssize_t n_pending;  /* len(pending), readable without the GIL in a pinch */
static unsigned long n_sessions;  /* sessions that got our fallocate */

static void *
find_real(const char *name)
{
    void *sym = dlvsym(RTLD_NEXT, name, FUSE_SYMVER);
    if (sym == NULL)
        sym = dlsym(RTLD_NEXT, name);
    if (sym == NULL) {
        /* Not in our scope after us (should not happen: we link libfuse3):
           ask libfuse3 directly. */
        void *lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
        if (lib != NULL) {
            sym = dlvsym(lib, name, FUSE_SYMVER);
            if (sym == NULL)
                sym = dlsym(lib, name);
        }
    }
    return sym;
}

/* Send the answer for req and forget it. Caller holds the GIL. Returns 1 if
   req was outstanding (and is now answered), 0 if not, -1 on a Python error. */
static int
answer(PyObject *key, int err)
{
    int found = PySet_Discard(pending, key);
    if (found != 1)
        return found;
    n_pending--;
    fuse_req_t req = (fuse_req_t)PyLong_AsVoidPtr(key);
    /* A short write to /dev/fuse; not worth dropping the GIL (and keeping it
       makes a concurrent fuse_session_destroy impossible). */
    fuse_reply_err(req, err);
    return 1;
}

static void
ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length, struct fuse_file_info *fi)
{
    (void)fi;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *exc_type, *exc_value, *exc_tb;
    PyObject *fn = handler, *key, *res;

    /* Whatever Python error state the caller had is not ours to lose. */
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb);

    if (fn == NULL) {
        /* EOPNOTSUPP, not ENOSYS: the caller sees the same error, but the
           kernel keeps asking, so a handler set later still gets requests. */
        fuse_reply_err(req, EOPNOTSUPP);
        goto out;
    }
    key = PyLong_FromVoidPtr(req);
    if (key == NULL || PySet_Add(pending, key) < 0) {
        PyErr_Clear();
        Py_XDECREF(key);
        fuse_reply_err(req, ENOMEM);
        goto out;
    }
    n_pending++;

    Py_INCREF(fn); /* set_handler() may replace it while it runs */
    res = PyObject_CallFunction(fn, "OKiLL", key, (unsigned long long)ino, mode, (long long)offset,
                                (long long)length);
    Py_DECREF(fn);
    if (res == NULL) {
        /* The handler raised (the Python wrapper logs and answers itself;
           this is the last resort). Answer EIO unless it already answered. */
        int interrupted = PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
        PyErr_Clear();
        if (answer(key, EIO) < 0)
            PyErr_Clear();
        if (interrupted)
            PyErr_SetInterrupt(); /* re-deliver Ctrl-C where it can be handled */
    }
    Py_XDECREF(res);
    Py_DECREF(key);
out:
    PyErr_Restore(exc_type, exc_value, exc_tb);
    PyGILState_Release(gil);
}

/* ---- the interposed libfuse entry points -------------------------------- */

struct fuse_session *
fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op, size_t op_size, void *userdata)
{
    const size_t need = offsetof(struct fuse_lowlevel_ops, fallocate) + sizeof(op->fallocate);
    struct fuse_lowlevel_ops *ops;
    struct fuse_session *se;
    size_t size;

    if (real_session_new == NULL) {
        real_session_new = (session_new_fn)find_real("fuse_session_new");
        if (real_session_new == NULL) {
            errno = ENOSYS;
            return NULL;
        }
    }
    if (op == NULL)
        return real_session_new(args, op, op_size, userdata);

    /* Copy op_size bytes (the caller's struct may be newer or older than
       ours), make room for .fallocate, fill it in if the caller did not. */
    size = op_size > need ? op_size : need;
    ops = calloc(1, size);
    if (ops == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    memcpy(ops, op, op_size);
    if (ops->fallocate == NULL) {
        ops->fallocate = ll_fallocate;
        __atomic_add_fetch(&n_sessions, 1, __ATOMIC_RELAXED);
    }
    /* libfuse copies the table into the session (memcpy(&se->op, op,
       op_size)), so ours can go once it returns. */
    se = real_session_new(args, ops, size, userdata);
    free(ops);
    return se;
}

void
fuse_session_destroy(struct fuse_session *se)
{
    if (real_session_destroy == NULL)
        real_session_destroy = (session_destroy_fn)find_real("fuse_session_destroy");

    /* Answer what is still outstanding (EIO) so nothing replies to a freed
       session later. pyfuse3 has one session per process; with several
       sessions this also answers the other sessions' requests, which is safe
       (they are valid) if not pretty. */
    if (__atomic_load_n(&n_pending, __ATOMIC_RELAXED) > 0 && Py_IsInitialized()) {
        PyGILState_STATE gil = PyGILState_Ensure();
        PyObject *exc_type, *exc_value, *exc_tb;
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        PyObject *keys = PySequence_List(pending);
        if (keys != NULL) {
            /* Stop libfuse from perror()ing when the device is already gone. */
            fuse_session_exit(se);
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
                if (answer(PyList_GET_ITEM(keys, i), EIO) < 0)
                    PyErr_Clear();
            }
            Py_DECREF(keys);
        }
        PyErr_Clear();
        PyErr_Restore(exc_type, exc_value, exc_tb);
        PyGILState_Release(gil);
    }
    if (real_session_destroy != NULL)
        real_session_destroy(se);
}

/* ---- Python API ---------------------------------------------------------- */

PyDoc_STRVAR(set_handler_doc,
             "set_handler(fn)\n--\n\n"
             "Register fn(req, ino, mode, offset, length) for FUSE fallocate requests (None removes it).\n"
             "fn runs inside pyfuse3's request processing: it must not block; it schedules the work and\n"
             "the answer goes out with reply(req, errno). Without a handler requests get EOPNOTSUPP.");

static PyObject *
py_set_handler(PyObject *self, PyObject *fn)
{
    (void)self;
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "handler must be callable or None");
        return NULL;
    }
    PyObject *old = handler;
    if (fn == Py_None) {
        handler = NULL;
    } else {
        Py_INCREF(fn);
        handler = fn;
    }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(reply_doc,
             "reply(req, err) -> bool\n--\n\n"
             "Answer fallocate request req with errno err (0 for success). Returns False, sending\n"
             "nothing, when req is not outstanding (already answered, or its session has gone).");

static PyObject *
py_reply(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *key;
    int err, r;

    if (!PyArg_ParseTuple(args, "O!i:reply", &PyLong_Type, &key, &err))
        return NULL;
    if (err < 0 || err >= 1000) { /* libfuse turns anything else into ERANGE */
        PyErr_Format(PyExc_ValueError, "err must be 0 or a positive errno below 1000, not %d", err);
        return NULL;
    }
    r = answer(key, err);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

PyDoc_STRVAR(pending_doc, "pending() -> int\n--\n\nNumber of fallocate requests not answered yet.");

static PyObject *
py_pending(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromSsize_t(PySet_GET_SIZE(pending));
}

PyDoc_STRVAR(sessions_doc,
             "sessions() -> int\n--\n\n"
             "Number of FUSE sessions created through this shim with our fallocate handler. Zero after\n"
             "pyfuse3.init() means pyfuse3 did not bind to the shim (it was loaded first).");

static PyObject *
py_sessions(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLong(__atomic_load_n(&n_sessions, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"set_handler", py_set_handler, METH_O, set_handler_doc},
    {"reply", py_reply, METH_VARARGS, reply_doc},
    {"pending", py_pending, METH_NOARGS, pending_doc},
    {"sessions", py_sessions, METH_NOARGS, sessions_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dmuserd.daemon._fuse_fallocate",
    .m_doc = "FUSE fallocate for pyfuse3 (interposes fuse_session_new); use dmuserd.daemon.fuse_fallocate.",
    .m_size = -1, /* process-wide state, like libfuse's */
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__fuse_fallocate(void)
{
    real_session_new = (session_new_fn)find_real("fuse_session_new");
    real_session_destroy = (session_destroy_fn)find_real("fuse_session_destroy");
    if (real_session_new == NULL || real_session_destroy == NULL) {
        PyErr_SetString(PyExc_ImportError, "libfuse3's fuse_session_new/fuse_session_destroy not found");
        return NULL;
    }
    if (pending == NULL) {
        pending = PySet_New(NULL);
        if (pending == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddStringConstant(m, "FUSE_SYMBOL_VERSION", FUSE_SYMVER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
