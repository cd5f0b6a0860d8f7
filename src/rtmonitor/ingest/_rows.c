/* Row batches read straight from the protobuf wire format, in C.
 *
 * A row batch (rtmonitor.v1.Batch with `repeated Packet packets = 3`) is read into
 * columns in two passes over the bytes, without making a Python object per packet:
 *
 *   pass 1  walks every field, checks the framing, counts packets and readings;
 *   pass 2  fills the columns and dictionary-encodes device ids, kinds and value names
 *           (a hash table over the byte slices, keyed by CPython's own randomised string
 *           hash, so crafted ids cannot make it quadratic).
 *
 * Only the distinct strings of a batch become Python str objects (strict UTF-8, like
 * protobuf's parser). Proto3 semantics are kept: a repeated scalar field's last value
 * wins; a map key repeated inside one packet keeps its last value; unknown fields of a
 * batch or a packet are skipped. Anything this reader does not handle itself returns
 * None, and the caller uses protobuf's parser instead, which decides (and words the error, if the message is bad):
 * a Columns field, a wire type that does not match the field, groups, truncated or
 * overlong data, invalid UTF-8, a map entry with unknown fields (protobuf keeps it out of
 * the map), a string field repeated where one is declared (protobuf checks the UTF-8 of
 * every occurrence, this reader only of the last one, which wins). So the result is always
 * exactly what protobuf's parser gives, only faster; tests/unit/test_rows_wire.py checks
 * that on random and mutated messages.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FALLBACK 1  /* let protobuf's parser read this message */

typedef struct {
    const uint8_t *ptr;
    Py_ssize_t len;
} slice_t;

/* Distinct byte strings in first-appearance order, with an open-addressing index. */
typedef struct {
    slice_t *entries;
    Py_ssize_t count;
    int32_t *slots; /* -1 = empty */
    size_t mask;
} dict_t;

static uint64_t hash_bytes(const uint8_t *ptr, Py_ssize_t len)
{
#if PY_VERSION_HEX >= 0x030E0000
    return (uint64_t)Py_HashBuffer(ptr, len);
#else
    return (uint64_t)_Py_HashBytes(ptr, len);
#endif
}

static Py_ssize_t dict_intern(dict_t *d, slice_t s)
{
    /* Kinds and value names are a handful per batch: compare before hashing. */
    if (d->count <= 4) {
        for (Py_ssize_t k = 0; k < d->count; k++) {
            slice_t e = d->entries[k];
            if (e.len == s.len && memcmp(e.ptr, s.ptr, (size_t)s.len) == 0)
                return k;
        }
    }
    size_t i = (size_t)hash_bytes(s.ptr, s.len) & d->mask;
    for (;;) {
        int32_t slot = d->slots[i];
        if (slot < 0) {
            d->slots[i] = (int32_t)d->count;
            d->entries[d->count] = s;
            return d->count++;
        }
        slice_t e = d->entries[slot];
        if (e.len == s.len && memcmp(e.ptr, s.ptr, (size_t)s.len) == 0)
            return slot;
        i = (i + 1) & d->mask;
    }
}

/* A varint of at most `max_bytes` bytes: 10 for a value, 5 for a tag or a length, which
   protobuf reads as 32-bit and refuses when padded past 5 bytes. */
static int read_varint_max(const uint8_t **pp, const uint8_t *end, uint64_t *out, int max_bytes)
{
    const uint8_t *p = *pp;
    uint64_t v = 0;
    for (int shift = 0; shift < 7 * max_bytes; shift += 7) {
        if (p >= end)
            return FALLBACK;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 0;
        }
    }
    return FALLBACK; /* longer than max_bytes */
}

static int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    return read_varint_max(pp, end, out, 10);
}

/* One field's tag; field number 0, or a tag beyond 32 bits or 5 bytes, is left to protobuf. */
static int read_tag(const uint8_t **pp, const uint8_t *end, uint32_t *field, uint32_t *wire)
{
    uint64_t tag;
    if (read_varint_max(pp, end, &tag, 5) || tag > UINT32_MAX || (tag >> 3) == 0)
        return FALLBACK;
    *field = (uint32_t)(tag >> 3);
    *wire = (uint32_t)(tag & 7);
    return 0;
}

/* A length-delimited field's bytes. */
static int read_slice(const uint8_t **pp, const uint8_t *end, slice_t *out)
{
    uint64_t len;
    if (read_varint_max(pp, end, &len, 5) || len > INT32_MAX || len > (uint64_t)(end - *pp))
        return FALLBACK;
    out->ptr = *pp;
    out->len = (Py_ssize_t)len;
    *pp += len;
    return 0;
}

