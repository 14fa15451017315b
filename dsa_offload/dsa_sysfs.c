/* Work-queue discovery from sysfs (/sys/bus/dsa/devices/wqD.Q and dsaD).
 *
 * Returns one dict per work queue with its attributes, its device's, the
 * character device path, and the reasons it cannot be used from this
 * process (an empty list means usable). The sysfs and /dev roots are
 * parameters so tests can point them at a fake tree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "dsa_hw.h"

PyObject *dsa_discover(PyObject *self, PyObject *args, PyObject *kw);

static int read_attr(const char *dir, const char *name, char *buf, size_t n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t got = fread(buf, 1, n - 1, f);
    fclose(f);
    buf[got] = 0;
    while (got && (buf[got - 1] == '\n' || buf[got - 1] == ' '))
        buf[--got] = 0;
    return 0;
}

/* Put attribute `name` of `dir` into dict `d`: an int where it parses as
 * one (decimal or 0x-hex), else the string; None when absent. */
static void put_attr(PyObject *d, const char *dir, const char *name, const char *key)
{
    char buf[512];
    PyObject *v;
    if (read_attr(dir, name, buf, sizeof buf) < 0) {
        v = Py_NewRef(Py_None);
    } else {
        char *end;
        long long x = strtoll(buf, &end, 0);
        v = (*buf && !*end) ? PyLong_FromLongLong(x) : PyUnicode_FromString(buf);
    }
    if (v) {
        PyDict_SetItemString(d, key ? key : name, v);
        Py_DECREF(v);
    }
}

/* op_cap comes in two formats: kernels with %*pb print 32-bit words most
 * significant first ("00000000,...,00ff00ff"); older ones print four
 * "0x..." 64-bit words least significant first. Returns a Python int. */
static PyObject *parse_op_cap(const char *s)
{
    PyObject *total = PyLong_FromLong(0);
    if (!s || !total)
        return total;
    char copy[512];
    snprintf(copy, sizeof copy, "%s", s);
    int old = strstr(copy, "0x") != NULL;
    int idx = 0;
    char *save = NULL;
    /* Collect words first: MSW-first needs the count before shifting. */
    unsigned long long words[64];
    int nw = 0;
    for (char *t = strtok_r(copy, ", \t", &save); t && nw < 64; t = strtok_r(NULL, ", \t", &save))
        words[nw++] = strtoull(t, NULL, 16);
    for (idx = 0; idx < nw; idx++) {
        unsigned long long w = words[old ? idx : nw - 1 - idx];
        PyObject *pw = PyLong_FromUnsignedLongLong(w);
        PyObject *sh = PyLong_FromLong((long)idx * (old ? 64 : 32));
        PyObject *shifted = pw && sh ? PyNumber_Lshift(pw, sh) : NULL;
        PyObject *sum = shifted ? PyNumber_Or(total, shifted) : NULL;
        Py_XDECREF(pw);
        Py_XDECREF(sh);
        Py_XDECREF(shifted);
        Py_DECREF(total);
        total = sum;
        if (!total)
            return NULL;
    }
    return total;
}

static void add_reason(PyObject *reasons, const char *fmt, const char *arg)
{
    PyObject *s = PyUnicode_FromFormat(fmt, arg);
    if (s) {
        PyList_Append(reasons, s);
        Py_DECREF(s);
    }
}

static int str_is(PyObject *d, const char *key, const char *want)
{
    PyObject *v = PyDict_GetItemString(d, key);
    return v && PyUnicode_Check(v) && strcmp(PyUnicode_AsUTF8(v), want) == 0;
}

static long int_of(PyObject *d, const char *key, long dflt)
{
    PyObject *v = PyDict_GetItemString(d, key);
    return v && PyLong_Check(v) ? PyLong_AsLong(v) : dflt;
}

/* Whether bitmap `cap` (a Python int) has opcode `op`'s bit. */
static int has_op(PyObject *cap, unsigned op)
{
    if (!cap || !PyLong_Check(cap))
        return 0;
    PyObject *sh = PyLong_FromUnsignedLong(op), *one = PyLong_FromLong(1);
    PyObject *shifted = sh ? PyNumber_Rshift(cap, sh) : NULL;
    PyObject *bit = shifted && one ? PyNumber_And(shifted, one) : NULL;
    int set = bit ? PyObject_IsTrue(bit) == 1 : 0;
    Py_XDECREF(sh);
    Py_XDECREF(one);
    Py_XDECREF(shifted);
    Py_XDECREF(bit);
    PyErr_Clear();
    return set;
}

