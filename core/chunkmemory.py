"""Gathered chunks' memory that the chunk-writing process reads in place.

A group of a model traced at every module is hundreds of megabytes of chunks. Sent down the
request pipe, each of its bytes was copied twice more, into the pipe and out of it, on the
machine's other cores, while the model ran (benchmarks/README.md, "Shared chunk memory").
Here the chunks live in one memory file (``memfd_create``) that the process maps as well: a
request names where a chunk lies in the file, and the process writes it from there (an
``O_DIRECT`` write reads those very pages).

The file grows by slabs, each mapped once here, its pages allocated by a thread of its own
while the model runs, and carved into page-aligned buffers. A buffer is never given back to
the file: the gatherer keeps written chunks' buffers for the next chunks of their size
(:meth:`.gather.Gatherer.recycle`), as it keeps private memory. The pages go when the last
mapping of them does: the process ends at the writer's close, and the gatherer's buffers go
with the writer's objects (at Python's next collection where those are held in a reference
cycle, as private buffers did).
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading

import numpy as np

from ._rawfile import ALIGN
from .hostpool import page_aligned

#: the file grows by slabs, one mapping each here and in the process, and each slab's pages
#: are allocated at once (:func:`_allocate`): slabs double from the first up to the last
#: size, so that a small trace takes little more memory than its chunks use
FIRST_SLAB, SLAB = 1 << 20, 32 << 20


class ChunkArena:
    """Page-aligned buffers in one memory file; :attr:`fd` is the file, for the process."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("layerscope-chunks", getattr(os, "MFD_CLOEXEC", 1))
        self.size = 0  # the file's length: every slab's bytes
        self._lock = threading.Lock()
        self._starts: list[int] = []  # each slab's address, ascending
        self._slabs: list[tuple[int, int]] = []  # (its length, its offset in the file)
        #: every slab's mapping, kept while the file is open: an address of one unmapped
        #: could be mapped again to other memory, which :meth:`locate` would take for it
        self._mapped: list[np.ndarray] = []
        self._filling: list[threading.Thread] = []  # see _allocate
        self._current = np.empty(0, dtype=np.uint8)  # the slab buffers are taken from
        self._used = 0  # its bytes taken

    def take(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of fresh page-aligned memory in the file (private memory once the file
        is closed: the process is gone, and a chunk's bytes then go to it no more)."""
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)  # as O_DIRECT needs
        with self._lock:
            if self.fd < 0:
                return page_aligned(nbytes)
            if self._current.nbytes - self._used < size:
                self._grow(max(size, min(SLAB, max(FIRST_SLAB, self.size))))
            start = self._used
            self._used += size
            return self._current[start:start + nbytes]

    def locate(self, body: np.ndarray) -> int:
        """The offset in the file where ``body`` (contiguous) starts; -1 where it lies
        elsewhere."""
        address = body.__array_interface__["data"][0]
        with self._lock:
            index = bisect.bisect_right(self._starts, address) - 1
            if index < 0:
                return -1
            start = self._starts[index]
            length, offset = self._slabs[index]
        if address + body.nbytes > start + length:
            return -1
        return offset + address - start

    def close(self) -> None:
        """Close the file: the buffers stay valid until the last of them is gone."""
        with self._lock:
            for filling in self._filling:  # the file's number is not free before they end
                filling.join()
            self._filling = []
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            self._starts, self._slabs, self._mapped = [], [], []
            self._current, self._used = np.empty(0, dtype=np.uint8), 0

    def _grow(self, length: int) -> None:
        """A new slab of ``length`` bytes at the file's end (lock held)."""
        os.ftruncate(self.fd, self.size + length)
        slab = np.frombuffer(mmap.mmap(self.fd, length, offset=self.size), dtype=np.uint8)
        address = slab.__array_interface__["data"][0]
        index = bisect.bisect_right(self._starts, address)
        self._starts.insert(index, address)
        self._slabs.insert(index, (length, self.size))
        self._mapped.append(slab)
        self._filling = [thread for thread in self._filling if thread.is_alive()]
        filling = threading.Thread(target=_allocate, args=(self.fd, self.size, length),
                                   name="layerscope-chunk-memory", daemon=True)
        filling.start()
        self._filling.append(filling)
        self._current, self._used = slab, 0
        self.size += length


def _allocate(fd: int, offset: int, length: int) -> None:
    """Give a new slab its pages now, on a thread of its own: where the model's thread
    touches a page the file already has, the fault only maps it (a batch's 1,601 rows of
    16 KiB into fresh chunks: 18 ms of the model's thread against 26 ms where the fault
    allocates the page too, and 21 ms in private memory; benchmarks/README.md, "Shared chunk
    memory"). Where the system cannot, the touch allocates the page as ever."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError:
        pass