/* A fixed-width field's bytes (8: fixed64/double, 4: fixed32/float). */
static int read_fixed(const uint8_t **pp, const uint8_t *end, Py_ssize_t width,
                      const uint8_t **out)
{
    if (end - *pp < width)
        return FALLBACK;
    *out = *pp;
    *pp += width;
    return 0;
}

/* Skip an unknown field. Groups (wire types 3/4) and invalid wire types go to protobuf. */
static int skip_field(const uint8_t **pp, const uint8_t *end, uint32_t wire)
{
    uint64_t v;
    slice_t s;
    const uint8_t *f;
    switch (wire) {
    case 0:
        return read_varint(pp, end, &v);
    case 1:
        return read_fixed(pp, end, 8, &f);
    case 2:
        return read_slice(pp, end, &s);
    case 5:
        return read_fixed(pp, end, 4, &f);
    default:
        return FALLBACK;
    }
}

/* A field of a known number: its wire type must be the declared one, else protobuf
   decides (it would keep the field as unknown data). */
static int bytes_field(const uint8_t **pp, const uint8_t *end, uint32_t wire, slice_t *out)
{
    return wire != 2 ? FALLBACK : read_slice(pp, end, out);
}

/* A string field: protobuf checks the UTF-8 of every occurrence, this reader only of the
   one it keeps (the last), so a second occurrence goes to protobuf. */
static int string_field(const uint8_t **pp, const uint8_t *end, uint32_t wire, slice_t *out,
                        int *seen)
{
    if (*seen)
        return FALLBACK;
    *seen = 1;
    return bytes_field(pp, end, wire, out);
}

static int varint_field(const uint8_t **pp, const uint8_t *end, uint32_t wire, uint64_t *out)
{
    return wire != 0 ? FALLBACK : read_varint(pp, end, out);
}

/* What the two passes share. Pass 1 only counts; pass 2 (fill = 1) writes the columns. */
typedef struct {
    int fill;
    Py_ssize_t n, m;    /* packets, readings so far */
    slice_t producer;
    uint64_t batch_id;
    /* pass 2 */
    dict_t devices, kinds, names;
    int64_t *dev_idx, *kind_idx, *size, *ts;
    int64_t *v_pos, *v_name;
    double *v_val;
    int64_t *name_packet; /* per distinct name: the last packet that had it, and where */
    int64_t *name_slot;
} state_t;

static int read_entry(state_t *st, const uint8_t *p, const uint8_t *end)
{
    slice_t key = {p, 0}; /* a missing key is "" and a missing value 0.0, as in protobuf */
    double value = 0.0;
    uint32_t field, wire;
    int key_seen = 0;
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        if (field == 1) {
            if (string_field(&p, end, wire, &key, &key_seen))
                return FALLBACK;
        } else if (field == 2) {
            const uint8_t *f;
            if (wire != 1 || read_fixed(&p, end, 8, &f))
                return FALLBACK;
            uint64_t bits = 0;
            for (int i = 0; i < 8; i++) /* little-endian on every host */
                bits |= (uint64_t)f[i] << (8 * i);
            memcpy(&value, &bits, 8);
        } else {
            /* protobuf keeps an entry with unknown fields as unknown data of the packet
               (it is not in the map): left to protobuf. */
            return FALLBACK;
        }
    }
    if (st->fill) {
        Py_ssize_t packet = st->n;
        Py_ssize_t name = dict_intern(&st->names, key);
        if (st->name_packet[name] == packet) { /* the same key again: the last one wins */
            st->v_val[st->name_slot[name]] = value;
            return 0;
        }
        st->name_packet[name] = packet;
        st->name_slot[name] = st->m;
        st->v_pos[st->m] = packet;
        st->v_name[st->m] = name;
        st->v_val[st->m] = value;
    }
    st->m++;
    return 0;
}

