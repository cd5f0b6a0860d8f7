/* Row scatter for storage/packing.py, and commands in the Redis protocol for
 * storage/wire.py, in C.
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
 *
 *   resp(items, inline_max)
 *
 * packs a command as redis-py's packers do, for the merge calls of a flush: hundreds of
 * device keys each, which hiredis' packer formats one by one (a printf for each length)
 * and wire.py then copied around (tests/unit/test_resp.py checks it against redis-py's).
 *
 *   wrapped(head, ids, rows, tail)
 *
 * joins the device keys of a merge call, head + ids[r] + tail for each row r (keys.py's
 * device_keys_at, which does the same in Python without this module;
 * tests/unit/test_device_keys.py checks both).
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

/* ---- resp: a command in the Redis protocol ---------------------------------------- */

PyDoc_STRVAR(resp_doc,
"resp(items, inline_max) -> list[bytes]\n\n"
"The command `items` (str, int, float, bytes) in the Redis protocol, as redis-py's\n"
"packers write it (str as UTF-8, int as str(), float as repr()), in chunks: each bytes\n"
"value over inline_max bytes is a chunk of its own, the very object (not copied), and\n"
"what lies between them is packed into one. TypeError for an item of any other type\n"
"(subclasses included: bool).");

/* Decimal digits of n >= 0. */
static Py_ssize_t digits(Py_ssize_t n)
{
    Py_ssize_t d = 1;
    while (n >= 10)
        n /= 10, d++;
    return d;
}

/* "<c><n>\r\n" at p (n >= 0); returns the end. */
static char *put_header(char *p, char c, Py_ssize_t n)
{
    Py_ssize_t d = digits(n);
    *p++ = c;
    for (Py_ssize_t i = d - 1; i >= 0; i--, n /= 10)
        p[i] = (char)('0' + n % 10);
    p += d;
    *p++ = '\r', *p++ = '\n';
    return p;
}

/* x in decimal at p (at most 20 bytes); returns its length. */
static Py_ssize_t put_ll(char *p, long long x)
{
    unsigned long long m = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    char tmp[24];
    Py_ssize_t d = 0;
    do
        tmp[d++] = (char)('0' + m % 10), m /= 10;
    while (m);
    Py_ssize_t len = 0;
    if (x < 0)
        p[len++] = '-';
    while (d)
        p[len++] = tmp[--d];
    return len;
}

typedef struct {
    const char *p;
    Py_ssize_t len;
    PyObject *big; /* the bytes object sent as a chunk of its own, or NULL */
} piece;

static PyObject *resp(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *items_obj;
    Py_ssize_t inline_max;
    if (!PyArg_ParseTuple(args, "On", &items_obj, &inline_max))
        return NULL;
    if (!PyList_Check(items_obj) && !PyTuple_Check(items_obj)) {
        PyErr_SetString(PyExc_TypeError, "items must be a list or a tuple");
        return NULL;
    }
    /* A tuple of its own (a list is copied): the allocations below may run a garbage
     * collection, whose callbacks could change a list we only borrowed from. */
    PyObject *seq = PySequence_Tuple(items_obj);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject **items = &PyTuple_GET_ITEM(seq, 0);
    PyObject *temps = NULL, *result = NULL;
    piece *pieces = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(piece));
    char *numbers = PyMem_Malloc((size_t)(n > 0 ? n : 1) * 24); /* ints, as text */
    Py_ssize_t *runs = PyMem_Malloc((size_t)(n + 1) * sizeof(Py_ssize_t));
    if (pieces == NULL || numbers == NULL || runs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Each item's bytes, and the runs' sizes (a run ends at a big value: its "$<len>\r\n"
     * is the run's last bytes, the "\r\n" after it the next run's first). */
    Py_ssize_t nruns = 0, run = 1 + digits(n) + 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = items[i], *text = NULL;
        piece *pc = &pieces[i];
        pc->p = NULL, pc->len = 0, pc->big = NULL;
        int as_text = 0; /* (int past 64 bits, float: their str() and repr()) */
        if (PyUnicode_CheckExact(o)) {
            pc->p = PyUnicode_AsUTF8AndSize(o, &pc->len);
        } else if (PyBytes_CheckExact(o)) {
            pc->p = PyBytes_AS_STRING(o), pc->len = PyBytes_GET_SIZE(o);
        } else if (PyLong_CheckExact(o)) {
            int overflow;
            long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
            if (x == -1 && PyErr_Occurred())
                goto done;
            if (overflow) {
                text = PyObject_Str(o), as_text = 1;
            } else {
                pc->p = numbers + 24 * i;
                pc->len = put_ll(numbers + 24 * i, x);
            }
        } else if (PyFloat_CheckExact(o)) {
            text = PyObject_Repr(o), as_text = 1;
        } else {
            PyErr_Format(PyExc_TypeError, "resp() takes str, int, float and bytes, not %.100s",
                         Py_TYPE(o)->tp_name);
            goto done;
        }
        if (as_text) {
            if (text == NULL)
                goto done;
            /* (kept alive until the chunks are written) */
            if (temps == NULL && (temps = PyList_New(0)) == NULL) {
                Py_DECREF(text);
                goto done;
            }
            int kept = PyList_Append(temps, text);
            Py_DECREF(text);
            if (kept < 0)
                goto done;
            pc->p = PyUnicode_AsUTF8AndSize(text, &pc->len);
        }
        if (pc->p == NULL) /* (a str that is not valid UTF-8: surrogates) */
            goto done;
        run += 1 + digits(pc->len) + 2;
        if (PyBytes_CheckExact(o) && pc->len > inline_max) {
            pc->big = o;
            runs[nruns++] = run;
            run = 2;
        } else {
            run += pc->len + 2;
        }
    }
    runs[nruns++] = run;
    Py_ssize_t bigs = nruns - 1;
    result = PyList_New(nruns + bigs);
    if (result == NULL)
        goto done;
    Py_ssize_t i = 0;
    for (Py_ssize_t r = 0; r < nruns; r++) {
        PyObject *chunk = PyBytes_FromStringAndSize(NULL, runs[r]);
        if (chunk == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        char *w = PyBytes_AS_STRING(chunk);
        if (r == 0) {
            w = put_header(w, '*', n);
        } else {
            *w++ = '\r', *w++ = '\n';
        }
        PyList_SET_ITEM(result, 2 * r, chunk);
        for (; i < n; i++) {
            piece *pc = &pieces[i];
            w = put_header(w, '$', pc->len);
            if (pc->big != NULL) {
                PyList_SET_ITEM(result, 2 * r + 1, Py_NewRef(pc->big));
                i++;
                break;
            }
            memcpy(w, pc->p, (size_t)pc->len);
            w += pc->len;
            *w++ = '\r', *w++ = '\n';
        }
        assert(w == PyBytes_AS_STRING(chunk) + runs[r]);
    }
done:
    PyMem_Free(runs);
    PyMem_Free(numbers);
    PyMem_Free(pieces);
    Py_XDECREF(temps);
    Py_DECREF(seq);
    return result;
}

