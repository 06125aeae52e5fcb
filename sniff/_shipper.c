/* sniff._shipper: the per-chunk copy a capture-mode relay ships, in C.
 *
 * Why C. With decode = "capture" the relay's only per-chunk work besides the
 * forward is appending a copy of the chunk, with a 21-byte header (timestamp,
 * connection id, direction, length: struct "<qqBI"), to the capture shipper's
 * buffer. As a Python closure that cost about 0.75 us per chunk in a loop and
 * about 1.5 us in the relay (pgbench: two chunks per transaction, on the
 * critical path of every round trip); this object does the same in one C call.
 * sniff.capture_proc.CaptureShipper.raw_shipper falls back to the Python
 * closure when this module is not built; tests check both write the same bytes.
 *
 * Contract with CaptureShipper (all on the event loop thread, GIL held, no Python
 * code runs between reading _buf and appending to it):
 *   owner._buf      bytearray the chunk is appended to (the shipper thread swaps it)
 *   owner.raw_in    int, bytes appended so far (only producers write it)
 *   owner.raw_out   int, bytes shipped so far (only the shipper thread writes it)
 *   owner.max_raw_bytes  the budget for raw_in - raw_out
 * Over budget, the chunk goes to `slow(data)` (the Python path, which records the
 * gap) and nothing more is shipped by this object, as ConnContext.ship does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define HDR 21

static PyObject *s_buf, *s_raw_in, *s_raw_out, *s_max;

typedef struct {
    PyObject_HEAD
    PyObject *owner;
    PyObject *slow;
    long long conn;
    int direction;
    int gap;
    vectorcallfunc vectorcall;
} Shipper;

static void put_le(char *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) {
        p[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

static int get_ll(PyObject *owner, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(owner, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* Append one record (the 21-byte header, the data, and with meta its 4-byte length and
 * bytes, direction bit 7 set) to owner._buf and count it in owner.raw_in. Returns 1 when
 * appended, 0 when over budget (nothing done), -1 on error. */
static int append_record(PyObject *owner, long long conn, int direction, const char *data,
                         Py_ssize_t n, const char *meta, Py_ssize_t mlen) {
    long long rec = HDR + (long long)n + (meta ? 4 + (long long)mlen : 0), in, out, max;
    if (get_ll(owner, s_raw_in, &in) < 0 || get_ll(owner, s_raw_out, &out) < 0 ||
        get_ll(owner, s_max, &max) < 0)
        return -1;
    if (in - out + rec > max || n > 0xffffffffLL) return 0;
    PyObject *buf = PyObject_GetAttr(owner, s_buf);
    if (buf == NULL) return -1;
    if (!PyByteArray_Check(buf)) {
        Py_DECREF(buf);
        PyErr_SetString(PyExc_TypeError, "owner._buf must be a bytearray");
        return -1;
    }
    Py_ssize_t old = PyByteArray_GET_SIZE(buf);
    if (PyByteArray_Resize(buf, old + (Py_ssize_t)rec) < 0) {
        Py_DECREF(buf);
        return -1;
    }
    char *p = PyByteArray_AS_STRING(buf) + old;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    put_le(p, (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec, 8);
    put_le(p + 8, (uint64_t)conn, 8);
    p[16] = (char)(direction | (meta ? 0x80 : 0));
    put_le(p + 17, (uint64_t)n, 4);
    memcpy(p + HDR, data, (size_t)n);
    if (meta) {
        put_le(p + HDR + n, (uint64_t)mlen, 4);
        memcpy(p + HDR + n + 4, meta, (size_t)mlen);
    }
    Py_DECREF(buf);
    PyObject *v = PyLong_FromLongLong(in + rec);
    if (v == NULL) return -1;
    int rc = PyObject_SetAttr(owner, s_raw_in, v);
    Py_DECREF(v);
    return rc < 0 ? -1 : 1;
}

static PyObject *ship(Shipper *self, PyObject *data) {
    if (self->gap) Py_RETURN_NONE;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    int rc = view.len ? append_record(self->owner, self->conn, self->direction, view.buf,
                                      view.len, NULL, 0)
                      : 1;
    PyBuffer_Release(&view);
    if (rc < 0) return NULL;
    if (rc == 0) {
        self->gap = 1;
        return PyObject_CallOneArg(self->slow, data);
    }
    Py_RETURN_NONE;
}

/* ---- tag_head: the HTTP injector's commonest case, in C ----------------------------------
 *
 * A keep-alive client's request head repeating the connection's previous plain head byte
 * for byte (proxies.http.injector.Http1Injector.feed_client) gets a new traceparent line
 * before its blank line; the copy is shipped with that line as its meta (a record whose
 * direction byte has bit 7 set, followed by the meta's 4-byte length and bytes). The ids
 * come from xoshiro256** seeded from the OS (getrandom); W3C asks for random, not secret,
 * ids, and Python's own getrandbits (the Python path) is no stronger. The lowest bit of
 * each id is set, as all-zero ids are invalid.
 */
#include <sys/random.h>

static uint64_t rng[4];

static inline uint64_t rotl(const uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_rand(void) {
    const uint64_t result = rotl(rng[1] * 5, 7) * 9;
    const uint64_t t = rng[1] << 17;
    rng[2] ^= rng[0];
    rng[3] ^= rng[1];
    rng[1] ^= rng[2];
    rng[0] ^= rng[3];
    rng[2] ^= t;
    rng[3] = rotl(rng[3], 45);
    return result;
}

static void hex64(char *p, uint64_t v) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--) {
        p[i] = digits[v & 0xf];
        v >>= 4;
    }
}