static int read_packet(state_t *st, const uint8_t *p, const uint8_t *end)
{
    slice_t device = {p, 0}, kind = {p, 0}, payload = {p, 0}, entry;
    uint64_t ts = 0;
    uint32_t field, wire;
    int device_seen = 0, kind_seen = 0;
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        int bad;
        switch (field) {
        case 1: bad = string_field(&p, end, wire, &device, &device_seen); break;
        case 2: bad = varint_field(&p, end, wire, &ts); break;
        case 3: bad = string_field(&p, end, wire, &kind, &kind_seen); break;
        case 4: bad = bytes_field(&p, end, wire, &payload); break;
        case 5:
            bad = bytes_field(&p, end, wire, &entry) ||
                  read_entry(st, entry.ptr, entry.ptr + entry.len);
            break;
        default: bad = skip_field(&p, end, wire);
        }
        if (bad)
            return FALLBACK;
    }
    if (st->fill) {
        Py_ssize_t i = st->n;
        st->dev_idx[i] = dict_intern(&st->devices, device);
        st->kind_idx[i] = dict_intern(&st->kinds, kind);
        st->size[i] = payload.len;
        st->ts[i] = (int64_t)ts;
    }
    st->n++;
    return 0;
}

static int read_batch(state_t *st, const uint8_t *p, const uint8_t *end)
{
    uint32_t field, wire;
    slice_t packet;
    int producer_seen = 0;
    st->n = st->m = 0;
    st->producer = (slice_t){p, 0};
    st->batch_id = 0;
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        int bad;
        switch (field) {
        case 1: bad = string_field(&p, end, wire, &st->producer, &producer_seen); break;
        case 2: bad = varint_field(&p, end, wire, &st->batch_id); break;
        case 3:
            bad = bytes_field(&p, end, wire, &packet) ||
                  read_packet(st, packet.ptr, packet.ptr + packet.len);
            break;
        case 4: /* columns: decoded from protobuf's message by numpy (ingest/columnar.py) */
            return FALLBACK;
        default: bad = skip_field(&p, end, wire);
        }
        if (bad)
            return FALLBACK;
    }
    return 0;
}

static size_t table_size(Py_ssize_t entries)
{
    size_t size = 16;
    while (size < 2 * (size_t)entries)
        size <<= 1;
    return size;
}

static int dict_init(dict_t *d, Py_ssize_t capacity)
{
    size_t size = table_size(capacity);
    d->count = 0;
    d->mask = size - 1;
    d->entries = PyMem_RawMalloc(sizeof(slice_t) * (size_t)(capacity ? capacity : 1));
    d->slots = PyMem_RawMalloc(sizeof(int32_t) * size);
    if (!d->entries || !d->slots)
        return -1;
    memset(d->slots, 0xff, sizeof(int32_t) * size);
    return 0;
}

static void dict_free(dict_t *d)
{
    PyMem_RawFree(d->entries);
    PyMem_RawFree(d->slots);
}

/* The distinct entries as a list of str; NULL with UnicodeDecodeError set if one is not
   UTF-8 (the callers check for it and fall back: protobuf for row batches, the Python
   mapping for OTLP). */
static PyObject *dict_strings(const dict_t *d)
{
    PyObject *list = PyList_New(d->count);
    if (!list)
        return NULL;
    for (Py_ssize_t i = 0; i < d->count; i++) {
        PyObject *s = PyUnicode_DecodeUTF8((const char *)d->entries[i].ptr, d->entries[i].len,
                                           "strict");
        if (!s) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, s);
    }
    return list;
}

static PyObject *column(Py_ssize_t count, size_t width)
{
    return PyByteArray_FromStringAndSize(NULL, count * (Py_ssize_t)width);
}

#define DATA(obj) ((void *)PyByteArray_AS_STRING(obj))

/* The two results, each a type of its own (named tuples, like os.stat_result). */
static PyStructSequence_Field rows_fields[] = {
    {"producer_id", NULL},
    {"batch_id", NULL},
    {"device_ids", "distinct device ids, in first-appearance order"},
    {"dev_idx", "per packet: index into device_ids (int64)"},
    {"kinds", "distinct kinds (\"\" where a packet has none)"},
    {"kind_idx", "per packet: index into kinds (int64)"},
    {"size", "per packet: payload bytes (int64)"},
    {"ts", "per packet: device timestamp in ms, 0 if unset (int64)"},
    {"names", "distinct value names"},
    {"v_pos", "per reading, in packet order: its packet (int64)"},
    {"v_name", "per reading: index into names (int64)"},
    {"v_val", "per reading: its value (float64)"},
    {NULL, NULL},
};

static PyStructSequence_Desc rows_desc = {
    "rtmonitor.ingest._rows.Rows",
    "A row batch read into columns; the columns are bytearrays of native int64/float64.",
    rows_fields,
    12,
};

