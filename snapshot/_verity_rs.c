/*
 * The Reed-Solomon step of dm-verity FEC (snapshot/_verity.py), in C.
 *
 * feed(state, column, roots, table) advances the parity of many RS(255, 255 -
 * roots) codewords by one message byte each: codeword n takes column[n]
 * (0 past the column's end). state holds the codewords' parity end to end,
 * roots bytes each, which is libfec's layout of the FEC, so after the last
 * column the state is the output. table is 256 rows of roots bytes: row f is
 * f times the generator's coefficients, in the order the state needs them
 * (built by _verity._RsCode). The step for one codeword, with p its state:
 *
 *     f = d ^ p[0];  p[r] = p[r + 1] ^ table[f][r]  (r < roots - 1);  p[roots - 1] = table[f][roots - 1]
 *
 * The GIL is released while the loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_ROOTS 24

/* One step for count codewords from p, taking the bytes of d (zeros where d
 * is NULL). Inlined into step() with roots constant for the common cases, so
 * the compiler unrolls the shift there. */
static inline __attribute__((always_inline)) void
step_roots(uint8_t *p, const uint8_t *d, Py_ssize_t count, const uint8_t *table, int roots)
{
    for (Py_ssize_t n = 0; n < count; n++, p += roots) {
        const uint8_t *row = table + (size_t)(p[0] ^ (d ? d[n] : 0)) * roots;
        for (int r = 0; r < roots - 1; r++)
            p[r] = p[r + 1] ^ row[r];
        p[roots - 1] = row[roots - 1];
    }
}

static void step(uint8_t *p, const uint8_t *d, Py_ssize_t count, const uint8_t *table, int roots)
{
    switch (roots) {
    case 2: step_roots(p, d, count, table, 2); break;
    case 4: step_roots(p, d, count, table, 4); break;
    default: step_roots(p, d, count, table, roots); break;
    }
}

static PyObject *feed(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer state, column, table;
    int roots;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "w*y*iy*", &state, &column, &roots, &table))
        return NULL;
    if (roots < 1 || roots > MAX_ROOTS) {
        PyErr_Format(PyExc_ValueError, "roots %d is outside 1..%d", roots, MAX_ROOTS);
        goto out;
    }
    if (table.len != 256 * roots) {
        PyErr_Format(PyExc_ValueError, "table of %zd bytes, not 256 rows of %d", table.len, roots);
        goto out;
    }
    if (state.len % roots) {
        PyErr_Format(PyExc_ValueError, "state of %zd bytes is not whole codewords of %d", state.len, roots);
        goto out;
    }
    Py_ssize_t length = state.len / roots;
    if (column.len > length) {
        PyErr_Format(PyExc_ValueError, "column of %zd bytes for %zd codewords", column.len, length);
        goto out;
    }
    uint8_t *p = state.buf;
    const uint8_t *d = column.buf, *t = table.buf;
    Py_ssize_t have = column.len;
    Py_BEGIN_ALLOW_THREADS
    step(p, d, have, t, roots);                                 /* the column */
    step(p + have * roots, NULL, length - have, t, roots);      /* zeros past its end */
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&state);
    PyBuffer_Release(&column);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"feed", feed, METH_VARARGS,
     "feed(state, column, roots, table): advance every codeword's parity by one message byte"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_verity_rs",
    "The Reed-Solomon step of dm-verity FEC (see dmuserd.snapshot._verity).", -1, methods,
};

PyMODINIT_FUNC PyInit__verity_rs(void)
{
    return PyModule_Create(&module);
}
