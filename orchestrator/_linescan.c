/* The metric recogniser of logparse.py, compiled: on each line an anchor hit, the
 * ``name=value`` pairs, the step and the epoch.
 *
 * Why C: once Hyperscan has found the lines (linefind.py), what a quiet log's read costs is the
 * Python work per line (a slice, three regex searches, a tuple per pair): ~6 us a line, 4x the
 * scan. This file does what the regexes _kv, _STEP, _TQDM and _EPOCH of logparse.py do, with
 * the same results (tests/test_logparse.py compares the two on generated lines), and records
 * the samples as LogParser._record does (the step and epoch carried, repeats dropped); the
 * parser uses its regexes where this module was not built (setup.py builds it as optional).
 *
 * Every read is bounded by the line's length; nothing is allocated but the result objects and,
 * on a line of more than 16 values, the list of their bounds.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE  /* memmem, strtod_l */
#include <Python.h>
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef __APPLE__
#include <xlocale.h>
#endif

typedef const unsigned char *bytes_t;

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static int is_blank(unsigned char c) { return c == ' ' || c == '\t'; }
static int is_quote(unsigned char c) { return c == '\'' || c == '"'; }

/* the lookbehind (?<![\w/.]) of a bytes pattern: \w is [A-Za-z0-9_] there */
static unsigned char wordish[256];

static void init_wordish(void)
{
    for (int c = 0; c < 256; c++)
        wordish[c] = is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '/' || c == '.';
}

static int starts_free(bytes_t p, Py_ssize_t at) { return at == 0 || !wordish[p[at - 1]]; }

static int has(bytes_t p, Py_ssize_t n, const char *lit)
{
    return memmem(p, (size_t)n, lit, strlen(lit)) != NULL;
}

static Py_ssize_t skip_digits(bytes_t p, Py_ssize_t n, Py_ssize_t q)
{
    while (q < n && is_digit(p[q]))
        q++;
    return q;
}

/* [eE][-+]?\d+ if whole, else nothing */
static Py_ssize_t exponent(bytes_t p, Py_ssize_t n, Py_ssize_t q)
{
    if (q < n && (p[q] == 'e' || p[q] == 'E')) {
        Py_ssize_t r = q + 1;
        if (r < n && (p[r] == '+' || p[r] == '-'))
            r++;
        if (r < n && is_digit(p[r]))
            return skip_digits(p, n, r);
    }
    return q;
}

static int at_lit(bytes_t p, Py_ssize_t n, Py_ssize_t q, const char *lit)
{
    size_t k = strlen(lit);
    return n - q >= (Py_ssize_t)k && memcmp(p + q, lit, k) == 0;
}

/* logparse._NUM at q: its end, or -1 */
static Py_ssize_t number(bytes_t p, Py_ssize_t n, Py_ssize_t q)
{
    if (q < n && (p[q] == '+' || p[q] == '-'))
        q++;
    if (q >= n)
        return -1;
    if (is_digit(p[q])) {
        q = skip_digits(p, n, q);
        if (q < n && p[q] == '.')
            q = skip_digits(p, n, q + 1);
        return exponent(p, n, q);
    }
    if (p[q] == '.' && q + 1 < n && is_digit(p[q + 1]))
        return exponent(p, n, skip_digits(p, n, q + 1));
    if (n - q >= 3 && (p[q] == 'N' || p[q] == 'n') && p[q + 1] == 'a' && (p[q + 2] == 'N' || p[q + 2] == 'n'))
        return q + 3;
    if (at_lit(p, n, q, "NAN") || at_lit(p, n, q, "INF"))
        return q + 3;
    if (n - q >= 3 && (p[q] == 'I' || p[q] == 'i') && p[q + 1] == 'n' && p[q + 2] == 'f')
        return at_lit(p, n, q + 3, "inity") ? q + 8 : q + 3;
    return -1;
}

static locale_t c_locale;  /* strtod's decimal point, whatever locale the program set */

/* float(raw) of a _NUM match, as logparse does: nan and inf by their letters; a decimal number
 * by strtod_l, which rounds correctly as Python's own parser does (C99 7.20.1.3 with IEEE 754,
 * glibc's is exact) but, unlike PyOS_string_to_double, does not switch the x87 precision on
 * each call (a fifth of this module's time); a long one by float() itself */
