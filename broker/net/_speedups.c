/* The end-of-iteration flush in C: one send(2) per connection, with none of the interpreter's
 * work in between (broker/net/connection.py `flush_all` is the Python twin and the reference).
 *
 * Why it exists: a message's last subscriber waits for the whole walk over its subscribers
 * (W3 in docs/benchmarks.md). In Python each step of that walk cost ~0.5 us on top of the
 * kernel's send (attribute loads, the socket method call, its argument parsing and GIL release);
 * here it is a few pointer loads.
 *
 * House rules: this code handles the steady state only, and hands every other case back to
 * Python untouched: a connection that is not exactly of the bound class, not OPEN with the plain
 * READING mask, with a paced replay or a backlog stamp, or whose `out` holds anything but bytes
 * (a memoryview tail) or more parts than one sendmsg takes. It never raises for a connection's
 * fault: a failed send is reported back, and Python closes that one connection. It holds the GIL
 * throughout (each send is non-blocking and short; releasing it per send costs more than it
 * could give). Slots are read at the offsets their member descriptors give, resolved once by
 * `bind` for the exact class, which is why only that class is accepted. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "../_slots.h"

#include <errno.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/uio.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

static PyTypeObject *conn_type; /* the bound class (a strong reference) */
static Py_ssize_t off_out, off_queued, off_since, off_backlog, off_mask, off_state, off_fd;
static long reading_mask, open_state;

PyDoc_STRVAR(bind_doc,
"bind(cls, reading, open)\n\n"
"Resolve the slots `flush` reads on instances of exactly `cls`; `reading` is the epoll mask\n"
"and `open` the state of a connection in the steady state.");

static PyObject *
bind_conn(PyObject *self, PyObject *args)
{
    PyObject *cls;
    long reading, open;
    if (!PyArg_ParseTuple(args, "O!ll:bind", &PyType_Type, &cls, &reading, &open))
        return NULL;
    Py_ssize_t out, queued, since, backlog, mask, state, fd; /* all, or a failed bind keeps none */
    if (slot_offset(cls, "out", &out) || slot_offset(cls, "queued", &queued) ||
        slot_offset(cls, "since", &since) || slot_offset(cls, "backlog", &backlog) ||
        slot_offset(cls, "mask", &mask) || slot_offset(cls, "state", &state) ||
        slot_offset(cls, "fd", &fd))
        return NULL;
    off_out = out;
    off_queued = queued;
    off_since = since;
    off_backlog = backlog;
    off_mask = mask;
    off_state = state;
    off_fd = fd;
    Py_INCREF(cls);
    Py_XSETREF(conn_type, (PyTypeObject *)cls);
    reading_mask = reading;
    open_state = open;
    Py_RETURN_NONE;
}

/* An int slot equal to `want` (a missing or non-int slot never is). */
static int
slot_is(PyObject *conn, Py_ssize_t off, long want)
{
    PyObject *v = SLOT(conn, off);
    if (v == NULL || !PyLong_CheckExact(v))
        return 0;
    int overflow;
    return PyLong_AsLongAndOverflow(v, &overflow) == want && !overflow;
}

/* The steady state `flush` may handle: the exact class, OPEN and READING, no paced replay, no
 * backlog stamp (`since` is 0.0 whenever the buffer was emptied: session.py). */
static int
steady(PyObject *conn)
{
    if (Py_TYPE(conn) != conn_type)
        return 0;
    if (!slot_is(conn, off_mask, reading_mask) || !slot_is(conn, off_state, open_state))
        return 0;
    if (SLOT(conn, off_backlog) != Py_None)
        return 0;
    PyObject *since = SLOT(conn, off_since);
    return since != NULL && PyFloat_CheckExact(since) && PyFloat_AS_DOUBLE(since) == 0.0;
}

/* Append (conn, sent) to `rest`; sent is None for "not handled here". */
static int
hand_back(PyObject *rest, PyObject *conn, PyObject *sent)
{
    if (sent == NULL)
        return -1;
    PyObject *pair = PyTuple_Pack(2, conn, sent);
    Py_DECREF(sent);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(rest, pair);
    Py_DECREF(pair);
    return rc;
}

