/* The validator's device table in C: device id (str) -> the device's entry, looked up a
 * batch at a time.
 *
 * A fleet's batch looks ~10,000 device ids up in a table of 100,000 to a million. A dict
 * looks them up one at a time, and each lookup is a chain of dependent cache misses (the
 * dict's index, its entry, the stored key to compare with the batch's fresh string): on
 * this project's 2-core EPYC VM, 630-900 ns per id at 100,000 devices against ~60 ns at
 * 1,000, and the receivers' largest cost (benchmarks/RESULTS.md, twelfth pass).
 *
 * This table is open addressing with linear probing over (hash, key, value) slots, at most
 * half full. get_many() walks a batch in three stages a few ids apart: fetch the id's
 * slot, then the stored key and value of the slot whose hash matches, then compare and
 * answer. So the misses of different ids overlap instead of following one another.
 *
 * Keys are str, hashed with CPython's own randomised string hash (the one dict uses, and
 * cached in the str), so crafted device ids cannot make the probing quadratic; equal
 * strings always hash alike, whatever their type. Removal shifts the following entries
 * back (no tombstones), so a table that devices come to and go from keeps short probes.
 *
 * Nothing here calls back into Python while a lookup walks the table (hashing a str and
 * comparing two do not), so a batch sees one consistent table. Where an allocation could
 * run the garbage collector (and a finalizer change a list or the table), the references
 * are taken or the caller's list copied first.
 *
 * `hash_bits` (DeviceTable(hash_bits=...), distinct(..., hash_bits)) keeps only the low
 * bits of each hash: for tests, so that different ids share a hash and the compare that
 * tells them apart runs (tests/unit/test_device_table.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* How many ids ahead get_many() fetches: enough to overlap the misses of a handful of ids,
   few enough that what was fetched is still in the cache when its turn comes. */
#define AHEAD 8
#define MIN_CAPACITY 8

typedef struct {
    Py_hash_t hash;
    PyObject *key; /* NULL: an empty slot */
    PyObject *value;
} slot_t;

typedef struct {
    PyObject_HEAD
    slot_t *slots;
    size_t mask; /* capacity - 1; the capacity is a power of two */
    Py_ssize_t used;
    Py_hash_t hash_mask; /* -1; fewer bits in tests (DeviceTable(hash_bits=...)) */
} TableObject;

/* The key's hash, its low bits only under a `mask` other than -1 (tests: so that different
   ids share a hash, and the compare that tells them apart runs). */
static int key_hash(PyObject *key, Py_hash_t mask, Py_hash_t *out)
{
    if (!PyUnicode_Check(key)) {
        PyErr_Format(PyExc_TypeError, "a device id is a str, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(key) < 0)
        return -1;
#endif
    /* str's own hash, also for a subclass: equal strings must land in one slot */
    Py_hash_t h = PyUnicode_Type.tp_hash(key);
    if (h == -1 && PyErr_Occurred())
        return -1;
    *out = h & mask;
    return 0;
}

/* -1 (every bit), or the low `bits` bits of a hash (tests). */
static int hash_mask(int bits, Py_hash_t *mask)
{
    if (bits < 1 || bits > 64) {
        PyErr_SetString(PyExc_ValueError, "hash_bits is 1 to 64");
        return -1;
    }
    *mask = bits == 64 ? (Py_hash_t)-1 : (Py_hash_t)(((uint64_t)1 << bits) - 1);
    return 0;
}

/* Two ready str objects with equal contents: a str has one canonical representation
   (PEP 393), so equal strings have the same kind and length. */
static int same(PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    Py_ssize_t len = PyUnicode_GET_LENGTH(a);
    if (len != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b))
        return 0;
    return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)len * PyUnicode_KIND(a)) == 0;
}

/* The slot holding `key`, or the empty slot where it would go. */
static size_t probe(const TableObject *t, PyObject *key, Py_hash_t hash)
{
    size_t i = (size_t)hash & t->mask;
    for (;;) {
        const slot_t *s = &t->slots[i];
        if (s->key == NULL || (s->hash == hash && same(s->key, key)))
            return i;
        i = (i + 1) & t->mask;
    }
}