static PyObject *describe_wq(const char *root, const char *devroot, const char *wq)
{
    char wqdir[1024], devdir[1024], cdev[1024], buf[512];
    int dnum = -1, qnum = -1;
    if (sscanf(wq, "wq%d.%d", &dnum, &qnum) != 2)
        return NULL;
    snprintf(wqdir, sizeof wqdir, "%s/%s", root, wq);
    snprintf(devdir, sizeof devdir, "%s/dsa%d", root, dnum);
    snprintf(cdev, sizeof cdev, "%s/%s", devroot, wq);

    PyObject *d = PyDict_New(), *dev = PyDict_New(), *reasons = PyList_New(0);
    if (!d || !dev || !reasons)
        goto fail;
    PyObject *v = PyUnicode_FromString(wq);
    PyDict_SetItemString(d, "name", v);
    Py_XDECREF(v);
    static const char *wq_attrs[] = {"mode", "state", "type", "size", "threshold", "max_transfer_size",
                                     "max_batch_size", "block_on_fault", "cdev_minor", NULL};
    for (const char **a = wq_attrs; *a; a++)
        put_attr(d, wqdir, *a, NULL);
    put_attr(d, wqdir, "name", "wq_name");
    static const char *dev_attrs[] = {"version", "max_transfer_size", "max_batch_size", "pasid_enabled",
                                      "numa_node", NULL};
    for (const char **a = dev_attrs; *a; a++)
        put_attr(dev, devdir, *a, NULL);
    /* gen_cap is a 64-bit register ("%#llx"): parsed unsigned, None when absent. */
    if (read_attr(devdir, "gen_cap", buf, sizeof buf) == 0) {
        char *end;
        unsigned long long g = strtoull(buf, &end, 16);
        v = (*buf && !*end) ? PyLong_FromUnsignedLongLong(g) : PyUnicode_FromString(buf);
    } else {
        v = Py_NewRef(Py_None);
    }
    if (!v)
        goto fail;
    PyDict_SetItemString(dev, "gen_cap", v);
    Py_DECREF(v);
    PyObject *cap = parse_op_cap(read_attr(devdir, "op_cap", buf, sizeof buf) == 0 ? buf : NULL);
    if (!cap)
        goto fail;
    PyDict_SetItemString(dev, "op_cap", cap);
    Py_DECREF(cap);
    /* The queue's own operation set (op_config, DSA 2.0 kernels): None when absent. */
    if (read_attr(wqdir, "op_config", buf, sizeof buf) == 0) {
        v = parse_op_cap(buf);
        if (!v)
            goto fail;
    } else {
        v = Py_NewRef(Py_None);
    }
    PyDict_SetItemString(d, "op_config", v);
    Py_DECREF(v);
    v = PyUnicode_FromFormat("dsa%d", dnum);
    PyDict_SetItemString(dev, "name", v);
    Py_XDECREF(v);
    PyDict_SetItemString(d, "device", dev);
    v = PyUnicode_FromString(cdev);
    PyDict_SetItemString(d, "path", v);
    Py_XDECREF(v);

    /* Why it cannot be used, in the order a person would fix things. */
    const struct dsa_cpu *cpu = dsa_cpu_features();
    if (!str_is(d, "state", "enabled"))
        add_reason(reasons, "queue is not enabled (state=%s)",
                   PyDict_GetItemString(d, "state") && PyUnicode_Check(PyDict_GetItemString(d, "state"))
                       ? PyUnicode_AsUTF8(PyDict_GetItemString(d, "state"))
                       : "unknown");
    if (!str_is(d, "type", "user"))
        add_reason(reasons, "queue type is %s, not user: it belongs to a kernel driver",
                   PyDict_GetItemString(d, "type") && PyUnicode_Check(PyDict_GetItemString(d, "type"))
                       ? PyUnicode_AsUTF8(PyDict_GetItemString(d, "type"))
                       : "unknown");
    if (int_of(dev, "pasid_enabled", 0) != 1)
        add_reason(reasons, "%s has no PASID (shared virtual addressing is off; enable the IOMMU in scalable mode)",
                   PyUnicode_AsUTF8(PyDict_GetItemString(dev, "name")));
    if (int_of(d, "size", 0) <= 0)
        add_reason(reasons, "queue size is 0%s", "");
    int shared = str_is(d, "mode", "shared");
    if (shared && !cpu->enqcmd)
        add_reason(reasons, "shared queue needs ENQCMD, which this CPU lacks%s", "");
    if (!has_op(PyDict_GetItemString(dev, "op_cap"), DSA_OP_MEMMOVE))
        add_reason(reasons, "device does not advertise MEMMOVE in op_cap%s", "");
    else if (PyDict_GetItemString(d, "op_config") != Py_None && !has_op(PyDict_GetItemString(d, "op_config"), DSA_OP_MEMMOVE))
        add_reason(reasons, "queue's op_config does not allow MEMMOVE%s", "");
    if (access(cdev, F_OK) != 0)
        add_reason(reasons, "no character device %s", cdev);
    else if (access(cdev, R_OK | W_OK) != 0)
        add_reason(reasons, "no read/write permission on %s", cdev);
    v = PyUnicode_FromString(shared ? "enqcmd" : (cpu->movdir64b ? "movdir64b" : "write"));
    PyDict_SetItemString(d, "submission", v);
    Py_XDECREF(v);
    PyDict_SetItemString(d, "reasons", reasons);
    PyDict_SetItemString(d, "usable", PyList_GET_SIZE(reasons) ? Py_False : Py_True);
    Py_DECREF(dev);
    Py_DECREF(reasons);
    return d;
fail:
    Py_XDECREF(d);
    Py_XDECREF(dev);
    Py_XDECREF(reasons);
    return NULL;
}

static int by_name(const struct dirent **a, const struct dirent **b) { return strverscmp((*a)->d_name, (*b)->d_name); }
static int is_wq(const struct dirent *e) { return strncmp(e->d_name, "wq", 2) == 0; }

PyObject *dsa_discover(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"sysfs", "devdir", NULL};
    const char *root = "/sys/bus/dsa/devices", *devroot = "/dev/dsa";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ss:discover", kwlist, &root, &devroot))
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    struct dirent **names = NULL;
    int n = scandir(root, &names, is_wq, by_name);
    for (int i = 0; i < n; i++) {
        PyObject *d = out ? describe_wq(root, devroot, names[i]->d_name) : NULL;
        if (d) {
            PyList_Append(out, d);
            Py_DECREF(d);
        } else if (PyErr_Occurred()) {
            Py_CLEAR(out);
        }
        free(names[i]);
    }
    free(names);
    return out;
}
