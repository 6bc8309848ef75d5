/* The direct way's hot path in C: the hook of a site traced at every module, thousands of
 * calls a batch (core/direct.py holds the reference, in Python, and says why).
 *
 * OutputHook takes the one common case whole: a CPU tensor, in order in memory, of the
 * stored shape and dtype, whose rows go to the chunk its variable's last batch went to. It
 * makes the checks backends/torch.py's hook and SitePut.put_raw / DirectSlot.claim_remembered
 * make, in the same order, and claims and copies as they do. Anything else (the first
 * passes, a new chunk, another shape, an error) changes nothing here and
 * calls the Python hook it wraps, which decides as it always has: this file only has to
 * recognise the common case, never to handle the rest.
 *
 * copy() writes around the caches (non-temporal stores) where the CPU has them: nothing on
 * the model's thread reads chunk memory again (the chunk process writes it to the disk), and
 * a batch of 1,601 sites copies 26 MB, more than the caches hold: ordinary stores evict the
 * model's weights and the Python objects every next hook reads. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Below this a copy stays in the caches: too small for streaming stores to pay. */
#define STREAM_FROM 4096

static void copy_bytes(char *dest, const char *source, size_t count)
{
#if defined(__SSE2__)
    if (count >= STREAM_FROM) {
        size_t head = (16 - ((uintptr_t)dest & 15)) & 15;
        memcpy(dest, source, head);
        dest += head, source += head, count -= head;
        for (; count >= 64; dest += 64, source += 64, count -= 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)source);
            __m128i b = _mm_loadu_si128((const __m128i *)(source + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(source + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(source + 48));
            _mm_stream_si128((__m128i *)dest, a);
            _mm_stream_si128((__m128i *)(dest + 16), b);
            _mm_stream_si128((__m128i *)(dest + 32), c);
            _mm_stream_si128((__m128i *)(dest + 48), d);
        }
        memcpy(dest, source, count);
        _mm_sfence(); /* the stores are seen before anything this thread does next */
        return;
    }
#endif
    memmove(dest, source, count);
}

/* copy(dest, source, count): memmove between addresses (ints) that do not overlap. */
static PyObject *copy(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy(dest, source, count) takes three ints");
        return NULL;
    }
    void *dest = PyLong_AsVoidPtr(args[0]), *source = PyLong_AsVoidPtr(args[1]);
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (count > 0)
        copy_bytes(dest, source, (size_t)count);
    Py_RETURN_NONE;
}

static PyObject *s_dtype, *s_is_cpu, *s_layout, *s_is_contiguous, *s_is_neg, *s_data_ptr,
    *s_shape, *s_seen_attention, *s_recorder, *s_by_address, *s_calls, *s_key, *s_growing,
    *s_writer, *s_var, *s_current, *s_gather, *s_error, *s_trailing, *s_trailing_seen,
    *s_shape_seen, *s_size, *s_start, *s_chunk, *s_closed, *s_buffer, *s_buffer_seen,
    *s_rows, *s_chunks, *s_claimed, *s_written, *s_first, *s_address, *s_row_bytes, *s_lengths;
static PyObject *one; /* what Python's put_raw stores in the pass's calls */

/* An attribute, or NULL with no error set where it is missing (the caller falls back). */
static PyObject *attr(PyObject *object, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(object, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError))
        PyErr_Clear();
    return value;
}

/* An int attribute into *out: 1, or 0 where it is missing or no int (nothing raised). */
static int int_attr(PyObject *object, PyObject *name, Py_ssize_t *out)
{
    PyObject *value = attr(object, name);
    if (value == NULL)
        return 0;
    int ok = PyLong_CheckExact(value);
    if (ok) {
        *out = PyLong_AsSsize_t(value);
        ok = !(*out == -1 && PyErr_Occurred());
        PyErr_Clear();
    }
    Py_DECREF(value);
    return ok;
}

