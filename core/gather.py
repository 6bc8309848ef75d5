"""Gathering small variables: chunks that span several batches, written whole, committed in
groups.

A model traced at thousands of sites hands the writer thousands of small tensors a batch.
Written as one chunk file each, every batch, the cost is per file, not per byte. Instead a
*small* variable (one batch of it at most :attr:`GatherPolicy.below` bytes) gets chunks of
``rows`` samples, several batches' worth, and its tensors are copied into the chunk in memory
(straight from the model, where the backend's snapshot allows it) until the chunk is full.
The full chunk is then written whole, once, as one file per chunk column like every other
chunk: nothing about the format changes but the chunk length along ``batch``.

Commits follow: a batch is committed only once every gathered chunk holding its rows is on
disk, so small variables commit in groups of batches (a *flush group*, made when the rows
reach the end of the open chunks). What a SIGKILL can lose grows from the batch in flight to
the batches since the last group commit (docs/guarantees.md states it and tests/faults holds
it). A chunk that already holds committed rows (the last one of a store appended to) is
rewritten in one step, a new file renamed over it.

Whether a store gathers is decided once per writer, at the end of its first batch: when it
holds at least :attr:`GatherPolicy.min_variables` small variables, the number of batches per
gathered chunk is what :attr:`GatherPolicy.memory` allows for two groups of them (the one
being filled and the one being written), at most :attr:`GatherPolicy.batches`. Until then the
first batch's small tensors wait in the writer's buffers. A store appended to gathers a small
variable whose existing chunks hold at least two of the new batches.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .growth import fill_value_for
from .hostpool import interrupt_safe, page_aligned

#: the attribute of a gathered variable: how many batches (of the first batch's size) a chunk
#: holds along ``batch``
GATHERED = "gathered_batches"


@dataclass(frozen=True)
class GatherPolicy:
    """When and how far small variables are gathered (see the module's description)."""

    enabled: bool = True
    #: a variable is small when one batch of it holds at most this many bytes
    below: int = 256 << 10
    #: gather only when the first batch holds at least this many small variables: a few small
    #: files a batch cost nothing worth a longer wait for the commit
    min_variables: int = 32
    #: host memory for the gathered chunks of all variables: two groups (filled, written)
    memory: int = 512 << 20
    #: at most this many batches per gathered chunk, and so per group commit
    batches: int = 16

    def group_batches(self, small_bytes: int, count: int) -> int:
        """Batches per gathered chunk for ``count`` small variables of ``small_bytes`` a
        batch in all; 1: none are gathered."""
        if not self.enabled or count < max(1, self.min_variables) or small_bytes <= 0:
            return 1
        return max(1, min(self.batches, self.memory // 2 // small_bytes))


class Chunk:
    """One gathered chunk being filled: rows ``start .. start + rows`` of one variable."""

    __slots__ = ("buffer", "closed", "deferred", "existing", "first", "flush", "rows", "start",
                 "used", "written")

    def __init__(self, start: int, rows: int) -> None:
        self.start, self.rows = start, rows
        #: the rows a reader may ever see: all but those past the last batch of a trace that
        #: ended inside this chunk (set at the close). In a local file of an uncompressed
        #: chunk the others are a hole (zeros, no byte written): a store appended to rewrites
        #: this chunk first (core/reopen.py)
        self.used = rows
        self.buffer: np.ndarray | None = None
        self.written: list[tuple[int, int]] = []  # row ranges placed, relative to start
        self.first: int | None = None  # the first row claimed by this writer (absolute)
        self.deferred = 0  # placements queued for a writer thread, not yet done
        self.closed = False
        self.existing = False  # holds committed rows already on disk: rewrite in one step
        self.flush: tuple[Any, Any] | None = None  # (flush group, manifest batch) once closed

    @property
    def end(self) -> int:
        return self.start + self.rows


@dataclass
class VarGather:
    """A gathered variable: its chunk length along ``batch`` and its open chunks."""

    rows: int
    chunks: dict[int, Chunk] = field(default_factory=dict)  # chunk start -> chunk
    dtype: np.dtype | None = None  # the stored dtype, once known
    fill: Any = None

    def accepts(self, dtype: np.dtype) -> bool:
        """Whether rows of ``dtype`` may be stored (the first ones fix the dtype)."""
        if self.dtype is None:
            self.dtype = np.dtype(dtype)
            self.fill = fill_value_for(self.dtype)
        return self.dtype == dtype


@dataclass
class FlushGroup:
    """The chunks closed at one batch end: once all are written, every row below ``rows``
    of every gathered variable is on disk."""

    rows: int
    pending: int = 0
    failed: bool = False
    #: the samples committed once it is written (its manifest batch's end)
    commits: int = 0


class Gatherer:
    """The gathered chunks of one writer, the flush groups and how far they are on disk.

    Chunks are claimed and closed on the model's thread; placements that need a writer
    thread (a device copy to wait for) and the flushes run on writer threads. ``lock``
    guards the chunks' bookkeeping; ``changed`` is notified whenever a placement or a
    flush group finishes.
    """

    def __init__(self, policy: GatherPolicy, durable_rows: int) -> None:
        self.policy = policy
        self.decided = False  # whether this writer's first batch chose group_batches
        self.group_batches = 1
        self.holding = False  # some rows live in gathered chunks: commits wait for flushes
        self.durable = durable_rows  # rows below which every gathered row is on disk
        self.groups: deque[FlushGroup] = deque()
        self.latest: FlushGroup | None = None  # the last group that wrote chunks
        self.by_end: dict[int, list[tuple[Any, Chunk]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._free: dict[int, list[np.ndarray]] = defaultdict(list)
        #: fresh chunk memory of a size: private, or the chunk process's memory file
        #: (:mod:`.chunkmemory`) once that process writes the groups
        self.allocate: Callable[[int], np.ndarray] = page_aligned

    # -- chunks and rows (model thread) ------------------------------------------------------

    def pieces(self, var: Any, start: int, stop: int) -> list[tuple[Chunk, int, int]]:
        """(chunk, first, last) row ranges, relative to each chunk, that rows ``start:stop``
        of ``var`` fall into; chunks are opened as needed."""
        gather: VarGather = var.gather
        out = []
        row = start
        while row < stop:
            first = row // gather.rows * gather.rows
            chunk = gather.chunks.get(first) or self._open(var, first)
            upto = min(stop, chunk.end)
            out.append((chunk, row - first, upto - first))
            row = upto
        return out

    def open_next(self, var: Any, closed: Chunk) -> Chunk:
        """``var``'s chunk after ``closed`` (just closed), opened now with its memory and
        no row claimed: a chunk that never gets one is dropped unwritten at its close."""
        chunk = var.gather.chunks.get(closed.end) or self._open(var, closed.end)
        self.memory(var, chunk)
        return chunk

    def _open(self, var: Any, start: int) -> Chunk:
        """A new chunk of ``var`` from row ``start``, where none is open (no memory yet)."""
        gather: VarGather = var.gather
        chunk = gather.chunks[start] = Chunk(start, gather.rows)
        self.by_end[chunk.end].append((var, chunk))
        return chunk

    def claim(self, var: Any, start: int, stop: int, deferred: bool) -> list[tuple[Chunk, int, int]]:
        """Claim rows ``start:stop`` of ``var`` for the batch being put; ``deferred``: a writer
        thread places them later (the chunk is not written before it has)."""
        self.holding = True
        parts = self.pieces(var, start, stop)
        with self.lock:
            for chunk, lo, hi in parts:
                chunk.written.append((lo, hi))
                if chunk.first is None:
                    chunk.first = chunk.start + lo
                if deferred:
                    chunk.deferred += 1
        return parts

    def view(self, var: Any, start: int, stop: int, shape: tuple[int, ...],
             dtype: np.dtype) -> np.ndarray | None:
        """The chunk memory rows ``start:stop`` of ``var`` go to, to copy a tensor of
        ``shape`` and ``dtype`` straight into; None where it cannot (rows across two
        chunks, another shape or dtype than the chunk's)."""
        gather: VarGather = var.gather
        if tuple(shape[1:]) != tuple(var.trailing) or (start // gather.rows
                                                        != (stop - 1) // gather.rows):
            return None
        if not gather.accepts(dtype):
            return None
        ((chunk, lo, hi),) = self.claim(var, start, stop, deferred=False)
        return self.memory(var, chunk)[lo:hi]

    def memory(self, var: Any, chunk: Chunk) -> np.ndarray:
        """The chunk's buffer, (rows, *var.trailing) of the stored dtype, made on first use."""
        if chunk.buffer is None:
            gather: VarGather = var.gather
            assert gather.dtype is not None
            shape = (chunk.rows, *var.trailing)
            nbytes = math.prod(shape) * gather.dtype.itemsize  # not np.prod: 1,601 calls a group
            with self.lock:
                spare = self._free.get(nbytes)
                buffer = spare.pop() if spare else None
            if buffer is None:
                buffer = self.allocate(nbytes)
            chunk.buffer = buffer.view(gather.dtype).reshape(shape)
        return chunk.buffer

    def place(self, var: Any, parts: list[tuple[Chunk, int, int]], data: np.ndarray) -> None:
        """Copy ``data`` into the chunk pieces :meth:`claim` gave for its rows (on any thread:
        the chunks may be closed meanwhile, they wait for it); positions past its own
        extent along the other axes get the fill value."""
        fill = var.gather.fill
        row = 0
        for chunk, lo, hi in parts:
            target = self.memory(var, chunk)[lo:hi]
            rows = data[row:row + hi - lo]
            if rows.shape[1:] != target.shape[1:]:
                target[...] = fill
                target[(slice(None), *(slice(0, n) for n in rows.shape[1:]))] = rows
            else:
                target[...] = rows
            row += hi - lo

    def placed(self, parts: list[tuple[Chunk, int, int]]) -> list[Chunk]:
        """A deferred placement finished (or was dropped): the chunks now ready to flush."""
        ready = []
        with self.lock:
            for chunk, _, _ in parts:
                chunk.deferred -= 1
                if chunk.closed and chunk.deferred == 0 and chunk.flush is not None:
                    ready.append(chunk)
            self.changed.notify_all()
        return ready

    def forget(self, var: Any, chunk: Chunk) -> None:
        """Take ``var``'s open ``chunk`` out of the gathered ones (its caller writes it)."""
        del var.gather.chunks[chunk.start]
        kept = [(v, c) for v, c in self.by_end[chunk.end] if c is not chunk]
        if kept:
            self.by_end[chunk.end] = kept
        else:
            del self.by_end[chunk.end]

    def unclaim(self, start: int) -> None:
        """Forget rows from ``start`` on (a batch discarded): they are filled at the flush,
        unless a later batch claims them again."""
        for chunks in self.by_end.values():
            for _, chunk in chunks:
                rel = start - chunk.start
                chunk.written = [(lo, min(hi, rel)) for lo, hi in chunk.written if lo < rel]
                if chunk.first is not None and chunk.first >= start:
                    chunk.first = None

    def close_through(self, upto: int | None, rows: int
                      ) -> tuple[FlushGroup | None, list[tuple[Any, Chunk]]]:
        """Close every chunk that ends at or before ``upto`` (None: all of them, at a close;
        ``rows``: the rows put so far). Returns the new flush group, when the rows it makes
        durable move, and the closed chunks that hold rows of this writer to write (the
        others are dropped: their files, if any, stay as they are)."""
        ends = sorted(e for e in self.by_end if upto is None or e <= upto)
        closed: list[tuple[Any, Chunk]] = []
        for end in ends:
            for var, chunk in self.by_end.pop(end):
                del var.gather.chunks[chunk.start]
                if chunk.first is None:
                    self.recycle(chunk)
                else:
                    chunk.used = min(chunk.rows, max(rows - chunk.start, 0))
                    closed.append((var, chunk))
        last = self.groups[-1].rows if self.groups else self.durable
        if not closed and any(first <= last for first in self._firsts()):
            return None, closed  # the usual batch end: one chunk looked at, not every one
        held_from = min(self._firsts(), default=rows)
        if held_from <= last and not closed:
            return None, closed
        group = FlushGroup(max(held_from, last), pending=len(closed))
        with self.lock:
            self.groups.append(group)
            self._advance()
        return group, closed

    def _firsts(self) -> Iterator[int]:
        """The first row this writer claimed in each open chunk that has one."""
        for chunks in self.by_end.values():
            for _, chunk in chunks:
                if chunk.first is not None:
                    yield chunk.first

    def seal(self, closed: list[tuple[Any, Chunk]], group: FlushGroup, batch: Any
             ) -> list[tuple[Any, Chunk]]:
        """Mark ``closed`` chunks as written by ``group`` into ``batch``'s manifest; returns
        those ready now (the others are flushed when their last placement finishes)."""
        ready = []
        with self.lock:
            for var, chunk in closed:
                chunk.closed, chunk.flush = True, (group, batch)
                if chunk.deferred == 0:
                    ready.append((var, chunk))
        return ready

    def wait(self, done: Any) -> None:
        """Block until ``done()`` (called with the lock held) is true."""
        with interrupt_safe(), self.lock:
            self.changed.wait_for(done)

    def in_flight_locked(self) -> int:
        return sum(1 for group in self.groups if group.pending)

    def regrow(self, var: Any) -> None:
        """Give ``var``'s open chunks its grown trailing shape (a token axis grew): written
        rows keep their values, new positions hold the fill value."""
        for chunk in list(var.gather.chunks.values()):
            old = chunk.buffer
            if old is None or tuple(old.shape[1:]) == tuple(var.trailing):
                continue
            self.wait(lambda chunk=chunk: chunk.deferred == 0)
            chunk.buffer = None
            grown = self.memory(var, chunk)
            grown[...] = var.gather.fill
            grown[(slice(None), *(slice(0, n) for n in old.shape[1:]))] = old
            self.recycle_memory(old)

    # -- flushes (writer threads) ------------------------------------------------------------

    def fill_gaps(self, var: Any, chunk: Chunk, through: int | None = None) -> np.ndarray:
        """The chunk's memory with every row nobody placed set to the fill value, up to row
        ``through`` (None: all). Rows past a chunk's used ones are read by nobody; an
        uncompressed chunk writes only their first page or so (the rest is a hole), and at
        a close that ends a thousand chunks after one batch, filling them all is most of
        their writing."""
        buffer = self.memory(var, chunk)
        end = chunk.rows if through is None else min(through, chunk.rows)
        row = 0
        for lo, hi in sorted(chunk.written):
            if lo > row and row < end:
                buffer[row:min(lo, end)] = var.gather.fill
            row = max(row, hi)
        if row < end:
            buffer[row:end] = var.gather.fill
        return buffer

    def recycle(self, chunk: Chunk) -> None:
        """Keep a written chunk's memory for the next chunk of its size."""
        buffer, chunk.buffer = chunk.buffer, None
        if buffer is not None:
            self.recycle_memory(buffer)

    def recycle_memory(self, buffer: np.ndarray) -> None:
        flat = buffer.reshape(-1).view(np.uint8)
        with self.lock:  # at most what two groups took at once: memory is taken only when used
            self._free[flat.nbytes].append(flat)

    def finished(self, group: FlushGroup, ok: bool, count: int = 1) -> bool:
        """``count`` flushes of ``group`` are done; True when that moved the durable rows."""
        with self.lock:
            group.pending -= count
            group.failed = group.failed or not ok
            return self._advance()

    def _advance(self) -> bool:
        """Move the durable rows past every written group at the front (lock held)."""
        moved = False
        while self.groups and self.groups[0].pending == 0 and not self.groups[0].failed:
            self.durable = max(self.durable, self.groups.popleft().rows)
            moved = True
        self.changed.notify_all()
        return moved

    def holds(self, stop: int) -> bool:
        """Whether rows before ``stop`` may still live only in memory."""
        return self.holding and stop > self.durable

    def drop_all(self) -> None:
        """Forget every chunk; the spare chunk memory is given back by a thread of its own:
        unmapping a group's thousands of buffers took 0.14 s of a store's close."""
        self.by_end.clear()
        with self.lock:
            spare, self._free = self._free, defaultdict(list)
        if spare:  # an mmap lets go of Python's lock while it unmaps
            threading.Thread(target=spare.clear, name="layerscope-free", daemon=True).start()
