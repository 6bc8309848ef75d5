"""A process of its own that writes a gathered group's chunk files.

A model traced at every module closes thousands of small gathered chunks a group. Written by
a writer thread, each file took five system calls and some Python, and every one of them
handed Python's lock to the model's thread and back: while a group was written the model's
batches took twice as long (benchmarks/README.md, "Many captured sites"). Here the writer
thread sends the group's requests down a pipe, one system call a request, and waits for the
reply without the lock; the process (:mod:`._chunk_child`) checksums and writes the files.
The chunks' bytes do not go down the pipe where they lie in the memory file the process
maps (:mod:`.chunkmemory`, the gathered chunks' memory once the process runs): a request
names where.
Where a group's arrays are still to be made (the first group, or every array of a short
trace at its close), the process also makes their folders and writes their ``zarr.json``,
and the writer thread makes the next request's arrays in memory while it does; an array is
published (commits name it) only once the process reported its ``zarr.json`` written.

Faults: a chunk the process could not write comes back as the ``OSError`` it met, with the
chunks before it written; a process that ends (killed) is a failure of every chunk not
reported written. Chunks reach disk only for rows not yet committed (:mod:`.chunkfile`), so
what the process leaves behind is never trusted by a reader.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any

from ._chunk_child import CACHED_CHUNK, CHUNK, DOCUMENT, DOCUMENT_NEW_FOLDER, IN_PIPE
from ._rawfile import write_all
from .chunkmemory import ChunkArena

__all__ = ["CACHED_CHUNK", "CHUNK", "DOCUMENT", "DOCUMENT_NEW_FOLDER", "IN_PIPE", "ChunkProcess",
           "ChunkWriteFailed"]

#: a group of fewer gathered chunks is written by the writer thread itself: the process would
#: save little, and a store of a few variables never starts it
PROCESS_FROM = 64
#: chunks a request: between requests another writer thread may take a share of the group
#: (at the close, when no model runs)
REQUEST_CHUNKS = 256
#: chunks a request where their arrays are made too: requests that fit the pipe, so that the
#: writer thread makes the next while the process writes the one before (a first chunk of a
#: one-batch trace is a few pages; with its ``zarr.json`` about 17 KB for 1 KB of Python)
CREATE_REQUEST_CHUNKS = 32
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_chunk_child.py")
_PIPE_BYTES = 1 << 20  # a chunk in one write where Linux allows it (pipe-max-size)


class ChunkWriteFailed(Exception):
    """The chunks whose crc32c are ``crcs`` were written; the one after them failed with
    ``error``."""

    def __init__(self, crcs: list[int], error: BaseException) -> None:
        super().__init__(str(error))
        self.crcs, self.error = crcs, error


class ChunkProcessEnded(OSError):
    """The chunk-writing process ended before it answered."""


def available() -> bool:
    """Where a process writes chunks: Linux (elsewhere the writer threads do)."""
    return sys.platform.startswith("linux")


class ChunkProcess:
    """The process, started at the first request (or by :meth:`start`). A caller holding
    :attr:`lock` may :meth:`send` a request before the reply to the one before is read
    (:meth:`receive`, in order): the process writes one while the caller makes the next."""

    def __init__(self, direct: bool, durable: bool) -> None:
        self.direct, self.durable = direct, durable
        self.lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._requests = self._replies = -1
        #: the memory file gathered chunks live in, which the process reads them from
        #: (:mod:`.chunkmemory`); None until it starts, or where the system has none
        self.arena: ChunkArena | None = None
        self._arena_tried = False

    def write(self, jobs: list[tuple[str, Any, int, bool, str]]) -> list[int]:
        """Write each ``(path, body, length, checksum, kind)``. A chunk (``kind``
        :data:`CHUNK`): ``body`` (contiguous uint8) as the file ``path``, zeros after it up
        to ``length`` bytes (a hole, see :func:`._rawfile.write_file`), the crc32c of those
        bytes after them where ``checksum``; :data:`CACHED_CHUNK`: the same, all of it
        through the page cache. A new array's ``zarr.json`` (:data:`DOCUMENT`,
        :data:`DOCUMENT_NEW_FOLDER`): ``body`` in one step, see :mod:`._chunk_child`.
        Returns every file's crc32c (0 for a document); raises :class:`ChunkWriteFailed`
        at the first file not written."""
        with self.lock:
            self.send(jobs)
            return self.receive()

    def start(self) -> None:
        """Start the process now, if it is not running: it starts while the caller goes on
        (an interpreter takes tens of milliseconds to start)."""
        with self.lock:
            try:
                self._start()
            except OSError:
                pass  # the first request reports it

    def send(self, jobs: list[tuple[str, Any, int, bool, str]]) -> None:
        """Send a request of :meth:`write`'s ``jobs`` (with :attr:`lock` held); raises
        :class:`ChunkWriteFailed` where the process cannot take it (then read no reply)."""
        try:
            self._start()  # a process that cannot start, or ended, fails the first chunk
            places = self._places(jobs)
            header = pickle.dumps([(path, body.nbytes, max(length, body.nbytes), checksum,
                                    kind, place)
                                   for (path, body, length, checksum, kind), place
                                   in zip(jobs, places, strict=True)])
            # one call for the lot where the system allows: each hands Python's lock to the
            # model's thread and back
            write_all(self._requests, [struct.pack("<Q", len(header)), header,
                                       *(job[1] for job, place in zip(jobs, places, strict=True)
                                         if place == IN_PIPE)])
        except OSError as exc:  # a broken pipe: it is gone
            raise ChunkWriteFailed([], self._gone(exc)) from exc

    def _places(self, jobs: list[tuple[str, Any, int, bool, str]]) -> list[int]:
        """Where each job's body lies in the memory file the process maps; :data:`IN_PIPE`
        where it lies elsewhere (a document, a chunk of private memory): its bytes follow
        the request down the pipe."""
        arena = self.arena
        if arena is None:
            return [IN_PIPE] * len(jobs)
        return [arena.locate(body) if kind in (CHUNK, CACHED_CHUNK) else IN_PIPE
                for _, body, _, _, kind in jobs]

    def receive(self) -> list[int]:
        """The reply to the oldest request sent and not yet answered (with :attr:`lock`
        held): as :meth:`write` returns or raises."""
        try:
            size = self._read(8)
            crcs, failure = pickle.loads(self._read(struct.unpack("<Q", size)[0]))
        except (OSError, EOFError) as exc:  # no reply: it is gone
            raise ChunkWriteFailed([], self._gone(exc)) from exc
        if failure is not None:
            code, message, path = failure
            raise ChunkWriteFailed(crcs, OSError(code, message, path))
        return crcs

    def _gone(self, exc: BaseException) -> BaseException:
        return exc if isinstance(exc, ChunkProcessEnded) else self._ended(exc)

    def close(self) -> None:
        """End the process (it writes nothing more: every request was answered)."""
        with self.lock:
            child, self._child = self._child, None
            if child is not None:
                for fd in (self._requests, self._replies):
                    os.close(fd)
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            if self.arena is not None:
                self.arena.close()

    def _start(self) -> None:
        if self._child is not None:
            if self._child.poll() is None:
                return
            raise self._ended(None)
        if not self._arena_tried:
            self._arena_tried = True
            try:
                self.arena = ChunkArena()
            except (AttributeError, OSError):
                pass  # no memory files here: the chunks' bytes go down the pipe
        shared = self.arena.fd if self.arena is not None else -1
        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(requests_write, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        except (ImportError, AttributeError, OSError):
            pass  # a smaller pipe: a chunk takes more than one write
        try:
            # -P: the modules beside the script never shadow the standard library's
            self._child = subprocess.Popen(
                [sys.executable, "-P", _CHILD, str(requests_read), str(replies_write),
                 str(os.getpid()), "direct" if self.direct else "cached",
                 "durable" if self.durable else "lazy", str(shared)],
                pass_fds=(requests_read, replies_write, *((shared,) if shared >= 0 else ())),
                stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (requests_write, replies_read):
                os.close(fd)
            raise
        finally:
            for fd in (requests_read, replies_write):
                os.close(fd)
        self._requests, self._replies = requests_write, replies_read

    def _read(self, nbytes: int) -> bytes:
        parts, left = [], nbytes
        while left:
            part = os.read(self._replies, left)
            if not part:
                raise EOFError("no reply")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def _ended(self, cause: BaseException | None) -> ChunkProcessEnded:
        child = self._child
        code = None
        if child is not None:
            try:
                code = child.wait(timeout=10)
            except subprocess.TimeoutExpired:  # it closed its pipes yet runs: stop it
                child.kill()
                code = child.wait()
        return ChunkProcessEnded(
            f"the chunk-writing process (pid {getattr(child, 'pid', '?')}) ended with exit "
            f"code {code} before it wrote the group's chunks"
            + (f" ({cause})" if cause is not None else ""))