/* Whether a method called without arguments returns ``expected`` (True or False). */
static int answers(PyObject *object, PyObject *name, PyObject *expected)
{
    PyObject *value = PyObject_CallMethodNoArgs(object, name);
    if (value == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(value);
    return value == expected;
}

/* Whether ``shape`` has the lengths every variable of the pass agrees on along its growing
 * axes (``growing``: (dim, axis) pairs), the first to come setting them, as
 * DirectSlot.claim_remembered does (its ``setdefault`` gives the same result when it runs
 * again after this one). */
static int agrees(PyObject *writer, PyObject *growing, PyObject *shape)
{
    PyObject *lengths = attr(writer, s_lengths);
    int same = lengths != NULL && PyDict_CheckExact(lengths) && PyTuple_Check(shape);
    for (Py_ssize_t i = 0; same && i < PyTuple_GET_SIZE(growing); i++) {
        PyObject *pair = PyTuple_GET_ITEM(growing, i);
        Py_ssize_t axis;
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2
            || (axis = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1))) < 0
            || axis >= PyTuple_GET_SIZE(shape)) {
            same = 0;
            break;
        }
        PyObject *length = PyTuple_GET_ITEM(shape, axis);
        PyObject *agreed = PyDict_SetDefault(lengths, PyTuple_GET_ITEM(pair, 0), length);
        same = agreed != NULL && PyObject_RichCompareBool(agreed, length, Py_EQ) == 1;
    }
    PyErr_Clear();
    Py_XDECREF(lengths);
    return same;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *python_hook; /* the hook this one takes the common case of */
    PyObject *capture;     /* the backend's _Capture: _seen_attention, recorder */
    PyObject *by_address;  /* [None] or [(SitePut, torch dtype, stored dtype)] */
    PyObject *tensor_type, *strided;
    Py_ssize_t taken; /* the calls it took whole, without the Python hook (tests count them) */
} OutputHook;

/* DirectSlot.claim_remembered's claim and SitePut.put_raw's copy where the rows go to the
 * remembered chunk, as the Python does them: 1 done, 0 nothing done (Python decides), -1 an
 * error raised. Every reference taken is given back before the claim, which cannot fail
 * halfway: the list append comes first, then what cannot fail. */
