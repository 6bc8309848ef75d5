"""The writer's side of gathering (see :mod:`.gather`): which variables are gathered, how a
put reaches its chunk in memory, and when chunks are closed, written and committed.

Calls come from :class:`.writer.TraceWriter` at four points: each ``put`` of a gathered (or
still undecided) variable, each batch end, a discarded batch, and the close; writer threads
report placements and flushes done through :meth:`GatheredWrites.task_done`.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import chunkproc
from ._zarr_compat import grow_rows
from .chunkproc import (
    CACHED_CHUNK,
    CHUNK,
    CREATE_REQUEST_CHUNKS,
    DOCUMENT,
    DOCUMENT_NEW_FOLDER,
    PROCESS_FROM,
    REQUEST_CHUNKS,
    ChunkProcess,
    ChunkWriteFailed,
)
from .chunkwrite import ChunkWriter
from .direct import DirectSlot
from .errors import CaptureError, SchemaError
from .gather import GATHERED, Chunk, Gatherer, VarGather

if TYPE_CHECKING:
    from .chunkwrite import Entry
    from .region import Region
    from .writer import NewArray, TraceWriter
    from .writerecords import Batch, Snapshot, Task, ToNumpy, Variable


class GatheredWrites:
    """One writer's gathering: its :class:`.gather.Gatherer` and the first batch's stash."""

    def __init__(self, writer: TraceWriter, committed_samples: int) -> None:
        self.writer = writer
        self.policy = writer.options.gathering
        self.chunks = Gatherer(self.policy, committed_samples)
        #: the first batch's small tensors, waiting for the decision to gather
        self.stash: list[Task] = []
        self.stash_bytes = 0
        #: the chunks of the last group queued as one task, some perhaps still to write
        self.flushing: Flushes | None = None
        files = writer._files
        #: where a group's chunk files are written by a process of their own (local stores)
        self.process = ChunkProcess(files.direct, files.durable) \
            if files is not None and writer.options.chunk_process and chunkproc.available() \
            else None

    # -- which variables ---------------------------------------------------------------------

    def is_small(self, data: Any, nbytes: int) -> bool:
        kind = getattr(getattr(data, "dtype", None), "kind", "f")
        return self.policy.enabled and nbytes <= self.policy.below and kind not in "UTOSV"

    def undecided(self, var: Variable, data: Any) -> bool:
        """Whether ``var`` waits for the end of this writer's first batch (see :meth:`decide`)."""
        return not self.chunks.decided and var.array is None \
            and self.is_small(data, _nbytes(data))

    def settle(self, var: Variable, batch: Batch, data: Any, region: Region | None) -> None:
        """Decide once per writer whether ``var`` is gathered: a new small variable once the
        first batch chose to gather, an existing one whose chunks hold two batches or more;
        never one written in pieces (``region``, :mod:`.region`)."""
        var.settled = True
        if region is not None:
            return
        if var.array is not None:
            rows = int(var.array.metadata.chunk_grid.chunk_shape[0])
            if rows >= 2 * batch.size and self.is_small(var.array, _nbytes(data)):
                var.gather = VarGather(rows)
                var.gather.accepts(var.array.dtype)
                self._preload(var)
        elif self.chunks.decided and self.chunks.group_batches > 1 \
                and self.is_small(data, _nbytes(data)):
            self._gathered(var, self.chunks.group_batches, batch)

    @staticmethod
    def _gathered(var: Variable, batches: int, batch: Batch) -> None:
        """Gather new variable ``var``: chunks of ``batches`` batches like ``batch``; its
        attribute ``gathered_batches`` says so to readers (:func:`.reader.open_trace` gives
        it the dask chunks of one batch where other variables have those)."""
        var.gather = VarGather(batches * batch.size)
        var.attrs = {**var.attrs, GATHERED: batches}

    def _preload(self, var: Variable) -> None:
        """The committed rows of the chunk this writer's first rows fall into, read back:
        the chunk is written whole again, in one step (it holds committed rows)."""
        assert var.gather is not None
        committed = self.writer.commits.samples
        start = committed // var.gather.rows * var.gather.rows
        if start == committed:
            return
        if var.array.shape[0] < committed:
            grow_rows(var.array, committed)
        kept = np.asarray(var.array[start:committed])
        parts = self.chunks.pieces(var, start, committed)
        parts[0][0].existing = True
        self.chunks.place(var, parts, kept)
        parts[0][0].written.append(parts[0][1:])

    # -- puts --------------------------------------------------------------------------------

    def put(self, batch: Batch, var: Variable, data: Any, to_numpy: ToNumpy,
            snapshot: Snapshot | None) -> None:
        """Copy ``data`` into ``var``'s chunk in memory now where it can be; a device copy
        (or other data a writer thread must wait for) is placed there by a writer thread."""
        writer, chunks = self.writer, self.chunks
        start, stop = batch.start, batch.start + batch.size
        if snapshot is not None:
            direct: list[np.ndarray] = []
            taken: list[np.ndarray] = []

            def alloc(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
                if direct or taken:
                    raise CaptureError("a snapshot takes one buffer")
                view = self.view_now(batch, var, tuple(shape), np.dtype(dtype))
                if view is not None:
                    direct.append(view)
                    return view
                return writer._pooled(tuple(shape), np.dtype(dtype), taken)

            try:
                data = snapshot(data, alloc)
            except BaseException:
                for buffer in taken:
                    writer._pool.give(buffer)
                for view in direct:  # claimed, never copied: reads as the fill value
                    view[...] = var.gather.fill if var.gather else 0
                raise
            if direct:
                return
            try:
                if taken and self.place_now(var, start, stop, data):
                    return
            finally:
                for buffer in taken:
                    writer._pool.give(buffer)
            if taken:
                data = np.array(data)  # placed by a writer thread, which reports the dtype
        elif isinstance(data, np.ndarray) and self.place_now(var, start, stop, data):
            return
        nbytes = _nbytes(data)
        writer._pool.acquire(nbytes)
        task = writer._task(batch, var, data, to_numpy, nbytes)
        task.parts = chunks.claim(var, start, stop, deferred=True)
        writer._queue_task(task)

    def view_now(self, batch: Batch, var: Variable, shape: tuple[int, ...],
                 dtype: np.dtype) -> np.ndarray | None:
        """The chunk memory ``batch``'s rows of gathered ``var`` go to, claimed, for a tensor
        of ``shape`` and ``dtype`` to be copied into now; None where it cannot (see
        :meth:`.Gatherer.view`; a dtype stored as another)."""
        if self.writer._stored_dtype(dtype) != dtype:
            return None
        return self.chunks.view(var, batch.start, batch.start + batch.size, shape, dtype)

    def ungather(self, var: Variable) -> None:
        """``var`` is written in pieces from now on (a traced ``generate()`` appending to a
        store where it was gathered): its open chunks are written now, whole, on the
        caller's thread, and its later rows take the way of every other variable."""
        assert var.gather is not None
        writer, chunks = self.writer, self.chunks
        for chunk in sorted(var.gather.chunks.values(), key=lambda c: c.start):
            chunks.wait(lambda chunk=chunk: chunk.deferred == 0)
            chunks.forget(var, chunk)
            if chunk.first is not None and writer._current is not None:
                task = writer._task(writer._current, var, None, _identity, 0)
                task.chunk = chunk
                writer._write(task)
            chunks.recycle(chunk)
        var.gather = None

    def place_now(self, var: Variable, start: int, stop: int, data: np.ndarray) -> bool:
        """Copy host ``data`` into the chunk memory now; False where its dtype is not the
        stored one (a writer thread then reports it)."""
        assert var.gather is not None
        host = self.writer._stored(data)
        if not var.gather.accepts(host.dtype):
            return False
        self.chunks.place(var, self.chunks.claim(var, start, stop, deferred=False), host)
        return True

    def place(self, task: Task, data: np.ndarray) -> None:
        """A writer thread's placement of ``task``'s host data into its claimed chunks."""
        var = task.var
        assert var.gather is not None and task.parts is not None
        if not var.gather.accepts(data.dtype):
            raise SchemaError(f"{var.name}: dtype {data.dtype} differs from the stored "
                              f"{var.gather.dtype}; append data of the same dtype or write a "
                              "new store")
        self.chunks.place(var, task.parts, data)

    def stash_task(self, batch: Batch, var: Variable, data: Any, to_numpy: ToNumpy,
                   snapshot: Snapshot | None) -> None:
        """Hold a small tensor of this writer's first batch until the batch ends and decides
        whether small variables are gathered. Held in memory of its own, outside the host
        budget (the batch's other tensors must not wait for it), at most a quarter of the
        gathering memory: past that, gathering would not pay and is decided against now."""
        if snapshot is not None:
            data = snapshot(data, lambda shape, dtype: np.empty(shape, dtype))
        task = self.writer._task(batch, var, data, to_numpy, 0)
        self.stash.append(task)
        self.stash_bytes += _nbytes(data)
        if self.stash_bytes > self.policy.memory // 4:
            self.decide(batch)

    def decide(self, batch: Batch) -> None:
        """At the end of this writer's first batch: gather its small variables, or write
        them as every other variable (too few of them, or too little memory to gain)."""
        stash, self.stash = self.stash, []
        small, self.stash_bytes = self.stash_bytes, 0
        batches = self.policy.group_batches(small, len(stash))
        self.chunks.decided, self.chunks.group_batches = True, batches
        if batches > 1 and len(stash) >= PROCESS_FROM and self.process is not None:
            self.process.start()  # its interpreter starts while the first group fills
            if self.process.arena is not None:  # it reads the chunks where they lie
                self.chunks.allocate = self.process.arena.take
        for task in stash:
            task.var.settled = True
            if batches < 2:
                self.writer._queue_task(task)
                continue
            var = task.var
            self._gathered(var, batches, batch)
            host = self.writer._to_host(task)
            task.data = None
            if not self.place_now(var, batch.start, batch.start + batch.size, host):
                raise SchemaError(f"{var.name}: dtype {host.dtype} cannot be stored")

    def discard(self, batch: Batch) -> None:
        self.stash, self.stash_bytes = [], 0
        self.chunks.unclaim(batch.start)

    # -- chunks closed, written, committed ---------------------------------------------------

    def end_batch(self, batch: Batch) -> None:
        """The model's side of a batch end, before the batch counts as ended."""
        if self.stash or not self.chunks.decided:
            self.decide(batch)

    def close_chunks(self, upto: int | None) -> bool:
        """Close the gathered chunks that end by row ``upto`` (None: all, at the close) and
        queue their flushes; then wait while an earlier group is still being written or
        committed, so that at most two groups of chunks are in memory and a crash loses at
        most two groups. True when rows became durable at once (nothing to write for them):
        they may be committed now."""
        writer, chunks = self.writer, self.chunks
        durable, previous = chunks.durable, chunks.latest
        group, closed = chunks.close_through(upto, writer._rows)
        if group is not None and closed:
            with writer._state_lock:
                # the manifest of the last batch this group commits lists the chunks; that
                # of the batch across the group's end where none ends before it
                candidates = [b for b in writer._open.values()
                              if b.ended and b.start + b.size <= group.rows] \
                    or list(writer._open.values())
                manifest = max(candidates, key=lambda b: b.number) if candidates else None
                if manifest is not None:
                    manifest.pending += len(closed)
                    if manifest.ended and manifest.start + manifest.size <= group.rows:
                        group.commits = manifest.start + manifest.size
                    chunks.latest = group
            if manifest is None:  # no batch is open: nothing of this writer's is in them
                for _, chunk in closed:
                    chunks.recycle(chunk)
                    chunks.finished(group, True)
            else:
                self.queue_flushes(chunks.seal(closed, group, manifest))
        # no model runs now: every thread helps; not where arrays are made, which is Python's
        # work: one thread makes them while the process writes their files
        if upto is None and self.flushing is not None and self.flushing.chunks \
                and not self.flushing.creating:
            for _ in self.writer._workers[1:]:
                self.writer._queue.put(self.flushing)
        target = previous.commits if previous is not None and upto is not None and closed else 0
        chunks.wait(lambda: (chunks.in_flight_locked() <= (1 if upto is not None else 0)
                             and writer.commits.root_samples >= target)
                    or writer._error is not None)
        if upto is not None and closed and writer._error is None:
            self._open_next(closed)
        return not closed and chunks.durable > durable

    def _open_next(self, closed: list[tuple[Variable, Chunk]]) -> None:
        """Open the chunks after those just closed for the variables the direct way put
        them in, and hand them to their slots, here at the batch end (the memory of the
        group written before is free now): the next batch's rows then take the direct way
        too. Met one by one as that batch reaches them, the general way took 28 us a
        variable of the model's thread, 45 ms a group of a model traced at 1,601 modules
        (benchmarks/README.md, "Many captured sites")."""
        slots, chunks = self.writer._slots, self.chunks
        for var, chunk in closed:
            slot = slots.get(var.name)
            if type(slot) is DirectSlot and slot.var is var and var.gather is not None \
                    and slot.follows(chunk):
                slot.remember(chunks.open_next(var, chunk))

    def queue_flush(self, var: Variable, chunk: Chunk) -> None:
        self.writer._queue.put(self.flush_task(var, chunk))

    def queue_flushes(self, ready: list[tuple[Variable, Chunk]]) -> None:
        """Queue the flushes of a group's chunks as one task for one writer thread: a group
        of a model traced at many sites has thousands of chunks, and a task each woke the
        writer threads a thousand times while the model thread made them; two threads
        writing them held Python's lock against the model's thread twice as often (a group
        end took 0.5 s of the model's time, against 0.1 s with one). At the close the other
        threads join in (:meth:`close_chunks`). Where arrays are still to be created (the
        first group), their files go to the chunk process too (:meth:`_new_array_jobs`);
        without it, each chunk is a task of its own."""
        creating = any(var.chunk_writer is None for var, _ in ready)
        if creating and (self.process is None or len(ready) < PROCESS_FROM):
            for var, chunk in ready:
                self.queue_flush(var, chunk)
        elif ready:
            self.flushing = Flushes(ready, creating)
            self.writer._queue.put(self.flushing)

    def run_flushes(self, flushes: Flushes) -> None:
        """A writer thread's task: a group's flushes. The usual chunk (its array and chunk
        writer made, whole, holding no committed rows) is written here, the bookkeeping done
        once for all of them: per chunk, the general task's locks and notices held Python's
        lock long enough, a thousand times a group, to slow the model's thread by as much.
        Any other chunk, and every chunk after a failure, goes the general way."""
        writer, group, batch = self.writer, flushes.group, flushes.batch
        with writer._state_lock:  # as a general task counts itself (a discard waits for it)
            plain = writer._error is None and batch.size > 0
            if plain:
                batch.writing += 1
                batch.wrote = True
        done: list[Chunk] = []
        entries: list[Entry] | None = [] if writer.options.checksums else None
        try:
            chunks: Iterable[tuple[Variable, Chunk]] = flushes.take()
            if plain and self.process is not None and not flushes.by_process \
                    and len(flushes.chunks) >= flushes.process_from:
                flushes.by_process = True  # a thread that joins writes its own share
                chunks = chain(self._write_in_process(self.process, flushes, entries, done),
                               flushes.take())
            for var, chunk in chunks:
                whole = self._whole_chunk(var, chunk, batch) if plain else None
                if whole is None:
                    writer._run(self.flush_task(var, chunk))
                    continue
                try:
                    with var.lock:
                        whole[0].write(chunk.start, whole[1], entries, used=chunk.used)
                except BaseException as exc:
                    self._flush_failed(var, chunk, flushes, exc)
                    continue
                done.append(chunk)
        finally:
            durable = False
            if done:
                writer._record(batch, entries)
                for chunk in done:
                    self.chunks.recycle(chunk)
                durable = self.chunks.finished(group, True, len(done))
            if plain:
                with writer._drained:
                    batch.writing -= 1
                    writer._drained.notify_all()
            if done:
                writer.commits.task_done(batch, len(done), durable)

    def _write_in_process(self, process: ChunkProcess, flushes: Flushes,
                          entries: list[Entry] | None, done: list[Chunk]
                          ) -> list[tuple[Variable, Chunk]]:
        """Write the group's usual chunks (stored as their own memory) by the chunk-writing
        process, :data:`REQUEST_CHUNKS` a request, until the chunks run out, a request finds
        none it can take, or one fails; the arrays they need made here first, their
        ``zarr.json`` written by the process too. Where arrays are made, each request is
        made and sent while the process writes the one before (at a close that creates a
        thousand arrays, making them is Python's work and writing their files the
        process's: side by side; see :class:`Flushes`). Returns the chunks taken but not
        sent, and those after a failed one, for :meth:`run_flushes`'s usual way (which then
        takes whatever is left). Other threads may take chunks meanwhile: at the close every
        writer thread writes a share of a group whose arrays exist (:meth:`close_chunks`)."""
        rest: list[tuple[Variable, Chunk]] = []
        sent: deque[_Request] = deque()
        with process.lock:
            try:
                ok = True
                while ok:
                    taken = list(islice(flushes.take(), flushes.request_chunks))
                    request = self._request(taken, flushes, rest)
                    if not request.jobs:
                        self._end_creations(request)
                        if taken and flushes.creating:  # compressed: made, written below
                            continue
                        break  # none left, or compressed: every thread may take a share
                    try:
                        process.send(request.jobs)
                    except ChunkWriteFailed as exc:
                        request.failure = exc
                    sent.append(request)
                    if len(sent) > flushes.ahead or request.failure is not None:
                        ok = self._answered(process, sent.popleft(), flushes, entries, done,
                                            rest)
                while sent:
                    self._answered(process, sent.popleft(), flushes, entries, done, rest)
            finally:
                for request in sent:  # only where something above raised
                    self._end_creations(request)
        return rest

    def _request(self, taken: list[tuple[Variable, Chunk]], flushes: Flushes,
                 rest: list[tuple[Variable, Chunk]]) -> _Request:
        """A request for the ``taken`` chunks the process can write (the others go to
        ``rest``), with the files of the arrays they need made."""
        files = self.writer._files
        request = _Request(CACHED_CHUNK if files is not None and files.cached else CHUNK)
        try:
            for var, chunk in taken:
                if var.chunk_writer is None:
                    if self._new_array_jobs(var, chunk, flushes, request):
                        continue
                    if var.array is not None:  # an array of the store appended to
                        with var.lock:
                            self.writer.chunk_writer(var)
                job = self._process_job(var, chunk, flushes.batch)
                if job is None:
                    rest.append((var, chunk))
                else:
                    request.add_chunk(var, chunk, job)
        except BaseException:
            self._end_creations(request)
            raise
        return request

    def _answered(self, process: ChunkProcess, request: _Request, flushes: Flushes,
                  entries: list[Entry] | None, done: list[Chunk],
                  rest: list[tuple[Variable, Chunk]]) -> bool:
        """Read the reply to ``request`` (the oldest sent) and count its files; True where
        none failed."""
        try:
            failed = request.failure
            crcs: list[int] = []
            if failed is None:
                try:
                    crcs = process.receive()
                except ChunkWriteFailed as exc:
                    crcs, failed = exc.crcs, exc
                except Exception as exc:  # still every chunk must be counted done or failed
                    failed = ChunkWriteFailed([], exc)
            return self._written(request, crcs, failed, flushes, entries, done, rest)
        finally:
            self._end_creations(request)

    def _end_creations(self, request: _Request) -> None:
        """The arrays ``request`` claimed to create are made (published) or not: another
        thread that waits for one goes on."""
        for var, creating in request.creating:
            self.writer.end_creation(var, creating)
        request.creating.clear()

    def _written(self, request: _Request, crcs: list[int], failed: ChunkWriteFailed | None,
                 flushes: Flushes, entries: list[Entry] | None, done: list[Chunk],
                 rest: list[tuple[Variable, Chunk]]) -> bool:
        """Count a request's files written (``crcs``, in order): a new array is published
        once its ``zarr.json`` is; True where none failed. A chunk whose file or array's
        file failed fails; those after it go to ``rest``."""
        for job, crc, what in zip(request.jobs, crcs, request.meaning, strict=False):
            if isinstance(what, _NewArray):
                self.writer.publish_array(what.var, what.made, what.chunk_writer)
                if what.folder is not None:
                    what.chunk_writer.files.made(what.folder)  # type: ignore[union-attr]
                continue
            var, chunk, key = what
            if entries is not None:  # as ChunkWriter.write records them
                entries.append((key, job[2] + (4 if job[3] else 0), crc))
            done.append(chunk)
        if failed is None:
            return True
        after = request.meaning[len(crcs):]
        failing = after.pop(0)
        if isinstance(failing, _NewArray):  # its chunk, next, fails with it
            failing = after.pop(0)
        assert not isinstance(failing, _NewArray)
        self._flush_failed(failing[0], failing[1], flushes, failed.error)
        rest.extend((what[0], what[1]) for what in after if not isinstance(what, _NewArray))
        return False

    def _new_array_jobs(self, var: Variable, chunk: Chunk, flushes: Flushes,
                        request: _Request) -> bool:
        """Make the array of ``chunk``, gathered ``var``'s first, in memory and add its
        ``zarr.json`` and the chunk to ``request``: the array is published once the process
        wrote that file (:meth:`_written`). False where this thread does not create it
        (another does, or it failed: the usual way makes it again and reports the failure),
        or where the process cannot write its chunks (compressed: its file is written
        here and the array published)."""
        writer, files = self.writer, self.writer._files
        if var.gather is None or chunk.existing or files is None or flushes.batch.size <= 0:
            return False
        creating = writer.claim_creation(var)
        if creating is None:
            return False
        request.creating.append((var, creating))
        try:
            made = writer.new_array(var, self.chunks.fill_gaps(var, chunk,
                                                               self._probe_rows(var, chunk)))
            chunk_writer = ChunkWriter(made.array, files)
            if not made.documents or not chunk_writer.raw_files:
                for key, data in made.documents:
                    writer.write_document(key, data)
                writer.publish_array(var, made, chunk_writer)
                return False
            self.chunks.fill_gaps(var, chunk, chunk_writer.rows_written(chunk.used, chunk.rows))
            job = self._process_job(var, chunk, flushes.batch, chunk_writer)
            if job is None:
                return False
            (key, data), = made.documents
            path = os.path.join(files.root, key)
            folder = os.path.dirname(path)
            new_folder = files.process_or_make(folder)
        except Exception:
            return False
        request.jobs.append((path, memoryview(data), len(data), False,
                             DOCUMENT_NEW_FOLDER if new_folder else DOCUMENT))
        request.meaning.append(_NewArray(var, made, chunk_writer,
                                         folder if new_folder else None))
        request.add_chunk(var, chunk, job)
        return True

    def _process_job(self, var: Variable, chunk: Chunk, batch: Batch,
                     writer: ChunkWriter | None = None
                     ) -> tuple[str, str, np.ndarray, int, bool] | None:
        """``(key, path, body, length, checksum)`` of a chunk the process can write: one
        whole chunk of the array, stored as its own memory, in a local store's file, of
        ``length`` bytes; ``body``, its first bytes, holds the chunk's used rows (the
        process writes the rest as a hole). The array's own checks first: a chunk of a
        compressed array is not filled here in vain. ``writer``: a new array's, not yet
        published (its folder is not made here: the process makes it)."""
        new = writer is not None
        writer = writer or var.chunk_writer
        if writer is None or not writer.raw_files:
            return None
        whole = self._whole_chunk(var, chunk, batch, writer)
        if whole is None:
            return None
        data, encoder, files = whole[1], writer.encoder, writer.files
        assert encoder is not None and files is not None  # raw_files
        if not data.dtype.isnative or tuple(data.shape) != encoder.chunks \
                or not data.flags.c_contiguous:
            return None
        key = writer.prefix + encoder.chunk_key(
            (chunk.start // encoder.chunks[0], *(0,) * (data.ndim - 1)))
        body = encoder.encode(data)
        return (key, os.path.join(files.root, key) if new else files.path(key),
                body[:writer.written_bytes(body, chunk.used)], body.nbytes, encoder.checksum)

    def _flush_failed(self, var: Variable, chunk: Chunk, flushes: Flushes,
                      error: BaseException) -> None:
        writer, batch = self.writer, flushes.batch
        batch.failed = True
        writer._fail("chunk write", error, f"{writer._where}/{var.name}")
        self.chunks.recycle(chunk)
        self.chunks.finished(flushes.group, False)
        writer.commits.task_done(batch)

    def _whole_chunk(self, var: Variable, chunk: Chunk, batch: Batch,
                     writer: ChunkWriter | None = None
                     ) -> tuple[ChunkWriter, np.ndarray] | None:
        """The chunk writer (``var``'s, or ``writer``) and data of ``chunk`` where
        :meth:`run_flushes` writes it itself, else None."""
        writer = writer or var.chunk_writer
        if writer is None or var.gather is None or chunk.existing \
                or self.writer._error is not None or batch.size <= 0 \
                or writer.array.dtype != var.gather.dtype:
            return None
        data = self.chunks.fill_gaps(var, chunk, writer.rows_written(chunk.used, chunk.rows))
        return (writer, data) if writer.covers(chunk.start, data) else None

    def flush_task(self, var: Variable, chunk: Chunk) -> Task:
        assert chunk.flush is not None
        group, batch = chunk.flush
        task = self.writer._task(batch, var, None, _identity, 0)
        task.chunk, task.group = chunk, group
        return task

    def chunk_data(self, task: Task) -> np.ndarray:
        """A flush's data: the whole chunk, fill values where no rows were placed."""
        chunk, var = task.chunk, task.var
        assert chunk is not None
        if var.chunk_writer is not None:
            through = var.chunk_writer.rows_written(chunk.used, chunk.rows)
        else:  # the array's first batch (its compression probe), the rest in fill_written
            through = self._probe_rows(var, chunk)
        data = self.chunks.fill_gaps(var, chunk, through)
        task.shape = tuple(data.shape[1:])
        return data

    @staticmethod
    def _probe_rows(var: Variable, chunk: Chunk) -> int:
        """The rows of ``var``'s first chunk filled before its array exists: its used ones,
        and the first batch's, which decide its compression."""
        return max(chunk.used, chunk.rows // var.attrs.get(GATHERED, 1))

    def fill_written(self, task: Task, writer: ChunkWriter) -> None:
        """Fill the rows of a chunk that ends past its used ones which ``writer`` (made after
        :meth:`chunk_data`) puts on the disk."""
        chunk = task.chunk
        if chunk is not None and chunk.used < chunk.rows:
            self.chunks.fill_gaps(task.var, chunk, writer.rows_written(chunk.used, chunk.rows))

    def task_done(self, task: Task, ok: bool) -> bool:
        """A placement into a gathered chunk or a chunk's flush is over (done or not). True
        where that moved the durable rows (the caller commits: ``Commits.task_done``)."""
        if task.parts is not None:
            for chunk in self.chunks.placed(task.parts):
                self.queue_flush(task.var, chunk)
        if task.chunk is not None and task.group is not None:
            self.chunks.recycle(task.chunk)
            return self.chunks.finished(task.group, ok)
        return False

    def notify(self) -> None:
        """Wake a caller waiting in :meth:`close_chunks` (a commit, or a failure)."""
        with self.chunks.lock:
            self.chunks.changed.notify_all()


class Flushes:
    """The chunks of one group to write, taken by the writer threads it was queued to
    (:meth:`GatheredWrites.run_flushes`)."""

    def __init__(self, chunks: list[tuple[Variable, Chunk]], creating: bool = False) -> None:
        flush = chunks[0][1].flush
        assert flush is not None  # sealed
        self.group, self.batch = flush  # one seal: one group, one manifest batch
        self.chunks = deque(chunks)
        self.by_process = False  # a thread sends them to the chunk process
        self.creating = creating  # some of their arrays are still to be created

    # Where arrays are made, the process writes their files while one writer thread makes
    # the next request's arrays: requests that fit the pipe, one sent ahead, and the group
    # sent to the process however small. A group's chunks alone are the disk's work, which
    # at the close the other writer threads share: no request ahead.

    @property
    def process_from(self) -> int:
        """The chunks left from which a thread sends them to the chunk process."""
        return 1 if self.creating else PROCESS_FROM

    @property
    def request_chunks(self) -> int:
        return CREATE_REQUEST_CHUNKS if self.creating else REQUEST_CHUNKS

    @property
    def ahead(self) -> int:
        """Requests sent before the reply to the oldest is read."""
        return 1 if self.creating else 0

    def take(self) -> Iterator[tuple[Variable, Chunk]]:
        while True:
            try:
                yield self.chunks.popleft()  # atomic: threads share the deque
            except IndexError:
                return


class _NewArray(NamedTuple):
    """A new array whose ``zarr.json`` a request writes (:meth:`GatheredWrites._written`)."""

    var: Variable
    made: NewArray
    chunk_writer: ChunkWriter
    folder: str | None  # made by the process


class _Request:
    """One request to the chunk process: its jobs, and what each stands for."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # of its chunks: CHUNK, or CACHED_CHUNK at the close
        self.jobs: list[tuple[str, Any, int, bool, str]] = []
        #: per job: a new array (its zarr.json) or a chunk, ``(var, chunk, key)``
        self.meaning: list[_NewArray | tuple[Variable, Chunk, str]] = []
        #: the arrays this request's thread claimed to create, released when it is over
        self.creating: list[tuple[Variable, threading.Event]] = []
        self.failure: ChunkWriteFailed | None = None  # it could not be sent

    def add_chunk(self, var: Variable, chunk: Chunk,
                  job: tuple[str, str, np.ndarray, int, bool]) -> None:
        key, path, body, length, checksum = job
        self.jobs.append((path, body, length, checksum, self.kind))
        self.meaning.append((var, chunk, key))


def _identity(value: Any) -> Any:
    return value


def _nbytes(data: Any) -> int:
    """The host bytes ``data`` takes: its ``nbytes`` where it is an int, else 4 an element."""
    nbytes = getattr(data, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return math.prod(int(size) for size in data.shape) * 4