static PyStructSequence_Field too_large_fields[] = {
    {"batch_id", NULL},
    {"packets", "the packets the message carries"},
    {NULL, NULL},
};

static PyStructSequence_Desc too_large_desc = {
    "rtmonitor.ingest._rows.TooLarge",
    "A batch with more than max_packets packets: nothing was built for it.",
    too_large_fields,
    2,
};

static PyTypeObject *RowsType, *TooLargeType;

/* A new struct sequence of `type` holding `items` (references stolen, also on failure). */
static PyObject *build(PyTypeObject *type, PyObject **items, Py_ssize_t count)
{
    PyObject *result = PyStructSequence_New(type);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (result && items[i])
            PyStructSequence_SetItem(result, i, items[i]);
        else
            Py_XDECREF(items[i]);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!items[i]) { /* building an item failed: its error is set */
            Py_XDECREF(result);
            return NULL;
        }
    }
    return result;
}

PyDoc_STRVAR(read_rows_doc,
"read_rows(data, max_packets=-1) -> Rows | TooLarge | None\n\n"
"Read a serialized rtmonitor.v1.Batch of row packets into columns (Rows: the index\n"
"and number columns as bytearrays of native int64 / float64, readings in packet\n"
"order). TooLarge (batch_id, packets) when there are more than max_packets (counted\n"
"in the first pass: nothing is built for a batch that will be refused). None when\n"
"protobuf's parser must read the message instead.");

static PyObject *read_rows(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf;
    Py_ssize_t max_packets = -1;
    if (!PyArg_ParseTuple(args, "y*|n:read_rows", &buf, &max_packets))
        return NULL;
    if (buf.len > INT32_MAX) { /* dictionary slots are 32-bit: far beyond any gRPC message */
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
    }
    const uint8_t *start = buf.buf, *end = start + buf.len;
    state_t st;
    memset(&st, 0, sizeof st);
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = read_batch(&st, start, end);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    PyObject *dev_idx = NULL, *kind_idx = NULL, *size = NULL, *ts = NULL;
    PyObject *v_pos = NULL, *v_name = NULL, *v_val = NULL;
    PyObject *producer = NULL, *device_ids = NULL, *kinds = NULL, *names = NULL;
    if (status) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
    }
    Py_ssize_t n = st.n, m = st.m;
    if (max_packets >= 0 && n > max_packets) { /* refused whole: build nothing */
        PyBuffer_Release(&buf);
        PyObject *items[2] = {PyLong_FromUnsignedLongLong(st.batch_id), PyLong_FromSsize_t(n)};
        return build(TooLargeType, items, 2);
    }
    if (dict_init(&st.devices, n) || dict_init(&st.kinds, n) || dict_init(&st.names, m)) {
        PyErr_NoMemory();
        goto done;
    }
    st.name_packet = PyMem_RawMalloc(sizeof(int64_t) * (size_t)(m ? m : 1));
    st.name_slot = PyMem_RawMalloc(sizeof(int64_t) * (size_t)(m ? m : 1));
    if (!st.name_packet || !st.name_slot) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < m; i++)
        st.name_packet[i] = -1;
    dev_idx = column(n, 8), kind_idx = column(n, 8), size = column(n, 8), ts = column(n, 8);
    v_pos = column(m, 8), v_name = column(m, 8), v_val = column(m, 8);
    if (!dev_idx || !kind_idx || !size || !ts || !v_pos || !v_name || !v_val)
        goto done;
    st.dev_idx = DATA(dev_idx), st.kind_idx = DATA(kind_idx);
    st.size = DATA(size), st.ts = DATA(ts);
    st.v_pos = DATA(v_pos), st.v_name = DATA(v_name), st.v_val = DATA(v_val);
    st.fill = 1;
    Py_BEGIN_ALLOW_THREADS
    status = read_batch(&st, start, end); /* pass 1 checked the framing: this succeeds */
    Py_END_ALLOW_THREADS
    if (status || st.n != n) {
        PyErr_SetString(PyExc_RuntimeError, "read_rows: second pass disagrees with the first");
        goto done;
    }
    if (st.m != m) { /* repeated keys were folded into one reading */
        if (PyByteArray_Resize(v_pos, st.m * 8) || PyByteArray_Resize(v_name, st.m * 8) ||
            PyByteArray_Resize(v_val, st.m * 8))
            goto done;
    }
    producer = PyUnicode_DecodeUTF8((const char *)st.producer.ptr, st.producer.len, "strict");
    if (producer)
        device_ids = dict_strings(&st.devices);
    if (device_ids)
        kinds = dict_strings(&st.kinds);
    if (kinds)
        names = dict_strings(&st.names);
    if (!names) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) { /* protobuf words this one */
            PyErr_Clear();
            result = Py_NewRef(Py_None);
        }
        goto done;
    }
    /* build() takes each reference over (also when building fails). */
    PyObject *items[12] = {producer, PyLong_FromUnsignedLongLong(st.batch_id), device_ids,
                           dev_idx, kinds, kind_idx, size, ts, names, v_pos, v_name, v_val};
    result = build(RowsType, items, 12);
    producer = device_ids = kinds = names = NULL;
    dev_idx = kind_idx = size = ts = v_pos = v_name = v_val = NULL;