static int put_raw(PyObject *site_put, PyObject *shape, PyObject *stored_dtype, void *source)
{
    int done = 0;
    PyObject *slot = NULL, *calls = NULL, *key = NULL, *growing = NULL, *writer = NULL,
             *var = NULL, *batch = NULL, *gather = NULL, *error = NULL, *trailing = NULL,
             *trailing_seen = NULL, *shape_seen = NULL, *gather_dtype = NULL, *chunk = NULL,
             *closed = NULL, *buffer = NULL, *buffer_seen = NULL, *chunks = NULL,
             *claimed = NULL, *written = NULL, *first = NULL, *fresh = NULL;
    Py_ssize_t size, seen_size, start, chunk_start, chunk_rows, address, row_bytes, lo;

    if (!(slot = attr(site_put, s_by_address)) || slot == Py_None)
        goto out;
    if (!(calls = attr(site_put, s_calls)) || !PyDict_CheckExact(calls)
        || !(key = attr(site_put, s_key)))
        goto out;
    int called = PyDict_Contains(calls, key);
    if (called != 0) {
        PyErr_Clear();
        goto out;
    }
    if (!(growing = attr(slot, s_growing)) || !PyTuple_CheckExact(growing)
        || !(writer = attr(slot, s_writer)) || !(var = attr(slot, s_var))
        || !(batch = attr(writer, s_current)) || batch == Py_None
        || !(gather = attr(var, s_gather)) || gather == Py_None
        || !(error = attr(writer, s_error)) || error != Py_None)
        goto out;
    /* the slot's shape is that of this batch size and these trailing dims already */
    if (!(trailing = attr(var, s_trailing)) || !(trailing_seen = attr(slot, s_trailing_seen))
        || trailing != trailing_seen || !int_attr(batch, s_size, &size)
        || !(shape_seen = attr(slot, s_shape_seen)) || !PyTuple_CheckExact(shape_seen)
        || PyTuple_GET_SIZE(shape_seen) < 1 || !PyLong_CheckExact(PyTuple_GET_ITEM(shape_seen, 0)))
        goto out;
    seen_size = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape_seen, 0));
    if (seen_size != size || PyObject_RichCompareBool(shape, shape_seen, Py_EQ) != 1) {
        PyErr_Clear();
        goto out;
    }
    if (!(gather_dtype = attr(gather, s_dtype)) || gather_dtype != stored_dtype)
        goto out;
    if (PyTuple_GET_SIZE(growing) && !agrees(writer, growing, shape))
        goto out;
    if (!int_attr(batch, s_start, &start) || !(chunk = attr(slot, s_chunk)) || chunk == Py_None
        || !(closed = attr(chunk, s_closed)) || closed != Py_False
        || !(buffer = attr(chunk, s_buffer)) || !(buffer_seen = attr(slot, s_buffer_seen))
        || buffer != buffer_seen || buffer == Py_None
        || !int_attr(chunk, s_start, &chunk_start) || !int_attr(chunk, s_rows, &chunk_rows)
        || start < chunk_start || start + size > chunk_start + chunk_rows
        || !(chunks = attr(gather, s_chunks)) || !PyDict_CheckExact(chunks))
        goto out;
    PyObject *start_key = PyLong_FromSsize_t(chunk_start);
    if (start_key == NULL)
        goto fail;
    PyObject *current = PyDict_GetItemWithError(chunks, start_key); /* borrowed */
    Py_DECREF(start_key);
    if (current != chunk) {
        PyErr_Clear();
        goto out;
    }
    if (!int_attr(slot, s_address, &address) || !int_attr(slot, s_row_bytes, &row_bytes)
        || !(claimed = attr(batch, s_claimed)) || !PyTuple_CheckExact(claimed)
        || PyTuple_GET_SIZE(claimed) != 2 || !(written = attr(chunk, s_written))
        || !PyList_CheckExact(written) || !(first = attr(chunk, s_first)))
        goto out;

    lo = start - chunk_start;
    PyObject *claimed_lo = PyTuple_GET_ITEM(claimed, 0);
    if (!PyLong_CheckExact(claimed_lo) || PyLong_AsSsize_t(claimed_lo) != lo) {
        PyErr_Clear();
        if (!(fresh = Py_BuildValue("(nn)", lo, lo + size))
            || PyObject_SetAttr(batch, s_claimed, fresh) < 0)
            goto fail;
        Py_SETREF(claimed, Py_NewRef(fresh));
    }
    if (PyList_Append(written, claimed) < 0)
        goto fail;
    if (first == Py_None) {
        PyObject *start_int = PyLong_FromSsize_t(start);
        int set = start_int == NULL ? -1 : PyObject_SetAttr(chunk, s_first, start_int);
        Py_XDECREF(start_int);
        if (set < 0)
            goto fail;
    }
    copy_bytes((char *)address + lo * row_bytes, source, (size_t)(size * row_bytes));
    if (PyDict_SetItem(calls, key, one) < 0)
        goto fail;
    done = 1;
    goto out;
fail:
    done = -1;
out:
    Py_XDECREF(slot), Py_XDECREF(calls), Py_XDECREF(key), Py_XDECREF(growing);
    Py_XDECREF(writer), Py_XDECREF(var), Py_XDECREF(batch), Py_XDECREF(gather);
    Py_XDECREF(error), Py_XDECREF(trailing), Py_XDECREF(trailing_seen), Py_XDECREF(shape_seen);
    Py_XDECREF(gather_dtype), Py_XDECREF(chunk), Py_XDECREF(closed), Py_XDECREF(buffer);
    Py_XDECREF(buffer_seen), Py_XDECREF(chunks), Py_XDECREF(claimed), Py_XDECREF(written);
    Py_XDECREF(first), Py_XDECREF(fresh);
    return done;
}