#define LINE_LEN 72 /* "traceparent: 00-" 16, 32 + "-" + 16 hex, "-01" 3, CRLF CRLF 4 */

static PyObject *Shipper_tag_head(Shipper *self, PyObject *data) {
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "tag_head takes bytes");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    const char *src = PyBytes_AS_STRING(data);
    if (self->gap || n < 4 || memcmp(src + n - 4, "\r\n\r\n", 4) != 0) Py_RETURN_NONE;
    Py_ssize_t outn = n - 2 + LINE_LEN;
    PyObject *res = PyBytes_FromStringAndSize(NULL, outn);
    if (res == NULL) return NULL;
    char *o = PyBytes_AS_STRING(res);
    memcpy(o, src, (size_t)(n - 2));
    char *line = o + n - 2;
    memcpy(line, "traceparent: 00-", 16);
    hex64(line + 16, next_rand());
    hex64(line + 32, next_rand() | 1);
    line[48] = '-';
    hex64(line + 49, next_rand() | 1);
    memcpy(line + 65, "-01\r\n\r\n", 7);
    int rc = append_record(self->owner, self->conn, self->direction, o, outn, line, LINE_LEN);
    if (rc <= 0) {
        Py_DECREF(res);
        if (rc < 0) return NULL;
        Py_RETURN_NONE; /* over budget: the Python path records the gap */
    }
    return res;
}

static PyMethodDef Shipper_methods[] = {
    {"tag_head", (PyCFunction)Shipper_tag_head, METH_O,
     "tag_head(head) -> head with a new traceparent line, shipped with the line as meta; "
     "None if it cannot (not a whole head, over budget: take the Python path)"},
    {NULL},
};

static PyObject *Shipper_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "Shipper takes exactly one argument (the chunk)");
        return NULL;
    }
    return ship((Shipper *)self, args[0]);
}

