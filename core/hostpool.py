"""Host memory for captured tensors that wait to be written: a byte budget and reused buffers.

Backends copy a tensor out of the model into a buffer taken from here, the writer gives the
buffer back once its chunks are on disk, and the next batch copies into the same memory. Reuse
keeps the footprint flat (no allocator growth from a fresh 50 MB a batch) and skips the page
faults of fresh memory. Buffers are page-aligned mmaps, so a whole-chunk buffer can go to disk
with ``O_DIRECT`` without another copy.

Buffers of 1 MiB and more ask Linux for transparent huge pages. An ``O_DIRECT`` write pins
every page it reads from, and pinning one 2 MiB page instead of 512 small ones cuts the
writer's CPU time per chunk (see benchmarks/README.md, Writer cost). Where the kernel has no
huge pages to give, the same memory simply stays in small pages.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections import defaultdict
from collections.abc import Iterator

import numpy as np


class HostPool:
    """Blocks producers while more than ``limit`` bytes wait to be written.

    Data the pool did not allocate (a backend's own host copy) is only counted. Buffers the pool
    allocated are kept for reuse, the free ones included, within the same limit: when a new size
    does not fit, free buffers of other sizes are dropped first.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0  # bytes waiting to be written, counted or in pool buffers
        self.pooled = 0  # of which in buffers this pool made
        self.free: defaultdict[int, list[np.ndarray]] = defaultdict(list)
        self.free_bytes = 0
        # Held with ``with self.lock``, never ``with self.cond``: the C lock's own enter and
        # exit leave no gap between taking the lock and the block that gives it back, where
        # Condition's Python-level ones do, and a KeyboardInterrupt landing in that gap would
        # leave the lock taken and every writer thread waiting for it (tests/faults).
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.broken = False
        self.cap: int | None = None  # a tighter bound than ``limit`` for now (set_cap)

    @property
    def bound(self) -> int:
        """What may wait, and be kept in buffers: the limit, or the cap where lower."""
        return self.limit if self.cap is None else min(self.limit, self.cap)

    def set_cap(self, nbytes: int | None) -> None:
        """Bound pending and kept bytes by ``nbytes`` too (None: by the limit only); free
        buffers beyond it are dropped now."""
        with self.lock:
            self.cap = nbytes
            self._make_room()
            self.cond.notify_all()

    def acquire(self, nbytes: int) -> None:
        with interrupt_safe():
            with self.lock:
                # A single item larger than the budget still passes once nothing else waits.
                while self.pending and self.pending + nbytes > self.bound and not self.broken:
                    self.cond.wait()
                self.pending += nbytes

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.pending -= nbytes
            self.cond.notify_all()

    def take(self, nbytes: int) -> np.ndarray:
        """A page-aligned uint8 buffer of ``nbytes``, counted against the budget."""
        self.acquire(nbytes)
        with self.lock:
            self.pooled += nbytes
            spare = self.free.get(nbytes)
            if spare:
                self.free_bytes -= nbytes
                return spare.pop()
            self._make_room()
        try:
            return page_aligned(nbytes)
        except BaseException:  # out of memory: the bytes were never taken
            with self.lock:
                self.pooled -= nbytes
            self.release(nbytes)
            raise

    def give(self, buffer: np.ndarray) -> None:
        """Return a buffer from :meth:`take`; it is reused by the next take of its size."""
        nbytes = buffer.nbytes
        with self.lock:
            self.pending -= nbytes
            self.pooled -= nbytes
            if self.pooled + self.free_bytes + nbytes <= self.bound:
                self.free[nbytes].append(buffer)
                self.free_bytes += nbytes
            self.cond.notify_all()

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.free_bytes = 0

    def break_(self) -> None:
        with self.lock:
            self.broken = True
            self.cond.notify_all()

    def _make_room(self) -> None:
        """Drop free buffers until the buffers taken and kept fit the bound (lock held)."""
        for size in list(self.free):
            if self.pooled + self.free_bytes <= self.bound:
                return
            while self.free[size] and self.pooled + self.free_bytes > self.bound:
                self.free[size].pop()
                self.free_bytes -= size
            if not self.free[size]:
                del self.free[size]


@contextlib.contextmanager
def interrupt_safe() -> Iterator[None]:
    """Around ``with lock: condition.wait()``: a KeyboardInterrupt that lands inside ``wait``
    after it let the lock go leaves the ``with`` a lock it does not hold to release, and the
    RuntimeError that says so would hide the interrupt; the interrupt is raised instead."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise exc.__context__ from None
        raise


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
#: private memory: shared memory (mmap's default) gets no transparent huge pages, and the first
#: touch of each of its pages costs half as much again (31 ms against 21 ms for the 1,601
#: copies of 16 KiB a batch of a model traced at every module makes into fresh gathered chunks;
#: where the chunk process writes them, they live in its memory file instead, whose pages a
#: thread allocates ahead: :mod:`.chunkmemory`)
_PRIVATE = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") \
    else {}


def page_aligned(nbytes: int) -> np.ndarray:
    """``nbytes`` of fresh page-aligned memory; huge-page aligned and advised from 1 MiB."""
    if _MADV_HUGEPAGE is None or nbytes < HUGE_PAGE // 2:
        return np.frombuffer(mmap.mmap(-1, max(nbytes, 1), **_PRIVATE), dtype=np.uint8)[:nbytes]
    # Whole huge pages plus one more so that the buffer can start on a huge-page boundary; pages
    # never touched cost nothing.
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE
    region = mmap.mmap(-1, size, **_PRIVATE)
    region.madvise(_MADV_HUGEPAGE)
    whole = np.frombuffer(region, dtype=np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE
    return whole[start:start + nbytes]