done:
    Py_XDECREF(producer);
    Py_XDECREF(device_ids);
    Py_XDECREF(kinds);
    Py_XDECREF(names);
    Py_XDECREF(dev_idx);
    Py_XDECREF(kind_idx);
    Py_XDECREF(size);
    Py_XDECREF(ts);
    Py_XDECREF(v_pos);
    Py_XDECREF(v_name);
    Py_XDECREF(v_val);
    dict_free(&st.devices);
    dict_free(&st.kinds);
    dict_free(&st.names);
    PyMem_RawFree(st.name_packet);
    PyMem_RawFree(st.name_slot);
    PyBuffer_Release(&buf);
    return result;
}

/* ---- OTLP metrics: number data points read into columns ------------------------------
 *
 * read_otlp reads an ExportMetricsServiceRequest (opentelemetry-proto) as protobuf itself
 * serialized it (ingest/otlp.py parses a request first and hands this reader the message's
 * SerializeToString(): canonical, so the length of a data point's bytes here is exactly its
 * ByteSize(), and every string is valid UTF-8). One entry per gauge or sum data point, in
 * request order: its device (index into the distinct device ids, -1 when the resource has
 * none of the device attributes), its metric's name, its serialized size, its time in ms,
 * its value (as_double + as_int: the one not set reads 0), whether a value is set, and its
 * attributes: the bytes of its KeyValue fields (contiguous in a canonical serialization),
 * interned, so that Python names each distinct set once (otlp.OtlpReceiver._table).
 * Anything else — a histogram, exponential histogram or summary, a device attribute whose
 * value is not a string — returns None and the Python mapping (otlp.OtlpReceiver.gather)
 * reads the request instead.
 */

#define MAX_DEVICE_KEYS 8

typedef struct {
    int fill;
    Py_ssize_t n; /* data points so far */
    slice_t keys[MAX_DEVICE_KEYS];
    Py_ssize_t nkeys;
    /* the current resource's device and metric's name; interned at their first point, so
       that the dictionaries hold only entries with points, in first-appearance order */
    slice_t device;
    int has_device;
    Py_ssize_t device_at, name_at;
    slice_t name;
    dict_t devices, names, attrs;
    int64_t *dev_idx, *name_idx, *size, *ts, *attr_idx;
    double *val;
    uint8_t *has_val;
} otlp_t;

static uint64_t le64(const uint8_t *f)
{
    uint64_t bits = 0;
    for (int i = 0; i < 8; i++) /* little-endian on every host */
        bits |= (uint64_t)f[i] << (8 * i);
    return bits;
}

static int otlp_fixed64(const uint8_t **pp, const uint8_t *end, uint32_t wire, uint64_t *out)
{
    const uint8_t *f;
    if (wire != 1 || read_fixed(pp, end, 8, &f))
        return FALLBACK;
    *out = le64(f);
    return 0;
}

/* NumberDataPoint: start_time 2, time 3, as_double 4, exemplars 5, as_int 6, attributes 7,
   flags 8. */