static PyObject *Shipper_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *owner, *slow;
    long long conn;
    int direction;
    static char *kw[] = {"owner", "conn", "direction", "slow", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OLiO", kw, &owner, &conn, &direction, &slow))
        return NULL;
    Shipper *self = (Shipper *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    Py_INCREF(owner);
    Py_INCREF(slow);
    self->owner = owner;
    self->slow = slow;
    self->conn = conn;
    self->direction = direction;
    self->gap = 0;
    self->vectorcall = Shipper_vectorcall;
    return (PyObject *)self;
}

static int Shipper_traverse(Shipper *self, visitproc visit, void *arg) {
    Py_VISIT(self->owner);
    Py_VISIT(self->slow);
    return 0;
}

static int Shipper_clear(Shipper *self) {
    Py_CLEAR(self->owner);
    Py_CLEAR(self->slow);
    return 0;
}

static void Shipper_dealloc(Shipper *self) {
    PyObject_GC_UnTrack(self);
    Shipper_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Shipper_get_gap(Shipper *self, void *closure) {
    return PyBool_FromLong(self->gap);
}

static PyGetSetDef Shipper_getset[] = {
    {"gap", (getter)Shipper_get_gap, NULL, "True once a chunk went over budget", NULL},
    {NULL},
};

static PyTypeObject ShipperType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sniff._shipper.Shipper",
    .tp_doc = "Shipper(owner, conn, direction, slow): call with a chunk to append its copy",
    .tp_basicsize = sizeof(Shipper),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = Shipper_new,
    .tp_dealloc = (destructor)Shipper_dealloc,
    .tp_traverse = (traverseproc)Shipper_traverse,
    .tp_clear = (inquiry)Shipper_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Shipper, vectorcall),
    .tp_getset = Shipper_getset,
    .tp_methods = Shipper_methods,
};


/* ---- Tee: the data_received of a relayed socket ----------------------------------------
 *
 * The base class of the relay's protocol objects (sniff.relay._Accept, _Side). Slow mode
 * (the default): data_received(data) calls self.slow(data), the connection's Python
 * from_client/from_server. Fast mode, set by the relay once a capture-mode handler only
 * ships a direction (its c2s/s2c is a Shipper and it neither rewrites nor stops
 * observing): data_received writes the chunk to the other side's transport, counts it and
 * appends its copy, all in this one C call, with no Python frame per chunk.
 */
typedef struct {
    PyObject_HEAD
    PyObject *slow;
    PyObject *write;   /* the other transport's bound write, in fast mode */
    PyObject *ship;    /* a Shipper, in fast mode */
    long long nbytes;  /* bytes forwarded in fast mode */
} Tee;

static PyTypeObject ShipperType;

static PyObject *Tee_data_received(Tee *self, PyObject *data) {
    if (self->write == NULL) {
        if (self->slow == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "Tee: no slow path set");
            return NULL;
        }
        return PyObject_CallOneArg(self->slow, data);
    }
    PyObject *r = PyObject_CallOneArg(self->write, data);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    Py_ssize_t n = PyObject_Length(data);
    if (n < 0) return NULL;
    self->nbytes += n;
    if (self->ship == NULL) Py_RETURN_NONE;  /* fast_off ran during the write */
    if (Py_TYPE(self->ship) == &ShipperType) return ship((Shipper *)self->ship, data);
    return PyObject_CallOneArg(self->ship, data);
}

static PyObject *Tee_set_fast(Tee *self, PyObject *args) {
    PyObject *write, *shipper;
    if (!PyArg_ParseTuple(args, "OO", &write, &shipper)) return NULL;
    Py_INCREF(write);
    Py_INCREF(shipper);
    Py_XSETREF(self->write, write);
    Py_XSETREF(self->ship, shipper);
    Py_RETURN_NONE;
}

static PyObject *Tee_fast_off(Tee *self, PyObject *unused) {
    Py_CLEAR(self->write);
    Py_CLEAR(self->ship);
    Py_RETURN_NONE;
}

static int Tee_traverse(Tee *self, visitproc visit, void *arg) {
    Py_VISIT(self->slow);
    Py_VISIT(self->write);
    Py_VISIT(self->ship);
    return 0;
}

static int Tee_clear(Tee *self) {
    Py_CLEAR(self->slow);
    Py_CLEAR(self->write);
    Py_CLEAR(self->ship);
    return 0;
}

/* Python subclasses (heap types) reach this through subtype_dealloc, which drops its
 * reference to the type itself after this returns. */