static int resize(TableObject *t, size_t capacity)
{
    slot_t *fresh = PyMem_Calloc(capacity, sizeof(slot_t));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    slot_t *old = t->slots;
    size_t old_capacity = old == NULL ? 0 : t->mask + 1;
    t->slots = fresh;
    t->mask = capacity - 1;
    for (size_t i = 0; i < old_capacity; i++) {
        if (old[i].key == NULL)
            continue;
        size_t j = (size_t)old[i].hash & t->mask;
        while (fresh[j].key != NULL)
            j = (j + 1) & t->mask;
        fresh[j] = old[i];
    }
    PyMem_Free(old);
    return 0;
}

/* key -> value (both borrowed; the table takes its own references). */
static int insert(TableObject *t, PyObject *key, PyObject *value)
{
    Py_hash_t hash;
    if (key_hash(key, t->hash_mask, &hash) < 0)
        return -1;
    size_t i = probe(t, key, hash);
    slot_t *s = &t->slots[i];
    if (s->key != NULL) {
        PyObject *old = s->value;
        Py_INCREF(value);
        s->value = value;
        Py_DECREF(old); /* last: the table is consistent if this runs code */
        return 0;
    }
    if ((size_t)(t->used + 1) * 2 > t->mask + 1) {
        if (resize(t, (t->mask + 1) * 2) < 0)
            return -1;
        i = probe(t, key, hash);
        s = &t->slots[i];
    }
    Py_INCREF(key);
    Py_INCREF(value);
    s->hash = hash;
    s->key = key;
    s->value = value;
    t->used++;
    return 0;
}

/* Empty slot `i` and shift back the entries after it that probed past it (linear probing
   without tombstones); the caller owns the key and value it held. */
static void take_out(TableObject *t, size_t i)
{
    t->slots[i].key = NULL;
    t->slots[i].value = NULL;
    t->used--;
    size_t hole = i, j = i;
    for (;;) {
        j = (j + 1) & t->mask;
        slot_t *s = &t->slots[j];
        if (s->key == NULL)
            return;
        size_t home = (size_t)s->hash & t->mask;
        /* the entry stays if its home slot lies cyclically within (hole, j] */
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            t->slots[hole] = *s;
            s->key = NULL;
            s->value = NULL;
            hole = j;
        }
    }
}

/* The value for `key` (borrowed), or NULL without an error if it is absent. */
static PyObject *lookup(TableObject *t, PyObject *key, int *failed)
{
    Py_hash_t hash;
    *failed = 0;
    if (key_hash(key, t->hash_mask, &hash) < 0) {
        *failed = 1;
        return NULL;
    }
    const slot_t *s = &t->slots[probe(t, key, hash)];
    return s->key == NULL ? NULL : s->value;
}

static PyObject *table_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"hash_bits", NULL};
    int bits = 64;
    Py_hash_t mask;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$i:DeviceTable", kwlist, &bits))
        return NULL;
    if (hash_mask(bits, &mask) < 0)
        return NULL;
    TableObject *t = (TableObject *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->slots = NULL;
    t->used = 0;
    t->hash_mask = mask;
    if (resize(t, MIN_CAPACITY) < 0) {
        Py_DECREF(t);
        return NULL;
    }
    return (PyObject *)t;
}

static int table_traverse(TableObject *t, visitproc visit, void *arg)
{
    if (t->slots == NULL)
        return 0;
    for (size_t i = 0; i <= t->mask; i++) {
        if (t->slots[i].key != NULL) {
            Py_VISIT(t->slots[i].key);
            Py_VISIT(t->slots[i].value);
        }
    }
    return 0;
}

/* Detach the table's slots (it is left without any) and give back what they held: the
   DECREFs may run code that uses the table, which then finds no slots. */
static void drop_slots(TableObject *t)
{
    slot_t *slots = t->slots;
    size_t capacity = slots == NULL ? 0 : t->mask + 1;
    t->slots = NULL;
    t->used = 0;
    for (size_t i = 0; i < capacity; i++) {
        if (slots[i].key != NULL) {
            Py_DECREF(slots[i].key);
            Py_DECREF(slots[i].value);
        }
    }
    PyMem_Free(slots);
}

