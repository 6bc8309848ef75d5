"""The streaming writer: each forward pass appends one batch along ``batch``.

Backends hand tensors to :meth:`TraceWriter.put` from inside the model's forward. The tensor
is queued and the caller returns at once; worker threads copy it to host memory, compress it
and write it. A byte budget bounds what may wait in the queue, so memory stays flat whatever
the number of batches. A batch is committed (``committed_batches`` / ``committed_samples`` in
the group attributes, together with consolidated metadata) only after every chunk of it and
of all earlier batches is on disk (:mod:`.committing`); a reader never trusts rows past
that. Token axes may take a new length in every pass (:mod:`.growth`): longer passes grow
them, shorter ones are filled.
Small variables of a model traced at many sites are gathered into chunks of several batches,
written whole and committed in groups (:mod:`.gather`).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ._zarr_compat import create_array, grow_rows, set_attributes, set_bytes, set_shape
from .chunking import chunk_shape
from .chunkwrite import ChunkWriter, Entry, local_chunk_files
from .commit import array_document, batch_first, save_array_documents
from .committing import Commits, StepFailed
from .direct import Slot, slot_for
from .errors import CaptureError, SchemaError, WriterError
from .format import BATCH, STATUS_WRITING, StoreOptions
from .gather import GATHERED
from .gatherwrite import Flushes, GatheredWrites
from .growth import (
    check_lengths,
    cut_document,
    fill_value_for,
    grow_axis,
    grows,
    padded,
)
from .hostpool import HostPool
from .lock import adopt_lock
from .naming import DimRegistry, plain_role
from .region import Region
from .reopen import invalidate_uncommitted, load_variables
from .writerecords import Alloc, Batch, Snapshot, Task, ToNumpy, Variable, as_numpy

AUTO_BUDGET_MIN = 64 << 20
AUTO_BUDGET_MAX = 1 << 30
_STOP = object()
#: zarr writes every chunk it is given, fill values only or not, so that each chunk written
#: for a batch exists as a file the manifest can list
ARRAY_CONFIG = {"write_empty_chunks": True}
#: chunk files named c.<i>.<j>... side by side in the array's folder: a "/" separator would
#: create a folder per batch for every variable, which costs the writer more than the file
CHUNK_KEYS = {"name": "default", "separator": "."}


class TraceWriter:
    """Appends batches of named tensors to one Zarr v3 group, in the background."""

    def __init__(self, group: Any, options: StoreOptions, committed_samples: int = 0,
                 committed_batches: int = 0) -> None:
        self._lock = adopt_lock(group.store)  # one writer per store (core/lock.py)
        try:
            self._start(group, options, committed_samples, committed_batches)
        except BaseException:
            self._lock.release()
            raise

    def _start(self, group: Any, options: StoreOptions, committed_samples: int,
               committed_batches: int) -> None:
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.options = options
        self.dims = DimRegistry()
        self._rows = committed_samples
        self._batches = committed_batches
        self._open: dict[int, Batch] = {}
        #: each token axis's length in the current pass (see :mod:`.growth`)
        self._lengths: dict[str, int] = {}
        self._slots: dict[str, Slot] = {}  # direct_slot's, per variable
        self._current: Batch | None = None
        self._state_lock = threading.Lock()
        self._drained = threading.Condition(self._state_lock)
        self._create_lock = threading.Lock()
        #: variable name -> set once the thread creating its array is done
        self._creating: dict[str, threading.Event] = {}
        self._error: BaseException | None = None
        self._failed_step = self._failed_where = ""
        self._where = _store_name(group)
        # until the first batch has shown what one holds, the smallest budget: a first batch
        # of huge tensors (the attention maps of a long sequence) waits on the disk one
        # tensor at a time rather than queuing them all
        self._pool = HostPool(options.max_pending_bytes or AUTO_BUDGET_MIN)
        self._sizing_budget = options.max_pending_bytes is None  # until batch 1 ends
        # SimpleQueue: its put is one C call, so a KeyboardInterrupt cannot land while the
        # caller holds a lock the workers need (queue.Queue takes a Python-level Condition)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._files = local_chunk_files(group.store, options.direct_io, options.durable)
        self._gathering = GatheredWrites(self, committed_samples)  # see .gather
        self.variables: dict[str, Variable] = load_variables(group, self.dims, Variable,
                                                             ARRAY_CONFIG)
        self.commits = Commits(self, committed_batches, committed_samples,
                               self._token_lengths())
        self._invalidated = invalidate_uncommitted(self.variables, self._files,
                                                   committed_samples, options.durable)
        self._discarded_from: int | None = None
        self.attrs["status"] = STATUS_WRITING
        try:
            self.commits.write_root()
        except OSError as exc:
            raise WriterError(f"writing the trace failed at the commit that creates {self._where}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self._workers = [
            threading.Thread(target=self._work, name=f"layerscope-writer-{i}", daemon=True)
            for i in range(max(1, options.workers))
        ]
        for worker in self._workers:
            worker.start()

    # -- caller side -------------------------------------------------------------------------

    @property
    def batch_size(self) -> int | None:
        return self._current.size if self._current else None

    def begin_batch(self, size: int) -> None:
        self.raise_if_failed()
        if self._current is not None:
            raise CaptureError("begin_batch called twice without end_batch")
        if size < 1:
            raise CaptureError(f"a batch needs at least one sample, got {size}")
        if self._discarded_from is not None:
            self._forget_discarded()
        with self._state_lock:
            batch = Batch(self._batches, self._rows, size)
            self._open[batch.number] = batch
        if self._invalidated:  # listed in the manifest of the first batch appended
            entries, self._invalidated = self._invalidated, []
            self._record(batch, entries)
        self._batches += 1
        self._rows += size
        self._current = batch
        self._lengths = {}
        self.put(BATCH, np.arange(batch.start, batch.start + size, dtype=np.int64), ("batch",),
                 {"description": "global sample index across appends"})

    def put(self, name: str, data: Any, roles: tuple[str, ...], attrs: dict[str, Any],
            to_numpy: ToNumpy = as_numpy, snapshot: Snapshot | None = None,
            region: Region | None = None) -> None:
        """Queue ``data`` (batch axis first) as rows of the current batch of variable ``name``.

        With ``snapshot``, ``data`` is copied now, before the model can change it in place,
        preferably into reused memory of the writer's (see :class:`HostPool`), or straight
        into the chunk of a gathered variable (see :mod:`.gather`). With ``region``, ``data``
        is a piece of those rows (see :mod:`.region`); a variable may take several pieces in
        one batch, which must not overlap.
        """
        self.raise_if_failed()
        batch = self._current
        if batch is None:
            raise CaptureError("put called outside a batch; call begin_batch first")
        shape = tuple(int(n) for n in data.shape)
        if not shape or shape[0] != batch.size:
            raise CaptureError(
                f"{name}: leading axis {shape[:1]} is not the batch of {batch.size} samples; "
                "backends must move the batch axis first"
            )
        full = shape if region is None else (shape[0], *region.shape)
        var = self._variable(name, roles, full, attrs)
        if not var.settled:
            self._gathering.settle(var, batch, data, region)
        if region is not None:
            batch.pieces = True  # a discarded batch's pieces are invalidated (.reopen)
            if var.gather is not None:
                self._gathering.ungather(var)  # written in pieces: as every other variable
        if var.gather is not None:
            self._gathering.put(batch, var, data, to_numpy, snapshot)
            return
        if region is None and self._gathering.undecided(var, data):  # this batch decides
            self._gathering.stash_task(batch, var, data, to_numpy, snapshot)
            return
        task = self._hold(batch, var, data, to_numpy, snapshot)
        task.shape, task.region = var.trailing, region
        if self._sizing_budget:
            batch.nbytes += task.nbytes
        self._queue_task(task)

    def _task(self, batch: Batch, var: Variable, data: Any, to_numpy: ToNumpy,
              nbytes: int) -> Task:
        task = Task(batch, var, data, to_numpy, nbytes)
        task.shape = var.trailing
        return task

    def _queue_task(self, task: Task) -> None:
        with self._state_lock:
            task.batch.pending += 1
        self._queue.put(task)

    def direct_slot(self, name: str) -> Slot | None:
        """Variable ``name``'s short way in, for a backend that puts the same tensors pass
        after pass (see :mod:`.direct`); None where it is not known and settled yet."""
        return slot_for(self, name)

    def queue_copy(self, batch: Batch, var: Variable, shape: tuple[int, ...], dtype: np.dtype,
                   copy: Callable[[np.ndarray], Any]) -> None:
        """Queue the write of rows ``copy`` puts into pool memory of ``shape`` and ``dtype``:
        what :meth:`put` queues for a snapshot, once a :class:`.direct.QueuedSlot` checked
        them as ``put`` would."""
        def snapshot(_: Any, alloc: Alloc) -> np.ndarray:
            memory = alloc(shape, dtype)
            copy(memory)
            return memory

        task = self._hold(batch, var, None, as_numpy, snapshot)
        task.shape = var.trailing
        self._queue_task(task)

    def queue_held(self, batch: Batch, var: Variable, held: Any, to_numpy: ToNumpy) -> None:
        """Queue the write of rows a writer thread waits for (``to_numpy``: a copy off a
        device): what :meth:`put` queues for a snapshot that took no pool memory, once a
        :class:`.direct.QueuedSlot` checked them as ``put`` would."""
        task = self._hold(batch, var, held, to_numpy, None)
        task.shape = var.trailing
        self._queue_task(task)

    def declare(self, name: str, roles: tuple[str, ...], shape: tuple[int, ...],
                attrs: dict[str, Any]) -> None:
        """Register variable ``name`` of ``shape`` (batch first) in the current batch before
        its data comes in pieces (``put(..., region=...)``): its dims and its ``order``."""
        self.raise_if_failed()
        if self._current is None:
            raise CaptureError("declare called outside a batch; call begin_batch first")
        self._variable(name, roles, shape, attrs)

    def limit_pending(self, nbytes: int | None) -> None:
        """Let :meth:`put` wait once more than ``nbytes`` are queued (and keep no more than
        that in reused buffers), whatever the budget, until called with None. For a caller
        that streams one long pass in pieces (a traced ``generate()``): under the budget, a
        writer slower than the model would queue pieces until the budget is full, and the
        pool would keep that much memory for reuse until the trace ends."""
        self._pool.set_cap(nbytes)

    def _hold(self, batch: Batch, var: Variable, data: Any, to_numpy: ToNumpy,
              snapshot: Snapshot | None) -> Task:
        """The task for ``data``, its bytes counted against the budget (waiting for room)."""
        if snapshot is None:
            nbytes = _nbytes(data)
            self._pool.acquire(nbytes)
            return Task(batch, var, data, to_numpy, nbytes)
        taken: list[np.ndarray] = []

        def alloc(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            if taken:
                raise CaptureError("a snapshot takes one buffer")
            return self._pooled(tuple(shape), np.dtype(dtype), taken)

        try:
            held = snapshot(data, alloc)
        except BaseException:
            for buffer in taken:
                self._pool.give(buffer)
            raise
        if taken:
            return Task(batch, var, held, to_numpy, taken[0].nbytes, taken[0])
        nbytes = _nbytes(held)
        self._pool.acquire(nbytes)
        return Task(batch, var, held, to_numpy, nbytes)

    def _pooled(self, shape: tuple[int, ...], dtype: np.dtype,
                taken: list[np.ndarray]) -> np.ndarray:
        """Pool memory for a snapshot of ``shape`` and ``dtype``; its buffer is added to
        ``taken`` (given back to the pool if the snapshot fails)."""
        buffer = self._pool.take(math.prod(shape) * dtype.itemsize)
        taken.append(buffer)
        return buffer.view(dtype).reshape(shape)

    def end_batch(self) -> None:
        batch = self._current
        if batch is None:
            return
        batch.lengths = self._token_lengths()
        self._gathering.end_batch(batch)
        if self._sizing_budget:
            self._sizing_budget = False
            self._pool.limit = min(max(batch.nbytes, AUTO_BUDGET_MIN), AUTO_BUDGET_MAX)
        with self._state_lock:
            batch.ended = True
            ready = batch.pending == 0
        self._current = None
        if self._gathering.chunks.holding and self._gathering.close_chunks(self._rows):
            ready = True
        if ready:
            self.commits.ready()
        self.raise_if_failed()

    def discard_batch(self) -> None:
        """Forget the current batch (its forward pass failed): its rows are given back."""
        batch = self._current
        self._current = None
        if batch is None:
            return
        with self._state_lock:  # the C lock, not the Condition: see HostPool.lock
            batch.size = -1  # workers skip what is still queued for it
            # wait only for writes already under way: workers keep this count, never the
            # caller, so an interrupt in the caller (Ctrl-C anywhere in put) cannot leave it
            # counting a task that will never run
            self._drained.wait_for(lambda: batch.writing == 0)
            self._open.pop(batch.number, None)
        self._gathering.discard(batch)
        self._batches -= 1
        self._rows = batch.start
        if batch.wrote and batch.pieces:  # its pieces must not show where the next skips
            self._discarded_from = batch.start

    def _forget_discarded(self) -> None:
        """Make the rows a discarded batch wrote read as fill values again, once the batches
        before it are written (they may share its first chunk)."""
        with self._state_lock:
            self._drained.wait_for(lambda: all(b.pending == 0 for b in self._open.values()))
        start, self._discarded_from = self._discarded_from, None
        if start is not None:
            self._invalidated += invalidate_uncommitted(self.variables, self._files, start,
                                                        self.options.durable)

    def raise_if_failed(self) -> None:
        error = self._error
        if error is not None:
            raise WriterError(
                f"writing the trace failed at the {self._failed_step} of {self._failed_where}: "
                f"{type(error).__name__}: {error}; the batches committed before it are intact"
            ) from error

    @property
    def failed(self) -> bool:
        return self._error is not None

    def close(self) -> None:
        """Wait for every queued write, commit, and stop the workers."""
        if self._files is not None:  # the chunks left are waited for: see ChunkFiles.cached
            self._files.cached = True
        try:
            batch = self._current
            if batch is not None:
                batch.lengths = self._token_lengths()
                if self._gathering.stash:
                    self._gathering.decide(batch)
                with self._state_lock:
                    batch.ended = True
                self._current = None
            if self._gathering.chunks.holding:  # the last chunks, with the rows they have
                self._gathering.close_chunks(None)
        finally:
            for _ in self._workers:
                self._queue.put(_STOP)
            for worker in self._workers:
                worker.join()
            if self._gathering.process is not None:
                self._gathering.process.close()
        self._pool.clear()
        self._gathering.chunks.drop_all()
        self.commits.ready(final=True)
        if self._error is None:
            try:
                self._save_array_metadata()
            except BaseException as exc:
                self._fail("close", exc, self._where)
        self.raise_if_failed()

    def release(self) -> None:
        """Let another writer have the store (after :meth:`close` and the final status)."""
        self._lock.release()

    def _fail(self, step: str, error: BaseException, where: str) -> None:
        """Record the first failure (raised in the caller) and let a waiting caller through."""
        if self._error is None:
            self._failed_step, self._failed_where, self._error = step, where, error
        self._pool.break_()
        self._gathering.notify()

    def update_attrs(self, name: str, attrs: dict[str, Any]) -> None:
        """Add attributes to variable ``name`` (published with the next commit); those it has
        already keep their values, as its attributes from its creation do."""
        var = self.variables.get(name)
        if var is None or all(key in var.attrs for key in attrs):
            return
        with self._create_lock:
            var.attrs = {**attrs, **var.attrs}
            if var.array is not None:
                with var.lock:
                    set_attributes(var.array, var.attrs)
                    var.document = array_document(var.array)

    def _token_lengths(self) -> dict[str, int]:
        return {dim: size for dim, size in self.dims.sizes.items() if grows(dim)}

    def set_attrs(self, **attrs: Any) -> None:
        """Update group attributes, published together with the committed metadata."""
        self.commits.set_attrs(attrs)

    # -- variables ---------------------------------------------------------------------------

    def _variable(self, name: str, roles: tuple[str, ...], shape: tuple[int, ...],
                  attrs: dict[str, Any]) -> Variable:
        var = self.variables.get(name)
        if var is None:
            dims = self.dims.resolve(roles, shape, self._lengths)
            growth = {d: n for d, n in zip(dims[1:], shape[1:], strict=True)
                      if grows(d) and n > self.dims.sizes[d]}
            self._grow(growth)
            attrs = {**attrs, "roles": [plain_role(r) for r in roles],
                     "order": len(self.variables)}
            # stored at the longest length seen: a shorter tensor is filled
            trailing = tuple(self.dims.sizes[d] for d in dims[1:])
            var = Variable(name, dims, trailing, attrs)
            with self._create_lock:  # a later growth finds it
                self.variables[name] = var
        else:
            self._grow(check_lengths(name, var.dims, var.trailing, shape, self._lengths))
        return var

    def _grow(self, growth: dict[str, int]) -> None:
        """Lengthen token axes for a longer pass: every variable with the dim grows with it."""
        if not growth:
            return
        with self._create_lock:  # no array is created, nor metadata published, half-grown
            for dim, size in growth.items():
                self.dims.sizes[dim] = size
                grow_axis(self.variables.values(), dim, size)
        for var in self.variables.values():  # chunks in memory take the grown shape too
            if var.gather is not None and var.gather.chunks:
                self._gathering.chunks.regrow(var)

    def _create_array(self, var: Variable, sample: np.ndarray,
                      region: Region | None = None) -> Any:
        """Create ``var``'s array and write its ``zarr.json``.

        The file is written outside ``_create_lock``: at a close that creates a thousand
        arrays, the two writer threads make their folders and files side by side instead of
        one waiting for the other's disk. Its shape is a placeholder either way (the close
        writes each array's own ``zarr.json`` with the committed rows); what commits publish
        is ``var.document``, set only once the file exists. One thread creates an array: a
        second writing the file too could leave other codecs there than the published ones
        (each decides compression on its own batch).
        """
        while True:  # one thread creates it; another that needs it meanwhile waits
            with self._create_lock:
                if var.array is not None:
                    return var.array
                creating = self._creating.get(var.name)
            if creating is None:
                creating = self.claim_creation(var)
                if creating is not None:
                    break
            else:
                creating.wait()  # then it exists, or its creation failed: try again
        try:
            made = self.new_array(var, sample, region)
            for key, data in made.documents:
                self.write_document(key, data)
            return self.publish_array(var, made)
        finally:
            self.end_creation(var, creating)

    def claim_creation(self, var: Variable) -> threading.Event | None:
        """Make this thread the one that creates ``var``'s array: the event others wait on
        until :meth:`end_creation`. None where it exists or another thread creates it."""
        with self._create_lock:
            if var.array is not None or var.name in self._creating:
                return None
            creating = self._creating[var.name] = threading.Event()
            return creating

    def end_creation(self, var: Variable, creating: threading.Event) -> None:
        with self._create_lock:
            del self._creating[var.name]
        creating.set()

    def new_array(self, var: Variable, sample: np.ndarray, region: Region | None = None
                  ) -> NewArray:
        """``var``'s array, made in memory by the thread that claimed its creation; its
        ``zarr.json`` still to write (``documents``), except for text arrays (zarr's own
        path writes it)."""
        batches = var.attrs.get(GATHERED, 1) if var.gather is not None else 1
        # a gathered chunk holds several batches: compression is decided on the first one, as
        # for every other variable (repeated inputs would make the whole chunk look compressible)
        codecs = self.options.compression.codecs_for(sample[:max(1, len(sample) // batches)])
        documents: list[tuple[str, bytes]] = []
        with self._create_lock:
            shape = (0, *var.trailing)
            chunks = chunk_shape(shape, var.dims, sample.dtype.itemsize, sample.shape[0],
                                 self.options.chunks, region.chunks if region else None)
            if var.gather is not None:  # several batches a chunk, whatever the size policy
                chunks = (var.gather.rows, *chunks[1:])
            kind = sample.dtype.kind
            fill = fill_value_for(sample.dtype)
            dtype: Any = str if kind in "UTO" else sample.dtype
            if kind in "UTO":  # zarr's own path, which writes the file itself, here
                write = self._files.document if self._files else None
            else:
                def write(key: str, data: bytes) -> None:
                    documents.append((key, data))
            attributes = var.attrs
            array, document = create_array(
                self.group, var.name, write,
                shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=codecs,
                chunk_key_encoding=CHUNK_KEYS, dimension_names=list(var.dims),
                attributes=attributes, config=ARRAY_CONFIG,
            )
        return NewArray(array, document, attributes, documents)

    def write_document(self, key: str, data: bytes) -> None:
        if self._files is not None:
            self._files.document(key, data)
        else:
            set_bytes(self.group.store, key, data)

    def publish_array(self, var: Variable, made: NewArray,
                      chunk_writer: ChunkWriter | None = None) -> Any:
        """Make ``var``'s array, its ``zarr.json`` written, the one commits publish; what a
        token axis's growth or an attribute update changed meanwhile applied to it first."""
        array, document = made.array, made.document
        with self._create_lock:
            # text arrays too, whose zarr.json zarr wrote itself: readers take the shape
            # from the published document, which must agree with every other variable's
            if tuple(array.shape[1:]) != var.trailing:  # an axis grew meanwhile
                set_shape(array, (0, *var.trailing))
                document = array_document(array)
            if var.attrs is not made.attributes:  # update_attrs meanwhile
                set_attributes(array, var.attrs)
                document = array_document(array)
            if chunk_writer is not None:
                var.chunk_writer = chunk_writer
                self.commits.synced.add(var.name)
            if document is made.document and made.documents:  # its zarr.json: that text
                self.commits.entries.seed(var.name, document, made.documents[0][1].decode())
            var.array, var.document = array, document
            return array

    def chunk_writer(self, var: Variable) -> ChunkWriter:
        """``var``'s chunk writer, made at its first chunk (with ``var.lock`` held)."""
        if var.chunk_writer is None:
            var.chunk_writer = ChunkWriter(var.array, self._files)
            self.commits.synced.add(var.name)
        return var.chunk_writer

    def _save_array_metadata(self) -> None:
        """Write each array's own ``zarr.json`` with the committed rows.

        Readers take shapes from the consolidated metadata of each commit (cut to the committed
        rows), so while writing, arrays grow only for zarr's own writes of partial chunks, in
        memory where zarr allows it (whole chunks are written without zarr looking at the
        shape), doubling to do it rarely; their own ``zarr.json`` gets the length once, here,
        from the document each commit publishes (no zarr call per array), as the text the
        last commit encoded it to where it can (a thousand arrays' JSON took tens of ms).
        """
        documents: dict[str, dict[str, Any] | str] = {}
        rows = self.commits.samples
        for var in self.variables.values():
            if var.document is not None:
                doc = cut_document(var.document, self.commits.published_lengths)
                documents[var.name] = self.commits.entries.entry(var.name, doc, rows) \
                    if batch_first(doc) else {**doc, "shape": [rows, *doc["shape"][1:]]}
        save_array_documents(self.group, documents, self.options.durable)

    # -- worker side -------------------------------------------------------------------------

    def _work(self) -> None:
        """A worker: nothing it meets ends it but the stop mark, and every failure is
        recorded for the caller (a dead worker would leave the caller waiting for room)."""
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, Flushes):
                    self._gathering.run_flushes(item)
                else:
                    self._run(item)
            except BaseException as exc:  # the bookkeeping itself failed
                self._fail("chunk write", exc, self._where)

    def _run(self, task: Task) -> None:
        batch = task.batch
        with self._state_lock:
            run = self._error is None and batch.size > 0
            if run:
                batch.writing += 1
                batch.wrote = True
            elif batch.size > 0:
                batch.failed = True  # skipped after a failure: never committed
        ok = False
        try:
            if run:
                self._write(task)
                ok = True
        except StepFailed as exc:
            batch.failed = True
            self._fail(exc.step, exc.error, exc.where)
        except BaseException as exc:  # surfaces in the caller at the next call
            batch.failed = True
            self._fail("chunk write", exc, f"{self._where}/{task.var.name}")
        finally:
            task.data = None  # drop views of the buffer before it is reused
            if task.buffer is not None:
                self._pool.give(task.buffer)
            else:
                self._pool.release(task.nbytes)
            if run:
                with self._drained:
                    batch.writing -= 1
                    self._drained.notify_all()
            self.commits.task_done(batch, durable=self._gathering.task_done(task, ok))

    def _write(self, task: Task) -> None:
        var = task.var
        if task.parts is not None:  # a gathered variable's rows: into its chunk in memory
            self._gathering.place(task, self._to_host(task))
            return
        if task.chunk is not None:  # a gathered chunk, whole: its rows and fill values
            data, start = self._gathering.chunk_data(task), task.chunk.start
        else:
            data = self._to_host(task)
            start = task.batch.start
        if var.array is None:
            try:
                self._create_array(var, data, task.region)
            except BaseException as exc:
                raise StepFailed("array creation", exc, f"{self._where}/{var.name}") from exc
        array = var.array
        if data.dtype.kind in "UTO":
            data = data.astype(str)
        elif array.dtype != data.dtype:
            raise SchemaError(
                f"{var.name}: dtype {data.dtype} differs from the stored {array.dtype}; "
                "append data of the same dtype or write a new store"
            )
        stop = start + data.shape[0]
        entries: list[Entry] | None = [] if self.options.checksums else None
        region = task.region
        if region is None:
            # a pass shorter than the stored token axes: filled past its own length
            data = padded(data, task.shape, array.fill_value)
        with var.lock:
            writer = self.chunk_writer(var)
            self._gathering.fill_written(task, writer)
            offset = region.offset if region else None
            if not writer.covers(start, data, offset):
                if array.shape[0] < stop:  # zarr checks the bounds of what it writes
                    grow_rows(array, max(stop, 2 * array.shape[0]))
                # partial chunks: zarr reads, merges and rewrites; only the positions this
                # batch fills (an axis grown since by a later pass is that pass's to commit)
                extent = tuple(int(n) for n in data.shape[1:]) if region else task.shape
                where = region.slices(extent) if region else tuple(slice(0, n) for n in extent)
                array[(slice(start, stop), *where)] = data
                if entries is not None or self.options.durable:
                    for key in writer.keys(start, stop, extent, offset):  # read back zarr's
                        entry = writer.read_back(key, self.options.durable)
                        if entry is not None and entries is not None:
                            entries.append(entry)
                self._record(task.batch, entries)
                return
        # whole chunks nobody else writes; one that holds committed rows is replaced whole
        chunk = task.chunk
        writer.write(start, data, entries, offset, replace=chunk is not None and chunk.existing,
                     used=chunk.used if chunk is not None else None)
        self._record(task.batch, entries)

    def _record(self, batch: Batch, entries: list[Entry] | None) -> None:
        """Note the chunk files written for ``batch``; an open batch that wrote one of them
        earlier gets its new bytes too (its manifest must describe the file as it is)."""
        if not entries:
            return
        with self._state_lock:
            for key, nbytes, crc in entries:
                batch.chunks[key] = (nbytes, crc)
                for other in self._open.values():
                    if other is not batch and key in other.chunks:
                        other.chunks[key] = (nbytes, crc)

    def _stored_dtype(self, dtype: np.dtype) -> np.dtype:
        target = self.options.downcast
        if target and dtype.kind == "f" and dtype != np.dtype(target):
            return np.dtype(target)
        return dtype

    def _stored(self, data: np.ndarray) -> np.ndarray:
        """Host data as it is stored: down-cast on request, contiguous."""
        target = self._stored_dtype(data.dtype)
        if target != data.dtype:
            data = data.astype(target)
        return np.ascontiguousarray(data)

    def _to_host(self, task: Task) -> np.ndarray:
        return self._stored(task.to_numpy(task.data))

    @property
    def committed(self) -> tuple[int, int]:
        """(batches, samples) the root document commits: a batch whose chunks were written
        but whose manifest was not, because a failure came first, is not among them."""
        return self.commits.published, self.commits.published_samples


class NewArray(NamedTuple):
    """An array made in memory (:meth:`TraceWriter.new_array`), not yet published."""

    array: Any
    document: dict[str, Any]
    attributes: dict[str, Any]  # ``var.attrs`` as it was: an update since is applied
    documents: list[tuple[str, bytes]]  # (key, bytes) of the files still to write


def _store_name(group: Any) -> str:
    root = getattr(group.store, "root", None)
    name = str(root) if root is not None else str(group.store)
    return f"{name}/{group.path}" if group.path else name


def _nbytes(data: Any) -> int:
    nbytes = getattr(data, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    count = 1
    for size in data.shape:
        count *= int(size)
    return count * 4
