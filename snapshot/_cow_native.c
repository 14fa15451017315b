/* A run of v2 COW op records turned into table columns, in C.
 *
 * snapshot/_cow_reader.py reads a v2 file's clustered ops a cluster at a
 * time; the records of plain data ops (copy, replace, zero, xor) go to the
 * op table in bulk (CowReader._plain_v2). In Python that costs about
 * 0.4 us an op, a third of reading a COW file before a merge can start.
 * This does the same per-op work (the rules checked, the columns and data
 * offsets made) in one pass, and returns None where any op breaks a rule:
 * the reader's per-op path then reads those ops and names the fault, as
 * without this module.
 *
 *     plain_v2(buf, count, data_pos, data_start, file_size, compression,
 *              valid_compression, xor, replace, source_mask)
 *       -> None or (types, comps, lengths, new_blocks, sources,
 *                   data_offsets, data_pos, compression)
 *
 * buf: at least count 20-byte records (type u8, compression u8,
 * data_length u16, new_block u64, source u64, little-endian), all of type
 * copy/replace/zero/xor. compression: the file's so far, -1 for none yet.
 * valid_compression: 256 bytes, 1 where a compression value is known.
 * Returned columns are bytes in native order: types and comps one byte an
 * op, lengths u32, new_blocks and sources u64, data_offsets i64 (-1 for an
 * op without data); data_pos is the data stream position after the ops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define OP_SIZE 20

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static PyObject *plain_v2(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf, valid;
    Py_ssize_t count;
    long long data_pos, data_start, file_size, compression;
    int xor_type, replace_type;
    unsigned long long source_mask;
    if (!PyArg_ParseTuple(args, "y*nLLLLy*iiK:plain_v2", &buf, &count, &data_pos, &data_start, &file_size,
                          &compression, &valid, &xor_type, &replace_type, &source_mask))
        return NULL;
    PyObject *result = NULL, *types = NULL, *comps = NULL, *lengths = NULL, *blocks = NULL, *sources = NULL,
             *offsets = NULL;
    if (count < 0 || buf.len < count * OP_SIZE || valid.len != 256) {
        PyErr_SetString(PyExc_ValueError, "plain_v2: buffer shorter than count records, or a bad table");
        goto done;
    }
    types = PyBytes_FromStringAndSize(NULL, count);
    comps = PyBytes_FromStringAndSize(NULL, count);
    lengths = PyBytes_FromStringAndSize(NULL, count * 4);
    blocks = PyBytes_FromStringAndSize(NULL, count * 8);
    sources = PyBytes_FromStringAndSize(NULL, count * 8);
    offsets = PyBytes_FromStringAndSize(NULL, count * 8);
    if (!types || !comps || !lengths || !blocks || !sources || !offsets)
        goto done;
    unsigned char *t = (unsigned char *)PyBytes_AS_STRING(types), *c = (unsigned char *)PyBytes_AS_STRING(comps);
    uint32_t *len_out = (uint32_t *)PyBytes_AS_STRING(lengths);
    uint64_t *nb_out = (uint64_t *)PyBytes_AS_STRING(blocks), *src_out = (uint64_t *)PyBytes_AS_STRING(sources);
    int64_t *off_out = (int64_t *)PyBytes_AS_STRING(offsets);
    const unsigned char *rec = buf.buf, *ok = valid.buf;
    int broken = 0;
    for (Py_ssize_t i = 0; i < count && !broken; i++, rec += OP_SIZE) {
        unsigned type = rec[0], comp = rec[1];
        uint32_t length = (uint32_t)rec[2] | ((uint32_t)rec[3] << 8);
        uint64_t new_block = le64(rec + 4), source = le64(rec + 12);
        if (comp) {
            if (!ok[comp] || (compression >= 0 && compression != comp)) {
                broken = 1;
                break;
            }
            compression = comp;
        }
        if (new_block > 0xFFFFFFFFull || source > source_mask) {
            broken = 1;
            break;
        }
        int64_t where = -1;
        if ((int)type == xor_type || (int)type == replace_type) {
            long long at = (int)type == xor_type ? data_pos : (long long)source;
            if (!length || at < data_start || at + (long long)length > file_size) {
                broken = 1;
                break;
            }
            where = at;
            data_pos += length;
        } else if (length) {
            broken = 1;
            break;
        }
        t[i] = (unsigned char)type;
        c[i] = (unsigned char)comp;
        len_out[i] = length;
        nb_out[i] = new_block;
        src_out[i] = source;
        off_out[i] = where;
    }
    if (broken) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *comp_obj = compression >= 0 ? PyLong_FromLongLong(compression) : Py_NewRef(Py_None);
    if (comp_obj == NULL)
        goto done;
    result = Py_BuildValue("(OOOOOOLN)", types, comps, lengths, blocks, sources, offsets, data_pos, comp_obj);
done:
    Py_XDECREF(types);
    Py_XDECREF(comps);
    Py_XDECREF(lengths);
    Py_XDECREF(blocks);
    Py_XDECREF(sources);
    Py_XDECREF(offsets);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&valid);
    return result;
}

static PyMethodDef methods[] = {
    {"plain_v2", plain_v2, METH_VARARGS, "v2 plain data op records -> table columns, or None (see the file's doc)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cow_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cow_native(void)
{
    return PyModule_Create(&module);
}