/* The hook's own checks (backends/torch.py, _Capture._output_hook), then put_raw: 1 done,
 * 0 the Python hook decides, -1 an error raised. */
static int take(OutputHook *self, PyObject *output)
{
    int done = 0;
    PyObject *known = NULL, *value = NULL, *site_put = NULL, *recorder = NULL, *ours = NULL,
             *address = NULL, *shape = NULL;
    void *source;

    if (!PyList_CheckExact(self->by_address) || PyList_GET_SIZE(self->by_address) != 1)
        return 0;
    known = Py_NewRef(PyList_GET_ITEM(self->by_address, 0));
    if (!PyTuple_CheckExact(known) || PyTuple_GET_SIZE(known) != 3
        || (PyObject *)Py_TYPE(output) != self->tensor_type)
        goto out;
    if (!(value = attr(output, s_dtype)) || value != PyTuple_GET_ITEM(known, 1))
        goto out;
    Py_SETREF(value, attr(output, s_is_cpu));
    if (value != Py_True)
        goto out;
    Py_SETREF(value, attr(output, s_layout));
    if (value != self->strided)
        goto out;
    Py_SETREF(value, attr(self->capture, s_seen_attention));
    if (value == NULL || PyObject_IsTrue(value) != 0)
        goto out;
    site_put = PyTuple_GET_ITEM(known, 0); /* borrowed from known */
    if (!(recorder = attr(site_put, s_recorder)) || !(ours = attr(self->capture, s_recorder))
        || recorder != ours || !answers(output, s_is_contiguous, Py_True)
        || !answers(output, s_is_neg, Py_False))
        goto out;
    if (!(address = PyObject_CallMethodNoArgs(output, s_data_ptr))) {
        PyErr_Clear();
        goto out;
    }
    source = PyLong_AsVoidPtr(address);
    if (source == NULL) { /* no memory (or no int): the Python hook says what */
        PyErr_Clear();
        goto out;
    }
    if (!(shape = attr(output, s_shape)))
        goto out;
    done = put_raw(site_put, shape, PyTuple_GET_ITEM(known, 2), source);
out:
    Py_XDECREF(known), Py_XDECREF(value), Py_XDECREF(recorder), Py_XDECREF(ours);
    Py_XDECREF(address), Py_XDECREF(shape);
    return done;
}

static PyObject *hook_call(PyObject *self_, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames)
{
    OutputHook *self = (OutputHook *)self_;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs == 4 && kwnames == NULL) {
        int done = take(self, args[3]);
        if (done < 0)
            return NULL;
        if (done) {
            self->taken++;
            Py_RETURN_NONE;
        }
        PyErr_Clear(); /* a check that raised: the Python hook meets it again and says so */
    }
    return PyObject_Vectorcall(self->python_hook, args, nargsf, kwnames);
}

static PyObject *hook_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"python_hook", "capture", "by_address", "tensor_type", "strided",
                            NULL};
    PyObject *python_hook, *capture, *by_address, *tensor_type, *strided;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO!OO:OutputHook", names, &python_hook,
                                     &capture, &PyList_Type, &by_address, &tensor_type,
                                     &strided))
        return NULL;
    OutputHook *self = (OutputHook *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = hook_call;
    self->python_hook = Py_NewRef(python_hook);
    self->capture = Py_NewRef(capture);
    self->by_address = Py_NewRef(by_address);
    self->tensor_type = Py_NewRef(tensor_type);
    self->strided = Py_NewRef(strided);
    return (PyObject *)self;
}

static int hook_traverse(OutputHook *self, visitproc visit, void *arg)
{
    Py_VISIT(self->python_hook);
    Py_VISIT(self->capture);
    Py_VISIT(self->by_address);
    Py_VISIT(self->tensor_type);
    Py_VISIT(self->strided);
    return 0;
}

