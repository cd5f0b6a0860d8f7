/* A Redis module: RTM.MERGE6, the device merge of scripts.MERGE_DEVICES in C, with the
 * index group's writes that follow it (scripts.WRITE_ROWS); and RTM.APPLY6, the same merge
 * as replicas and the AOF replay it.
 *
 * Why: a fleet's flush is one merge per device, and in Lua most of a merge is the
 * machinery around it, not the arithmetic: two redis.call()s (GET, SET) and a ~300-byte
 * record unpacked into a Lua table of ~80 values, then packed again. In C the record is
 * read where Redis keeps it and written once, and the device's row goes straight into its
 * group's columns. (Figures: benchmarks/RESULTS.md.)
 *
 * And two reads, for listings sorted by a number: RTM.WINDOW, one window's packets per
 * slot of an index group's rate column, and RTM.LIVE, a column's figures with free slots
 * marked, so that the service fetches 8 bytes a slot instead of 16 or 40.
 *
 *   RTM.MERGE6 numkeys marker ix-devices ix-slot ix-id ix-free ix-packets ix-bytes
 *              ix-last-seen ix-rate device-key... ttl seq retention-ms window deltas id-offset
 *
 * The merge is the script's, byte for byte (`EVALSHA <MERGE_DEVICES> numkeys marker
 * device-key... ttl seq retention window deltas`: record and delta formats in scripts.py),
 * and the group's writes are WRITE_ROWS' from the script's reply; so either path may run a
 * flush, a retry or a replayed journal, and they leave the same bytes, slots and columns
 * (tests/integration/test_merge_module.py checks them against each other). Replies [the
 * number of devices, what the records had no room for] (below).
 *
 * A call is replicated (and written to the AOF) as itself, not as what it wrote: as
 * RTM.APPLY6 with the same arguments and the time the call read (now-ms: its records and
 * its marker expire at that time plus the retention or the TTL, so a replay does not start
 * them again). The merge is deterministic given the keys, the arguments and that time (its
 * only use of the clock), and Redis writes the DEL of a key it found expired before the
 * command, so a replica or a restart replaying it leaves the same bytes. A device merge's arguments (its key and delta, ~130
 * bytes for a fleet's device in one flush) are a third of what it writes (its record, the
 * group's row, its slot): at a million devices the AOF's writes were most of Redis' time
 * (benchmarks/RESULTS.md, twentieth pass). So a Redis that has merged with the module reads
 * its AOF only with the module loaded, until the AOF is next rewritten (BGREWRITEAOF: then
 * it holds plain values), and its replicas need the module too.
 *
 * RTM.APPLY6 is therefore part of the AOF's format: a release that changes what a merge
 * writes (the record or the group's layout, NAME_ROOM, BUCKET_ROOM, FINE_S, MAX_SLOTS, how
 * seconds fold or slots are reused) must name its replay anew (RTM.APPLY7) and keep
 * RTM.APPLY6 as it is, registered beside it, for the AOFs and replicas that hold it; and
 * the module's version (RedisModule_OnLoad) counts such changes.
 *
 * Unlike the script, a malformed deltas argument is refused before anything is written.
 *
 * No Redis header is needed: the few module API functions used are declared here and
 * looked up by name when Redis loads the module, as redismodule.h does.
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "records are little-endian doubles: this module assumes a little-endian machine"
#endif

/* ---- the module API (the subset used; names and values as in redismodule.h) ---- */

