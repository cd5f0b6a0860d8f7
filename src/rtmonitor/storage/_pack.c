/* Row scatter for storage/packing.py, in C.
 *
 * A flush's deltas are one buffer in which every piece (a device's head, a kind's count, a
 * reading's six numbers, a name) has a known offset. numpy writes such pieces with a
 * fancy-indexed assignment, one index (8 bytes) per byte written: at a million devices
 * that was the service's largest single cost. Here each piece is one memcpy.
 *
 *   scatter(buf, at, rows, width[, lengths])
 *
 * writes row i of `rows` (a C-contiguous buffer of len(at) rows of `width` bytes), or its
 * first lengths[i] bytes, at buf[at[i]:]. `at` and `lengths` are int64 buffers. Every
 * offset and length is checked against `buf` before anything is written: a bad one
 * raises ValueError and leaves `buf` as it was (and one that another thread changes
 * during the copy, which runs without the GIL, stops it there: never written outside
 * `buf`). packing.py falls back to numpy without this module (tests/unit/test_packing.py
 * checks both against struct.pack).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* A buffer of int64, as numpy's int64 arrays expose it ('q' or 'l' on LP64). */
static int int64_buffer(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    if (view->itemsize != 8 || !(strcmp(f, "q") == 0 || (strcmp(f, "l") == 0 && sizeof(long) == 8))) {
        PyErr_Format(PyExc_TypeError, "%s must be a buffer of int64", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(scatter_doc,
"scatter(buf, at, rows, width, lengths=None) -> None\n\n"
"Write row i of rows (len(at) rows of width bytes), or its first lengths[i] bytes, at\n"
"buf[at[i]:]. Every offset is checked first (ValueError, nothing written).");

/* Whether `size` bytes at `at` fall outside a buffer of `len` (or a row of `width`). */
static int outside(int64_t at, int64_t size, Py_ssize_t width, Py_ssize_t len)
{
    return size < 0 || size > width || at < 0 || at > len - size;
}

static PyObject *scatter(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *buf_obj, *at_obj, *rows_obj, *len_obj = Py_None;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "OOOn|O", &buf_obj, &at_obj, &rows_obj, &width, &len_obj))
        return NULL;
    /* (zeroed: PyBuffer_Release does nothing to one never filled) */
    Py_buffer buf = {0}, at = {0}, rows = {0}, lens = {0};
    PyObject *result = NULL;
    int have_lens = len_obj != Py_None;
    if (PyObject_GetBuffer(buf_obj, &buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0 ||
        int64_buffer(at_obj, &at, "at") < 0 ||
        PyObject_GetBuffer(rows_obj, &rows, PyBUF_C_CONTIGUOUS) < 0 ||
        (have_lens && int64_buffer(len_obj, &lens, "lengths") < 0))
        goto done;
    Py_ssize_t n = at.len / 8;
    const int64_t *offsets = at.buf, *sizes = have_lens ? lens.buf : NULL;
    if (width < 0 || (width > 0 && n > PY_SSIZE_T_MAX / width) || rows.len != n * width ||
        (have_lens && lens.len != at.len)) {
        PyErr_SetString(PyExc_ValueError,
                        "rows must be len(at) rows of width bytes (and lengths one per row)");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t size = sizes ? sizes[i] : width;
        if (outside(offsets[i], size, width, buf.len)) {
            PyErr_Format(PyExc_ValueError, "row %zd (offset %lld, %lld bytes) is outside the buffer",
                         i, (long long)offsets[i], (long long)size);
            goto done;
        }
    }
    const char *src = rows.buf;
    char *dst = buf.buf;
    Py_ssize_t changed = -1;
    Py_BEGIN_ALLOW_THREADS
    /* Without the GIL another thread may write `at` or `lengths` (holding their buffers
     * only stops a resize): each is read once and checked again where it is used. */
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t at_i = offsets[i], size = sizes ? sizes[i] : width;
        if (outside(at_i, size, width, buf.len)) {
            changed = i;
            break;
        }
        memcpy(dst + at_i, src + i * width, (size_t)size);
    }
    Py_END_ALLOW_THREADS
    if (changed >= 0) {
        PyErr_Format(PyExc_ValueError, "row %zd's offset or length changed while it was copied",
                     changed);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&lens);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&at);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"scatter", scatter, METH_VARARGS, scatter_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rtmonitor.storage._pack",
    .m_doc = "Rows written at offsets of a buffer, one memcpy each (see _pack.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__pack(void)
{
    return PyModule_Create(&module);
}
