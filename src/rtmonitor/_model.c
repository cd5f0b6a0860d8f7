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
 * without the sort: at 100,000 devices a flush numbers ~500,000 ids, which sorting took
 * ~0.2 s of a 0.45 s encode (benchmarks/RESULTS.md, sixteenth pass).
 *
 * Open addressing over (key, number) pairs, grown as distinct keys come (a fleet's flush
 * has far fewer distinct devices than entries), with a Fibonacci hash of the key: the keys
 * are addresses of the service's own objects, never a device's input. The GIL is released
 * while the loop runs, so the receivers go on meanwhile. */
typedef struct {
    int64_t key;
    int64_t number; /* -1: an empty slot */
} idslot_t;

static int id_slots_grow(idslot_t **slots, size_t *capacity, int *shift)
{
    size_t bigger = *capacity * 2;
    idslot_t *fresh = PyMem_RawMalloc(bigger * sizeof(idslot_t));
    if (fresh == NULL)
        return -1;
    for (size_t k = 0; k < bigger; k++)
        fresh[k].number = -1;
    int new_shift = *shift - 1;
    for (size_t k = 0; k < *capacity; k++) {
        if ((*slots)[k].number < 0)
            continue;
        size_t j = (size_t)(((uint64_t)(*slots)[k].key * 0x9E3779B97F4A7C15ull) >> new_shift);
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
                              int64_t *numbers)
{
    size_t capacity = 1024;
    int shift = 64 - 10;
    idslot_t *slots = PyMem_RawMalloc(capacity * sizeof(idslot_t));
    if (slots == NULL)
        return -1;
    for (size_t k = 0; k < capacity; k++)
        slots[k].number = -1;
    int64_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t key = keys[i];
        size_t k = (size_t)(((uint64_t)key * 0x9E3779B97F4A7C15ull) >> shift);
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

static PyObject *number_ids(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *result = NULL, *firsts = NULL, *numbers = NULL;
    if (view.len % (Py_ssize_t)sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "number_ids() takes a buffer of int64");
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
    count = number_loop(keys, n, first_at, number_at);
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
    {"number_ids", number_ids, METH_O,
     "number_ids(int64s): the distinct ones numbered in first-appearance order: (each "
     "one's first position, each int64's number), as int64 in two bytearrays."},
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