/* ---- wrapped: device keys ---------------------------------------------------------- */

PyDoc_STRVAR(wrapped_doc,
"wrapped(head, ids, rows, tail) -> list[str]\n\n"
"[head + ids[r] + tail for r in rows]: a flush's device keys (storage/keys.py) from its\n"
"device ids and the rows of a merge call (an int64 buffer). IndexError for a row\n"
"outside ids, TypeError for an id that is not a str.");

/* A fleet's flush names a key for every device it merges: ~100,000 a second at a million
 * devices, where the f-string in a list comprehension, with its tolist() and lookups,
 * took ~0.4 us per key (benchmarks/RESULTS.md, twenty-seventh pass). ASCII ids (the
 * validator's rule for device ids) are copied into a new str; any other is joined by
 * PyUnicode_Concat, which gives the same str. */
static PyObject *wrapped(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *head, *ids, *rows_obj, *tail;
    if (!PyArg_ParseTuple(args, "UO!OU", &head, &PyList_Type, &ids, &rows_obj, &tail))
        return NULL;
    Py_buffer rows = {0};
    if (int64_buffer(rows_obj, &rows, "rows") < 0)
        return NULL;
    Py_ssize_t n = rows.len / 8;
    const int64_t *at = rows.buf;
    /* (no Python code runs below, and a str's allocation never collects garbage: the list
     * of ids cannot change while it is read) */
    PyObject *result = PyList_New(n);
    if (result == NULL)
        goto done;
    int ascii = PyUnicode_IS_COMPACT_ASCII(head) && PyUnicode_IS_COMPACT_ASCII(tail);
    Py_ssize_t hl = PyUnicode_GET_LENGTH(head), tl = PyUnicode_GET_LENGTH(tail);
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t r = at[i];
        if (r < 0 || r >= PyList_GET_SIZE(ids)) {
            PyErr_Format(PyExc_IndexError, "row %zd (%lld) is outside the ids", i, (long long)r);
            Py_CLEAR(result);
            goto done;
        }
        PyObject *id = PyList_GET_ITEM(ids, (Py_ssize_t)r), *key;
        if (!PyUnicode_Check(id)) {
            PyErr_Format(PyExc_TypeError, "ids[%lld] is a %.100s, not a str", (long long)r,
                         Py_TYPE(id)->tp_name);
            Py_CLEAR(result);
            goto done;
        }
        if (ascii && PyUnicode_IS_COMPACT_ASCII(id)) {
            Py_ssize_t il = PyUnicode_GET_LENGTH(id);
            key = PyUnicode_New(hl + il + tl, 127);
            if (key != NULL) {
                Py_UCS1 *w = PyUnicode_1BYTE_DATA(key);
                memcpy(w, PyUnicode_1BYTE_DATA(head), (size_t)hl);
                memcpy(w + hl, PyUnicode_1BYTE_DATA(id), (size_t)il);
                memcpy(w + hl + il, PyUnicode_1BYTE_DATA(tail), (size_t)tl);
            }
        } else {
            PyObject *first = PyUnicode_Concat(head, id);
            key = first == NULL ? NULL : PyUnicode_Concat(first, tail);
            Py_XDECREF(first);
        }
        if (key == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, key);
    }
done:
    PyBuffer_Release(&rows);
    return result;
}

static PyMethodDef methods[] = {
    {"scatter", scatter, METH_VARARGS, scatter_doc},
    {"resp", resp, METH_VARARGS, resp_doc},
    {"wrapped", wrapped, METH_VARARGS, wrapped_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rtmonitor.storage._pack",
    .m_doc = "Rows written at offsets of a buffer, one memcpy each; Redis commands packed; "
             "device keys joined (see _pack.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__pack(void)
{
    return PyModule_Create(&module);
}