static void Tee_dealloc(Tee *self) {
    PyObject_GC_UnTrack(self);
    Tee_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Tee_get_slow(Tee *self, void *c) {
    return Py_NewRef(self->slow ? self->slow : Py_None);
}

static int Tee_set_slow(Tee *self, PyObject *v, void *c) {
    Py_XINCREF(v);
    Py_XSETREF(self->slow, v);
    return 0;
}

static PyObject *Tee_get_nbytes(Tee *self, void *c) { return PyLong_FromLongLong(self->nbytes); }

static PyObject *Tee_get_fast(Tee *self, void *c) { return PyBool_FromLong(self->write != NULL); }

static PyMethodDef Tee_methods[] = {
    {"data_received", (PyCFunction)Tee_data_received, METH_O, "asyncio.Protocol.data_received"},
    {"set_fast", (PyCFunction)Tee_set_fast, METH_VARARGS, "set_fast(write, shipper)"},
    {"fast_off", (PyCFunction)Tee_fast_off, METH_NOARGS, "back to slow mode"},
    {NULL},
};

static PyGetSetDef Tee_getset[] = {
    {"slow", (getter)Tee_get_slow, (setter)Tee_set_slow, "slow-mode callable(data)", NULL},
    {"nbytes", (getter)Tee_get_nbytes, NULL, "bytes forwarded in fast mode", NULL},
    {"fast", (getter)Tee_get_fast, NULL, "whether fast mode is on", NULL},
    {NULL},
};

static PyTypeObject TeeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sniff._shipper.Tee",
    .tp_doc = "Base of the relay's protocol objects: data_received in C",
    .tp_basicsize = sizeof(Tee),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Tee_dealloc,
    .tp_traverse = (traverseproc)Tee_traverse,
    .tp_clear = (inquiry)Tee_clear,
    .tp_methods = Tee_methods,
    .tp_getset = Tee_getset,
};


/* ---- lean_feed: the AMQP relay's framing loop (proxies.amqp.decoder._feed_lean), in C --------
 *
 * In capture mode the relay frames each AMQP stream only to find what it must act on:
 * on the client's side each Basic.Publish content header (tagged by the decoder's
 * _lean_tag), on the broker's each delivered content header that may be an RPC request
 * (_lean_request), and the three methods that change the framing (Tune-Ok, Channel.Open,
 * Channel.Close-Ok: _lean_method). Everything else (body frames, other methods,
 * heartbeats) only needs its length checked. The Python loop cost 20-30 us per chunk on
 * the RPC benchmark's cold path, where pika sends method, header and body as three
 * chunks; this one touches Python only for the three calls above. It keeps the Python
 * loop's state where the Python loop does (the stream's buf, body_left and offset; the
 * decoder's frames and heartbeats) plus, per channel, a publish or delivery awaiting its
 * header (dec._lean_flags) and a publish's routing key to the default exchange
 * (dec._lean_rk). Returns (out, error, error position): on a framing error, out is the
 * rest of the chunk as it came, and the caller calls _fail.
 */
#define BASIC_PUBLISH ((60u << 16) | 40u)
#define BASIC_DELIVER ((60u << 16) | 60u)
#define BASIC_GET_OK ((60u << 16) | 71u)
#define CONNECTION_TUNE_OK ((10u << 16) | 31u)
#define CHANNEL_OPEN ((20u << 16) | 10u)
#define CHANNEL_CLOSE_OK ((20u << 16) | 41u)
#define F_PUB 1
#define F_INC 2

static PyObject *s_st_buf, *s_body_left, *s_offset, *s_frames, *s_heartbeats, *s_c2s,
    *s_limit, *s_flags, *s_rk, *s_shared, *s_rpc, *s_lean_tag, *s_lean_request, *s_lean_method;

/* o.name(*Py_BuildValue(fmt, ...)) with an interned name: the callbacks run per content
 * header, so the name is not rebuilt from a C string each time. fmt builds a tuple. */