static PyObject *to_float(bytes_t s, Py_ssize_t len)
{
    bytes_t d = s + (len > 0 && (s[0] == '+' || s[0] == '-'));
    if (d < s + len && (*d == 'n' || *d == 'N'))
        return PyFloat_FromDouble(Py_NAN);
    if (d < s + len && (*d == 'i' || *d == 'I'))
        return PyFloat_FromDouble(s[0] == '-' ? -Py_HUGE_VAL : Py_HUGE_VAL);
    char buf[128];
    if (len < (Py_ssize_t)sizeof buf) {
        memcpy(buf, s, (size_t)len);
        buf[len] = 0;
        char *end;
        double v = strtod_l(buf, &end, c_locale);  /* overflow gives +-inf, as float() */
        if (end == buf + len)
            return PyFloat_FromDouble(v);
        return PyFloat_FromDouble(Py_NAN);
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)s, len);
    if (!raw)
        return NULL;
    PyObject *v = PyFloat_FromString(raw);
    Py_DECREF(raw);
    if (!v && PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        return PyFloat_FromDouble(Py_NAN);
    }
    return v;
}

/* logparse._int: None when it does not fit 64 bits, or has more digits than int() takes
 * (CPython's default limit, 4300) */
static PyObject *to_int(bytes_t s, Py_ssize_t len)
{
    if (len > 4300)
        Py_RETURN_NONE;
    while (len > 1 && *s == '0')
        s++, len--;
    if (len > 19)
        Py_RETURN_NONE;
    unsigned long long v = 0;
    for (Py_ssize_t i = 0; i < len; i++)
        v = v * 10 + (unsigned long long)(s[i] - '0');
    if (v > 9223372036854775807ULL)
        Py_RETURN_NONE;
    return PyLong_FromLongLong((long long)v);
}

/* ['"]?[ \t]*[=: ][ \t]*['"]? after a step or epoch word at q: where the value may start, or -1.
 * A space is a separator too, so "step  5" and "step \t5" match but "step\t5" does not. */
static Py_ssize_t separator(bytes_t p, Py_ssize_t n, Py_ssize_t q)
{
    if (q < n && is_quote(p[q]))
        q++;
    Py_ssize_t r = q;
    while (r < n && is_blank(p[r]))
        r++;
    if (r < n && (p[r] == '=' || p[r] == ':'))
        r++;
    else if (!memchr(p + q, ' ', (size_t)(r - q)))
        return -1;
    while (r < n && is_blank(p[r]))
        r++;
    if (r < n && is_quote(p[r]))
        r++;
    return r;
}

/* the first of ``words`` (in order at each position) at the leftmost position that a word not
 * the tail of a longer one starts and the separator and a digit follow: the digits' start */
static Py_ssize_t find_word_value(bytes_t p, Py_ssize_t n, const char *const *words)
{
    unsigned char first[256] = {0};
    for (const char *const *w = words; *w; w++)
        first[(unsigned char)(*w)[0]] = 1;
    for (Py_ssize_t at = 0; at < n; at++) {
        if (!(first[p[at]] & (at == 0 || !wordish[p[at - 1]])))
            continue;
        for (const char *const *w = words; *w; w++) {
            if (p[at] != (unsigned char)(*w)[0] || !at_lit(p, n, at, *w))
                continue;
            Py_ssize_t q = separator(p, n, at + (Py_ssize_t)strlen(*w));
            if (q >= 0 && q < n && is_digit(p[q]))
                return q;
        }
    }
    return -1;
}

static const char *const STEP_WORDS[] = {"global_step", "step", "Step", "iteration", "iter", NULL};
static const char *const EPOCH_WORDS[] = {"epoch", "Epoch", NULL};