#define REDISMODULE_OK 0
#define REDISMODULE_ERR 1
#define REDISMODULE_APIVER_1 1
#define REDISMODULE_READ (1 << 0)
#define REDISMODULE_WRITE (1 << 1)
#define REDISMODULE_KEYTYPE_EMPTY 0
#define REDISMODULE_KEYTYPE_STRING 1
#define REDISMODULE_KEYTYPE_LIST 2
#define REDISMODULE_KEYTYPE_HASH 3
#define REDISMODULE_KEYTYPE_ZSET 5
#define REDISMODULE_ZADD_NX (1 << 1)
#define REDISMODULE_HASH_NONE 0
#define REDISMODULE_NO_EXPIRE -1

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleKey RedisModuleKey;
typedef struct RedisModuleString RedisModuleString;
typedef int (*RedisModuleCmdFunc)(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

#define API(X)                                                                              \
    X(int, CreateCommand,                                                                   \
      (RedisModuleCtx *, const char *, RedisModuleCmdFunc, const char *, int, int, int))     \
    X(void, SetModuleAttribs, (RedisModuleCtx *, const char *, int, int))                   \
    X(int, IsModuleNameBusy, (const char *))                                                \
    X(int, WrongArity, (RedisModuleCtx *))                                                  \
    X(int, ReplyWithError, (RedisModuleCtx *, const char *))                                \
    X(int, ReplyWithArray, (RedisModuleCtx *, long))                                        \
    X(int, ReplyWithLongLong, (RedisModuleCtx *, long long))                                \
    X(int, ReplyWithStringBuffer, (RedisModuleCtx *, const char *, size_t))                 \
    X(void *, OpenKey, (RedisModuleCtx *, RedisModuleString *, int))                        \
    X(void, CloseKey, (RedisModuleKey *))                                                   \
    X(int, KeyType, (RedisModuleKey *))                                                     \
    X(char *, StringDMA, (RedisModuleKey *, size_t *, int))                                 \
    X(int, StringSet, (RedisModuleKey *, RedisModuleString *))                              \
    X(int, SetExpire, (RedisModuleKey *, long long))                                        \
    X(RedisModuleString *, CreateString, (RedisModuleCtx *, const char *, size_t))          \
    X(RedisModuleString *, CreateStringFromLongLong, (RedisModuleCtx *, long long))         \
    X(void, FreeString, (RedisModuleCtx *, RedisModuleString *))                            \
    X(const char *, StringPtrLen, (const RedisModuleString *, size_t *))                    \
    X(int, StringToLongLong, (const RedisModuleString *, long long *))                      \
    X(int, StringToDouble, (const RedisModuleString *, double *))                           \
    X(int, Replicate, (RedisModuleCtx *, const char *, const char *, ...))                  \
    X(int, IsKeysPositionRequest, (RedisModuleCtx *))                                       \
    X(void, KeyAtPos, (RedisModuleCtx *, int))                                              \
    X(int, ZsetAdd, (RedisModuleKey *, double, RedisModuleString *, int *))                 \
    X(int, StringTruncate, (RedisModuleKey *, size_t))                                      \
    X(size_t, ValueLength, (RedisModuleKey *))                                              \
    X(int, HashGet, (RedisModuleKey *, int, ...))                                           \
    X(int, HashSet, (RedisModuleKey *, int, ...))                                           \
    X(RedisModuleString *, ListPop, (RedisModuleKey *, int))                                \
    X(void *, Alloc, (size_t))                                                              \
    X(void *, Realloc, (void *, size_t))                                                    \
    X(void, Free, (void *))                                                                 \
    X(long long, Milliseconds, (void))                                                      \
    X(int, SetAbsExpire, (RedisModuleKey *, long long))                                   \
    X(int, ReplicateVerbatim, (RedisModuleCtx *))

#define DECLARE(TYPE, NAME, ARGS) static TYPE(*RM_##NAME) ARGS = NULL;
API(DECLARE)
#undef DECLARE

/* ---- reading and writing the packed forms (scripts.py) ---- */

#define HEAD_SIZE 56  /* record: <ddddddHHHH */
#define KIND_SIZE 8   /* after the name: d */
#define VALUE_SIZE 48 /* after the name: dddddd */
#define BUCKET_SIZE 20 /* I4 d d */
#define FINE_S 10     /* seconds kept one by one past the newest (scripts.py: FINE_S) */
/* The script unpacks a record or a delta into one Lua call's results, which Lua caps near
 * 8,000 values (2 per kind, 7 per value name, 3 per rate bucket): past it the script
 * would fail, so a delta past it is refused and a record is never merged past it (below). */
#define MAX_VALUES 7900
/* A record never outgrows MAX_VALUES, whatever its devices send: a merge refused for it
 * would be refused at every retry, and the flush (every device in it) with it. Kinds and
 * value names take at most NAME_ROOM values; a new one past it is not recorded (its
 * packets still count in the record's packets and bytes), and the rate buckets take the
 * rest (>= 40, where a device keeps ~18; past it the record's first, oldest, spans, then
 * its first seconds go: only a record written by something else comes near). Both are
 * counted in the reply. One instance's --max-kinds-per-device and
 * --max-value-names-per-device fit in NAME_ROOM (config.py); several instances, or one
 * restarted, each admit a device's names anew, which is how a record reaches it. */
#define BUCKET_ROOM 40
#define NAME_ROOM (MAX_VALUES - 3 * BUCKET_ROOM)
/* Refusals several checks give (Redis' own wording for the first; the script's refusals
 * of a record are worded the same, scripts.py). */
#define WRONGTYPE "WRONGTYPE Operation against a key holding the wrong kind of value"
#define CUT_SHORT "ERR a device record is cut short (not written by this layout?)"
#define IX_WRONGTYPE "WRONGTYPE an index key holds the wrong kind of value" /* keys.py */
#define MAX_TTL_S (1LL << 40)        /* markers: far beyond any use, no overflow in ms */
#define MAX_RETENTION_MS (1LL << 50)

typedef struct {
    const unsigned char *p;
    size_t n, at;
    int bad;
} reader;

static double get_d(reader *r) {
    double d = 0;
    if (r->bad || r->n - r->at < 8) {
        r->bad = 1;
        return 0;
    }
    memcpy(&d, r->p + r->at, 8);
    r->at += 8;
    return d;
}

static double get_u(reader *r, size_t size) {
    uint32_t v = 0;
    if (r->bad || r->n - r->at < size) {
        r->bad = 1;
        return 0;
    }
    for (size_t i = 0; i < size; i++) v |= (uint32_t)r->p[r->at + i] << (8 * i);
    r->at += size;
    return (double)v;
}

/* a zero-terminated string (Lua struct's "s"): its start and length */
static const char *get_s(reader *r, size_t *len) {
    if (r->bad || r->at >= r->n) {
        r->bad = 1;
        return NULL;
    }
    const unsigned char *start = r->p + r->at;
    const unsigned char *end = memchr(start, 0, r->n - r->at);
    if (end == NULL) {
        r->bad = 1;
        return NULL;
    }
    *len = (size_t)(end - start);
    r->at += *len + 1;
    return (const char *)start;
}

/* Lua struct's integer packing: through a C long, then the low bytes */
static void put_u(unsigned char **w, double n, size_t size) {
    unsigned long v = n < (double)LONG_MAX ? (unsigned long)(long)n : (unsigned long)n;
    for (size_t i = 0; i < size; i++) *(*w)++ = (unsigned char)(v >> (8 * i));
}

static void put_d(unsigned char **w, double d) {
    memcpy(*w, &d, 8);
    *w += 8;
}

static void put_s(unsigned char **w, const char *s, size_t len) {
    memcpy(*w, s, len);
    (*w)[len] = 0;
    *w += len + 1;
}

/* ---- one device's merge ---- */

typedef struct {
    const char *name;
    size_t len;
    double v[6]; /* a kind: its count; a value: count, sum, min, max, last, last_ts */
} entry;

typedef struct {
    double s, p, b; /* second (or span start), packets, bytes */
} bucket;

typedef struct {
    double packets, bytes, first, last;
    size_t nk, nv;
    entry *kinds, *values; /* into the scratch area */
} delta;

/* Growable arrays, reused across the devices of a call. */
typedef struct {
    entry *kinds, *values, *dentries;
    bucket *secs, *spans, *folded;
    size_t kcap, vcap, dcap, bcap;
    unsigned char *out;
    size_t outcap;
} scratch;

/* (RM_Realloc does not return NULL: out of memory, Redis stops, as for its own commands) */
static void grow(void **p, size_t *cap, size_t need, size_t size) {
    if (need <= *cap) return;
    size_t n = *cap ? *cap : 16;
    while (n < need) n *= 2;
    *p = RM_Realloc(*p, n * size);
    *cap = n;
}

/* Seconds, spans and folded seconds: never more of each than seconds and spans together
 * plus the new second, so one capacity serves the three. */
static void grow_buckets(scratch *s, size_t need) {
    if (need <= s->bcap) return;
    size_t n = s->bcap ? s->bcap : 32;
    while (n < need) n *= 2;
    s->secs = RM_Realloc(s->secs, n * sizeof(bucket));
    s->spans = RM_Realloc(s->spans, n * sizeof(bucket));
    s->folded = RM_Realloc(s->folded, n * sizeof(bucket));
    s->bcap = n;
}

static void scratch_free(scratch *s) {
    RM_Free(s->kinds);
    RM_Free(s->values);
    RM_Free(s->dentries);
    RM_Free(s->secs);
    RM_Free(s->spans);
    RM_Free(s->folded);
    RM_Free(s->out);
}

/* A stored value's bytes, to read from (a record: kept raw by Redis, so not copied). */
static reader string_reader(RedisModuleKey *key) {
    size_t len;
    const char *p = RM_StringDMA(key, &len, REDISMODULE_READ);
    return (reader){(const unsigned char *)p, len, 0, 0};
}

/* A record's head: <ddddddHHHH (scripts.py). */
typedef struct {
    double p, b, f, l, w, wp;
    size_t nk, nv, nf, nc;
} head;

static head read_head(reader *r) {
    head h;
    h.p = get_d(r), h.b = get_d(r), h.f = get_d(r), h.l = get_d(r);
    h.w = get_d(r), h.wp = get_d(r);
    h.nk = (size_t)get_u(r, 2), h.nv = (size_t)get_u(r, 2);
    h.nf = (size_t)get_u(r, 2), h.nc = (size_t)get_u(r, 2);
    return h;
}

static const char *parse_delta(reader *r, delta *d) {
    d->packets = get_d(r);
    d->bytes = get_d(r);
    d->first = get_d(r);
    d->last = get_d(r);
    d->nk = (size_t)get_u(r, 2);
    d->nv = (size_t)get_u(r, 2);
    if (r->bad) return "ERR a delta is cut short";
    if (2 * d->nk + 7 * d->nv > MAX_VALUES) return "ERR a delta holds too many kinds or values";
    return NULL;
}

/* The entries of a delta or a record: (s d) * nk then (s dddddd) * nv. */
static int parse_entries(reader *r, entry *out, size_t n, size_t numbers) {
    for (size_t i = 0; i < n; i++) {
        out[i].name = get_s(r, &out[i].len);
        for (size_t j = 0; j < numbers; j++) out[i].v[j] = get_d(r);
        if (r->bad) return 0;
    }
    return 1;
}

static size_t find(const entry *list, size_t n, const entry *e) {
    for (size_t i = 0; i < n; i++)
        if (list[i].len == e->len && memcmp(list[i].name, e->name, e->len) == 0) return i;
    return n;
}

/* scripts.py buckets(): add the packets and bytes to receive second `sec`; fold seconds
 * older than FINE_S into aligned 10-second spans, drop spans that ended over 61 s ago. */
static void buckets(scratch *s, size_t *nf, size_t *nc, double sec, double packets,
                    double nbytes) {
    double fold_before = sec - FINE_S;
    int found = 0, stale = 0;
    for (size_t i = 0; i < *nf; i++) {
        bucket *b = &s->secs[i];
        if (b->s == sec) {
            b->p += packets;
            b->b += nbytes;
            found = 1;
        } else if (b->s < fold_before) {
            stale = 1;
        }
    }
    if (!found) {
        s->secs[*nf] = (bucket){sec, packets, nbytes};
        (*nf)++;
    }
    if (!stale) return;
    size_t kept = 0, nfold = 0;
    for (size_t i = 0; i < *nf; i++) {
        bucket b = s->secs[i];
        if (b.s < fold_before) {
            double m = b.s - floor(b.s / 10) * 10; /* Lua's % */
            s->folded[nfold++] = (bucket){b.s - m, b.p, b.b};
        } else {
            s->secs[kept++] = b;
        }
    }
    double drop_before = sec - 61;
    size_t sp = 0;
    for (size_t i = 0; i < *nc; i++)
        if (s->spans[i].s + 10 > drop_before) s->spans[sp++] = s->spans[i];
    for (size_t i = 0; i < nfold; i++) {
        bucket f = s->folded[i];
        if (!(f.s + 10 > drop_before)) continue;
        size_t q = 0;
        while (q < sp && s->spans[q].s != f.s) q++;
        if (q < sp) {
            s->spans[q].p += f.p;
            s->spans[q].b += f.b;
        } else {
            s->spans[sp++] = f;
        }
    }
    *nf = kept;
    *nc = sp;
}

/* Write `size` bytes of `out` over the `have` bytes of the record `key` holds, where it
 * is. A merge mostly leaves a record as long as it was, or a few rate buckets longer or
 * shorter; rewritten where it is, the record costs Redis no delete and insert in its
 * keyspace and its expires table, and no new value to allocate, as a SET does
 * (RM_StringSet). A string made longer is first made one byte too long, then cut:
 * cutting gives back the room Redis keeps past a grown string (it doubles it), so a record
 * that grows takes the memory a SET would give it. One made shorter keeps its room unless
 * that is more than its length (Redis' rule for a cut string): a record holds the memory of
 * its longest recent form, a few percent more per device (benchmarks/RESULTS.md, eleventh
 * pass). 0 if it could not be written in place (then it is SET). */
static int write_in_place(RedisModuleKey *key, size_t have, const unsigned char *out,
                          size_t size) {
    if (size > have && RM_StringTruncate(key, size + 1) != REDISMODULE_OK) return 0;
    if (size != have && RM_StringTruncate(key, size) != REDISMODULE_OK) return 0;
    size_t len;
    char *p = RM_StringDMA(key, &len, REDISMODULE_WRITE);
    if (p == NULL || len != size) return 0;
    memcpy(p, out, size);
    return 1;
}

/* Merge delta `d` into the record `key` holds (open for writing) and write it; the 5
 * reply integers into `reply`, and what the record had no room for (NAME_ROOM) added to
 * `dropped`. Returns an error message, or NULL (never one check_device let through). */
static const char *merge_one(RedisModuleCtx *ctx, RedisModuleKey *key, delta *d,
                             double window, long long expire_at, scratch *s, long long *reply,
                             long long *dropped) {
    int type = RM_KeyType(key);
    if (type != REDISMODULE_KEYTYPE_EMPTY && type != REDISMODULE_KEYTYPE_STRING)
        return WRONGTYPE;
    double p, b, f, l, w, wp;
    size_t nk = 0, nv = 0, nf = 0, nc = 0;
    long long created;
    reader r = {0};
    if (type == REDISMODULE_KEYTYPE_STRING) {
        r = string_reader(key);
        head h = read_head(&r);
        p = h.p, b = h.b, f = h.f, l = h.l, w = h.w, wp = h.wp;
        nk = h.nk, nv = h.nv, nf = h.nf, nc = h.nc;
        p += d->packets, b += d->bytes, created = 0;
        if (d->first < f) f = d->first;
        if (d->last > l) l = d->last;
    } else {
        p = d->packets, b = d->bytes, f = d->first, l = d->last, w = 0, wp = 0, created = 1;
    }
    grow((void **)&s->kinds, &s->kcap, nk + d->nk, sizeof(entry));
    grow((void **)&s->values, &s->vcap, nv + d->nv, sizeof(entry));
    grow_buckets(s, nf + nc + 1);
    if (r.p != NULL) {
        if (r.bad || !parse_entries(&r, s->kinds, nk, 1) ||
            !parse_entries(&r, s->values, nv, 6))
            return CUT_SHORT;
        for (size_t i = 0; i < nf + nc; i++) {
            bucket *bk = i < nf ? &s->secs[i] : &s->spans[i - nf];
            bk->s = get_u(&r, 4), bk->p = get_d(&r), bk->b = get_d(&r);
        }
        if (r.bad) return CUT_SHORT;
    }
    for (size_t i = 0; i < d->nk; i++) {
        size_t q = find(s->kinds, nk, &d->kinds[i]);
        if (q < nk) {
            s->kinds[q].v[0] += d->kinds[i].v[0];
        } else if (2 * (nk + 1) + 7 * nv <= NAME_ROOM) {
            s->kinds[nk++] = d->kinds[i];
        } else {
            (*dropped)++;
        }
    }
    for (size_t i = 0; i < d->nv; i++) {
        const double *dv = d->values[i].v;
        size_t q = find(s->values, nv, &d->values[i]);
        if (q < nv) {
            double *rv = s->values[q].v;
            rv[0] += dv[0];
            rv[1] += dv[1];
            if (dv[2] < rv[2]) rv[2] = dv[2];
            if (dv[3] > rv[3]) rv[3] = dv[3];
            if (dv[5] >= rv[5]) rv[4] = dv[4], rv[5] = dv[5];
        } else if (2 * nk + 7 * (nv + 1) <= NAME_ROOM) {
            s->values[nv++] = d->values[i];
        } else {
            (*dropped)++;
        }
    }
    buckets(s, &nf, &nc, floor(d->last / 1000), d->packets, d->bytes);
    /* (names <= MAX_VALUES - 3: check_device) */
    size_t room = (MAX_VALUES - (2 * nk + 7 * nv)) / 3;
    if (nf + nc > room) { /* the first (oldest) spans, then the first seconds, as the
                             * script does */
        size_t excess = nf + nc - room;
        size_t spans = excess < nc ? excess : nc, seconds = excess - spans;
        memmove(s->secs, s->secs + seconds, (nf - seconds) * sizeof(bucket));
        memmove(s->spans, s->spans + spans, (nc - spans) * sizeof(bucket));
        nf -= seconds, nc -= spans;
        *dropped += (long long)excess;
    }
    if (window == w) {
        wp += d->packets;
    } else if (window > w) {
        w = window, wp = d->packets;
    }
    /* the new record (its names still point into the old one: built before the write) */
    size_t size = HEAD_SIZE + (nk * (KIND_SIZE + 1)) + nv * (VALUE_SIZE + 1);
    for (size_t i = 0; i < nk; i++) size += s->kinds[i].len;
    for (size_t i = 0; i < nv; i++) size += s->values[i].len;
    size += (nf + nc) * BUCKET_SIZE;
    grow((void **)&s->out, &s->outcap, size, 1);
    unsigned char *o = s->out;
    put_d(&o, p), put_d(&o, b), put_d(&o, f), put_d(&o, l), put_d(&o, w), put_d(&o, wp);
    put_u(&o, (double)nk, 2), put_u(&o, (double)nv, 2);
    put_u(&o, (double)nf, 2), put_u(&o, (double)nc, 2);
    for (size_t i = 0; i < nk; i++) {
        put_s(&o, s->kinds[i].name, s->kinds[i].len);
        put_d(&o, s->kinds[i].v[0]);
    }
    for (size_t i = 0; i < nv; i++) {
        put_s(&o, s->values[i].name, s->values[i].len);
        for (size_t j = 0; j < 6; j++) put_d(&o, s->values[i].v[j]);
    }
    for (size_t i = 0; i < nf + nc; i++) {
        const bucket *bk = i < nf ? &s->secs[i] : &s->spans[i - nf];
        put_u(&o, bk->s, 4), put_d(&o, bk->p), put_d(&o, bk->b);
    }
    /* (the old record is read: it may now be written over) */
    int in_place = r.p != NULL && write_in_place(key, r.n, s->out, size);
    if (!in_place) {
        RedisModuleString *value = RM_CreateString(ctx, (const char *)s->out, size);
        RM_StringSet(key, value); /* (a plain SET: the TTL goes, as with the script's SET) */
        RM_FreeString(ctx, value);
    }
    if (expire_at > 0) {
        /* a device silent for the retention expires with everything it counted (at the
         * time its replicas and the AOF are given: RTM.APPLY6's expire-at) */
        RM_SetAbsExpire(key, expire_at);
    } else if (in_place) {
        RM_SetExpire(key, REDISMODULE_NO_EXPIRE); /* (what the script's SET leaves) */
    }
    if (w != window) wp = 0;
    reply[0] = (long long)p, reply[1] = (long long)b, reply[2] = (long long)l;
    reply[3] = (long long)wp, reply[4] = created, reply[5] = (long long)f;
    return NULL;
}

/* A retry or a replay: the records' figures as they are (2), or -1 for one gone since. */
static const char *figures(RedisModuleKey *key, double window, long long *reply) {
    int type = RM_KeyType(key);
    const char *error = NULL;
    if (type == REDISMODULE_KEYTYPE_EMPTY) {
        reply[0] = reply[1] = reply[2] = reply[3] = reply[5] = 0, reply[4] = -1;
    } else if (type != REDISMODULE_KEYTYPE_STRING) {
        error = WRONGTYPE;
    } else {
        reader r = string_reader(key);
        head h = read_head(&r);
        if (r.bad) {
            error = CUT_SHORT;
        } else {
            reply[0] = (long long)h.p, reply[1] = (long long)h.b, reply[2] = (long long)h.l;
            reply[3] = h.w == window ? (long long)h.wp : 0, reply[4] = 2;
            reply[5] = (long long)h.f;
        }
    }
    return error;
}

/* The marker: the highest flush seq of this instance applied to these keys. */
static const char *marker_applied(RedisModuleCtx *ctx, RedisModuleString *keyname,
                                  double seq, int *applied) {
    RedisModuleKey *key = RM_OpenKey(ctx, keyname, REDISMODULE_READ);
    int type = RM_KeyType(key);
    *applied = 0;
    if (type == REDISMODULE_KEYTYPE_STRING) {
        size_t len;
        const char *v = RM_StringDMA(key, &len, REDISMODULE_READ);
        char text[64];
        if (len > 0 && len < sizeof text) {
            memcpy(text, v, len);
            text[len] = 0;
            char *end;
            double n = strtod(text, &end);
            while (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r') end++;
            if (end != text && *end == 0 && n >= seq) *applied = 1;
        }
    } else if (type != REDISMODULE_KEYTYPE_EMPTY) {
        RM_CloseKey(key);
        return WRONGTYPE;
    }
    RM_CloseKey(key);
    return NULL;
}

/* ---- the group's rows: what scripts.WRITE_ROWS writes from the merge script's reply ----
 *
 * Each device of an index group has a slot (ix-slot: id -> slot, ix-id: slot -> id; freed
 * slots wait in ix-free) and, at that slot, a row in four column strings: packets, bytes
 * and last_seen (big-endian int64 at 8 * slot) and rate (4 int64 at 32 * slot: the
 * newest window the device sent in and its packets there, then an older one). Sorted
 * listings rank these columns when they are read (storage/ranking.py): a merge writes a
 * few bytes where a sorted set would have moved a node in each of four skip lists. */

enum { IX_DEVICES, IX_SLOT, IX_ID, IX_FREE, IX_PACKETS, IX_BYTES, IX_LAST_SEEN, IX_RATE, IX_COUNT };

#define MAX_SLOTS (1 << 24)  /* keys.MAX_SLOTS: 512 MB of rate column */

typedef struct {
    RedisModuleKey *key[IX_COUNT];
    long long next; /* the first slot never used: rate column length / 32 */
} group;

/* Columns hold big-endian int64s, as BITFIELD reads and writes an i64 (WRITE_ROWS). */
static void put_i64(unsigned char *p, long long v) {
    uint64_t u = __builtin_bswap64((uint64_t)v);
    memcpy(p, &u, 8);
}
static long long get_i64(const unsigned char *p) {
    uint64_t u;
    memcpy(&u, p, 8);
    return (long long)__builtin_bswap64(u);
}

static const char *open_group(RedisModuleCtx *ctx, RedisModuleString **keys, group *g) {
    static const int types[IX_COUNT] = {
        REDISMODULE_KEYTYPE_ZSET,   REDISMODULE_KEYTYPE_HASH,   REDISMODULE_KEYTYPE_HASH,
        REDISMODULE_KEYTYPE_LIST,   REDISMODULE_KEYTYPE_STRING, REDISMODULE_KEYTYPE_STRING,
        REDISMODULE_KEYTYPE_STRING, REDISMODULE_KEYTYPE_STRING};
    *g = (group){0};
    for (int i = 0; i < IX_COUNT; i++) {
        g->key[i] = RM_OpenKey(ctx, keys[i], REDISMODULE_READ | REDISMODULE_WRITE);
        int type = RM_KeyType(g->key[i]);
        if (type != REDISMODULE_KEYTYPE_EMPTY && type != types[i]) return IX_WRONGTYPE;
    }
    g->next = (long long)(RM_ValueLength(g->key[IX_RATE]) / 32);
    return NULL;
}

static int slot_number(RedisModuleString *text, long long *slot) {
    return RM_StringToLongLong(text, slot) == REDISMODULE_OK && *slot >= 0 && *slot < MAX_SLOTS;
}

/* The device's slot: the one it has, else a freed one, else the next (open_group made sure
 * there is one). Only something else writes a slot that is not a number, or a freed slot
 * that is not one or is in use: such a device takes a new slot, such an entry is dropped
 * (WRITE_ROWS does the same), rather than the call failing once its records are merged. */
static void slot_of(RedisModuleCtx *ctx, group *g, RedisModuleString *member, long long *slot,
                    int *fresh) {
    RedisModuleString *value = NULL;
    RM_HashGet(g->key[IX_SLOT], REDISMODULE_HASH_NONE, member, &value, NULL);
    *fresh = value == NULL || !slot_number(value, slot);
    if (value != NULL) RM_FreeString(ctx, value);
    if (!*fresh) return;
    *slot = -1;
    while (*slot < 0 && RM_ValueLength(g->key[IX_FREE]) > 0) {
        RedisModuleString *freed = RM_ListPop(g->key[IX_FREE], 0), *owner = NULL;
        if (freed == NULL) break;
        if (slot_number(freed, slot) && *slot < g->next) { /* (past the columns: never used) */
            RM_HashGet(g->key[IX_ID], REDISMODULE_HASH_NONE, freed, &owner, NULL);
            if (owner != NULL) *slot = -1, RM_FreeString(ctx, owner);
        } else {
            *slot = -1;
        }
        RM_FreeString(ctx, freed);
    }
    if (*slot < 0) *slot = g->next;
    if (*slot >= g->next) g->next = *slot + 1;
    RedisModuleString *text = RM_CreateStringFromLongLong(ctx, *slot);
    RM_HashSet(g->key[IX_SLOT], REDISMODULE_HASH_NONE, member, text, NULL);
    RM_HashSet(g->key[IX_ID], REDISMODULE_HASH_NONE, text, member, NULL);
    RM_FreeString(ctx, text);
}

/* A column's bytes, grown (zeros) to hold `slot`. */
static unsigned char *column_at(group *g, int ix, long long slot, size_t width) {
    size_t len, need = (size_t)(slot + 1) * width;
    unsigned char *p = (unsigned char *)RM_StringDMA(g->key[ix], &len, REDISMODULE_WRITE);
    if (len < need) {
        /* (Redis keeps room past a string's end: doubled up to 1 MB, then 1 MB more) */
        if (RM_StringTruncate(g->key[ix], need) != REDISMODULE_OK) return NULL;
        p = (unsigned char *)RM_StringDMA(g->key[ix], &len, REDISMODULE_WRITE);
        if (len < need) return NULL;
    }
    return p + (size_t)slot * width;
}

/* One device's row, from its merge's 6 reply integers and the call's window (the same
 * arithmetic as scripts.WRITE_ROWS). */
static const char *row_device(RedisModuleCtx *ctx, group *g, RedisModuleString *member,
                              const long long *reply, long long window) {
    if (reply[4] < 0) return NULL; /* a replay, and the record has expired since */
    long long slot;
    int fresh;
    slot_of(ctx, g, member, &slot, &fresh);
    if (fresh) { /* (a device has a slot exactly while it is in ix-devices) */
        int flags = REDISMODULE_ZADD_NX;
        if (RM_ZsetAdd(g->key[IX_DEVICES], 0, member, &flags) != REDISMODULE_OK)
            return IX_WRONGTYPE;
    }
    unsigned char *pc = column_at(g, IX_PACKETS, slot, 8), *bc = column_at(g, IX_BYTES, slot, 8);
    unsigned char *lc = column_at(g, IX_LAST_SEEN, slot, 8), *rc = column_at(g, IX_RATE, slot, 32);
    if (!pc || !bc || !lc || !rc) return "ERR an index column cannot grow";
    long long p = get_i64(pc), b = get_i64(bc), l = get_i64(lc);
    /* Figures only grow, so the highest reported is kept: a retry, a replay or another
     * instance's older reply changes nothing. Except over a row last seen before the
     * replying record's first packet (reply[5]): that row is an expired predecessor's
     * (retention), and the record now replying is a new one, whose figures replace it.
     * (Not "this call created the record": another instance's merge into the new record
     * may have been written here first; and not a retention's worth of silence: a record's
     * TTL runs from its write, not from its packets' receive times.) */
    int reset = fresh || (l > 0 && reply[5] > l);
    put_i64(pc, reset || reply[0] > p ? reply[0] : p);
    put_i64(bc, reset || reply[1] > b ? reply[1] : b);
    put_i64(lc, reset || reply[2] > l ? reply[2] : l);
    long long w1 = get_i64(rc), p1 = get_i64(rc + 8), w2 = get_i64(rc + 16), p2 = get_i64(rc + 24);
    if (reset) w1 = p1 = w2 = p2 = 0;
    if (reply[3] > 0) { /* its packets in the call's window */
        if (window == w1) {
            if (reply[3] > p1) p1 = reply[3];
        } else if (window > w1) {
            w2 = w1, p2 = p1, w1 = window, p1 = reply[3];
        } else if (window == w2) {
            if (reply[3] > p2) p2 = reply[3];
        } else if (window > w2) {
            w2 = window, p2 = reply[3];
        }
    }
    put_i64(rc, w1), put_i64(rc + 8, p1), put_i64(rc + 16, w2), put_i64(rc + 24, p2);
    return NULL;
}

static void close_group(group *g) {
    for (int i = 0; i < IX_COUNT; i++)
        if (g->key[i]) RM_CloseKey(g->key[i]);
}

/* Every delta of the call, read before anything is written. */
static const char *parse_deltas(RedisModuleString *arg, size_t devices, scratch *s,
                                delta *deltas) {
    size_t len, entries = 0;
    reader r = {(const unsigned char *)RM_StringPtrLen(arg, &len), 0, 0, 0};
    r.n = len;
    size_t *at = RM_Alloc((devices + 1) * sizeof(size_t));
    for (size_t k = 0; k < devices; k++) {
        const char *error = parse_delta(&r, &deltas[k]);
        if (error != NULL) {
            RM_Free(at);
            return error;
        }
        size_t n = deltas[k].nk + deltas[k].nv;
        grow((void **)&s->dentries, &s->dcap, entries + n, sizeof(entry));
        at[k] = entries;
        if (!parse_entries(&r, s->dentries + entries, deltas[k].nk, 1) ||
            !parse_entries(&r, s->dentries + entries + deltas[k].nk, deltas[k].nv, 6)) {
            RM_Free(at);
            return "ERR a delta's kinds or values are cut short";
        }
        entries += n;
    }
    for (size_t k = 0; k < devices; k++) { /* (the array has stopped moving) */
        deltas[k].kinds = s->dentries + at[k];
        deltas[k].values = s->dentries + at[k] + deltas[k].nk;
    }
    RM_Free(at);
    return NULL;
}

/* Before anything is written: the device's key holds nothing or a whole record within
 * MAX_VALUES, with room for a rate bucket (merge_one keeps it so; `merging`: not a replay,
 * which reads the head only), so that a call is refused whole, never after some of its
 * devices were merged. Only a key written by something else fails it. */
static const char *check_device(RedisModuleKey *key, int merging) {
    int type = RM_KeyType(key);
    const char *error = NULL;
    if (type == REDISMODULE_KEYTYPE_STRING) {
        size_t name;
        reader r = string_reader(key);
        head h = read_head(&r);
        size_t nk = h.nk, nv = h.nv, nb = h.nf + h.nc;
        for (size_t i = 0; i < nk + nv && !r.bad; i++) {
            get_s(&r, &name);
            r.bad |= r.n - r.at < (i < nk ? KIND_SIZE : VALUE_SIZE);
            r.at += i < nk ? KIND_SIZE : VALUE_SIZE;
        }
        r.bad |= !r.bad && (r.n - r.at) / BUCKET_SIZE < nb;
        if (r.bad) {
            error = CUT_SHORT;
        } else if (merging && (2 * nk + 7 * nv + 3 > MAX_VALUES ||
                               2 * nk + 7 * nv + 3 * nb > MAX_VALUES)) {
            error = "ERR a device record holds more kinds and values than a merge takes (not "
                    "written by this layout?)";
        }
    } else if (type != REDISMODULE_KEYTYPE_EMPTY) {
        error = WRONGTYPE;
    }
    return error;
}

/* Two of the keys a call writes through handles open at once must not be one key: a
 * handle would not see what the other wrote (Redis asserts). */
static int same_key(RedisModuleString *a, RedisModuleString *b) {
    size_t la, lb;
    const char *pa = RM_StringPtrLen(a, &la), *pb = RM_StringPtrLen(b, &lb);
    return la == lb && memcmp(pa, pb, la) == 0;
}

/* (Ids are chosen by devices, but the service's calls carry at most 256 devices
 * (store.GROUP_SIZE): even ids that all collide cost a few thousand short compares.) */
static uint64_t key_hash(RedisModuleString *key) {
    size_t n;
    const unsigned char *p = (const unsigned char *)RM_StringPtrLen(key, &n);
    uint64_t h = n * 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ULL;
    h ^= h >> 31; /* (splitmix64's finish) */
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 29);
}

/* Does a device key appear twice among `keys`? A call holds each device's key open from
 * its check to its merge, and two handles open on one key would not see each other's
 * writes; a call that names a key twice (the service never does) opens each as it goes. */
static int repeated(RedisModuleString **keys, size_t n) {
    size_t cap = 4, *table, found = 0;
    while (cap < 2 * n) cap *= 2;
    table = RM_Alloc(cap * sizeof(size_t)); /* (index + 1; 0: empty) */
    memset(table, 0, cap * sizeof(size_t));
    for (size_t k = 0; k < n && !found; k++) {
        size_t i = (size_t)key_hash(keys[k]) & (cap - 1);
        while (table[i] != 0 && !(found = same_key(keys[table[i] - 1], keys[k])))
            i = (i + 1) & (cap - 1);
        table[i] = k + 1;
    }
    RM_Free(table);
    return found != 0;
}

/* RTM.MERGE6 numkeys marker ix-devices ix-slot ix-id ix-free ix-packets ix-bytes
 *            ix-last-seen ix-rate device-key... ttl seq retention-ms window deltas id-offset
 * MERGE_DEVICES' merge, then the group's rows as scripts.WRITE_ROWS writes them from the
 * script's reply (a device's member: its key less the first id-offset bytes and the
 * closing brace). Replies [the number of devices, the kinds, value names and rate buckets
 * the records had no room for] (MERGE_DEVICES' last reply value). (RTM.MERGE5, of key
 * layout 4, wrote sorted sets; RTM.MERGE4 refused a record's growth past MAX_VALUES.)
 *
 * RTM.APPLY6 <RTM.MERGE6's arguments> now-ms
 * The same, at the time given instead of the clock's: what a RTM.MERGE6 call is replicated
 * as. A call refused before it wrote anything is not replicated; one that failed after it
 * began writing is (only a key written by something else between the checks and the writes
 * could make it, which within one command nothing can), and fails the same way where it is
 * replayed. */
static int merge_call(RedisModuleCtx *ctx, RedisModuleString **argv, int argc, int apply) {
    long long numkeys, offset;
    int wellformed = argc >= 2 && RM_StringToLongLong(argv[1], &numkeys) == REDISMODULE_OK &&
                     numkeys >= 1 + IX_COUNT && numkeys == (long long)argc - 8 - apply;
    if (RM_IsKeysPositionRequest(ctx)) {
        /* Redis asks for the keys (ACL key patterns, COMMAND GETKEYS, a cluster) without a
         * client to reply to: answer nothing else, whatever the arguments */
        for (int i = 2; wellformed && i < 2 + (int)numkeys; i++) RM_KeyAtPos(ctx, i);
        return REDISMODULE_OK;
    }
    if (!wellformed) return RM_WrongArity(ctx);
    RedisModuleString **keys = argv + 2, **args = argv + 2 + numkeys;
    RedisModuleString **ixkeys = keys + 1, **devkeys = keys + 1 + IX_COUNT;
    size_t devices = (size_t)numkeys - 1 - IX_COUNT;
    long long ttl, retention;
    double seq, window;
    if (RM_StringToLongLong(args[0], &ttl) != REDISMODULE_OK || ttl <= 0 ||
        RM_StringToDouble(args[1], &seq) != REDISMODULE_OK ||
        RM_StringToLongLong(args[2], &retention) != REDISMODULE_OK || retention < 0 ||
        RM_StringToDouble(args[3], &window) != REDISMODULE_OK ||
        RM_StringToLongLong(args[5], &offset) != REDISMODULE_OK || offset < 0 ||
        ttl > MAX_TTL_S || retention > MAX_RETENTION_MS)
        return RM_ReplyWithError(
            ctx, "ERR ttl, seq, retention, window and id-offset must be numbers in range");
    for (int i = 0; i <= IX_COUNT; i++)
        for (int j = i + 1; j <= IX_COUNT; j++)
            if (same_key(keys[i], keys[j]))
                return RM_ReplyWithError(ctx, "ERR the marker and index keys must differ");
    for (size_t k = 0; k < devices; k++) {
        size_t len;
        RM_StringPtrLen(devkeys[k], &len);
        if (len < (size_t)offset + 1)
            return RM_ReplyWithError(ctx, "ERR a device key is shorter than id-offset");
        for (int i = 0; i <= IX_COUNT; i++)
            if (same_key(devkeys[k], keys[i]))
                return RM_ReplyWithError(ctx, "ERR a device key is the marker or an index key");
    }
    scratch s = {0};
    long long reply[6] = {0}, dropped = 0;
    /* the call's one reading of the clock (RTM.APPLY6: the one the call it replays read) */
    long long now = 0;
    if (!apply) {
        now = RM_Milliseconds();
    } else if (RM_StringToLongLong(argv[argc - 1], &now) != REDISMODULE_OK || now <= 0 ||
               now > LLONG_MAX / 2) {
        return RM_ReplyWithError(ctx, "ERR now-ms must be a time in milliseconds");
    }
    /* every record of the call expires at the same time, here and where it is replicated */
    long long expire_at = retention > 0 ? now + retention : 0;
    delta *deltas = NULL;
    int applied;
    const char *error = marker_applied(ctx, keys[0], seq, &applied);
    if (error == NULL && !applied) {
        deltas = RM_Alloc((devices + 1) * sizeof(delta));
        error = parse_deltas(args[4], devices, &s, deltas);
    }
    /* Each device's key opened once, checked, merged, closed at the end (opening a key
     * is a lookup in Redis' keyspace and its expires table). Opened for writing from the
     * check on, so a call refused after it signals its keys as modified though it wrote
     * none (a WATCH on a device key aborts: nothing watches them). */
    int mode = applied ? REDISMODULE_READ : REDISMODULE_READ | REDISMODULE_WRITE;
    int hold = error == NULL && !repeated(devkeys, devices);
    RedisModuleKey **held = RM_Alloc((devices + 1) * sizeof(RedisModuleKey *));
    for (size_t k = 0; k < devices; k++) held[k] = NULL;
    for (size_t k = 0; error == NULL && k < devices; k++) {
        RedisModuleKey *key = RM_OpenKey(ctx, devkeys[k], mode);
        error = check_device(key, !applied);
        if (hold) {
            held[k] = key;
        } else {
            RM_CloseKey(key);
        }
    }
    group g = {0};
    RedisModuleString **members = RM_Alloc((devices + 1) * sizeof(RedisModuleString *));
    for (size_t k = 0; k < devices; k++) {
        size_t len;
        const char *key = RM_StringPtrLen(devkeys[k], &len);
        members[k] = RM_CreateString(ctx, key + offset, len - (size_t)offset - 1);
    }
    if (error == NULL) error = open_group(ctx, ixkeys, &g);
    /* (a slot for every device, even if none had one: refused before anything is written) */
    if (error == NULL && g.next + (long long)devices > MAX_SLOTS)
        error = "ERR an index group has no slot left";
    if (error == NULL && !applied) {
        RedisModuleKey *marker = RM_OpenKey(ctx, keys[0], REDISMODULE_WRITE);
        RM_StringSet(marker, args[1]);
        RM_SetAbsExpire(marker, now + ttl * 1000);
        RM_CloseKey(marker);
    }
    int writing = error == NULL;
    for (size_t k = 0; error == NULL && k < devices; k++) {
        RedisModuleKey *key = hold ? held[k] : RM_OpenKey(ctx, devkeys[k], mode);
        if (applied) {
            error = figures(key, window, reply);
        } else {
            error = merge_one(ctx, key, &deltas[k], window, expire_at, &s, reply, &dropped);
        }
        if (!hold) RM_CloseKey(key);
        if (error == NULL)
            error = row_device(ctx, &g, members[k], reply, (long long)window);
    }
    if (writing && apply) {
        RM_ReplicateVerbatim(ctx);
    } else if (writing) { /* (argv[0] is the command's name, as the client wrote it) */
        RM_Replicate(ctx, "rtm.apply6", "vl", argv + 1, (size_t)argc - 1, now);
    }
    close_group(&g);
    for (size_t k = 0; k < devices; k++)
        if (held[k] != NULL) RM_CloseKey(held[k]);
    RM_Free(held);
    for (size_t k = 0; k < devices; k++) RM_FreeString(ctx, members[k]);
    RM_Free(members);
    RM_Free(deltas);
    scratch_free(&s);
    if (error != NULL) return RM_ReplyWithError(ctx, error);
    RM_ReplyWithArray(ctx, 2);
    RM_ReplyWithLongLong(ctx, (long long)devices);
    return RM_ReplyWithLongLong(ctx, dropped);
}

/* A column string to read (RTM.WINDOW, RTM.LIVE), opened into *key (to be closed): its
 * bytes and length (NULL, 0 for a missing key), or 0 if the key holds another type. */
static int open_column(RedisModuleCtx *ctx, RedisModuleString *name, RedisModuleKey **key,
                       const unsigned char **bytes, size_t *len) {
    *key = RM_OpenKey(ctx, name, REDISMODULE_READ);
    *bytes = NULL, *len = 0;
    int type = RM_KeyType(*key); /* (EMPTY for a missing key: OpenKey gives NULL) */
    if (type == REDISMODULE_KEYTYPE_STRING) {
        *bytes = (const unsigned char *)RM_StringDMA(*key, len, REDISMODULE_READ);
        if (*bytes == NULL) *len = 0;
    }
    return type == REDISMODULE_KEYTYPE_EMPTY || type == REDISMODULE_KEYTYPE_STRING;
}

/* RTM.WINDOW rate-column window
 * Each slot's packets in 10-second window `window`, from a group's rate column (the
 * (w1, p1, w2, p2) rows row_device writes): p1 where w1 is the window, else p2 where w2
 * is, else 0; one big-endian int64 per slot, as the other columns hold them (a partial row
 * at the end is left out; a missing column is an empty string). What a listing sorted by
 * rate ranks (storage/ranking.window_packets): 8 bytes a slot instead of the column's 32,
 * and, since a slot with packets in a window has a last_seen, no last_seen column read
 * beside it. Reads only. */
static int window_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3) return RM_WrongArity(ctx);
    long long window;
    if (RM_StringToLongLong(argv[2], &window) != REDISMODULE_OK)
        return RM_ReplyWithError(ctx, "ERR window must be an integer");
    RedisModuleKey *key;
    const unsigned char *rows;
    size_t len;
    if (!open_column(ctx, argv[1], &key, &rows, &len)) {
        RM_CloseKey(key);
        return RM_ReplyWithError(ctx, IX_WRONGTYPE);
    }
    size_t slots = len / 32;
    unsigned char *out = RM_Alloc(slots * 8 + 1);
    for (size_t i = 0; i < slots; i++) {
        const unsigned char *row = rows + 32 * i;
        long long packets = 0;
        if (get_i64(row) == window) {
            packets = get_i64(row + 8);
        } else if (get_i64(row + 16) == window) {
            packets = get_i64(row + 24);
        }
        put_i64(out + 8 * i, packets);
    }
    RM_ReplyWithStringBuffer(ctx, (const char *)out, slots * 8);
    RM_Free(out);
    RM_CloseKey(key);
    return REDISMODULE_OK;
}