PyDoc_STRVAR(flush_doc,
"flush(sessions) -> (sends, bytes_sent, rest)\n\n"
"Write each steady-state connection's `out` with one send and empty it. `rest` lists\n"
"(connection, sent) for the others: sent None = not handled here (flush it in Python),\n"
"-1 = its send failed (close it), n >= 0 = only n bytes of `out` went (keep the tail).");

static PyObject *
flush_conns(PyObject *self, PyObject *sessions)
{
    if (conn_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "flush before bind");
        return NULL;
    }
    if (!PyList_Check(sessions)) {
        PyErr_SetString(PyExc_TypeError, "sessions must be a list");
        return NULL;
    }
    PyObject *rest = PyList_New(0);
    if (rest == NULL)
        return NULL;
    struct iovec iov[IOV_MAX];
    Py_ssize_t sends = 0, bytes_sent = 0;
    /* The list's size is read at each step, and no borrowed reference is kept across a call
     * that may run Python code (an allocation in hand_back may run the garbage collector). */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sessions); i++) {
        PyObject *conn = PyList_GET_ITEM(sessions, i);
        PyObject *out = steady(conn) ? SLOT(conn, off_out) : NULL;
        if (out == NULL || !PyList_CheckExact(out) || PyList_GET_SIZE(out) > IOV_MAX) {
            Py_INCREF(Py_None);
            if (hand_back(rest, conn, Py_None) < 0)
                goto error;
            continue;
        }
        Py_ssize_t parts = PyList_GET_SIZE(out);
        if (parts == 0)
            continue;
        Py_ssize_t total = 0;
        int plain = 1;
        for (Py_ssize_t k = 0; k < parts; k++) {
            PyObject *part = PyList_GET_ITEM(out, k);
            if (!PyBytes_CheckExact(part)) {
                plain = 0; /* a memoryview tail: Python joins it */
                break;
            }
            iov[k].iov_base = PyBytes_AS_STRING(part);
            iov[k].iov_len = (size_t)PyBytes_GET_SIZE(part);
            total += PyBytes_GET_SIZE(part);
        }
        int fd_overflow;
        PyObject *fd_obj = SLOT(conn, off_fd);
        long fd = (fd_obj != NULL && PyLong_CheckExact(fd_obj))
                      ? PyLong_AsLongAndOverflow(fd_obj, &fd_overflow)
                      : -1;
        if (!plain || fd < 0 || fd > INT_MAX) {
            Py_INCREF(Py_None);
            if (hand_back(rest, conn, Py_None) < 0)
                goto error;
            continue;
        }
        ssize_t sent;
        do {
            if (parts == 1) {
                sent = send((int)fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
            } else {
                struct msghdr msg = {0};
                msg.msg_iov = iov;
                msg.msg_iovlen = (size_t)parts;
                sent = sendmsg((int)fd, &msg, MSG_NOSIGNAL);
            }
        } while (sent < 0 && errno == EINTR);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                if (hand_back(rest, conn, PyLong_FromLong(-1)) < 0)
                    goto error;
                continue;
            }
            sent = 0;
        }
        sends++;
        bytes_sent += sent;
        if (sent == total) {
            if (PyList_SetSlice(out, 0, parts, NULL) < 0)
                goto error;
            PyObject *zero = PyLong_FromLong(0);
            if (zero == NULL)
                goto error;
            Py_XSETREF(SLOT(conn, off_queued), zero);
        } else if (hand_back(rest, conn, PyLong_FromSsize_t(sent)) < 0) {
            goto error;
        }
    }
    return Py_BuildValue("(nnN)", sends, bytes_sent, rest);
error:
    Py_DECREF(rest);
    return NULL;
}

