/* Fan-out's hot loop in C: one append of the shared frame per subscriber
 * (broker/pubsub/router.py `Router._fan_out_py` is the Python twin and the reference).
 *
 * Why it exists: with 1,000 subscribers on a topic the loop ran ~0.4 us of interpreter time per
 * subscriber before the first byte was written (W3 in docs/benchmarks.md); here it is two list
 * appends and an int per subscriber.
 *
 * House rules: sans-IO like the router. Only the common case is handled: a session whose buffer
 * is at most half the high-water mark. A session over half the mark (the router decides between
 * "urgent" and the overflow policy) is handed back untouched, in order, for the Python twin to
 * handle, so the policy code exists once; anything that is not a plain session (another type, a
 * list subclass as `out`, an odd `queued`) is handed back with every session after it. The slots are read at the offsets their member
 * descriptors give, resolved once by `bind` on the session class; they hold for every subclass,
 * since CPython lays a subclass's slots out after its base's. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "../_slots.h"

static PyTypeObject *session_type; /* the bound class (a strong reference) */
static Py_ssize_t off_out, off_queued;

PyDoc_STRVAR(bind_doc,
"bind(cls)\n\n"
"Resolve the slots `fan_out` uses (`out`, `queued`) on the session class `cls`.");

static PyObject *
bind_session(PyObject *self, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "bind() takes a class");
        return NULL;
    }
    Py_ssize_t out, queued; /* all resolved before any is kept: a failed bind changes nothing */
    if (slot_offset(cls, "out", &out) || slot_offset(cls, "queued", &queued))
        return NULL;
    off_out = out;
    off_queued = queued;
    Py_INCREF(cls);
    Py_XSETREF(session_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(fan_out_doc,
"fan_out(subs, frame, dirty, half) -> rest\n\n"
"Append `frame` to the `out` of each session of the tuple `subs` whose `queued` is at most\n"
"`half`, add its size to `queued`, and append to the list `dirty` each whose buffer was\n"
"empty. Returns None, or the list of the sessions it left untouched (in order).");

static PyObject *
fan_out(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_Check(args[0]) || !PyBytes_Check(args[1]) ||
        !PyList_Check(args[2]) || !PyLong_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "fan_out(tuple, bytes, list, int)");
        return NULL;
    }
    if (session_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "fan_out before bind");
        return NULL;
    }
    PyObject *subs = args[0], *frame = args[1], *dirty = args[2];
    Py_ssize_t half = PyLong_AsSsize_t(args[3]);
    if (half == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(frame);
    PyObject *rest = NULL;
    /* `session` is borrowed from the tuple, which holds it; `out` is read again for each
     * session (allocating `rest` may run the garbage collector). */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(subs); i++) {
        PyObject *session = PyTuple_GET_ITEM(subs, i);
        Py_ssize_t queued = -1;
        PyObject *out = NULL;
        if (PyObject_TypeCheck(session, session_type)) {
            PyObject *q = SLOT(session, off_queued);
            out = SLOT(session, off_out);
            if (q != NULL && PyLong_CheckExact(q))
                queued = PyLong_AsSsize_t(q);
            if (queued == -1)
                PyErr_Clear(); /* too large for Py_ssize_t: the Python twin's business */
        }
        if (queued < 0 || out == NULL || !PyList_CheckExact(out)) {
            /* Not a session this code knows: it and every later one go to Python, so `dirty`
             * gets the sessions in the order the Python twin would give. */
            PyObject *tail = PyTuple_GetSlice(subs, i, PyTuple_GET_SIZE(subs));
            if (tail == NULL)
                goto error;
            if (rest == NULL) {
                rest = PySequence_List(tail);
                Py_DECREF(tail);
                return rest;
            }
            int rc = PyList_SetSlice(rest, PyList_GET_SIZE(rest), PyList_GET_SIZE(rest), tail);
            Py_DECREF(tail);
            if (rc < 0)
                goto error;
            return rest;
        }
        if (queued > half) { /* urgent or over the mark: the router's policy, in Python */
            if (rest == NULL && (rest = PyList_New(0)) == NULL)
                return NULL;
            if (PyList_Append(rest, session) < 0)
                goto error;
            continue;
        }
        if (queued == 0 && PyList_Append(dirty, session) < 0)
            goto error;
        if (PyList_Append(out, frame) < 0)
            goto error;
        PyObject *now = PyLong_FromSsize_t(queued + size);
        if (now == NULL)
            goto error;
        Py_XSETREF(SLOT(session, off_queued), now);
    }
    if (rest == NULL)
        Py_RETURN_NONE;
    return rest;
error:
    Py_XDECREF(rest);
    return NULL;
}

static PyMethodDef methods[] = {
    {"bind", bind_session, METH_O, bind_doc},
    {"fan_out", (PyCFunction)(void (*)(void))fan_out, METH_FASTCALL, fan_out_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "broker.pubsub._speedups",
    "Fan-out's hot loop in C (see the comment at the top of _speedups.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
