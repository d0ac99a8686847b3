/* p2p_native.c's calls as a CPython extension module (moemesh/wire/p2p_native.py builds and loads it).

   ctypes converts each argument through its argtypes and builds a call frame per call: ~0.5-1 us for the
   one-pointer calls and ~1.4 us for mm_rows_with_work's four, on the attention side two or three per hop and on
   the expert node two per message, against a raw TCP echo of ~10 us. These are METH_FASTCALL functions of the
   same names and arguments (ints for addresses, None for NULL, floats for deadlines), so p2p_socket.py calls
   either without knowing which it has; the ones that may block release the GIL, as ctypes does. The C code is
   p2p_native.c itself, included, so both paths run the same lines. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "p2p_native.c"

/* An address argument: an int, or None for NULL (as a ctypes c_void_p takes). */
static int arg_ptr(PyObject *o, void **out) {
    if (o == Py_None) {
        *out = NULL;
        return 0;
    }
    *out = PyLong_AsVoidPtr(o);
    return (*out == NULL && PyErr_Occurred()) ? -1 : 0;
}

static int arg_i64(PyObject *o, int64_t *out) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 0;
}

static int arg_f64(PyObject *o, double *out) {
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

static int nargs_is(const char *name, Py_ssize_t got, Py_ssize_t want) {
    if (got == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, got);
    return -1;
}

/* The one-pointer calls: one argument block (p2p_native.c recv_args, serve_args, send_args, reply_args). */
#define BLOCK_CALL(NAME, TYPE)                                                                   \
    static PyObject *py_##NAME(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {        \
        void *a;                                                                                 \
        if (nargs_is(#NAME, nargs, 1) || arg_ptr(args[0], &a)) return NULL;                      \
        int64_t rc;                                                                              \
        Py_BEGIN_ALLOW_THREADS rc = NAME((const TYPE *)a);                                       \
        Py_END_ALLOW_THREADS return PyLong_FromLongLong(rc);                                     \
    }
BLOCK_CALL(mm_recv, recv_args)
BLOCK_CALL(mm_serve, serve_args)
BLOCK_CALL(mm_send, send_args)
BLOCK_CALL(mm_reply, reply_args)
BLOCK_CALL(mm_take, take_args)

static PyObject *py_mm_p2p_abi(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs_is("mm_p2p_abi", nargs, 0)) return NULL;
    return PyLong_FromLongLong(mm_p2p_abi());
}

/* Short loops over a few hundred ids: no GIL release (it costs more than the loop). */
static PyObject *py_mm_rows_with_work(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *ids;
    int64_t size, rows, k;
    if (nargs_is("mm_rows_with_work", nargs, 4) || arg_ptr(args[0], &ids) || arg_i64(args[1], &size) ||
        arg_i64(args[2], &rows) || arg_i64(args[3], &k))
        return NULL;
    return PyLong_FromLongLong(mm_rows_with_work(ids, (int32_t)size, rows, k));
}

static PyObject *py_mm_check_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *ids, *w, *hosted;
    int64_t n, n_experts;
    if (nargs_is("mm_check_rows", nargs, 5) || arg_ptr(args[0], &ids) || arg_ptr(args[1], &w) ||
        arg_i64(args[2], &n) || arg_ptr(args[3], &hosted) || arg_i64(args[4], &n_experts))
        return NULL;
    return PyLong_FromLongLong(mm_check_rows(ids, w, n, hosted, n_experts));
}

static PyObject *py_mm_recv_large(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t fd, n;
    void *staging, *state, *out, *rcvtimeo;
    double deadline, slack;
    if (nargs_is("mm_recv_large", nargs, 8) || arg_i64(args[0], &fd) || arg_ptr(args[1], &staging) ||
        arg_ptr(args[2], &state) || arg_ptr(args[3], &out) || arg_i64(args[4], &n) || arg_f64(args[5], &deadline) ||
        arg_ptr(args[6], &rcvtimeo) || arg_f64(args[7], &slack))
        return NULL;
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS rc = mm_recv_large((int)fd, staging, state, out, n, deadline, rcvtimeo, slack);
    Py_END_ALLOW_THREADS return PyLong_FromLongLong(rc);
}

#define FAST(NAME) {#NAME, (PyCFunction)(void (*)(void))py_##NAME, METH_FASTCALL, NULL}
static PyMethodDef methods[] = {
    FAST(mm_p2p_abi), FAST(mm_recv), FAST(mm_serve), FAST(mm_send), FAST(mm_reply), FAST(mm_take),
    FAST(mm_rows_with_work), FAST(mm_check_rows), FAST(mm_recv_large), {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "moemesh_p2p_ext",
                                    "p2p_native.c's calls without ctypes (moemesh/wire/p2p_ext.c)", -1, methods};

PyMODINIT_FUNC PyInit_moemesh_p2p_ext(void) { return PyModule_Create(&module); }