static int otlp_point(otlp_t *st, slice_t point)
{
    const uint8_t *p = point.ptr, *end = p + point.len;
    uint64_t time = 0, as_double = 0, as_int = 0, skip;
    int has_value = 0;
    uint32_t field, wire;
    slice_t attrs = {p, 0}, kv;
    int attrs_done = 0;
    while (p < end) {
        const uint8_t *at = p;
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        if (attrs.len && field != 7)
            attrs_done = 1;
        if (field == 7) {
            if (attrs_done || bytes_field(&p, end, wire, &kv))
                return FALLBACK; /* not contiguous: not a canonical serialization */
            if (!attrs.len)
                attrs.ptr = at;
            attrs.len = p - attrs.ptr;
        } else if (field == 3) {
            if (otlp_fixed64(&p, end, wire, &time))
                return FALLBACK;
        } else if (field == 4 || field == 6) { /* a oneof: the last one set wins */
            if (otlp_fixed64(&p, end, wire, field == 4 ? &as_double : &as_int))
                return FALLBACK;
            if (field == 4)
                as_int = 0;
            else
                as_double = 0;
            has_value = 1;
        } else if (field == 2) {
            if (otlp_fixed64(&p, end, wire, &skip))
                return FALLBACK;
        } else if (skip_field(&p, end, wire)) {
            return FALLBACK;
        }
    }
    if (st->fill) {
        Py_ssize_t i = st->n;
        if (st->has_device && st->device_at < 0)
            st->device_at = dict_intern(&st->devices, st->device);
        if (st->name_at < 0)
            st->name_at = dict_intern(&st->names, st->name);
        double d;
        memcpy(&d, &as_double, 8);
        st->dev_idx[i] = st->has_device ? st->device_at : -1;
        st->name_idx[i] = st->name_at;
        st->size[i] = point.len;
        st->ts[i] = (int64_t)(time / 1000000u);
        st->val[i] = d + (double)(int64_t)as_int; /* as protobuf's fields add up in Python */
        st->has_val[i] = (uint8_t)has_value;
        st->attr_idx[i] = attrs.len ? dict_intern(&st->attrs, attrs) : -1;
    }
    st->n++;
    return 0;
}

/* Gauge (data_points 1) or Sum (data_points 1, temporality 2, monotonic 3). */
static int otlp_points(otlp_t *st, slice_t data)
{
    const uint8_t *p = data.ptr, *end = p + data.len;
    uint32_t field, wire;
    slice_t s;
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        if (field == 1) {
            if (bytes_field(&p, end, wire, &s) || otlp_point(st, s))
                return FALLBACK;
        } else if (skip_field(&p, end, wire)) {
            return FALLBACK;
        }
    }
    return 0;
}

/* Metric: name 1, gauge 5, sum 7; histogram 9, exponential_histogram 10, summary 11. */
static int otlp_metric(otlp_t *st, slice_t metric)
{
    const uint8_t *p = metric.ptr, *end = p + metric.len;
    uint32_t field, wire;
    int name_seen = 0, data_seen = 0;
    slice_t s;
    st->name = (slice_t){p, 0};
    st->name_at = -1;
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        if (field == 1) {
            if (data_seen || string_field(&p, end, wire, &st->name, &name_seen))
                return FALLBACK; /* canonical order puts the name first */
        } else if (field == 5 || field == 7) {
            if (data_seen || bytes_field(&p, end, wire, &s) || otlp_points(st, s))
                return FALLBACK;
            data_seen = 1;
        } else if (field == 9 || field == 10 || field == 11) {
            return FALLBACK; /* two readings per point: the Python mapping */
        } else if (skip_field(&p, end, wire)) {
            return FALLBACK;
        }
    }
    return 0;
}

/* AnyValue: string_value 1 is the only one read here; no value at all reads "". */
static int otlp_text(slice_t any, slice_t *out)
{
    const uint8_t *p = any.ptr, *end = p + any.len;
    uint32_t field, wire;
    int seen = 0;
    *out = (slice_t){p, 0};
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        if (field != 1 || string_field(&p, end, wire, out, &seen))
            return FALLBACK; /* a number, bool, array...: otlp.text_of words it */
    }
    return 0;
}

/* Resource attributes: the device id is the first of `keys` present with a non-empty value
   (otlp.device_of; a key repeated: its last value). */
