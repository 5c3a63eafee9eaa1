/* Reading and writing __slots__ attributes from C at the offsets their member descriptors give,
 * the way CPython's own member descriptors do, without an attribute lookup per access. Shared
 * by the C speedups (broker/pubsub/_speedups.c, broker/net/_speedups.c). An offset is valid for
 * the class it was resolved on and every subclass of it (CPython lays a subclass's slots out after
 * its base's); an unset slot reads as NULL. */

#ifndef BROKER_SLOTS_H
#define BROKER_SLOTS_H

#include <Python.h>
#include <structmember.h>

#ifdef Py_T_OBJECT_EX
#define SLOT_TYPE Py_T_OBJECT_EX
#else
#define SLOT_TYPE T_OBJECT_EX
#endif

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* The offset of the slot `name` of the class `cls`; -1 with an exception set if it has none. */
static int
slot_offset(PyObject *cls, const char *name, Py_ssize_t *offset)
{
    PyObject *descr = PyObject_GetAttrString(cls, name);
    if (descr == NULL)
        return -1;
    if (!PyObject_TypeCheck(descr, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)descr)->d_member->type != SLOT_TYPE) {
        PyErr_Format(PyExc_TypeError, "%s is not a __slots__ attribute", name);
        Py_DECREF(descr);
        return -1;
    }
    *offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_DECREF(descr);
    return 0;
}

#endif