/* _STEP, else _TQDM: sets *kind (0 none, 1 step, 2 step and total, 3 tqdm's step and total) */
static int find_step(bytes_t p, Py_ssize_t n, int poch, int *kind, PyObject **step, PyObject **total)
{
    *kind = 0;
    if (has(p, n, "tep")) {
        Py_ssize_t q = find_word_value(p, n, STEP_WORDS);
        if (q >= 0) {
            Py_ssize_t e = skip_digits(p, n, q);
            if (!(*step = to_int(p + q, e - q)))
                return -1;
            *kind = 1;
            if (e + 1 < n && p[e] == '/' && is_digit(p[e + 1])) {
                Py_ssize_t t = skip_digits(p, n, e + 1);
                if (!(*total = to_int(p + e + 1, t - e - 1)))
                    return -1;
                *kind = 2;
            }
            return 0;
        }
    }
    if (poch || !memchr(p, '/', (size_t)n))
        return 0;
    for (Py_ssize_t at = 0; at < n; at++) {  /* (?<![\w/.])(\d+)/(\d+) \[ */
        if (!is_digit(p[at]) || !starts_free(p, at))
            continue;
        Py_ssize_t a = skip_digits(p, n, at);
        if (!(a + 1 < n && p[a] == '/' && is_digit(p[a + 1])))
            continue;
        Py_ssize_t b = skip_digits(p, n, a + 1);
        if (b + 1 < n && p[b] == ' ' && p[b + 1] == '[') {
            if (!(*step = to_int(p + at, a - at)) || !(*total = to_int(p + a + 1, b - a - 1)))
                return -1;
            *kind = 3;
            return 0;
        }
    }
    return 0;
}

/* just after the last \r or \n in region[lo:b], else lo */
static Py_ssize_t line_start(bytes_t region, Py_ssize_t lo, Py_ssize_t b)
{
#ifdef __GLIBC__  /* memrchr: a SIMD search back, only as far as the line is long */
    const unsigned char *nl = memrchr(region + lo, '\n', (size_t)(b - lo));
    Py_ssize_t a = nl ? nl - region + 1 : lo;
    const unsigned char *cr = memrchr(region + a, '\r', (size_t)(b - a));
    return cr ? cr - region + 1 : a;
#else
    Py_ssize_t a = b;
    while (a > lo && region[a - 1] != '\n' && region[a - 1] != '\r')
        a--;
    return a;
#endif
}

typedef struct {
    Py_ssize_t count;
    bytes_t key[64];
    Py_ssize_t len[64];
    unsigned char first[256];
} Keys;

/* the kv pattern's tail after a name at q: ['"]?[ \t]*[=:][ \t]*['"]?(?:tensor\()?NUM; sets
 * the number's bounds, returns the match's end or -1 */
static Py_ssize_t key_value(bytes_t p, Py_ssize_t n, Py_ssize_t q, Py_ssize_t *vs, Py_ssize_t *ve)
{
    if (q < n && is_quote(p[q]))
        q++;
    while (q < n && is_blank(p[q]))
        q++;
    if (!(q < n && (p[q] == '=' || p[q] == ':')))
        return -1;
    q++;
    while (q < n && is_blank(p[q]))
        q++;
    if (q < n && is_quote(p[q]))
        q++;
    if (at_lit(p, n, q, "tensor("))
        q += 7;
    Py_ssize_t e = number(p, n, q);
    if (e < 0)
        return -1;
    *vs = q, *ve = e;
    return e;
}

typedef struct {
    Py_ssize_t key, start, end;  /* a name's index in keys, its value's bounds */
} Pair;

/* kv.findall(line) into *found (a stack array of *room, grown on the heap if need be):
 * how many, or -1 with an exception */
static Py_ssize_t key_values(bytes_t p, Py_ssize_t n, const Keys *keys, Pair **found, Py_ssize_t *room, Pair *stack)
{
    Py_ssize_t count = 0;
    for (Py_ssize_t at = 0; at < n;) {
        /* one well-predicted branch per byte: a name's first byte after a non-word byte is rare */
        if (keys->first[p[at]] & (at == 0 || !wordish[p[at - 1]])) {
            Py_ssize_t end = -1, vs = 0, ve = 0, k;
            for (k = 0; k < keys->count; k++) {  /* the first name, in order, whose tail matches too */
                if (keys->key[k][0] == p[at] && n - at >= keys->len[k] &&
                    memcmp(p + at, keys->key[k], (size_t)keys->len[k]) == 0 &&
                    (end = key_value(p, n, at + keys->len[k], &vs, &ve)) >= 0)
                    break;
            }
            if (end >= 0) {
                if (count == *room) {  /* (a hostile line: a megabyte of loss=1) */
                    Pair *more = PyMem_Malloc(2 * (size_t)*room * sizeof(Pair));
                    if (!more) {
                        PyErr_NoMemory();
                        return -1;
                    }
                    memcpy(more, *found, (size_t)count * sizeof(Pair));
                    if (*found != stack)
                        PyMem_Free(*found);
                    *found = more, *room *= 2;
                }
                (*found)[count++] = (Pair){k, vs, ve};
                at = end;
                continue;
            }
        }
        at++;
    }
    return count;
}

