"""Writing one chunk file: its page-aligned head with ``O_DIRECT``, the rest through the
page cache. Standard library only: the chunk-writing process (:mod:`._chunk_child`) runs it
without importing layerscope, numpy or zarr.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
#: smaller chunks go through the page cache (their bytes are few). From 64 KiB on, a page-cache
#: write costs the writer thread CPU in proportion to its bytes, several times that of an
#: O_DIRECT write where the cache takes pages the machine has not touched yet (a long trace
#: grows the cache; on a virtual machine each such page is a fault on the host): 160 KB
#: took 500-650 us of CPU against about 100 us with O_DIRECT, and a writer thread's CPU is
#: taken from the model (benchmarks/README.md, "Many captured sites")
DIRECT_FROM = 64 << 10
DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere chunks go through the page cache
#: O_NOFOLLOW: a chunk file that is a symlink is refused (ELOOP), never written through
CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def write_file(path: str, body: Any, trailer: bytes, direct: bool, durable: bool,
               aligned: Callable[[Any], Any] = lambda body: body,
               length: int | None = None) -> bool:
    """``body`` then ``trailer`` as the file ``path``: the page-aligned head of ``aligned(body)``
    with ``O_DIRECT`` where ``direct`` and the body is large enough. ``length`` (at least
    the body's): the trailer starts there, the bytes between read as zeros (a hole: nothing
    is written for them). Returns ``direct``, False once the file system refused
    ``O_DIRECT`` (the file then went through the page cache)."""
    head = direct_head(len(memoryview(body).cast("B")), direct)
    if head:
        try:
            write_direct(path, aligned(body), head, trailer, durable, length)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct = False
    write_cached(path, body, trailer, durable, length)
    return direct


def used_bytes(nbytes: int, used: int, rows: int) -> int:
    """The bytes to write of a body of ``nbytes`` (``rows`` rows) whose first ``used`` rows
    alone are ever read: the pages that hold them (the rest of the file is left a hole)."""
    return min(nbytes, -(-nbytes * used // rows // ALIGN) * ALIGN)


def zeros(count: int) -> memoryview:
    """``count`` zero bytes (to checksum a hole), from one buffer kept for the next call."""
    global _ZEROS
    if len(_ZEROS) < count:
        _ZEROS = memoryview(bytes(count))  # a thread holding the old one keeps it
    return _ZEROS[:count]


_ZEROS = memoryview(b"")


def direct_head(nbytes: int, direct: bool) -> int:
    """The bytes of a body of ``nbytes`` to write with ``O_DIRECT`` (0: none)."""
    return nbytes // ALIGN * ALIGN if direct and DIRECT and nbytes >= DIRECT_FROM else 0


def write_direct(path: str, body: Any, head: int, trailer: bytes, durable: bool,
                 length: int | None = None) -> None:
    """``body`` (page-aligned memory) and ``trailer`` as the file ``path`` (the trailer at
    ``length``, see :func:`write_file`), the first ``head`` bytes with ``O_DIRECT``. EINVAL:
    the file system refuses ``O_DIRECT``."""
    import fcntl  # only where O_DIRECT exists, i.e. on Linux

    view = memoryview(body).cast("B")
    fd = os.open(path, CREATE | DIRECT, 0o666)
    try:
        write_all(fd, [view[:head]])
        # F_SETFL sets only the status flags; of those this file has O_DIRECT alone (no
        # F_GETFL: each call hands Python's lock to the model's thread and back)
        fcntl.fcntl(fd, fcntl.F_SETFL, 0)
        _write_tail(fd, view, head, trailer, length)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_cached(path: str, body: Any, trailer: bytes, durable: bool,
                 length: int | None = None) -> None:
    """``body`` and ``trailer`` as the file ``path`` (the trailer at ``length``, see
    :func:`write_file`), through the page cache."""
    fd = os.open(path, CREATE, 0o666)
    try:
        _write_tail(fd, memoryview(body).cast("B"), 0, trailer, length)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_tail(fd: int, view: memoryview, start: int, trailer: bytes,
                length: int | None) -> None:
    """``view[start:]`` (written up to ``start`` already) and ``trailer``; the trailer at
    offset ``length`` where that lies past the body, zeros between (a hole)."""
    if length is None or length <= view.nbytes:
        write_all(fd, [view[start:], trailer])
        return
    write_all(fd, [view[start:]])
    if trailer:
        os.lseek(fd, length, os.SEEK_SET)
        write_all(fd, [trailer])
    else:
        os.ftruncate(fd, length)


def write_all(fd: int, parts: list[Any]) -> None:
    """``os.writev`` until every byte is written (a write may stop short)."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        written = os.writev(fd, views) if hasattr(os, "writev") else os.write(fd, views[0])
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
