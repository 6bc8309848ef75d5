"""The short way into the writer, for a model traced at hundreds of sites.

:meth:`SitePut.put` is called once per captured tensor, thousands of times a batch, and most
calls repeat the last one: the same variable, the stored shape, the rows
of the current batch in the chunk its previous batch went to. A :class:`DirectSlot` (one per
gathered variable) remembers that chunk and what the checks found, and claims the rows with
one list append; a tensor that lies in order in memory, in the bytes it is stored as, is
then copied there with one ``memmove`` from its address (:meth:`SitePut.put_raw`). Anything
else (a new chunk, another shape, a shorter pass) goes the general way
(:meth:`.gatherwrite.GatheredWrites.view_now`), which the slot then remembers. A
:class:`QueuedSlot` (a variable that is not gathered: large tensors, or every variable of a
store that gathers none) copies a tensor of the stored shape into pool memory and queues its
write, as the writer's ``put`` does once its checks found nothing new.

Where the package was built with a C compiler, ``_directc`` (core/_directc.c) takes the
commonest call whole: a torch site's hook whose output goes by address
(:data:`OutputHook`, the checks of the backend's hook, :meth:`SitePut.put_raw` and
:meth:`DirectSlot.claim_remembered` made in the same order), and the copy itself, with
stores that go around the caches; and the wrapper a module's ``forward`` becomes where that
hook runs inside it (:data:`Forward`, see backends/_torch_forward.py). Anything else it
leaves to the Python here, which stays the reference: it does everything the C part does.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .growth import grows


def _memmove_keeping_the_lock() -> Callable[[int, int, int], Any]:
    """``memmove(dest, source, count)`` that keeps Python's lock: one batch of a gathered
    variable (at most :attr:`.gather.GatherPolicy.below` bytes) copies in less time than a
    hand-over of the lock to a writer thread and back takes. The C library's own, called
    through ``PyDLL``, costs half as much a call as a prototype made from ``ctypes.memmove``'s
    address (0.34 us against 0.78 us for 64 bytes, 0.69 us against 1.18 us for 16 KiB: a
    model traced at 1,601 modules calls it 1,601 times a batch). Where layerscope's C part
    is built (``_directc``), its ``copy``: the same, with stores that go around the caches."""
    if _directc is not None:
        return _directc.copy
    try:
        function = ctypes.PyDLL(None).memmove  # a library of our own: its settings are ours
    except (AttributeError, OSError, TypeError):  # no C library found by name (Windows)
        return ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_size_t)(ctypes.memmove)
    function.restype = ctypes.c_void_p
    function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return function


def _load_directc() -> Any:
    """The direct way's hot path in C (core/_directc.c), None where it was not built (no
    compiler where the package was installed) or ``LAYERSCOPE_PURE_PYTHON`` is set: the
    Python below does all it does, more slowly."""
    if os.environ.get("LAYERSCOPE_PURE_PYTHON"):
        return None
    try:
        from . import _directc  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _directc


_directc = _load_directc()
_memmove = _memmove_keeping_the_lock()
#: ``OutputHook(python_hook, capture, by_address, tensor_type, strided)``: a forward hook that
#: takes the common case of ``python_hook`` (a torch site's hook, which
#: ``_Capture._output_hook`` makes) in C and calls it for the rest; None without the C part
OutputHook = _directc.OutputHook if _directc is not None else None
#: ``Forward(forward, module, hook)``: a module's ``forward`` calling ``hook`` as a forward
#: hook after it, an ``OutputHook``'s common case in C (backends/_torch_forward.py); None
#: without the C part
Forward = _directc.Forward if _directc is not None else None

_ELSEWHERE, _REFUSED = -1, -2  # DirectSlot.claim_remembered: no rows claimed

if TYPE_CHECKING:
    from .gather import Chunk
    from .writer import TraceWriter
    from .writerecords import Batch, ToNumpy, Variable


class DirectSlot:
    """One gathered variable's memory of its last direct put."""

    __slots__ = ("_buffer", "_chunk", "_growing", "_shape", "_trailing", "address",
                 "row_bytes", "var", "writer")

    def __init__(self, writer: TraceWriter, var: Variable) -> None:
        self.writer, self.var = writer, var
        self._chunk: Chunk | None = None
        #: the remembered chunk's memory (it may be replaced: a token axis grew), where it
        #: starts and its bytes a row
        self._buffer: np.ndarray | None = None
        self.address = self.row_bytes = 0
        self._trailing: tuple[int, ...] | None = None
        self._shape: tuple[int, ...] = (-1,)  # (batch size, *trailing) once a batch came
        #: (dim, axis) of each axis whose length may change between passes
        self._growing = tuple((dim, axis) for axis, dim in enumerate(var.dims) if axis
                              and grows(dim))

    def memory(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """The claimed chunk memory for this batch's rows of a tensor of exactly the stored
        ``shape`` and ``dtype``; None where the general way must decide (nothing claimed)."""
        lo = self.claim_remembered(shape, dtype)
        if lo >= 0:
            assert self._buffer is not None
            return self._buffer[lo:lo + shape[0]]
        if lo == _REFUSED:
            return None
        batch, gather = self.writer._current, self.var.gather
        assert batch is not None and gather is not None  # or refused
        view = self.writer._gathering.view_now(batch, self.var, self._shape, dtype)
        chunk = gather.chunks.get(batch.start // gather.rows * gather.rows) \
            if view is not None else None
        if chunk is not None and chunk.buffer is not None:
            self.remember(chunk)
        else:
            self._chunk, self._buffer = chunk, None
        return view

    def follows(self, chunk: Chunk) -> bool:
        """Whether the last batch's rows went to ``chunk`` (the slot remembers it)."""
        return self._chunk is chunk

    def remember(self, chunk: Chunk) -> None:
        """Send the next batches' rows to ``chunk`` (open, its memory made)."""
        assert chunk.buffer is not None
        self._chunk, self._buffer = chunk, chunk.buffer
        self.address = chunk.buffer.ctypes.data
        self.row_bytes = chunk.buffer[0].nbytes

    def claim_remembered(self, shape: tuple[int, ...], dtype: np.dtype) -> int:
        """Claim this batch's rows in the remembered chunk: their first row in it;
        ``_ELSEWHERE`` where they fall into no remembered chunk (nothing claimed: the general
        way decides), ``_REFUSED`` where put() must decide."""
        writer, var = self.writer, self.var
        batch, gather = writer._current, var.gather
        if batch is None or gather is None or writer._error is not None:
            return _REFUSED
        if var.trailing is not self._trailing or batch.size != self._shape[0]:
            self._trailing = var.trailing
            self._shape = (batch.size, *var.trailing)
        if shape != self._shape or (dtype is not gather.dtype and dtype != gather.dtype):
            return _REFUSED
        lengths = writer._lengths
        for dim, axis in self._growing:  # every variable of the pass agrees on its lengths
            if lengths.setdefault(dim, shape[axis]) != shape[axis]:
                return _REFUSED
        start = batch.start
        chunk = self._chunk
        if chunk is None or chunk.closed or chunk.buffer is not self._buffer \
                or self._buffer is None or start < chunk.start \
                or start + batch.size > chunk.start + chunk.rows \
                or gather.chunks.get(chunk.start) is not chunk:
            return _ELSEWHERE
        lo = start - chunk.start
        claimed = batch.claimed
        if claimed[0] != lo:
            claimed = batch.claimed = (lo, lo + batch.size)
        # no lock: only this thread reads and writes an open chunk's ``written`` (a writer
        # thread reads it once the chunk is closed, on this thread, at a batch end)
        chunk.written.append(claimed)
        if chunk.first is None:  # a discarded batch had claimed it first
            chunk.first = start
        return lo

    def put(self, shape: tuple[int, ...], dtype: np.dtype,
            copy: Callable[[np.ndarray], Any]) -> bool:
        """``copy`` fills the claimed memory of this batch's rows: the remembered chunk's,
        else the general way's (a shorter pass: filled past its length, as put() fills it).
        False, with nothing claimed, where the writer's ``put`` must decide."""
        view, short = self.memory(shape, dtype), False
        if view is None:
            claimed = _claim(self.writer, self.var, shape, dtype)
            if claimed is None:
                return False
            view, short = claimed
        gather = self.var.gather
        assert gather is not None  # checked by both ways
        try:
            if short:
                view[...] = gather.fill
                view = view[tuple(slice(0, n) for n in shape)]
            copy(view)
        except BaseException:
            view[...] = gather.fill  # claimed, never copied: reads as the fill value
            raise
        return True


class QueuedSlot:
    """A variable that is not gathered: a tensor of its stored shape (or shorter along token
    axes), in a batch after the first (the budget and gathering decided), is copied into pool
    memory and its write queued; anything else is the writer's ``put``'s to decide."""

    __slots__ = ("_grows", "_growing", "_shape", "_trailing", "var", "writer")

    def __init__(self, writer: TraceWriter, var: Variable) -> None:
        self.writer, self.var = writer, var
        self._trailing: tuple[int, ...] | None = None
        self._shape: tuple[int, ...] = (-1,)
        self._grows = tuple(grows(dim) for dim in var.dims[1:])
        self._growing = tuple((dim, axis) for axis, dim in enumerate(var.dims) if axis
                              and grows(dim))

    def put(self, shape: tuple[int, ...], dtype: np.dtype,
            copy: Callable[[np.ndarray], Any]) -> bool:
        """``copy`` fills pool memory of ``shape`` and ``dtype`` (the data a snapshot would
        hold: a pass shorter along token axes is filled past its length by the writer's
        thread, as for ``put``); False, with nothing done, where ``put`` must decide."""
        batch = self._batch_taking(shape)
        if batch is None:
            return False
        self.writer.queue_copy(batch, self.var, shape, dtype, copy)
        return True

    def put_held(self, shape: tuple[int, ...], hold: Callable[[], Any],
                 to_numpy: ToNumpy) -> bool:
        """:meth:`put` of a tensor of ``shape`` that ``hold`` starts copying (off a device),
        queued as it is: a writer thread waits for it (``to_numpy``)."""
        batch = self._batch_taking(shape)
        if batch is None:
            return False
        self.writer.queue_held(batch, self.var, hold(), to_numpy)
        return True

    def _batch_taking(self, shape: tuple[int, ...]) -> Batch | None:
        """The batch under way, where it takes a tensor of ``shape`` as ``put`` would; None
        where ``put`` must decide."""
        writer, var = self.writer, self.var
        batch = writer._current
        if batch is None or var.gather is not None or writer._error is not None \
                or writer._sizing_budget:
            return None
        if var.trailing is not self._trailing or batch.size != self._shape[0]:
            self._trailing = var.trailing
            self._shape = (batch.size, *var.trailing)
        if shape != self._shape and not self._shorter(shape):
            return None
        lengths = writer._lengths
        for dim, axis in self._growing:  # every variable of the pass agrees on its lengths
            if lengths.setdefault(dim, shape[axis]) != shape[axis]:
                return None
        return batch

    def _shorter(self, shape: tuple[int, ...]) -> bool:
        """Whether ``shape`` is the stored one but shorter along token axes."""
        stored = self._shape
        return len(shape) == len(stored) and shape[0] == stored[0] and all(
            size == full or (growing and size < full)
            for size, full, growing in zip(shape[1:], stored[1:], self._grows, strict=True))


Slot = DirectSlot | QueuedSlot


class SitePut:
    """One site's direct way as a backend holds it (:meth:`.recorder.Recorder.direct_site`),
    nothing looked up again: a backend calls it for every captured module, thousands of
    times a batch."""

    __slots__ = ("_calls", "_key", "_slot", "by_address", "recorder")

    def __init__(self, recorder: Any, calls: dict[tuple[str, str], int], key: tuple[str, str],
                 slot: Slot) -> None:
        self.recorder, self._calls, self._key, self._slot = recorder, calls, key, slot
        #: the slot :meth:`put_raw` copies into (a gathered variable's), None where it takes
        #: nothing: a backend asks before it reads a tensor's layout and address
        self.by_address = slot if type(slot) is DirectSlot else None

    def put_raw(self, shape: tuple[int, ...], dtype: np.dtype, address: int) -> bool:
        """:meth:`put` of a tensor that lies C-contiguous at ``address``, where it goes into
        the chunk its variable's last batch went to (the usual case of a model traced at
        every module): copied with one ``memmove``, no array made for it. False, with
        nothing done, where :meth:`put` must decide."""
        slot = self.by_address
        if slot is None or self._key in self._calls:
            return False
        lo = slot.claim_remembered(shape, dtype)
        if lo < 0:
            return False
        _memmove(slot.address + lo * slot.row_bytes, address, shape[0] * slot.row_bytes)
        self._calls[self._key] = 1
        return True

    def put(self, shape: tuple[int, ...], dtype: np.dtype,
            copy: Callable[[np.ndarray], Any]) -> bool:
        """The recorder's ``put`` of the site's first call in this pass, taken as an earlier
        pass took it: ``copy`` fills the memory its rows go to, now. False, with
        nothing done, where ``put`` must run (a later call of the site in the pass, a
        variable no longer gathered, a shape or dtype the slot does not take)."""
        if self._key in self._calls or not self._slot.put(shape, dtype, copy):
            return False
        self._calls[self._key] = 1
        return True

    def put_held(self, shape: tuple[int, ...], hold: Callable[[], Any],
                 to_numpy: ToNumpy) -> bool:
        """:meth:`put` of a tensor on a device: ``hold`` starts its copy to the host and
        returns what a writer thread waits on (``to_numpy``). False, with nothing done,
        where ``put`` must run, as for :meth:`put`, and for a gathered variable (its rows
        are placed in chunk memory by the writer's ``put``)."""
        slot = self._slot
        if self._key in self._calls or type(slot) is not QueuedSlot \
                or not slot.put_held(shape, hold, to_numpy):
            return False
        self._calls[self._key] = 1
        return True


def slot_for(writer: TraceWriter, name: str) -> Slot | None:
    """Variable ``name``'s slot, of the kind its gathering asks for; None for a variable
    not yet known, and for every variable until the writer's first batch has decided which
    are gathered (a slot taken earlier would be of the wrong kind for good: a backend keeps
    it)."""
    var = writer.variables.get(name)
    if var is None or not var.settled or not writer._gathering.chunks.decided:
        return None
    kind = QueuedSlot if var.gather is None else DirectSlot
    slot = writer._slots.get(name)
    if slot is None or type(slot) is not kind or slot.var is not var:
        slot = writer._slots[name] = kind(writer, var)
    return slot


def _claim(writer: TraceWriter, var: Variable, shape: tuple[int, ...], dtype: np.dtype
           ) -> tuple[np.ndarray, bool] | None:
    """The claimed chunk memory for ``shape`` the general way, and whether the tensor is
    shorter than it along a token axis; None where put() must decide."""
    batch = writer._current
    if var.gather is None or batch is None or writer._error is not None \
            or shape[0] != batch.size or len(shape) != len(var.dims):
        return None
    if var.growing is None:
        var.growing = tuple(grows(d) for d in var.dims[1:])
    short = False
    for dim, size, stored, growing in zip(var.dims[1:], shape[1:], var.trailing, var.growing,
                                          strict=True):
        if size != stored:
            if not growing or size > stored:
                return None
            short = True
        if growing and writer._lengths.setdefault(dim, size) != size:
            return None  # put() says why
    view = writer._gathering.view_now(batch, var, (batch.size, *var.trailing), dtype)
    return None if view is None else (view, short)