/* What the parser carries from line to line, and where samples go (logparse.LogParser._record) */
typedef struct {
    PyObject *step, *total, *epoch;  /* owned */
    PyObject *names, *last, *events;  /* borrowed: tuple of str, dict, list */
    PyTypeObject *sample;             /* logparse.MetricSample, a tuple subclass */
    Py_ssize_t base;
} Record;

/* one sample, unless it repeats the last of its metric: 0, or -1 with an exception */
static int record(Record *r, PyObject *name, PyObject *value, Py_ssize_t at)
{
    /* a NaN or infinity by its text, as str() writes it (logparse.ParserState.last) */
    PyObject *v = isfinite(PyFloat_AS_DOUBLE(value)) ? Py_NewRef(value) : PyObject_Str(value);
    PyObject *key = v ? PyTuple_Pack(3, r->step, r->epoch, v) : NULL;
    Py_XDECREF(v);
    if (!key)
        return -1;
    PyObject_GC_UnTrack(key);  /* ints, floats, None, str: never in a cycle, so never the collector's work */
    PyObject *old = PyDict_GetItemWithError(r->last, name);
    int same = old ? PyObject_RichCompareBool(old, key, Py_EQ) : (PyErr_Occurred() ? -1 : 0);
    if (same != 0 || PyDict_SetItem(r->last, name, key) < 0) {
        Py_DECREF(key);
        return same > 0 ? 0 : -1;
    }
    Py_DECREF(key);
    PyObject *offset = PyLong_FromSsize_t(r->base + at);
    PyObject *sample = offset ? r->sample->tp_alloc(r->sample, 5) : NULL;  /* as tuple.__new__(cls, items) */
    if (!sample) {
        Py_XDECREF(offset);
        return -1;
    }
    PyObject *items[5] = {name, value, r->step, r->epoch, offset};
    for (int i = 0; i < 4; i++)
        PyTuple_SET_ITEM(sample, i, Py_NewRef(items[i]));
    PyTuple_SET_ITEM(sample, 4, offset);
    PyObject_GC_UnTrack(sample);  /* (as the key: a chatty log's 10^5 samples a tick kept the collector busy) */
    int rc = PyList_Append(r->events, sample);
    Py_DECREF(sample);
    return rc;
}

