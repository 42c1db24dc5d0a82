/* The metric recogniser of logparse.py, compiled: on each line an anchor hit, the
 * ``name=value`` pairs, the step and the epoch.
 *
 * Why C: once Hyperscan has found the lines (linefind.py), what a quiet log's read costs is the
 * Python work per line (a slice, three regex searches, a tuple per pair): ~6 us a line, 4x the
 * scan. This file does what the regexes _kv, _STEP, _TQDM and _EPOCH of logparse.py do, with
 * the same results (tests/test_logparse.py compares the two on generated lines); the parser
 * keeps the state (carried step and epoch, repeated samples) in Python, and uses its regexes
 * where this module was not built (setup.py builds it as optional).
 *
 * Every read is bounded by the line's length; nothing is allocated but the result objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef const unsigned char *bytes_t;

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static int is_blank(unsigned char c) { return c == ' ' || c == '\t'; }
static int is_quote(unsigned char c) { return c == '\'' || c == '"'; }

/* the lookbehind (?<![\w/.]) of a bytes pattern: \w is [A-Za-z0-9_] there */
static int is_wordish(unsigned char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '/' || c == '.';
}

static int starts_free(bytes_t p, Py_ssize_t at) { return at == 0 || !is_wordish(p[at - 1]); }

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

/* float(raw), as logparse does: nan where Python's float() refuses it (never for _NUM's forms) */
static PyObject *to_float(bytes_t s, Py_ssize_t len)
{
    char buf[128];
    if (len < (Py_ssize_t)sizeof buf) {
        memcpy(buf, s, (size_t)len);
        buf[len] = 0;
        char *end;
        double v = PyOS_string_to_double(buf, &end, NULL);  /* overflow gives +-inf, as float() */
        if (!(v == -1.0 && PyErr_Occurred()) && end == buf + len)
            return PyFloat_FromDouble(v);
        PyErr_Clear();
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
    for (Py_ssize_t at = 0; at < n; at++) {
        if (!starts_free(p, at))
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
static int find_step(bytes_t p, Py_ssize_t n, int *kind, PyObject **step, PyObject **total)
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
    if (!memchr(p, '/', (size_t)n) || has(p, n, "poch"))
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

/* kv.findall(line): [(key index, value)] as a tuple of pairs, or NULL with an exception */
static PyObject *key_values(bytes_t p, Py_ssize_t n, const Keys *keys)
{
    PyObject *pairs = NULL;
    for (Py_ssize_t at = 0; at < n;) {
        if (keys->first[p[at]] && starts_free(p, at)) {
            Py_ssize_t end = -1, vs = 0, ve = 0, k;
            for (k = 0; k < keys->count; k++) {  /* the first name, in order, whose tail matches too */
                if (n - at >= keys->len[k] && memcmp(p + at, keys->key[k], (size_t)keys->len[k]) == 0 &&
                    (end = key_value(p, n, at + keys->len[k], &vs, &ve)) >= 0)
                    break;
            }
            if (end >= 0) {
                PyObject *v = to_float(p + vs, ve - vs);
                PyObject *pair = v ? Py_BuildValue("(nN)", k, v) : NULL;
                if (!pair || (!pairs && !(pairs = PyList_New(0))) || PyList_Append(pairs, pair) < 0) {
                    Py_XDECREF(pair);
                    Py_XDECREF(pairs);
                    return NULL;
                }
                Py_DECREF(pair);
                at = end;
                continue;
            }
        }
        at++;
    }
    if (!pairs)
        return PyTuple_New(0);
    PyObject *t = PyList_AsTuple(pairs);
    Py_DECREF(pairs);
    return t;
}

/* (line start, kind, step, total, epoch, pairs) for a line with pairs, Py_None without, NULL on error */
static PyObject *recognise(bytes_t region, Py_ssize_t a, Py_ssize_t b, const Keys *keys)
{
    bytes_t p = region + a;
    Py_ssize_t n = b - a;
    PyObject *pairs = key_values(p, n, keys);
    if (!pairs)
        return NULL;
    if (PyTuple_GET_SIZE(pairs) == 0) {
        Py_DECREF(pairs);
        Py_RETURN_NONE;
    }
    int kind;
    PyObject *step = NULL, *total = NULL, *epoch = NULL;
    if (find_step(p, n, &kind, &step, &total) < 0)
        goto fail;
    if (has(p, n, "poch")) {
        Py_ssize_t q = find_word_value(p, n, EPOCH_WORDS);
        if (q >= 0) {
            Py_ssize_t e = skip_digits(p, n, q);
            if (e + 1 < n && p[e] == '.' && is_digit(p[e + 1]))
                e = skip_digits(p, n, e + 1);
            if (!(epoch = to_float(p + q, e - q)))
                goto fail;
        }
    }
    PyObject *line = Py_BuildValue("(niOOON)", a, kind, step ? step : Py_None, total ? total : Py_None,
                                   epoch ? epoch : Py_None, pairs);
    Py_XDECREF(step);
    Py_XDECREF(total);
    Py_XDECREF(epoch);
    return line;
fail:
    Py_XDECREF(step);
    Py_XDECREF(total);
    Py_DECREF(pairs);
    return NULL;
}

PyDoc_STRVAR(scan_doc,
"scan(region, ends, i, done, keyed, keys) -> (i, done, lines)\n\n"
"Recognise the lines ending at ends[i:], in order, up to the first end in ``keyed`` (a set;\n"
"left to the caller) or the list's end. A line runs from just after the last \\r or \\n in\n"
"region[done:end] (else from ``done``) to its end; an end before ``done`` is skipped.\n"
"``keys``: the metric names and aliases as bytes, longest first (the kv pattern's order).\n"
"Returns the index of the first end not done, the new ``done``, and a list of\n"
"(line start, kind, step, total, epoch, ((key index, value), ...)) for each line with a value:\n"
"kind 0 leaves step and total as they were, 1 sets the step, 2 and 3 (tqdm) both; epoch is a\n"
"float or None (unchanged). Raises ValueError for an end outside the region or bad keys.");

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    PyObject *ends, *keyed, *keytuple;
    Py_ssize_t i, done;
    if (!PyArg_ParseTuple(args, "y*O!nnOO!", &buf, &PyList_Type, &ends, &i, &done, &keyed, &PyTuple_Type, &keytuple))
        return NULL;
    PyObject *lines = NULL, *result = NULL;
    Keys keys;
    memset(&keys, 0, sizeof keys);
    keys.count = PyTuple_GET_SIZE(keytuple);
    if (keys.count > 64) {
        PyErr_SetString(PyExc_ValueError, "at most 64 metric names and aliases");
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
    bytes_t region = buf.buf;
    Py_ssize_t size = buf.len, count = PyList_GET_SIZE(ends);
    int check_keyed = PyObject_Length(keyed) > 0;
    if (check_keyed < 0 || !(lines = PyList_New(0)))
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
        Py_ssize_t a = b;
        while (a > done && region[a - 1] != '\n' && region[a - 1] != '\r')
            a--;
        PyObject *line = recognise(region, a, b, &keys);
        if (!line)
            goto out;
        if (line != Py_None && PyList_Append(lines, line) < 0) {
            Py_DECREF(line);
            goto out;
        }
        Py_DECREF(line);
        done = b;
    }
    result = Py_BuildValue("(nnO)", i, done, lines);
out:
    Py_XDECREF(lines);
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

PyMODINIT_FUNC PyInit__linescan(void) { return PyModule_Create(&module); }