static int hook_clear(OutputHook *self)
{
    Py_CLEAR(self->python_hook);
    Py_CLEAR(self->capture);
    Py_CLEAR(self->by_address);
    Py_CLEAR(self->tensor_type);
    Py_CLEAR(self->strided);
    return 0;
}

static void hook_dealloc(OutputHook *self)
{
    PyObject_GC_UnTrack(self);
    hook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *hook_wrapped(OutputHook *self, void *closure)
{
    return Py_NewRef(self->python_hook);
}

static PyGetSetDef hook_getset[] = {
    {"__wrapped__", (getter)hook_wrapped, NULL, "the Python hook this one wraps", NULL},
    {NULL},
};

static PyMemberDef hook_members[] = {
    {"taken", T_PYSSIZET, offsetof(OutputHook, taken), READONLY,
     "how many calls it took whole, without calling the Python hook"},
    {NULL},
};

static PyTypeObject OutputHookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerscope.core._directc.OutputHook",
    .tp_doc = "OutputHook(python_hook, capture, by_address, tensor_type, strided): a forward "
              "hook that takes the direct way's common case itself and calls python_hook "
              "for everything else.",
    .tp_basicsize = sizeof(OutputHook),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = hook_new,
    .tp_traverse = (traverseproc)hook_traverse,
    .tp_clear = (inquiry)hook_clear,
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(OutputHook, vectorcall),
    .tp_getset = hook_getset,
    .tp_members = hook_members,
};

/* Forward(forward, module, hook): a module's ``forward`` that calls ``forward`` and then
 * ``hook(module, args, kwargs, output)`` as a forward hook is called
 * (backends/_torch_forward.py says why); an OutputHook's common case is taken without
 * building those arguments. ``hook`` set to None: calls only pass through. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *forward, *module, *hook;
} Forward;

/* The arguments of a forward hook, from a vectorcall's: (args, kwargs) or NULL. */
static PyObject *hook_arguments(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                                PyObject **kwargs)
{
    PyObject *positional = PyTuple_New(nargs);
    if (positional == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++)
        PyTuple_SET_ITEM(positional, i, Py_NewRef(args[i]));
    if ((*kwargs = PyDict_New()) == NULL) {
        Py_DECREF(positional);
        return NULL;
    }
    Py_ssize_t named = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < named; i++)
        if (PyDict_SetItem(*kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
            Py_DECREF(positional);
            Py_CLEAR(*kwargs);
            return NULL;
        }
    return positional;
}

static PyObject *forward_call(PyObject *self_, PyObject *const *args, size_t nargsf,
                              PyObject *kwnames)
{
    Forward *self = (Forward *)self_;
    PyObject *output = PyObject_Vectorcall(self->forward, args, nargsf, kwnames);
    if (output == NULL || self->hook == Py_None)
        return output;
    PyObject *hook = Py_NewRef(self->hook), *python = hook;
    if (Py_TYPE(hook) == &OutputHookType) {
        int done = take((OutputHook *)hook, output);
        if (done != 0) {
            Py_DECREF(hook);
            if (done < 0)
                Py_CLEAR(output);
            else
                ((OutputHook *)hook)->taken++;
            return output;
        }
        PyErr_Clear(); /* as hook_call: the Python hook meets it again and says so */
        python = ((OutputHook *)hook)->python_hook;
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *kwargs = NULL, *positional = hook_arguments(args, nargs, kwnames, &kwargs);
    PyObject *result = positional == NULL ? NULL : PyObject_CallFunctionObjArgs(
        python, self->module, positional, kwargs, output, NULL);
    Py_XDECREF(positional), Py_XDECREF(kwargs), Py_DECREF(hook);
    if (result == NULL)
        Py_CLEAR(output);
    Py_XDECREF(result); /* a forward hook's None; anything else is not a replacement here */
    return output;
}

static PyObject *forward_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"forward", "module", "hook", NULL};
    PyObject *forward, *module, *hook;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:Forward", names, &forward, &module,
                                     &hook))
        return NULL;
    Forward *self = (Forward *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = forward_call;
    self->forward = Py_NewRef(forward);
    self->module = Py_NewRef(module);
    self->hook = Py_NewRef(hook);
    return (PyObject *)self;
}

