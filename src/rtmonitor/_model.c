/* The model's compiled helper: a flush's device keys numbered by a hash pass.
 *
 * model.reduce_batches() numbers a fleet's devices over their keys (model.Keys: the id()s
 * of the validator's entries, one per device row of every pending batch) before reducing
 * the batches' columns. numpy's way is a sort (np.unique with first positions and the
 * inverse, then a rank); this is one pass. A leaf module: it imports nothing of the
 * package, as model.py imports no room (tests/unit/test_layering.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Number the distinct int64s of a buffer (the id()s of a flush's device entries) in
 * first-appearance order: (each distinct one's first position, each one's number), as
 * int64 in two bytearrays. What np.unique(return_index, return_inverse) and a rank give,
 * without the sort: at 100,000 devices known in any order, a flush's encode step took
 * 151 ms with the sort and 80 ms with this (benchmarks/RESULTS.md, sixteenth pass).
 *
 * Open addressing over (key, number) pairs, at most half full, with a Fibonacci hash of
 * the key: the keys are addresses of the service's own objects, never a device's input.
 * The GIL is released while the loop runs, so the receivers go on meanwhile. */
/* Fibonacci hashing: the top bits of key * 2^64/phi pick the slot. */
#define FIB(key) ((uint64_t)(key) * 0x9E3779B97F4A7C15ull)
/* How many keys ahead the loop fetches a slot (~10% at a million distinct keys). */
#define AHEAD 8
/* The first table's size is 2^bits slots: at least MIN_BITS, at most MAX_BITS. */
#define MIN_BITS 10
#define MAX_BITS 22

typedef struct {
    int64_t key;
    int64_t number; /* -1: an empty slot */
} idslot_t;

/* A table of `capacity` empty slots (NULL: out of memory). */
static idslot_t *empty_slots(size_t capacity)
{
    idslot_t *slots = PyMem_RawMalloc(capacity * sizeof(idslot_t));
    if (slots != NULL)
        for (size_t k = 0; k < capacity; k++)
            slots[k].number = -1;
    return slots;
}

/* Twice the table (past 2 M distinct keys), its keys moved over. */
static int id_slots_grow(idslot_t **slots, size_t *capacity, int *shift)
{
    size_t bigger = *capacity * 2;
    idslot_t *fresh = empty_slots(bigger);
    if (fresh == NULL)
        return -1;
    int new_shift = *shift - 1;
    for (size_t k = 0; k < *capacity; k++) {
        if ((*slots)[k].number < 0)
            continue;
        size_t j = (size_t)(FIB((*slots)[k].key) >> new_shift);
        while (fresh[j].number >= 0)
            j = (j + 1) & (bigger - 1);
        fresh[j] = (*slots)[k];
    }
    PyMem_RawFree(*slots);
    *slots = fresh;
    *capacity = bigger;
    *shift = new_shift;
    return 0;
}

/* The numbering itself (no Python calls: runs without the GIL); -1 when out of memory. */
static Py_ssize_t number_loop(const int64_t *keys, Py_ssize_t n, int64_t *firsts,
                              int64_t *numbers, int max_bits)
{
    /* room for the keys as if all were distinct, up to 2^max_bits / 2 of them (2 M, in
       64 MB): growing a table of a million costs more than one too large for a flush of
       repeats. (Tests start smaller, so that the table grows.) */
    int bits = MIN_BITS;
    while (bits < max_bits && ((size_t)1 << bits) < (size_t)n * 2)
        bits++;
    size_t capacity = (size_t)1 << bits;
    int shift = 64 - bits;
    idslot_t *slots = empty_slots(capacity);
    if (slots == NULL)
        return -1;
    int64_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* a fleet's table outgrows the cache: fetch the slot of a key a few ahead, so
           that the misses of several keys overlap (a hint only: the table may grow) */
        if (i + AHEAD < n)
            __builtin_prefetch(&slots[FIB(keys[i + AHEAD]) >> shift], 1);
        int64_t key = keys[i];
        size_t k = (size_t)(FIB(key) >> shift);
        for (;;) {
            if (slots[k].number < 0) {
                slots[k].key = key;
                slots[k].number = count;
                firsts[count] = i;
                numbers[i] = count++;
                /* at most half full */
                if ((size_t)count * 2 > capacity && id_slots_grow(&slots, &capacity, &shift) < 0) {
                    PyMem_RawFree(slots);
                    return -1;
                }
                break;
            }
            if (slots[k].key == key) {
                numbers[i] = slots[k].number;
                break;
            }
            k = (k + 1) & (capacity - 1);
        }
    }
    PyMem_RawFree(slots);
    return (Py_ssize_t)count;
}

/* A buffer of native 8-byte signed integers (numpy's int64 says 'l' here, 'q' elsewhere). */
static int is_int64(const Py_buffer *view)
{
    const char *f = view->format;
    if (f == NULL || view->itemsize != (Py_ssize_t)sizeof(int64_t))
        return 0;
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    return (*f == 'q' || *f == 'l') && f[1] == '\0';
}

static PyObject *number_ids(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *arg;
    int max_bits = MAX_BITS;
    if (!PyArg_ParseTuple(args, "O|i:number_ids", &arg, &max_bits))
        return NULL;
    if (max_bits < MIN_BITS || max_bits > MAX_BITS) {
        PyErr_Format(PyExc_ValueError, "number_ids(): table_bits is %d to %d", MIN_BITS,
                     MAX_BITS);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    PyObject *result = NULL, *firsts = NULL, *numbers = NULL;
    if (!is_int64(&view)) {
        PyErr_Format(PyExc_TypeError, "number_ids() takes native int64s, not a buffer of "
                     "format '%s'", view.format != NULL ? view.format : "B");
        goto done;
    }
    Py_ssize_t n = view.len / (Py_ssize_t)sizeof(int64_t);
    firsts = PyByteArray_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    numbers = PyByteArray_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (firsts == NULL || numbers == NULL)
        goto done;
    /* a copy-free read: the caller's array is not resized while we hold its buffer */
    const int64_t *keys = (const int64_t *)view.buf;
    int64_t *first_at = (int64_t *)PyByteArray_AS_STRING(firsts);
    int64_t *number_at = (int64_t *)PyByteArray_AS_STRING(numbers);
    Py_ssize_t count;
    Py_BEGIN_ALLOW_THREADS
    count = number_loop(keys, n, first_at, number_at, max_bits);
    Py_END_ALLOW_THREADS
    if (count < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (PyByteArray_Resize(firsts, count * (Py_ssize_t)sizeof(int64_t)) < 0)
        goto done;
    result = PyTuple_Pack(2, firsts, numbers);
done:
    Py_XDECREF(firsts);
    Py_XDECREF(numbers);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef module_methods[] = {
    {"number_ids", number_ids, METH_VARARGS,
     "number_ids(int64s, table_bits=22): the distinct ones numbered in first-appearance "
     "order: (each one's first position, each int64's number), as int64 in two bytearrays; "
     "the first table has at most 2^table_bits slots (fewer in tests only)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rtmonitor._model",
    .m_doc = "The model's compiled helper: device keys numbered by a hash pass (_model.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__model(void)
{
    return PyModule_Create(&module);
}