static PyObject *call_named(PyObject *o, PyObject *name, const char *fmt, ...) {
    va_list va;
    va_start(va, fmt);
    PyObject *args = Py_VaBuildValue(fmt, va);
    va_end(va);
    if (args == NULL) return NULL;
    PyObject *m = PyObject_GetAttr(o, name);
    PyObject *r = m ? PyObject_Call(m, args, NULL) : NULL;
    Py_XDECREF(m);
    Py_DECREF(args);
    return r;
}

static int add_ll(PyObject *o, PyObject *name, long long d) {
    if (d == 0) return 0;
    long long v;
    if (get_ll(o, name, &v) < 0) return -1;
    PyObject *x = PyLong_FromLongLong(v + d);
    if (x == NULL) return -1;
    int rc = PyObject_SetAttr(o, name, x);
    Py_DECREF(x);
    return rc;
}

static int set_ll(PyObject *o, PyObject *name, long long v) {
    PyObject *x = PyLong_FromLongLong(v);
    if (x == NULL) return -1;
    int rc = PyObject_SetAttr(o, name, x);
    Py_DECREF(x);
    return rc;
}

/* data[:upto] with the rewritten frames in parts (NULL: none) */
static PyObject *spliced(PyObject *data, PyObject *parts, Py_ssize_t last, Py_ssize_t upto) {
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (parts == NULL) {
        if (upto == n) return Py_NewRef(data);
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(data), upto);
    }
    PyObject *tail = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + last, upto - last);
    if (tail == NULL || PyList_Append(parts, tail) < 0) {
        Py_XDECREF(tail);
        return NULL;
    }
    Py_DECREF(tail);
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (empty == NULL) return NULL;
    PyObject *r = _PyBytes_Join(empty, parts);
    Py_DECREF(empty);
    return r;
}

static int flag_get(PyObject *flags, long ch) {
    PyObject *k = PyLong_FromLong(ch);
    if (k == NULL) return -1;
    PyObject *v = PyDict_GetItemWithError(flags, k);
    Py_DECREF(k);
    if (v == NULL) return PyErr_Occurred() ? -1 : 0;
    return (int)PyLong_AsLong(v);
}

static int flag_set(PyObject *flags, long ch, int f) {
    PyObject *k = PyLong_FromLong(ch);
    if (k == NULL) return -1;
    int rc;
    if (f) {
        PyObject *v = PyLong_FromLong(f);
        if (v == NULL) {
            Py_DECREF(k);
            return -1;
        }
        rc = PyDict_SetItem(flags, k, v);
        Py_DECREF(v);
    } else {
        rc = PyDict_DelItem(flags, k);
        if (rc < 0 && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            rc = 0;
        }
    }
    Py_DECREF(k);
    return rc;
}

