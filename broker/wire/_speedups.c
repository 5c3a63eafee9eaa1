/* The common case of client frames in C: final, masked, unfragmented text or binary frames with
 * a 7- or 16-bit length, unmasked and decoded straight out of the receive buffer
 * (broker/wire/inbound.py `parse` is the Python twin and the reference).
 *
 * Why it exists: many clients publishing to many topics (W4 in docs/benchmarks.md) is a frame
 * per publish; in Python the header checks, the unmasking through a big integer and the decode
 * cost ~0.8 us per frame.
 *
 * House rules: sans-IO. `frames` takes complete common-case frames from `pos` on and stops, at
 * that frame's start, at the first one that is anything else: incomplete, another opcode,
 * reserved bits, unmasked, a 64-bit or non-minimal length, over the limit, text that is not
 * UTF-8. The Python twin then parses that frame, so every violation, its close code and its
 * reason exist once, in Python. It never raises for the peer's bytes. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define STACK_TEXT 4096 /* text payloads up to this size are unmasked on the stack */

/* dst[i] = src[i] ^ key[i % 4], eight bytes at a time. */
static void
unmask(char *dst, const unsigned char *src, Py_ssize_t n, const unsigned char *key)
{
    uint32_t k4;
    memcpy(&k4, key, 4);
    uint64_t k8 = ((uint64_t)k4 << 32) | k4;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, src + i, 8);
        w ^= k8;
        memcpy(dst + i, &w, 8);
    }
    for (; i < n; i++)
        dst[i] = (char)(src[i] ^ key[i & 3]);
}

PyDoc_STRVAR(frames_doc,
"frames(data, pos, limit, out) -> pos\n\n"
"Append the message of each complete common-case frame of `data` from `pos` on to the list\n"
"`out` (str for text, bytes for binary); return where the first other frame starts.");

static PyObject *
frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1]) ||
        !PyLong_Check(args[2]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "frames(bytes, int, int, list)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if ((pos == -1 || limit == -1) && PyErr_Occurred())
        return NULL;
    if (pos < 0 || pos > n) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    PyObject *out = args[3];
    char stack[STACK_TEXT];
    while (n - pos >= 2) {
        unsigned char b0 = data[pos], b1 = data[pos + 1];
        Py_ssize_t length = b1 & 0x7F, key_at = pos + 2;
        if ((b0 != 0x81 && b0 != 0x82) || !(b1 & 0x80) || length == 127)
            break;
        if (length == 126) {
            if (n - pos < 4)
                break;
            length = (data[pos + 2] << 8) | data[pos + 3];
            if (length <= 125)
                break;
            key_at = pos + 4;
        }
        if (length > limit || n - key_at - 4 < length)
            break;
        const unsigned char *key = data + key_at, *payload = key + 4;
        PyObject *message;
        if (b0 == 0x82) {
            message = PyBytes_FromStringAndSize(NULL, length);
            if (message == NULL)
                return NULL;
            unmask(PyBytes_AS_STRING(message), payload, length, key);
        } else {
            char *text = length <= STACK_TEXT ? stack : PyMem_Malloc((size_t)length);
            if (text == NULL)
                return PyErr_NoMemory();
            unmask(text, payload, length, key);
            message = PyUnicode_DecodeUTF8(text, length, NULL);
            if (text != stack)
                PyMem_Free(text);
            if (message == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                    return NULL;
                PyErr_Clear(); /* not UTF-8: the Python twin closes with 1007 */
                break;
            }
        }
        int rc = PyList_Append(out, message);
        Py_DECREF(message);
        if (rc < 0)
            return NULL;
        pos = key_at + 4 + length;
    }
    return PyLong_FromSsize_t(pos);
}

static PyMethodDef methods[] = {
    {"frames", (PyCFunction)(void (*)(void))frames, METH_FASTCALL, frames_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "broker.wire._speedups",
    "Client frames' common case in C (see the comment at the top of _speedups.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
