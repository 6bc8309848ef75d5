"""The chunk-writing process's program (:mod:`.chunkproc` starts it as a script of its own:
it imports no more than the standard library, ``crc32c`` and :mod:`._rawfile`).

Each request on the request pipe is an 8-byte length, a pickled list of ``(path, nbytes,
length, checksum, kind, place)`` and then the ``nbytes`` of body of each file whose ``place``
is :data:`IN_PIPE`, in that order; the body of any other lies at offset ``place`` of the memory
file whose descriptor the process was given (:mod:`.chunkmemory`), which it maps to read. A chunk
(``kind`` :data:`CHUNK`) is written as the file ``path`` (its page-aligned head with
``O_DIRECT``, the rest and, with ``checksum``, its crc32c through the page cache), zeros up to
``length`` where the body is shorter (a hole: the unused rows of a chunk; the checksum covers
them); :data:`CACHED_CHUNK` the same, all of it through the page cache (the chunks a writer's
close waits for). A new array's ``zarr.json`` (:data:`DOCUMENT`, or
:data:`DOCUMENT_NEW_FOLDER` to make its folder first) is written in one step, a temporary file
renamed into place (:func:`._rawfile.write_document`). One reply goes back: each file's crc32c
(0 for a document), in order, up to the first failure, and that failure as ``(errno, strerror,
path)`` or None. After a failure the remaining bodies are read and dropped, so that the next
request starts in step.

The process ends when its request pipe closes, or once the process that started it is gone
(checked before each file: an orphan writes at most one more file).
"""

from __future__ import annotations

import bisect
import errno
import importlib.util
import mmap
import os
import pickle
import struct
import sys
from typing import Any

import crc32c

CHUNK, CACHED_CHUNK = "chunk", "chunk, cached"
DOCUMENT, DOCUMENT_NEW_FOLDER = "document", "document, new folder"
IN_PIPE = -1  # a body's place: it follows the request down the pipe


def main() -> None:
    requests, replies, parent = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    direct, durable = sys.argv[4] == "direct", sys.argv[5] == "durable"
    shared = MemoryFile(int(sys.argv[6]))
    raw = _rawfile()
    memory = memoryview(b"")
    while True:
        size = _read(requests, 8)
        if size is None:
            return
        header = _read(requests, struct.unpack("<Q", size)[0])
        if header is None:
            return
        crcs: list[int] = []
        failure: tuple[int | None, str | None, Any] | None = None
        for path, nbytes, length, checksum, kind, place in pickle.loads(header):
            if place != IN_PIPE:
                if os.getppid() != parent:
                    return
                if failure is not None:
                    continue
                try:
                    body = shared.view(place, nbytes)
                except (OSError, ValueError) as exc:
                    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EFAULT
                    failure = (code, str(exc), path)
                    continue
            else:
                if len(memory) < nbytes:  # page-aligned, as O_DIRECT needs
                    memory = memoryview(mmap.mmap(-1, -(-nbytes // raw.ALIGN) * raw.ALIGN))
                body = memory[:nbytes]
                if not _read_into(requests, body) or os.getppid() != parent:
                    return
            if failure is not None:
                continue
            if kind not in (CHUNK, CACHED_CHUNK):
                try:
                    raw.write_document(path, body, durable, kind == DOCUMENT_NEW_FOLDER)
                except OSError as exc:
                    failure = (exc.errno, exc.strerror, exc.filename or path)
                    continue
                crcs.append(0)
                continue
            crc = crc32c.crc32c(body)
            if length > nbytes:  # the hole reads as zeros
                crc = crc32c.crc32c(raw.zeros(length - nbytes), crc)
            trailer = crc.to_bytes(4, "little") if checksum else b""
            try:
                wrote = raw.write_file(path, body, trailer, direct and kind == CHUNK, durable,
                                       length=length)
                direct = wrote if kind == CHUNK else direct
            except OSError as exc:
                failure = (exc.errno, exc.strerror, path)
                continue
            crcs.append(crc)
        reply = pickle.dumps((crcs, failure))
        raw.write_all(replies, [struct.pack("<Q", len(reply)), reply])


class MemoryFile:
    """The memory file gathered chunks lie in, mapped (read only) as far as the file has
    grown: a window for each growth, a place in it never moves."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.end = 0  # the bytes of the file mapped
        self.starts: list[int] = []  # each window's offset in the file, ascending
        self.windows: list[memoryview] = []

    def view(self, place: int, nbytes: int) -> memoryview:
        """The ``nbytes`` at offset ``place`` of the file."""
        if not nbytes:
            return memoryview(b"")
        if place + nbytes > self.end:
            if self.fd < 0:
                raise ValueError("no memory file was given")
            size = os.fstat(self.fd).st_size
            if place + nbytes > size:
                raise ValueError(f"bytes {place}..{place + nbytes} lie past the memory "
                                 f"file's end ({size})")
            window = mmap.mmap(self.fd, size - self.end, prot=mmap.PROT_READ, offset=self.end)
            self.starts.append(self.end)
            self.windows.append(memoryview(window))
            self.end = size
        index = bisect.bisect_right(self.starts, place) - 1
        start = place - self.starts[index]
        return self.windows[index][start:start + nbytes]


def _read(fd: int, nbytes: int) -> bytes | None:
    out = bytearray(nbytes)
    return bytes(out) if _read_into(fd, memoryview(out)) else None


def _read_into(fd: int, view: memoryview) -> bool:
    """Fill ``view`` from ``fd``; False where the pipe closed first."""
    done = 0
    while done < len(view):
        got = os.readv(fd, [view[done:]])
        if got == 0:
            return False
        done += got
    return True


def _rawfile():
    """:mod:`._rawfile`, loaded from beside this file without importing layerscope."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rawfile.py")
    spec = importlib.util.spec_from_file_location("_layerscope_rawfile", here)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
    # nothing is left to flush (every file was written by system calls): ending here spares
    # the interpreter's shutdown, which the writer's close waits for (about 10 ms)
    os._exit(0)