static PyObject *lean_feed(PyObject *self, PyObject *args) {
    PyObject *dec, *st, *chunk;
    if (!PyArg_ParseTuple(args, "OOO!", &dec, &st, &PyBytes_Type, &chunk)) return NULL;
    PyObject *data = NULL, *parts = NULL, *flags = NULL, *rks = NULL, *err = NULL, *res = NULL;
    Py_ssize_t pos = 0, last = 0, n;
    long long frames = 0, heartbeats = 0, limit, body_left;
    int c2s;
    {
        PyObject *buf = PyObject_GetAttr(st, s_st_buf);
        if (buf == NULL) return NULL;
        if (!PyBytes_Check(buf)) {
            Py_DECREF(buf);
            PyErr_SetString(PyExc_TypeError, "stream buf must be bytes");
            return NULL;
        }
        if (PyBytes_GET_SIZE(buf)) {
            data = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(buf) + PyBytes_GET_SIZE(chunk));
            if (data == NULL) {
                Py_DECREF(buf);
                return NULL;
            }
            memcpy(PyBytes_AS_STRING(data), PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf));
            memcpy(PyBytes_AS_STRING(data) + PyBytes_GET_SIZE(buf), PyBytes_AS_STRING(chunk),
                   PyBytes_GET_SIZE(chunk));
            PyObject *e = PyBytes_FromStringAndSize(NULL, 0);
            int rc = e ? PyObject_SetAttr(st, s_st_buf, e) : -1;
            Py_XDECREF(e);
            if (rc < 0) {
                Py_DECREF(buf);
                goto fail;
            }
        } else {
            data = Py_NewRef(chunk);
        }
        Py_DECREF(buf);
    }
    n = PyBytes_GET_SIZE(data);
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    {
        PyObject *v = PyObject_GetAttr(st, s_c2s);
        if (v == NULL) goto fail;
        c2s = PyObject_IsTrue(v);
        Py_DECREF(v);
    }
    if (get_ll(st, s_body_left, &body_left) < 0) goto fail;
    if (body_left) {
        if (n < body_left) {
            if (set_ll(st, s_body_left, body_left - n) < 0 || add_ll(st, s_offset, n) < 0)
                goto fail;
            res = Py_BuildValue("(OOi)", data, Py_None, 0);
            goto done;
        }
        pos = (Py_ssize_t)body_left;
        if (set_ll(st, s_body_left, 0) < 0) goto fail;
        if (d[pos - 1] != 0xCE) {
            err = PyUnicode_FromString("body frame does not end with 0xCE");
            goto protoerr;
        }
    }
    if (get_ll(dec, s_limit, &limit) < 0) goto fail;
    flags = PyObject_GetAttr(dec, s_flags);
    rks = flags ? PyObject_GetAttr(dec, s_rk) : NULL;
    if (rks == NULL) goto fail;
    if (!PyDict_Check(flags) || !PyDict_Check(rks)) {
        PyErr_SetString(PyExc_TypeError, "_lean_flags and _lean_rk must be dicts");
        goto fail;
    }
    while (n - pos >= 7) {
        unsigned ftype = d[pos];
        long ch = (long)(d[pos + 1] << 8 | d[pos + 2]);
        unsigned long long size = (unsigned long long)d[pos + 3] << 24 | d[pos + 4] << 16 |
                                  d[pos + 5] << 8 | d[pos + 6];
        Py_ssize_t end = pos + 8 + (Py_ssize_t)size;
        if (ftype == 3) {
            if (end > n) {
                if (set_ll(st, s_body_left, end - n) < 0) goto fail;
                pos = n;
                break;
            }
            if (d[end - 1] != 0xCE) {
                err = PyUnicode_FromString("body frame does not end with 0xCE");
                goto protoerr;
            }
            pos = end;
            continue;
        }
        if (ftype == 1 || ftype == 2) {
            if ((long long)size > limit) {
                err = PyUnicode_FromFormat("frame of %llu bytes exceeds frame_max %lld", size, limit);
                goto protoerr;
            }
        } else if (ftype == 8) {
            if (size != 0 || ch != 0) {
                err = PyUnicode_FromFormat("heartbeat frame with size %llu on channel %ld", size, ch);
                goto protoerr;
            }
        } else {
            err = PyUnicode_FromFormat("unknown frame type %u", ftype);
            goto protoerr;
        }
        if (end > n) break;
        if (d[end - 1] != 0xCE) {
            err = PyUnicode_FromString("frame does not end with 0xCE");
            goto protoerr;
        }
        frames++;
        if (ftype == 1) {
            if (size < 4) {
                err = PyUnicode_FromString("method frame shorter than its class and method ids");
                goto protoerr;
            }
            unsigned idx = (unsigned)d[pos + 7] << 24 | d[pos + 8] << 16 | d[pos + 9] << 8 | d[pos + 10];
            if (!c2s) {
                if (idx == BASIC_DELIVER || idx == BASIC_GET_OK) {
                    int f = flag_get(flags, ch);
                    if (f < 0 || flag_set(flags, ch, f | F_INC) < 0) goto fail;
                }
            } else if (idx == BASIC_PUBLISH) {
                int f = flag_get(flags, ch);
                if (f < 0) goto fail;
                if (f & F_PUB) {
                    err = PyUnicode_FromFormat(
                        "Basic.Publish on channel %ld before the previous content ended", ch);
                    goto protoerr;
                }
                if (flag_set(flags, ch, f | F_PUB) < 0) goto fail;
                PyObject *key = PyLong_FromLong(ch);
                if (key == NULL) goto fail;
                int rpc = 0;
                if (size >= 7 && d[pos + 13] == 0) { /* the default exchange */
                    PyObject *sh = PyObject_GetAttr(dec, s_shared);
                    PyObject *m = sh ? PyObject_GetAttr(sh, s_rpc) : NULL;
                    Py_XDECREF(sh);
                    rpc = m ? PyObject_IsTrue(m) : -1;
                    Py_XDECREF(m);
                    if (rpc < 0) {
                        Py_DECREF(key);
                        goto fail;
                    }
                }
                int rc;
                if (rpc) {
                    Py_ssize_t start = pos + 15, stop = start + d[pos + 14];
                    PyObject *rk = PyUnicode_DecodeUTF8((const char *)d + start,
                                                        (stop <= n ? stop : n) - start, "replace");
                    rc = rk ? PyDict_SetItem(rks, key, rk) : -1;
                    Py_XDECREF(rk);
                } else {
                    rc = PyDict_DelItem(rks, key);
                    if (rc < 0 && PyErr_ExceptionMatches(PyExc_KeyError)) {
                        PyErr_Clear();
                        rc = 0;
                    }
                }
                Py_DECREF(key);
                if (rc < 0) goto fail;
            } else if (idx == CONNECTION_TUNE_OK || idx == CHANNEL_OPEN || idx == CHANNEL_CLOSE_OK) {
                PyObject *r = call_named(dec, s_lean_method, "(OlOnnk)", st, ch, data,
                                                  pos + 7, end - 1, (unsigned long)idx);
                if (r == NULL) goto cberr;
                limit = PyLong_AsLongLong(r);
                Py_DECREF(r);
                if (limit == -1 && PyErr_Occurred()) goto fail;
                if (idx == CHANNEL_CLOSE_OK && flag_set(flags, ch, 0) < 0) goto fail;
            }
        } else if (ftype == 2) {
            int f = flag_get(flags, ch);
            if (f < 0) goto fail;
            if (!c2s && (f & F_INC)) {
                if (flag_set(flags, ch, f & ~F_INC) < 0) goto fail;
                PyObject *r = call_named(dec, s_lean_request, "(Onn)", data, pos + 7, end - 1);
                if (r == NULL) goto cberr;
                Py_DECREF(r);
            } else if (c2s && (f & F_PUB)) {
                if (flag_set(flags, ch, f & ~F_PUB) < 0) goto fail;
                PyObject *key = PyLong_FromLong(ch);
                if (key == NULL) goto fail;
                PyObject *rk = PyDict_GetItemWithError(rks, key); /* borrowed */
                Py_DECREF(key);
                if (rk == NULL && PyErr_Occurred()) goto fail;
                PyObject *r = call_named(dec, s_lean_tag, "(OnnO)", data, pos + 7, end - 1,
                                                  rk ? rk : Py_None);
                if (r == NULL) goto cberr;
                if (r != Py_None) {
                    if (parts == NULL && (parts = PyList_New(0)) == NULL) {
                        Py_DECREF(r);
                        goto fail;
                    }
                    PyObject *before = PyBytes_FromStringAndSize((const char *)d + last, pos - last);
                    int rc = before ? PyList_Append(parts, before) : -1;
                    Py_XDECREF(before);
                    if (rc < 0 || PyList_Append(parts, r) < 0) {
                        Py_DECREF(r);
                        goto fail;
                    }
                    last = end;
                }
                Py_DECREF(r);
            }
        } else {
            heartbeats++;
        }
        pos = end;
    }
    if (add_ll(dec, s_frames, frames) < 0 || add_ll(dec, s_heartbeats, heartbeats) < 0) goto fail;
    if (pos < n) {
        PyObject *rest = PyBytes_FromStringAndSize((const char *)d + pos, n - pos);
        int rc = rest ? PyObject_SetAttr(st, s_st_buf, rest) : -1;
        Py_XDECREF(rest);
        if (rc < 0) goto fail;
    }
    if (add_ll(st, s_offset, pos) < 0) goto fail;
    {
        PyObject *out = spliced(data, parts, last, pos);
        if (out == NULL) goto fail;
        res = Py_BuildValue("(NOi)", out, Py_None, 0);
    }
    goto done;