static int otlp_resource(otlp_t *st, slice_t resource)
{
    const uint8_t *p = resource.ptr, *end = p + resource.len;
    uint32_t field, wire;
    slice_t found[MAX_DEVICE_KEYS], kv;
    int present[MAX_DEVICE_KEYS] = {0};
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        if (field != 1) {
            if (skip_field(&p, end, wire))
                return FALLBACK;
            continue;
        }
        if (bytes_field(&p, end, wire, &kv))
            return FALLBACK;
        const uint8_t *q = kv.ptr, *kv_end = q + kv.len;
        slice_t key = {q, 0}, value = {q, 0};
        int key_seen = 0, value_seen = 0;
        while (q < kv_end) {
            if (read_tag(&q, kv_end, &field, &wire))
                return FALLBACK;
            if (field == 1) {
                if (string_field(&q, kv_end, wire, &key, &key_seen))
                    return FALLBACK;
            } else if (field == 2) {
                if (value_seen || bytes_field(&q, kv_end, wire, &value))
                    return FALLBACK;
                value_seen = 1;
            } else if (skip_field(&q, kv_end, wire)) {
                return FALLBACK;
            }
        }
        for (Py_ssize_t k = 0; k < st->nkeys; k++) {
            if (key.len == st->keys[k].len && memcmp(key.ptr, st->keys[k].ptr, key.len) == 0) {
                if (otlp_text(value, &found[k]))
                    return FALLBACK;
                present[k] = 1;
            }
        }
    }
    for (Py_ssize_t k = 0; k < st->nkeys; k++) {
        if (present[k] && found[k].len > 0) {
            st->device = found[k];
            st->has_device = 1;
            return 0;
        }
    }
    return 0;
}

/* ResourceMetrics: resource 1, scope_metrics 2 (ScopeMetrics: metrics 2). */
static int otlp_resource_metrics(otlp_t *st, slice_t rm)
{
    const uint8_t *p = rm.ptr, *end = p + rm.len;
    uint32_t field, wire;
    int resource_seen = 0, scopes_seen = 0;
    slice_t s, m;
    st->has_device = 0;
    st->device_at = -1;
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        if (field == 1) {
            /* canonical order puts the resource first, once */
            if (resource_seen || scopes_seen || bytes_field(&p, end, wire, &s) ||
                otlp_resource(st, s))
                return FALLBACK;
            resource_seen = 1;
        } else if (field == 2) {
            scopes_seen = 1;
            if (bytes_field(&p, end, wire, &s))
                return FALLBACK;
            const uint8_t *q = s.ptr, *s_end = q + s.len;
            while (q < s_end) {
                if (read_tag(&q, s_end, &field, &wire))
                    return FALLBACK;
                if (field == 2) {
                    if (bytes_field(&q, s_end, wire, &m) || otlp_metric(st, m))
                        return FALLBACK;
                } else if (skip_field(&q, s_end, wire)) {
                    return FALLBACK;
                }
            }
        } else if (skip_field(&p, end, wire)) {
            return FALLBACK;
        }
    }
    return 0;
}

static int otlp_request(otlp_t *st, const uint8_t *p, const uint8_t *end)
{
    uint32_t field, wire;
    slice_t s;
    st->n = 0;
    while (p < end) {
        if (read_tag(&p, end, &field, &wire))
            return FALLBACK;
        if (field == 1) {
            if (bytes_field(&p, end, wire, &s) || otlp_resource_metrics(st, s))
                return FALLBACK;
        } else if (skip_field(&p, end, wire)) {
            return FALLBACK;
        }
    }
    return 0;
}

static PyStructSequence_Field otlp_fields[] = {
    {"device_ids", "distinct device ids, in first-appearance order"},
    {"dev_idx", "per data point: index into device_ids, -1 = no device attribute (int64)"},
    {"names", "distinct metric names, in first-appearance order"},
    {"name_idx", "per data point: index into names (int64)"},
    {"size", "per data point: its serialized size (int64)"},
    {"ts", "per data point: time_unix_nano // 1e6 (int64)"},
    {"val", "per data point: its value (float64)"},
    {"has_val", "per data point: 1 if a value is set (uint8)"},
    {"attrs", "distinct attribute sets: the bytes of a point's KeyValue fields (field 7)"},
    {"attr_idx", "per data point: index into attrs, -1 = no attributes (int64)"},
    {NULL, NULL},
};

static PyStructSequence_Desc otlp_desc = {
    "rtmonitor.ingest._rows.OtlpPoints",
    "An OTLP request's number data points as columns (bytearrays of native int64/float64).",
    otlp_fields,
    10,
};

static PyTypeObject *OtlpType;

PyDoc_STRVAR(read_otlp_doc,
"read_otlp(data, device_keys) -> OtlpPoints | None\n\n"
"Read a serialized ExportMetricsServiceRequest, as protobuf serialized it, into\n"
"columns: one entry per gauge or sum data point. device_keys: the resource attributes\n"
"naming the device (bytes), by preference. None when the Python mapping must read it.");