/* RTM.LIVE column last-seen-column
 * Per slot of an index group: the column's figure (packets or bytes) where the slot holds
 * a device (its last_seen above 0), else -1; one big-endian int64 per slot of the last_seen
 * column (a column shorter than it reads as zeros past its end, as ranking.column does).
 * What a listing sorted by that figure ranks: 8 bytes a slot instead of the two columns'
 * 16. Reads only. */
static int live_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3) return RM_WrongArity(ctx);
    RedisModuleKey *figures_key, *seen_key;
    const unsigned char *figures, *seen;
    size_t have, slots;
    int ok = open_column(ctx, argv[1], &figures_key, &figures, &have);
    ok = open_column(ctx, argv[2], &seen_key, &seen, &slots) && ok;
    if (!ok) {
        RM_CloseKey(figures_key);
        RM_CloseKey(seen_key);
        return RM_ReplyWithError(ctx, IX_WRONGTYPE);
    }
    have /= 8, slots /= 8;
    unsigned char *out = RM_Alloc(slots * 8 + 1);
    for (size_t i = 0; i < slots; i++) {
        long long figure = -1;
        if (get_i64(seen + 8 * i) > 0) figure = i < have ? get_i64(figures + 8 * i) : 0;
        put_i64(out + 8 * i, figure);
    }
    RM_ReplyWithStringBuffer(ctx, (const char *)out, slots * 8);
    RM_Free(out);
    RM_CloseKey(figures_key);
    RM_CloseKey(seen_key);
    return REDISMODULE_OK;
}