/* the line region[a:b]: its samples recorded, the step and epoch carried; 0, or -1 */
static int line(bytes_t region, Py_ssize_t a, Py_ssize_t b, const Keys *keys, Record *r)
{
    bytes_t p = region + a;
    Py_ssize_t n = b - a, room = 16;
    Pair stack[16], *found = stack;
    Py_ssize_t count = key_values(p, n, keys, &found, &room, stack);
    int rc = -1;
    if (count <= 0) {
        rc = (int)count;
        goto out;
    }
    int kind, poch = has(p, n, "poch");
    PyObject *step = NULL, *total = NULL;
    if (find_step(p, n, poch, &kind, &step, &total) < 0) {
        Py_XDECREF(step);
        goto out;
    }
    if (kind)
        Py_XSETREF(r->step, step);  /* (steals the new value) */
    if (kind > 1)
        Py_XSETREF(r->total, total);
    if (poch) {
        Py_ssize_t q = find_word_value(p, n, EPOCH_WORDS);
        if (q >= 0) {
            Py_ssize_t e = skip_digits(p, n, q);
            if (e + 1 < n && p[e] == '.' && is_digit(p[e + 1]))
                e = skip_digits(p, n, e + 1);
            PyObject *epoch = to_float(p + q, e - q);
            if (!epoch)
                goto out;
            Py_XSETREF(r->epoch, epoch);
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = to_float(p + found[i].start, found[i].end - found[i].start);
        int bad = !value || record(r, PyTuple_GET_ITEM(r->names, found[i].key), value, a) < 0;
        Py_XDECREF(value);
        if (bad)
            goto out;
    }
    rc = 0;
out:
    if (found != stack)
        PyMem_Free(found);
    return rc;
}

PyDoc_STRVAR(scan_doc,
"scan(region, ends, i, done, keyed, keys, names, base, state, last, events, sample)\n"
"    -> (i, done, state)\n\n"
"Parse the lines ending at ends[i:], in order, up to the first end in ``keyed`` (a set; left to\n"
"the caller) or the list's end, as LogParser.recognise and LogParser._record do. A line runs\n"
"from just after the last \\r or \\n in region[done:end] (else from ``done``) to its end; an end\n"
"before ``done`` is skipped. ``keys``: the metric names and aliases as bytes, longest first\n"
"(the kv pattern's order), ``names[k]`` the metric ``keys[k]`` records; ``base``: the log\n"
"offset of region[0]; ``state``: (step, total, epoch) carried over; ``last``: the parser's\n"
"name -> (step, epoch, value) of the last sample, updated; samples are appended to ``events``\n"
"as ``sample`` (MetricSample) tuples. Returns the index of the first end not parsed, the new\n"
"``done`` and state. Raises ValueError for an end past the region or bad keys.");

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    PyObject *ends, *keyed, *keytuple, *state, *result = NULL;
    Py_ssize_t i, done;
    Record r = {0};
    if (!PyArg_ParseTuple(args, "y*O!nnOO!O!nO!O!O!O!", &buf, &PyList_Type, &ends, &i, &done, &keyed,
                          &PyTuple_Type, &keytuple, &PyTuple_Type, &r.names, &r.base, &PyTuple_Type, &state,
                          &PyDict_Type, &r.last, &PyList_Type, &r.events, &PyType_Type, &r.sample))
        return NULL;
    Keys keys;
    memset(&keys, 0, sizeof keys);
    keys.count = PyTuple_GET_SIZE(keytuple);
    if (keys.count > 64 || PyTuple_GET_SIZE(r.names) != keys.count || PyTuple_GET_SIZE(state) != 3 ||
        !PyType_IsSubtype(r.sample, &PyTuple_Type)) {
        PyErr_SetString(PyExc_ValueError, "at most 64 keys, a name for each, a state of 3, a tuple type");
        goto out;
    }
    for (Py_ssize_t k = 0; k < keys.count; k++) {
        PyObject *key = PyTuple_GET_ITEM(keytuple, k);
        if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) == 0) {
            PyErr_SetString(PyExc_ValueError, "keys must be non-empty bytes");
            goto out;
        }
        keys.key[k] = (bytes_t)PyBytes_AS_STRING(key);
        keys.len[k] = PyBytes_GET_SIZE(key);
        keys.first[keys.key[k][0]] = 1;
    }
    r.step = Py_NewRef(PyTuple_GET_ITEM(state, 0));
    r.total = Py_NewRef(PyTuple_GET_ITEM(state, 1));
    r.epoch = Py_NewRef(PyTuple_GET_ITEM(state, 2));
    bytes_t region = buf.buf;
    Py_ssize_t size = buf.len, count = PyList_GET_SIZE(ends);
    int check_keyed = PyObject_Length(keyed) > 0;
    if (check_keyed < 0)
        goto out;
    if (done < 0 || done > size || i < 0) {
        PyErr_SetString(PyExc_ValueError, "done or i out of range");
        goto out;
    }
    for (; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(ends, i);
        if (check_keyed) {
            int hit = PySet_Contains(keyed, item);
            if (hit < 0)
                goto out;
            if (hit)
                break;
        }
        Py_ssize_t b = PyLong_AsSsize_t(item);
        if (b == -1 && PyErr_Occurred())
            goto out;
        if (b > size) {
            PyErr_SetString(PyExc_ValueError, "a line end past the region");
            goto out;
        }
        if (b < done)
            continue;
        if (line(region, line_start(region, done, b), b, &keys, &r) < 0)
            goto out;
        done = b;
    }
    result = Py_BuildValue("(nn(OOO))", i, done, r.step, r.total, r.epoch);
out:
    Py_XDECREF(r.step);
    Py_XDECREF(r.total);
    Py_XDECREF(r.epoch);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_linescan", "logparse.py's metric recogniser, compiled (see _linescan.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__linescan(void)
{
    init_wordish();
    if (!c_locale && !(c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0)))
        return PyErr_NoMemory();
    return PyModule_Create(&module);
}