cberr:
    /* an exception from a callback (a malformed header, say): a protocol error, as the
     * Python loop's except clause makes it */
    {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        err = ev ? PyObject_Str(ev) : PyUnicode_FromString("error");
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        if (err == NULL) goto fail;
    }
protoerr:
    if (err == NULL) goto fail;
    add_ll(dec, s_frames, frames);
    add_ll(dec, s_heartbeats, heartbeats);
    {
        PyObject *out = spliced(data, parts, last, n);
        if (out == NULL) goto fail;
        res = Py_BuildValue("(NNnO)", out, err, pos, data);
        err = NULL;
    }
    goto done;
fail:
    res = NULL;
done:
    Py_XDECREF(err);
    Py_XDECREF(parts);
    Py_XDECREF(flags);
    Py_XDECREF(rks);
    Py_XDECREF(data);
    return res;
}

static PyMethodDef module_methods[] = {
    {"lean_feed", lean_feed, METH_VARARGS,
     "lean_feed(decoder, stream, data) -> (out, None, 0) | (out, error, pos, data)"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sniff._shipper", "The per-chunk copy of capture-mode relays, in C.",
    -1, module_methods,
};

PyMODINIT_FUNC PyInit__shipper(void) {
    s_buf = PyUnicode_InternFromString("_buf");
    s_raw_in = PyUnicode_InternFromString("raw_in");
    s_raw_out = PyUnicode_InternFromString("raw_out");
    s_max = PyUnicode_InternFromString("max_raw_bytes");
    if (!s_buf || !s_raw_in || !s_raw_out || !s_max) return NULL;
    s_st_buf = PyUnicode_InternFromString("buf");
    s_body_left = PyUnicode_InternFromString("body_left");
    s_offset = PyUnicode_InternFromString("offset");
    s_frames = PyUnicode_InternFromString("frames");
    s_heartbeats = PyUnicode_InternFromString("heartbeats");
    s_c2s = PyUnicode_InternFromString("c2s");
    s_limit = PyUnicode_InternFromString("_frame_limit");
    s_flags = PyUnicode_InternFromString("_lean_flags");
    s_rk = PyUnicode_InternFromString("_lean_rk");
    s_shared = PyUnicode_InternFromString("_shared");
    s_rpc = PyUnicode_InternFromString("rpc");
    s_lean_tag = PyUnicode_InternFromString("_lean_tag");
    s_lean_request = PyUnicode_InternFromString("_lean_request");
    s_lean_method = PyUnicode_InternFromString("_lean_method");
    if (!s_st_buf || !s_body_left || !s_offset || !s_frames || !s_heartbeats || !s_c2s ||
        !s_limit || !s_flags || !s_rk || !s_shared || !s_rpc || !s_lean_tag ||
        !s_lean_request || !s_lean_method)
        return NULL;
    if (getrandom(rng, sizeof rng, 0) != (ssize_t)sizeof rng) {
        PyErr_SetString(PyExc_OSError, "getrandom failed");
        return NULL;
    }
    if (PyType_Ready(&ShipperType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&ShipperType);
    if (PyModule_AddObject(m, "Shipper", (PyObject *)&ShipperType) < 0) {
        Py_DECREF(&ShipperType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyType_Ready(&TeeType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&TeeType);
    if (PyModule_AddObject(m, "Tee", (PyObject *)&TeeType) < 0) {
        Py_DECREF(&TeeType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