static PyObject *read_otlp(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf;
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "y*O!:read_otlp", &buf, &PyTuple_Type, &keys))
        return NULL;
    otlp_t st;
    memset(&st, 0, sizeof st);
    PyObject *result = NULL, *device_ids = NULL, *names = NULL;
    PyObject *dev_idx = NULL, *name_idx = NULL, *size = NULL, *ts = NULL, *val = NULL;
    PyObject *has_val = NULL, *attrs = NULL, *attr_idx = NULL;
    st.nkeys = PyTuple_GET_SIZE(keys);
    if (buf.len > INT32_MAX || st.nkeys > MAX_DEVICE_KEYS) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
    }
    for (Py_ssize_t k = 0; k < st.nkeys; k++) {
        PyObject *key = PyTuple_GET_ITEM(keys, k);
        if (!PyBytes_Check(key)) {
            PyBuffer_Release(&buf);
            PyErr_SetString(PyExc_TypeError, "read_otlp: device_keys must be bytes");
            return NULL;
        }
        st.keys[k] = (slice_t){(const uint8_t *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)};
    }
    const uint8_t *start = buf.buf, *end = start + buf.len;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = otlp_request(&st, start, end);
    Py_END_ALLOW_THREADS
    if (status) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
    }
    Py_ssize_t n = st.n;
    if (dict_init(&st.devices, n) || dict_init(&st.names, n) || dict_init(&st.attrs, n)) {
        PyErr_NoMemory();
        goto done;
    }
    dev_idx = column(n, 8), name_idx = column(n, 8), size = column(n, 8), ts = column(n, 8);
    val = column(n, 8), has_val = column(n, 1), attr_idx = column(n, 8);
    if (!dev_idx || !name_idx || !size || !ts || !val || !has_val || !attr_idx)
        goto done;
    st.attr_idx = DATA(attr_idx);
    st.dev_idx = DATA(dev_idx), st.name_idx = DATA(name_idx);
    st.size = DATA(size), st.ts = DATA(ts), st.val = DATA(val), st.has_val = DATA(has_val);
    st.fill = 1;
    Py_BEGIN_ALLOW_THREADS
    status = otlp_request(&st, start, end); /* pass 1 checked the framing: this succeeds */
    Py_END_ALLOW_THREADS
    if (status || st.n != n) {
        PyErr_SetString(PyExc_RuntimeError, "read_otlp: second pass disagrees with the first");
        goto done;
    }
    device_ids = dict_strings(&st.devices);
    if (device_ids)
        names = dict_strings(&st.names);
    if (!names) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            result = Py_NewRef(Py_None);
        }
        goto done;
    }
    attrs = PyList_New(st.attrs.count);
    if (!attrs)
        goto done;
    for (Py_ssize_t k = 0; k < st.attrs.count; k++) {
        slice_t a = st.attrs.entries[k];
        PyObject *b = PyBytes_FromStringAndSize((const char *)a.ptr, a.len);
        if (!b)
            goto done;
        PyList_SET_ITEM(attrs, k, b);
    }
    PyObject *items[10] = {device_ids, dev_idx, names, name_idx, size,
                           ts, val, has_val, attrs, attr_idx};
    result = build(OtlpType, items, 10);
    device_ids = names = attrs = NULL;
    dev_idx = name_idx = size = ts = val = has_val = attr_idx = NULL;
done:
    Py_XDECREF(device_ids);
    Py_XDECREF(names);
    Py_XDECREF(dev_idx);
    Py_XDECREF(name_idx);
    Py_XDECREF(size);
    Py_XDECREF(ts);
    Py_XDECREF(val);
    Py_XDECREF(has_val);
    Py_XDECREF(attrs);
    Py_XDECREF(attr_idx);
    dict_free(&st.devices);
    dict_free(&st.names);
    dict_free(&st.attrs);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"read_rows", read_rows, METH_VARARGS, read_rows_doc},
    {"read_otlp", read_otlp, METH_VARARGS, read_otlp_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rtmonitor.ingest._rows",
    .m_doc = "Row batches read from the protobuf wire format into columns (see _rows.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__rows(void)
{
    if (!RowsType && !(RowsType = PyStructSequence_NewType(&rows_desc)))
        return NULL;
    if (!TooLargeType && !(TooLargeType = PyStructSequence_NewType(&too_large_desc)))
        return NULL;
    if (!OtlpType && !(OtlpType = PyStructSequence_NewType(&otlp_desc)))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Rows", (PyObject *)RowsType) < 0 ||
        PyModule_AddObjectRef(m, "TooLarge", (PyObject *)TooLargeType) < 0 ||
        PyModule_AddObjectRef(m, "OtlpPoints", (PyObject *)OtlpType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