static int table_clear(TableObject *t)
{
    drop_slots(t);
    if (resize(t, MIN_CAPACITY) < 0)
        PyErr_Clear(); /* left without slots: every method refuses below */
    return 0;
}

static void table_dealloc(TableObject *t)
{
    PyObject_GC_UnTrack(t);
    drop_slots(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static int usable(TableObject *t)
{
    if (t->slots == NULL) {
        PyErr_SetString(PyExc_MemoryError, "DeviceTable lost its slots (out of memory)");
        return 0;
    }
    return 1;
}

static Py_ssize_t table_length(TableObject *t)
{
    return t->used;
}

static int table_contains(TableObject *t, PyObject *key)
{
    int failed;
    if (!usable(t))
        return -1;
    if (!PyUnicode_Check(key))
        return 0; /* as a dict of str answers for any other key */
    PyObject *v = lookup(t, key, &failed);
    return failed ? -1 : v != NULL;
}

static PyObject *table_subscript(TableObject *t, PyObject *key)
{
    int failed;
    if (!usable(t))
        return NULL;
    PyObject *v = lookup(t, key, &failed);
    if (failed)
        return NULL;
    if (v == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return Py_NewRef(v);
}

static int table_ass_subscript(TableObject *t, PyObject *key, PyObject *value)
{
    if (!usable(t))
        return -1;
    if (value != NULL)
        return insert(t, key, value);
    Py_hash_t hash;
    if (key_hash(key, t->hash_mask, &hash) < 0)
        return -1;
    size_t i = probe(t, key, hash);
    slot_t s = t->slots[i];
    if (s.key == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    take_out(t, i);
    Py_DECREF(s.key);
    Py_DECREF(s.value);
    return 0;
}

static PyObject *table_get(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    int failed;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    if (!usable(t))
        return NULL;
    PyObject *v = lookup(t, args[0], &failed);
    if (failed)
        return NULL;
    if (v == NULL)
        v = nargs == 2 ? args[1] : Py_None;
    return Py_NewRef(v);
}

static PyObject *table_pop(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    if (!usable(t))
        return NULL;
    Py_hash_t hash;
    if (key_hash(args[0], t->hash_mask, &hash) < 0)
        return NULL;
    size_t i = probe(t, args[0], hash);
    slot_t s = t->slots[i];
    if (s.key == NULL) {
        if (nargs == 2)
            return Py_NewRef(args[1]);
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    take_out(t, i);
    Py_DECREF(s.key);
    return s.value; /* the table's reference, now the caller's */
}

static PyObject *table_update(TableObject *t, PyObject *pairs)
{
    if (!usable(t))
        return NULL;
    if (PyDict_Check(pairs)) {
        PyErr_SetString(PyExc_TypeError, "update() takes (key, value) pairs, not a mapping");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(pairs);
    if (it == NULL)
        return NULL;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        PyObject *fast = PySequence_Fast(item, "update() takes (key, value) pairs");
        Py_DECREF(item);
        if (fast == NULL)
            goto fail;
        if (PySequence_Fast_GET_SIZE(fast) != 2) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "update() takes (key, value) pairs");
            goto fail;
        }
        int rc = usable(t) ? insert(t, PySequence_Fast_GET_ITEM(fast, 0),
                                    PySequence_Fast_GET_ITEM(fast, 1))
                           : -1;
        Py_DECREF(fast);
        if (rc < 0)
            goto fail;
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
fail:
    Py_DECREF(it);
    return NULL;
}

static PyObject *table_items(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (!usable(t))
        return NULL;
    /* References to every key and value first, in a loop that allocates no Python object:
       an allocation may run the garbage collector, and a finalizer may change the table. */
    Py_ssize_t n = t->used, k = 0;
    PyObject **held = PyMem_Malloc(((size_t)n * 2 + 1) * sizeof(PyObject *));
    if (held == NULL)
        return PyErr_NoMemory();
    for (size_t i = 0; i <= t->mask && k < n; i++) {
        const slot_t *s = &t->slots[i];
        if (s->key != NULL) {
            held[2 * k] = Py_NewRef(s->key);
            held[2 * k + 1] = Py_NewRef(s->value);
            k++;
        }
    }
    PyObject *out = PyList_New(n);
    for (Py_ssize_t j = 0; out != NULL && j < n; j++) {
        PyObject *pair = PyTuple_Pack(2, held[2 * j], held[2 * j + 1]);
        if (pair == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, j, pair);
    }
    for (Py_ssize_t j = 0; j < 2 * n; j++)
        Py_DECREF(held[j]);
    PyMem_Free(held);
    return out;
}

/* [table.get(key, default) for key in keys], with the misses of AHEAD ids overlapped. */
static PyObject *table_get_many(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get_many(keys, default)");
        return NULL;
    }
    if (!usable(t))
        return NULL;
    /* a copy: the caller's list could change while an allocation below runs the GC */
    PyObject *fast = PySequence_Tuple(args[0]);
    if (fast == NULL)
        return NULL;
    PyObject *dflt = args[1];
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **keys = PySequence_Fast_ITEMS(fast);
    PyObject *out = PyList_New(n);
    Py_hash_t *hashes = PyMem_Malloc(((size_t)n + 1) * sizeof(Py_hash_t));
    size_t *found = PyMem_Malloc(((size_t)n + 1) * sizeof(size_t));
    if (out == NULL || hashes == NULL || found == NULL) {
        if (out != NULL && (hashes == NULL || found == NULL))
            PyErr_NoMemory();
        goto fail;
    }
    /* hashing a fresh str reads it: one sequential pass before the table's misses */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (key_hash(keys[i], t->hash_mask, &hashes[i]) < 0)
            goto fail;
    }
    const slot_t *slots = t->slots;
    size_t mask = t->mask;
    for (Py_ssize_t i = 0; i < n + 2 * AHEAD; i++) {
        if (i < n)
            __builtin_prefetch(&slots[(size_t)hashes[i] & mask]);
        Py_ssize_t j = i - AHEAD;
        if (j >= 0 && j < n) {
            /* the first slot with the id's hash (or the empty one ending its probe) */
            size_t k = (size_t)hashes[j] & mask;
            while (slots[k].key != NULL && slots[k].hash != hashes[j])
                k = (k + 1) & mask;
            found[j] = k;
            if (slots[k].key != NULL) {
                __builtin_prefetch(slots[k].key);
                __builtin_prefetch((const char *)slots[k].key + 64);
                __builtin_prefetch(slots[k].value, 1);
            }
        }
        Py_ssize_t m = i - 2 * AHEAD;
        if (m >= 0 && m < n) {
            PyObject *v = dflt;
            /* a different id with the same 64-bit hash walks on: rare, and correct */
            for (size_t k = found[m]; slots[k].key != NULL; k = (k + 1) & mask) {
                if (slots[k].hash == hashes[m] && same(slots[k].key, keys[m])) {
                    v = slots[k].value;
                    break;
                }
            }
            PyList_SET_ITEM(out, m, Py_NewRef(v));
        }
    }
    PyMem_Free(hashes);
    PyMem_Free(found);
    Py_DECREF(fast);
    return out;
fail:
    PyMem_Free(hashes);
    PyMem_Free(found);
    Py_XDECREF(out);
    Py_DECREF(fast);
    return NULL;
}

/* A batch's dictionary of strings, deduplicated: (the distinct ones in first-appearance
   order, each string's index among them as int64 in a bytearray). Hashing here caches each
   str's hash for get_many(). */
static PyObject *distinct(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *seq;
    int bits = 64;
    Py_hash_t mask_bits;
    if (!PyArg_ParseTuple(args, "O|i:distinct", &seq, &bits) || hash_mask(bits, &mask_bits) < 0)
        return NULL;
    /* a copy: the caller's list could change while an allocation below runs the GC */
    PyObject *fast = PySequence_Tuple(seq);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    PyObject *result = NULL, *list = NULL, *index = NULL;
    Py_ssize_t *slots = NULL, *firsts = NULL;
    Py_hash_t *hashes = NULL;
    size_t capacity = MIN_CAPACITY;
    while (capacity < (size_t)n * 2)
        capacity *= 2;
    size_t mask = capacity - 1;
    slots = PyMem_Malloc(capacity * sizeof(Py_ssize_t));
    firsts = PyMem_Malloc(((size_t)n + 1) * sizeof(Py_ssize_t));
    hashes = PyMem_Malloc(((size_t)n + 1) * sizeof(Py_hash_t));
    index = PyByteArray_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (slots == NULL || firsts == NULL || hashes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (index == NULL)
        goto done;
    memset(slots, 0xff, capacity * sizeof(Py_ssize_t)); /* -1: empty */
    int64_t *at = (int64_t *)PyByteArray_AS_STRING(index);
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_hash_t h;
        if (key_hash(items[i], mask_bits, &h) < 0)
            goto done;
        size_t k = (size_t)h & mask;
        for (;;) {
            Py_ssize_t e = slots[k];
            if (e < 0) {
                slots[k] = count;
                firsts[count] = i;
                hashes[count] = h;
                at[i] = count++;
                break;
            }
            if (hashes[e] == h && same(items[firsts[e]], items[i])) {
                at[i] = e;
                break;
            }
            k = (k + 1) & mask;
        }
    }
    list = PyList_New(count);
    if (list == NULL)
        goto done;
    for (Py_ssize_t c = 0; c < count; c++)
        PyList_SET_ITEM(list, c, Py_NewRef(items[firsts[c]]));
    result = PyTuple_Pack(2, list, index);
done:
    PyMem_Free(slots);
    PyMem_Free(firsts);
    PyMem_Free(hashes);
    Py_XDECREF(list);
    Py_XDECREF(index);
    Py_DECREF(fast);
    return result;
}

static PyObject *addresses(PyObject *Py_UNUSED(module), PyObject *seq)
{
    PyObject *fast = PySequence_Fast(seq, "addresses() takes a list");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (out != NULL) {
        int64_t *at = (int64_t *)PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < n; i++)
            at[i] = (int64_t)(intptr_t)items[i]; /* what id() gives in CPython */
    }
    Py_DECREF(fast);
    return out;
}

static PyMethodDef table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))table_get, METH_FASTCALL,
     "get(key, default=None): the key's value, or default."},
    {"pop", (PyCFunction)(void (*)(void))table_pop, METH_FASTCALL,
     "pop(key[, default]): remove the key and return its value (default, or KeyError)."},
    {"update", (PyCFunction)table_update, METH_O, "update(pairs): set each (key, value)."},
    {"items", (PyCFunction)table_items, METH_NOARGS, "items(): a list of (key, value)."},
    {"get_many", (PyCFunction)(void (*)(void))table_get_many, METH_FASTCALL,
     "get_many(keys, default): [get(key, default) for key in keys], a batch at a time."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS, "DeviceTable[V]"},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods table_as_mapping = {
    .mp_length = (lenfunc)table_length,
    .mp_subscript = (binaryfunc)table_subscript,
    .mp_ass_subscript = (objobjargproc)table_ass_subscript,
};

static PySequenceMethods table_as_sequence = {
    .sq_contains = (objobjproc)table_contains,
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rtmonitor.ingest._devices.DeviceTable",
    .tp_doc = "A str-keyed table for a fleet's device entries, looked up a batch at a time.",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = table_new,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_traverse = (traverseproc)table_traverse,
    .tp_clear = (inquiry)table_clear,
    .tp_methods = table_methods,
    .tp_as_mapping = &table_as_mapping,
    .tp_as_sequence = &table_as_sequence,
    .tp_hash = PyObject_HashNotImplemented,
};

static PyMethodDef module_methods[] = {
    {"distinct", distinct, METH_VARARGS,
     "distinct(strings, hash_bits=64): (the distinct ones in first-appearance order, each "
     "one's index among them as int64 in a bytearray); fewer hash_bits in tests only."},
    {"addresses", addresses, METH_O,
     "addresses(objects): each object's id() as a native int64, in one bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rtmonitor.ingest._devices",
    .m_doc = "The validator's device table, looked up a batch at a time (see _devices.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__devices(void)
{
    if (PyType_Ready(&TableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "DeviceTable", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