PyDoc_STRVAR(write_through_doc,
"write_through(subs, frame) -> (sends, bytes_sent, skipped, partial)\n\n"
"Send `frame` now to each connection of the tuple `subs` that is in the steady state with an\n"
"empty buffer. `skipped` (None or a list) holds, in order, those it did not write (any other\n"
"state, a buffer already queued, a failed send): they take the ordinary path. `partial` (None\n"
"or a list) holds (connection, n) for those that took only n bytes of the frame.");

static PyObject *
write_through(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyTuple_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "write_through(tuple, bytes)");
        return NULL;
    }
    if (conn_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "write_through before bind");
        return NULL;
    }
    PyObject *subs = args[0], *frame = args[1];
    const char *data = PyBytes_AS_STRING(frame);
    size_t size = (size_t)PyBytes_GET_SIZE(frame);
    PyObject *skipped = NULL, *partial = NULL;
    Py_ssize_t sends = 0, bytes_sent = 0;
    /* `conn` is borrowed from the tuple, which holds it; nothing here runs Python code except
     * the allocations of the two lists and their pairs, after which no slot is reused. */
    Py_ssize_t n = PyTuple_GET_SIZE(subs);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *conn = PyTuple_GET_ITEM(subs, i);
        long fd = -1;
        /* Each send is microseconds long: time enough to bring the next sessions' slots into
         * the cache, which the kernel's sends evict (W3 in docs/benchmarks.md). Two ahead, the
         * slots; one ahead, its fd object (its slot's line came in one step ago). */
        if (i + 2 < n) {
            char *ahead = (char *)PyTuple_GET_ITEM(subs, i + 2);
            __builtin_prefetch(ahead);
            __builtin_prefetch(ahead + off_mask);
            __builtin_prefetch(ahead + off_state);
            __builtin_prefetch(ahead + off_queued);
            __builtin_prefetch(ahead + off_fd);
            __builtin_prefetch(ahead + off_since);
            __builtin_prefetch(ahead + off_backlog);
        }
        if (i + 1 < n) {
            PyObject *next = PyTuple_GET_ITEM(subs, i + 1);
            if (Py_TYPE(next) == conn_type)
                __builtin_prefetch(SLOT(next, off_fd));
        }
        /* An empty buffer: `queued` (the bytes `out` holds, session.py) is 0. */
        if (steady(conn) && slot_is(conn, off_queued, 0)) {
            int overflow;
            PyObject *fd_obj = SLOT(conn, off_fd);
            if (fd_obj != NULL && PyLong_CheckExact(fd_obj)) {
                fd = PyLong_AsLongAndOverflow(fd_obj, &overflow);
                if (overflow || fd > INT_MAX)
                    fd = -1;
            }
        }
        ssize_t sent = -1;
        if (fd >= 0) {
            do {
                sent = send((int)fd, data, size, MSG_NOSIGNAL);
            } while (sent < 0 && errno == EINTR);
            if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                sent = 0;
        }
        if (sent < 0) { /* not ours, or a failed send: the flush meets the error and closes it */
            if (skipped == NULL && (skipped = PyList_New(0)) == NULL)
                goto error;
            if (PyList_Append(skipped, conn) < 0)
                goto error;
            continue;
        }
        sends++;
        bytes_sent += sent;
        if ((size_t)sent != size) {
            if (partial == NULL && (partial = PyList_New(0)) == NULL)
                goto error;
            if (hand_back(partial, conn, PyLong_FromSsize_t(sent)) < 0)
                goto error;
        }
    }
    return Py_BuildValue("(nnNN)", sends, bytes_sent, skipped ? skipped : Py_NewRef(Py_None),
                         partial ? partial : Py_NewRef(Py_None));
error:
    Py_XDECREF(skipped);
    Py_XDECREF(partial);
    return NULL;
}

static PyMethodDef methods[] = {
    {"bind", bind_conn, METH_VARARGS, bind_doc},
    {"flush", flush_conns, METH_O, flush_doc},
    {"write_through", (PyCFunction)(void (*)(void))write_through, METH_FASTCALL, write_through_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "broker.net._speedups",
    "The end-of-iteration flush in C (see the comment at the top of _speedups.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