static int forward_traverse(Forward *self, visitproc visit, void *arg)
{
    Py_VISIT(self->forward);
    Py_VISIT(self->module);
    Py_VISIT(self->hook);
    return 0;
}

static int forward_clear(Forward *self)
{
    Py_CLEAR(self->forward);
    Py_CLEAR(self->module);
    Py_CLEAR(self->hook);
    return 0;
}

static void forward_dealloc(Forward *self)
{
    PyObject_GC_UnTrack(self);
    forward_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *forward_wrapped(Forward *self, void *closure)
{
    return Py_NewRef(self->forward);
}

static PyObject *forward_hook(Forward *self, void *closure)
{
    return Py_NewRef(self->hook);
}

static int forward_set_hook(Forward *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "set hook to None to turn it off");
        return -1;
    }
    Py_SETREF(self->hook, Py_NewRef(value));
    return 0;
}

static PyGetSetDef forward_getset[] = {
    {"__wrapped__", (getter)forward_wrapped, NULL,
     "the forward this one calls (inspect.signature follows it)", NULL},
    {"hook", (getter)forward_hook, (setter)forward_set_hook,
     "the hook called after each forward; None: calls only pass through", NULL},
    {NULL},
};

static PyTypeObject ForwardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "layerscope.core._directc.Forward",
    .tp_doc = "Forward(forward, module, hook): a module's forward that calls forward and "
              "then hook(module, args, kwargs, output), an OutputHook's common case in C.",
    .tp_basicsize = sizeof(Forward),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = forward_new,
    .tp_traverse = (traverseproc)forward_traverse,
    .tp_clear = (inquiry)forward_clear,
    .tp_dealloc = (destructor)forward_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Forward, vectorcall),
    .tp_getset = forward_getset,
};

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))copy, METH_FASTCALL,
     "copy(dest, source, count): copy count bytes between two addresses that do not "
     "overlap, around the caches where the CPU can."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "layerscope.core._directc",
    "The direct way's hot path in C (see core/direct.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__directc(void)
{
    struct { PyObject **name; const char *text; } names[] = {
        {&s_dtype, "dtype"}, {&s_is_cpu, "is_cpu"}, {&s_layout, "layout"},
        {&s_is_contiguous, "is_contiguous"}, {&s_is_neg, "is_neg"}, {&s_data_ptr, "data_ptr"},
        {&s_shape, "shape"}, {&s_seen_attention, "_seen_attention"}, {&s_recorder, "recorder"},
        {&s_by_address, "by_address"}, {&s_calls, "_calls"}, {&s_key, "_key"},
        {&s_growing, "_growing"}, {&s_writer, "writer"}, {&s_var, "var"},
        {&s_current, "_current"}, {&s_gather, "gather"}, {&s_error, "_error"},
        {&s_trailing, "trailing"}, {&s_trailing_seen, "_trailing"}, {&s_shape_seen, "_shape"},
        {&s_size, "size"}, {&s_start, "start"}, {&s_chunk, "_chunk"}, {&s_closed, "closed"},
        {&s_buffer, "buffer"}, {&s_buffer_seen, "_buffer"}, {&s_rows, "rows"},
        {&s_chunks, "chunks"}, {&s_claimed, "claimed"}, {&s_written, "written"},
        {&s_first, "first"}, {&s_address, "address"}, {&s_row_bytes, "row_bytes"},
        {&s_lengths, "_lengths"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!(*names[i].name = PyUnicode_InternFromString(names[i].text)))
            return NULL;
    if (!(one = PyLong_FromLong(1)) || PyType_Ready(&OutputHookType) < 0
        || PyType_Ready(&ForwardType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "OutputHook", (PyObject *)&OutputHookType) < 0
        || PyModule_AddObjectRef(m, "Forward", (PyObject *)&ForwardType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