static int merge_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    return merge_call(ctx, argv, argc, 0);
}

static int apply_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    return merge_call(ctx, argv, argc, 1);
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv, (void)argc;
    int (*getapi)(const char *, void *) = (int (*)(const char *, void *))((void **)ctx)[0];
#define LOOKUP(TYPE, NAME, ARGS)                                                  \
    if (getapi("RedisModule_" #NAME, (void *)&RM_##NAME) != REDISMODULE_OK ||     \
        RM_##NAME == NULL)                                                        \
        return REDISMODULE_ERR;
    API(LOOKUP)
#undef LOOKUP
    if (RM_IsModuleNameBusy("rtm")) return REDISMODULE_ERR;  /* (loaded twice) */
    /* 2: merges replicate as RTM.APPLY6 (1: as what they wrote) */
    RM_SetModuleAttribs(ctx, "rtm", 2, REDISMODULE_APIVER_1);
    if (RM_CreateCommand(ctx, "rtm.merge6", merge_command, "write deny-oom getkeys-api", 0, 0,
                         0) != REDISMODULE_OK ||
        RM_CreateCommand(ctx, "rtm.apply6", apply_command, "write deny-oom getkeys-api", 0, 0,
                         0) != REDISMODULE_OK ||
        RM_CreateCommand(ctx, "rtm.window", window_command, "readonly", 1, 1, 1) !=
            REDISMODULE_OK ||
        RM_CreateCommand(ctx, "rtm.live", live_command, "readonly", 1, 2, 1) != REDISMODULE_OK)
        return REDISMODULE_ERR;
    return REDISMODULE_OK;
}
