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
    PyObject *dec;     /* lean mode (see tee_lean): the AMQP decoder */
    PyObject *err;     /* ... what handles an exception in it: err(exc, data, forwarded) */
    PyObject *st;      /* ... and its stream for this socket's bytes */
    int rewrite;       /* ... the client's side (tagged) or the broker's (scanned) */
    PyObject *inj;     /* head mode (see tee_head): the HTTP injector */
    PyObject *tagger;  /* ... its tag_head */
    long head_state;   /* ... the injector's state between requests (_HEAD) */
} Tee;

static PyTypeObject ShipperType;
static PyObject *tee_lean(Tee *self, PyObject *data);

static PyObject *tee_head(Tee *self, PyObject *data);

static PyObject *Tee_data_received(Tee *self, PyObject *data) {
    if (self->dec != NULL) return tee_lean(self, data);
    if (self->inj != NULL) return tee_head(self, data);
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

static PyObject *Tee_set_lean(Tee *self, PyObject *args) {
    PyObject *write, *shipper, *dec, *st, *err = Py_None;
    int rewrite;
    if (!PyArg_ParseTuple(args, "OO!OOp|O", &write, &ShipperType, &shipper, &dec, &st, &rewrite,
                          &err))
        return NULL;
    Py_XSETREF(self->err, err == Py_None ? NULL : Py_NewRef(err));
    Py_XSETREF(self->write, Py_NewRef(write));
    Py_XSETREF(self->ship, Py_NewRef(shipper));
    Py_XSETREF(self->dec, Py_NewRef(dec));
    Py_XSETREF(self->st, Py_NewRef(st));
    self->rewrite = rewrite;
    Py_RETURN_NONE;
}

/* set_head(write, injector, tagger, head_state): the HTTP head mode (see tee_head) */
static PyObject *Tee_set_head(Tee *self, PyObject *args) {
    PyObject *write, *inj, *tagger;
    long state;
    if (!PyArg_ParseTuple(args, "OOOl", &write, &inj, &tagger, &state)) return NULL;
    Py_XSETREF(self->write, Py_NewRef(write));
    Py_XSETREF(self->inj, Py_NewRef(inj));
    Py_XSETREF(self->tagger, Py_NewRef(tagger));
    self->head_state = state;
    Py_RETURN_NONE;
}

static PyObject *Tee_fast_off(Tee *self, PyObject *unused) {
    Py_CLEAR(self->inj);
    Py_CLEAR(self->tagger);
    Py_CLEAR(self->write);
    Py_CLEAR(self->ship);
    Py_CLEAR(self->dec);
    Py_CLEAR(self->st);
    Py_CLEAR(self->err);
    Py_RETURN_NONE;
}

static int Tee_traverse(Tee *self, visitproc visit, void *arg) {
    Py_VISIT(self->slow);
    Py_VISIT(self->write);
    Py_VISIT(self->ship);
    Py_VISIT(self->dec);
    Py_VISIT(self->st);
    Py_VISIT(self->err);
    Py_VISIT(self->inj);
    Py_VISIT(self->tagger);
    return 0;
}

static int Tee_clear(Tee *self) {
    Py_CLEAR(self->slow);
    Py_CLEAR(self->write);
    Py_CLEAR(self->ship);
    Py_CLEAR(self->dec);
    Py_CLEAR(self->st);
    Py_CLEAR(self->err);
    Py_CLEAR(self->inj);
    Py_CLEAR(self->tagger);
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

static PyObject *Tee_get_lean(Tee *self, void *c) { return PyBool_FromLong(self->dec != NULL); }

static PyObject *Tee_get_head(Tee *self, void *c) { return PyBool_FromLong(self->inj != NULL); }

/* ---- head mode: the HTTP request side's commonest chunk, in C ------------------------------
 *
 * On a keep-alive connection most client chunks are one request head, byte for byte the
 * previous plain head (proxies.http.injector.Http1Injector.feed_client's first case). In
 * slow mode that chunk took two Python frames (the relay's from_client, the injector's
 * feed_client) around the C tagger; at 64 wrk connections they were a tenth of the
 * relay's CPU. Head mode checks the same conditions on the injector (its state is the one
 * between requests, it holds nothing back, the chunk equals its last plain head), tags
 * with the same tagger (which ships the copy) and forwards; any other chunk, a tagger that
 * declines, or an error reading the injector takes the slow path, which then decides (and
 * handles an exception as a failing handler). */
static PyObject *s_state, *s_hold, *s_plain;

static PyObject *tee_head(Tee *self, PyObject *data) {
    PyObject *inj = Py_NewRef(self->inj), *tagger = Py_NewRef(self->tagger),
             *write = Py_NewRef(self->write), *res = NULL, *v;
    int ok = 0;
    if (PyBytes_Check(data) && (v = PyObject_GetAttr(inj, s_state)) != NULL) {
        long st = PyLong_Check(v) ? PyLong_AsLong(v) : -1;
        Py_DECREF(v);
        if (st == self->head_state && (v = PyObject_GetAttr(inj, s_hold)) != NULL) {
            int held = PyObject_IsTrue(v);
            Py_DECREF(v);
            if (held == 0 && (v = PyObject_GetAttr(inj, s_plain)) != NULL) {
                ok = PyBytes_Check(v) && PyBytes_GET_SIZE(v) == PyBytes_GET_SIZE(data) &&
                     memcmp(PyBytes_AS_STRING(v), PyBytes_AS_STRING(data),
                            (size_t)PyBytes_GET_SIZE(data)) == 0;
                Py_DECREF(v);
            }
        }
    }
    PyErr_Clear(); /* whatever went wrong reading the injector, the slow path meets it again */
    if (ok) {
        PyObject *tagged = PyObject_CallOneArg(tagger, data);
        if (tagged == NULL) {
            PyErr_Clear(); /* ... as it does an exception of the tagger's */
        } else if (tagged == Py_None || !PyBytes_Check(tagged)) {
            Py_DECREF(tagged);
        } else {
            self->nbytes += PyBytes_GET_SIZE(data);
            PyObject *r = PyObject_CallOneArg(write, tagged);
            Py_DECREF(tagged);
            Py_XDECREF(r);
            res = r ? Py_NewRef(Py_None) : NULL;
            goto done;
        }
    }
    if (self->slow == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Tee: no slow path set");
        goto done;
    }
    res = PyObject_CallOneArg(self->slow, data);
done:
    Py_DECREF(inj);
    Py_DECREF(tagger);
    Py_DECREF(write);
    return res;
}

static PyMethodDef Tee_methods[] = {
    {"data_received", (PyCFunction)Tee_data_received, METH_O, "asyncio.Protocol.data_received"},
    {"set_fast", (PyCFunction)Tee_set_fast, METH_VARARGS, "set_fast(write, shipper)"},
    {"set_lean", (PyCFunction)Tee_set_lean, METH_VARARGS,
     "set_lean(write, shipper, decoder, stream, rewrite, err=None): the AMQP lean mode"},
    {"set_head", (PyCFunction)Tee_set_head, METH_VARARGS,
     "set_head(write, injector, tagger, head_state): the HTTP head mode"},
    {"fast_off", (PyCFunction)Tee_fast_off, METH_NOARGS, "back to slow mode"},
    {NULL},
};

static PyGetSetDef Tee_getset[] = {
    {"slow", (getter)Tee_get_slow, (setter)Tee_set_slow, "slow-mode callable(data)", NULL},
    {"nbytes", (getter)Tee_get_nbytes, NULL, "bytes forwarded in fast mode", NULL},
    {"fast", (getter)Tee_get_fast, NULL, "whether fast mode (plain or lean) is on", NULL},
    {"lean", (getter)Tee_get_lean, NULL, "whether the AMQP lean mode is on", NULL},
    {"head", (getter)Tee_get_head, NULL, "whether the HTTP head mode is on", NULL},
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

/* ---- content headers in C: the lean loop's tag and RPC-request note ----------------------
 *
 * The relay's per-message Python work in capture mode was the two content-header callbacks:
 * _lean_tag (a publish gains a traceparent) and _lean_request (a delivered RPC request gets
 * the ids its reply will continue). On the RPC benchmark they were about a third of the
 * relay's own CPU. Here both run in C for the headers clients actually send: a Basic
 * header with one flag word, well formed, and either no traceparent or sniff's own (the
 * headers table's first entry, a canonical version-00 value). Anything else (another
 * class, continuation flags, a malformed header, an application's traceparent elsewhere in
 * the table, a frame that would outgrow frame_max) goes to the Python callbacks, untouched,
 * so errors and odd cases keep one implementation. The ids come from xoshiro256** (as
 * tag_head's) unless the decoder was given its own id functions (tests): then those are
 * called, in the Python callbacks' order, so the differential tests cover this code too.
 * The shared RPC map (an OrderedDict) is used from C as AmqpShared.take and .remember use
 * it (rpc_take, rpc_remember), with the decoder's clock.
 */
#define NO_C 1 /* for the Python path */

typedef struct {
    Py_ssize_t hs, he; /* the headers table [hs, he), length included; absent: hs == he, its place */
    int has_headers;
    Py_ssize_t corr, corr_n; /* correlation_id's bytes (corr < 0: absent) */
    Py_ssize_t rto, rto_n;   /* reply_to's bytes */
} chdr;

static const char NEEDLE[] = "\x0btraceparent"; /* 12 bytes: a table key's length and name */
#define NEEDLE_LEN 12
#define ENTRY_LEN 72 /* NEEDLE, 'S', 4-byte length, 55-byte version-00 value */

static inline uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Walk the Basic content-header payload d[start:end] as
 * proxies.amqp.rewrite.parse_content_header does; NO_C for anything it would not accept
 * or that is not class 60 with one flag word. */
static int parse_basic_header(const unsigned char *d, Py_ssize_t start, Py_ssize_t end, chdr *h) {
    if (end - start < 14 || (d[start] << 8 | d[start + 1]) != 60) return NO_C;
    unsigned flags = (unsigned)d[start + 12] << 8 | d[start + 13];
    if (flags & 3) return NO_C;
    Py_ssize_t pos = start + 14;
    h->has_headers = (flags >> 13) & 1;
    h->hs = h->he = -1;
    h->corr = h->rto = -1;
    h->corr_n = h->rto_n = 0;
    for (int bit = 15; bit >= 2; bit--) {
        if (!(flags & (1u << bit))) continue;
        if (!h->has_headers && h->hs < 0 && bit < 14) h->hs = pos; /* where headers would go */
        if (bit == 13) {
            if (end - pos < 4) return NO_C;
            uint32_t n = be32(d + pos);
            if ((Py_ssize_t)n > end - pos - 4) return NO_C;
            h->hs = pos;
            h->he = pos + 4 + (Py_ssize_t)n;
            pos = h->he;
        } else if (bit == 12 || bit == 11) { /* delivery_mode, priority */
            if (pos >= end) return NO_C;
            pos += 1;
        } else if (bit == 6) { /* timestamp */
            if (end - pos < 8) return NO_C;
            pos += 8;
        } else { /* short strings */
            if (pos >= end) return NO_C;
            Py_ssize_t n = d[pos];
            if (n > end - pos - 1) return NO_C;
            if (bit == 10) {
                h->corr = pos + 1;
                h->corr_n = n;
            } else if (bit == 9) {
                h->rto = pos + 1;
                h->rto_n = n;
            }
            pos += 1 + n;
        }
    }
    if (pos != end) return NO_C;
    if (h->hs < 0) h->hs = pos;
    if (!h->has_headers) h->he = h->hs;
    return 0;
}

static int lower_hex(const unsigned char *p, int n, int *nonzero) {
    for (int i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return 0;
        if (c != '0') *nonzero = 1;
    }
    return 1;
}

/* The traceparent needle found at `at` in the headers table: the value's start when it is
 * the table's first entry and a canonical, valid version-00 traceparent (what
 * rewrite.find_traceparent's first-key path and ids.parse_traceparent accept), else NULL. */
static const unsigned char *simple_traceparent(const unsigned char *d, const chdr *h,
                                               const unsigned char *at) {
    if (at != d + h->hs + 4 || d + h->he - at < 17 + 55 || at[12] != 'S' || be32(at + 13) != 55)
        return NULL;
    const unsigned char *v = at + 17;
    int tz = 0, sz = 0, fz = 0;
    if (v[0] != '0' || v[1] != '0' || v[2] != '-' || v[35] != '-' || v[52] != '-') return NULL;
    if (!lower_hex(v + 3, 32, &tz) || !lower_hex(v + 36, 16, &sz) || !lower_hex(v + 53, 2, &fz))
        return NULL;
    return (tz && sz) ? v : NULL;
}

static PyObject *s_frame_max, *s_c_ids, *s_span_id, *s_trace_id, *s_injected_now, *s_c_clock,
    *s_clock, *s_pop, *s_ttl_ns, *s_max_entries, *s_trim, *s_assigned_now;

/* The decoder's clock in ns: CLOCK_REALTIME when it is time.time_ns (dec._c_clock), else a
 * call to it, as the Python callbacks make. */
static int dec_now(PyObject *dec, long long *now) {
    PyObject *v = PyObject_GetAttr(dec, s_c_clock);
    if (v == NULL) return -1;
    int c = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (c < 0) return -1;
    if (c) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        *now = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        return 0;
    }
    PyObject *r = call_named(dec, s_clock, "()");
    if (r == NULL) return -1;
    *now = PyLong_AsLongLong(r);
    Py_DECREF(r);
    return (*now == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* AmqpShared.take(reply_to, corr, clock()) (proxies.amqp.decoder), on its OrderedDict from C:
 * (trace id, span id) or None, new references; NULL on error. */
static PyObject *rpc_take(PyObject *dec, PyObject *reply_to, PyObject *corr) {
    long long now, ttl;
    if (dec_now(dec, &now) < 0) return NULL;
    PyObject *res = NULL, *hit = NULL, *key = NULL, *rpc = NULL;
    PyObject *shared = PyObject_GetAttr(dec, s_shared);
    if (shared == NULL || (rpc = PyObject_GetAttr(shared, s_rpc)) == NULL) goto out;
    if ((key = PyTuple_Pack(2, reply_to, corr)) == NULL) goto out;
    hit = PyObject_CallMethodObjArgs(rpc, s_pop, key, Py_None, NULL);
    if (hit == NULL) goto out;
    if (hit == Py_None) {
        res = Py_NewRef(Py_None);
        goto out;
    }
    if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 3) {
        PyErr_SetString(PyExc_TypeError, "AmqpShared.rpc values must be (trace, span, ts)");
        goto out;
    }
    long long ts = PyLong_AsLongLong(PyTuple_GET_ITEM(hit, 2));
    if ((ts == -1 && PyErr_Occurred()) || get_ll(shared, s_ttl_ns, &ttl) < 0) goto out;
    res = now - ts > ttl ? Py_NewRef(Py_None)
                         : PyTuple_Pack(2, PyTuple_GET_ITEM(hit, 0), PyTuple_GET_ITEM(hit, 1));
out:
    Py_XDECREF(hit);
    Py_XDECREF(key);
    Py_XDECREF(rpc);
    Py_XDECREF(shared);
    return res;
}

/* AmqpShared.remember(...) then assigned_now.append((trace, span)), as _lean_remember. */
static int rpc_remember(PyObject *dec, PyObject *reply_to, PyObject *corr, PyObject *trace,
                        PyObject *span) {
    long long now, max;
    if (dec_now(dec, &now) < 0) return -1;
    int rc = -1;
    PyObject *rpc = NULL, *key = NULL, *val = NULL, *pair = NULL, *lst = NULL, *t = NULL;
    PyObject *shared = PyObject_GetAttr(dec, s_shared);
    if (shared == NULL || (rpc = PyObject_GetAttr(shared, s_rpc)) == NULL) goto out;
    if ((key = PyTuple_Pack(2, reply_to, corr)) == NULL) goto out;
    if ((t = PyLong_FromLongLong(now)) == NULL) goto out;
    if ((val = PyTuple_Pack(3, trace, span, t)) == NULL) goto out;
    if (PyObject_SetItem(rpc, key, val) < 0) goto out;
    Py_ssize_t n = PyObject_Size(rpc);
    if (n < 0 || get_ll(shared, s_max_entries, &max) < 0) goto out;
    if (n > max) { /* the oldest evicted and counted, in Python (rare) */
        PyObject *r = call_named(shared, s_trim, "()");
        if (r == NULL) goto out;
        Py_DECREF(r);
    }
    if ((pair = PyTuple_Pack(2, trace, span)) == NULL) goto out;
    if ((lst = PyObject_GetAttr(dec, s_assigned_now)) == NULL) goto out;
    if (!PyList_Check(lst)) {
        PyErr_SetString(PyExc_TypeError, "assigned_now must be a list");
        goto out;
    }
    rc = PyList_Append(lst, pair);
out:
    Py_XDECREF(t);
    Py_XDECREF(val);
    Py_XDECREF(key);
    Py_XDECREF(pair);
    Py_XDECREF(lst);
    Py_XDECREF(rpc);
    Py_XDECREF(shared);
    return rc;
}

/* a new id as a str: from xoshiro256**, or from the decoder's own id function */
static PyObject *draw_id(PyObject *dec, int c_ids, int trace) {
    if (c_ids) {
        char buf[32];
        if (trace) {
            hex64(buf, next_rand());
            hex64(buf + 16, next_rand() | 1);
            return PyUnicode_FromStringAndSize(buf, 32);
        }
        hex64(buf, next_rand() | 1);
        return PyUnicode_FromStringAndSize(buf, 16);
    }
    return call_named(dec, trace ? s_trace_id : s_span_id, "()");
}

static const char *id_chars(PyObject *id, Py_ssize_t want) {
    Py_ssize_t n;
    const char *s = PyUnicode_Check(id) ? PyUnicode_AsUTF8AndSize(id, &n) : NULL;
    if (s == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "ids must be str");
        return NULL;
    }
    if (n != want) {
        PyErr_Format(PyExc_ValueError, "an id of %zd characters, expected %zd", n, want);
        return NULL;
    }
    return s;
}

static int use_c_ids(PyObject *dec) {
    PyObject *v = PyObject_GetAttr(dec, s_c_ids);
    if (v == NULL) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* The content-header frame around payload d[start:end] with a traceparent entry
 * appended to its headers table (created when absent), as rewrite.inject_traceparent. */
static PyObject *tagged_frame(const unsigned char *d, Py_ssize_t start, Py_ssize_t end,
                              const chdr *h, const char *trace, const char *span) {
    Py_ssize_t plen = end - start + ENTRY_LEN + (h->has_headers ? 0 : 4);
    PyObject *r = PyBytes_FromStringAndSize(NULL, 7 + plen + 1);
    if (r == NULL) return NULL;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(r), *q = o + 7;
    o[0] = 2;
    o[1] = d[start - 6];
    o[2] = d[start - 5];
    put_be32(o + 3, (uint32_t)plen);
    if (h->has_headers) {
        memcpy(q, d + start, (size_t)(h->hs - start));
        q += h->hs - start;
        put_be32(q, be32(d + h->hs) + ENTRY_LEN);
        q += 4;
        memcpy(q, d + h->hs + 4, (size_t)(h->he - h->hs - 4));
        q += h->he - h->hs - 4;
    } else {
        memcpy(q, d + start, 12);
        q[12] = d[start + 12] | 0x20; /* the headers flag, bit 13 */
        q[13] = d[start + 13];
        q += 14;
        memcpy(q, d + start + 14, (size_t)(h->hs - start - 14));
        q += h->hs - start - 14;
        put_be32(q, ENTRY_LEN);
        q += 4;
    }
    memcpy(q, NEEDLE, NEEDLE_LEN);
    q[NEEDLE_LEN] = 'S';
    put_be32(q + NEEDLE_LEN + 1, 55);
    q += NEEDLE_LEN + 5;
    memcpy(q, "00-", 3);
    memcpy(q + 3, trace, 32);
    q[35] = '-';
    memcpy(q + 36, span, 16);
    memcpy(q + 52, "-01", 3);
    q += 55;
    memcpy(q, d + h->he, (size_t)(end - h->he));
    q += end - h->he;
    *q = 0xCE;
    return r;
}

/* decoder._lean_tag in C: the new frame, Py_None (forward unchanged: never returned
 * here, the Python path decides those), or NULL with an exception; *py = 1 (NULL, no
 * exception, nothing done): call _lean_tag instead. */
static PyObject *c_tag(PyObject *dec, const unsigned char *d, Py_ssize_t start, Py_ssize_t end,
                       PyObject *rk, int *py) {
    chdr h;
    *py = 0;
    if (parse_basic_header(d, start, end, &h) ||
        (h.has_headers && memmem(d + h.hs, (size_t)(h.he - h.hs), NEEDLE, NEEDLE_LEN))) {
        *py = 1; /* an odd header, or one with a traceparent: the Python path decides */
        return NULL;
    }
    long long frame_max;
    if (get_ll(dec, s_frame_max, &frame_max) < 0) return NULL;
    if (frame_max && 7 + (end - start) + ENTRY_LEN + (h.has_headers ? 0 : 4) + 1 > frame_max) {
        *py = 1;
        return NULL;
    }
    int c_ids = use_c_ids(dec);
    if (c_ids < 0) return NULL;
    PyObject *span = NULL, *trace = NULL, *request = NULL, *item = NULL, *res = NULL;
    span = draw_id(dec, c_ids, 0);
    if (span == NULL) goto out;
    if (rk != Py_None && (d[start + 12] & 4) && h.corr_n > 0) { /* an RPC reply? */
        PyObject *corr = PyUnicode_DecodeUTF8((const char *)d + h.corr, h.corr_n, "replace");
        if (corr == NULL) goto out;
        request = rpc_take(dec, rk, corr);
        Py_DECREF(corr);
        if (request == NULL) goto out;
        if (request == Py_None) {
            Py_CLEAR(request);
        } else if (!PyTuple_Check(request) || PyTuple_GET_SIZE(request) != 2) {
            PyErr_SetString(PyExc_TypeError, "the RPC map must give (trace id, span id)");
            goto out;
        }
    }
    if (request == NULL) {
        item = Py_NewRef(span);
        trace = draw_id(dec, c_ids, 1);
    } else {
        item = PyTuple_Pack(2, span, PyTuple_GET_ITEM(request, 1));
        trace = Py_NewRef(PyTuple_GET_ITEM(request, 0));
    }
    if (item == NULL || trace == NULL) goto out;
    {
        PyObject *now = PyObject_GetAttr(dec, s_injected_now);
        int rc = now == NULL ? -1 : PyList_Check(now) ? PyList_Append(now, item) : -2;
        Py_XDECREF(now);
        if (rc == -2) PyErr_SetString(PyExc_TypeError, "injected_now must be a list");
        if (rc < 0) goto out;
    }
    const char *t = id_chars(trace, 32), *s = t ? id_chars(span, 16) : NULL;
    if (s != NULL) res = tagged_frame(d, start, end, &h, t, s);
out:
    Py_XDECREF(span);
    Py_XDECREF(trace);
    Py_XDECREF(request);
    Py_XDECREF(item);
    return res;
}

/* decoder._lean_request in C, for a header whose flags ask for a reply (reply_to and
 * correlation_id): 0 done, -1 error, NO_C: call _lean_request instead (nothing done). */
static int c_request(PyObject *dec, const unsigned char *d, Py_ssize_t start, Py_ssize_t end) {
    chdr h;
    if (parse_basic_header(d, start, end, &h)) return NO_C;
    if (h.rto < 0 || h.corr < 0 || h.rto_n == 0 || h.corr_n == 0) return 0;
    const unsigned char *tp = NULL;
    if (h.has_headers) {
        const unsigned char *at = memmem(d + h.hs, (size_t)(h.he - h.hs), NEEDLE, NEEDLE_LEN);
        if (at != NULL && (tp = simple_traceparent(d, &h, at)) == NULL) return NO_C;
    }
    int c_ids = use_c_ids(dec);
    if (c_ids < 0) return -1;
    PyObject *trace = tp ? PyUnicode_FromStringAndSize((const char *)tp + 3, 32)
                         : draw_id(dec, c_ids, 1);
    PyObject *span = trace ? draw_id(dec, c_ids, 0) : NULL;
    PyObject *rto = span ? PyUnicode_DecodeUTF8((const char *)d + h.rto, h.rto_n, "replace") : NULL;
    PyObject *corr = rto ? PyUnicode_DecodeUTF8((const char *)d + h.corr, h.corr_n, "replace") : NULL;
    int rc = corr ? rpc_remember(dec, rto, corr, trace, span) : -1;
    Py_XDECREF(trace);
    Py_XDECREF(span);
    Py_XDECREF(rto);
    Py_XDECREF(corr);
    return rc < 0 ? -1 : 0;
}

static PyObject *lean_core(PyObject *dec, PyObject *st, PyObject *chunk) {
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
        unsigned long long size = be32(d + pos + 3);
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
                /* only a header whose flags ask for a reply matters (a short one: Python
                 * reports it) */
                int rc = size < 13 ? NO_C : (d[pos + 19] & 6) != 6 ? 0 : c_request(dec, d, pos + 7, end - 1);
                if (rc < 0) goto cberr;
                if (rc == NO_C) {
                    PyObject *r = call_named(dec, s_lean_request, "(Onn)", data, pos + 7, end - 1);
                    if (r == NULL) goto cberr;
                    Py_DECREF(r);
                }
            } else if (c2s && (f & F_PUB)) {
                if (flag_set(flags, ch, f & ~F_PUB) < 0) goto fail;
                PyObject *key = PyLong_FromLong(ch);
                if (key == NULL) goto fail;
                PyObject *rk = PyDict_GetItemWithError(rks, key);
                Py_DECREF(key);
                if (rk == NULL && PyErr_Occurred()) goto fail;
                rk = Py_NewRef(rk ? rk : Py_None); /* held: the callbacks run Python code */
                int py;
                PyObject *r = c_tag(dec, d, pos + 7, end - 1, rk, &py);
                if (r == NULL && py)
                    r = call_named(dec, s_lean_tag, "(OnnO)", data, pos + 7, end - 1, rk);
                Py_DECREF(rk);
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


/* ---- the AMQP lean mode of a Tee ----------------------------------------------------------
 *
 * Capture mode with injection (proxies.amqp.handler.AmqpCaptureHandler): the client's
 * bytes go through the lean loop (tagged, a partial frame held back), the broker's are
 * forwarded then scanned for RPC requests, and each side ships its copy with the ids the
 * loop chose as meta. In slow mode that was six Python frames per chunk (the relay's
 * from_client/from_server, the handler, the decoder's feed and take, the ship); on the
 * RPC benchmark's cold path they cost about as much as the forwarding itself. Lean mode
 * does all of it in this one call, and falls back to the slow path (the Python handler)
 * for a chunk that arrives before the client's protocol header is complete, and for
 * good once the decoder has switched to passthrough. A framing error goes to the
 * decoder's _fail as in Python. Meta is bytes here: ids joined by ';', a pair as
 * "a:b" (proxies.amqp.handler.amqp_meta reads it).
 */
static PyObject *s_passthrough, *s_started, *s_fail;

/* the decoder's id list `name` as meta bytes, emptied; NULL without an error: empty */
static PyObject *take_meta(PyObject *dec, PyObject *name) {
    PyObject *lst = PyObject_GetAttr(dec, name);
    if (lst == NULL) return NULL;
    if (!PyList_Check(lst)) {
        Py_DECREF(lst);
        PyErr_SetString(PyExc_TypeError, "the decoder's id lists must be lists");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(lst), total = 0;
    if (n == 0) {
        Py_DECREF(lst);
        return NULL;
    }
    PyObject *res = NULL;
    for (int pass = 0; pass < 2; pass++) {
        char *o = pass ? PyBytes_AS_STRING(res) : NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *it = PyList_GET_ITEM(lst, i);
            PyObject *parts[2] = {it, NULL};
            int k = 1;
            if (PyTuple_Check(it) && PyTuple_GET_SIZE(it) == 2) {
                parts[0] = PyTuple_GET_ITEM(it, 0);
                parts[1] = PyTuple_GET_ITEM(it, 1);
                k = 2;
            }
            for (int j = 0; j < k; j++) {
                Py_ssize_t m;
                const char *c = PyUnicode_Check(parts[j]) ? PyUnicode_AsUTF8AndSize(parts[j], &m)
                                                          : NULL;
                if (c == NULL) {
                    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "ids must be str");
                    Py_XDECREF(res);
                    Py_DECREF(lst);
                    return NULL;
                }
                if (pass) {
                    if (j) *o++ = ':';
                    else if (i) *o++ = ';';
                    memcpy(o, c, (size_t)m);
                    o += m;
                } else {
                    total += m + (j || i ? 1 : 0);
                }
            }
        }
        if (!pass && (res = PyBytes_FromStringAndSize(NULL, total)) == NULL) {
            Py_DECREF(lst);
            return NULL;
        }
    }
    int rc = PyList_SetSlice(lst, 0, n, NULL);
    Py_DECREF(lst);
    if (rc < 0) {
        Py_DECREF(res);
        return NULL;
    }
    return res;
}

/* ship(sh, data) with meta: the copy and the ids travel as one record */
static int ship_meta(Shipper *sh, PyObject *data, PyObject *meta) {
    if (sh->gap || PyBytes_GET_SIZE(data) == 0) return 0;
    if (meta == NULL) {
        PyObject *r = ship(sh, data);
        Py_XDECREF(r);
        return r ? 0 : -1;
    }
    int rc = append_record(sh->owner, sh->conn, sh->direction, PyBytes_AS_STRING(data),
                           PyBytes_GET_SIZE(data), PyBytes_AS_STRING(meta), PyBytes_GET_SIZE(meta));
    if (rc < 0) return -1;
    if (rc == 0) { /* over budget: the Python path records the gap */
        sh->gap = 1;
        PyObject *r = PyObject_CallOneArg(sh->slow, data);
        Py_XDECREF(r);
        return r ? 0 : -1;
    }
    return 0;
}

static int attr_true(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

static PyObject *tee_lean(Tee *self, PyObject *data) {
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "lean mode takes bytes");
        return NULL;
    }
    if (self->write == NULL || self->ship == NULL || self->st == NULL) { /* not set whole */
        Py_XDECREF(Tee_fast_off(self, NULL));
        if (self->slow == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "Tee: no slow path set");
            return NULL;
        }
        return PyObject_CallOneArg(self->slow, data);
    }
    /* held for the call: a write may close the connection, whose cleanup clears these */
    PyObject *dec = Py_NewRef(self->dec), *st = Py_NewRef(self->st),
             *write = Py_NewRef(self->write), *sh = Py_NewRef(self->ship),
             *err = Py_XNewRef(self->err);
    PyObject *r = NULL, *res = NULL, *meta = NULL, *x;
    int rewrite = self->rewrite, lean = 0, forwarded = 0;
    int pt = attr_true(dec, s_passthrough), started = pt ? 0 : attr_true(st, s_started);
    if (pt < 0 || started < 0) goto done;
    if (pt || !started) { /* the slow path: for this chunk, or for good */
        if (pt) Py_XDECREF(Tee_fast_off(self, NULL));
        res = self->slow ? PyObject_CallOneArg(self->slow, data) : NULL;
        if (res == NULL && !PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "Tee: no slow path set");
        goto done;
    }
    lean = 1;
    self->nbytes += PyBytes_GET_SIZE(data);
    if (!rewrite) { /* the broker's bytes: forwarded first, as they came */
        if ((x = PyObject_CallOneArg(write, data)) == NULL) goto done;
        Py_DECREF(x);
        forwarded = 1;
    }
    if ((r = lean_core(dec, st, data)) == NULL) goto done;
    if (PyTuple_GET_ITEM(r, 1) != Py_None) { /* a framing error: passthrough from here */
        x = call_named(dec, s_fail, "(OOOO)", st, PyTuple_GET_ITEM(r, 3), PyTuple_GET_ITEM(r, 2),
                       PyTuple_GET_ITEM(r, 1));
        if (x == NULL) goto done;
        Py_DECREF(x);
    }
    PyObject *out = rewrite ? PyTuple_GET_ITEM(r, 0) : data;
    if (rewrite && PyBytes_GET_SIZE(out)) {
        if ((x = PyObject_CallOneArg(write, out)) == NULL) goto done;
        Py_DECREF(x);
    }
    forwarded = 1;
    meta = take_meta(dec, rewrite ? s_injected_now : s_assigned_now);
    if (meta == NULL && PyErr_Occurred()) goto done;
    if (ship_meta((Shipper *)sh, out, meta) < 0) goto done;
    res = Py_NewRef(Py_None);
done:
    /* An exception in lean mode (not bad input, which is a protocol error above, but a bug
     * or a failed allocation) is the connection's, not the event loop's: leave lean mode and
     * let err handle it as the relay handles a failing handler in slow mode. */
    if (res == NULL && lean && err != NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        if (tb != NULL && ev != NULL) PyException_SetTraceback(ev, tb);
        Py_XDECREF(Tee_fast_off(self, NULL));
        res = PyObject_CallFunction(err, "OOO", ev ? ev : Py_None, data,
                                    forwarded ? Py_True : Py_False);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
    }
    Py_XDECREF(err);
    Py_XDECREF(r);
    Py_XDECREF(meta);
    Py_DECREF(dec);
    Py_DECREF(st);
    Py_DECREF(write);
    Py_DECREF(sh);
    return res;
}

static PyObject *lean_feed(PyObject *self, PyObject *args) {
    PyObject *dec, *st, *chunk;
    if (!PyArg_ParseTuple(args, "OOO!", &dec, &st, &PyBytes_Type, &chunk)) return NULL;
    return lean_core(dec, st, chunk);
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
    s_frame_max = PyUnicode_InternFromString("frame_max");
    s_c_ids = PyUnicode_InternFromString("_c_ids");
    s_span_id = PyUnicode_InternFromString("_span_id");
    s_trace_id = PyUnicode_InternFromString("_trace_id");
    s_injected_now = PyUnicode_InternFromString("injected_now");
    s_c_clock = PyUnicode_InternFromString("_c_clock");
    s_clock = PyUnicode_InternFromString("_clock");
    s_pop = PyUnicode_InternFromString("pop");
    s_ttl_ns = PyUnicode_InternFromString("ttl_ns");
    s_max_entries = PyUnicode_InternFromString("max_entries");
    s_trim = PyUnicode_InternFromString("_trim");
    s_state = PyUnicode_InternFromString("state");
    s_hold = PyUnicode_InternFromString("hold");
    s_plain = PyUnicode_InternFromString("plain");
    s_passthrough = PyUnicode_InternFromString("passthrough");
    s_started = PyUnicode_InternFromString("started");
    s_fail = PyUnicode_InternFromString("_fail");
    s_assigned_now = PyUnicode_InternFromString("assigned_now");
    if (!s_passthrough || !s_started || !s_fail || !s_assigned_now) return NULL;
    if (!s_frame_max || !s_c_ids || !s_span_id || !s_trace_id || !s_injected_now ||
        !s_c_clock || !s_clock || !s_pop || !s_ttl_ns || !s_max_entries || !s_trim)
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
