/* Build a Request or Response (NamedTuples: tuple subclasses) from its fields in one C call.
 *
 * ``new_message(cls, *fields)`` is ``tuple.__new__(cls, fields)`` without its detour:
 * the slot wrapper checks its arguments, tuple's subtype constructor first
 * builds a plain tuple of the fields and then copies it into the instance, and
 * the NamedTuple's own ``__new__`` is a Python function before all that. Every
 * request of every export builds one Request and one Response, so on a 4 KiB
 * FUSE read each costs ~1.4k instructions that way and ~0.2k here
 * (protocol/_message.py: ``new_message``; without this module it is tuple.__new__).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
new_message(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs < 1 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "new_message(cls, *fields): cls must be a type");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    /* Only a tuple subclass whose instances are tuples and nothing more (a NamedTuple's
     * __slots__ = ()): anything else is built the long way, which checks it. */
    if (cls == &PyTuple_Type || !PyType_IsSubtype(cls, &PyTuple_Type)
        || cls->tp_basicsize != PyTuple_Type.tp_basicsize || cls->tp_itemsize != PyTuple_Type.tp_itemsize) {
        PyObject *fields = PyTuple_New(nargs - 1);
        if (fields == NULL)
            return NULL;
        for (Py_ssize_t i = 1; i < nargs; i++)
            PyTuple_SET_ITEM(fields, i - 1, Py_NewRef(args[i]));
        PyObject *made = PyObject_CallMethod((PyObject *)&PyTuple_Type, "__new__", "OO", cls, fields);
        Py_DECREF(fields);
        return made;
    }
    PyObject *obj = cls->tp_alloc(cls, nargs - 1);
    if (obj == NULL)
        return NULL;
    for (Py_ssize_t i = 1; i < nargs; i++)
        PyTuple_SET_ITEM(obj, i - 1, Py_NewRef(args[i]));
    return obj;
}

static PyMethodDef methods[] = {
    {"new_message", (PyCFunction)(void (*)(void))new_message, METH_FASTCALL,
     "new_message(cls, *fields): an instance of the tuple subclass cls holding fields, as tuple.__new__(cls, fields)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_records", "Request and Response built in one C call.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__records(void)
{
    return PyModule_Create(&module);
}
